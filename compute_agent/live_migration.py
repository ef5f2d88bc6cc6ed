"""Live migration between two agents, orchestrated over RPC by the source.

The RPC methods here are mixed into ``ComputeManager`` (the RPC endpoint);
host-to-host calls use the same API addressed to the other host::

    live_migrate(uuid, dest, block_migration)          cast to the source
    source: accept (vm_state active, no task) -> task_state migrating
    1 checks   source: driver.check_can_live_migrate_source (guest running,
                       no job, its disks; a probe file in instances_path)
               dest:   check_can_live_migrate_destination (call): the
                       instance is new there, hypervisor, versions, virt type,
                       capacity, CPU, the storage test (is the probe visible?)
               Any "no" is a refusal: operation 'refused', instance untouched.
    2 prepare  dest:   pre_live_migration (call): the record (task migrating),
                       instance dir, backing file, disks (block), VIFs,
                       firewall, volumes
    3 migrate  source: driver.live_migration, watched by its monitor; the
                       operator may abort (live_migration_abort)
    4 finish   dest:   post_live_migration_at_destination (call): defined from
                       its config; its record active on that host
               source: driver.post_live_migration_at_source; record removed
    A failure in 2-3 rolls back: the guest runs on the source as before
    (active there) and rollback_live_migration_at_destination (call) removes
    everything the destination made.

Both sides keep a row in the ``migrations`` table (role, peer, status,
progress figures): ``get_migration``. After a restart, ``reconcile`` hands
interrupted migration operations to ``_reconcile_live_migration``.
"""

from __future__ import annotations

import threading
import time

import oslo_messaging as messaging
from oslo_concurrency import lockutils
from oslo_log import log as logging

from compute_agent import exception, metrics, objects, states
from compute_agent.journal import Journal
from compute_agent.store import now
from compute_agent.virt import migrate_data as md

LOG = logging.getLogger(__name__)
_expected = messaging.expected_exceptions(exception.ComputeAgentError)

ACTION = "live_migration"
SOURCE, DEST = "source", "destination"
# Journalled operations of both roles, for reconciliation.
OPERATIONS = (ACTION, "pre_live_migration", "post_live_migration_at_destination",
              "rollback_live_migration_at_destination")
MiB = 1024 * 1024


_reason = exception.message_of


def _mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def _describe(p: md.MigrationProgress) -> str:
    text = (f"{p.percent if p.percent is not None else '?'}%: memory "
            f"{_mib(p.memory_remaining)}/{_mib(p.memory_total)} MiB left")
    if p.disk_total:
        text += f", disk {_mib(p.disk_remaining)}/{_mib(p.disk_total)} MiB left"
    return text + f", {_mib(p.memory_bps + p.disk_bps)} MiB/s"


class LiveMigrationMixin:
    """ComputeManager's live migration endpoints. Uses the manager's store,
    driver, host, _accept/_refuse/_notify/_context/_run/_power_state."""

    # --- plumbing ----------------------------------------------------------------

    @property
    def _peer_api(self):
        """The RPC client for host-to-host calls (built on first use)."""
        api = self.__dict__.get("_migration_rpc")
        if api is None:
            # Imported here: rpc.api imports the manager module.
            from compute_agent import rpc
            from compute_agent.rpc.api import ComputeAPI
            api = self.__dict__["_migration_rpc"] = ComputeAPI(rpc.get_transport(self.conf))
        return api

    @property
    def _abort_events(self) -> dict[str, threading.Event]:
        return self.__dict__.setdefault("_live_migration_aborts", {})

    def _instance_lock(self, uuid: str):
        """The instance's lock, the one ``_run`` takes (one agent per process;
        in-process tests with two managers give each its own)."""
        return lockutils.lock("instance-" + uuid)

    def _run_call(self, ctxt, inst: objects.Instance, action: str, body):
        """Run a host-to-host call's work under the instance lock, journalled;
        errors go back to the caller (the instance is the caller's to settle)."""
        op_id = self.store.start_operation(inst.uuid, action, ctxt.request_id)
        journal = Journal(self.store, op_id, action)
        started = time.monotonic()
        LOG.info("%s started", action)
        with self._instance_lock(inst.uuid):
            try:
                result = body(inst, journal)
            except Exception as exc:
                LOG.error("%s failed at step %s: %s", action, journal.current_step, _reason(exc),
                          exc_info=not isinstance(exc, exception.ComputeAgentError))
                self.store.finish_operation(op_id, "failed", _reason(exc))
                metrics.observe_operation(action, "failed", time.monotonic() - started)
                raise
        self.store.finish_operation(op_id, "done", journal.note)
        metrics.observe_operation(action, "done", time.monotonic() - started)
        LOG.info("%s finished", action)
        return result

    # --- the source: the cast and its flow -------------------------------------

    def live_migrate(self, ctxt, uuid: str, dest: str, block_migration: bool = False) -> None:
        """Move a running instance to ``dest`` (cast, sent to the source)."""
        with self._context(ctxt, uuid):
            try:
                md.check_host(dest)
                if not isinstance(block_migration, bool):
                    raise exception.InvalidArgument(name="block_migration",
                                                    reason=f"must be a boolean, got "
                                                           f"{block_migration!r}"[:200])
                if dest == self.host:
                    raise exception.InvalidArgument(name="dest", reason="is this host")
                inst = self._accept(ctxt, objects.validate_uuid(uuid), "live_migrate")
            except (exception.Invalid, exception.NotFound) as exc:
                self._refuse(ctxt, uuid, ACTION, exc)
                return
            abort = self._abort_events[inst.uuid] = threading.Event()
            try:
                self._live_migration(ctxt, inst, dest, block_migration, abort)
            finally:
                self._abort_events.pop(inst.uuid, None)

    def _live_migration(self, ctxt, inst: objects.Instance, dest: str, block: bool,
                        abort: threading.Event) -> None:
        op_id = self.store.start_operation(inst.uuid, ACTION, ctxt.request_id)
        journal = Journal(self.store, op_id, ACTION)
        mig = self.store.start_migration(inst.uuid, SOURCE, self.host, dest, block,
                                         ctxt.request_id, "checking")
        started = time.monotonic()
        kind = "block migration" if block else "shared storage"
        self._notify(ctxt, ACTION, "start", dict(inst.to_dict(), dest=dest,
                                                 block_migration=block))
        LOG.info("Live migration to %s (%s) started", dest, kind)
        with self._instance_lock(inst.uuid):
            # 1: checks on both sides. A "no" is a refusal: nothing moved.
            source_data = None
            try:
                with journal.step("check_source"):
                    source_data = self.driver.check_can_live_migrate_source(inst, block)
                with journal.step("check_destination"):
                    dest_data = md.DestCheckData.from_dict(
                        self._peer_api.check_can_live_migrate_destination(
                            ctxt, dest, inst.spec.to_dict(), source_data.to_dict()))
                    journal.event("storage", "shared" if dest_data.shared_storage
                                  else "not shared")
            except Exception as exc:
                self._live_migration_refused(ctxt, inst, op_id, mig.id, exc, started)
                return
            finally:
                if source_data is not None:
                    self.driver.cleanup_live_migration_source_check(source_data)
            shared = dest_data.shared_storage
            self.store.update_migration(mig.id, "preparing", {"shared_storage": shared})

            # 2-3: prepare the destination, migrate. A failure rolls back.
            try:
                self._check_abort(abort, inst, dest)
                with journal.step("pre_live_migration"):
                    prepared = md.DestPrepared.from_dict(self._peer_api.pre_live_migration(
                        ctxt, dest, inst.spec.to_dict(), source_data.to_dict(), shared,
                        {"launched_at": inst.launched_at, "created_at": inst.created_at},
                        timeout=self.conf.long_rpc_timeout), inst.uuid)
                self._check_abort(abort, inst, dest)
                self.store.update_migration(mig.id, "running")
                with journal.step("migrate"):
                    self.driver.live_migration(inst, journal, dest_data, prepared, block,
                                               self._progress_recorder(inst, journal, mig.id),
                                               abort)
            except Exception as exc:
                self._live_migration_rollback(ctxt, inst, journal, op_id, mig.id, dest, shared,
                                              exc, started)
                return

            # 4: the guest runs on the destination: finish there, clean up here.
            self._finish_live_migration(ctxt, inst, journal, op_id, mig.id, dest, shared,
                                        started)

    def _finish_live_migration(self, ctxt, inst: objects.Instance, journal: Journal,
                               op_id: int, mig_id: int, dest: str, shared: bool,
                               started: float) -> None:
        self.store.update_migration(mig_id, "finishing")
        try:
            with journal.step("post_live_migration_at_destination"):
                figures = md.MigrationFigures.from_dict(
                    self._peer_api.post_live_migration_at_destination(
                        ctxt, dest, inst.uuid, timeout=self.conf.long_rpc_timeout))
        except Exception as exc:
            message = (f"the guest now runs on {dest}, but finishing there failed: "
                       f"{_reason(exc)}; restarting this agent retries it")
            self._live_migration_error(ctxt, inst, journal, op_id, mig_id, message, started)
            return
        cleanup = ""
        try:
            self.driver.post_live_migration_at_source(inst, journal, shared)
        except Exception as exc:
            LOG.exception("Cleaning up on the source after the migration failed")
            cleanup = f"; clean-up on {self.host} incomplete: {_reason(exc)}"
        self.store.delete_instance(inst.uuid)
        kind = "shared storage" if shared else "block migration"
        note = f"migrated to {dest} ({kind}): {figures.summary() or 'no figures'}{cleanup}"
        self.store.update_migration(mig_id, "completed", {"figures": figures.to_dict(),
                                                          "message": note})
        self.store.finish_operation(op_id, "done", note)
        metrics.observe_operation(ACTION, "done", time.monotonic() - started)
        LOG.info("Live migration finished: %s", note)
        self._notify(ctxt, ACTION, "end", dict(inst.to_dict(), host=dest, task_state=None))

    @staticmethod
    def _check_abort(abort: threading.Event, inst: objects.Instance, dest: str) -> None:
        if abort.is_set():
            raise exception.LiveMigrationAborted(uuid=inst.uuid, dest=dest,
                                                 reason=md.OPERATOR_ABORT)

    def _progress_recorder(self, inst: objects.Instance, journal: Journal, mig_id: int):
        """The monitor's callback: percent in the record, figures in the
        migration row, a journal event every 10 percent."""
        last = {"decile": -1}

        def record(p: md.MigrationProgress) -> None:
            self.store.update_instance(inst.uuid, progress=p.percent)
            self.store.update_migration(mig_id, details={"progress": p.to_dict()})
            if p.percent is not None and p.percent // 10 > last["decile"]:
                last["decile"] = p.percent // 10
                journal.event("progress", _describe(p))
        return record

    def _live_migration_refused(self, ctxt, inst: objects.Instance, op_id: int, mig_id: int,
                                exc: Exception, started: float) -> None:
        message = _reason(exc)
        LOG.warning("Live migration refused: %s", message)
        self.store.update_instance(inst.uuid, task_state=None, progress=None)
        self.store.finish_operation(op_id, "refused", message)
        self.store.update_migration(mig_id, "refused", {"message": message})
        metrics.observe_operation(ACTION, "refused", time.monotonic() - started)
        self._notify(ctxt, ACTION, "error", dict(self._current(inst.uuid), message=message))

    def _live_migration_rollback(self, ctxt, inst: objects.Instance, journal: Journal,
                                 op_id: int, mig_id: int, dest: str, shared: bool,
                                 exc: Exception, started: float) -> None:
        """The guest did not leave: it runs here as before; the destination
        removes everything it made."""
        cause = _reason(exc)
        # An abort the operator asked for is no fault; a timeout's abort is.
        cancelled = (isinstance(exc, exception.LiveMigrationAborted)
                     and exc.kwargs.get("reason") == md.OPERATOR_ABORT)
        LOG.warning("Live migration to %s failed at step %s: %s; rolling back", dest,
                    journal.current_step, cause)
        failed_step = journal.current_step
        try:
            where = self.driver.live_migration_source_state(inst)
            if where == "migrating":  # the call failed but libvirt's job goes on: stop it
                self.driver.live_migration_abort_job(inst)
                where = self._wait_job_end(inst)
        except Exception as state_exc:
            LOG.warning("Could not tell where the guest is: %s", _reason(state_exc))
            where = "unknown"
        if failed_step == "migrate" and where == "gone":
            # The call failed but the guest left (e.g. an error after the switch-over).
            LOG.warning("The migration reported %r but the guest has left; finishing", cause)
            self._finish_live_migration(ctxt, inst, journal, op_id, mig_id, dest, shared,
                                        started)
            return
        try:
            self.driver.rollback_live_migration_at_source(inst, journal)
        except Exception as rb_exc:
            message = f"{cause}; and then: {_reason(rb_exc)}"
            self._live_migration_error(ctxt, inst, journal, op_id, mig_id, message, started)
            return
        dest_note = ""
        try:
            with journal.step("rollback_at_destination"):
                self._peer_api.rollback_live_migration_at_destination(ctxt, dest, inst.uuid,
                                                                      shared)
        except Exception as rb_exc:
            LOG.error("The destination could not roll back: %s", _reason(rb_exc))
            dest_note = f"; {dest} could not clean up: {_reason(rb_exc)}"
        message = f"{cause}; rolled back: the guest runs on {self.host}{dest_note}"
        fault = None if cancelled else objects.Fault(ACTION, failed_step, message, now())
        self.store.update_instance(inst.uuid, vm_state=states.ACTIVE, task_state=None,
                                   progress=None, power_state=self._power_state(inst),
                                   fault=fault)
        self.store.finish_operation(op_id, "failed", message)
        self.store.update_migration(mig_id, "cancelled" if cancelled else "failed",
                                    {"message": message})
        metrics.observe_operation(ACTION, "failed", time.monotonic() - started)
        self._notify(ctxt, ACTION, "error", dict(self._current(inst.uuid), message=message))

    def _live_migration_error(self, ctxt, inst: objects.Instance, journal: Journal, op_id: int,
                              mig_id: int, message: str, started: float) -> None:
        """Neither finished nor rolled back: error, with where the guest is."""
        LOG.error("Live migration: %s", message)
        self.store.update_instance(
            inst.uuid, vm_state=states.ERROR, task_state=None, progress=None,
            power_state=self._power_state(inst),
            fault=objects.Fault(ACTION, journal.current_step, message, now()))
        self.store.finish_operation(op_id, "failed", message)
        self.store.update_migration(mig_id, "error", {"message": message})
        metrics.observe_operation(ACTION, "failed", time.monotonic() - started)
        self._notify(ctxt, ACTION, "error", dict(self._current(inst.uuid), message=message))

    # --- calls on the source ---------------------------------------------------

    @_expected
    def live_migration_abort(self, ctxt, uuid: str) -> dict:
        """Abort this host's running live migration of the instance (the
        monitor aborts the libvirt job within half a second)."""
        with self._context(ctxt, uuid):
            uuid = objects.validate_uuid(uuid)
            event = self._abort_events.get(uuid)
            if event is None:
                raise exception.NoLiveMigration(uuid=uuid)
            LOG.warning("The operator asked to abort the live migration")
            event.set()
            return {"uuid": uuid, "abort_requested": True}

    @_expected
    def check_can_live_migrate_source(self, ctxt, uuid: str,
                                      block_migration: bool = False) -> dict:
        """Could the instance leave this host now? (For a scheduler; the
        storage test itself runs inside live_migrate.)"""
        with self._context(ctxt, uuid):
            inst = self.store.get_instance(objects.validate_uuid(uuid))
            if not states.check_allowed("live_migrate", inst.vm_state, inst.task_state):
                raise exception.InvalidState(action="live_migrate", uuid=uuid,
                                             vm_state=inst.vm_state, task_state=inst.task_state)
            data = self.driver.check_can_live_migrate_source(inst, bool(block_migration))
            self.driver.cleanup_live_migration_source_check(data)
            return data.to_dict()

    @_expected
    def get_migration(self, ctxt, uuid: str) -> dict:
        """The latest live migration of the instance on this host, either role."""
        with self._context(ctxt, uuid):
            mig = self.store.get_migration(objects.validate_uuid(uuid))
            if mig is None:
                raise exception.NotFound(what=f"a live migration of instance {uuid}")
            answer = mig.to_dict()
            if isinstance(answer["details"].get("spec"), dict):  # a resize keeps the spec
                answer["details"] = dict(answer["details"], spec=objects.hide_volume_credentials(
                    answer["details"]["spec"]))
            return answer

    # --- calls on the destination ------------------------------------------------

    @_expected
    def check_can_live_migrate_destination(self, ctxt, instance: dict, source: dict) -> dict:
        uuid = instance.get("uuid") if isinstance(instance, dict) else None
        with self._context(ctxt, uuid):
            spec = objects.InstanceSpec.from_dict(instance)
            src = md.SourceCheckData.from_dict(source)
            try:
                data = self._check_destination(spec, src)
            except exception.MigrationPreCheckError as exc:
                LOG.info("Refusing the live migration from %s: %s", src.host_info.host, exc)
                self.store.start_operation(spec.uuid, "check_can_live_migrate_destination",
                                           ctxt.request_id, status="refused", message=str(exc))
                raise
            storage = "shared" if data.shared_storage else "not shared"
            self.store.start_operation(spec.uuid, "check_can_live_migrate_destination",
                                       ctxt.request_id, status="done",
                                       message=f"from {src.host_info.host}: storage {storage}")
            return data.to_dict()

    def _check_destination(self, spec: objects.InstanceSpec,
                           src: md.SourceCheckData) -> md.DestCheckData:
        def refuse(reason: str):
            raise exception.MigrationPreCheckError(uuid=spec.uuid, dest=self.host, reason=reason)

        theirs = src.host_info
        try:
            self.store.get_instance(spec.uuid)
            refuse("the instance is already known to this host")
        except exception.InstanceNotFound:
            pass
        if theirs.host == self.host:
            refuse("the source is this host")
        mine = self.driver.live_migration_host_info()
        LOG.debug("Checking a live migration from %s: theirs %s, mine %s", theirs.host,
                  theirs, mine)
        if theirs.hypervisor_id == mine.hypervisor_id:
            refuse(f"{theirs.host} and {self.host} are the same hypervisor")
        if theirs.virt_type != mine.virt_type:
            refuse(f"the guest is a {theirs.virt_type} guest; this host runs {mine.virt_type}")
        for what, here, there in (("QEMU", mine.qemu_version, theirs.qemu_version),
                                  ("libvirt", mine.libvirt_version, theirs.libvirt_version)):
            if md.version_tuple(here) < md.version_tuple(there):
                refuse(f"{what} {here} here is older than {what} {there} on {theirs.host}")
        stats = self.driver.host_stats()
        live = [i for i in self.store.list_instances() if i.vm_state != states.DELETED]
        free_mb = (stats.memory_mb - stats.memory_mb_reserved
                   - sum(i.spec.flavor.memory_mb for i in live))
        if spec.flavor.memory_mb > free_mb:
            refuse(f"not enough memory: the guest needs {spec.flavor.memory_mb} MiB, "
                   f"{max(free_mb, 0)} MiB are free for guests here")
        if spec.flavor.vcpus > stats.vcpus:
            refuse(f"the guest has {spec.flavor.vcpus} vCPUs, this host {stats.vcpus} CPUs")
        probe = objects.Instance(spec=spec, host=self.host, vm_state=states.ACTIVE)
        data = self.driver.check_can_live_migrate_destination(probe, src)
        if src.block_migration and data.shared_storage:
            refuse(f"the instance storage is shared with {theirs.host}: a block migration "
                   f"would copy the disks onto themselves; migrate without block_migration")
        if not src.block_migration and not data.shared_storage:
            refuse(f"the instance storage is not shared with {theirs.host}: use a block "
                   f"migration")
        return data

    @_expected
    def pre_live_migration(self, ctxt, instance: dict, source: dict, shared_storage: bool,
                           record: dict | None = None) -> dict:
        uuid = instance.get("uuid") if isinstance(instance, dict) else None
        with self._context(ctxt, uuid):
            spec = objects.InstanceSpec.from_dict(instance)
            src = md.SourceCheckData.from_dict(source)
            if not isinstance(shared_storage, bool):
                raise exception.InvalidArgument(name="shared_storage", reason="must be a boolean")
            inst = self._adopt_incoming(spec, record, states.ACTIVE, states.MIGRATING)
            mig = self.store.start_migration(
                spec.uuid, DEST, src.host_info.host, self.host, src.block_migration,
                ctxt.request_id, "preparing", {"shared_storage": shared_storage})

            def body(inst, journal):
                return self.driver.pre_live_migration(inst, journal, src, shared_storage)
            try:
                prepared = self._run_call(ctxt, inst, "pre_live_migration", body)
            except Exception as exc:
                self.store.delete_instance(spec.uuid)
                self.store.update_migration(mig.id, "failed", {"message": _reason(exc)})
                raise
            self.store.update_migration(mig.id, "prepared")
            return prepared.to_dict()

    def _incoming(self, uuid: str) -> objects.Instance:
        """The record of an instance migrating to this host (never one that
        lives here)."""
        inst = self.store.get_instance(objects.validate_uuid(uuid))
        mig = self.store.get_migration(inst.uuid, DEST)
        if inst.task_state != states.MIGRATING or mig is None:
            raise exception.InvalidState(action="finish an incoming live migration of",
                                         uuid=uuid, vm_state=inst.vm_state,
                                         task_state=inst.task_state)
        return inst

    @_expected
    def post_live_migration_at_destination(self, ctxt, uuid: str) -> dict:
        with self._context(ctxt, uuid):
            inst = self._incoming(uuid)
            mig = self.store.get_migration(inst.uuid, DEST)
            figures = self._run_call(ctxt, inst, "post_live_migration_at_destination",
                                     self._finish_incoming)
            self.store.update_migration(mig.id, "completed", {"figures": figures.to_dict()})
            return figures.to_dict()

    def _finish_incoming(self, inst: objects.Instance, journal: Journal) -> md.MigrationFigures:
        figures = self.driver.post_live_migration_at_destination(inst, journal)
        self.store.update_instance(inst.uuid, vm_state=states.ACTIVE, task_state=None,
                                   fault=None, progress=None, host=self.host,
                                   power_state=self._power_state(inst))
        journal.note = f"arrived: {figures.summary() or 'no figures'}"
        return figures

    @_expected
    def rollback_live_migration_at_destination(self, ctxt, uuid: str,
                                               shared_storage: bool | None = None) -> None:
        """Remove everything pre_live_migration made here. Idempotent."""
        with self._context(ctxt, uuid):
            try:
                inst = self._incoming(uuid)
            except exception.InstanceNotFound:
                return  # never prepared, or already rolled back
            mig = self.store.get_migration(inst.uuid, DEST)
            self._run_call(ctxt, inst, "rollback_live_migration_at_destination",
                           self._undo_incoming)
            self.store.update_migration(mig.id, "rolled_back")

    def _undo_incoming(self, inst: objects.Instance, journal: Journal) -> None:
        mig = self.store.get_migration(inst.uuid, DEST)
        # This host's own view of the storage (from the storage test), not the caller's.
        shared = bool(mig.details.get("shared_storage", True))
        self.driver.rollback_live_migration_at_destination(inst, journal, shared)
        self.store.delete_instance(inst.uuid)
        journal.note = f"rolled back the incoming migration from {mig.source}"

    # --- after a restart ---------------------------------------------------------

    def _reconcile_live_migration(self, ctxt, inst: objects.Instance, op_name: str,
                                  reason: str) -> None:
        """Settle a migration this agent was part of when it stopped."""
        if op_name == ACTION:
            self._run(ctxt, inst, ACTION, lambda i, j: self._reconcile_source(ctxt, i, j),
                      resumed=True)
        elif inst.task_state != states.MIGRATING:
            LOG.info("Reconciled: %s was interrupted, but the instance is %s here now",
                     op_name, inst.vm_state)
        else:
            finish = (op_name == "post_live_migration_at_destination"
                      and self._power_state(inst) == states.RUNNING)
            # Otherwise pre or rollback was interrupted: the source saw the call
            # fail and keeps (or takes back) the guest: nothing may stay here.
            name, body = ((op_name, self._finish_incoming) if finish else
                          ("rollback_live_migration_at_destination", self._undo_incoming))
            try:
                self._run_call(ctxt, inst, name, body)
            except Exception as exc:
                self.store.update_instance(
                    inst.uuid, vm_state=states.ERROR, task_state=None,
                    power_state=self._power_state(inst),
                    fault=objects.Fault(op_name, None, f"{reason}; {name}: {_reason(exc)}",
                                        now()))

    def _wait_job_end(self, inst: objects.Instance, timeout: float = 60) -> str:
        """After an abort: the source's state once the job ended (or timeout)."""
        deadline = time.monotonic() + timeout
        state = self.driver.live_migration_source_state(inst)
        while state == "migrating" and time.monotonic() < deadline:
            time.sleep(0.5)
            state = self.driver.live_migration_source_state(inst)
        return state

    def _reconcile_source(self, ctxt, inst: objects.Instance, journal: Journal) -> None:
        mig = self.store.get_migration(inst.uuid, SOURCE)
        shared = bool(mig.details.get("shared_storage", True)) if mig else True
        state = self.driver.live_migration_source_state(inst)
        if state == "migrating":
            with journal.step("abort_job"):
                self.driver.live_migration_abort_job(inst)
                state = self._wait_job_end(inst)
        if mig is None or state not in ("running", "gone"):
            raise exception.LiveMigrationFailed(uuid=inst.uuid, dest="?",
                                                reason=f"after a restart the guest is {state}")
        api = self._peer_api
        if state == "running":
            self.driver.rollback_live_migration_at_source(inst, journal)
            journal.note = f"agent restarted during the migration to {mig.dest}; rolled back"
            try:
                with journal.step("rollback_at_destination"):
                    api.rollback_live_migration_at_destination(ctxt, mig.dest, inst.uuid,
                                                               shared, timeout=60)
            except Exception as exc:
                journal.note += f"; {mig.dest} could not clean up: {_reason(exc)}"
            self._settle(inst, states.ACTIVE, progress=None)
            self.store.update_migration(mig.id, "failed", {"message": journal.note})
            return
        with journal.step("post_live_migration_at_destination"):
            figures = md.MigrationFigures.from_dict(api.post_live_migration_at_destination(
                ctxt, mig.dest, inst.uuid, timeout=self.conf.long_rpc_timeout))
        self.driver.post_live_migration_at_source(inst, journal, shared)
        self.store.delete_instance(inst.uuid)
        self.store.update_migration(mig.id, "completed", {"figures": figures.to_dict()})
        journal.note = (f"agent restarted during the migration to {mig.dest}, which had "
                        f"completed; finished")
