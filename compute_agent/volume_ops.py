"""Volume RPCs of the ComputeManager (mixed into it): attach and detach on a
running or stopped instance. The connectors themselves live in
compute_agent/volume/ and the libvirt side in the driver."""

from __future__ import annotations

import dataclasses
import json

from compute_agent import exception, objects, states
from compute_agent.volume import connection as volume_connection


class VolumeOpsMixin:
    def attach_volume(self, ctxt, uuid: str, block_device: dict) -> None:
        """Attach a volume to a running (live and persistent) or stopped
        (persistent) instance. A failure leaves the instance as it was, the
        volume neither attached nor connected; the reason is in the operation."""
        with self._context(ctxt, uuid):
            try:
                bdm = objects.BlockDevice.from_dict(block_device, "block_device.")
                self._check_attachable(objects.validate_uuid(uuid), bdm)
            except (exception.Invalid, exception.NotFound) as exc:
                self._refuse(ctxt, uuid, "attach_volume", exc)
                return

        def body(inst, journal):
            current = self.store.get_instance(inst.uuid)  # under the instance lock now
            self._check_attachable(inst.uuid, bdm, current)
            how = self.driver.attach_volume(current, journal, bdm)
            spec = dataclasses.replace(current.spec,
                                       block_devices=current.spec.block_devices + (bdm,))
            with journal.step("save_spec"):
                self.store.update_instance(inst.uuid, spec=json.dumps(spec.to_dict()))
            journal.note = f"volume {bdm.volume_id} attached as {bdm.device} ({how})"

        # A volume that could not be attached leaves a working instance.
        self._cast(ctxt, uuid, "attach_volume", "attach_volume", body, keep_vm_state=True)

    def _check_attachable(self, uuid: str, bdm: objects.BlockDevice,
                          inst: objects.Instance | None = None) -> None:
        inst = inst or self.store.get_instance(uuid)
        allowed, _ = states.ALLOWED["attach_volume"]
        if inst.vm_state not in allowed:
            raise exception.InvalidState(action="attach_volume", uuid=uuid,
                                         vm_state=inst.vm_state, task_state=inst.task_state)
        devices, volumes = volume_connection.used_devices(inst.spec)
        if bdm.boot_index is not None:
            raise exception.InvalidSpec(field="block_device.boot_index",
                                        reason="must be null for a volume attached later")
        volume_connection.check_block_device(bdm, "block_device.", self.conf.volume,
                                             devices, volumes)

    def detach_volume(self, ctxt, uuid: str, volume_id: str) -> None:
        """Detach a volume; from a running guest only once libvirt says the disk
        is gone. When the guest will not let go the operation fails and the
        volume stays attached (in the record and in the domain)."""
        def find(inst: objects.Instance) -> objects.BlockDevice:
            allowed, _ = states.ALLOWED["detach_volume"]
            if inst.vm_state not in allowed:
                raise exception.InvalidState(action="detach_volume", uuid=inst.uuid,
                                             vm_state=inst.vm_state,
                                             task_state=inst.task_state)
            bdm = next((b for b in inst.spec.block_devices if b.volume_id == volume_id), None)
            if bdm is None:
                raise exception.NotFound(what=f"volume {volume_id!r} attached to instance "
                                              f"{inst.uuid}")
            if bdm.boot_index == 0:
                raise exception.InvalidArgument(name="volume_id",
                                                reason="the root volume cannot be detached")
            return bdm

        with self._context(ctxt, uuid):
            try:
                find(self.store.get_instance(objects.validate_uuid(uuid)))
            except (exception.Invalid, exception.NotFound) as exc:
                self._refuse(ctxt, uuid, "detach_volume", exc)
                return

        def body(inst, journal):
            current = self.store.get_instance(inst.uuid)  # under the instance lock now
            bdm = find(current)
            how = self.driver.detach_volume(current, journal, bdm)
            spec = dataclasses.replace(current.spec, block_devices=tuple(
                b for b in current.spec.block_devices if b.volume_id != volume_id))
            with journal.step("save_spec"):
                self.store.update_instance(inst.uuid, spec=json.dumps(spec.to_dict()))
            journal.note = f"volume {volume_id} detached from {bdm.device} ({how})"

        # A volume that could not be detached leaves a working instance.
        self._cast(ctxt, uuid, "detach_volume", "detach_volume", body, keep_vm_state=True)

    def _reconcile_volume_op(self, ctxt, inst: objects.Instance, op_name: str) -> None:
        """An attach or detach cut short by a restart: undo the attach or finish
        the detach, so the record and the host agree and the instance keeps
        its vm_state (the operation says it was interrupted; it can be sent
        again)."""
        def body(inst, journal):
            gone = self.driver.reconcile_volumes(inst, journal)
            if gone:
                spec = dataclasses.replace(inst.spec, block_devices=tuple(
                    b for b in inst.spec.block_devices if b.volume_id not in gone))
                with journal.step("save_spec"):
                    self.store.update_instance(inst.uuid, spec=json.dumps(spec.to_dict()))
            self._settle(inst, inst.vm_state)
            journal.note = ("volumes match the record" + (
                f"; detach of {', '.join(gone)} finished" if gone else ""))
        self._run(ctxt, inst, op_name, body, resumed=True, keep_vm_state=True)

