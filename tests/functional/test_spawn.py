"""Boot real guests through RabbitMQ and the real libvirtd, check what is on
the host, and delete them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time

import pytest

from compute_agent import exception
from tests.functional.agent_fixture import wait_for, wait_for_console
from tests.functional.conftest import domain_exists, make_spec

GiB = 1024 ** 3


def _active(inst):
    return inst["vm_state"] == "active" and inst["task_state"] is None


def _settled(inst):
    return inst["task_state"] is None and inst["vm_state"] != "building"


def _qemu_img_info(path: str, fmt: str) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "-f", fmt, "--output=json", path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _boot_and_check(api, ctxt, agent, image: str, marker_timeout: float):
    spec = make_spec(image=image)
    uuid = spec["uuid"]
    api.spawn(ctxt, agent.host, spec)
    inst = wait_for(api, ctxt, agent.host, uuid, _settled, what="spawn")
    assert inst["vm_state"] == "active", (inst["fault"], agent.log_tail())
    assert inst["power_state"] == "running"
    assert inst["host"] == agent.host
    wait_for_console(api, ctxt, agent.host, uuid, "GUEST-READY", timeout=marker_timeout)

    # The disk chain: a qcow2 overlay of the flavor's size over a raw _base file.
    inst_dir = os.path.join(agent.instances_path, uuid)
    base = os.path.join(agent.instances_path, "_base", hashlib.sha1(image.encode()).hexdigest())
    disk = _qemu_img_info(os.path.join(inst_dir, "disk"), "qcow2")
    assert disk["format"] == "qcow2"
    assert disk["virtual-size"] == 1 * GiB
    assert disk["full-backing-filename"] == base
    assert disk["backing-filename-format"] == "raw"
    base_info = _qemu_img_info(base, "raw")
    assert base_info["virtual-size"] == os.path.getsize(base)

    # The human copy of the XML is valid against libvirt's schema.
    xml = os.path.join(inst_dir, "libvirt.xml")
    res = subprocess.run(["virt-xml-validate", xml, "domain"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr

    ops = api.get_operations(ctxt, agent.host, uuid)
    assert [s["name"] for s in ops[0]["steps"]] == [
        "check_image", "fetch_image", "create_disks", "define_domain", "start_domain"]

    api.delete(ctxt, agent.host, uuid)
    inst = wait_for(api, ctxt, agent.host, uuid, lambda i: i["vm_state"] == "deleted",
                    what="delete")
    assert inst["fault"] is None
    assert not domain_exists(uuid)
    assert not os.path.exists(inst_dir)
    assert os.path.exists(base), "delete must leave the _base cache alone"


@pytest.mark.tcg
def test_linux_guest_boots_under_tcg(api, ctxt, tcg_agent):
    _boot_and_check(api, ctxt, tcg_agent, "linux-guest", marker_timeout=120)


@pytest.mark.tcg
def test_qcow2_image_is_cached_as_raw(api, ctxt, tcg_agent):
    _boot_and_check(api, ctxt, tcg_agent, "linux-guest-qcow2", marker_timeout=120)


@pytest.mark.kvm
def test_bootsector_guest_boots_under_kvm(api, ctxt, kvm_agent):
    _boot_and_check(api, ctxt, kvm_agent, "bootsector", marker_timeout=60)


def test_unknown_image_fails_cleanly(api, ctxt, kvm_agent):
    spec = make_spec(image="no-such-image")
    api.spawn(ctxt, kvm_agent.host, spec)
    inst = wait_for(api, ctxt, kvm_agent.host, spec["uuid"], _settled)
    assert inst["vm_state"] == "error"
    assert inst["fault"]["step"] == "check_image"
    assert "no-such-image was not found" in inst["fault"]["message"]
    assert not domain_exists(spec["uuid"])
    assert not os.path.exists(os.path.join(kvm_agent.instances_path, spec["uuid"]))


def test_failure_at_start_removes_domain_and_files(api, ctxt, kvm_agent):
    # 3 TiB of guest memory passes validation and defines, but QEMU cannot start it.
    spec = make_spec(image="bootsector", memory_mb=3 * 1024 * 1024)
    api.spawn(ctxt, kvm_agent.host, spec)
    inst = wait_for(api, ctxt, kvm_agent.host, spec["uuid"], _settled)
    assert inst["vm_state"] == "error", inst
    assert inst["fault"]["step"] == "start_domain"
    assert not domain_exists(spec["uuid"])
    assert not os.path.exists(os.path.join(kvm_agent.instances_path, spec["uuid"]))
    # The agent keeps serving: the next spawn works.
    good = make_spec(image="bootsector", memory_mb=64)
    api.spawn(ctxt, kvm_agent.host, good)
    assert wait_for(api, ctxt, kvm_agent.host, good["uuid"], _settled)["vm_state"] == "active"


@pytest.mark.parametrize("field,mutate", [
    ("name", lambda s: s.update(name="<domain>evil</domain>")),
    ("name", lambda s: s.update(name="../../etc")),
    ("uuid", lambda s: s.update(uuid="not-a-uuid")),
    ("flavor.memory_mb", lambda s: s["flavor"].update(memory_mb=-1)),
    ("flavor.root_gb", lambda s: s["flavor"].update(root_gb=10 ** 9)),
    ("image.id", lambda s: s["image"].update(id="../../../etc/shadow")),
])
def test_bad_spec_is_refused_before_the_host_is_touched(api, ctxt, kvm_agent, field, mutate):
    spec = make_spec(image="bootsector")
    mutate(spec)
    # The client refuses it at once, naming the field...
    with pytest.raises(exception.InvalidSpec, match=f"field '{field}'"):
        api.spawn(ctxt, kvm_agent.host, spec)
    # ...and so does the agent when a client skips validation.
    api.spawn(ctxt, kvm_agent.host, spec, validate=False)
    key = spec["uuid"] if isinstance(spec["uuid"], str) else ""
    refused = None
    for _ in range(100):
        ops = api.get_operations(ctxt, kvm_agent.host, key)
        refused = next((o for o in ops if o["request_id"] == ctxt.request_id), None)
        if refused:
            break
        time.sleep(0.1)
    assert refused is not None, kvm_agent.log_tail()
    assert refused["status"] == "refused"
    assert f"field '{field}'" in refused["message"]
    assert api.list_instances(ctxt, kvm_agent.host, include_deleted=True) == []
    assert os.listdir(kvm_agent.instances_path) in ([], ["_base"])


def test_duplicate_uuid_is_refused_and_the_original_untouched(api, ctxt, kvm_agent):
    spec = make_spec(image="bootsector", memory_mb=64, name="original")
    api.spawn(ctxt, kvm_agent.host, spec)
    before = wait_for(api, ctxt, kvm_agent.host, spec["uuid"], _settled)
    assert before["vm_state"] == "active"

    dup_ctxt = api.new_context()
    api.spawn(dup_ctxt, kvm_agent.host, dict(spec, name="impostor"))
    ops = []
    for _ in range(100):
        ops = api.get_operations(ctxt, kvm_agent.host, spec["uuid"])
        if any(o["request_id"] == dup_ctxt.request_id for o in ops):
            break
        time.sleep(0.1)
    refused = next(o for o in ops if o["request_id"] == dup_ctxt.request_id)
    assert refused["status"] == "refused"
    assert "already exists" in refused["message"]
    after = api.get_instance(ctxt, kvm_agent.host, spec["uuid"])
    assert after["name"] == "original"
    assert after["vm_state"] == "active" and after["power_state"] == "running"
    assert domain_exists(spec["uuid"])
