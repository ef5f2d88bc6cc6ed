"""Images from a real Glance and from the local image service: cached once per
host, verified, and hostile images refused before they reach the host."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time

import pytest

from tests.functional.agent_fixture import wait_for, wait_for_console
from tests.functional.conftest import GUEST_DIR, domain_exists, make_spec

MiB = 1024 * 1024


def _settled(inst):
    return inst["task_state"] is None and inst["vm_state"] != "building"


def _base_files(agent) -> list[str]:
    """Everything in _base but the lock directory."""
    return sorted(n for n in os.listdir(os.path.join(agent.instances_path, "_base"))
                  if n != ".locks")


def _spawn_and_settle(api, agent, image, **kw):
    ctxt = api.new_context()
    spec = make_spec(image=image, **kw)
    api.spawn(ctxt, agent.host, spec)
    return spec["uuid"], wait_for(api, ctxt, agent.host, spec["uuid"], _settled)


@pytest.mark.tcg
def test_spawn_from_glance_raw_and_qcow2(api, agent_factory, glance, tmp_path):
    linux = os.path.join(GUEST_DIR, "linux-guest.raw")
    qcow2 = str(tmp_path / "linux-guest.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", linux, qcow2],
                   check=True)
    raw_id = glance.upload(linux, "raw", "linux-guest-raw")
    qcow2_id = glance.upload(qcow2, "qcow2", "linux-guest-qcow2")
    agent = agent_factory("glance", virt_type="qemu", extra_conf=glance.agent_conf())
    ctxt = api.new_context()
    specs = [make_spec(image=raw_id), make_spec(image=qcow2_id)]
    for spec in specs:
        api.spawn(ctxt, agent.host, spec)
    for spec in specs:
        inst = wait_for(api, ctxt, agent.host, spec["uuid"], _settled)
        assert inst["vm_state"] == "active", (inst["fault"], agent.log_tail())
        wait_for_console(api, ctxt, agent.host, spec["uuid"], "GUEST-READY")
    for image_id in (raw_id, qcow2_id):
        base = os.path.join(agent.instances_path, "_base", hashlib.sha1(image_id.encode())
                            .hexdigest())
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", "-f", "raw", base],
            check=True, capture_output=True, text=True).stdout)
        assert info["virtual-size"] == os.path.getsize(linux)
        assert glance.downloads(image_id) == 1


def test_concurrent_spawns_of_an_uncached_image_download_it_once(api, agent_factory, glance,
                                                                  tmp_path):
    # 64 MiB: the boot sector then random data, so the download takes a while
    # and the five spawns really overlap.
    image = tmp_path / "big-bootsector.raw"
    with open(os.path.join(GUEST_DIR, "bootsector-guest.raw"), "rb") as src, \
            open(image, "wb") as f:
        f.write(src.read(512))
        f.write(os.urandom(64 * MiB - 512))
    image_id = glance.upload(str(image), "raw", "big-bootsector")
    agent = agent_factory("burst", virt_type="kvm", extra_conf=glance.agent_conf())
    ctxt = api.new_context()
    specs = [make_spec(image=image_id, memory_mb=64) for _ in range(5)]
    for spec in specs:
        api.spawn(ctxt, agent.host, spec)
    for spec in specs:
        inst = wait_for(api, ctxt, agent.host, spec["uuid"], _settled)
        assert inst["vm_state"] == "active", (inst["fault"], agent.log_tail())
    for spec in specs:
        wait_for_console(api, ctxt, agent.host, spec["uuid"], "GUEST-READY", timeout=60)
    assert glance.downloads(image_id) == 1
    status = api.get_host_status(ctxt, agent.host)
    assert (status["image_cache_misses"], status["image_cache_hits"]) == (1, 4)
    assert status["image_cache_files"] == 1


def test_hash_mismatch_with_glance_record_leaves_nothing(api, agent_factory, glance, tmp_path):
    image = tmp_path / "tampered.raw"
    image.write_bytes(b"\x01" * MiB)
    image_id = glance.upload(str(image), "raw", "tampered")
    # Same size, different bytes behind Glance's back.
    with open(glance.store_path(image_id), "r+b") as f:
        f.write(b"\x02" * 4096)
    agent = agent_factory("tamper", virt_type="kvm", extra_conf=glance.agent_conf())
    uuid, inst = _spawn_and_settle(api, agent, image_id)
    assert inst["vm_state"] == "error"
    assert inst["fault"]["step"] == "fetch_image"
    assert "sha512 of the data is" in inst["fault"]["message"]
    assert _base_files(agent) == []
    assert not os.path.exists(os.path.join(agent.instances_path, uuid))


def _qcow2(path, size="1M", *opts):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), size],
                   check=True)


def _hostile_corpus(d):
    """(image id, disk_format, path, words the fault must contain)"""
    corpus = []
    _qcow2(d / "backing.qcow2", "1M", "-b", "/etc/hostname", "-F", "raw")
    corpus.append(("backing-file", "qcow2", d / "backing.qcow2", "safety checks"))
    _qcow2(d / "datafile.qcow2", "1M", "-o", f"data_file={d / 'datafile.raw'}")
    corpus.append(("data-file", "qcow2", d / "datafile.qcow2", "safety checks"))
    (d / "extent.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
        'createType="monolithicFlat"\n\nRW 2048 FLAT "/etc/shadow" 0\n')
    corpus.append(("vmdk-extent", "vmdk", d / "extent.vmdk", "safety checks"))
    (d / "raw.img").write_bytes(os.urandom(MiB))
    corpus.append(("raw-as-qcow2", "qcow2", d / "raw.img", "the data is 'raw'"))
    _qcow2(d / "plain.qcow2", "1M")
    corpus.append(("qcow2-as-raw", "raw", d / "plain.qcow2", "the data is 'qcow2'"))
    _qcow2(d / "huge.qcow2", "1T")
    corpus.append(("huge", "qcow2", d / "huge.qcow2", "larger than the flavor's root disk"))
    (d / "truncated.qcow2").write_bytes((d / "plain.qcow2").read_bytes()[:100])
    corpus.append(("truncated", "qcow2", d / "truncated.qcow2", "is unacceptable"))
    (d / "hash.raw").write_bytes(b"\x03" * MiB)
    corpus.append(("bad-hash", "raw", d / "hash.raw", "sha512 of the data is"))
    return corpus


def test_hostile_images_are_refused_and_leave_nothing(api, agent_factory, image_dir, tmp_path):
    agent = agent_factory("hostile", virt_type="kvm",
                          extra_conf="allowed_disk_formats = raw,qcow2,vmdk\n")
    cases = _hostile_corpus(tmp_path)
    for image_id, disk_format, path, _ in cases:
        record = {"name": image_id, "disk_format": disk_format}
        if image_id == "bad-hash":
            record.update(os_hash_algo="sha512", os_hash_value="0" * 128)
        subprocess.run(["cp", str(path), os.path.join(image_dir, image_id)], check=True)
        with open(os.path.join(image_dir, image_id + ".json"), "w") as f:
            json.dump(record, f)
    ctxt = api.new_context()
    specs = {image_id: make_spec(image=image_id) for image_id, *_ in cases}
    for spec in specs.values():
        api.spawn(ctxt, agent.host, spec)
    for image_id, _, _, words in cases:
        uuid = specs[image_id]["uuid"]
        inst = wait_for(api, ctxt, agent.host, uuid, _settled)
        assert inst["vm_state"] == "error", (image_id, inst)
        assert inst["fault"]["step"] == "fetch_image", (image_id, inst["fault"])
        assert words in inst["fault"]["message"], (image_id, inst["fault"]["message"])
        assert image_id in inst["fault"]["message"]
        assert not domain_exists(uuid)
        assert not os.path.exists(os.path.join(agent.instances_path, uuid))
    assert _base_files(agent) == []
    # The host file the VMDK pointed at was never read into the cache, and the
    # agent still serves good images.
    uuid, inst = _spawn_and_settle(api, agent, "bootsector", memory_mb=64)
    assert inst["vm_state"] == "active"


def test_ageing_removes_unused_base_files_and_never_one_in_use(api, agent_factory, image_dir):
    for copy in ("age-a", "age-b", "age-c"):
        subprocess.run(["cp", os.path.join(image_dir, "bootsector"),
                        os.path.join(image_dir, copy)], check=True)
        subprocess.run(["cp", os.path.join(image_dir, "bootsector.json"),
                        os.path.join(image_dir, copy + ".json")], check=True)
    # Age everything unused at once, every second: the harshest setting.
    agent = agent_factory("ageing", virt_type="kvm", extra_conf=(
        "cache_ageing_interval = 1\nremove_unused_base_images_after = 0\n"))
    base = os.path.join(agent.instances_path, "_base")
    a, inst_a = _spawn_and_settle(api, agent, "age-a", memory_mb=64)
    b, inst_b = _spawn_and_settle(api, agent, "age-b", memory_mb=64)
    assert inst_a["vm_state"] == inst_b["vm_state"] == "active"
    ctxt = api.new_context()
    api.delete(ctxt, agent.host, a)
    wait_for(api, ctxt, agent.host, a, lambda i: i["vm_state"] == "deleted")
    sha = {i: hashlib.sha1(i.encode()).hexdigest() for i in ("age-a", "age-b", "age-c")}
    deadline = time.monotonic() + 30
    while os.path.exists(os.path.join(base, sha["age-a"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(os.path.join(base, sha["age-a"])), agent.log_tail()
    assert os.path.exists(os.path.join(base, sha["age-b"]))

    # Spawns racing the ageing passes: each one either keeps its base file or
    # fetches it again - none fails for a backing file removed under it.
    stop = threading.Event()
    failures = []

    def churn():
        while not stop.is_set():
            uuid, inst = _spawn_and_settle(api, agent, "age-c", memory_mb=64)
            if inst["vm_state"] != "active":
                failures.append(inst["fault"])
            c = api.new_context()
            api.delete(c, agent.host, uuid)
            wait_for(api, c, agent.host, uuid, lambda i: i["vm_state"] == "deleted")

    worker = threading.Thread(target=churn)
    worker.start()
    time.sleep(8)
    stop.set()
    worker.join(60)
    assert failures == []
    assert api.get_host_status(ctxt, agent.host)["image_cache_misses"] >= 3


def test_glance_going_away_mid_download(api, agent_factory, glance, tmp_path):
    image = tmp_path / "big.raw"
    with open(image, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    image_id = glance.upload(str(image), "raw", "big")
    agent = agent_factory("glance-gone", virt_type="kvm", extra_conf=glance.agent_conf())
    base = os.path.join(agent.instances_path, "_base")
    ctxt = api.new_context()
    spec = make_spec(image=image_id, memory_mb=64)
    api.spawn(ctxt, agent.host, spec)
    try:
        deadline = time.monotonic() + 60
        while not any(".part-" in n for n in os.listdir(base)):
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.005)
        glance.stop()
        inst = wait_for(api, ctxt, agent.host, spec["uuid"], _settled)
    finally:
        glance.start()
    assert inst["vm_state"] == "error"
    assert inst["fault"]["step"] == "fetch_image"
    assert f"Fetching image {image_id} failed" in inst["fault"]["message"]
    assert _base_files(agent) == []
