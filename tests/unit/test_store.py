"""The SQLite store: instance records and the operations journal."""

from __future__ import annotations

import pytest

from compute_agent import exception, objects, states
from compute_agent.journal import Journal
from compute_agent.store import Store


def new_instance(make_spec, **values) -> objects.Instance:
    spec = objects.InstanceSpec.from_dict(make_spec())
    values.setdefault("vm_state", states.BUILDING)
    values.setdefault("task_state", states.SPAWNING)
    return objects.Instance(spec=spec, host="h1", **values)


def test_create_and_get(store, make_spec):
    inst = new_instance(make_spec)
    store.create_instance(inst)
    got = store.get_instance(inst.uuid)
    assert got.spec == inst.spec
    assert (got.host, got.vm_state, got.task_state, got.power_state) == (
        "h1", states.BUILDING, states.SPAWNING, states.NOSTATE)
    assert got.created_at and got.created_at == got.updated_at
    assert got.fault is None and got.launched_at is None


def test_get_unknown_raises_not_found(store):
    with pytest.raises(exception.InstanceNotFound):
        store.get_instance("00000000-0000-0000-0000-000000000000")


def test_list_instances(store, make_spec):
    assert store.list_instances() == []
    a, b = new_instance(make_spec), new_instance(make_spec)
    store.create_instance(a)
    store.create_instance(b)
    assert {i.uuid for i in store.list_instances()} == {a.uuid, b.uuid}


def test_duplicate_create_raises_and_keeps_the_first(store, make_spec):
    inst = new_instance(make_spec)
    store.create_instance(inst)
    twin = objects.Instance(spec=inst.spec, host="other", vm_state=states.ACTIVE)
    with pytest.raises(exception.InstanceExists):
        store.create_instance(twin)
    assert store.get_instance(inst.uuid).host == "h1"
    assert len(store.list_instances()) == 1


def test_update_instance(store, make_spec):
    inst = new_instance(make_spec)
    store.create_instance(inst)
    fault = objects.Fault("spawn", "create_disks", "disk full", "2024-01-01T00:00:00")
    updated = store.update_instance(inst.uuid, vm_state=states.ERROR, task_state=None,
                                    fault=fault)
    assert (updated.vm_state, updated.task_state, updated.fault) == (states.ERROR, None, fault)
    assert store.get_instance(inst.uuid).fault == fault
    assert updated.updated_at >= updated.created_at


def test_update_with_expected_task_state(store, make_spec):
    inst = new_instance(make_spec)
    store.create_instance(inst)
    updated = store.update_instance(inst.uuid, expected_task_state=states.SPAWNING,
                                    vm_state=states.ACTIVE, task_state=None)
    assert (updated.vm_state, updated.task_state) == (states.ACTIVE, None)


def test_update_with_expected_task_state_mismatch_changes_nothing(store, make_spec):
    inst = new_instance(make_spec)
    store.create_instance(inst)
    before = store.get_instance(inst.uuid)
    with pytest.raises(exception.InvalidState) as info:
        store.update_instance(inst.uuid, expected_task_state=None,
                              vm_state=states.ACTIVE, task_state=states.DELETING)
    assert "task_state=spawning" in str(info.value)
    assert store.get_instance(inst.uuid) == before


def test_update_unknown_raises_not_found(store):
    with pytest.raises(exception.InstanceNotFound):
        store.update_instance("00000000-0000-0000-0000-000000000000", vm_state="active")


def test_delete_instance(store, make_spec):
    inst = new_instance(make_spec)
    store.create_instance(inst)
    store.delete_instance(inst.uuid)
    with pytest.raises(exception.InstanceNotFound):
        store.get_instance(inst.uuid)


# --- the journal -----------------------------------------------------------------

UUID = "5b0a3b1c-2f4e-4d6a-8c1b-9e7f6a5d4c3b"


def test_operation_with_steps(store):
    op = store.start_operation(UUID, "spawn", "req-1")
    s1 = store.start_step(op, "fetch_image")
    store.finish_step(op, s1, "done")
    s2 = store.start_step(op, "create_disks")
    assert (s1, s2) == (1, 2)

    (running,) = store.operations(uuid=UUID)
    assert (running.name, running.request_id, running.status) == ("spawn", "req-1", "running")
    assert running.finished_at is None
    assert [(s.name, s.status) for s in running.steps] == [
        ("fetch_image", "done"), ("create_disks", "running")]
    assert running.last_step.name == "create_disks"

    store.finish_step(op, s2, "failed", "disk full")
    store.finish_operation(op, "failed", "disk full")
    (done,) = store.operations(uuid=UUID)
    assert (done.status, done.message) == ("failed", "disk full")
    assert done.finished_at is not None
    assert [(s.name, s.status, s.message) for s in done.steps] == [
        ("fetch_image", "done", None), ("create_disks", "failed", "disk full")]


@pytest.mark.parametrize("op_status,step_status", [
    ("failed", "failed"), ("interrupted", "failed"), ("done", "done")])
def test_finish_operation_closes_running_steps(store, op_status, step_status):
    op = store.start_operation(UUID, "spawn", None)
    store.start_step(op, "start_domain")
    store.finish_operation(op, op_status)
    (got,) = store.operations(uuid=UUID)
    assert got.status == op_status
    assert got.steps[0].status == step_status
    assert got.steps[0].finished_at is not None


def test_operations_filters_and_orders_newest_first(store):
    other = "00000000-0000-0000-0000-000000000001"
    finished = store.start_operation(UUID, "spawn", None)
    store.finish_operation(finished, "done")
    running = store.start_operation(UUID, "delete", None)
    other_running = store.start_operation(other, "spawn", None)
    refused = store.start_operation(UUID, "delete", None, status="refused", message="no")

    assert [o.id for o in store.operations(uuid=UUID)] == [refused, running, finished]
    assert [o.id for o in store.operations(status="running")] == [other_running, running]
    assert [o.id for o in store.operations(uuid=UUID, limit=1)] == [refused]
    (ref,) = store.operations(status="refused")
    assert (ref.message, ref.finished_at is not None) == ("no", True)


def test_step_numbers_are_per_operation(store):
    a = store.start_operation(UUID, "spawn", None)
    b = store.start_operation(UUID, "delete", None)
    assert store.start_step(a, "x") == 1
    assert store.start_step(b, "y") == 1
    assert store.start_step(a, "z") == 2


def test_journal_records_steps(store):
    op = store.start_operation(UUID, "spawn", None)
    journal = Journal(store, op, "spawn")
    with journal.step("fetch_image"):
        pass
    with pytest.raises(RuntimeError), journal.step("create_disks"):
        raise RuntimeError("no space left")
    assert journal.completed == ["fetch_image"]
    assert journal.current_step == "create_disks"  # what the manager puts in the fault
    (got,) = store.operations(uuid=UUID)
    assert [(s.name, s.status, s.message) for s in got.steps] == [
        ("fetch_image", "done", None), ("create_disks", "failed", "no space left")]


def test_data_survives_reopening(tmp_path, make_spec):
    path = str(tmp_path / "state")
    first = Store(path)
    inst = new_instance(make_spec)
    first.create_instance(inst)
    first.update_instance(inst.uuid, vm_state=states.ACTIVE, task_state=None,
                          power_state=states.RUNNING)
    op = first.start_operation(inst.uuid, "spawn", "req-9")
    first.start_step(op, "start_domain")
    first.close()

    second = Store(path)
    try:
        got = second.get_instance(inst.uuid)
        assert (got.vm_state, got.power_state, got.spec) == (states.ACTIVE, states.RUNNING,
                                                             inst.spec)
        (unfinished,) = second.operations(status="running")
        assert (unfinished.id, unfinished.request_id) == (op, "req-9")
        assert unfinished.last_step.name == "start_domain"
    finally:
        second.close()
