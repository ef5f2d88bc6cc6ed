"""The agent killed mid-operation, and libvirtd restarted under it: after a
restart every instance is finished, rolled back or in error with the reason,
and no disk is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import libvirt

from tests.functional.agent_fixture import wait_for, wait_for_console
from tests.functional.conftest import domain_exists, make_spec
from tests.functional.test_lifecycle import _op, _settled, _wait_ready_count


def _wait_step_done(api, ctxt, host, uuid, step):
    def done(_inst):
        ops = api.get_operations(ctxt, host, uuid, limit=5)
        mine = next((o for o in ops if o["request_id"] == ctxt.request_id), None)
        return mine is not None and any(s["name"] == step and s["status"] == "done"
                                        for s in mine["steps"])
    wait_for(api, ctxt, host, uuid, done, timeout=60, what=f"step {step}")


def _kill_and_restart(api, agent):
    assert agent.kill(signal.SIGKILL) == -signal.SIGKILL
    agent.start(api, api.new_context())


def test_killed_during_spawn_leaves_error_with_reason_and_disks(api, agent_factory):
    agent = agent_factory("crash-spawn", virt_type="kvm",
                          env={"COMPUTE_AGENT_PAUSE_BEFORE_STEP": "spawn:define_domain:60"})
    ctxt = api.new_context()
    spec = make_spec(image="bootsector", memory_mb=64)
    uuid = spec["uuid"]
    api.spawn(ctxt, agent.host, spec)
    _wait_step_done(api, ctxt, agent.host, uuid, "create_disks")
    _kill_and_restart(api, agent)

    inst = api.get_instance(ctxt, agent.host, uuid)
    assert inst["vm_state"] == "error" and inst["task_state"] is None
    assert inst["fault"]["message"] == "agent restarted during spawn, after step create_disks"
    disk = os.path.join(agent.instances_path, uuid, "disk")
    info = subprocess.run(["qemu-img", "info", "-f", "qcow2", disk], capture_output=True)
    assert info.returncode == 0, "the disk made before the crash must be intact"
    assert not domain_exists(uuid)
    ops = api.get_operations(ctxt, agent.host, uuid)
    assert ops[0]["status"] == "interrupted"

    # The repair tool takes it from there.
    ctxt = api.new_context()
    api.reboot(ctxt, agent.host, uuid, "HARD")
    assert _op(api, ctxt, agent.host, uuid)["status"] == "done"
    assert api.get_instance(ctxt, agent.host, uuid)["vm_state"] == "active"
    wait_for_console(api, ctxt, agent.host, uuid, "GUEST-READY")


def test_killed_during_hard_reboot_and_suspend_are_finished_or_rolled_back(api, agent_factory):
    agent = agent_factory("crash-ops", virt_type="kvm", env={
        "COMPUTE_AGENT_PAUSE_BEFORE_STEP": "reboot:define_domain:60,suspend:managed_save:60"})
    host = agent.host
    ctxt = api.new_context()
    rebooted, suspended = make_spec(image="bootsector", memory_mb=64), \
        make_spec(image="bootsector", memory_mb=64)
    for spec in (rebooted, suspended):
        api.spawn(ctxt, host, spec)
    for spec in (rebooted, suspended):
        assert wait_for(api, ctxt, host, spec["uuid"], _settled)["vm_state"] == "active"
        wait_for_console(api, ctxt, host, spec["uuid"], "GUEST-READY")

    reboot_ctxt, suspend_ctxt = api.new_context(), api.new_context()
    api.reboot(reboot_ctxt, host, rebooted["uuid"], "HARD")
    api.suspend(suspend_ctxt, host, suspended["uuid"])
    _wait_step_done(api, reboot_ctxt, host, rebooted["uuid"], "ensure_disks")
    _wait_step_done(api, suspend_ctxt, host, suspended["uuid"], "check_save_space")
    _kill_and_restart(api, agent)

    # The reboot was interrupted after the destroy: the restart finishes it.
    inst = wait_for(api, ctxt, host, rebooted["uuid"], _settled)
    assert (inst["vm_state"], inst["power_state"]) == ("active", "running"), inst
    _wait_ready_count(api, ctxt, host, rebooted["uuid"], 2)
    # The suspend never saved: the guest is running as before, and says so.
    inst = api.get_instance(ctxt, host, suspended["uuid"])
    assert (inst["vm_state"], inst["power_state"], inst["task_state"]) == \
        ("active", "running", None)
    console = api.get_console_output(ctxt, host, suspended["uuid"], 1000)
    assert console.count("GUEST-READY") == 1


def _is_libvirtd(pid: int) -> bool:
    """A live (not zombie) libvirtd in our own mount namespace."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        same_ns = os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    except OSError:
        return False
    name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
    return name == "libvirtd" and state not in "ZX" and same_ns


def _system_libvirtd_pid() -> int:
    """The system libvirtd: the pid in its pid file, else the one libvirtd
    process in this mount namespace."""
    try:
        with open("/run/libvirtd.pid") as f:
            pid = int(f.read().strip())
        if _is_libvirtd(pid):
            return pid
    except (OSError, ValueError):
        pass
    pids = [int(p) for p in subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True,
                                           text=True).stdout.split() if _is_libvirtd(int(p))]
    assert len(pids) == 1, f"expected one system libvirtd, found {pids}"
    return pids[0]


def test_libvirtd_restart_under_a_running_agent(api, kvm_agent):
    ctxt = api.new_context()
    spec = make_spec(image="bootsector", memory_mb=64)
    api.spawn(ctxt, kvm_agent.host, spec)
    assert wait_for(api, ctxt, kvm_agent.host, spec["uuid"], _settled)["vm_state"] == "active"

    # Only the system daemon: a second host's libvirtd (migration tests, in
    # another mount namespace) must survive.
    pid = _system_libvirtd_pid()
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not _is_libvirtd(pid):
            break
        time.sleep(0.1)
    subprocess.run(["libvirtd", "-d"], check=True)
    for _ in range(300):
        try:
            libvirt.open("qemu:///system").close()
            break
        except libvirt.libvirtError:
            time.sleep(0.2)

    # The next operation works: the agent reconnected by itself.
    ctxt = api.new_context()
    api.reboot(ctxt, kvm_agent.host, spec["uuid"], "HARD")
    op = _op(api, ctxt, kvm_agent.host, spec["uuid"])
    assert op["status"] == "done", (op["message"], op["steps"])
    assert api.get_host_status(ctxt, kvm_agent.host)["libvirt_connected"] is True
    inst = api.get_instance(ctxt, kvm_agent.host, spec["uuid"])
    assert (inst["vm_state"], inst["power_state"]) == ("active", "running")
