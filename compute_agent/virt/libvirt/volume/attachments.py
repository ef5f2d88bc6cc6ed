"""The volumes of an instance: their disks in the domain, connecting them
(spawn, hard reboot, a live migration's destination), disconnecting them
(delete, a migration's source), and attaching or detaching one while the
instance runs or is stopped.

Detaching from a running guest is a request the guest may ignore (a
virtio-blk disk is a PCI device the guest must release; a virtio-scsi disk
goes at once). So a detach asks, waits for libvirt's device-removed event,
asks again, and in the end either saw the disk go or raises
VolumeDetachFailed with the disk still in the domain, live and persistent.
"""

from __future__ import annotations

from collections.abc import Callable

from lxml import etree
from oslo_log import log as logging

from compute_agent import exception, objects
from compute_agent.virt.libvirt import config
from compute_agent.virt.libvirt.guest import Guest
from compute_agent.virt.libvirt.volume import base
from compute_agent.virt.libvirt.volume.iscsi import QemuIscsiDriver
from compute_agent.virt.libvirt.volume.iscsi_kernel import KernelIscsiDriver
from compute_agent.virt.libvirt.volume.local import LocalDriver
from compute_agent.virt.libvirt.volume.rbd import RbdDriver
from compute_agent.volume import connection

LOG = logging.getLogger(__name__)


class Volumes:
    def __init__(self, conf, get_host: Callable):
        self.conf = conf
        self._get_host = get_host
        iscsi = KernelIscsiDriver if conf.volume.iscsi_initiator == "kernel" \
            else QemuIscsiDriver
        self._drivers: dict[str, base.VolumeDriver] = {
            "iscsi": iscsi(conf, get_host), "rbd": RbdDriver(conf, get_host),
            "file": LocalDriver(conf, get_host), "block": LocalDriver(conf, get_host)}

    def _parts(self, bdm: objects.BlockDevice):
        conn = connection.parse(bdm, f"volume {bdm.volume_id}: ", self.conf.volume)
        return self._drivers[bdm.driver_volume_type], conn

    def disk(self, instance_uuid: str, bdm: objects.BlockDevice) -> config.GuestVolume:
        drv, conn = self._parts(bdm)
        return drv.disk(instance_uuid, bdm, conn)

    def disks(self, instance: objects.Instance) -> list[config.GuestVolume]:
        """The <disk>s of all the instance's volumes, for the domain XML."""
        return [self.disk(instance.uuid, b) for b in instance.spec.block_devices]

    # --- connections -------------------------------------------------------------

    def connect(self, instance_uuid: str, bdm: objects.BlockDevice) -> None:
        drv, conn = self._parts(bdm)
        try:
            drv.connect(instance_uuid, bdm, conn)
        except exception.VolumeError:
            raise
        except exception.ComputeAgentError as exc:
            raise exception.VolumeConnectFailed(volume_id=bdm.volume_id,
                                                reason=str(exc)) from exc

    def disconnect(self, instance_uuid: str, bdm: objects.BlockDevice) -> None:
        drv, conn = self._parts(bdm)
        drv.disconnect(instance_uuid, bdm, conn)

    def connect_all(self, instance: objects.Instance) -> None:
        """Connect every volume; on a failure disconnect them all again, so
        nothing is left half-connected, and raise."""
        try:
            for bdm in instance.spec.block_devices:
                self.connect(instance.uuid, bdm)
        except BaseException:
            self.disconnect_all(instance, quiet=True)
            raise

    def disconnect_all(self, instance: objects.Instance, quiet: bool = False) -> None:
        """Disconnect every volume, each independently; raise the first error
        at the end (unless ``quiet``: after another failure, log only)."""
        first: Exception | None = None
        for bdm in instance.spec.block_devices:
            try:
                self.disconnect(instance.uuid, bdm)
            except Exception as exc:
                LOG.warning("Could not disconnect volume %s: %s", bdm.volume_id, exc,
                            instance_uuid=instance.uuid)
                first = first or exc
        if first is not None and not quiet:
            raise first

    def reconcile(self, instance: objects.Instance, guest: Guest | None) -> list[str]:
        """See LibvirtDriver.reconcile_volumes: disks and secrets of volumes the
        record does not have go; recorded volumes whose disk is gone from the
        domain are disconnected and returned (their detach is finished)."""
        recorded = {base.alias_for(b): b for b in instance.spec.block_devices}
        finished: list[str] = []
        if guest is not None:
            for live in ((True, False) if guest.is_running() else (False,)):
                for alias, xml in guest.volume_disks(live).items():
                    if alias not in recorded:
                        LOG.warning("Removing disk %s, which the record does not have (an "
                                    "attach cut short)", alias, instance_uuid=instance.uuid)
                        guest.detach_device(xml, live=live, config=not live)
            in_domain = set(guest.volume_disks(False)) | (
                set(guest.volume_disks(True)) if guest.is_running() else set())
            for alias, bdm in recorded.items():
                if alias not in in_domain:
                    LOG.warning("Volume %s is no longer in the domain: finishing its detach",
                                bdm.volume_id, instance_uuid=instance.uuid)
                    self.disconnect(instance.uuid, bdm)
                    finished.append(bdm.volume_id)
        kept = {base.secret_usage(instance.uuid, b.volume_id)
                for b in instance.spec.block_devices if b.volume_id not in finished}
        host = self._get_host()
        for secret_uuid, usage in host.secrets_by_usage_prefix(
                base.secret_usage_prefix(instance.uuid)).items():
            if usage not in kept:
                LOG.warning("Removing secret %s of a volume the record does not have",
                            secret_uuid, instance_uuid=instance.uuid)
                host.delete_secret(secret_uuid)
        return finished

    # --- attach and detach -----------------------------------------------------------

    def attach(self, instance: objects.Instance, guest: Guest,
               bdm: objects.BlockDevice) -> str:
        """Connect and add the disk, live when the guest runs and always to the
        persistent definition. On failure nothing is left (secret removed).
        Returns 'live' or 'config'."""
        vol = self.disk(instance.uuid, bdm)
        self.connect(instance.uuid, bdm)
        try:
            live = guest.is_running()
            if vol.bus == "scsi":
                _ensure_scsi_controller(guest, live)
            guest.attach_device(config.volume_disk_xml(vol), live=live, config=True)
        except Exception as exc:
            try:
                self.disconnect(instance.uuid, bdm)
            except Exception:
                LOG.exception("Could not disconnect volume %s after the failed attach",
                              bdm.volume_id, instance_uuid=instance.uuid)
            raise exception.VolumeAttachFailed(volume_id=bdm.volume_id,
                                               reason=str(exc)) from exc
        return "live" if live else "config"

    def detach(self, instance: objects.Instance, guest: Guest | None,
               bdm: objects.BlockDevice) -> str:
        """Remove the disk from the running guest (waiting until it is gone)
        and from the persistent definition, then disconnect. Raises
        VolumeDetachFailed, with the disk still there, if the guest keeps it."""
        vol = self.disk(instance.uuid, bdm)
        xml = config.volume_disk_xml(vol)
        how = "config"
        if guest is not None and guest.is_running() \
                and guest.has_device_alias(vol.alias, live=True):
            self._detach_live(instance, guest, bdm, vol, xml)
            how = "live"
        if guest is not None and guest.has_device_alias(vol.alias, live=False):
            guest.detach_device(xml, live=False, config=True)
        self.disconnect(instance.uuid, bdm)
        return how

    def _detach_live(self, instance, guest: Guest, bdm, vol, xml: str) -> None:
        timeout = self.conf.volume.detach_timeout
        attempts = self.conf.volume.detach_attempts
        host = self._get_host()
        for attempt in range(1, attempts + 1):
            waiter = host.expect_device_removal(instance.uuid, vol.alias)
            try:
                try:
                    guest.detach_device(xml, live=True, config=False)
                except exception.HypervisorError as exc:
                    if not guest.has_device_alias(vol.alias, live=True):
                        return  # it went meanwhile
                    if "already in the process of unplug" not in str(exc):
                        raise exception.VolumeDetachFailed(
                            volume_id=bdm.volume_id, uuid=instance.uuid,
                            reason=str(exc)) from exc
                if waiter.wait(timeout):
                    LOG.info("Volume %s (%s) removed from the guest", bdm.volume_id,
                             bdm.device, instance_uuid=instance.uuid)
                    return
            finally:
                waiter.close()
            if not guest.has_device_alias(vol.alias, live=True):
                return  # removed, but the event was missed (e.g. a reconnect)
            LOG.warning("Volume %s (%s) still in the guest %ss after detach request %d/%d",
                        bdm.volume_id, bdm.device, timeout, attempt, attempts,
                        instance_uuid=instance.uuid)
        raise exception.VolumeDetachFailed(
            volume_id=bdm.volume_id, uuid=instance.uuid,
            reason=f"the guest did not release {bdm.device} ({vol.bus}) after {attempts} "
                   f"detach requests, {timeout}s each; the volume stays attached")


_VIRTIO_SCSI = "<controller type='scsi' index='0' model='virtio-scsi'/>"


def _ensure_scsi_controller(guest: Guest, live: bool) -> None:
    """Domains defined before volumes were supported have no SCSI controller,
    and libvirt would add its default one (lsilogic) for an sdX disk: add
    virtio-scsi first, where it is missing."""
    def has_one(xml: str) -> bool:
        return etree.fromstring(xml.encode()).find(
            "devices/controller[@type='scsi']") is not None
    need_live = live and not has_one(guest.xml())
    need_config = not has_one(guest.inactive_xml())
    if need_live or need_config:
        guest.attach_device(_VIRTIO_SCSI, live=need_live, config=need_config)
