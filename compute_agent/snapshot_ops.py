"""The snapshot RPC of the ComputeManager (mixed into it): a call that answers
with the new image's id while the copy and the upload go on in the
background. The flows themselves are in virt/libvirt/snapshot.py."""

from __future__ import annotations

import threading
import time

import oslo_messaging as messaging
from oslo_log import log as logging

from compute_agent import exception, objects, states
from compute_agent.journal import Journal
from compute_agent.store import now

LOG = logging.getLogger(__name__)
_expected = messaging.expected_exceptions(exception.ComputeAgentError)


class SnapshotMixin:
    @_expected
    def snapshot(self, ctxt, uuid: str, name: str) -> str:
        """Turn the instance's root disk into a new image (a call). The image
        record is created (queued) and its id returned at once; the copy and the
        upload go on in the background, task_state image_snapshot, then
        image_uploading, with ``progress`` in the record. A failure leaves the
        instance as it was and is told in the operation's record."""
        with self._context(ctxt, uuid):
            try:
                _check_image_name(name)
                inst = self._accept(ctxt, objects.validate_uuid(uuid), "snapshot")
            except (exception.Invalid, exception.NotFound) as exc:
                self._refuse(ctxt, uuid, "snapshot", exc)
                raise
            handoff = _Handoff()

            def work():
                ctxt.update_store()  # this thread's log lines carry the request
                try:
                    self._run(ctxt, inst, "snapshot",
                              lambda i, j: self._do_snapshot(i, j, name, handoff),
                              keep_vm_state=True)
                finally:
                    handoff.close(exception.SnapshotFailed(
                        uuid=inst.uuid, reason="it ended before the image was created"))
                    self._background.discard(threading.current_thread())

            thread = threading.Thread(target=work, name=f"snapshot-{inst.uuid}", daemon=True)
            self._background.add(thread)
            thread.start()
            return handoff.wait(_SNAPSHOT_START_TIMEOUT, inst.uuid)

    def _do_snapshot(self, inst: objects.Instance, journal: Journal, name: str,
                     handoff: _Handoff) -> None:
        try:
            with journal.step("prepare"):
                base = self._base_image(inst)
                plan = self.driver.prepare_snapshot(inst, base)
            with journal.step("create_image"):
                min_disk = inst.spec.flavor.root_gb or -(-plan.virtual_size // 1024 ** 3)
                image_id = self.images.create_image(
                    name, plan.disk_format, "bare", min_disk=max(min_disk, getattr(
                        base, "min_disk", 0)), min_ram=getattr(base, "min_ram", 0),
                    properties=self._snapshot_properties(inst, base, plan))
                journal.step_result = f"image {image_id}"
        except Exception as exc:
            handoff.error = exc  # the call raises it once the task has ended
            raise
        handoff.give(image_id)
        LOG.info("Snapshot into image %s: %s, %s, %s", image_id, plan.mode, plan.consistency,
                 plan.disk_format)
        shown = [-1]

        def progress(percent: int) -> None:
            percent = max(0, min(100, int(percent)))
            if percent != shown[0]:
                shown[0] = percent
                self.store.update_instance(inst.uuid, progress=percent)

        def upload(data, size: int) -> None:
            self.store.update_instance(inst.uuid, task_state=states.IMAGE_UPLOADING)
            self.images.upload(image_id, data, size)

        try:
            note = self.driver.snapshot(inst, journal, plan, upload, progress)
        except Exception as exc:
            if isinstance(exc, exception.RestoreFailed):  # the guest it saved is not back
                self.store.update_instance(inst.uuid, vm_state=states.ERROR, fault=objects.Fault(
                    "snapshot", journal.current_step, str(exc), now()))
            self._discard_image(image_id)
            raise
        self.store.update_instance(inst.uuid, task_state=None, progress=None,
                                   power_state=self._power_state(inst))
        journal.note = (f"image {image_id} ({plan.mode}, {plan.consistency}, "
                        f"{plan.disk_format}): {note}")

    def _base_image(self, inst: objects.Instance) -> objects.ImageMeta | None:
        if not inst.spec.image_id:
            return None
        try:
            return self.images.show(inst.spec.image_id)
        except exception.ComputeAgentError as exc:
            LOG.warning("Base image %s is unavailable (%s); the snapshot inherits nothing "
                        "from it", inst.spec.image_id, exc)
            return None

    def _snapshot_properties(self, inst: objects.Instance, base: objects.ImageMeta | None,
                             plan: objects.SnapshotPlan) -> dict[str, str]:
        """The base image's hw_/os_/img_ properties (Glance's own excepted),
        then what this snapshot is."""
        props = {k: str(v) for k, v in (base.properties if base else {}).items()
                 if not k.startswith(("os_hash_", "os_glance", "os_hidden"))}
        props.update(image_type="snapshot", instance_uuid=inst.uuid, snapshot_host=self.host,
                     snapshot_mode=plan.mode, snapshot_consistency=plan.consistency)
        if inst.spec.image_id:
            props["base_image_ref"] = inst.spec.image_id
        return props

    def _discard_image(self, image_id: str) -> None:
        """Delete a failed snapshot's image; while the image service cannot be
        reached, keep trying in the background for about ten minutes."""
        def attempt() -> bool:
            try:
                self.images.delete(image_id)
            except exception.ImageNotFound:
                pass
            except exception.ComputeAgentError as exc:
                LOG.warning("Could not delete image %s of a failed snapshot: %s", image_id, exc)
                return False
            LOG.info("Deleted image %s of a failed snapshot", image_id)
            return True

        def retry():
            for delay in _DISCARD_RETRY_DELAYS:
                time.sleep(delay)
                if attempt():
                    return
            LOG.error("Gave up deleting image %s of a failed snapshot: delete it by hand",
                      image_id)

        if not attempt():
            threading.Thread(target=retry, name=f"discard-{image_id}", daemon=True).start()

    def _recover_snapshot(self, inst: objects.Instance, step: str | None, reason: str) -> None:
        """An interrupted snapshot: undo what it left on the host, delete its
        image, end the task. The instance keeps its vm_state."""
        power = self._power_state(inst)
        try:
            note = self.driver.recover_snapshot(inst)
        except Exception as exc:
            LOG.exception("Could not undo the interrupted snapshot")
            self.store.update_instance(
                inst.uuid, vm_state=states.ERROR, task_state=None, progress=None,
                power_state=power,
                fault=objects.Fault("snapshot", step, f"{reason}; undoing it failed: {exc}",
                                    now()))
            return
        op = next((o for o in self.store.operations(uuid=inst.uuid, limit=20)
                   if o.name == "snapshot"), None)
        image = next((s.message for s in (op.steps if op else [])
                      if s.name == "create_image" and s.status == "done" and s.message), None)
        if image:
            self._discard_image(image.split()[-1])
        if op is not None:
            self.store.finish_operation(op.id, "interrupted", f"{reason}; {note}")
        self.store.update_instance(inst.uuid, task_state=None, progress=None,
                                   power_state=self._power_state(inst))
        LOG.info("Reconciled the interrupted snapshot: %s; %s", note,
                 f"{image} deleted" if image else "no image was created")

    def wait_for_background(self, timeout: float | None = None) -> bool:
        """Wait for operations running in the background (snapshot uploads) to
        end; False if some are still running after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._background):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in list(self._background))


# How long the snapshot call waits for the image record (the RPC caller's own
# timeout is usually 60 s), and the delays between attempts to delete a failed
# snapshot's image while the image service is unreachable (~10 minutes).
_SNAPSHOT_START_TIMEOUT = 50
_DISCARD_RETRY_DELAYS = (1, 2, 4, 8, 15, 30) + (60,) * 9


class _Handoff:
    """The image id (or the error) a background snapshot hands to the call
    waiting to answer."""

    def __init__(self):
        self._done = threading.Event()
        self.image_id: str | None = None
        self.error: Exception | None = None

    def give(self, image_id: str) -> None:
        self.image_id = image_id
        self._done.set()

    def close(self, default: Exception) -> None:
        if not self._done.is_set():
            self.error = self.error or default
            self._done.set()

    def wait(self, timeout: float, uuid: str) -> str:
        if not self._done.wait(timeout):
            raise exception.SnapshotFailed(
                uuid=uuid, reason=f"no image record after {timeout}s; the snapshot goes on, "
                                  f"follow its operation")
        if self.error is not None:
            raise self.error
        return self.image_id


def _check_image_name(name: object) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 255 or not name.isprintable():
        raise exception.InvalidArgument(
            name="name", reason=f"must be 1-255 printable characters, got {str(name)[:80]!r}")

