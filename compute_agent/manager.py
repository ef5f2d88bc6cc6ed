"""ComputeManager: the RPC endpoint.

It validates requests, moves the state machine, serialises operations per
instance, journals each step, sends lifecycle notifications and calls the
driver. It knows nothing of libvirt.

Every operation has the same shape (``_operation``): accept or refuse under
the state lock (a refusal is journalled and changes nothing), then run under
the instance's lock with a journal the driver writes steps into; a failure
puts the instance in error with a fault naming the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Iterator

import oslo_messaging as messaging
from oslo_concurrency import lockutils
from oslo_context import context as o_context
from oslo_log import log as logging

from compute_agent import exception, metrics, objects, states
from compute_agent.image.service import ImageService
from compute_agent.journal import Journal
from compute_agent.live_migration import OPERATIONS as LIVE_MIGRATION_OPERATIONS
from compute_agent.live_migration import LiveMigrationMixin
from compute_agent.network import validate as network_validate
from compute_agent.resize import OPERATIONS as RESIZE_OPERATIONS
from compute_agent.resize import ResizeMixin
from compute_agent.snapshot_ops import SnapshotMixin
from compute_agent.store import Store, now
from compute_agent.virt.driver import ComputeDriver
from compute_agent.volume import connection as volume_connection
from compute_agent.volume_ops import VolumeOpsMixin

LOG = logging.getLogger(__name__)

RPC_API_VERSION = "1.0"

# Errors that are answers (not found, refused), not agent failures: oslo.messaging
# returns them to the caller without logging a traceback.
_expected = messaging.expected_exceptions(exception.ComputeAgentError)


class ComputeManager(LiveMigrationMixin, SnapshotMixin, VolumeOpsMixin, ResizeMixin):
    """The mixins hold the longer flows' RPC methods: live_migration.py,
    snapshot_ops.py, volume_ops.py; they share this class's operation shape."""

    target = messaging.Target(version=RPC_API_VERSION)

    def __init__(self, conf, store: Store, driver: ComputeDriver, images: ImageService,
                 notifier: messaging.Notifier | None = None):
        self.conf = conf
        self.host = conf.host
        self.store = store
        self.driver = driver
        self.images = images
        self.notifier = notifier
        # Guards accept-or-refuse (read states, set task_state) across threads.
        self._state_lock = threading.Lock()
        # Operations that outlive the RPC request (snapshot uploads).
        self._background: set[threading.Thread] = set()

    # --- start-up ------------------------------------------------------------

    def init_host(self) -> None:
        self.driver.init_host(self._on_power_state)
        self.reconcile()
        self.sync_power_states()

    def reconcile(self) -> None:
        """Finish, roll back or fail every operation a previous run left open.

        Disks are never removed here unless the interrupted operation was a
        delete, which is simply finished."""
        for op in self.store.operations(status="running", limit=10000):
            ctxt = o_context.RequestContext(request_id=op.request_id, overwrite=True,
                                            resource_uuid=op.instance_uuid)
            last = op.last_step
            step = last.name if last else None
            where = (f"during step {step}" if last and last.status == "running" else
                     f"after step {step}" if last else "before its first step")
            reason = f"agent restarted during {op.name}, {where}"
            self.store.finish_operation(op.id, "interrupted", reason)
            try:
                inst = self.store.get_instance(op.instance_uuid)
            except exception.InstanceNotFound:
                continue  # a refused request, or an instance long gone
            LOG.warning("Reconciling: %s", reason)
            self._reconcile_one(ctxt, inst, op.name, step, reason)

    def _reconcile_one(self, ctxt, inst: objects.Instance, op_name: str, step: str | None,
                       reason: str) -> None:
        if op_name in LIVE_MIGRATION_OPERATIONS:
            self._reconcile_live_migration(ctxt, inst, op_name, reason)
            return
        if op_name in RESIZE_OPERATIONS:  # resize.py
            self._reconcile_resize(ctxt, inst, op_name, reason)
            return
        if op_name in ("attach_volume", "detach_volume"):  # volume_ops.py
            self._reconcile_volume_op(ctxt, inst, op_name)
            return
        power = self._power_state(inst)
        saved = power == states.SUSPENDED_POWER
        # (operation, what the hypervisor shows) -> the state it ended in.
        settled = {
            ("spawn", states.RUNNING): states.ACTIVE,
            ("reboot", states.RUNNING): states.ACTIVE,
            ("power_on", states.RUNNING): states.ACTIVE,
            ("resume", states.RUNNING): states.ACTIVE,
            ("power_off", states.SHUTDOWN): states.STOPPED,
            ("power_off", states.NOSTATE): states.STOPPED,
            ("suspend", states.RUNNING): states.ACTIVE,  # the save never happened
        }.get((op_name, power))
        if op_name in ("suspend", "resume") and saved:
            settled = states.SUSPENDED
        if op_name == "delete":
            self._run(ctxt, inst, "delete", self._do_delete, resumed=True)
        elif op_name == "update_security_groups" and inst.vm_state != states.ERROR:
            # The record holds the old or the new groups: make the host match it.
            self._run(ctxt, inst, op_name, self.driver.update_security_groups, resumed=True)
        elif op_name == "snapshot":
            self._recover_snapshot(inst, step, reason)
        elif settled is not None:
            LOG.info("Reconciled: %s ended with the guest %s; vm_state %s", op_name, power,
                     settled)
            extra = {"launched_at": now()} if op_name == "spawn" else {}
            self.store.update_instance(inst.uuid, vm_state=settled, task_state=None,
                                       power_state=power, **extra)
        elif op_name in ("reboot", "power_on"):
            # Interrupted after the destroy: finish the job (hard reboot is idempotent;
            # it also boots an instance whose root is a volume).
            self._run(ctxt, inst, "reboot", self._finish_hard_reboot, resumed=True)
        else:
            self.store.update_instance(
                inst.uuid, vm_state=states.ERROR, task_state=None, power_state=power,
                fault=objects.Fault(op_name, step, reason, now()))

    def _finish_hard_reboot(self, inst: objects.Instance, journal: Journal) -> None:
        self.driver.hard_reboot(inst, journal)
        self._settle(inst, states.ACTIVE)

    # --- power states ----------------------------------------------------------

    def _on_power_state(self, uuid: str, power_state: str) -> None:
        try:
            inst = self.store.get_instance(uuid)
        except exception.InstanceNotFound:
            return
        if inst.power_state != power_state:
            LOG.debug("Lifecycle event: power_state %s -> %s", inst.power_state, power_state,
                      instance_uuid=uuid)
            self.store.update_instance(uuid, power_state=power_state)

    def sync_power_states(self) -> None:
        """One bulk query for all domains; fix records that drifted. Domains
        this agent does not know are reported, never touched."""
        actual = self.driver.all_power_states()
        known = set()
        for inst in self.store.list_instances():
            if inst.vm_state == states.DELETED:
                continue
            known.add(inst.uuid)
            power = actual.get(inst.uuid, states.NOSTATE)
            if power != inst.power_state and inst.task_state is None:
                LOG.info("Power state sync: %s -> %s", inst.power_state, power,
                         instance_uuid=inst.uuid)
                self.store.update_instance(inst.uuid, power_state=power)
        for uuid in set(actual) - known:
            LOG.debug("Domain %s is not managed by this agent; leaving it alone", uuid)

    def _power_state(self, inst: objects.Instance) -> str:
        try:
            return self.driver.power_state(inst)
        except exception.ComputeAgentError as exc:
            LOG.warning("Could not read power state: %s", exc, instance_uuid=inst.uuid)
            return states.NOSTATE

    # --- the shape of every operation ----------------------------------------

    def _refuse(self, ctxt, uuid: str, action: str, exc: Exception) -> None:
        LOG.warning("Refused %s: %s", action, exc)
        metrics.observe_operation(action, "refused", 0.0)
        self.store.start_operation(str(uuid)[:64], action, ctxt.request_id, status="refused",
                                   message=str(exc))
        self._notify(ctxt, action, "error", {"uuid": uuid, "message": str(exc)})

    def _accept(self, ctxt, uuid: str, action: str) -> objects.Instance:
        with self._state_lock:
            inst = self.store.get_instance(uuid)
            if not states.check_allowed(action, inst.vm_state, inst.task_state):
                raise exception.InvalidState(action=action, uuid=uuid, vm_state=inst.vm_state,
                                             task_state=inst.task_state)
            return self.store.update_instance(uuid, task_state=states.task_state_for(action))

    def _run(self, ctxt, inst: objects.Instance, action: str, body, resumed: bool = False,
             keep_vm_state: bool = False):
        """Run ``body(inst, journal)`` under the instance lock, journalled. A
        failure puts the instance in error with a fault, unless ``keep_vm_state``
        (operations whose failure leaves the instance unharmed, e.g. a snapshot):
        then the task just ends and the reason is in the operation's record."""
        op_id = self.store.start_operation(inst.uuid, action, ctxt.request_id)
        journal = Journal(self.store, op_id, action)
        started = time.monotonic()
        self._notify(ctxt, action, "start", inst.to_dict())
        LOG.info("%s%s started", action, " (resumed)" if resumed else "")
        with lockutils.lock("instance-" + inst.uuid):
            try:
                result = body(inst, journal)
            except Exception as exc:
                message = str(exc) or type(exc).__name__
                LOG.error("%s failed at step %s: %s", action, journal.current_step, message,
                          exc_info=not isinstance(exc, exception.ComputeAgentError))
                if keep_vm_state:
                    failed = self.store.update_instance(
                        inst.uuid, task_state=None, progress=None,
                        power_state=self._power_state(inst))
                else:
                    failed = self.store.update_instance(
                        inst.uuid, vm_state=states.ERROR, task_state=None,
                        power_state=self._power_state(inst),
                        fault=objects.Fault(action, journal.current_step, message, now()))
                self.store.finish_operation(op_id, "failed", message)
                metrics.observe_operation(action, "failed", time.monotonic() - started)
                self._notify(ctxt, action, "error", dict(failed.to_dict(), message=message))
                return None
        self.store.finish_operation(op_id, "done", journal.note)
        metrics.observe_operation(action, "done", time.monotonic() - started)
        LOG.info("%s finished%s", action, f": {journal.note}" if journal.note else "")
        self._notify(ctxt, action, "end", self._current(inst.uuid))
        return result

    def _current(self, uuid: str) -> dict:
        with contextlib.suppress(exception.InstanceNotFound):
            return self.store.get_instance(uuid).to_dict()
        return {"uuid": uuid}

    def _notify(self, ctxt, action: str, phase: str, payload: dict) -> None:
        if self.notifier is None:
            return
        event = f"compute.instance.{action}.{phase}"
        try:
            if phase == "error":
                self.notifier.error(ctxt, event, payload)
            else:
                self.notifier.info(ctxt, event, payload)
        except Exception:  # a notification is never worth failing an operation
            LOG.exception("Could not send notification %s", event)
        finally:
            # The notifier copies the context and the copy replaces ours in the
            # thread-local store that oslo.log reads: put ours (with the
            # instance uuid) back.
            ctxt.update_store()

    @contextlib.contextmanager
    def _context(self, ctxt, uuid: object) -> Iterator[None]:
        """Put the request id and instance uuid on every log line of this call."""
        ctxt = ctxt or o_context.RequestContext()
        if isinstance(uuid, str):
            ctxt.resource_uuid = uuid[:64]
        ctxt.update_store()
        with metrics.rpc_in_flight():
            yield

    # --- RPC: spawn and delete ---------------------------------------------------

    def spawn(self, ctxt, instance: dict) -> None:
        uuid = instance.get("uuid") if isinstance(instance, dict) else None
        with self._context(ctxt, uuid):
            try:
                spec = objects.InstanceSpec.from_dict(instance)
                inst = objects.Instance(spec=spec, host=self.host, vm_state=states.BUILDING,
                                        task_state=states.SPAWNING)
                self._check_supported(spec)
                self.store.create_instance(inst)
            except exception.Invalid as exc:
                self._refuse(ctxt, uuid, "spawn", exc)
                return
            self._run(ctxt, inst, "spawn", self._do_spawn)

    def _check_supported(self, spec: objects.InstanceSpec) -> None:
        network_validate.validate_spec(spec, self.conf.network)
        volume_connection.validate_spec(spec, self.conf.volume)

    def _do_spawn(self, inst: objects.Instance, journal: Journal) -> None:
        if inst.spec.image_id is not None:  # else it boots from a volume
            with journal.step("check_image"):
                self.images.show(inst.spec.image_id)
        self.driver.spawn(inst, journal)
        self.store.update_instance(inst.uuid, vm_state=states.ACTIVE, task_state=None,
                                   power_state=self._power_state(inst), launched_at=now())

    def delete(self, ctxt, uuid: str) -> None:
        def body(inst, journal):
            if inst.vm_state == states.RESIZED:
                self._confirm_before_delete(ctxt, inst, journal)  # resize.py
            self._do_delete(inst, journal)
        self._cast(ctxt, uuid, "delete", "delete", body)

    def _do_delete(self, inst: objects.Instance, journal: Journal) -> None:
        self.driver.destroy(inst, journal)
        self.store.update_instance(inst.uuid, vm_state=states.DELETED, task_state=None,
                                   power_state=states.NOSTATE)

    def _cast(self, ctxt, uuid: str, check: str, action: str, body,
              keep_vm_state: bool = False) -> None:
        """Accept (or refuse, journalled) then run a cast operation."""
        with self._context(ctxt, uuid):
            try:
                inst = self._accept(ctxt, objects.validate_uuid(uuid), check)
            except (exception.Invalid, exception.NotFound) as exc:
                self._refuse(ctxt, uuid, action, exc)
                return
            self._run(ctxt, inst, action, body, keep_vm_state=keep_vm_state)

    def _adopt_incoming(self, spec: objects.InstanceSpec, record: object, vm_state: str,
                        task_state: str) -> objects.Instance:
        """The record of an instance arriving from another host (live migration,
        resize), keeping its creation and launch times when they look sane.
        InstanceExists if this host knows the uuid already."""
        record = record if isinstance(record, dict) else {}
        times = {k: record[k] for k in ("launched_at", "created_at")
                 if isinstance(record.get(k), str) and len(record[k]) <= 64}
        inst = objects.Instance(spec=spec, host=self.host, vm_state=vm_state,
                                task_state=task_state)
        self.store.create_instance(inst)
        if times:
            inst = self.store.update_instance(spec.uuid, **times)
        return inst

    def _settle(self, inst: objects.Instance, vm_state: str, **extra) -> None:
        """End an operation successfully: new vm_state, no task, no fault."""
        self.store.update_instance(inst.uuid, vm_state=vm_state, task_state=None, fault=None,
                                   power_state=self._power_state(inst), **extra)

    # --- RPC: lifecycle ----------------------------------------------------------

    def reboot(self, ctxt, uuid: str, reboot_type: str = "SOFT") -> None:
        hard = reboot_type == "HARD"
        if reboot_type not in ("SOFT", "HARD"):
            with self._context(ctxt, uuid):
                self._refuse(ctxt, uuid, "reboot", exception.InvalidArgument(
                    name="reboot_type", reason=f"must be SOFT or HARD, got {reboot_type!r}"))
            return

        def body(inst, journal):
            how = self.driver.reboot(inst, journal, hard, self.conf.libvirt.soft_reboot_timeout)
            if how == "hard-after-soft-timeout":
                journal.note = (f"guest did not power off within "
                                f"{self.conf.libvirt.soft_reboot_timeout}s of the ACPI "
                                f"request; rebooted hard")
            else:
                journal.note = f"{how} reboot"
            self._settle(inst, states.ACTIVE)

        self._cast(ctxt, uuid, "reboot_hard" if hard else "reboot_soft", "reboot", body)

    def power_off(self, ctxt, uuid: str, timeout: int | None = None) -> None:
        if timeout is None:
            timeout = self.conf.shutdown_timeout
        try:
            _check_count("timeout", timeout, 3600, lo=0)
        except exception.InvalidArgument as exc:
            with self._context(ctxt, uuid):
                self._refuse(ctxt, uuid, "power_off", exc)
            return

        def body(inst, journal):
            clean = self.driver.power_off(inst, journal, timeout)
            journal.note = "clean shutdown" if clean else f"forced off after {timeout}s"
            self._settle(inst, states.STOPPED)

        self._cast(ctxt, uuid, "power_off", "power_off", body)

    def power_on(self, ctxt, uuid: str) -> None:
        def body(inst, journal):
            self.driver.power_on(inst, journal)
            self._settle(inst, states.ACTIVE)

        self._cast(ctxt, uuid, "power_on", "power_on", body)

    def suspend(self, ctxt, uuid: str) -> None:
        def body(inst, journal):
            self.driver.suspend(inst, journal)
            self._settle(inst, states.SUSPENDED)

        self._cast(ctxt, uuid, "suspend", "suspend", body)

    def resume(self, ctxt, uuid: str, discard_saved_state: bool = False) -> None:
        def body(inst, journal):
            self.driver.resume(inst, journal, discard_saved_state=discard_saved_state)
            if discard_saved_state:
                journal.note = "saved memory state discarded; cold-booted"
            self._settle(inst, states.ACTIVE)

        check = "resume_discard" if discard_saved_state is True else "resume"
        self._cast(ctxt, uuid, check, "resume", body)

    def update_security_groups(self, ctxt, uuid: str, security_groups: list) -> None:
        """Replace the instance's security groups. Its ports' rules change in
        one atomic step while the guest keeps running."""
        try:
            groups = network_validate.parse_security_groups(security_groups)
        except exception.Invalid as exc:
            with self._context(ctxt, uuid):
                self._refuse(ctxt, uuid, "update_security_groups", exc)
            return

        def body(inst, journal):
            current = self.store.get_instance(inst.uuid)  # under the instance lock now
            allowed, _ = states.ALLOWED["update_security_groups"]
            if current.vm_state not in allowed:
                journal.note = f"instance became {current.vm_state} meanwhile; nothing done"
                return
            spec = dataclasses.replace(current.spec, security_groups=groups)
            self.driver.update_security_groups(dataclasses.replace(current, spec=spec),
                                               journal)
            with journal.step("save_spec"):
                self.store.update_instance(inst.uuid, spec=json.dumps(spec.to_dict()))
            journal.note = "security groups: " + (", ".join(g.name for g in groups)
                                                  or "(none: ingress closed)")

        self._cast(ctxt, uuid, "update_security_groups", "update_security_groups", body)

    @_expected
    def reset_state(self, ctxt, uuid: str, state: str) -> dict:
        """The operator's escape hatch: force vm_state to active or error and
        clear the task. Follow with a hard reboot to make the host match."""
        with self._context(ctxt, uuid):
            if state not in (states.ACTIVE, states.ERROR):
                raise exception.InvalidArgument(name="state",
                                                reason=f"must be active or error, got {state!r}")
            uuid = objects.validate_uuid(uuid)
            with self._state_lock:
                inst = self.store.get_instance(uuid)
                if inst.vm_state == states.DELETED:
                    raise exception.InvalidState(action="reset_state", uuid=uuid,
                                                 vm_state=inst.vm_state,
                                                 task_state=inst.task_state)
                after = self.store.update_instance(uuid, vm_state=state, task_state=None)
            note = (f"vm_state {inst.vm_state} -> {state}, task_state {inst.task_state} -> "
                    f"None")
            self.store.start_operation(uuid, "reset_state", ctxt.request_id, status="done",
                                       message=note)
            LOG.warning("reset_state: %s", note)
            return after.to_dict()

    # --- the image cache -------------------------------------------------------

    def _images_in_use(self) -> set[str]:
        return {i.spec.image_id for i in self.store.list_instances()
                if i.vm_state != states.DELETED and i.spec.image_id}

    def age_image_cache(self) -> None:
        removed = self.driver.age_image_cache(
            self._images_in_use, self.conf.image.remove_unused_base_images_after)
        LOG.debug("Image cache ageing pass removed %d file(s)", len(removed))

    def cache_images(self, ctxt, image_ids: list[str]) -> None:
        """Pre-fetch images into _base (cast). Each image is fetched, or its
        failure logged and notified, independently of the others."""
        with self._context(ctxt, None):
            if not isinstance(image_ids, list):
                LOG.warning("cache_images: image_ids must be a list, got %r", image_ids)
                return
            for image_id in image_ids:
                try:
                    objects.validate_image_id(image_id)
                    self.driver.cache_image(image_id)
                    LOG.info("Image %s is cached", image_id)
                except exception.ComputeAgentError as exc:
                    LOG.warning("Could not cache image %r: %s", image_id, exc)
                    self._notify(ctxt, "cache_image", "error",
                                 {"image_id": str(image_id)[:128], "message": str(exc)})

    # --- RPC: queries ------------------------------------------------------------

    def ping(self, ctxt) -> str:
        """Answered by the server itself: used by health checks."""
        return self.host

    def metrics_snapshot(self) -> dict:
        """State gauges for the metrics endpoint, read at scrape time."""
        live = [i for i in self.store.list_instances() if i.vm_state != states.DELETED]
        stats = self.driver.host_stats()
        return {"instances": [(i.vm_state, i.power_state) for i in live],
                "image_cache_bytes": stats.image_cache_bytes,
                "image_cache_hits": stats.image_cache_hits,
                "image_cache_misses": stats.image_cache_misses,
                "save_files_bytes": stats.save_files_bytes,
                "instances_path_free_bytes": stats.instances_path_free_mb * 1024 * 1024}

    @_expected
    def get_instance(self, ctxt, uuid: str) -> dict:
        with self._context(ctxt, uuid):
            return self.store.get_instance(objects.validate_uuid(uuid)).to_dict()

    @_expected
    def list_instances(self, ctxt, include_deleted: bool = False) -> list[dict]:
        with self._context(ctxt, None):
            return [i.to_dict() for i in self.store.list_instances()
                    if include_deleted or i.vm_state != states.DELETED]

    @_expected
    def get_operations(self, ctxt, uuid: str, limit: int = 10) -> list[dict]:
        with self._context(ctxt, uuid):
            _check_count("limit", limit, 1000)
            return [op.to_dict() for op in self.store.operations(uuid=str(uuid)[:64],
                                                                   limit=limit)]

    @_expected
    def get_console_output(self, ctxt, uuid: str, lines: int = 100) -> str:
        with self._context(ctxt, uuid):
            _check_count("lines", lines, 10000)
            inst = self.store.get_instance(objects.validate_uuid(uuid))
            return self.driver.console_output(inst, lines)

    @_expected
    def get_host_status(self, ctxt) -> dict:
        with self._context(ctxt, None):
            stats = self.driver.host_stats()
            live = [i for i in self.store.list_instances() if i.vm_state != states.DELETED]
            by_state: dict[str, int] = {}
            for i in live:
                by_state[i.vm_state] = by_state.get(i.vm_state, 0) + 1
            return {
                **vars(stats),
                "instances": len(live),
                "instances_by_vm_state": by_state,
                "vcpus_used": sum(i.spec.flavor.vcpus for i in live),
                "memory_mb_used": sum(i.spec.flavor.memory_mb for i in live),
                "root_gb_used": sum(i.spec.flavor.root_gb for i in live),
                "libvirt_connected": self.driver.is_connected(),
            }


def _check_count(name: str, value: object, hi: int, lo: int = 1) -> None:
    # bool is an int subclass; true is never a count.
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise exception.InvalidArgument(name=name, reason=f"must be {lo}..{hi}, got {value!r}")
