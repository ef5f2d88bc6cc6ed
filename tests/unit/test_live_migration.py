"""Live migration between two managers (fake drivers, real stores), wired by an
in-process stand-in for the RPC client that sends everything through JSON."""

from __future__ import annotations

import json

import oslo_messaging as messaging
import pytest
from oslo_concurrency import lockutils
from oslo_config import cfg
from oslo_context import context as o_context

from compute_agent import conf as ca_conf
from compute_agent import exception, states
from compute_agent.manager import ComputeManager
from compute_agent.store import Store
from tests.unit.conftest import FakeNotifier
from tests.unit.fake_driver import FakeDriver
from tests.unit.fake_migration import connect


class Router:
    """ComputeAPI's host-to-host methods, delivered to managers in-process."""

    def __init__(self, managers: dict):
        self.managers = managers
        self.sent: list[tuple[str, str]] = []

    def __getattr__(self, method):
        def send(ctxt, host, *args, timeout=None, **kwargs):
            self.sent.append((method, host))
            target = self.managers[host]
            names = {
                "check_can_live_migrate_destination": ("instance", "source"),
                "pre_live_migration": ("instance", "source", "shared_storage", "record"),
                "post_live_migration_at_destination": ("uuid",),
                "rollback_live_migration_at_destination": ("uuid", "shared_storage"),
            }[method]
            kwargs.update(zip(names, args, strict=False))
            try:
                result = getattr(target, method)(ctxt, **json.loads(json.dumps(kwargs)))
            except messaging.ExpectedException as exc:  # what the RPC server unwraps
                raise exc.exc_info[1] from None
            return json.loads(json.dumps(result))
        return send


def unwrap(fn, *args, **kwargs):
    """Call an RPC method as the server would: expected errors unwrapped."""
    try:
        return fn(*args, **kwargs)
    except messaging.ExpectedException as exc:
        raise exc.exc_info[1] from None


def _manager(tmp_path, host, images):
    c = cfg.ConfigOpts()
    ca_conf.register_opts(c)
    c([], project="test")
    c.set_override("host", host)
    c.set_override("state_path", str(tmp_path / host / "state"))
    c.set_override("instances_path", str(tmp_path / host / "instances"))
    store = Store(str(tmp_path / host / "state"))
    return ComputeManager(c, store, FakeDriver(images, host=host), images, FakeNotifier())


@pytest.fixture
def hosts(tmp_path, images):
    managers = {h: _manager(tmp_path, h, images) for h in ("h1", "h2")}
    router = Router(managers)
    for m in managers.values():
        m._migration_rpc = router
        # Two agents in one process: the instance locks must be per host.
        m._instance_lock = lambda uuid, m=m: lockutils.lock(f"{m.host}-{uuid}")
    connect(*(m.driver for m in managers.values()), shared=True)
    yield managers["h1"], managers["h2"]
    for m in managers.values():
        m.store.close()


@pytest.fixture
def running(hosts, make_spec):
    src, _ = hosts
    spec = make_spec()
    src.spawn(o_context.RequestContext(), spec)
    assert src.store.get_instance(spec["uuid"]).vm_state == states.ACTIVE
    return spec["uuid"]


def _op(manager, uuid, name="live_migration"):
    return next(o for o in manager.store.operations(uuid=uuid) if o.name == name)


def _steps(op):
    return [s.name for s in op.steps]


def test_shared_storage_migration_moves_the_record(hosts, running):
    src, dst = hosts
    ctxt = o_context.RequestContext()
    src.live_migrate(ctxt, running, "h2", False)

    op = _op(src, running)
    assert op.status == "done", op.message
    assert "migrated to h2 (shared storage)" in op.message and "downtime 40 ms" in op.message
    assert _steps(op)[:3] == ["check_source", "check_destination", "storage"]
    assert {"pre_live_migration", "migrate", "post_live_migration_at_destination",
            "remove_domain", "progress"} <= set(_steps(op))
    assert "remove_files" not in _steps(op)  # shared storage: the files stay
    with pytest.raises(exception.InstanceNotFound):
        src.store.get_instance(running)
    inst = dst.store.get_instance(running)
    assert (inst.host, inst.vm_state, inst.task_state, inst.power_state) == \
        ("h2", "active", None, "running")
    assert inst.launched_at and inst.progress is None
    assert running in dst.driver.guests and running not in src.driver.guests
    assert src.driver.lm.storage == set()  # the probe file is gone
    mig_src, mig_dst = src.store.get_migration(running), dst.store.get_migration(running)
    assert (mig_src.role, mig_src.status, mig_src.dest) == ("source", "completed", "h2")
    assert mig_src.details["progress"]["percent"] == 60
    assert mig_src.details["figures"]["downtime_ms"] == 40
    assert (mig_dst.role, mig_dst.status, mig_dst.source) == ("destination", "completed", "h1")
    assert src.notifier.events()[-2:] == ["compute.instance.live_migration.start",
                                          "compute.instance.live_migration.end"]


def test_block_migration_and_back(hosts, running):
    src, dst = hosts
    connect(src.driver, dst.driver, shared=False)
    src.live_migrate(o_context.RequestContext(), running, "h2", True)
    op = _op(src, running)
    assert op.status == "done", op.message
    assert "remove_files" in _steps(op)
    assert running not in src.driver.disks and dst.driver.disks[running] == ["disk"]
    # And back, from the new host.
    dst.live_migrate(o_context.RequestContext(), running, "h1", True)
    assert _op(dst, running).status == "done"
    assert src.store.get_instance(running).host == "h1"
    with pytest.raises(exception.InstanceNotFound):
        dst.store.get_instance(running)


@pytest.mark.parametrize("block, shared, words", [
    (False, False, "not shared with h1: use a block migration"),
    (True, True, "shared with h1: a block migration"),
])
def test_storage_test_refuses_before_anything_moves(hosts, running, block, shared, words):
    src, dst = hosts
    connect(src.driver, dst.driver, shared=shared)
    src.live_migrate(o_context.RequestContext(), running, "h2", block)
    _assert_refused(src, dst, running, words)


def _assert_refused(src, dst, uuid, words):
    op = _op(src, uuid)
    assert op.status == "refused" and words in op.message, op.message
    inst = src.store.get_instance(uuid)
    assert (inst.vm_state, inst.task_state, inst.fault) == ("active", None, None)
    assert uuid in src.driver.guests and uuid not in dst.driver.guests
    with pytest.raises(exception.InstanceNotFound):
        dst.store.get_instance(uuid)
    assert "pre_live_migration" not in dst.driver.methods_called(uuid)
    assert src.store.get_migration(uuid).status == "refused"
    assert src.driver.lm.storage == set() or dst.driver.lm.storage == set()


def test_not_enough_memory_is_refused(hosts, running, monkeypatch):
    src, dst = hosts
    stats = dst.driver.host_stats()
    stats.memory_mb = 1024  # 512 reserved, the guest needs 512 + another guest
    monkeypatch.setattr(dst.driver, "host_stats", lambda: stats)
    dst.spawn(o_context.RequestContext(), dict(src.store.get_instance(running).spec.to_dict(),
                                               uuid="6a1f0c9e-0000-4000-8000-000000000001"))
    src.live_migrate(o_context.RequestContext(), running, "h2", False)
    _assert_refused(src, dst, running, "not enough memory: the guest needs 512 MiB, 0 MiB")


@pytest.mark.parametrize("attr, value, words", [
    ("qemu_version", "6.2.0", "QEMU 6.2.0 here is older than QEMU 7.2.0 on h1"),
    ("virt_type", "qemu", "the guest is a kvm guest; this host runs qemu"),
])
def test_incompatible_destination_is_refused(hosts, running, attr, value, words):
    src, dst = hosts
    setattr(dst.driver.lm, attr, value)
    src.live_migrate(o_context.RequestContext(), running, "h2", False)
    _assert_refused(src, dst, running, words)


def test_same_hypervisor_is_refused(hosts, running):
    src, dst = hosts
    dst.driver.lm.hypervisor_id = src.driver.lm.hypervisor_id
    src.live_migrate(o_context.RequestContext(), running, "h2", False)
    _assert_refused(src, dst, running, "h1 and h2 are the same hypervisor")


def test_unreachable_destination_is_refused(hosts, running):
    src, dst = hosts
    src.live_migrate(o_context.RequestContext(), running, "h3", False)
    op = _op(src, running)
    assert op.status == "refused"
    assert src.store.get_instance(running).task_state is None


def test_suspended_instance_is_refused_with_its_state(hosts, running):
    src, dst = hosts
    src.suspend(o_context.RequestContext(), running)
    src.live_migrate(o_context.RequestContext(), running, "h2", False)
    op = _op(src, running)
    assert op.status == "refused"
    assert "vm_state=suspended" in op.message
    assert src.store.get_instance(running).vm_state == "suspended"
    assert dst.driver.methods_called(running) == []


@pytest.mark.parametrize("dest, block, words", [
    ("h1", False, "'dest': is this host"),
    ("../etc", False, "'dest': must be a host name"),
    ("h2", "yes", "'block_migration': must be a boolean"),
])
def test_bad_arguments_are_refused(hosts, running, dest, block, words):
    src, _ = hosts
    src.live_migrate(o_context.RequestContext(), running, dest, block)
    op = _op(src, running)
    assert op.status == "refused" and words in op.message


def test_failed_migration_rolls_back_both_sides(hosts, running):
    src, dst = hosts
    connect(src.driver, dst.driver, shared=False)
    src.driver.lm.fail = exception.LiveMigrationFailed(uuid=running, dest="h2",
                                                       reason="connection reset")
    src.live_migrate(o_context.RequestContext(), running, "h2", True)
    op = _op(src, running)
    assert op.status == "failed"
    assert "connection reset; rolled back: the guest runs on h1" in op.message
    inst = src.store.get_instance(running)
    assert (inst.vm_state, inst.task_state, inst.host) == ("active", None, "h1")
    assert inst.fault.operation == "live_migration" and inst.fault.step == "migrate"
    assert running in src.driver.guests
    # Nothing of it is left on the destination.
    assert running not in dst.driver.guests and running not in dst.driver.disks
    with pytest.raises(exception.InstanceNotFound):
        dst.store.get_instance(running)
    assert _op(dst, running, "rollback_live_migration_at_destination").status == "done"
    assert dst.store.get_migration(running).status == "rolled_back"
    assert src.store.get_migration(running).status == "failed"


def test_failed_preparation_rolls_back(hosts, running):
    src, dst = hosts
    connect(src.driver, dst.driver, shared=False)
    dst.driver.fail_at("create_disks")
    src.live_migrate(o_context.RequestContext(), running, "h2", True)
    op = _op(src, running)
    assert op.status == "failed" and "injected failure at create_disks" in op.message
    assert src.store.get_instance(running).vm_state == "active"
    assert running not in dst.driver.disks
    with pytest.raises(exception.InstanceNotFound):
        dst.store.get_instance(running)
    assert _op(dst, running, "pre_live_migration").status == "failed"


def test_operator_abort(hosts, running):
    src, dst = hosts
    ctxt = o_context.RequestContext()
    answers = []
    src.driver.lm.during = lambda: answers.append(src.live_migration_abort(ctxt, running))
    src.live_migrate(ctxt, running, "h2", False)
    assert answers == [{"uuid": running, "abort_requested": True}]
    op = _op(src, running)
    assert op.status == "failed" and "aborted: by the operator" in op.message
    inst = src.store.get_instance(running)
    assert (inst.vm_state, inst.task_state, inst.fault) == ("active", None, None)
    assert src.store.get_migration(running).status == "cancelled"
    with pytest.raises(exception.InstanceNotFound):
        dst.store.get_instance(running)


def test_abort_without_a_migration(hosts, running):
    src, _ = hosts
    with pytest.raises(exception.NoLiveMigration):
        unwrap(src.live_migration_abort, o_context.RequestContext(), running)


def test_finishing_at_destination_fails_leaves_error_naming_where_the_guest_is(hosts, running):
    src, dst = hosts
    dst.driver.fail_at("define_domain")
    src.live_migrate(o_context.RequestContext(), running, "h2", False)
    inst = src.store.get_instance(running)
    assert inst.vm_state == "error"
    assert "the guest now runs on h2, but finishing there failed" in inst.fault.message


def test_get_migration(hosts, running):
    src, _ = hosts
    with pytest.raises(exception.NotFound):
        unwrap(src.get_migration, o_context.RequestContext(), running)
    src.live_migrate(o_context.RequestContext(), running, "h2", False)
    mig = src.get_migration(o_context.RequestContext(), running)
    assert mig["status"] == "completed" and mig["dest"] == "h2"


def test_check_can_live_migrate_source_leaves_no_probe(hosts, running):
    src, _ = hosts
    data = src.check_can_live_migrate_source(o_context.RequestContext(), running, False)
    assert data["host_info"]["host"] == "h1"
    assert src.driver.lm.storage == set()


def test_destination_refuses_an_instance_it_knows(hosts, running, make_spec):
    src, dst = hosts
    dst.spawn(o_context.RequestContext(), src.store.get_instance(running).spec.to_dict())
    src.live_migrate(o_context.RequestContext(), running, "h2", False)
    _op_ = _op(src, running)
    assert _op_.status == "refused" and "already known to this host" in _op_.message


def test_rollback_at_destination_never_touches_an_instance_living_there(hosts, running):
    src, _ = hosts
    with pytest.raises(exception.InvalidState):
        unwrap(src.rollback_live_migration_at_destination, o_context.RequestContext(), running)
    assert running in src.driver.guests


# --- reconciliation ---------------------------------------------------------------

def _interrupted_source(src, uuid, dest="h2", shared=True):
    """What a source killed during the migrate step leaves in its database."""
    src.store.update_instance(uuid, task_state=states.MIGRATING)
    op_id = src.store.start_operation(uuid, "live_migration", "req-1")
    src.store.start_step(op_id, "migrate")
    mig = src.store.start_migration(uuid, "source", "h1", dest, not shared, "req-1", "running")
    src.store.update_migration(mig.id, details={"shared_storage": shared})


def _prepared_destination(src, dst, uuid):
    dst.pre_live_migration(o_context.RequestContext(),
                           src.store.get_instance(uuid).spec.to_dict(),
                           src.driver.check_can_live_migrate_source(
                               src.store.get_instance(uuid), False).to_dict(), True)


def test_reconcile_source_guest_still_here_rolls_back(hosts, running):
    src, dst = hosts
    _prepared_destination(src, dst, running)
    _interrupted_source(src, running)
    src.driver.lm.job_running.add(running)
    src.reconcile()
    assert src.driver.lm.aborted == [running]
    inst = src.store.get_instance(running)
    assert (inst.vm_state, inst.task_state) == ("active", None)
    with pytest.raises(exception.InstanceNotFound):
        dst.store.get_instance(running)
    ops = src.store.operations(uuid=running)
    assert ops[0].status == "done" and "rolled back" in ops[0].message
    assert ops[1].status == "interrupted"


def test_reconcile_source_guest_gone_finishes(hosts, running):
    src, dst = hosts
    _prepared_destination(src, dst, running)
    _interrupted_source(src, running)
    dst.driver.guests[running] = src.driver.guests.pop(running)
    src.reconcile()
    with pytest.raises(exception.InstanceNotFound):
        src.store.get_instance(running)
    inst = dst.store.get_instance(running)
    assert (inst.host, inst.vm_state, inst.task_state) == ("h2", "active", None)


def test_reconcile_destination_interrupted_preparation_cleans_up(hosts, running):
    src, dst = hosts
    _prepared_destination(src, dst, running)
    op_id = dst.store.start_operation(running, "pre_live_migration", "req-2")
    dst.store.start_step(op_id, "create_disks")
    dst.reconcile()
    with pytest.raises(exception.InstanceNotFound):
        dst.store.get_instance(running)
    assert "rollback_live_migration_at_destination" in dst.driver.methods_called(running)


def test_reconcile_destination_interrupted_post_finishes(hosts, running):
    src, dst = hosts
    _prepared_destination(src, dst, running)
    dst.driver.guests[running] = states.RUNNING
    op_id = dst.store.start_operation(running, "post_live_migration_at_destination", "req-3")
    dst.store.start_step(op_id, "define_domain")
    dst.reconcile()
    inst = dst.store.get_instance(running)
    assert (inst.vm_state, inst.task_state, inst.host) == ("active", None, "h2")


def test_timeout_abort_is_a_fault_but_the_guest_stays(hosts, running):
    src, dst = hosts
    src.driver.lm.fail = exception.LiveMigrationAborted(
        uuid=running, dest="h2", reason="completion timeout (5.0s for 0.50 GiB at 10s/GiB)")
    src.live_migrate(o_context.RequestContext(), running, "h2", False)
    op = _op(src, running)
    assert op.status == "failed" and "aborted: completion timeout" in op.message
    inst = src.store.get_instance(running)
    assert (inst.vm_state, inst.task_state) == ("active", None)
    assert "completion timeout" in inst.fault.message
    assert src.store.get_migration(running).status == "failed"
    with pytest.raises(exception.InstanceNotFound):
        dst.store.get_instance(running)


def test_error_reported_after_the_guest_left_is_finished_not_rolled_back(hosts, running):
    src, dst = hosts

    def switch_over():  # the guest moves, then libvirt reports an error anyway
        dst.driver.guests[running] = src.driver.guests.pop(running)
    src.driver.lm.during = switch_over
    src.driver.lm.fail = exception.LiveMigrationFailed(uuid=running, dest="h2",
                                                       reason="confirm phase failed")
    src.live_migrate(o_context.RequestContext(), running, "h2", False)
    assert _op(src, running).status == "done"
    assert dst.store.get_instance(running).vm_state == "active"
    assert "rollback_live_migration_at_destination" not in dst.driver.methods_called(running)


def test_a_job_still_running_after_an_error_is_aborted_before_the_rollback(hosts, running):
    src, dst = hosts
    src.driver.lm.during = lambda: src.driver.lm.job_running.add(running)
    src.driver.lm.fail = exception.LiveMigrationFailed(uuid=running, dest="h2",
                                                       reason="connection to libvirtd lost")
    src.live_migrate(o_context.RequestContext(), running, "h2", False)
    assert src.driver.lm.aborted == [running]
    assert _op(src, running).status == "failed"
    assert src.store.get_instance(running).vm_state == "active"
    with pytest.raises(exception.InstanceNotFound):
        dst.store.get_instance(running)
