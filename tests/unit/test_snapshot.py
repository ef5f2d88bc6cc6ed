"""The snapshot RPC in the manager, against the FakeDriver and the fake image service:
a call that answers with the new image's id, then background work that never harms
the instance."""

from __future__ import annotations

import os
import threading

import oslo_messaging as messaging
import pytest

from compute_agent import exception, states
from tests.unit.conftest import IMAGE_ID


def rpc_error(fn, *args, **kwargs) -> Exception:
    with pytest.raises(messaging.ExpectedException) as info:
        fn(*args, **kwargs)
    return info.value.exc_info[1]


@pytest.fixture
def active(manager, ctxt, make_spec, notifier, driver):
    spec = make_spec()
    manager.spawn(ctxt, spec)
    notifier.sent.clear()
    driver.calls.clear()
    return spec["uuid"]


def _snapshot(manager, ctxt, uuid, name="snap-1") -> str:
    image_id = manager.snapshot(ctxt, uuid, name)
    assert manager.wait_for_background(10), "the snapshot did not end"
    return image_id


def _op(store, uuid, name="snapshot"):
    return next(o for o in store.operations(uuid=uuid) if o.name == name)


def test_snapshot_of_an_active_instance(manager, store, driver, images, notifier, ctxt,
                                        active):
    images.images[IMAGE_ID][0].properties.update(hw_disk_bus="virtio", os_hash_algo="sha512")
    seen = []
    driver.snapshot_hook = lambda stage: seen.append(
        (stage, store.get_instance(active).task_state, store.get_instance(active).progress))

    image_id = _snapshot(manager, ctxt, active, "web-1 backup")

    record = images.created[image_id]
    assert record["name"] == "web-1 backup" and record["disk_format"] == "raw"
    assert (record["container_format"], record["min_disk"], record["min_ram"]) == ("bare", 1, 0)
    assert record["properties"] == {
        "hw_disk_bus": "virtio", "image_type": "snapshot", "instance_uuid": active,
        "base_image_ref": IMAGE_ID, "snapshot_host": "h1", "snapshot_mode": "live",
        "snapshot_consistency": "crash-consistent"}
    assert images.status[image_id] == "active"
    assert images.images[image_id][1] == b"\1" * 2048 + b"\0" * 2048
    # image_snapshot while copying, image_uploading with progress while uploading
    assert seen == [("copy", states.IMAGE_SNAPSHOT, None), ("upload", states.IMAGE_UPLOADING, 40)]
    inst = store.get_instance(active)
    assert (inst.vm_state, inst.task_state, inst.progress, inst.fault) == (
        states.ACTIVE, None, None, None)
    op = _op(store, active)
    assert op.status == "done" and op.request_id == ctxt.request_id
    assert [(s.name, s.status) for s in op.steps] == [
        ("prepare", "done"), ("create_image", "done"), ("copy_disk", "done"), ("upload", "done")]
    assert op.steps[1].message == f"image {image_id}"
    assert op.message == f"image {image_id} (live, crash-consistent, raw): fake copy"
    assert notifier.events() == ["compute.instance.snapshot.start",
                                 "compute.instance.snapshot.end"]


@pytest.mark.parametrize("vm_state,then", [
    ("stopped", states.SHUTDOWN), ("suspended", states.SUSPENDED_POWER)])
def test_snapshot_of_stopped_and_suspended_keeps_the_state(manager, store, driver, images,
                                                           ctxt, active, vm_state, then):
    if vm_state == "stopped":
        manager.power_off(ctxt, active, 0)
    else:
        manager.suspend(ctxt, active)
    image_id = _snapshot(manager, ctxt, active)
    inst = store.get_instance(active)
    assert (inst.vm_state, inst.task_state, inst.power_state) == (vm_state, None, then)
    props = images.created[image_id]["properties"]
    assert props["snapshot_mode"] == "cold"
    assert props["snapshot_consistency"] == ("powered-off" if vm_state == "stopped"
                                             else "crash-consistent")
    assert images.status[image_id] == "active"


def test_snapshot_refused_in_other_states_with_the_state_named(manager, store, images, ctxt,
                                                               active):
    store.update_instance(active, vm_state=states.ERROR)
    err = rpc_error(manager.snapshot, ctxt, active, "x")
    assert isinstance(err, exception.InvalidState) and "vm_state=error" in str(err)
    assert images.created == {}
    op = _op(store, active)
    assert op.status == "refused" and "vm_state=error" in op.message


@pytest.mark.parametrize("name", ["", "a\nb", "x" * 256, None, 42])
def test_snapshot_name_is_validated(manager, store, images, ctxt, active, name):
    err = rpc_error(manager.snapshot, ctxt, active, name)
    assert isinstance(err, exception.InvalidArgument) and "'name'" in str(err)
    assert images.created == {}
    assert store.get_instance(active).task_state is None


def test_other_operations_are_refused_while_a_snapshot_runs(manager, store, driver, ctxt,
                                                            active):
    copying, release = threading.Event(), threading.Event()

    def hook(stage):
        if stage == "copy":
            copying.set()
            assert release.wait(10)

    driver.snapshot_hook = hook
    manager.snapshot(ctxt, active, "s")
    assert copying.wait(10)
    try:
        for refused in (lambda: manager.reboot(ctxt, active, "HARD"),
                        lambda: manager.power_off(ctxt, active, 0),
                        lambda: manager.suspend(ctxt, active)):
            refused()
        err = rpc_error(manager.snapshot, ctxt, active, "again")
        assert "task_state=image_snapshot" in str(err)
    finally:
        release.set()
    assert manager.wait_for_background(10)
    refusals = [o for o in store.operations(uuid=active) if o.status == "refused"]
    assert len(refusals) == 4
    assert all("task_state=image_snapshot" in o.message for o in refusals)
    assert driver.methods_called(active).count("hard_reboot") == 0
    assert store.get_instance(active).vm_state == states.ACTIVE


def test_refusal_before_the_image_is_created_is_the_calls_answer(manager, store, driver,
                                                                  images, ctxt, active):
    driver.snapshot_error = exception.InsufficientDiskSpace(
        path="/snaps", purpose="a raw snapshot", needed_mb=300, free_mb=10)
    err = rpc_error(manager.snapshot, ctxt, active, "s")
    assert isinstance(err, exception.InsufficientDiskSpace)
    assert images.created == {}
    inst = store.get_instance(active)  # answered only once the task had ended
    assert (inst.vm_state, inst.task_state, inst.fault) == (states.ACTIVE, None, None)
    op = _op(store, active)
    assert op.status == "failed" and "need 300 MiB, 10 MiB free" in op.message
    assert [(s.name, s.status) for s in op.steps] == [("prepare", "failed")]


def test_upload_failure_deletes_the_image_and_leaves_the_instance_unharmed(
        manager, store, images, notifier, ctxt, active):
    images.fail_upload = exception.ImageUploadFailed(image_id="?", reason="connection reset")
    image_id = _snapshot(manager, ctxt, active)
    assert images.status[image_id] == "deleted"
    inst = store.get_instance(active)
    assert (inst.vm_state, inst.task_state, inst.progress, inst.fault) == (
        states.ACTIVE, None, None, None)
    op = _op(store, active)
    assert op.status == "failed" and "connection reset" in op.message
    assert op.steps[-1].name == "upload" and op.steps[-1].status == "failed"
    priority, payload = notifier.last("compute.instance.snapshot.error")
    assert priority == "error" and payload["vm_state"] == states.ACTIVE


def test_image_deletion_is_retried_while_the_image_service_is_away(
        manager, store, images, ctxt, active, monkeypatch):
    from compute_agent import snapshot_ops
    monkeypatch.setattr(snapshot_ops, "_DISCARD_RETRY_DELAYS", (0.01, 0.01, 0.01))
    images.fail_upload = exception.ImageUploadFailed(image_id="?", reason="gone")
    images.fail_delete = exception.ImageUploadFailed(image_id="?", reason="unreachable")
    attempts = []
    original = type(images).delete

    def delete(image_id):
        attempts.append(image_id)
        if len(attempts) == 3:
            images.fail_delete = None
        original(images, image_id)

    monkeypatch.setattr(images, "delete", delete)
    image_id = _snapshot(manager, ctxt, active)
    for _ in range(200):
        if images.status[image_id] == "deleted":
            break
        threading.Event().wait(0.01)
    assert images.status[image_id] == "deleted" and len(attempts) == 3


def test_a_failed_restore_is_the_one_failure_that_harms(manager, store, driver, images, ctxt,
                                                        active):
    driver.fail_at("copy_disk", exception.RestoreFailed(uuid=active, reason="boom"))
    image_id = _snapshot(manager, ctxt, active)
    inst = store.get_instance(active)
    assert inst.vm_state == states.ERROR and inst.task_state is None
    assert inst.fault.operation == "snapshot" and "boom" in inst.fault.message
    assert images.status[image_id] == "deleted"


def test_interrupted_snapshot_is_recovered_at_start(manager, store, driver, images, ctxt,
                                                    active):
    # What a killed agent leaves: the task set, the operation running after create_image.
    image_id = images.create_image("s", "raw")
    store.update_instance(active, task_state=states.IMAGE_UPLOADING, progress=60)
    op_id = store.start_operation(active, "snapshot", "req-1")
    seq = store.start_step(op_id, "create_image")
    store.finish_step(op_id, seq, "done", f"image {image_id}")
    store.start_step(op_id, "upload")

    manager.reconcile()

    assert ("recover_snapshot", active) in driver.calls
    inst = store.get_instance(active)
    assert (inst.vm_state, inst.task_state, inst.progress, inst.fault) == (
        states.ACTIVE, None, None, None)
    assert images.status[image_id] == "deleted"
    op = _op(store, active)
    assert op.status == "interrupted"
    assert op.message == ("agent restarted during snapshot, during step upload; "
                          "nothing to undo")


def test_snapshot_not_supported_by_a_driver_is_refused_clearly(manager, store, driver, ctxt,
                                                                active, monkeypatch):
    from compute_agent.virt.driver import ComputeDriver
    monkeypatch.setattr(driver, "prepare_snapshot",
                        lambda i, b: ComputeDriver.prepare_snapshot(driver, i, b))
    err = rpc_error(manager.snapshot, ctxt, active, "s")
    assert "Snapshots with this driver is not supported" in str(err)
    assert store.get_instance(active).task_state is None


def test_local_image_service_writes_snapshot_images(tmp_path):
    from compute_agent.image.local import LocalImageService
    service = LocalImageService(str(tmp_path))
    image_id = service.create_image("web-1 backup", "qcow2", min_disk=1,
                                    properties={"instance_uuid": "u"})
    with pytest.raises(exception.ImageNotFound):  # no data yet
        service.show(image_id)
    service.upload(image_id, iter([b"a" * 10, b"b" * 5]), 15)
    meta = service.show(image_id)
    assert (meta.name, meta.disk_format, meta.size, meta.hash_algo) == (
        "web-1 backup", "qcow2", 15, "sha512")
    assert meta.properties == {"instance_uuid": "u"}
    assert b"".join(service.download(image_id)) == b"a" * 10 + b"b" * 5
    service.delete(image_id)
    assert os.listdir(tmp_path) == []
    with pytest.raises(exception.ImageNotFound):
        service.delete(image_id)
