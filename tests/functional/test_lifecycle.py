"""Reboot, power off/on, suspend/resume, reset-state and repair, on real guests."""

from __future__ import annotations

import hashlib
import os
import subprocess

import libvirt
import pytest

from tests.functional.agent_fixture import wait_for, wait_for_console
from tests.functional.conftest import domain_exists, make_spec


def _settled(inst):
    return inst["task_state"] is None and inst["vm_state"] != "building"


def _op(api, ctxt, host, uuid):
    """The operation this request started, once it has ended."""
    def done(_inst):
        ops = api.get_operations(ctxt, host, uuid, limit=10)
        mine = [o for o in ops if o["request_id"] == ctxt.request_id]
        return bool(mine) and mine[0]["status"] != "running"
    wait_for(api, ctxt, host, uuid, done, what="the operation")
    return next(o for o in api.get_operations(ctxt, host, uuid, limit=10)
                if o["request_id"] == ctxt.request_id)


def _boot(api, agent, image="bootsector", memory_mb=64):
    ctxt = api.new_context()
    spec = make_spec(image=image, memory_mb=memory_mb)
    api.spawn(ctxt, agent.host, spec)
    inst = wait_for(api, ctxt, agent.host, spec["uuid"], _settled)
    assert inst["vm_state"] == "active", (inst["fault"], agent.log_tail())
    wait_for_console(api, ctxt, agent.host, spec["uuid"], "GUEST-READY")
    return spec["uuid"]


def _ready_count(api, ctxt, host, uuid) -> int:
    return api.get_console_output(ctxt, host, uuid, 5000).count("GUEST-READY")


def _wait_ready_count(api, ctxt, host, uuid, n, timeout=120):
    wait_for(api, ctxt, host, uuid, lambda _: _ready_count(api, ctxt, host, uuid) >= n,
             timeout=timeout, what=f"boot #{n} on the console")


@pytest.mark.tcg
def test_soft_reboot_of_linux_guest(api, tcg_agent):
    uuid = _boot(api, tcg_agent, image="linux-guest", memory_mb=256)
    ctxt = api.new_context()
    api.reboot(ctxt, tcg_agent.host, uuid, "SOFT")
    op = _op(api, ctxt, tcg_agent.host, uuid)
    assert op["status"] == "done" and op["message"] == "soft reboot"
    assert [s["name"] for s in op["steps"]] == ["acpi_shutdown", "start_domain"]
    _wait_ready_count(api, ctxt, tcg_agent.host, uuid, 2)
    inst = api.get_instance(ctxt, tcg_agent.host, uuid)
    assert (inst["vm_state"], inst["power_state"]) == ("active", "running")


def test_soft_reboot_falls_back_to_hard_when_acpi_is_ignored(api, agent_factory):
    agent = agent_factory("noacpi", virt_type="kvm",
                          extra_conf="[libvirt]\nsoft_reboot_timeout = 3\n")
    # The blank disk boots nothing: SeaBIOS sits there and never powers off.
    ctxt = api.new_context()
    spec = make_spec(image="blank", memory_mb=64)
    api.spawn(ctxt, agent.host, spec)
    assert wait_for(api, ctxt, agent.host, spec["uuid"], _settled)["vm_state"] == "active"
    ctxt = api.new_context()
    api.reboot(ctxt, agent.host, spec["uuid"], "SOFT")
    op = _op(api, ctxt, agent.host, spec["uuid"])
    assert op["status"] == "done"
    assert "did not power off within 3s" in op["message"]
    assert "destroy_domain" in [s["name"] for s in op["steps"]]
    inst = api.get_instance(ctxt, agent.host, spec["uuid"])
    assert (inst["vm_state"], inst["power_state"]) == ("active", "running")


def test_hard_reboot_power_off_and_on(api, kvm_agent):
    uuid = _boot(api, kvm_agent)
    host = kvm_agent.host
    ctxt = api.new_context()
    api.reboot(ctxt, host, uuid, "HARD")
    assert _op(api, ctxt, host, uuid)["status"] == "done"
    _wait_ready_count(api, ctxt, host, uuid, 2)

    ctxt = api.new_context()
    api.power_off(ctxt, host, uuid, 30)
    op = _op(api, ctxt, host, uuid)
    assert op["message"] == "clean shutdown"  # the boot-sector guest obeys ACPI
    inst = api.get_instance(ctxt, host, uuid)
    assert (inst["vm_state"], inst["power_state"]) == ("stopped", "shutdown")

    # Not allowed while stopped: refused with the state named, nothing changed.
    ctxt = api.new_context()
    api.suspend(ctxt, host, uuid)
    op = _op(api, ctxt, host, uuid)
    assert op["status"] == "refused"
    assert "vm_state=stopped" in op["message"]
    assert api.get_instance(ctxt, host, uuid)["vm_state"] == "stopped"

    ctxt = api.new_context()
    api.power_on(ctxt, host, uuid)
    assert _op(api, ctxt, host, uuid)["status"] == "done"
    _wait_ready_count(api, ctxt, host, uuid, 3)
    assert api.get_instance(ctxt, host, uuid)["vm_state"] == "active"


def test_suspend_and_resume_keep_the_guest_running(api, kvm_agent):
    uuid = _boot(api, kvm_agent)
    host = kvm_agent.host
    ctxt = api.new_context()
    api.suspend(ctxt, host, uuid)
    assert _op(api, ctxt, host, uuid)["status"] == "done"
    inst = api.get_instance(ctxt, host, uuid)
    assert (inst["vm_state"], inst["power_state"]) == ("suspended", "suspended")
    status = api.get_host_status(ctxt, host)
    assert status["save_files_bytes"] > 0

    ctxt = api.new_context()
    api.resume(ctxt, host, uuid)
    assert _op(api, ctxt, host, uuid)["status"] == "done"
    inst = api.get_instance(ctxt, host, uuid)
    assert (inst["vm_state"], inst["power_state"]) == ("active", "running")
    # Restored, not rebooted: still one boot on the console, and the guest's
    # program is still waiting for the power button where it was.
    assert _ready_count(api, ctxt, host, uuid) == 1
    ctxt = api.new_context()
    api.power_off(ctxt, host, uuid, 30)
    assert _op(api, ctxt, host, uuid)["message"] == "clean shutdown"


def test_suspend_refused_when_the_save_filesystem_is_nearly_full(api, agent_factory):
    small = "/var/lib/compute-agent-tests/small-save-fs-" + os.urandom(4).hex()
    os.makedirs(small)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", small], check=True)
    try:
        agent = agent_factory("smallsave", virt_type="kvm",
                              extra_conf=f"[libvirt]\nsave_path = {small}\n")
        uuid = _boot(api, agent)
        ctxt = api.new_context()
        api.suspend(ctxt, agent.host, uuid)
        assert _op(api, ctxt, agent.host, uuid)["status"] == "failed"
        inst = api.get_instance(ctxt, agent.host, uuid)
        assert inst["vm_state"] == "error"
        assert inst["fault"]["step"] == "check_save_space"
        assert "Not enough free space" in inst["fault"]["message"]
        assert "need 320 MiB" in inst["fault"]["message"]  # 64 MiB guest + 256 margin
        # The guest itself was not touched.
        assert inst["power_state"] == "running"
        assert _ready_count(api, ctxt, agent.host, uuid) == 1
    finally:
        subprocess.run(["umount", small], check=True)
        os.rmdir(small)


def test_reset_state_and_hard_reboot_repair_a_broken_instance(api, kvm_agent):
    uuid = _boot(api, kvm_agent)
    host = kvm_agent.host
    inst_dir = os.path.join(kvm_agent.instances_path, uuid)
    base = os.path.join(kvm_agent.instances_path, "_base",
                        hashlib.sha1(b"bootsector").hexdigest())

    # Break everything that can be rebuilt: the domain, the _base file, the XML copy.
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByUUIDString(uuid)
        dom.destroy()
        dom.undefine()
    finally:
        conn.close()
    os.unlink(base)
    os.unlink(os.path.join(inst_dir, "libvirt.xml"))
    ctxt = api.new_context()
    api.get_host_status(ctxt, host)  # let the agent see the world as it is

    inst = api.reset_state(ctxt, host, uuid, "error")
    assert inst["vm_state"] == "error" and inst["task_state"] is None
    ctxt = api.new_context()
    api.reboot(ctxt, host, uuid, "HARD")
    op = _op(api, ctxt, host, uuid)
    assert op["status"] == "done", op
    assert [s["name"] for s in op["steps"]] == [
        "destroy_domain", "ensure_image", "ensure_disks", "define_domain", "start_domain"]
    inst = api.get_instance(ctxt, host, uuid)
    assert (inst["vm_state"], inst["power_state"], inst["fault"]) == ("active", "running", None)
    assert domain_exists(uuid)
    assert os.path.exists(base) and os.path.exists(os.path.join(inst_dir, "libvirt.xml"))
    _wait_ready_count(api, ctxt, host, uuid, 2)

    # Twice in a row ends in the same running instance.
    ctxt = api.new_context()
    api.reboot(ctxt, host, uuid, "HARD")
    assert _op(api, ctxt, host, uuid)["status"] == "done"
    assert api.get_instance(ctxt, host, uuid)["power_state"] == "running"


def test_hard_reboot_never_replaces_a_missing_root_disk(api, kvm_agent):
    uuid = _boot(api, kvm_agent)
    disk = os.path.join(kvm_agent.instances_path, uuid, "disk")
    os.rename(disk, disk + ".moved-away")
    ctxt = api.new_context()
    api.reboot(ctxt, kvm_agent.host, uuid, "HARD")
    assert _op(api, ctxt, kvm_agent.host, uuid)["status"] == "failed"
    inst = api.get_instance(ctxt, kvm_agent.host, uuid)
    assert inst["vm_state"] == "error"
    assert inst["fault"]["step"] == "ensure_disks"
    assert "root disk" in inst["fault"]["message"] and "missing" in inst["fault"]["message"]
    assert not os.path.exists(disk)
    assert os.path.exists(disk + ".moved-away")
