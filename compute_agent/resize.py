"""Resize and cold migration between two agents, orchestrated by the source.

Mixed into ``ComputeManager`` like live_migration.py; host-to-host calls use
the same RPC API addressed to the other host::

    resize(uuid, flavor, dest)        cast to the source (a cold migration
                                      when the flavor is unchanged)
    source: refuse a smaller root/ephemeral disk, dest = this host;
            accept (active or stopped, no task) -> task resize_prep
    1 prep_resize      dest (call): capacity, the instance new there, the
                       image in its cache, an empty instance dir; its record
                       (new flavor, task resize_migrating). A "no" is a
                       refusal: nothing moved.
    2 (resize_migrating) source: clean shutdown (forced after
                       shutdown_timeout), volumes disconnected, VIFs
                       unplugged, the directory moved
                       to <uuid>_resize (the domain stays defined, shut off)
    3 transfer_disks   source -> dest libvirtd: the qcow2 top layer, sparse,
                       through a transient storage pool (cold_migration.py);
                       progress in the record
    4 finish_resize    dest (call, task resize_finish): rebased onto its base,
                       disks grown, XML from the new flavor, VIFs and
                       volumes, started if
                       it ran; vm_state resized there; the source drops its
                       record (the row in ``migrations`` stays)
    A failure in 1-4 rolls back: the destination removes what it made
    (cleanup_resize_at_destination), the source moves <uuid>_resize back and
    starts the guest if it ran.

    confirm_resize(uuid)   on the destination: the source removes its
                           domain and <uuid>_resize (confirm_resize_at_source)
    revert_resize(uuid)    on the destination: destroyed here, then the source
                           takes the record back, moves <uuid>_resize back and
                           starts the guest as it was (finish_revert_resize)

    On this host (allow_resize_same_host): no RPC, no transfer; the disks go
    aside the same way and copies of them become the instance's.

The source's disks are never deleted before confirm. After a restart, an
interrupted resize on the source rolls back the same way (or, if the
destination already runs it, drops its record). A destination restarted
inside prep_resize or finish_resize undoes its side and marks its migration
row rolled_back; the source, which watches that row while it waits on the
call, rolls back at once instead of waiting out the call's timeout.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import oslo_messaging as messaging
from oslo_log import log as logging

from compute_agent import exception, metrics, objects, states
from compute_agent.journal import Journal
from compute_agent.store import now
from compute_agent.virt import migrate_data as md

LOG = logging.getLogger(__name__)
_expected = messaging.expected_exceptions(exception.ComputeAgentError)

ACTION = "resize"
SOURCE, DEST = "source", "destination"
OPERATIONS = (ACTION, "prep_resize", "finish_resize", "cleanup_resize_at_destination",
              "confirm_resize", "revert_resize", "confirm_resize_at_source",
              "finish_revert_resize")


_reason = exception.message_of
# How often a source waiting on the destination's prep or finish asks it how
# its side is going.
DEST_WATCH_INTERVAL = 3.0


def _shrinks(old: objects.Flavor, new: objects.Flavor) -> str | None:
    if new.root_gb < old.root_gb or (old.root_gb and not new.root_gb):
        return f"the root disk would shrink from {old.root_gb} GiB to {new.root_gb} GiB"
    if new.ephemeral_gb < old.ephemeral_gb:
        return (f"the ephemeral disk would shrink from {old.ephemeral_gb} GiB to "
                f"{new.ephemeral_gb} GiB")
    return None


@dataclasses.dataclass
class _Run:
    """One resize as its source runs it."""

    inst: objects.Instance  # as it was before
    new_spec: objects.InstanceSpec
    dest: str
    kind: str  # "resize" or "cold migration"
    was_running: bool
    op_id: int
    journal: Journal
    mig_id: int
    started: float


class ResizeMixin:
    """ComputeManager's resize endpoints (uses what LiveMigrationMixin uses)."""

    # --- the source: the cast ------------------------------------------------------

    def resize(self, ctxt, uuid: str, flavor: dict, dest: str | None = None) -> None:
        with self._context(ctxt, uuid):
            try:
                new = objects.Flavor.from_dict(flavor)
                dest = self.host if dest is None else md.check_host(dest)
                if dest == self.host and not self.conf.allow_resize_same_host:
                    raise exception.InvalidArgument(
                        name="dest", reason="is this host and allow_resize_same_host is off: "
                                            "name another host")
                inst = self.store.get_instance(objects.validate_uuid(uuid))
                shrink = _shrinks(inst.spec.flavor, new)
                if shrink:
                    raise exception.InvalidArgument(
                        name="flavor", reason=f"{shrink}: resize will not shrink a disk, "
                                              f"since it is unsafe")
                inst = self._accept(ctxt, inst.uuid, "resize")
            except (exception.Invalid, exception.NotFound) as exc:
                self._refuse(ctxt, uuid, ACTION, exc)
                return
            run = self._start_resize(ctxt, inst, new, dest)
            if dest == self.host:
                self._resize_same_host(ctxt, run)
            else:
                self._resize(ctxt, run)

    def _start_resize(self, ctxt, inst: objects.Instance, new: objects.Flavor,
                      dest: str) -> _Run:
        op_id = self.store.start_operation(inst.uuid, ACTION, ctxt.request_id)
        kind = "cold migration" if new == inst.spec.flavor else "resize"
        was_running = self._power_state(inst) == states.RUNNING
        mig = self.store.start_migration(
            inst.uuid, SOURCE, self.host, dest, True, ctxt.request_id, "preparing",
            {"kind": kind, "old_flavor": dataclasses.asdict(inst.spec.flavor),
             "new_flavor": dataclasses.asdict(new), "was_running": was_running,
             "vm_state": inst.vm_state, "spec": inst.spec.to_dict()})
        self._notify(ctxt, ACTION, "start", dict(inst.to_dict(), dest=dest))
        LOG.info("%s to %s started", kind, dest)
        return _Run(inst=inst, new_spec=dataclasses.replace(inst.spec, flavor=new), dest=dest,
                    kind=kind, was_running=was_running, op_id=op_id,
                    journal=Journal(self.store, op_id, ACTION), mig_id=mig.id,
                    started=time.monotonic())

    def _resize(self, ctxt, run: _Run) -> None:
        inst, journal, dest = run.inst, run.journal, run.dest
        with self._instance_lock(inst.uuid):
            answered = False
            try:
                with journal.step("prep_resize"):
                    target = self._call_watching_dest(ctxt, run, lambda: (
                        self._peer_api.prep_resize(
                            ctxt, dest, run.new_spec.to_dict(), self.host,
                            {"launched_at": inst.launched_at, "created_at": inst.created_at},
                            timeout=self.conf.long_rpc_timeout)))
                    answered = True
                    target = {"instance_dir": md.check_path(target.get("instance_dir"),
                                                            "instance_dir"),
                              "libvirt_uri": target.get("libvirt_uri"),
                              "has_base": target.get("has_base", True) is not False}
                    if not isinstance(target["libvirt_uri"], str) or \
                            not md._URI_RE.fullmatch(target["libvirt_uri"]):
                        raise exception.InvalidArgument(name="libvirt_uri",
                                                        reason="not a libvirt URI")
            except Exception as exc:
                if answered or not isinstance(exc, exception.ComputeAgentError):
                    # The destination may have prepared (a bad or lost answer):
                    # undo that; cleanup touches only what this request made.
                    try:
                        self._peer_api.cleanup_resize_at_destination(ctxt, dest, inst.uuid,
                                                                     timeout=120)
                    except Exception as rb_exc:
                        LOG.warning("Could not clean up on %s after prep_resize failed: %s",
                                    dest, _reason(rb_exc))
                self._resize_refused(ctxt, run, exc)
                return
            try:
                self._resize_power_off(run)
                self.driver.migrate_disks_aside(inst, journal)
                with journal.step("transfer_disks"):
                    t0 = time.monotonic()
                    moved = self.driver.transfer_disks(inst, journal, target,
                                                       self._resize_progress(inst, run.mig_id))
                    seconds = time.monotonic() - t0
                    journal.event("transfer", f"{moved} bytes in {seconds:.1f}s")
                self.store.update_instance(inst.uuid, task_state=states.RESIZE_FINISH)
                with journal.step("finish_resize"):
                    self._call_watching_dest(ctxt, run, lambda: self._peer_api.finish_resize(
                        ctxt, dest, inst.uuid, run.was_running,
                        timeout=self.conf.long_rpc_timeout))
            except Exception as exc:
                self._resize_rollback(ctxt, run, exc)
                return
            self.store.delete_instance(inst.uuid)
            self._resize_finished(ctxt, run, f"{moved} bytes moved in {seconds:.1f}s",
                                  {"seconds": round(seconds, 2), "bytes": moved})

    def _call_watching_dest(self, ctxt, run: _Run, call):
        """A long call to the destination that is abandoned when the
        destination reports this resize rolled back: it restarted during the
        call, undid its side (see _reconcile_resize), and will never answer."""
        outcome: dict = {}
        done = threading.Event()

        def worker() -> None:
            try:
                outcome["result"] = call()
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc
            finally:
                done.set()
        threading.Thread(target=worker, name=f"resize-call-{run.inst.uuid[:8]}",
                         daemon=True).start()
        while not done.wait(DEST_WATCH_INTERVAL):
            try:
                mig = self._peer_api.get_migration(ctxt, run.dest, run.inst.uuid)
            except Exception:
                continue  # not there yet, or the destination is down: keep waiting
            if mig.get("request_id") == ctxt.request_id and mig.get("role") == DEST and \
                    mig.get("status") in ("rolled_back", "failed"):
                raise exception.ResizeFailed(
                    uuid=run.inst.uuid, dest=run.dest,
                    reason="the destination gave up its side: "
                           f"{(mig.get('details') or {}).get('message', mig.get('status'))}")
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")

    def _resize_same_host(self, ctxt, run: _Run) -> None:
        """allow_resize_same_host: nothing crosses hosts. The disks go aside to
        <uuid>_resize as for another host and copies of them (their top
        layers, reflinked where the file system can) become the instance's
        disks, so the old ones wait for confirm or revert the same way."""
        inst, journal = run.inst, run.journal
        with self._instance_lock(inst.uuid):
            try:
                with journal.step("check_capacity"):
                    reason = self._capacity_refusal(run.new_spec.flavor, leaving=inst.uuid)
                    if reason:
                        raise exception.ResizePreCheckError(uuid=inst.uuid, dest=self.host,
                                                               reason=reason)
            except Exception as exc:
                self._resize_refused(ctxt, run, exc)
                return
            try:
                self._resize_power_off(run)
                self.driver.migrate_disks_aside(inst, journal)
                with journal.step("copy_disks"):
                    t0 = time.monotonic()
                    copied = self.driver.copy_disks_from_aside(inst, journal)
                    seconds = time.monotonic() - t0
                resized = self.store.update_instance(
                    inst.uuid, task_state=states.RESIZE_FINISH,
                    spec=json.dumps(run.new_spec.to_dict()))
                with journal.step("finish_resize"):
                    self.driver.finish_resize_destination(resized, journal, run.was_running)
            except Exception as exc:
                self._resize_rollback(ctxt, run, exc)
                return
            self._settle(resized, states.RESIZED, progress=None)
            self._resize_finished(ctxt, run, f"{copied} bytes copied in {seconds:.1f}s",
                                  {"seconds": round(seconds, 2), "bytes": copied})

    def _resize_error(self, ctxt, run: _Run, failed_step: str | None, message: str) -> None:
        """The resize could not be undone: the instance in error, every file kept."""
        inst = run.inst
        self.store.update_instance(
            inst.uuid, vm_state=states.ERROR, task_state=None, progress=None,
            power_state=self._power_state(inst),
            fault=objects.Fault(ACTION, failed_step, message, now()))
        self.store.finish_operation(run.op_id, "failed", message)
        self.store.update_migration(run.mig_id, "error", {"message": message})
        metrics.observe_operation(ACTION, "failed", time.monotonic() - run.started)
        self._notify(ctxt, ACTION, "error", dict(self._current(inst.uuid), message=message))

    def _resize_power_off(self, run: _Run) -> None:
        self.store.update_instance(run.inst.uuid, task_state=states.RESIZE_MIGRATING)
        self.store.update_migration(run.mig_id, "migrating")
        with run.journal.step("power_off"):
            clean = self.driver.power_off(run.inst, run.journal, self.conf.shutdown_timeout)
            run.journal.event("power_off", "clean shutdown" if clean else
                              f"forced off after {self.conf.shutdown_timeout}s")

    def _resize_refused(self, ctxt, run: _Run, exc: Exception) -> None:
        message = _reason(exc)
        LOG.warning("Resize refused: %s", message)
        self.store.update_instance(run.inst.uuid, task_state=None, progress=None)
        self.store.finish_operation(run.op_id, "refused", message)
        self.store.update_migration(run.mig_id, "refused", {"message": message})
        metrics.observe_operation(ACTION, "refused", time.monotonic() - run.started)
        self._notify(ctxt, ACTION, "error", dict(self._current(run.inst.uuid), message=message))

    def _resize_finished(self, ctxt, run: _Run, how: str, figures: dict) -> None:
        note = f"{run.kind} to {run.dest}: {how}; confirm or revert on {run.dest}"
        self.store.update_migration(run.mig_id, "finished", dict(figures, message=note))
        self.store.finish_operation(run.op_id, "done", note)
        metrics.observe_operation(ACTION, "done", time.monotonic() - run.started)
        LOG.info("Resize finished: %s", note)
        self._notify(ctxt, ACTION, "end", dict(run.inst.to_dict(), host=run.dest,
                                               task_state=None))

    def _resize_progress(self, inst: objects.Instance, mig_id: int):
        def record(done: int, total: int) -> None:
            percent = min(100, done * 100 // max(total, 1))
            self.store.update_instance(inst.uuid, progress=percent)
            self.store.update_migration(mig_id, details={"progress": {
                "bytes_done": done, "bytes_total": total, "percent": percent}})
        return record

    def _restore_source(self, inst: objects.Instance, journal: Journal,
                        was_running: bool) -> None:
        self.driver.restore_from_aside(inst, journal)
        if was_running and self._power_state(inst) != states.RUNNING:
            with journal.step("power_on"):
                self.driver.power_on(inst, journal)

    def _undo_same_host_resize(self, inst: objects.Instance, journal: Journal,
                               original: objects.InstanceSpec, was_running: bool) -> None:
        """Rollback or revert of a resize on this host: the record and the
        domain back to the old flavor, the old disks back from <uuid>_resize."""
        resized = self.store.get_instance(inst.uuid)
        self.store.update_instance(inst.uuid, spec=json.dumps(original.to_dict()))
        self.driver.undo_resize_same_host(resized, dataclasses.replace(resized, spec=original),
                                          journal, was_running)

    def _dest_runs_it(self, ctxt, run: _Run) -> bool | None:
        """After finish_resize was sent: whether the destination has the
        instance resized (True), has not (False), or did not say (None)."""
        try:
            there = self._peer_api.get_instance(ctxt, run.dest, run.inst.uuid)
        except exception.InstanceNotFound:
            return False
        except Exception as exc:
            LOG.warning("Could not ask %s about the instance: %s", run.dest, _reason(exc))
            return None
        return there.get("vm_state") == states.RESIZED

    def _settled_by_dest(self, ctxt, run: _Run, cause: str, failed_step: str | None,
                         unsure: bool = False) -> bool:
        """After finish_resize was sent: settle the resize from what the
        destination says, if that settles it. Resized there -> finished (its
        answer was lost). It cannot be asked, or (``unsure``) it did not clean
        up -> error here, the guest not started. Else False: roll back."""
        runs_there = self._dest_runs_it(ctxt, run)
        if runs_there:
            LOG.warning("%s runs the resized instance though its answer was lost (%s)",
                        run.dest, cause)
            self.store.delete_instance(run.inst.uuid)
            self._resize_finished(ctxt, run, f"finished there, its answer lost ({cause})", {})
            return True
        if runs_there is None or unsure:
            self._resize_error(ctxt, run, failed_step, (
                f"{cause}; it is not known whether {run.dest} runs the guest, so it is not "
                f"started here (it must never run on two hosts): its disks are in "
                f"<uuid>_resize on {self.host}; see {run.dest}, then reset-state"))
            return True
        return False

    def _resize_rollback(self, ctxt, run: _Run, exc: Exception,
                         finish_sent: bool | None = None) -> None:
        """Undo a resize that failed on the source's side of things. Once
        finish_resize was sent, the destination may run the guest even though
        its answer never came: then the resize is finished, and when it cannot
        be asked the guest is not started here either - never on both hosts."""
        inst, journal, dest = run.inst, run.journal, run.dest
        cause = _reason(exc)
        failed_step = journal.current_step
        if finish_sent is None:
            finish_sent = failed_step == "finish_resize"
        if dest != self.host and finish_sent and self._settled_by_dest(ctxt, run, cause,
                                                                       failed_step):
            return
        LOG.warning("Resize to %s failed at step %s: %s; rolling back", dest, failed_step,
                    cause)
        dest_note = ""
        if dest != self.host:
            try:
                with journal.step("cleanup_at_destination"):
                    self._peer_api.cleanup_resize_at_destination(ctxt, dest, inst.uuid,
                                                                 timeout=120)
            except Exception as rb_exc:
                dest_note = f"; {dest} could not clean up: {_reason(rb_exc)}"
                if finish_sent:
                    # Its finish may still be running: the guest may start there.
                    self._settled_by_dest(ctxt, run, cause + dest_note, failed_step,
                                          unsure=True)
                    return
        op_id, mig_id, started = run.op_id, run.mig_id, run.started
        try:
            if dest == self.host:
                self._undo_same_host_resize(inst, journal, run.inst.spec, run.was_running)
            else:
                self._restore_source(inst, journal, run.was_running)
        except Exception as rb_exc:
            self._resize_error(ctxt, run, failed_step, (
                f"{cause}; and rolling back failed: {_reason(rb_exc)} (the disks are in the "
                f"instance directory or <uuid>_resize on {self.host}){dest_note}"))
            return
        message = f"{cause}; rolled back: the instance is on {self.host} as before{dest_note}"
        power = self._power_state(inst)
        self.store.update_instance(
            inst.uuid, vm_state=states.ACTIVE if power == states.RUNNING else states.STOPPED,
            task_state=None, progress=None, power_state=power,
            fault=objects.Fault(ACTION, failed_step, message, now()))
        self.store.finish_operation(op_id, "failed", message)
        self.store.update_migration(mig_id, "failed", {"message": message})
        metrics.observe_operation(ACTION, "failed", time.monotonic() - started)
        self._notify(ctxt, ACTION, "error", dict(self._current(inst.uuid), message=message))

    # --- calls on the destination --------------------------------------------------

    @_expected
    def prep_resize(self, ctxt, instance: dict, source: str, record: dict | None = None) -> dict:
        uuid = instance.get("uuid") if isinstance(instance, dict) else None
        with self._context(ctxt, uuid):
            spec = objects.InstanceSpec.from_dict(instance)
            md.check_host(source, "source")
            if source == self.host:
                raise exception.ResizePreCheckError(uuid=spec.uuid, dest=self.host,
                                                       reason="the source is this host")
            reason = self._capacity_refusal(spec.flavor)
            if reason:
                self.store.start_operation(spec.uuid, "prep_resize", ctxt.request_id,
                                           status="refused", message=reason)
                raise exception.ResizePreCheckError(uuid=spec.uuid, dest=self.host,
                                                       reason=reason)
            inst = self._adopt_incoming(spec, record, states.BUILDING,
                                        states.RESIZE_MIGRATING)
            mig = self.store.start_migration(spec.uuid, DEST, source, self.host, True,
                                             ctxt.request_id, "preparing", {"kind": ACTION})
            try:
                target = self._run_call(ctxt, inst, "prep_resize",
                                        self.driver.prep_resize_destination)
            except Exception as exc:
                self.store.delete_instance(spec.uuid)
                self.store.update_migration(mig.id, "failed", {"message": _reason(exc)})
                raise
            self.store.update_migration(mig.id, "prepared")
            return target

    def _capacity_refusal(self, flavor: objects.Flavor, leaving: str | None = None) -> str | None:
        """Why this host cannot take a guest of ``flavor`` (None if it can);
        ``leaving``: an instance here whose memory the guest replaces."""
        stats = self.driver.host_stats()
        live = [i for i in self.store.list_instances()
                if i.vm_state != states.DELETED and i.uuid != leaving]
        free_mb = (stats.memory_mb - stats.memory_mb_reserved
                   - sum(i.spec.flavor.memory_mb for i in live))
        if flavor.memory_mb > free_mb:
            return (f"not enough memory: the guest needs {flavor.memory_mb} MiB, "
                    f"{max(free_mb, 0)} MiB are free for guests here")
        if flavor.vcpus > stats.vcpus:
            return f"the guest has {flavor.vcpus} vCPUs, this host {stats.vcpus} CPUs"
        return None

    def _resize_incoming(self, uuid: str, task_states: tuple) -> objects.Instance:
        inst = self.store.get_instance(objects.validate_uuid(uuid))
        mig = self.store.get_migration(inst.uuid, DEST)
        if inst.task_state not in task_states or mig is None:
            raise exception.InvalidState(action="finish an incoming resize of", uuid=uuid,
                                         vm_state=inst.vm_state, task_state=inst.task_state)
        return inst

    @_expected
    def finish_resize(self, ctxt, uuid: str, power_on: bool) -> None:
        with self._context(ctxt, uuid):
            inst = self._resize_incoming(uuid, (states.RESIZE_MIGRATING,))
            mig = self.store.get_migration(inst.uuid, DEST)
            self.store.update_instance(inst.uuid, task_state=states.RESIZE_FINISH)
            inst = self.store.get_instance(inst.uuid)

            def body(inst, journal):
                self.driver.finish_resize_destination(inst, journal, bool(power_on))
                self.store.update_instance(inst.uuid, vm_state=states.RESIZED, task_state=None,
                                           fault=None, progress=None, host=self.host,
                                           power_state=self._power_state(inst))
                journal.note = f"arrived from {mig.source}; confirm or revert"
            self._run_call(ctxt, inst, "finish_resize", body)
            self.store.update_migration(mig.id, "finished", {"was_running": bool(power_on)})

    @_expected
    def cleanup_resize_at_destination(self, ctxt, uuid: str) -> None:
        """Remove everything prep/finish_resize made here. Idempotent."""
        with self._context(ctxt, uuid):
            try:
                inst = self._resize_incoming(uuid, (states.RESIZE_MIGRATING,
                                                    states.RESIZE_FINISH))
            except exception.InstanceNotFound:
                return
            mig = self.store.get_migration(inst.uuid, DEST)
            if mig.request_id and mig.request_id != ctxt.request_id:
                LOG.warning("Not cleaning up: the incoming resize here is request %s's, not "
                            "this one's", mig.request_id)
                return

            def body(inst, journal):
                self.driver.cleanup_resize_destination(inst, journal)
                self.store.delete_instance(inst.uuid)
            self._run_call(ctxt, inst, "cleanup_resize_at_destination", body)
            self.store.update_migration(mig.id, "rolled_back")

    def _resize_to_settle(self, uuid: str):
        """The finished resize that confirm or revert settles: (its row, whether
        it stayed on this host)."""
        here = self.store.get_migration(uuid, SOURCE)
        if here is not None and here.dest == self.host and here.status == "finished":
            return here, True
        mig = self.store.get_migration(uuid, DEST)
        if mig is None or mig.status != "finished":
            raise exception.NotFound(what=f"a finished resize of instance {uuid} to this host")
        return mig, False

    def confirm_resize(self, ctxt, uuid: str) -> None:
        """On the destination (cast): the source deletes what it kept."""
        def body(inst, journal):
            mig, same_host = self._resize_to_settle(inst.uuid)
            if same_host:
                self.driver.remove_aside_dir(inst, journal)
            else:
                self.driver.flush_disks(inst, journal)  # before the only other copy goes
                with journal.step("confirm_resize_at_source"):
                    self._peer_api.confirm_resize_at_source(
                        ctxt, mig.source, inst.uuid, timeout=self.conf.long_rpc_timeout)
            self.store.update_migration(mig.id, "confirmed")
            power = self._power_state(inst)
            self._settle(inst, states.ACTIVE if power == states.RUNNING else states.STOPPED)
            journal.note = f"confirmed: nothing of it is left on {mig.source}"
        # A source that cannot be reached leaves the instance resized: confirm again.
        self._cast(ctxt, uuid, "confirm_resize", "confirm_resize", body, keep_vm_state=True)

    def _confirm_before_delete(self, ctxt, inst: objects.Instance, journal: Journal) -> None:
        """Deleting a resized instance confirms the resize first, so that the
        old disks (and the source's shut-off domain) do not outlive it."""
        try:
            mig, same_host = self._resize_to_settle(inst.uuid)
        except exception.NotFound:
            return
        try:
            if same_host:
                self.driver.remove_aside_dir(inst, journal)
            else:
                with journal.step("confirm_resize_at_source"):
                    self._peer_api.confirm_resize_at_source(
                        ctxt, mig.source, inst.uuid, timeout=self.conf.long_rpc_timeout)
            self.store.update_migration(mig.id, "confirmed")
        except Exception as exc:
            LOG.warning("Could not confirm the resize before the delete: %s", _reason(exc))
            journal.event("confirm_resize", f"failed, <uuid>_resize is left on "
                                            f"{mig.source}: {_reason(exc)}")

    def revert_resize(self, ctxt, uuid: str) -> None:
        """On the destination (cast): stopped here, restored on the source, then
        destroyed here - only once the source has it back."""
        def body(inst, journal):
            mig, same_host = self._resize_to_settle(inst.uuid)
            was_running = bool(mig.details.get("was_running"))
            if same_host:
                self._undo_same_host_resize(
                    inst, journal, objects.InstanceSpec.from_dict(mig.details["spec"]),
                    was_running)
                self.store.update_migration(mig.id, "reverted")
                power = self._power_state(inst)
                self._settle(inst, states.ACTIVE if power == states.RUNNING else states.STOPPED)
                journal.note = f"reverted on {self.host} to the old flavor"
                return
            with journal.step("power_off_here"):
                self.driver.power_off(inst, journal, 0)  # its disks are dropped anyway
            with journal.step("finish_revert_resize"):
                self._peer_api.finish_revert_resize(
                    ctxt, mig.source, inst.uuid,
                    {"launched_at": inst.launched_at, "created_at": inst.created_at},
                    timeout=self.conf.long_rpc_timeout)
            with journal.step("destroy_here"):
                self.driver.cleanup_resize_destination(inst, journal)
            self.store.delete_instance(inst.uuid)
            self.store.update_migration(mig.id, "reverted")
            journal.note = f"reverted to {mig.source} ({'running' if was_running else 'stopped'})"
        self._cast(ctxt, uuid, "revert_resize", "revert_resize", body)

    # --- calls on the source after the resize ----------------------------------------

    def _finished_resize_from_here(self, uuid: str):
        mig = self.store.get_migration(objects.validate_uuid(uuid), SOURCE)
        if mig is None or mig.status != "finished":
            raise exception.NotFound(what=f"a finished resize of instance {uuid} from this "
                                          f"host")
        return mig

    @_expected
    def confirm_resize_at_source(self, ctxt, uuid: str) -> None:
        with self._context(ctxt, uuid):
            done = self.store.get_migration(objects.validate_uuid(uuid), SOURCE)
            if done is not None and done.status == "confirmed":
                LOG.info("Resize already confirmed here (a confirm whose answer was lost)")
                return
            mig = self._finished_resize_from_here(uuid)
            old = objects.Flavor.from_dict(mig.details["old_flavor"])
            probe = objects.Instance(
                spec=dataclasses.replace(objects.InstanceSpec.from_dict(mig.details["spec"]),
                                         flavor=old), host=self.host, vm_state=states.STOPPED)
            op_id = self.store.start_operation(uuid, "confirm_resize_at_source",
                                               ctxt.request_id)
            journal = Journal(self.store, op_id, "confirm_resize_at_source")
            with self._instance_lock(uuid):
                try:
                    self.driver.remove_aside(probe, journal)
                except Exception as exc:
                    self.store.finish_operation(op_id, "failed", _reason(exc))
                    raise
            self.store.finish_operation(op_id, "done", "removed <uuid>_resize")
            self.store.update_migration(mig.id, "confirmed")

    @_expected
    def finish_revert_resize(self, ctxt, uuid: str, record: dict | None = None) -> None:
        with self._context(ctxt, uuid):
            mig = self._finished_resize_from_here(uuid)
            spec = objects.InstanceSpec.from_dict(mig.details["spec"])
            was_running = bool(mig.details.get("was_running"))
            inst = objects.Instance(spec=spec, host=self.host,
                                    vm_state=mig.details.get("vm_state", states.STOPPED),
                                    task_state=states.RESIZE_REVERTING)
            self.store.create_instance(inst)
            record = record if isinstance(record, dict) else {}
            times = {k: record[k] for k in ("launched_at", "created_at")
                     if isinstance(record.get(k), str) and len(record[k]) <= 64}
            if times:
                inst = self.store.update_instance(uuid, **times)

            def body(inst, journal):
                self._restore_source(inst, journal, was_running)
                power = self._power_state(inst)
                self._settle(inst, states.ACTIVE if power == states.RUNNING
                             else states.STOPPED, progress=None)
            try:
                self._run_call(ctxt, inst, "finish_revert_resize", body)
            except Exception as exc:
                self.store.update_instance(
                    uuid, vm_state=states.ERROR, task_state=None,
                    fault=objects.Fault("revert_resize", None, _reason(exc), now()))
                raise
            self.store.update_migration(mig.id, "reverted")

    # --- after a restart -------------------------------------------------------------

    def _reconcile_resize(self, ctxt, inst: objects.Instance, op_name: str,
                          reason: str) -> None:
        incoming = self.store.get_migration(inst.uuid, DEST)
        if op_name in ("prep_resize", "finish_resize", "cleanup_resize_at_destination") and \
                incoming is not None and incoming.status in ("preparing", "prepared") and \
                inst.task_state in (states.RESIZE_MIGRATING, states.RESIZE_FINISH):
            # The source's call will never be answered: undo this side (never
            # the source's disks) and say so; the source, watching, rolls back.
            def undo(inst, journal):
                self.driver.cleanup_resize_destination(inst, journal)
                self.store.delete_instance(inst.uuid)
            self._run(ctxt, inst, "cleanup_resize_at_destination", undo, resumed=True)
            undone = not any(i.uuid == inst.uuid for i in self.store.list_instances())
            self.store.update_migration(incoming.id, "rolled_back" if undone else "failed", {
                "message": f"{reason}; " + ("this host's side undone" if undone else
                                            "undoing this host's side failed")})
            return
        if op_name == ACTION and inst.task_state in (states.RESIZE_PREP,
                                                     states.RESIZE_MIGRATING,
                                                     states.RESIZE_FINISH):
            mig = self.store.get_migration(inst.uuid, SOURCE)
            if mig is not None:
                op_id = self.store.start_operation(inst.uuid, ACTION, ctxt.request_id)
                original = dataclasses.replace(
                    inst, spec=objects.InstanceSpec.from_dict(mig.details["spec"]))
                run = _Run(inst=original, new_spec=inst.spec, dest=mig.dest,
                           kind=mig.details.get("kind", ACTION),
                           was_running=bool(mig.details.get("was_running")), op_id=op_id,
                           journal=Journal(self.store, op_id, ACTION), mig_id=mig.id,
                           started=time.monotonic())
                self._resize_rollback(ctxt, run, exception.ComputeAgentError(reason),
                                      finish_sent=inst.task_state == states.RESIZE_FINISH)
                return
        if inst.task_state is None and inst.vm_state != states.BUILDING:
            LOG.info("Reconciled: %s was interrupted, but the instance is %s here now",
                     op_name, inst.vm_state)
            return
        # Keep every file (the source's <uuid>_resize, the destination's copy).
        self.store.update_instance(
            inst.uuid, vm_state=states.ERROR, task_state=None,
            power_state=self._power_state(inst),
            fault=objects.Fault(op_name, None, f"{reason}; nothing was removed", now()))
