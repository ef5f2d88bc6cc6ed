"""Volumes against real back ends: tgt (iSCSI with CHAP, through QEMU's own
initiator) and a single-node Ceph (RBD), attached at boot, live, to a stopped
instance, detached (and a detach the guest refuses), re-established by hard
reboot, boot from volume, failures that leave nothing behind, and no secret in
libvirt.xml, get_instance or the agent's log.

The Linux test guest (TCG) reports disks on its console (``GUEST-DISK sdX
added|removed|wrote <token>``) and, for a disk starting with CA-WRITE-REQUEST
<token>, writes "GUEST-WROTE <token>" into the disk's second sector: that is
data written by the guest through QEMU, checked on tgt's backing file and with
``rbd export``. Timings are printed (run with -s), never asserted.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib

import libvirt
import libvirt_qemu
import pytest

from compute_agent.virt.libvirt.volume.base import secret_uuid
from tests.functional.agent_fixture import wait_for, wait_for_console
from tests.functional.conftest import domain_exists, make_spec
from tests.functional.test_lifecycle import _op
from tests.functional.test_live_migration import (  # noqa: F401 - lm_agents is a fixture
    _ctl,
    _migrate,
    _progress_seen,
    _wait_op,
    lm_agents,
)
from tests.functional.volume_fixtures import (  # noqa: F401 - fixtures
    agent_secrets,
    ceph,
    ceph_cluster,
    iscsi_target,
    remove_agent_secrets,
    write_request,
)

CHAP = ("ca-test-user", "chap-Pw-0f9e8d7c")
VOLUME_CONF = "[volume]\ndetach_timeout = 3\ndetach_attempts = 2\n"


@pytest.fixture(autouse=True, scope="module")
def _ceph_starts_early(ceph_cluster):  # noqa: F811
    """Ceph boots in the background while the first tests run."""


@pytest.fixture
def vol_agent(agent_factory):
    """agent_factory, plus removal of secrets a failed test left behind."""
    agents = []

    def start(name="vol", virt_type="qemu", extra_conf=""):
        agent = agent_factory(name, virt_type=virt_type, extra_conf=VOLUME_CONF + extra_conf)
        agents.append(agent)
        return agent
    yield start
    for agent in agents:
        remove_agent_secrets(agent.known_uuids())


def _token() -> str:
    return uuidlib.uuid4().hex[:16]


def _timed(label: str, fn):
    t0 = time.monotonic()
    result = fn()
    print(f"\n[timing] {label}: {time.monotonic() - t0:.2f}s", file=sys.stderr)
    return result


def _settled(inst):
    return inst["task_state"] is None and inst["vm_state"] != "building"


def _spawn(api, agent, spec, ready=True):
    ctxt = api.new_context()
    api.spawn(ctxt, agent.host, spec)
    inst = wait_for(api, ctxt, agent.host, spec["uuid"], _settled, timeout=180)
    if ready:
        assert inst["vm_state"] == "active", (inst["fault"], agent.log_tail())
        wait_for_console(api, ctxt, agent.host, spec["uuid"], "GUEST-READY", timeout=180)
    return inst


def _bdm(volume_id, device, conn_info, boot_index=None):
    return {"volume_id": volume_id, "device": device, "boot_index": boot_index,
            "connection_info": conn_info}


def _attached(api, agent, uuid) -> list[str]:
    inst = api.get_instance(api.new_context(), agent.host, uuid)
    return [b["volume_id"] for b in inst["spec"]["block_devices"]]


def _live_disks(uuid: str, inactive: bool = False) -> list[str]:
    conn = libvirt.open("qemu:///system")
    try:
        xml = conn.lookupByUUIDString(uuid).XMLDesc(
            libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
    finally:
        conn.close()
    from lxml import etree
    return [t.get("dev") for t in etree.fromstring(xml.encode()).findall(
        "devices/disk/target")]


def _assert_no_secret_leaks(api, agent, uuid, secrets):
    inst_dir = os.path.join(agent.instances_path, uuid)
    with open(os.path.join(inst_dir, "libvirt.xml")) as f:
        xml = f.read()
    record = json.dumps(api.get_instance(api.new_context(), agent.host, uuid))
    with open(agent.log_path, errors="replace") as f:
        log = f.read()
    for s in secrets:
        assert s not in xml, "a secret in libvirt.xml"
        assert s not in record, "a secret in get_instance"
        assert s not in log, "a secret in the agent's log"


def _wrote(console: str, token: str) -> int:
    return sum(1 for line in console.splitlines() if "wrote " + token in line)


@pytest.mark.tcg
def test_iscsi_and_rbd_volumes_at_boot_live_detach_attach_and_hard_reboot(
        api, vol_agent, iscsi_target, ceph):  # noqa: F811
    agent = vol_agent()
    host = agent.host
    t_iscsi, t_rbd = _token(), _token()
    iqn, backing = iscsi_target.add_lun("boot-chap", chap=CHAP, data=write_request(t_iscsi))
    src = os.path.join(ceph.dir, "req.img")
    with open(src, "wb") as f:
        f.write(write_request(t_rbd))
        f.truncate(32 * 1024 * 1024)
    ceph.create_image("boot-rbd", 0, data_file=src)
    iscsi_ci = iscsi_target.connection_info(iqn, chap=CHAP)
    rbd_ci = ceph.connection_info("boot-rbd")
    spec = make_spec(image="linux-guest", memory_mb=256)
    spec["block_devices"] = [_bdm("vol-iscsi", "sdb", iscsi_ci), _bdm("vol-rbd", "sdc", rbd_ci)]
    uuid = spec["uuid"]
    _timed("spawn with iSCSI+RBD volumes to active", lambda: _spawn(api, agent, spec,
                                                                    ready=False))
    ctxt = api.new_context()
    console = wait_for_console(api, ctxt, host, uuid, "GUEST-READY", timeout=180)

    # The guest read each volume's request and wrote its token through QEMU.
    for token in (t_iscsi, t_rbd):
        console = wait_for_console(api, ctxt, host, uuid, "wrote " + token, timeout=60)
    assert console.count("serial=vol-iscsi") == 1 and console.count("serial=vol-rbd") == 1
    with open(backing, "rb") as f:
        assert f.read(1024)[512:512 + 29] == f"GUEST-WROTE {t_iscsi}\n".encode()
    out = os.path.join(ceph.dir, "export.img")
    ceph.export("boot-rbd", out)
    with open(out, "rb") as f:
        assert f.read(1024)[512:512 + 29] == f"GUEST-WROTE {t_rbd}\n".encode()
    os.unlink(out)

    # CHAP password and cephx key live in libvirt secrets, nowhere else.
    ours = {secret_uuid(uuid, "vol-iscsi"), secret_uuid(uuid, "vol-rbd")}
    assert set(agent_secrets([uuid])) == ours
    _assert_no_secret_leaks(api, agent, uuid, [CHAP[1], rbd_ci["data"]["key"]])
    assert {"sdb", "sdc"} <= set(_live_disks(uuid))
    assert iscsi_target.initiator_addresses(iqn) == ["127.0.0.1"]  # QEMU logged in

    # Hard reboot re-establishes both, even when the host lost the secrets.
    remove_agent_secrets([uuid])
    ctxt = api.new_context()
    _timed("hard reboot with 2 volumes", lambda: (api.reboot(ctxt, host, uuid, "HARD"),
                                                  _op(api, ctxt, host, uuid)))
    op = _op(api, ctxt, host, uuid)
    assert op["status"] == "done", op
    steps = [s["name"] for s in op["steps"]]
    assert steps.index("connect_volumes") < steps.index("define_domain")
    assert set(agent_secrets([uuid])) == ours
    wait_for(api, ctxt, host, uuid, lambda _: all(
        _wrote(api.get_console_output(ctxt, host, uuid, 5000), t) >= 2
        for t in (t_iscsi, t_rbd)), timeout=120, what="both volumes after the hard reboot")

    # Live detach of each type: the guest sees it go; record, domain, secret follow.
    for vol, dev in (("vol-iscsi", "sdb"), ("vol-rbd", "sdc")):
        ctxt = api.new_context()
        _timed(f"live detach {vol}", lambda v=vol, c=ctxt: (
            api.detach_volume(c, host, uuid, v), _op(api, c, host, uuid)))
        op = _op(api, ctxt, host, uuid)
        assert op["status"] == "done" and "(live)" in op["message"], op
        assert vol not in _attached(api, agent, uuid)
        assert dev not in _live_disks(uuid) and dev not in _live_disks(uuid, inactive=True)
        assert secret_uuid(uuid, vol) not in agent_secrets([uuid])
    console = wait_for_console(api, api.new_context(), host, uuid, "removed", timeout=30)
    wait_for(api, ctxt, host, uuid, lambda _: api.get_console_output(
        ctxt, host, uuid, 5000).count("GUEST-DISK") >= 2 + 2 + 2 + 2 + 2,
        timeout=30, what="two 'removed' lines")
    assert agent_secrets([uuid]) == {}

    # Live attach of each type again: the guest finds them and writes once more.
    for vol, dev, ci, token in (("vol-iscsi", "sdb", iscsi_ci, t_iscsi),
                                ("vol-rbd", "sdc", rbd_ci, t_rbd)):
        ctxt = api.new_context()
        _timed(f"live attach {vol}", lambda v=vol, d=dev, i=ci, c=ctxt: (
            api.attach_volume(c, host, uuid, _bdm(v, d, i)), _op(api, c, host, uuid)))
        op = _op(api, ctxt, host, uuid)
        assert op["status"] == "done" and "(live)" in op["message"], op
        assert dev in _live_disks(uuid) and dev in _live_disks(uuid, inactive=True)
        wait_for(api, ctxt, host, uuid, lambda _, t=token, c=ctxt: _wrote(
            api.get_console_output(c, host, uuid, 5000), t) >= 3, timeout=60,
            what=f"the guest writing to the re-attached {vol}")
    assert sorted(_attached(api, agent, uuid)) == ["vol-iscsi", "vol-rbd"]
    _assert_no_secret_leaks(api, agent, uuid, [CHAP[1], rbd_ci["data"]["key"]])

    # Delete disconnects everything: no secret, no iSCSI session left.
    ctxt = api.new_context()
    api.delete(ctxt, host, uuid)
    op = _op(api, ctxt, host, uuid)
    assert op["status"] == "done" and "disconnect_volumes" in [s["name"] for s in op["steps"]]
    assert agent_secrets([uuid]) == {}
    assert iscsi_target.initiator_addresses(iqn) == []


@pytest.mark.kvm
def test_detach_the_guest_will_not_release_fails_and_keeps_the_volume(
        api, vol_agent, iscsi_target):  # noqa: F811
    """The boot-sector guest has no OS to answer a PCI unplug: a virtio-blk
    volume (vdb) stays. The detach fails after detach_timeout x attempts,
    and the volume stays attached in the record and in the domain."""
    agent = vol_agent("sticky", virt_type="kvm")
    iqn, _ = iscsi_target.add_lun("sticky", chap=CHAP)
    spec = make_spec(image="bootsector", memory_mb=64)
    spec["block_devices"] = [_bdm("vol-sticky", "vdb", iscsi_target.connection_info(iqn, CHAP))]
    uuid = spec["uuid"]
    _spawn(api, agent, spec)

    # Through the operator CLI, with --wait: it reports the failure, exit 1.
    t0 = time.monotonic()
    res = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "compute-agent-ctl"),
         "--config-file", agent.conf_path, "volume-detach", uuid, "vol-sticky", "--wait"],
        capture_output=True, text=True, timeout=120)
    print(f"\n[timing] refused detach (2 x 3s): {time.monotonic() - t0:.2f}s",
          file=sys.stderr)
    assert res.returncode == 1, res
    assert "detach_volume FAILED" in res.stderr and "still attached" in res.stderr
    assert "did not release vdb" in res.stderr
    inst = api.get_instance(api.new_context(), agent.host, uuid)
    assert (inst["vm_state"], inst["task_state"], inst["fault"]) == ("active", None, None)
    assert _attached(api, agent, uuid) == ["vol-sticky"]
    assert "vdb" in _live_disks(uuid) and "vdb" in _live_disks(uuid, inactive=True)
    assert secret_uuid(uuid, "vol-sticky") in agent_secrets([uuid])

    # The operator's way out: delete (or power off, then detach from the definition).
    ctxt = api.new_context()
    api.power_off(ctxt, agent.host, uuid, 30)
    assert _op(api, ctxt, agent.host, uuid)["status"] == "done"
    ctxt = api.new_context()
    api.detach_volume(ctxt, agent.host, uuid, "vol-sticky")
    op = _op(api, ctxt, agent.host, uuid)
    assert op["status"] == "done" and "(config)" in op["message"], op
    assert _attached(api, agent, uuid) == [] and agent_secrets([uuid]) == {}


@pytest.mark.kvm
def test_boot_from_rbd_volume_without_image(api, vol_agent, ceph):  # noqa: F811
    """The boot-sector program on an RBD image, on virtio-scsi: SeaBIOS boots
    it; the instance has no _base file and no root disk."""
    from tests.functional.conftest import GUEST_DIR
    agent = vol_agent("bfv", virt_type="kvm")
    ceph.create_image("bfv-root", 8, data_file=os.path.join(GUEST_DIR, "bootsector-guest.raw"))
    spec = make_spec(image="bootsector", memory_mb=64)
    del spec["image"]
    spec["block_devices"] = [_bdm("vol-root", "sda", ceph.connection_info("bfv-root"),
                                  boot_index=0)]
    uuid = spec["uuid"]
    _timed("boot from RBD volume to GUEST-READY", lambda: _spawn(api, agent, spec))
    inst = api.get_instance(api.new_context(), agent.host, uuid)
    assert inst["image"] is None
    assert sorted(os.listdir(os.path.join(agent.instances_path, uuid))) == [
        "console.log", "libvirt.xml"]
    base = os.path.join(agent.instances_path, "_base")
    assert not os.path.isdir(base) or not [f for f in os.listdir(base)
                                           if not f.startswith(".")]
    # The root volume is not detachable; hard reboot boots it again.
    ctxt = api.new_context()
    api.detach_volume(ctxt, agent.host, uuid, "vol-root")
    assert _op(api, ctxt, agent.host, uuid)["status"] == "refused"
    ctxt = api.new_context()
    api.reboot(ctxt, agent.host, uuid, "HARD")
    assert _op(api, ctxt, agent.host, uuid)["status"] == "done"
    wait_for(api, ctxt, agent.host, uuid, lambda _: api.get_console_output(
        ctxt, agent.host, uuid, 500).count("GUEST-READY") >= 2, what="second boot")


@pytest.mark.kvm
def test_wrong_chap_or_missing_target_leave_nothing_half_attached(
        api, vol_agent, iscsi_target):  # noqa: F811
    agent = vol_agent("badvol", virt_type="kvm")
    iqn, _ = iscsi_target.add_lun("badchap", chap=CHAP)
    wrong = iscsi_target.connection_info(iqn, chap=(CHAP[0], "not-the-Pw-123"))

    # At spawn: a clear fault, no domain, no secret.
    spec = make_spec(image="bootsector", memory_mb=64)
    spec["block_devices"] = [_bdm("vol-bad", "sdb", wrong)]
    inst = _spawn(api, agent, spec, ready=False)
    assert inst["vm_state"] == "error"
    assert "Authentication failure" in inst["fault"]["message"], inst["fault"]
    assert not domain_exists(spec["uuid"]) and agent_secrets([spec["uuid"]]) == {}

    # Live attach to a running instance: the operation fails, the instance is as it was.
    spec = make_spec(image="bootsector", memory_mb=64)
    uuid = spec["uuid"]
    _spawn(api, agent, spec)
    missing = iscsi_target.connection_info(iqn + "-missing", chap=CHAP)
    for ci, expect in ((wrong, "Authentication failure"), (missing, "Target")):
        ctxt = api.new_context()
        api.attach_volume(ctxt, agent.host, uuid, _bdm("vol-x", "sdb", ci))
        op = _op(api, ctxt, agent.host, uuid)
        assert op["status"] == "failed" and "Attaching volume vol-x failed" in op["message"]
        assert expect in op["message"], op["message"]
        inst = api.get_instance(api.new_context(), agent.host, uuid)
        assert (inst["vm_state"], inst["task_state"], inst["fault"]) == ("active", None, None)
        assert _attached(api, agent, uuid) == [] and agent_secrets([uuid]) == {}
        assert "sdb" not in _live_disks(uuid) and "sdb" not in _live_disks(uuid, True)

    # Attach to a stopped instance changes only the definition; power on connects.
    ctxt = api.new_context()
    api.power_off(ctxt, agent.host, uuid, 30)
    assert _op(api, ctxt, agent.host, uuid)["status"] == "done"
    ctxt = api.new_context()
    api.attach_volume(ctxt, agent.host, uuid,
                      _bdm("vol-ok", "sdb", iscsi_target.connection_info(iqn, chap=CHAP)))
    op = _op(api, ctxt, agent.host, uuid)
    assert op["status"] == "done" and "(config)" in op["message"], op
    ctxt = api.new_context()
    api.power_on(ctxt, agent.host, uuid)
    assert _op(api, ctxt, agent.host, uuid)["status"] == "done"
    assert "sdb" in _live_disks(uuid)
    _assert_no_secret_leaks(api, agent, uuid, [CHAP[1], "not-the-Pw-123"])


@pytest.fixture
def qemu_readable_dir():
    """A temp dir QEMU (libvirt-qemu) can reach: pytest's tmp_path is under a 0700 dir."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="ca-vols-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.kvm
def test_local_file_volume_inside_the_allowed_dir_only(api, vol_agent, qemu_readable_dir):
    tmp_path = qemu_readable_dir
    vols = tmp_path / "vols"
    vols.mkdir()
    os.chmod(tmp_path, 0o755)
    (vols / "data.img").write_bytes(b"\0" * (4 * 1024 * 1024))
    agent = vol_agent("file", virt_type="kvm",
                      extra_conf=f"allowed_local_volume_dirs = {vols}\n")
    spec = make_spec(image="bootsector", memory_mb=64)
    uuid = spec["uuid"]
    _spawn(api, agent, spec)

    def attach(path):
        ctxt = api.new_context()
        api.attach_volume(ctxt, agent.host, uuid, _bdm("vol-file", "sdb", {
            "driver_volume_type": "file", "data": {"device_path": str(path)}}))
        return _op(api, ctxt, agent.host, uuid)

    op = attach(tmp_path / "outside.img")
    assert op["status"] == "refused" and "allowed_local_volume_dirs" in op["message"]
    os.symlink("/etc/hostname", vols / "escape.img")
    op = attach(vols / "escape.img")
    assert op["status"] == "failed" and "resolved" in op["message"], op
    assert "sdb" not in _live_disks(uuid)
    op = attach(vols / "data.img")
    assert op["status"] == "done" and "(live)" in op["message"], op["message"]
    assert "sdb" in _live_disks(uuid)
    ctxt = api.new_context()
    api.detach_volume(ctxt, agent.host, uuid, "vol-file")
    assert _op(api, ctxt, agent.host, uuid)["status"] == "done"
    assert "sdb" not in _live_disks(uuid) and _attached(api, agent, uuid) == []


def _qemu_io(uri: str, uuid: str, device: str, command: str) -> None:
    """Run a qemu-io command on one of the guest's disks through QEMU's monitor:
    I/O by that QEMU over its own connection to the volume."""
    conn = libvirt.open(uri)
    try:
        out = libvirt_qemu.qemuMonitorCommand(
            conn.lookupByUUIDString(uuid), f'qemu-io -d {device} "{command}"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    finally:
        conn.close()
    assert "error" not in out.lower() and "failed" not in out.lower(), out


def _written_by_qemu(iscsi_backing: str, cluster, rbd_image: str, offset: int, pattern: int):
    """Both volumes hold 64 KiB of ``pattern`` at ``offset``, read on the targets."""
    with open(iscsi_backing, "rb") as f:
        f.seek(offset)
        assert f.read(65536) == bytes([pattern]) * 65536, "iSCSI backing store"
    out = os.path.join(cluster.dir, "lm-export.img")
    cluster.export(rbd_image, out)
    try:
        with open(out, "rb") as f:
            f.seek(offset)
            assert f.read(65536) == bytes([pattern]) * 65536, "rbd export"
    finally:
        os.unlink(out)


@pytest.mark.tcg
def test_live_migration_carries_iscsi_and_rbd_volumes_and_an_abort_leaves_them(
        api, lm_agents, second_host, iscsi_target, ceph):  # noqa: F811
    """A -> B as a block migration with an iSCSI (CHAP) and an RBD volume: the
    volumes are not copied, B's QEMU reaches both with the same credentials, A
    keeps no secret and no session. Then B -> A slowed to 1 MiB/s and aborted
    by the operator: the guest keeps its volumes on B, A has nothing of it."""
    a = lm_agents("lmv-a", virt_type="qemu")
    b = lm_agents("lmv-b", on_b=True, virt_type="qemu",
                  extra_conf="live_migration_bandwidth = 1\n")
    iqn, backing = iscsi_target.add_lun("lm-chap", chap=CHAP)
    ceph.create_image("lm-rbd", 32)
    rbd_ci = ceph.connection_info("lm-rbd")
    spec = make_spec(image="linux-guest", memory_mb=256)
    spec["block_devices"] = [_bdm("vol-iscsi", "sdb", iscsi_target.connection_info(iqn, CHAP)),
                             _bdm("vol-rbd", "sdc", rbd_ci)]
    uuid = spec["uuid"]
    ours = {secret_uuid(uuid, "vol-iscsi"), secret_uuid(uuid, "vol-rbd")}
    try:
        _spawn(api, a, spec)
        assert set(agent_secrets([uuid])) == ours

        op = _timed("block migration with 2 volumes", lambda: _migrate(api, a, uuid, b, True))
        assert op["status"] == "done", (op, a.log_tail(), b.log_tail())
        assert "disconnect_volumes" in [s["name"] for s in op["steps"]]
        ctxt = api.new_context()
        inst = api.get_instance(ctxt, b.host, uuid)
        assert (inst["host"], inst["vm_state"], inst["power_state"]) == \
            (b.host, "active", "running")
        assert sorted(v["volume_id"] for v in inst["spec"]["block_devices"]) == \
            ["vol-iscsi", "vol-rbd"]
        assert second_host.domain(uuid) == (True, True) and not domain_exists(uuid)
        # Only the root disk was copied: B's directory has no volume in it.
        assert sorted(os.listdir(os.path.join(b.instances_path, uuid))) == \
            ["console.log", "disk", "libvirt.xml"]
        assert agent_secrets([uuid]) == {}
        assert set(agent_secrets([uuid], second_host.uri)) == ours
        assert len(iscsi_target.initiator_addresses(iqn)) == 1  # B's session only
        # B's QEMU writes through its own connections to both back ends.
        for dev in ("sdb", "sdc"):
            _qemu_io(second_host.uri, uuid, f"ua-{dev}", "write -P 0x5a 1M 64k")
        _written_by_qemu(backing, ceph, "lm-rbd", 1024 * 1024, 0x5A)
        assert "GUEST-READY" not in api.get_console_output(ctxt, b.host, uuid, 5000)

        # Back to A at 1 MiB/s, aborted by the operator: nothing moves.
        mctxt = api.new_context()
        api.live_migrate(mctxt, b.host, uuid, a.host, True)
        wait_for(api, ctxt, b.host, uuid, lambda _: _progress_seen(api, ctxt, b.host, uuid),
                 timeout=60, what="migration progress")
        assert set(agent_secrets([uuid])) == ours  # A prepared them
        out = _ctl(b, "migrate-abort", uuid)
        assert out.returncode == 0, out.stderr
        op = _wait_op(api, mctxt, b.host, uuid)
        assert op["status"] == "failed" and "aborted: by the operator" in op["message"], op
        assert second_host.domain(uuid) == (True, True) and not domain_exists(uuid)
        assert agent_secrets([uuid]) == {}  # the rollback on A removed them
        assert set(agent_secrets([uuid], second_host.uri)) == ours
        assert not os.path.exists(os.path.join(a.instances_path, uuid))
        for dev in ("sdb", "sdc"):
            _qemu_io(second_host.uri, uuid, f"ua-{dev}", "write -P 0xa5 2M 64k")
        _written_by_qemu(backing, ceph, "lm-rbd", 2 * 1024 * 1024, 0xA5)

        ctxt = api.new_context()
        api.delete(ctxt, b.host, uuid)
        op = _op(api, ctxt, b.host, uuid)
        assert op["status"] == "done", op
        assert agent_secrets([uuid], second_host.uri) == {}
        assert iscsi_target.initiator_addresses(iqn) == []
    finally:
        remove_agent_secrets([uuid])
        remove_agent_secrets([uuid], second_host.uri)


def _wait_named_op(api, ctxt, host, uuid, name, timeout=240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = next((o for o in api.get_operations(ctxt, host, uuid, limit=20)
                     if o["request_id"] == ctxt.request_id and o["name"] == name), None)
        if mine is not None and mine["status"] != "running":
            return mine
        time.sleep(0.3)
    raise AssertionError(f"{name} of {uuid} on {host} did not end in {timeout}s")


@pytest.mark.kvm
def test_resize_and_revert_carry_iscsi_and_rbd_volumes(
        api, lm_agents, second_host, iscsi_target, ceph):  # noqa: F811
    """Resize A -> B with an iSCSI (CHAP) and an RBD volume: disconnected on A
    after the power-off, connected on B before the guest starts there; revert
    connects them on A again and leaves nothing on B."""
    conf = "[DEFAULT]\nshutdown_timeout = 3\n"
    a = lm_agents("rsv-a", extra_conf=conf)
    b = lm_agents("rsv-b", on_b=True, extra_conf=conf)
    iqn, backing = iscsi_target.add_lun("rs-chap", chap=CHAP)
    ceph.create_image("rs-rbd", 32)
    spec = make_spec(image="bootsector", memory_mb=64)
    spec["block_devices"] = [_bdm("vol-iscsi", "sdb", iscsi_target.connection_info(iqn, CHAP)),
                             _bdm("vol-rbd", "sdc", ceph.connection_info("rs-rbd"))]
    uuid = spec["uuid"]
    ours = {secret_uuid(uuid, "vol-iscsi"), secret_uuid(uuid, "vol-rbd")}
    try:
        _spawn(api, a, spec)
        bigger = dict(spec["flavor"], name="ft.bigger", memory_mb=96)
        ctxt = api.new_context()
        api.resize(ctxt, a.host, uuid, bigger, b.host)
        op = _wait_named_op(api, ctxt, a.host, uuid, "resize")
        assert op["status"] == "done", (op, a.log_tail(), b.log_tail())
        steps = [s["name"] for s in op["steps"]]
        assert steps.index("disconnect_volumes") < steps.index("transfer_disks"), steps
        inst = api.get_instance(ctxt, b.host, uuid)
        assert (inst["vm_state"], inst["power_state"]) == ("resized", "running"), inst
        assert agent_secrets([uuid]) == {}
        assert set(agent_secrets([uuid], second_host.uri)) == ours
        for dev in ("sdb", "sdc"):
            _qemu_io(second_host.uri, uuid, f"ua-{dev}", "write -P 0x3c 1M 64k")
        _written_by_qemu(backing, ceph, "rs-rbd", 1024 * 1024, 0x3C)

        ctxt = api.new_context()
        api.revert_resize(ctxt, b.host, uuid)
        op = _wait_named_op(api, ctxt, b.host, uuid, "revert_resize")
        assert op["status"] == "done", (op, a.log_tail(), b.log_tail())
        inst = wait_for(api, ctxt, a.host, uuid, _settled)
        assert (inst["vm_state"], inst["power_state"]) == ("active", "running"), inst
        assert agent_secrets([uuid], second_host.uri) == {}
        assert set(agent_secrets([uuid])) == ours
        assert second_host.domain(uuid) is None
        for dev in ("sdb", "sdc"):
            _qemu_io("qemu:///system", uuid, f"ua-{dev}", "write -P 0xc3 2M 64k")
        _written_by_qemu(backing, ceph, "rs-rbd", 2 * 1024 * 1024, 0xC3)
        assert len(iscsi_target.initiator_addresses(iqn)) == 1

        ctxt = api.new_context()
        api.delete(ctxt, a.host, uuid)
        assert _op(api, ctxt, a.host, uuid)["status"] == "done"
        assert agent_secrets([uuid]) == {} and iscsi_target.initiator_addresses(iqn) == []
    finally:
        remove_agent_secrets([uuid])
        remove_agent_secrets([uuid], second_host.uri)


@pytest.mark.kvm
def test_agent_killed_mid_attach_and_mid_detach_reconciles_the_volume(
        api, vol_agent, iscsi_target):  # noqa: F811
    """SIGKILL after the disk went in (or out) but before the record says so:
    the restarted agent undoes the attach, or finishes the detach, so the
    record, the domain and the secrets agree and the instance stays active."""
    pause = "COMPUTE_AGENT_PAUSE_BEFORE_STEP"
    agent = vol_agent("vol-restart", virt_type="kvm")
    spec = make_spec(image="bootsector", memory_mb=64)
    uuid = spec["uuid"]
    _spawn(api, agent, spec)
    iqn, _ = iscsi_target.add_lun("restart-chap", chap=CHAP)
    bdm = _bdm("vol-r", "sdb", iscsi_target.connection_info(iqn, CHAP))

    def restart(env=None):
        agent.kill(9)
        agent.start(api, api.new_context(), env=env)

    def request_outcome(ctxt):
        ops = [o for o in api.get_operations(ctxt, agent.host, uuid, limit=10)
               if o["request_id"] == ctxt.request_id]
        return [(o["name"], o["status"]) for o in reversed(ops)], ops[0]

    # Attach cut short: the disk is in the domain, the record does not have it.
    restart({pause: "attach_volume:save_spec:60"})
    ctxt = api.new_context()
    api.attach_volume(ctxt, agent.host, uuid, bdm)
    wait_for(api, ctxt, agent.host, uuid, lambda _: "sdb" in _live_disks(uuid),
             what="the disk attached")
    restart({pause: "detach_volume:save_spec:60"})
    inst = wait_for(api, ctxt, agent.host, uuid, _settled)
    names, last = request_outcome(ctxt)
    assert names == [("attach_volume", "interrupted"), ("attach_volume", "done")], names
    assert last["message"] == "volumes match the record", last
    assert (inst["vm_state"], inst["power_state"]) == ("active", "running")
    assert _attached(api, agent, uuid) == []
    assert "sdb" not in _live_disks(uuid) and "sdb" not in _live_disks(uuid, inactive=True)
    assert agent_secrets([uuid]) == {}

    # Attach for real, then a detach cut short: the disk is gone, the record has it.
    ctxt = api.new_context()
    api.attach_volume(ctxt, agent.host, uuid, bdm)
    assert _op(api, ctxt, agent.host, uuid)["status"] == "done"
    ctxt = api.new_context()
    api.detach_volume(ctxt, agent.host, uuid, "vol-r")
    wait_for(api, ctxt, agent.host, uuid, lambda _: "sdb" not in _live_disks(uuid, True),
             what="the disk detached")
    restart()
    inst = wait_for(api, ctxt, agent.host, uuid, _settled)
    names, last = request_outcome(ctxt)
    assert names == [("detach_volume", "interrupted"), ("detach_volume", "done")], names
    assert "detach of vol-r finished" in last["message"], last
    assert (inst["vm_state"], inst["power_state"]) == ("active", "running")
    assert _attached(api, agent, uuid) == [] and agent_secrets([uuid]) == {}
    assert iscsi_target.initiator_addresses(iqn) == []
