"""ComputeManager against the FakeDriver, a real Store and the fake image service."""

from __future__ import annotations

import oslo_messaging as messaging
import pytest

from compute_agent import exception, objects, states
from tests.unit.fake_driver import DESTROY_STEPS, SPAWN_STEPS

UNKNOWN_UUID = "00000000-0000-0000-0000-00000000abcd"


def rpc_error(fn, *args, **kwargs) -> Exception:
    """The exception an ``@expected_exceptions`` endpoint sends back to the caller."""
    with pytest.raises(messaging.ExpectedException) as info:
        fn(*args, **kwargs)
    return info.value.exc_info[1]


def steps(op) -> list[tuple[str, str]]:
    return [(s.name, s.status) for s in op.steps]


@pytest.fixture
def spawned(manager, ctxt, make_spec, notifier, driver):
    """An active instance; the notifier and driver call records start empty."""
    spec = make_spec()
    manager.spawn(ctxt, spec)
    notifier.sent.clear()
    driver.calls.clear()
    return spec["uuid"]


# --- spawn -------------------------------------------------------------------------

def test_spawn(manager, store, driver, ctxt, make_spec):
    spec = make_spec()
    manager.spawn(ctxt, spec)

    inst = store.get_instance(spec["uuid"])
    assert (inst.vm_state, inst.task_state, inst.power_state) == (
        states.ACTIVE, None, states.RUNNING)
    assert inst.host == "h1" and inst.fault is None and inst.launched_at
    assert inst.spec == objects.InstanceSpec.from_dict(spec)
    assert driver.guests == {spec["uuid"]: states.RUNNING}

    (op,) = store.operations(uuid=spec["uuid"])
    assert (op.name, op.status, op.request_id) == ("spawn", "done", ctxt.request_id)
    assert steps(op) == [("check_image", "done")] + [(s, "done") for s in SPAWN_STEPS]


def test_spawn_notifications(manager, notifier, ctxt, make_spec):
    spec = make_spec()
    manager.spawn(ctxt, spec)
    assert notifier.events() == ["compute.instance.spawn.start", "compute.instance.spawn.end"]
    priority, start = notifier.last("compute.instance.spawn.start")
    assert (priority, start["uuid"], start["task_state"]) == ("info", spec["uuid"],
                                                              states.SPAWNING)
    priority, end = notifier.last("compute.instance.spawn.end")
    assert (priority, end["vm_state"], end["power_state"]) == ("info", states.ACTIVE,
                                                               states.RUNNING)
    assert all(sent_ctxt is ctxt for _, sent_ctxt, _, _ in notifier.sent)


@pytest.mark.parametrize("field,value", [
    ("name", "<script>"),
    ("flavor", {"name": "m1.tiny", "vcpus": -1, "memory_mb": 512, "root_gb": 1}),
    ("image", {"id": "../etc/passwd"}),
])
def test_spawn_invalid_spec_is_refused(manager, store, driver, notifier, ctxt, make_spec,
                                       field, value):
    spec = make_spec(**{field: value})
    manager.spawn(ctxt, spec)

    assert store.list_instances() == []
    assert driver.calls == []
    (op,) = store.operations(uuid=spec["uuid"])
    assert (op.name, op.status, op.steps) == ("spawn", "refused", [])
    assert f"field '{field}" in op.message
    assert notifier.events() == ["compute.instance.spawn.error"]
    priority, payload = notifier.last("compute.instance.spawn.error")
    assert priority == "error"
    assert payload == {"uuid": spec["uuid"], "message": op.message}


def test_spawn_with_bad_uuid_is_refused_under_that_string(manager, store, ctxt, make_spec):
    manager.spawn(ctxt, make_spec(uuid="../../etc"))
    assert store.list_instances() == []
    (op,) = store.operations(uuid="../../etc")
    assert op.status == "refused" and "field 'uuid'" in op.message


def test_spawn_not_a_dict_is_refused(manager, store, notifier, ctxt):
    manager.spawn(ctxt, ["not", "a", "spec"])
    assert store.list_instances() == []
    (op,) = store.operations(status="refused")
    assert "field 'instance'" in op.message
    assert notifier.events() == ["compute.instance.spawn.error"]


def test_spawn_with_a_network_the_host_cannot_plug_is_refused(manager, store, driver, ctxt,
                                                              make_spec):
    # The port takes the DHCP server's address (the last usable one of the CIDR).
    spec = make_spec(networks=[{
        "network": {"id": "n1", "bridge": "br0", "cidr": "10.0.0.0/24", "dhcp": True},
        "port": {"id": "p1", "mac": "fa:16:3e:00:00:01", "ip": "10.0.0.254"}}])
    manager.spawn(ctxt, spec)
    assert store.list_instances() == [] and driver.calls == []
    (op,) = store.operations(uuid=spec["uuid"])
    assert op.status == "refused" and "networks[0].port.ip" in op.message
    assert "DHCP server" in op.message


def test_spawn_with_networks_is_accepted(manager, store, ctxt, make_spec):
    spec = make_spec(networks=[{
        "network": {"id": "n1", "bridge": "br0", "cidr": "10.0.0.0/24", "dhcp": True},
        "port": {"id": "p1", "mac": "fa:16:3e:00:00:01", "ip": "10.0.0.5"}}])
    manager.spawn(ctxt, spec)
    assert store.get_instance(spec["uuid"]).vm_state == "active"


def test_spawn_duplicate_uuid_is_refused(manager, store, driver, notifier, ctxt, make_spec,
                                         spawned):
    before = store.get_instance(spawned)
    manager.spawn(ctxt, make_spec(uuid=spawned, name="other-name"))

    assert store.get_instance(spawned) == before
    assert driver.calls == []
    refused, done = store.operations(uuid=spawned)
    assert (refused.name, refused.status, done.status) == ("spawn", "refused", "done")
    assert spawned in refused.message and "already exists" in refused.message
    assert notifier.events() == ["compute.instance.spawn.error"]


def test_spawn_unknown_image_fails_at_check_image(manager, store, driver, notifier, ctxt,
                                                  make_spec):
    spec = make_spec(image={"id": "no-such-image"})
    manager.spawn(ctxt, spec)

    inst = store.get_instance(spec["uuid"])
    assert (inst.vm_state, inst.task_state) == (states.ERROR, None)
    assert (inst.fault.operation, inst.fault.step) == ("spawn", "check_image")
    assert "no-such-image" in inst.fault.message
    assert driver.calls == []
    (op,) = store.operations(uuid=spec["uuid"])
    assert op.status == "failed"
    assert steps(op) == [("check_image", "failed")]
    assert notifier.events() == ["compute.instance.spawn.start",
                                 "compute.instance.spawn.error"]


@pytest.mark.parametrize("step", SPAWN_STEPS)
def test_spawn_driver_failure(manager, store, driver, notifier, ctxt, make_spec, step):
    driver.fail_at(step)
    spec = make_spec()
    manager.spawn(ctxt, spec)

    inst = store.get_instance(spec["uuid"])
    assert (inst.vm_state, inst.task_state, inst.power_state) == (
        states.ERROR, None, states.NOSTATE)
    assert (inst.fault.operation, inst.fault.step) == ("spawn", step)
    assert f"injected failure at {step}" in inst.fault.message
    assert inst.launched_at is None
    assert driver.guests == {}  # the driver removed what it created

    (op,) = store.operations(uuid=spec["uuid"])
    assert op.status == "failed" and f"injected failure at {step}" in op.message
    assert op.last_step.name == step and op.last_step.status == "failed"
    assert all(s.status == "done" for s in op.steps[:-1])

    priority, payload = notifier.last("compute.instance.spawn.error")
    assert priority == "error"
    assert payload["vm_state"] == states.ERROR and payload["fault"]["step"] == step
    assert f"injected failure at {step}" in payload["message"]
    assert "compute.instance.spawn.end" not in notifier.events()


# --- delete ------------------------------------------------------------------------

def test_delete(manager, store, driver, notifier, ctxt, spawned):
    manager.delete(ctxt, spawned)

    inst = store.get_instance(spawned)
    assert (inst.vm_state, inst.task_state, inst.power_state) == (
        states.DELETED, None, states.NOSTATE)
    assert driver.methods_called(spawned) == ["destroy"]
    assert spawned not in driver.guests and spawned not in driver.disks
    op = store.operations(uuid=spawned)[0]
    assert (op.name, op.status) == ("delete", "done")
    assert steps(op) == [(s, "done") for s in DESTROY_STEPS]
    assert notifier.events() == ["compute.instance.delete.start",
                                 "compute.instance.delete.end"]
    _, start = notifier.last("compute.instance.delete.start")
    assert start["task_state"] == states.DELETING


def test_deleted_instance_is_listed_only_on_request(manager, ctxt, spawned):
    manager.delete(ctxt, spawned)
    assert manager.list_instances(ctxt) == []
    assert [i["uuid"] for i in manager.list_instances(ctxt, include_deleted=True)] == [spawned]


def test_delete_unknown_uuid_is_refused(manager, store, driver, notifier, ctxt):
    manager.delete(ctxt, UNKNOWN_UUID)
    assert store.list_instances() == []
    assert driver.calls == []
    (op,) = store.operations(uuid=UNKNOWN_UUID)
    assert (op.name, op.status) == ("delete", "refused")
    assert "not known" in op.message
    assert notifier.events() == ["compute.instance.delete.error"]


@pytest.mark.parametrize("bad", ["../../etc", "", None, 42])
def test_delete_bad_uuid_is_refused(manager, store, driver, ctxt, bad):
    manager.delete(ctxt, bad)
    assert driver.calls == []
    (op,) = store.operations(status="refused")
    assert op.name == "delete" and "uuid" in op.message


def test_delete_while_task_running_is_refused(manager, store, driver, notifier, ctxt,
                                              spawned):
    store.update_instance(spawned, task_state=states.SPAWNING)
    before = store.get_instance(spawned)

    manager.delete(ctxt, spawned)

    assert store.get_instance(spawned) == before
    assert driver.calls == [] and driver.guests[spawned] == states.RUNNING
    op = store.operations(uuid=spawned)[0]
    assert (op.name, op.status) == ("delete", "refused")
    assert "task_state=spawning" in op.message and "vm_state=active" in op.message
    assert notifier.events() == ["compute.instance.delete.error"]


def test_delete_twice_is_refused(manager, store, driver, ctxt, spawned):
    manager.delete(ctxt, spawned)
    driver.calls.clear()
    manager.delete(ctxt, spawned)
    assert driver.calls == []
    op = store.operations(uuid=spawned)[0]
    assert op.status == "refused" and "vm_state=deleted" in op.message


def test_delete_of_error_instance_with_stuck_task_is_allowed(manager, store, driver, ctxt,
                                                             make_spec):
    driver.fail_at("start_domain")
    spec = make_spec()
    manager.spawn(ctxt, spec)
    store.update_instance(spec["uuid"], task_state=states.SPAWNING)  # stuck

    manager.delete(ctxt, spec["uuid"])

    inst = store.get_instance(spec["uuid"])
    assert (inst.vm_state, inst.task_state) == (states.DELETED, None)
    assert "destroy" in driver.methods_called(spec["uuid"])
    assert store.operations(uuid=spec["uuid"])[0].status == "done"


def test_delete_driver_failure_puts_instance_in_error(manager, store, driver, ctxt, spawned):
    driver.fail_at("remove_files")
    manager.delete(ctxt, spawned)
    inst = store.get_instance(spawned)
    assert (inst.vm_state, inst.task_state) == (states.ERROR, None)
    assert (inst.fault.operation, inst.fault.step) == ("delete", "remove_files")

    manager.delete(ctxt, spawned)  # an instance in error can be deleted again
    assert store.get_instance(spawned).vm_state == states.DELETED


def test_get_instance_accepts_uppercase_uuid(manager, ctxt, spawned):
    assert manager.get_instance(ctxt, spawned.upper())["uuid"] == spawned


def test_delete_accepts_uppercase_uuid(manager, store, ctxt, spawned):
    manager.delete(ctxt, spawned.upper())
    assert store.get_instance(spawned).vm_state == states.DELETED


# --- reconcile after a restart -------------------------------------------------------

def interrupted(store, make_spec, op_name: str, steps_done: list[str], running_step: str,
                vm_state: str, task_state: str) -> tuple[str, int]:
    """Leave the store as a crash in the middle of ``op_name`` would."""
    spec = objects.InstanceSpec.from_dict(make_spec())
    store.create_instance(objects.Instance(spec=spec, host="h1", vm_state=vm_state,
                                           task_state=task_state))
    op = store.start_operation(spec.uuid, op_name, "req-before-crash")
    for name in steps_done:
        store.finish_step(op, store.start_step(op, name), "done")
    store.start_step(op, running_step)
    return spec.uuid, op


def test_reconcile_spawn_whose_domain_runs_becomes_active(manager, store, driver,
                                                          make_spec):
    uuid, op = interrupted(store, make_spec, "spawn", ["check_image", "fetch_image",
                           "create_disks", "define_domain"], "start_domain",
                           states.BUILDING, states.SPAWNING)
    driver.add_domain(uuid, states.RUNNING)

    manager.reconcile()

    inst = store.get_instance(uuid)
    assert (inst.vm_state, inst.task_state, inst.power_state) == (
        states.ACTIVE, None, states.RUNNING)
    assert inst.fault is None
    (old,) = store.operations(uuid=uuid)
    assert old.id == op and old.status == "interrupted"
    assert "agent restarted" in old.message
    assert store.operations(status="running") == []


def test_reconcile_spawn_whose_domain_runs_sets_launched_at(manager, store, driver,
                                                            make_spec):
    uuid, _ = interrupted(store, make_spec, "spawn", ["check_image"], "start_domain",
                          states.BUILDING, states.SPAWNING)
    driver.add_domain(uuid, states.RUNNING)
    manager.reconcile()
    assert store.get_instance(uuid).launched_at is not None


@pytest.mark.parametrize("domain", [None, states.SHUTDOWN])
def test_reconcile_spawn_without_running_domain_is_error(manager, store, driver, make_spec,
                                                         domain):
    uuid, _ = interrupted(store, make_spec, "spawn", ["check_image", "fetch_image"],
                          "create_disks", states.BUILDING, states.SPAWNING)
    if domain:
        driver.add_domain(uuid, domain)

    manager.reconcile()

    inst = store.get_instance(uuid)
    assert (inst.vm_state, inst.task_state) == (states.ERROR, None)
    assert inst.power_state == (domain or states.NOSTATE)
    assert (inst.fault.operation, inst.fault.step) == ("spawn", "create_disks")
    assert "agent restarted" in inst.fault.message and "create_disks" in inst.fault.message
    assert driver.methods_called(uuid) == []  # disks are never removed here
    (op,) = store.operations(uuid=uuid)
    assert op.status == "interrupted"
    assert steps(op)[-1] == ("create_disks", "failed")


def test_reconcile_finishes_interrupted_delete(manager, store, driver, notifier, make_spec):
    uuid, op = interrupted(store, make_spec, "delete", [], "destroy_domain",
                           states.ACTIVE, states.DELETING)
    driver.add_domain(uuid, states.RUNNING)
    driver.disks[uuid] = ["disk"]

    manager.reconcile()

    inst = store.get_instance(uuid)
    assert (inst.vm_state, inst.task_state, inst.power_state) == (
        states.DELETED, None, states.NOSTATE)
    assert uuid not in driver.guests and uuid not in driver.disks
    resumed, old = store.operations(uuid=uuid)
    assert (old.id, old.status) == (op, "interrupted")
    assert (resumed.name, resumed.status, resumed.request_id) == (
        "delete", "done", "req-before-crash")
    assert notifier.events() == ["compute.instance.delete.start",
                                 "compute.instance.delete.end"]


def test_reconcile_ignores_finished_operations(manager, store, driver, ctxt, spawned):
    before = store.get_instance(spawned)
    manager.reconcile()
    assert store.get_instance(spawned) == before
    assert [o.status for o in store.operations(uuid=spawned)] == ["done"]
    assert driver.calls == []


def test_reconcile_operation_without_instance_is_just_closed(manager, store):
    op = store.start_operation(UNKNOWN_UUID, "spawn", None)
    manager.reconcile()
    (got,) = store.operations(uuid=UNKNOWN_UUID)
    assert (got.id, got.status) == (op, "interrupted")
    assert "agent restarted" in got.message and "spawn" in got.message
    assert store.list_instances() == []


# --- power states --------------------------------------------------------------------

def test_sync_power_states_fixes_drift(manager, store, driver, spawned):
    driver.guests[spawned] = states.SHUTDOWN
    manager.sync_power_states()
    inst = store.get_instance(spawned)
    assert inst.power_state == states.SHUTDOWN
    assert inst.vm_state == states.ACTIVE  # power state only; vm_state is not guessed


def test_sync_power_states_reports_missing_domain_as_nostate(manager, store, driver,
                                                             spawned):
    del driver.guests[spawned]
    manager.sync_power_states()
    assert store.get_instance(spawned).power_state == states.NOSTATE


def test_sync_power_states_leaves_instances_with_a_task_alone(manager, store, driver,
                                                              spawned):
    store.update_instance(spawned, task_state=states.DELETING)
    driver.guests[spawned] = states.SHUTDOWN
    manager.sync_power_states()
    assert store.get_instance(spawned).power_state == states.RUNNING


def test_sync_power_states_leaves_unknown_domains_alone(manager, store, driver, spawned):
    foreign = "11111111-2222-3333-4444-555555555555"
    driver.add_domain(foreign, states.RUNNING)
    manager.sync_power_states()
    assert driver.guests[foreign] == states.RUNNING
    assert driver.methods_called(foreign) == []
    assert [i.uuid for i in store.list_instances()] == [spawned]


def test_sync_power_states_skips_deleted_instances(manager, store, driver, ctxt, spawned):
    manager.delete(ctxt, spawned)
    driver.add_domain(spawned, states.RUNNING)  # e.g. re-created behind our back
    manager.sync_power_states()
    assert store.get_instance(spawned).power_state == states.NOSTATE


def test_init_host_registers_lifecycle_handler(manager, store, driver, spawned):
    manager.init_host()
    assert driver.on_power_state is not None
    driver.on_power_state(spawned, states.PAUSED)
    assert store.get_instance(spawned).power_state == states.PAUSED
    driver.on_power_state(UNKNOWN_UUID, states.RUNNING)  # unknown: ignored
    assert [i.uuid for i in store.list_instances()] == [spawned]


# --- queries -----------------------------------------------------------------------

def test_get_instance(manager, ctxt, spawned):
    got = manager.get_instance(ctxt, spawned)
    assert (got["uuid"], got["vm_state"], got["power_state"]) == (spawned, states.ACTIVE,
                                                                   states.RUNNING)


def test_get_instance_errors(manager, ctxt):
    assert isinstance(rpc_error(manager.get_instance, ctxt, UNKNOWN_UUID),
                      exception.InstanceNotFound)
    assert isinstance(rpc_error(manager.get_instance, ctxt, "nope"), exception.InvalidSpec)


def test_get_console_output(manager, driver, ctxt, spawned):
    driver.console[spawned] = "one\ntwo\nthree\n"
    assert manager.get_console_output(ctxt, spawned, lines=2) == "two\nthree"


@pytest.mark.parametrize("lines", [0, -1, 10001, "10", None, 1.5])
def test_get_console_output_bad_lines(manager, driver, ctxt, spawned, lines):
    exc = rpc_error(manager.get_console_output, ctxt, spawned, lines=lines)
    assert isinstance(exc, exception.InvalidArgument)
    assert "'lines'" in str(exc)
    assert driver.calls == []


def test_get_console_output_unknown_or_bad_uuid(manager, driver, ctxt):
    assert isinstance(rpc_error(manager.get_console_output, ctxt, UNKNOWN_UUID),
                      exception.InstanceNotFound)
    assert isinstance(rpc_error(manager.get_console_output, ctxt, "../x"),
                      exception.InvalidSpec)
    assert driver.calls == []


def test_get_operations(manager, ctxt, spawned):
    manager.delete(ctxt, spawned)
    ops = manager.get_operations(ctxt, spawned)
    assert [(o["name"], o["status"]) for o in ops] == [("delete", "done"), ("spawn", "done")]
    assert [s["name"] for s in ops[0]["steps"]] == list(DESTROY_STEPS)
    assert len(manager.get_operations(ctxt, spawned, limit=1)) == 1


@pytest.mark.parametrize("limit", [0, -5, 1001, "10", None])
def test_get_operations_bad_limit(manager, ctxt, spawned, limit):
    exc = rpc_error(manager.get_operations, ctxt, spawned, limit=limit)
    assert isinstance(exc, exception.InvalidArgument)
    assert "'limit'" in str(exc)


@pytest.mark.parametrize("method,kwargs", [
    ("get_console_output", {"lines": True}),
    ("get_operations", {"limit": True}),
])
def test_bool_is_not_a_count(manager, ctxt, spawned, method, kwargs):
    exc = rpc_error(getattr(manager, method), ctxt, spawned, **kwargs)
    assert isinstance(exc, exception.InvalidArgument)


def test_get_host_status_counts_live_instances(manager, ctxt, make_spec, spawned):
    other = make_spec(flavor={"name": "m1.big", "vcpus": 4, "memory_mb": 4096,
                              "root_gb": 10})
    manager.spawn(ctxt, other)
    manager.delete(ctxt, other["uuid"])
    status = manager.get_host_status(ctxt)
    assert status["instances"] == 1
    assert status["instances_by_vm_state"] == {states.ACTIVE: 1}
    assert (status["vcpus_used"], status["memory_mb_used"], status["root_gb_used"]) == (
        1, 512, 1)
    assert status["hostname"] == "h1" and status["libvirt_connected"] is True


def test_cache_images_fetches_each_and_reports_failures_separately(manager, driver, images,
                                                                   notifier, ctxt):
    images.add("img-ok")
    manager.cache_images(ctxt, ["img-ok", "no-such-image", "../etc"])
    assert driver.cached == {"img-ok"}
    errors = [payload for _, _, event, payload in notifier.sent
              if event == "compute.instance.cache_image.error"]
    assert [e["image_id"] for e in errors] == ["no-such-image", "../etc"]
    assert "not found" in errors[0]["message"] and "field 'image.id'" in errors[1]["message"]


def test_ageing_keeps_images_of_live_instances(manager, driver, images, ctxt, make_spec):
    images.add("img-live")
    images.add("img-gone")
    live, gone = make_spec(image={"id": "img-live"}), make_spec(image={"id": "img-gone"})
    manager.spawn(ctxt, live)
    manager.spawn(ctxt, gone)
    manager.delete(ctxt, gone["uuid"])
    driver.cached = {"img-live", "img-gone"}
    manager.age_image_cache()
    assert driver.cached == {"img-live"}
