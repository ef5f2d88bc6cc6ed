"""Resize and cold migration between two hypervisor hosts on this machine (the
system libvirtd, "host A", and second_host.py's namespaced libvirtd, "host B").

So far: the disk transfer without SSH (virt/libvirt/cold_migration.py): a
qcow2 top layer uploaded through the destination's libvirtd as a sparse
storage-volume stream into a transient pool, rebased onto the destination's
own copy of the base, byte for byte the same disk as the guest sees it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid as uuidlib

import libvirt
import pytest

from compute_agent import exception, qemu_img
from compute_agent.virt.libvirt import cold_migration

SYSTEM_URI = "qemu:///system"
TEST_ROOT = "/var/lib/compute-agent-tests"
MiB = 1024 * 1024
libvirt.registerErrorHandler(lambda ctx, err: None, None)


def _qemu_io(path: str, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    subprocess.run(args + [path], check=True, capture_output=True)


@pytest.fixture
def disk_dirs():
    """(source dir with base + overlay, destination dir with its own base copy)."""
    root = os.path.join(TEST_ROOT, f"resize-transfer-{uuidlib.uuid4().hex[:8]}")
    src, dst = os.path.join(root, "src"), os.path.join(root, "dst")
    for d in (src, dst):
        os.makedirs(d)
    base = os.path.join(src, "base.raw")
    with open(base, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.truncate(64 * MiB)
    shutil.copyfile(base, os.path.join(dst, "base.raw"))
    disk = os.path.join(src, "disk")
    qemu_img.create_overlay(disk, base, 256 * MiB)
    # Data over the base, data past it, and zeroes hiding part of the base.
    _qemu_io(disk, "write -P 0xab 1M 2M", "write -P 0x5c 100M 8M", "write -z 3M 512k")
    yield src, dst
    shutil.rmtree(root, ignore_errors=True)


def _pools(uri: str) -> list[str]:
    conn = libvirt.open(uri)
    try:
        return [p.name() for p in conn.listAllStoragePools()]
    finally:
        conn.close()


@pytest.mark.parametrize("to_b", [True, False], ids=["A->B", "B->A"])
def test_top_layer_upload_is_the_same_disk(disk_dirs, second_host, to_b):
    src, dst = disk_dirs
    uri = second_host.uri if to_b else SYSTEM_URI
    pools_before = _pools(uri)
    seen = []
    size = cold_migration.upload_file(uri, os.path.join(src, "disk"), dst,
                                      progress=lambda done, total: seen.append((done, total)))
    copied = os.path.join(dst, "disk")
    assert size == os.path.getsize(os.path.join(src, "disk"))
    assert os.path.getsize(copied) == size
    assert seen and seen[-1] == (size, size)
    # Sparse: the copy allocates about what the source does, not its size.
    src_alloc = os.stat(os.path.join(src, "disk")).st_blocks * 512
    assert os.stat(copied).st_blocks * 512 <= src_alloc + 4 * MiB
    # The channel is gone after the transfer.
    assert _pools(uri) == pools_before
    qemu_img.rebase_unsafe(copied, os.path.join(dst, "base.raw"))
    qemu_img.check(copied)
    info = qemu_img.info(copied, "qcow2")
    assert info.backing_file == os.path.join(dst, "base.raw")
    assert info.virtual_size == 256 * MiB
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                    os.path.join(src, "disk"), copied], check=True, capture_output=True)
    # Grown for a bigger flavor, the data stays.
    qemu_img.resize(copied, 512 * MiB)
    assert qemu_img.info(copied, "qcow2").virtual_size == 512 * MiB
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                    os.path.join(src, "disk"), copied], check=True, capture_output=True)


def test_upload_never_overwrites(disk_dirs, second_host):
    src, dst = disk_dirs
    with open(os.path.join(dst, "disk"), "wb") as f:
        f.write(b"keep")
    with pytest.raises(exception.ComputeAgentError, match="already exists"):
        cold_migration.upload_file(second_host.uri, os.path.join(src, "disk"), dst)
    with open(os.path.join(dst, "disk"), "rb") as f:
        assert f.read() == b"keep"
    assert not [p for p in _pools(second_host.uri) if p.startswith("ca-transfer-")]


# --- resize and cold migration between two agents ------------------------------------

import json  # noqa: E402

from tests.functional.agent_fixture import wait_for, wait_for_console  # noqa: E402
from tests.functional.conftest import make_spec  # noqa: E402
from tests.functional.test_live_migration import (  # noqa: E402
    _ctl,
    _domain,
    _ready_count,
    _same_data,
    _write_pattern,
    lm_agents,  # noqa: F401  (the fixture)
)

GiB = 1024 ** 3


def _settled(inst):
    return inst["task_state"] is None and inst["vm_state"] != "building"


def _boot(api, agent) -> dict:
    ctxt = api.new_context()
    spec = make_spec(image="bootsector", memory_mb=64, name="rs-guest")
    api.spawn(ctxt, agent.host, spec)
    inst = wait_for(api, ctxt, agent.host, spec["uuid"], _settled)
    assert inst["vm_state"] == "active", (inst["fault"], agent.log_tail())
    wait_for_console(api, ctxt, agent.host, spec["uuid"], "GUEST-READY")
    return spec


def _wait_op(api, ctxt, host, uuid, name, timeout=240) -> dict:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ops = api.get_operations(ctxt, host, uuid, limit=20)
        mine = next((o for o in ops if o["request_id"] == ctxt.request_id
                     and o["name"] == name), None)
        if mine is not None and mine["status"] != "running":
            return mine
        time.sleep(0.3)
    raise AssertionError(f"{name} of {uuid} on {host} did not end in {timeout}s")


def _resize(api, src, uuid, flavor, dest) -> dict:
    ctxt = api.new_context()
    api.resize(ctxt, src.host, uuid, flavor, dest.host)
    return _wait_op(api, ctxt, src.host, uuid, "resize")


def _wait_settled(api, agent, uuid) -> dict:
    ctxt = api.new_context()
    return wait_for(api, ctxt, agent.host, uuid, _settled, timeout=180)


def _xml(uri, uuid) -> str:
    conn = libvirt.open(uri)
    try:
        return conn.lookupByUUIDString(uuid).XMLDesc(0)
    finally:
        conn.close()


def _cleanup_domains(uri_list, uuid) -> None:
    for uri in uri_list:
        conn = libvirt.open(uri)
        try:
            dom = conn.lookupByUUIDString(uuid)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()


@pytest.fixture
def two_agents(lm_agents, second_host):  # noqa: F811
    conf = "[DEFAULT]\nshutdown_timeout = 3\n"
    a = lm_agents("rs-a", extra_conf=conf)
    b = lm_agents("rs-b", on_b=True, extra_conf=conf)
    made = []
    yield a, b, made
    for uuid in made:
        _cleanup_domains([SYSTEM_URI, second_host.uri], uuid)


def test_cold_migrate_confirm_resize_revert(api, two_agents, second_host, tmp_path):
    a, b, made = two_agents
    ctxt = api.new_context()
    spec = _boot(api, a)
    uuid = spec["uuid"]
    made.append(uuid)
    _write_pattern(SYSTEM_URI, uuid)
    reference = str(tmp_path / "reference.qcow2")
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2",
                    os.path.join(a.instances_path, uuid, "disk"), reference], check=True)

    # Cold migration A -> B (same flavor), with the operator's CLI.
    out = _ctl(a, "-f", "json", "resize", uuid, "--dest", b.host, "--wait")
    assert out.returncode == 0, (out.stderr, a.log_tail(), b.log_tail())
    assert json.loads(out.stdout)["vm_state"] == "resized"
    op = next(o for o in api.get_operations(ctxt, a.host, uuid) if o["name"] == "resize")
    assert op["status"] == "done" and op["message"] in out.stderr, (op, out.stderr)
    steps = [s["name"] for s in op["steps"]]
    assert {"prep_resize", "power_off", "move_instance_dir", "transfer_disks",
            "finish_resize"} <= set(steps), steps
    inst = api.get_instance(ctxt, b.host, uuid)
    assert (inst["host"], inst["vm_state"], inst["power_state"]) == (b.host, "resized",
                                                                     "running")
    with pytest.raises(exception.InstanceNotFound):
        api.get_instance(ctxt, a.host, uuid)
    wait_for_console(api, ctxt, b.host, uuid, "GUEST-READY")
    b_disk = os.path.join(b.instances_path, uuid, "disk")
    _same_data(reference, b_disk)
    info = qemu_img.info(b_disk, "qcow2", force_share=True)
    assert info.backing_file.startswith(b.instances_path), info
    assert os.path.isdir(os.path.join(a.instances_path, uuid + "_resize"))

    # Confirm: nothing is left on A.
    out = _ctl(b, "confirm-resize", uuid, "--wait")
    assert out.returncode == 0, (out.stderr, b.log_tail())
    inst = api.get_instance(ctxt, b.host, uuid)
    assert inst["vm_state"] == "active", inst
    assert not os.path.exists(os.path.join(a.instances_path, uuid + "_resize"))
    assert _domain(SYSTEM_URI, uuid) is None

    # A shrinking resize is refused before anything moves.
    op = _resize(api, b, uuid, dict(spec["flavor"], root_gb=0), a)
    assert op["status"] == "refused" and "shrink" in op["message"], op
    inst = api.get_instance(ctxt, b.host, uuid)
    assert (inst["vm_state"], inst["task_state"], inst["power_state"]) == ("active", None,
                                                                           "running")

    # Resize B -> A to a bigger flavor: vcpus, memory, disk size.
    bigger = dict(spec["flavor"], name="ft.bigger", vcpus=2, memory_mb=96, root_gb=2)
    op = _resize(api, b, uuid, bigger, a)
    assert op["status"] == "done", (op, a.log_tail(), b.log_tail())
    inst = api.get_instance(ctxt, a.host, uuid)
    assert (inst["vm_state"], inst["power_state"]) == ("resized", "running")
    xml = _xml(SYSTEM_URI, uuid)
    assert ">2</vcpu>" in xml and "<memory unit='KiB'>98304</memory>" in xml, xml
    a_disk = os.path.join(a.instances_path, uuid, "disk")
    assert qemu_img.info(a_disk, "qcow2", force_share=True).virtual_size == 2 * GiB
    _same_data(reference, a_disk)
    wait_for_console(api, ctxt, a.host, uuid, "GUEST-READY")

    # Revert: the guest runs on B as before, nothing is left on A.
    api.revert_resize(ctxt, a.host, uuid)
    inst = _wait_settled(api, b, uuid)
    assert (inst["host"], inst["vm_state"], inst["power_state"]) == (b.host, "active",
                                                                     "running"), inst
    assert inst["flavor"]["vcpus"] == 1 if "flavor" in inst else True
    assert ">1</vcpu>" in _xml(second_host.uri, uuid)
    with pytest.raises(exception.InstanceNotFound):
        api.get_instance(ctxt, a.host, uuid)
    assert _domain(SYSTEM_URI, uuid) is None
    assert not os.path.exists(os.path.join(a.instances_path, uuid))
    assert not os.path.exists(os.path.join(b.instances_path, uuid + "_resize"))
    _same_data(reference, os.path.join(b.instances_path, uuid, "disk"))
    assert _ready_count(api, ctxt, b, uuid) >= 1


def test_source_killed_during_transfer_rolls_back(api, two_agents, second_host):
    a, b, made = two_agents
    ctxt = api.new_context()
    spec = _boot(api, a)
    uuid = spec["uuid"]
    made.append(uuid)
    a.kill()
    a.start(api, ctxt, env={"COMPUTE_AGENT_PAUSE_BEFORE_STEP": "resize:transfer_disk:60"})
    ctxt = api.new_context()
    api.resize(ctxt, a.host, uuid, spec["flavor"], b.host)
    import time
    deadline = time.monotonic() + 120
    while not os.path.isdir(os.path.join(a.instances_path, uuid + "_resize")):
        assert time.monotonic() < deadline, a.log_tail()
        time.sleep(0.3)
    time.sleep(1)
    a.kill(9)
    a.start(api, api.new_context())
    inst = _wait_settled(api, a, uuid)
    assert (inst["vm_state"], inst["power_state"]) == ("active", "running"), (inst, a.log_tail())
    assert "agent restarted" in inst["fault"]["message"]
    assert os.path.exists(os.path.join(a.instances_path, uuid, "disk"))
    assert not os.path.exists(os.path.join(a.instances_path, uuid + "_resize"))
    with pytest.raises(exception.InstanceNotFound):
        api.get_instance(ctxt, b.host, uuid)
    assert not os.path.exists(os.path.join(b.instances_path, uuid))
    assert second_host.domain(uuid) is None


def test_resize_on_the_same_host_revert_and_confirm(api, lm_agents, tmp_path):  # noqa: F811
    """allow_resize_same_host: the disks go to <uuid>_resize, copies become the
    instance's; revert brings the old flavor and disks back, confirm removes
    them. Without the option a resize to this host is refused."""
    conf = "[DEFAULT]\nshutdown_timeout = 3\n"
    a = lm_agents("rs-same", extra_conf=conf + "allow_resize_same_host = true\n")
    ctxt = api.new_context()
    spec = _boot(api, a)
    uuid = spec["uuid"]
    inst_dir = os.path.join(a.instances_path, uuid)
    _write_pattern(SYSTEM_URI, uuid)
    reference = str(tmp_path / "reference.qcow2")
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2",
                    os.path.join(inst_dir, "disk"), reference], check=True)
    bigger = dict(spec["flavor"], name="ft.bigger", vcpus=2, memory_mb=96, root_gb=2)

    def resize_here():
        c = api.new_context()
        api.resize(c, a.host, uuid, bigger)  # no destination: this host
        return _wait_op(api, c, a.host, uuid, "resize")

    def settle(action):
        c = api.new_context()
        getattr(api, action)(c, a.host, uuid)
        op = _wait_op(api, c, a.host, uuid, action)
        assert op["status"] == "done", (op, a.log_tail())
        return _wait_settled(api, a, uuid)

    op = resize_here()
    assert op["status"] == "done", (op, a.log_tail())
    assert f"resize to {a.host}" in op["message"], op["message"]
    steps = [s["name"] for s in op["steps"]]
    assert "copy_disks" in steps and "prep_resize" not in steps, steps
    inst = api.get_instance(ctxt, a.host, uuid)
    assert (inst["vm_state"], inst["power_state"], inst["spec"]["flavor"]["vcpus"]) == \
        ("resized", "running", 2), inst
    xml = _xml(SYSTEM_URI, uuid)
    assert ">2</vcpu>" in xml and "<memory unit='KiB'>98304</memory>" in xml
    assert qemu_img.info(os.path.join(inst_dir, "disk"), "qcow2",
                         force_share=True).virtual_size == 2 * GiB
    _same_data(reference, os.path.join(inst_dir, "disk"))
    assert qemu_img.info(os.path.join(inst_dir + "_resize", "disk"), "qcow2",
                         force_share=True).virtual_size == GiB
    wait_for_console(api, ctxt, a.host, uuid, "GUEST-READY")

    # Revert: the old flavor, the old disk, running.
    inst = settle("revert_resize")
    assert (inst["vm_state"], inst["power_state"], inst["spec"]["flavor"]["vcpus"]) == \
        ("active", "running", 1), inst
    assert ">1</vcpu>" in _xml(SYSTEM_URI, uuid)
    assert qemu_img.info(os.path.join(inst_dir, "disk"), "qcow2",
                         force_share=True).virtual_size == GiB
    _same_data(reference, os.path.join(inst_dir, "disk"))
    assert not os.path.exists(inst_dir + "_resize")

    # Again, then confirm: the new flavor stays, the old disks go.
    op = resize_here()
    assert op["status"] == "done", (op, a.log_tail())
    inst = settle("confirm_resize")
    assert (inst["vm_state"], inst["power_state"], inst["spec"]["flavor"]["vcpus"]) == \
        ("active", "running", 2), inst
    assert not os.path.exists(inst_dir + "_resize")
    _same_data(reference, os.path.join(inst_dir, "disk"))

    # Deleting a resized instance confirms first: no <uuid>_resize outlives it.
    bigger = dict(bigger, memory_mb=128)
    op = resize_here()
    assert op["status"] == "done", (op, a.log_tail())
    assert os.path.isdir(inst_dir + "_resize")
    c = api.new_context()
    api.delete(c, a.host, uuid)
    op = _wait_op(api, c, a.host, uuid, "delete")
    assert op["status"] == "done", (op, a.log_tail())
    assert not os.path.exists(inst_dir) and not os.path.exists(inst_dir + "_resize")
    assert _domain(SYSTEM_URI, uuid) is None

    # Another agent without the option refuses a resize to itself.
    b = lm_agents("rs-same-off", extra_conf=conf)
    other = _boot(api, b)
    c = api.new_context()
    api.resize(c, b.host, other["uuid"], bigger)
    op = _wait_op(api, c, b.host, other["uuid"], "resize")
    assert op["status"] == "refused" and "allow_resize_same_host" in op["message"], op


def test_to_a_host_that_cannot_have_the_image_the_root_disk_goes_flattened(
        api, two_agents, image_dir, tmp_path):
    """The image was deleted from the image service after the boot: B cannot
    fetch the base, so A sends the root disk flattened; it runs on B with its
    data and no backing file, and a hard reboot there needs no image."""
    from tests.functional.conftest import GUEST_DIR, _register
    a, b, made = two_agents
    image_id = f"rs-gone-{uuidlib.uuid4().hex[:8]}"
    _register(image_dir, image_id, os.path.join(GUEST_DIR, "bootsector-guest.raw"), "raw")
    ctxt = api.new_context()
    spec = make_spec(image=image_id, memory_mb=64, name="rs-flat")
    api.spawn(ctxt, a.host, spec)
    uuid = spec["uuid"]
    made.append(uuid)
    inst = wait_for(api, ctxt, a.host, uuid, _settled)
    assert inst["vm_state"] == "active", (inst["fault"], a.log_tail())
    _write_pattern(SYSTEM_URI, uuid)
    reference = str(tmp_path / "reference.qcow2")
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2",
                    os.path.join(a.instances_path, uuid, "disk"), reference], check=True)
    for path in (image_id, image_id + ".json"):
        os.unlink(os.path.join(image_dir, path))

    op = _resize(api, a, uuid, spec["flavor"], b)
    assert op["status"] == "done", (op, a.log_tail(), b.log_tail())
    steps = [s["name"] for s in op["steps"]]
    assert "flatten_disk" in steps, steps
    assert not [n for n in os.listdir(os.path.join(a.instances_path, uuid + "_resize"))
                if n.endswith(".flat")]
    prep = next(o for o in api.get_operations(ctxt, b.host, uuid) if o["name"] == "prep_resize")
    assert "no_base" in [s["name"] for s in prep["steps"]], prep
    b_disk = os.path.join(b.instances_path, uuid, "disk")
    assert qemu_img.info(b_disk, "qcow2", force_share=True).backing_file is None
    _same_data(reference, b_disk)
    inst = api.get_instance(ctxt, b.host, uuid)
    assert (inst["vm_state"], inst["power_state"]) == ("resized", "running"), inst
    wait_for_console(api, ctxt, b.host, uuid, "GUEST-READY")

    out = _ctl(b, "confirm-resize", uuid, "--wait")
    assert out.returncode == 0, (out.stderr, b.log_tail())
    ctxt = api.new_context()
    api.reboot(ctxt, b.host, uuid, "HARD")
    op = _wait_op(api, ctxt, b.host, uuid, "reboot")
    assert op["status"] == "done", (op, b.log_tail())
    _same_data(reference, b_disk)


@pytest.mark.parametrize("op_name, step, source_ends", [
    ("prep_resize", "ensure_image", "refused"),
    ("finish_resize", "rebase_disk", "failed"),
], ids=["during-prep", "during-finish"])
def test_destination_killed_mid_call_undoes_its_side_and_the_source_rolls_back(
        api, two_agents, second_host, op_name, step, source_ends):
    """B dies inside the call A is waiting on. Restarted, B undoes its side;
    A sees that (it asks B every few seconds while it waits) instead of
    waiting out the call's timeout, and the guest runs on A as before."""
    import time
    a, b, made = two_agents
    spec = _boot(api, a)
    uuid = spec["uuid"]
    made.append(uuid)
    b.kill()
    b.start(api, api.new_context(), env={"COMPUTE_AGENT_PAUSE_BEFORE_STEP":
                                         f"{op_name}:{step}:60"})
    ctxt = api.new_context()
    api.resize(ctxt, a.host, uuid, spec["flavor"], b.host)

    def b_paused() -> bool:
        try:
            return any(o["name"] == op_name and o["status"] == "running"
                       for o in api.get_operations(ctxt, b.host, uuid, limit=10))
        except exception.InstanceNotFound:
            return False
    deadline = time.monotonic() + 120
    while not b_paused():
        assert time.monotonic() < deadline, (a.log_tail(), b.log_tail())
        time.sleep(0.3)
    time.sleep(1)
    b.kill(9)
    b.start(api, api.new_context())
    started = time.monotonic()
    op = _wait_op(api, ctxt, a.host, uuid, "resize", timeout=120)
    print(f"\nsource gave up {time.monotonic() - started:.1f}s after B restarted",
          file=sys.stderr)
    assert op["status"] == source_ends, (op, a.log_tail(), b.log_tail())
    assert "the destination gave up its side" in op["message"], op["message"]
    inst = _wait_settled(api, a, uuid)
    assert (inst["vm_state"], inst["power_state"]) == ("active", "running"), inst
    assert os.path.exists(os.path.join(a.instances_path, uuid, "disk"))
    assert not os.path.exists(os.path.join(a.instances_path, uuid + "_resize"))
    with pytest.raises(exception.InstanceNotFound):
        api.get_instance(ctxt, b.host, uuid)
    assert not os.path.exists(os.path.join(b.instances_path, uuid))
    assert second_host.domain(uuid) is None
    assert api.get_migration(ctxt, b.host, uuid)["status"] == "rolled_back"
