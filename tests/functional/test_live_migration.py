"""Live migration between two hypervisor hosts on this machine: the system
libvirtd ("host A") and a second libvirtd in its own mount/UTS namespace on a
loopback address ("host B", second_host.py), each with its own compute agent,
both on the same RabbitMQ.

Agents on host A use qemu:///system; agents on host B
qemu+tcp://ADDRESS/system. Shared instance storage is two agents with the
same instances_path; a block migration goes between agents whose
instances_paths differ. The guests have no network ports: both "hosts" share
one kernel, so a tap of the same name cannot exist twice (the VIF and firewall
steps are covered by the unit tests).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import libvirt
import libvirt_qemu
import pytest

from compute_agent import exception
from tests.functional.agent_fixture import AgentProcess, wait_for, wait_for_console
from tests.functional.conftest import REPO, domain_exists, make_spec
from tests.functional.test_lifecycle import _op

SYSTEM_URI = "qemu:///system"
# Lookups of domains that are (rightly) not there are not worth a line on stderr.
libvirt.registerErrorHandler(lambda ctx, err: None, None)


@pytest.fixture
def lm_agents(api, image_dir, second_host):
    """start(name, on_b=False, ...): an agent on host A or B; all are stopped and
    cleaned up (domains on their own libvirtd, their dirs) after the test."""
    started: list[AgentProcess] = []

    def start(name: str, on_b: bool = False, virt_type: str = "kvm",
              instances_path: str | None = None, extra_conf: str = "") -> AgentProcess:
        address = second_host.address if on_b else "127.0.0.1"
        libvirt_conf = f"[libvirt]\nlive_migration_inbound_addr = {address}\n"
        if on_b:
            libvirt_conf += f"connection_uri = {second_host.uri}\n"
        agent = AgentProcess(name, image_dir, virt_type, libvirt_conf + extra_conf)
        if on_b:
            agent.libvirt_uri = second_host.uri
        if instances_path:
            agent.instances_path = instances_path
        started.append(agent)
        agent.start(api, api.new_context())
        return agent

    yield start
    failed = []
    for agent in reversed(started):  # each one, whatever happened to the others
        try:
            agent.cleanup()
        except Exception as exc:
            failed.append(f"{agent.host}: {exc!r}")
            agent.kill(9)
            shutil.rmtree(agent.root, ignore_errors=True)
    assert not failed, failed


def _settled(inst):
    return inst["task_state"] is None and inst["vm_state"] != "building"


def _boot(api, agent, image="bootsector", memory_mb=64) -> str:
    ctxt = api.new_context()
    spec = make_spec(image=image, memory_mb=memory_mb, name="lm-guest")
    api.spawn(ctxt, agent.host, spec)
    inst = wait_for(api, ctxt, agent.host, spec["uuid"], _settled)
    assert inst["vm_state"] == "active", (inst["fault"], agent.log_tail())
    wait_for_console(api, ctxt, agent.host, spec["uuid"], "GUEST-READY")
    return spec["uuid"]


def _migrate(api, src, uuid, dest, block, timeout=180) -> dict:
    """Send live_migrate to the source and wait for its operation to end."""
    ctxt = api.new_context()
    api.live_migrate(ctxt, src.host, uuid, dest.host, block)
    return _wait_op(api, ctxt, src.host, uuid, timeout)


def _wait_op(api, ctxt, host, uuid, timeout=180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ops = api.get_operations(ctxt, host, uuid, limit=20)
        mine = next((o for o in ops if o["request_id"] == ctxt.request_id
                     and o["name"] == "live_migration"), None)
        if mine is not None and mine["status"] != "running":
            return mine
        time.sleep(0.3)
    raise AssertionError(f"live migration of {uuid} on {host} did not end in {timeout}s")


def _gone_from(api, ctxt, agent, uuid) -> None:
    with pytest.raises(exception.InstanceNotFound):
        api.get_instance(ctxt, agent.host, uuid)


def _ready_count(api, ctxt, agent, uuid) -> int:
    return api.get_console_output(ctxt, agent.host, uuid, 5000).count("GUEST-READY")


def _domain(uri, uuid):
    """(active, persistent) of the domain on that libvirtd, or None."""
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByUUIDString(uuid)
        return bool(dom.isActive()), bool(dom.isPersistent())
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def _write_pattern(uri, uuid) -> None:
    """Put data the migration must carry into the guest's disk (top qcow2
    layer), through QEMU's qemu-io monitor command."""
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByUUIDString(uuid)
        # Flushed, so that a copy read beside the running QEMU (-U) sees the
        # qcow2 metadata that maps the new clusters.
        for command in ("write -P 0x5a 1M 192k", "flush"):
            out = libvirt_qemu.qemuMonitorCommand(
                dom, f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{command}"',
                libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            assert "error" not in out.lower(), out
    finally:
        conn.close()


def _ctl(agent, *args) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "compute-agent-ctl"),
                           "--config-file", agent.conf_path, *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def _disk(agent, uuid) -> str:
    return os.path.join(agent.instances_path, uuid, "disk")


def _same_data(reference: str, disk: str) -> None:
    out = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                          reference, disk], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _figures(api, ctxt, host, uuid) -> dict:
    return api.get_migration(ctxt, host, uuid)["details"].get("figures") or {}


def test_shared_storage_there_and_block_migration_back(api, lm_agents, second_host, tmp_path):
    a = lm_agents("lm-a")
    b = lm_agents("lm-b", on_b=True, instances_path=a.instances_path)  # shares a's storage
    a2 = lm_agents("lm-a2")  # host A again, with storage of its own
    ctxt = api.new_context()
    uuid = _boot(api, a)
    _write_pattern(SYSTEM_URI, uuid)
    reference = str(tmp_path / "reference.qcow2")
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", _disk(a, uuid),
                    reference], check=True)

    # A -> B, shared storage, with the operator's CLI.
    out = _ctl(a, "-f", "json", "migrate", uuid, b.host, "--wait")
    assert out.returncode == 0, (out.stderr, a.log_tail())
    assert json.loads(out.stdout)["host"] == b.host
    op = next(o for o in api.get_operations(ctxt, a.host, uuid) if o["name"] == "live_migration")
    assert op["status"] == "done" and op["message"] in out.stderr, (op, out.stderr)
    assert f"migrated to {b.host} (shared storage)" in op["message"]
    steps = [s["name"] for s in op["steps"]]
    assert {"check_source", "check_destination", "pre_live_migration", "migrate",
            "post_live_migration_at_destination", "remove_domain"} <= set(steps)
    assert "remove_files" not in steps
    inst = api.get_instance(ctxt, b.host, uuid)
    assert (inst["host"], inst["vm_state"], inst["power_state"], inst["task_state"]) == \
        (b.host, "active", "running", None)
    _gone_from(api, ctxt, a, uuid)
    assert second_host.domain(uuid) == (True, True)
    assert not domain_exists(uuid)
    assert _ready_count(api, ctxt, b, uuid) == 1  # same console.log: no reboot
    _same_data(reference, _disk(b, uuid))
    there = _figures(api, ctxt, a.host, uuid)
    assert api.get_migration(ctxt, b.host, uuid)["status"] == "completed"

    # B -> A (another agent, storage not shared with B): a block migration.
    op = _migrate(api, b, uuid, a2, block=True)
    assert op["status"] == "done", (op, b.log_tail())
    assert f"migrated to {a2.host} (block migration)" in op["message"]
    assert "remove_files" in [s["name"] for s in op["steps"]]
    inst = api.get_instance(ctxt, a2.host, uuid)
    assert (inst["host"], inst["vm_state"], inst["power_state"], inst["task_state"]) == \
        (a2.host, "active", "running", None)
    _gone_from(api, ctxt, b, uuid)
    assert _domain(SYSTEM_URI, uuid) == (True, True)
    assert second_host.domain(uuid) is None
    assert not os.path.exists(os.path.join(b.instances_path, uuid))  # B's copy removed
    _same_data(reference, _disk(a2, uuid))
    # A fresh console.log over here: a reboot would have printed GUEST-READY again.
    assert _ready_count(api, ctxt, a2, uuid) == 0
    back = _figures(api, ctxt, b.host, uuid)

    # The guest never stopped: it still answers the power button.
    ctxt = api.new_context()
    api.power_off(ctxt, a2.host, uuid, 30)
    assert _op(api, ctxt, a2.host, uuid)["status"] == "done"  # (a cast: not yet seen)
    inst = api.get_instance(ctxt, a2.host, uuid)
    assert (inst["vm_state"], inst["power_state"]) == ("stopped", "shutdown")
    assert "GUEST-POWEROFF" in api.get_console_output(ctxt, a2.host, uuid, 50)
    print(f"\nshared storage A->B: {there}\nblock migration B->A: {back}", file=sys.stderr)


def _progress_seen(api, ctxt, host, uuid) -> dict:
    try:
        mig = api.get_migration(ctxt, host, uuid)
    except exception.NotFound:  # the cast has not started yet
        return {}
    return mig if mig["status"] == "running" and mig["details"].get("progress") else {}


@pytest.mark.tcg
def test_operator_abort_then_completion_timeout_leave_the_guest_on_the_source(
        api, lm_agents, second_host):
    # 1 MiB/s cannot move a running Linux guest's memory and disk in the time
    # the completion timeout allows (30 s/GiB: ~8-9 s for 256 MiB plus its disk).
    limits = ("live_migration_bandwidth = 1\nlive_migration_completion_timeout = 30\n"
              "live_migration_downtime_delay = 3\n")
    a = lm_agents("lm-slow-a", virt_type="qemu", extra_conf=limits)
    b = lm_agents("lm-slow-b", on_b=True, virt_type="qemu")
    ctxt = api.new_context()
    uuid = _boot(api, a, image="linux-guest", memory_mb=256)

    # The operator aborts a running migration with compute-agent-ctl.
    mctxt = api.new_context()
    api.live_migrate(mctxt, a.host, uuid, b.host, True)
    wait_for(api, ctxt, a.host, uuid, lambda _: _progress_seen(api, ctxt, a.host, uuid),
             timeout=60, what="migration progress")
    out = _ctl(a, "migrate-abort", uuid)
    assert out.returncode == 0, out.stderr
    op = _wait_op(api, mctxt, a.host, uuid)
    assert op["status"] == "failed" and "aborted: by the operator" in op["message"], op
    _assert_back_on_source(api, a, b, second_host, uuid, fault=False)
    assert api.get_migration(ctxt, a.host, uuid)["status"] == "cancelled"

    # Then the completion timeout aborts one.
    started = time.monotonic()
    op = _migrate(api, a, uuid, b, block=True)
    took = time.monotonic() - started
    assert op["status"] == "failed", op
    assert "aborted: completion timeout" in op["message"], op["message"]
    names = [s["name"] for s in op["steps"]]
    assert {"max_downtime", "progress", "abort", "rollback_at_destination"} <= set(names)
    inst = _assert_back_on_source(api, a, b, second_host, uuid, fault=True)
    assert "completion timeout" in inst["fault"]["message"]
    progress = api.get_migration(ctxt, a.host, uuid)["details"]["progress"]
    assert progress["memory_total"] > 0 and progress["data_remaining"] > 0
    print(f"\ncompletion timeout hit after {took:.1f}s; last progress {progress}",
          file=sys.stderr)


def _assert_back_on_source(api, a, b, second_host, uuid, fault: bool) -> dict:
    ctxt = api.new_context()
    inst = api.get_instance(ctxt, a.host, uuid)
    assert (inst["host"], inst["vm_state"], inst["power_state"], inst["task_state"]) == \
        (a.host, "active", "running", None), inst
    assert (inst["fault"] is not None) == fault, inst["fault"]
    assert _domain(SYSTEM_URI, uuid) == (True, True)
    # Nothing of it on B: no domain, no record, no directory.
    assert second_host.domain(uuid) is None
    _gone_from(api, ctxt, b, uuid)
    assert not os.path.exists(os.path.join(b.instances_path, uuid))
    ops = {o["name"]: o["status"] for o in api.get_operations(ctxt, b.host, uuid, limit=5)}
    assert ops.get("rollback_live_migration_at_destination") == "done", ops
    assert _ready_count(api, ctxt, a, uuid) == 1  # it never rebooted
    return inst


def test_checks_refuse_before_anything_moves(api, lm_agents, second_host):
    a = lm_agents("lm-chk-a")
    b = lm_agents("lm-chk-b", on_b=True)  # storage of its own
    small = lm_agents("lm-chk-small", on_b=True,
                      extra_conf="machine_memory_reserved_mb = 100000000\n")
    ctxt = api.new_context()
    uuid = _boot(api, a)

    out = _ctl(a, "migrate", uuid, b.host, "--wait")
    assert out.returncode == 1 and "live migration refused" in out.stderr, out.stderr
    assert "storage is not shared" in out.stderr
    for dest, block, words in (
            (b, False, "storage is not shared"),
            (small, True, "not enough memory: the guest needs 64 MiB")):
        op = _migrate(api, a, uuid, dest, block)
        assert op["status"] == "refused" and words in op["message"], op
        assert [s["name"] for s in op["steps"]] == ["check_source", "check_destination"]
        inst = api.get_instance(ctxt, a.host, uuid)
        assert (inst["vm_state"], inst["task_state"], inst["fault"]) == ("active", None, None)
        _gone_from(api, ctxt, dest, uuid)
        assert not os.path.exists(os.path.join(dest.instances_path, uuid))
    assert second_host.domain(uuid) is None
    assert _domain(SYSTEM_URI, uuid) == (True, True)
    assert not [n for n in os.listdir(a.instances_path) if "live-migration-probe" in n]

    # A suspended instance is refused with its state named.
    sctxt = api.new_context()
    api.suspend(sctxt, a.host, uuid)
    wait_for(api, ctxt, a.host, uuid, lambda i: i["vm_state"] == "suspended")
    op = _migrate(api, a, uuid, b, True)
    assert op["status"] == "refused" and "vm_state=suspended" in op["message"], op


def test_agent_restart_during_a_migration_is_reconciled(api, lm_agents, second_host):
    """The source agent is killed (1) after the destination was prepared, before
    the guest moved: on restart the guest is active on the source and the
    destination has nothing left; (2) after the guest moved, before the
    destination finished: on restart the migration is finished on both."""
    a = lm_agents("lm-crash-a")
    b = lm_agents("lm-crash-b", on_b=True)
    uuid = _boot(api, a)

    def restart_pausing_before(step):
        a.kill()
        a.start(api, api.new_context(),
                env={"COMPUTE_AGENT_PAUSE_BEFORE_STEP": f"live_migration:{step}:60"})

    restart_pausing_before("migrate")
    ctxt = api.new_context()
    api.live_migrate(ctxt, a.host, uuid, b.host, True)
    wait_for(api, ctxt, b.host, uuid, lambda i: i["task_state"] == "migrating", timeout=60,
             what="the destination prepared")
    a.kill(9)
    a.start(api, api.new_context())
    inst = wait_for(api, ctxt, a.host, uuid, _settled)
    assert (inst["vm_state"], inst["power_state"]) == ("active", "running"), inst
    ops = api.get_operations(ctxt, a.host, uuid, limit=3)
    assert ops[0]["status"] == "done" and "rolled back" in ops[0]["message"], ops[0]
    assert ops[1]["status"] == "interrupted"
    _gone_from(api, ctxt, b, uuid)
    assert second_host.domain(uuid) is None
    assert not os.path.exists(os.path.join(b.instances_path, uuid))

    restart_pausing_before("post_live_migration_at_destination")
    ctxt = api.new_context()
    api.live_migrate(ctxt, a.host, uuid, b.host, True)
    wait_for(api, ctxt, a.host, uuid, lambda _: _step_done(api, ctxt, a.host, uuid, "migrate"),
             timeout=60, what="the guest moved")
    assert second_host.domain(uuid) == (True, True)
    a.kill(9)
    a.start(api, api.new_context())
    _gone_from(api, ctxt, a, uuid)
    inst = api.get_instance(ctxt, b.host, uuid)
    assert (inst["host"], inst["vm_state"], inst["power_state"], inst["task_state"]) == \
        (b.host, "active", "running", None)
    ops = api.get_operations(ctxt, a.host, uuid, limit=3)
    assert ops[0]["status"] == "done" and "had completed; finished" in ops[0]["message"]
    assert not domain_exists(uuid)
    assert not os.path.exists(os.path.join(a.instances_path, uuid))
    assert _ready_count(api, ctxt, b, uuid) == 0  # its new console: no reboot


def _step_done(api, ctxt, host, uuid, step) -> bool:
    ops = api.get_operations(ctxt, host, uuid, limit=5)
    mine = next((o for o in ops if o["request_id"] == ctxt.request_id), None)
    return mine is not None and any(s["name"] == step and s["status"] == "done"
                                    for s in mine["steps"])


def _virsh_migrate(src_uri, dest_uri, name, address, p2p) -> tuple[float, dict]:
    cmd = ["virsh", "-c", src_uri, "migrate", "--live", "--persistent", "--undefinesource",
           "--unsafe", name, dest_uri, f"tcp://{address}", "--listen-address", address]
    if p2p:
        cmd.insert(4, "--p2p")
    started = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.monotonic() - started
    # The same figures the agent reports: libvirt's completed job, on the destination.
    conn = libvirt.open(dest_uri)
    try:
        stats = conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                                                 | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)
    finally:
        conn.close()
    return wall, {"time_elapsed_ms": stats.get("time_elapsed"),
                  "downtime_ms": stats.get("downtime")}


def test_timings_against_virsh_migrate(api, lm_agents, second_host):
    """Prints (asserts nothing on time): libvirt's completed-job figures of the
    agent's migrations of one guest and of `virsh migrate --live` of the same
    guest, in the same run. `pytest -s -k timings` shows them."""
    rounds = int(os.environ.get("LM_ROUNDS", "3"))
    a = lm_agents("lm-time-a")
    b = lm_agents("lm-time-b", on_b=True, instances_path=a.instances_path)
    uuid = _boot(api, a, memory_mb=128)
    name = "instance-" + uuid
    rows: dict[str, list[tuple[float, dict]]] = {}
    ctxt = api.new_context()
    for _ in range(rounds):
        for label, src, dest in (("agent A->B", a, b), ("agent B->A", b, a)):
            op = _migrate(api, src, uuid, dest, block=False)
            assert op["status"] == "done", op
            # The agent's whole operation: checks, preparing B, migrating, finishing.
            wall = (datetime.datetime.fromisoformat(op["finished_at"])
                    - datetime.datetime.fromisoformat(op["started_at"])).total_seconds()
            rows.setdefault(label, []).append((wall, _figures(api, ctxt, src.host, uuid)))
        rows.setdefault("virsh A->B --p2p", []).append(_virsh_migrate(
            SYSTEM_URI, second_host.uri, name, second_host.address, p2p=True))
        rows.setdefault("virsh B->A", []).append(_virsh_migrate(
            second_host.uri, SYSTEM_URI, name, "127.0.0.1", p2p=False))
    lines = [f"\nlive migration of the boot-sector guest (128 MiB, shared storage), "
             f"{rounds} rounds, medians:",
             f"{'':18} {'wall s':>8} {'job ms':>8} {'downtime ms':>12}"]
    for label, runs in rows.items():
        wall = statistics.median(w for w, _ in runs)
        job = statistics.median(f.get("time_elapsed_ms") or 0 for _, f in runs)
        down = statistics.median(f.get("downtime_ms") or 0 for _, f in runs)
        each = [(round(w, 2), f.get("time_elapsed_ms"), f.get("downtime_ms")) for w, f in runs]
        lines.append(f"{label:18} {wall:8.2f} {job:8.0f} {down:12.0f}   (each: {each})")
    print("\n".join(lines), file=sys.stderr)
    assert _domain(SYSTEM_URI, uuid) == (True, True)
