"""Resize and cold migration (compute_agent/resize.py) between two managers:
real stores, FakeDrivers (tests/unit/fake_resize.py: instance directories,
``<uuid>_resize`` and domains in dicts) and an in-process stand-in for the
RPC client that sends every host-to-host call through JSON.

Covered:
- h1 -> h2 with a bigger flavor: the flow's steps, the records, the disks,
  then confirm (the source's leftovers go) or revert (h1 as before, nothing
  on h2); a cold migration of a stopped instance and its revert;
- rollback of a failure at the transfer (source) or at finish (destination);
- refusals before anything moves: a shrinking disk, a destination without
  the memory, a resize to this host while allow_resize_same_host is off;
- a resize on the same host: resize, revert, resize again, confirm; a
  failure while finishing rolls back to the old flavor;
- volumes: disconnected on the source, connected on the destination, and
  back on revert;
- restarts: a destination restarted during finish undoes its side; the
  source, watching the destination during its call, gives up on it and
  rolls back; a source restarted mid-transfer rolls back; one restarted
  while waiting on finish asks the destination: resized there -> finished,
  no answer -> error, the guest not started here;
- lost answers (never a guest on two hosts): finish_resize done on h2 but
  its answer lost -> the resize is finished; lost and h2 silent -> error,
  nothing started on h1; a prep_resize answer rejected or lost -> h2 asked
  to clean up (only the preparing request may);
- get_migration answers carry no volume credentials; the store keeps them;
- a confirm that cannot reach the source leaves the instance resized and
  can be retried; deleting a resized instance confirms first (or records
  that <uuid>_resize was left).
"""

from __future__ import annotations

import inspect
import json
import threading

import oslo_messaging as messaging
import pytest
from oslo_concurrency import lockutils
from oslo_context import context as o_context

from compute_agent import exception, resize, states
from compute_agent.rpc.api import ComputeAPI
from tests.unit.conftest import MINIMAL_SPEC
from tests.unit.fake_migration import connect
from tests.unit.fake_resize import DISK_BYTES, disks_for
from tests.unit.test_live_migration import _manager, unwrap
from tests.unit.test_volume_connection import PASSWORD, iscsi_bdm

TINY = MINIMAL_SPEC["flavor"]  # what make_spec's instances have: root 1 GiB, no ephemeral
BIGGER = {"name": "m1.small", "vcpus": 2, "memory_mb": 1024, "root_gb": 2, "ephemeral_gb": 1}


def timed_out(method: str, host: str) -> str:
    """What the caller of a call that got no answer sees (the Router's)."""
    return f"Timed out waiting for a reply from {host} to {method}"


class Router:
    """ComputeAPI's host-to-host methods, delivered to the addressed manager
    in-process, arguments bound by the real client's signature and sent
    through JSON. ``intercept[method] = fn(host, kwargs)`` answers a method
    instead of its host (e.g. a host that never answers). A method in
    ``unreachable`` times out without reaching its host; one in
    ``answer_lost`` runs there, then times out as if its answer were lost;
    ``rewrite[method] = fn(answer)`` changes an answer on its way back."""

    def __init__(self, managers: dict):
        self.managers = managers
        self.sent: list[tuple[str, str]] = []
        self.intercept: dict = {}
        self.unreachable: set[str] = set()
        self.answer_lost: set[str] = set()
        self.rewrite: dict = {}

    def __getattr__(self, method):
        signature = inspect.signature(getattr(ComputeAPI, method))

        def send(ctxt, host, *args, **kwargs):
            bound = signature.bind(None, ctxt, host, *args, **kwargs).arguments
            params = {k: v for k, v in bound.items()
                      if k not in ("self", "ctxt", "host", "timeout")}
            params = json.loads(json.dumps(params))
            self.sent.append((method, host))
            if method in self.unreachable:
                raise messaging.MessagingTimeout(timed_out(method, host))
            if method in self.intercept:
                return self.intercept[method](host, params)
            if host not in self.managers:
                raise messaging.MessagingTimeout(f"no agent on {host}")
            try:
                result = getattr(self.managers[host], method)(ctxt, **params)
            except messaging.ExpectedException as exc:  # what the RPC server unwraps
                raise exc.exc_info[1] from None
            if method in self.answer_lost:
                raise messaging.MessagingTimeout(timed_out(method, host))
            result = json.loads(json.dumps(result))
            return self.rewrite[method](result) if method in self.rewrite else result
        return send


@pytest.fixture
def hosts(tmp_path, images):
    managers = {h: _manager(tmp_path, h, images) for h in ("h1", "h2")}
    router = Router(managers)
    for m in managers.values():
        m._migration_rpc = router
        # Two agents in one process: the instance locks must be per host.
        m._instance_lock = lambda uuid, m=m: lockutils.lock(f"{m.host}-{uuid}")
    connect(*(m.driver for m in managers.values()), shared=False)
    yield managers["h1"], managers["h2"]
    for m in managers.values():
        m.store.close()


@pytest.fixture
def router(hosts):
    return hosts[0]._peer_api


def _spawn(manager, spec: dict) -> str:
    manager.spawn(o_context.RequestContext(), spec)
    inst = manager.store.get_instance(spec["uuid"])
    assert (inst.vm_state, inst.power_state) == (states.ACTIVE, states.RUNNING)
    return spec["uuid"]


@pytest.fixture
def running(hosts, make_spec):
    return _spawn(hosts[0], make_spec())


def _resize(src, uuid: str, flavor: dict = BIGGER, dest: str | None = "h2"):
    """Cast a resize to ``src`` (it runs to its end here); its operation."""
    src.resize(o_context.RequestContext(), uuid, flavor, dest)
    return _op(src, uuid)


def _op(manager, uuid: str, name: str = "resize"):
    """The latest operation of that name on the instance."""
    return next(o for o in manager.store.operations(uuid=uuid) if o.name == name)


def _steps(op) -> list[str]:
    return [s.name for s in op.steps]


def _assert_in_order(steps: list[str], *names: str) -> None:
    missing = [n for n in names if n not in steps]
    assert not missing, f"{missing} not in {steps}"
    positions = [steps.index(n) for n in names]
    assert positions == sorted(positions), steps


def _assert_not_on(manager, uuid: str) -> None:
    """No record, directory, domain or volume connection of it on that host."""
    with pytest.raises(exception.InstanceNotFound):
        manager.store.get_instance(uuid)
    d = manager.driver
    assert uuid not in d.disks and uuid not in d.aside and uuid not in d.guests
    assert not any(u == uuid for u, _ in d.connected)


def _assert_on_source_as_before(src, uuid: str, flavor: str = "m1.tiny") -> None:
    inst = src.store.get_instance(uuid)
    assert (inst.host, inst.vm_state, inst.task_state, inst.power_state) == \
        ("h1", states.ACTIVE, None, states.RUNNING)
    assert inst.spec.flavor.name == flavor and inst.progress is None
    assert src.driver.disks[uuid] == ["disk"] and uuid not in src.driver.aside
    assert src.driver.guests[uuid] == states.RUNNING


def _running(manager) -> set[str]:
    """The instances whose domain runs on that host."""
    return {u for u, power in manager.driver.guests.items() if power == states.RUNNING}


def _assert_in_error_not_started(src, uuid: str, message: str) -> None:
    """h1 could not tell whether h2 runs the guest: error, nothing started or removed."""
    inst = src.store.get_instance(uuid)
    assert (inst.vm_state, inst.task_state, inst.power_state) == \
        (states.ERROR, None, states.SHUTDOWN)
    assert inst.fault.message == message
    assert _running(src) == set() and src.driver.guests[uuid] == states.SHUTDOWN
    assert src.driver.aside == {uuid: ["disk"]} and uuid not in src.driver.disks
    assert "restore_from_aside" not in src.driver.methods_called(uuid)
    mig = src.store.get_migration(uuid)
    assert (mig.status, mig.details["message"]) == ("error", message)


# --- to another host ---------------------------------------------------------------

def test_resize_to_another_host_then_confirm(hosts, running):
    src, dst = hosts
    launched_at = src.store.get_instance(running).launched_at
    op = _resize(src, running)

    assert op.status == "done", op.message
    assert op.message.startswith(f"resize to h2: {DISK_BYTES} bytes moved")
    assert op.message.endswith("confirm or revert on h2")
    _assert_in_order(_steps(op), "prep_resize", "power_off", "move_instance_dir",
                     "transfer_disks", "finish_resize")
    assert "cleanup_at_destination" not in _steps(op)
    # The instance now lives on h2, resized and running.
    with pytest.raises(exception.InstanceNotFound):
        src.store.get_instance(running)
    inst = dst.store.get_instance(running)
    assert (inst.host, inst.vm_state, inst.task_state, inst.power_state, inst.fault) == \
        ("h2", states.RESIZED, None, states.RUNNING, None)
    assert inst.spec.flavor.name == "m1.small" and inst.spec.flavor.ephemeral_gb == 1
    assert inst.launched_at == launched_at
    assert dst.driver.disks[running] == ["disk", "disk.local"]  # the new ephemeral disk
    assert dst.driver.guests[running] == states.RUNNING
    assert dst.driver.domain_flavor(running) == "m1.small"
    assert [_op(dst, running, n).status for n in ("prep_resize", "finish_resize")] == \
        ["done", "done"]
    # h1 keeps the disks aside and its domain, shut off, until confirm.
    assert src.driver.aside == {running: ["disk"]} and running not in src.driver.disks
    assert src.driver.guests[running] == states.SHUTDOWN
    mig = src.store.get_migration(running)
    assert (mig.role, mig.status, mig.dest) == ("source", "finished", "h2")
    assert mig.details["bytes"] == DISK_BYTES and mig.details["progress"]["percent"] == 100
    mig = dst.store.get_migration(running)
    assert (mig.role, mig.status, mig.source) == ("destination", "finished", "h1")
    assert src.notifier.events()[-2:] == ["compute.instance.resize.start",
                                          "compute.instance.resize.end"]

    dst.confirm_resize(o_context.RequestContext(), running)

    op = _op(dst, running, "confirm_resize")
    assert op.status == "done"
    # The copy is on stable storage before the source's is deleted.
    _assert_in_order(_steps(op), "flush_disks", "confirm_resize_at_source")
    assert _op(src, running, "confirm_resize_at_source").status == "done"
    inst = dst.store.get_instance(running)
    assert (inst.vm_state, inst.task_state, inst.power_state, inst.spec.flavor.name) == \
        (states.ACTIVE, None, states.RUNNING, "m1.small")
    assert dst.driver.disks[running] == ["disk", "disk.local"]
    _assert_not_on(src, running)  # the aside and the shut-off domain are gone
    assert src.store.get_migration(running).status == "confirmed"
    assert dst.store.get_migration(running).status == "confirmed"


def test_resize_to_another_host_then_revert(hosts, running):
    src, dst = hosts
    launched_at = src.store.get_instance(running).launched_at
    assert _resize(src, running).status == "done"

    dst.revert_resize(o_context.RequestContext(), running)

    op = _op(dst, running, "revert_resize")
    assert op.status == "done", op.message
    _assert_in_order(_steps(op), "power_off_here", "finish_revert_resize", "destroy_here")
    _assert_on_source_as_before(src, running)
    assert src.store.get_instance(running).launched_at == launched_at
    assert _op(src, running, "finish_revert_resize").status == "done"
    _assert_not_on(dst, running)
    assert src.store.get_migration(running).status == "reverted"
    assert dst.store.get_migration(running).status == "reverted"


def test_cold_migration_of_a_stopped_instance_and_back(hosts, running):
    src, dst = hosts
    src.power_off(o_context.RequestContext(), running)
    op = _resize(src, running, TINY)

    assert op.status == "done", op.message
    assert op.message.startswith("cold migration to h2")
    inst = dst.store.get_instance(running)
    assert (inst.vm_state, inst.power_state, inst.spec.flavor.name) == \
        (states.RESIZED, states.SHUTDOWN, "m1.tiny")
    assert dst.driver.guests[running] == states.SHUTDOWN  # defined, not started
    assert "start_domain" not in _steps(_op(dst, running, "finish_resize"))

    dst.revert_resize(o_context.RequestContext(), running)

    inst = src.store.get_instance(running)
    assert (inst.vm_state, inst.task_state, inst.power_state) == \
        (states.STOPPED, None, states.SHUTDOWN)
    assert src.driver.disks[running] == ["disk"] and src.driver.aside == {}
    assert src.driver.guests[running] == states.SHUTDOWN
    _assert_not_on(dst, running)


@pytest.mark.parametrize("host, step, fault_step", [
    ("h1", "transfer_disk", "transfer_disk"),  # uploading the disks from h1
    ("h2", "rebase_disk", "finish_resize"),    # finishing on h2
])
def test_a_failure_rolls_back_to_the_source(hosts, router, running, host, step, fault_step):
    src, dst = hosts
    {"h1": src, "h2": dst}[host].driver.fail_at(step)
    op = _resize(src, running)
    # Once finish_resize was sent, h2 is asked first whether it runs the guest
    # (it does not: it failed, so the rollback goes ahead).
    assert (("get_instance", "h2") in router.sent) == (host == "h2")

    assert op.status == "failed"
    assert f"injected failure at {step}; rolled back: the instance is on h1 as before" \
        in op.message, op.message
    _assert_in_order(_steps(op), "power_off", "move_instance_dir", "transfer_disks",
                     "cleanup_at_destination", "restore_instance_dir")
    _assert_on_source_as_before(src, running)
    fault = src.store.get_instance(running).fault
    assert (fault.operation, fault.step) == ("resize", fault_step)
    assert f"injected failure at {step}" in fault.message
    _assert_not_on(dst, running)
    assert _op(dst, running, "cleanup_resize_at_destination").status == "done"
    assert src.store.get_migration(running).status == "failed"
    assert dst.store.get_migration(running).status == "rolled_back"
    assert src.notifier.last("compute.instance.resize.error")[0] == "error"


# --- refused before anything moves ---------------------------------------------------

def _assert_refused(src, dst, router, uuid: str, words: str) -> None:
    op = _op(src, uuid)
    assert op.status == "refused" and words in op.message, op.message
    inst = src.store.get_instance(uuid)
    assert (inst.vm_state, inst.task_state, inst.fault) == (states.ACTIVE, None, None)
    # No driver method of either host was called for it (the spawn aside).
    assert src.driver.methods_called(uuid) == ["spawn"]
    assert dst.driver.methods_called(uuid) == []
    assert src.driver.disks[uuid] == disks_for(inst.spec.flavor) and src.driver.aside == {}
    assert src.driver.guests[uuid] == states.RUNNING
    _assert_not_on(dst, uuid)


def test_a_shrinking_resize_is_refused(hosts, router, make_spec):
    src, dst = hosts
    uuid = _spawn(src, make_spec(flavor=BIGGER))
    _resize(src, uuid, TINY)
    _assert_refused(src, dst, router, uuid, "the root disk would shrink from 2 GiB to 1 GiB")
    assert src.store.get_instance(uuid).spec.flavor.name == "m1.small"
    assert router.sent == [] and src.store.get_migration(uuid) is None


def test_a_destination_without_the_memory_refuses(hosts, router, running, monkeypatch):
    src, dst = hosts
    stats = dst.driver.host_stats()
    stats.memory_mb = 1024  # 512 reserved: 512 MiB free, the new flavor needs 1024
    monkeypatch.setattr(dst.driver, "host_stats", lambda: stats)
    _resize(src, running)
    _assert_refused(src, dst, router, running, "not enough memory: the guest needs 1024 MiB")
    assert router.sent == [("prep_resize", "h2")]
    assert _op(dst, running, "prep_resize").status == "refused"
    assert src.store.get_migration(running).status == "refused"


@pytest.mark.parametrize("dest", ["h1", None])
def test_resize_to_this_host_is_refused_while_the_option_is_off(hosts, router, running, dest):
    src, dst = hosts
    _resize(src, running, BIGGER, dest)
    _assert_refused(src, dst, router, running, "allow_resize_same_host is off")
    assert router.sent == [] and src.store.get_migration(running) is None


# --- on the same host ------------------------------------------------------------------

def test_same_host_resize_revert_then_resize_confirm(hosts, router, running):
    src, _ = hosts
    src.conf.set_override("allow_resize_same_host", True)
    drv = src.driver

    op = _resize(src, running, BIGGER, "h1")
    assert op.status == "done", op.message
    assert op.message.startswith(f"resize to h1: {DISK_BYTES} bytes copied")
    _assert_in_order(_steps(op), "check_capacity", "power_off", "move_instance_dir",
                     "copy_disks", "finish_resize")
    assert "prep_resize" not in _steps(op) and "transfer_disks" not in _steps(op)
    inst = src.store.get_instance(running)
    assert (inst.host, inst.vm_state, inst.task_state, inst.power_state) == \
        ("h1", states.RESIZED, None, states.RUNNING)
    assert inst.spec.flavor.name == "m1.small"
    assert drv.disks[running] == ["disk", "disk.local"] and drv.aside == {running: ["disk"]}
    assert drv.guests[running] == states.RUNNING and drv.domain_flavor(running) == "m1.small"
    mig = src.store.get_migration(running)
    assert (mig.role, mig.source, mig.dest, mig.status) == ("source", "h1", "h1", "finished")
    assert router.sent == []  # nothing crossed hosts

    src.revert_resize(o_context.RequestContext(), running)

    assert _op(src, running, "revert_resize").status == "done"
    _assert_on_source_as_before(src, running)
    assert drv.domain_flavor(running) == "m1.tiny"
    assert src.store.get_migration(running).status == "reverted"

    assert _resize(src, running, BIGGER, "h1").status == "done"
    src.confirm_resize(o_context.RequestContext(), running)

    assert _op(src, running, "confirm_resize").status == "done"
    inst = src.store.get_instance(running)
    assert (inst.vm_state, inst.task_state, inst.power_state, inst.spec.flavor.name) == \
        (states.ACTIVE, None, states.RUNNING, "m1.small")
    assert drv.aside == {} and drv.disks[running] == ["disk", "disk.local"]
    assert drv.guests[running] == states.RUNNING and drv.domain_flavor(running) == "m1.small"
    assert src.store.get_migration(running).status == "confirmed"
    assert router.sent == []


def test_same_host_failure_while_finishing_rolls_back_to_the_old_flavor(hosts, running):
    src, _ = hosts
    src.conf.set_override("allow_resize_same_host", True)
    src.driver.fail_at("grow_disks")  # the first run: the resize's, not the rollback's
    op = _resize(src, running, BIGGER, "h1")

    assert op.status == "failed"
    assert "injected failure at grow_disks; rolled back" in op.message, op.message
    _assert_on_source_as_before(src, running)
    assert src.driver.domain_flavor(running) == "m1.tiny"
    assert src.store.get_instance(running).fault.step == "grow_disks"
    assert src.store.get_migration(running).status == "failed"


# --- volumes ----------------------------------------------------------------------------

def test_volumes_move_with_the_resize_and_back_on_revert(hosts, make_spec):
    src, dst = hosts
    uuid = _spawn(src, make_spec(block_devices=[iscsi_bdm()]))
    assert src.driver.connected == {(uuid, "vol-1")}

    op = _resize(src, uuid)

    assert op.status == "done", op.message
    _assert_in_order(_steps(op), "power_off", "disconnect_volumes", "move_instance_dir")
    assert src.driver.connected == set()
    assert dst.driver.connected == {(uuid, "vol-1")} and dst.driver.attached[uuid] == ["vol-1"]
    assert [b.volume_id for b in dst.store.get_instance(uuid).spec.block_devices] == ["vol-1"]

    dst.revert_resize(o_context.RequestContext(), uuid)

    assert src.driver.connected == {(uuid, "vol-1")}
    assert dst.driver.connected == set()
    inst = src.store.get_instance(uuid)
    assert (inst.vm_state, inst.power_state) == (states.ACTIVE, states.RUNNING)
    assert inst.spec.block_devices[0].connection_data["target_iqn"] == \
        iscsi_bdm()["connection_info"]["data"]["target_iqn"]


# --- restarts ----------------------------------------------------------------------------

def _destination_killed_during_finish(dst, uuid: str, request_id: str) -> None:
    """What a destination killed while finishing leaves in its database."""
    dst.store.update_instance(uuid, task_state=states.RESIZE_FINISH)
    op_id = dst.store.start_operation(uuid, "finish_resize", request_id)
    dst.store.start_step(op_id, "rebase_disk")


def test_destination_restarted_during_finish_undoes_its_side(hosts, running):
    src, dst = hosts
    ctxt = o_context.RequestContext()
    new_spec = dict(src.store.get_instance(running).spec.to_dict(), flavor=BIGGER)
    unwrap(dst.prep_resize, ctxt, new_spec, "h1", {})
    dst.driver.disks[running].append("disk")  # the transfer arrived
    _destination_killed_during_finish(dst, running, ctxt.request_id)

    dst.reconcile()

    _assert_not_on(dst, running)
    assert _op(dst, running, "finish_resize").status == "interrupted"
    assert _op(dst, running, "cleanup_resize_at_destination").status == "done"
    mig = dst.store.get_migration(running)
    assert (mig.status, mig.request_id) == ("rolled_back", ctxt.request_id)
    assert mig.details["message"] == ("agent restarted during finish_resize, during step "
                                      "rebase_disk; this host's side undone")
    assert src.store.get_instance(running).vm_state == states.ACTIVE  # untouched


def test_source_gives_up_on_a_destination_that_undid_its_side(hosts, router, running,
                                                               monkeypatch):
    src, dst = hosts
    monkeypatch.setattr(resize, "DEST_WATCH_INTERVAL", 0.05)
    release, returned = threading.Event(), threading.Event()

    def restart_and_never_answer(host, params):
        # h2 took the call, was killed, and on restart undid its side; the
        # caller's call is never answered (until the test ends).
        request_id = dst.store.get_migration(params["uuid"]).request_id
        _destination_killed_during_finish(dst, params["uuid"], request_id)
        dst.reconcile()
        release.wait(10)
        returned.set()
    router.intercept["finish_resize"] = restart_and_never_answer
    try:
        op = _resize(src, running)
    finally:
        release.set()
    assert returned.wait(5)

    assert op.status == "failed"
    assert "the destination gave up its side: agent restarted during finish_resize" \
        in op.message, op.message
    assert "rolled back: the instance is on h1 as before" in op.message
    assert ("get_migration", "h2") in router.sent
    _assert_on_source_as_before(src, running)
    assert src.store.get_instance(running).fault.step == "finish_resize"
    _assert_not_on(dst, running)
    mig = dst.store.get_migration(running)
    assert (mig.status, mig.request_id) == ("rolled_back", op.request_id)
    assert src.store.get_migration(running).status == "failed"


def test_source_restarted_during_the_transfer_rolls_back(hosts, running):
    src, dst = hosts
    ctxt = o_context.RequestContext()
    inst = src.store.get_instance(running)
    # The destination prepared; the source had moved the disks aside when killed.
    unwrap(dst.prep_resize, ctxt, dict(inst.spec.to_dict(), flavor=BIGGER), "h1", {})
    src.driver.guests[running] = states.SHUTDOWN
    src.driver.aside[running] = src.driver.disks.pop(running)
    src.store.update_instance(running, task_state=states.RESIZE_MIGRATING)
    op_id = src.store.start_operation(running, "resize", ctxt.request_id)
    src.store.start_step(op_id, "transfer_disks")
    src.store.start_migration(running, "source", "h1", "h2", True, ctxt.request_id,
                              "migrating", {"kind": "resize", "was_running": True,
                                            "vm_state": "active",
                                            "spec": inst.spec.to_dict()})

    src.reconcile()

    ops = src.store.operations(uuid=running)
    assert [(o.name, o.status) for o in ops[:2]] == [("resize", "failed"),
                                                      ("resize", "interrupted")]
    assert "agent restarted during resize, during step transfer_disks; rolled back" \
        in ops[0].message
    _assert_on_source_as_before(src, running)
    _assert_not_on(dst, running)
    assert dst.store.get_migration(running).status == "rolled_back"


def _source_killed_during_finish(src, dst, uuid: str) -> None:
    """What h1 killed while waiting on finish_resize leaves in its database,
    h2 having finished it (prep, the transfer and finish all went through)."""
    ctxt = o_context.RequestContext()
    inst = src.store.get_instance(uuid)
    unwrap(dst.prep_resize, ctxt, dict(inst.spec.to_dict(), flavor=BIGGER), "h1", {})
    src.driver.guests[uuid] = states.SHUTDOWN
    src.driver.aside[uuid] = src.driver.disks.pop(uuid)
    dst.driver.disks[uuid] += src.driver.aside[uuid]  # the transfer
    src.store.update_instance(uuid, task_state=states.RESIZE_FINISH)
    op_id = src.store.start_operation(uuid, "resize", ctxt.request_id)
    src.store.start_step(op_id, "finish_resize")
    src.store.start_migration(uuid, "source", "h1", "h2", True, ctxt.request_id,
                              "migrating", {"kind": "resize", "was_running": True,
                                            "vm_state": "active",
                                            "old_flavor": TINY, "new_flavor": BIGGER,
                                            "spec": inst.spec.to_dict()})
    unwrap(dst.finish_resize, ctxt, uuid, True)


def test_source_restarted_during_finish_that_the_destination_finished(hosts, router,
                                                                       running):
    src, dst = hosts
    _source_killed_during_finish(src, dst, running)

    src.reconcile()

    ops = src.store.operations(uuid=running)
    assert [(o.name, o.status) for o in ops[:2]] == [("resize", "done"),
                                                      ("resize", "interrupted")]
    assert "finished there, its answer lost (agent restarted during resize" \
        in ops[0].message, ops[0].message
    with pytest.raises(exception.InstanceNotFound):
        src.store.get_instance(running)
    assert src.store.get_migration(running).status == "finished"
    assert _running(src) == set() and _running(dst) == {running}
    assert src.driver.aside == {running: ["disk"]}  # until confirm
    assert ("cleanup_resize_at_destination", "h2") not in router.sent
    assert dst.store.get_instance(running).vm_state == states.RESIZED


def test_source_restarted_during_finish_with_the_destination_silent(hosts, router, running):
    src, dst = hosts
    _source_killed_during_finish(src, dst, running)
    router.unreachable.add("get_instance")

    src.reconcile()

    op = _op(src, running)
    assert op.status == "failed"
    assert "it is not known whether h2 runs the guest, so it is not started here" \
        in op.message, op.message
    _assert_in_error_not_started(src, running, op.message)
    assert _running(dst) == {running}  # it did run there: one guest, not two
    assert ("cleanup_resize_at_destination", "h2") not in router.sent


# --- lost answers: never a guest on two hosts ------------------------------------------

def test_finish_answer_lost_after_the_destination_finished(hosts, router, running):
    src, dst = hosts
    router.answer_lost.add("finish_resize")
    op = _resize(src, running)

    assert op.status == "done", op.message
    assert op.message == (f"resize to h2: finished there, its answer lost "
                          f"({timed_out('finish_resize', 'h2')}); confirm or revert on h2")
    assert ("get_instance", "h2") in router.sent
    assert ("cleanup_resize_at_destination", "h2") not in router.sent
    # One guest, on h2; h1 has no record and keeps its disks aside until confirm.
    assert _running(src) == set() and _running(dst) == {running}
    with pytest.raises(exception.InstanceNotFound):
        src.store.get_instance(running)
    assert src.driver.guests[running] == states.SHUTDOWN
    assert src.driver.aside == {running: ["disk"]} and running not in src.driver.disks
    assert not {"restore_from_aside", "power_on", "hard_reboot"} & \
        set(src.driver.methods_called(running))
    inst = dst.store.get_instance(running)
    assert (inst.vm_state, inst.task_state, inst.power_state) == \
        (states.RESIZED, None, states.RUNNING)
    assert src.store.get_migration(running).status == "finished"
    assert dst.store.get_migration(running).status == "finished"

    dst.confirm_resize(o_context.RequestContext(), running)  # settles as usual

    assert _op(dst, running, "confirm_resize").status == "done"
    _assert_not_on(src, running)


def test_finish_answer_lost_and_the_destination_silent(hosts, router, running):
    src, dst = hosts
    router.answer_lost.add("finish_resize")  # it ran on h2 ...
    router.unreachable.add("get_instance")   # ... but h2 cannot say so
    op = _resize(src, running)

    assert op.status == "failed"
    assert op.message.startswith(
        f"{timed_out('finish_resize', 'h2')}; it is not known whether h2 runs the "
        f"guest, so it is not started here"), op.message
    assert "its disks are in <uuid>_resize on h1" in op.message
    _assert_in_error_not_started(src, running, op.message)
    assert src.store.get_instance(running).fault.step == "finish_resize"
    assert ("cleanup_resize_at_destination", "h2") not in router.sent
    assert _running(dst) == {running}
    assert dst.store.get_instance(running).vm_state == states.RESIZED
    assert src.notifier.last("compute.instance.resize.error")[0] == "error"


# --- credentials -------------------------------------------------------------------------

def test_get_migration_answers_carry_no_volume_credentials(hosts, router, make_spec):
    src, dst = hosts
    uuid = _spawn(src, make_spec(block_devices=[iscsi_bdm()]))
    assert _resize(src, uuid).status == "done"
    ctxt = o_context.RequestContext()

    answers = {h: router.get_migration(ctxt, h, uuid) for h in ("h1", "h2")}

    assert (answers["h1"]["role"], answers["h2"]["role"]) == ("source", "destination")
    for answer in answers.values():
        assert PASSWORD not in json.dumps(answer)
    spec = answers["h1"]["details"]["spec"]  # the source's row keeps the spec, hidden
    assert spec["flavor"]["name"] == "m1.tiny"
    assert spec["block_devices"][0]["volume_id"] == "vol-1"
    assert spec["block_devices"][0]["connection_info"]["data"] == "<hidden>"
    assert PASSWORD not in json.dumps(router.get_instance(ctxt, "h2", uuid))
    # The store keeps it: the revert reconnects the volume with it.
    stored = src.store.get_migration(uuid).details["spec"]["block_devices"][0]
    assert stored["connection_info"]["data"]["auth_password"] == PASSWORD

    dst.revert_resize(ctxt, uuid)

    assert _op(dst, uuid, "revert_resize").status == "done"
    inst = src.store.get_instance(uuid)
    assert inst.spec.block_devices[0].connection_data["auth_password"] == PASSWORD
    assert src.driver.connected == {(uuid, "vol-1")}


# --- a prep_resize answer the source cannot use ------------------------------------------

@pytest.mark.parametrize("fault, words", [
    ("bad_answer", "Invalid argument 'instance_dir': must be a normalised absolute path"),
    ("answer_lost", timed_out("prep_resize", "h2")),
])
def test_a_rejected_prep_answer_is_undone_at_the_destination(hosts, router, running,
                                                               fault, words):
    src, dst = hosts
    if fault == "bad_answer":
        router.rewrite["prep_resize"] = lambda answer: dict(answer, instance_dir="/fake/../etc")
    else:
        router.answer_lost.add("prep_resize")
    op = _resize(src, running)

    assert op.status == "refused" and words in op.message, op.message
    assert router.sent == [("prep_resize", "h2"), ("cleanup_resize_at_destination", "h2")]
    assert _op(dst, running, "prep_resize").status == "done"  # h2 had prepared ...
    assert _op(dst, running, "cleanup_resize_at_destination").status == "done"
    _assert_not_on(dst, running)  # ... and undid it: no record, no directory
    assert dst.store.get_migration(running).status == "rolled_back"
    _assert_on_source_as_before(src, running)
    assert src.driver.methods_called(running) == ["spawn"]  # nothing moved here
    assert src.store.get_migration(running).status == "refused"
    # h2 takes the next resize.
    router.rewrite.clear()
    router.answer_lost.clear()
    assert _resize(src, running).status == "done"


def test_cleanup_at_destination_leaves_another_requests_resize_alone(hosts, running):
    src, dst = hosts
    preparing = o_context.RequestContext()
    spec = dict(src.store.get_instance(running).spec.to_dict(), flavor=BIGGER)
    unwrap(dst.prep_resize, preparing, spec, "h1", {})

    unwrap(dst.cleanup_resize_at_destination, o_context.RequestContext(), running)

    inst = dst.store.get_instance(running)
    assert (inst.vm_state, inst.task_state) == (states.BUILDING, states.RESIZE_MIGRATING)
    assert running in dst.driver.disks  # its directory
    assert "cleanup_resize_destination" not in dst.driver.methods_called(running)
    assert dst.store.get_migration(running).status == "prepared"
    assert [o.name for o in dst.store.operations(uuid=running)] == ["prep_resize"]

    unwrap(dst.cleanup_resize_at_destination, preparing, running)  # the preparing request's

    _assert_not_on(dst, running)
    assert dst.store.get_migration(running).status == "rolled_back"


# --- confirm and delete ------------------------------------------------------------------

def test_confirm_that_cannot_reach_the_source_can_be_retried(hosts, router, running):
    src, dst = hosts
    assert _resize(src, running).status == "done"
    router.unreachable.add("confirm_resize_at_source")

    dst.confirm_resize(o_context.RequestContext(), running)

    op = _op(dst, running, "confirm_resize")
    assert (op.status, op.message) == ("failed", timed_out("confirm_resize_at_source", "h1"))
    inst = dst.store.get_instance(running)
    assert (inst.vm_state, inst.task_state, inst.power_state, inst.fault) == \
        (states.RESIZED, None, states.RUNNING, None)
    assert src.driver.aside == {running: ["disk"]}
    assert src.driver.guests[running] == states.SHUTDOWN
    assert src.store.get_migration(running).status == "finished"
    assert dst.store.get_migration(running).status == "finished"

    router.unreachable.clear()
    dst.confirm_resize(o_context.RequestContext(), running)

    assert _op(dst, running, "confirm_resize").status == "done"
    inst = dst.store.get_instance(running)
    assert (inst.vm_state, inst.task_state, inst.power_state) == \
        (states.ACTIVE, None, states.RUNNING)
    _assert_not_on(src, running)
    assert src.store.get_migration(running).status == "confirmed"
    assert dst.store.get_migration(running).status == "confirmed"


def test_a_confirm_whose_answer_was_lost_can_be_confirmed_again(hosts, router, running):
    src, dst = hosts
    assert _resize(src, running).status == "done"
    router.answer_lost.add("confirm_resize_at_source")  # h1 confirmed; h2 never heard

    dst.confirm_resize(o_context.RequestContext(), running)

    assert _op(dst, running, "confirm_resize").status == "failed"
    assert src.store.get_migration(running).status == "confirmed"
    router.answer_lost.clear()
    dst.confirm_resize(o_context.RequestContext(), running)

    assert _op(dst, running, "confirm_resize").status == "done"
    assert dst.store.get_instance(running).vm_state == states.ACTIVE
    _assert_not_on(src, running)


def test_a_revert_the_source_cannot_take_keeps_the_disks_here(hosts, router, running):
    src, dst = hosts
    assert _resize(src, running).status == "done"
    router.unreachable.add("finish_revert_resize")

    dst.revert_resize(o_context.RequestContext(), running)

    op = _op(dst, running, "revert_resize")
    assert op.status == "failed" and "finish_revert_resize" in op.message, op.message
    assert "destroy_here" not in _steps(op)
    assert running in dst.driver.disks  # the only running copy was stopped, not removed
    assert dst.driver.guests[running] == states.SHUTDOWN
    assert dst.store.get_instance(running).vm_state == states.ERROR
    assert src.driver.aside == {running: ["disk"]}  # and the source still has its own


def _assert_deleted(manager, uuid: str) -> None:
    inst = manager.store.get_instance(uuid)
    assert (inst.vm_state, inst.task_state, inst.power_state) == \
        (states.DELETED, None, states.NOSTATE)
    d = manager.driver
    assert uuid not in d.disks and uuid not in d.guests and uuid not in d.aside
    assert not any(u == uuid for u, _ in d.connected)


def test_deleting_a_resized_instance_confirms_at_the_source_first(hosts, make_spec):
    src, dst = hosts
    uuid = _spawn(src, make_spec(block_devices=[iscsi_bdm()]))
    assert _resize(src, uuid).status == "done"

    dst.delete(o_context.RequestContext(), uuid)

    op = _op(dst, uuid, "delete")
    assert op.status == "done", op.message
    _assert_in_order(_steps(op), "confirm_resize_at_source", "destroy_domain")
    _assert_deleted(dst, uuid)
    _assert_not_on(src, uuid)  # <uuid>_resize and the shut-off domain are gone
    assert _op(src, uuid, "confirm_resize_at_source").status == "done"
    assert src.store.get_migration(uuid).status == "confirmed"
    assert dst.store.get_migration(uuid).status == "confirmed"


def test_deleting_a_resized_instance_on_the_same_host_removes_the_aside(hosts, router,
                                                                          running):
    src, _ = hosts
    src.conf.set_override("allow_resize_same_host", True)
    assert _resize(src, running, BIGGER, "h1").status == "done"
    assert src.driver.aside == {running: ["disk"]}

    src.delete(o_context.RequestContext(), running)

    op = _op(src, running, "delete")
    assert op.status == "done", op.message
    _assert_in_order(_steps(op), "remove_resize_dir", "destroy_domain")
    _assert_deleted(src, running)
    assert src.store.get_migration(running).status == "confirmed"
    assert router.sent == []


def test_deleting_a_resized_instance_whose_source_cannot_be_reached(hosts, router, running):
    src, dst = hosts
    assert _resize(src, running).status == "done"
    router.unreachable.add("confirm_resize_at_source")

    dst.delete(o_context.RequestContext(), running)

    op = _op(dst, running, "delete")
    assert op.status == "done", op.message
    _assert_deleted(dst, running)
    steps = {s.name: s for s in op.steps}
    assert steps["confirm_resize_at_source"].status == "failed"
    assert (steps["confirm_resize"].status, steps["confirm_resize"].message) == \
        ("done", f"failed, <uuid>_resize is left on h1: "
                 f"{timed_out('confirm_resize_at_source', 'h1')}")
    # Left on h1, as the delete's record says.
    assert src.driver.aside == {running: ["disk"]}
    assert src.store.get_migration(running).status == "finished"
    assert dst.store.get_migration(running).status == "finished"
