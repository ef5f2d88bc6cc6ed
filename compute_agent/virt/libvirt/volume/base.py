"""The interface every volume connector implements, and what they share.

A connector turns one block device of an instance into the ``GuestVolume``
(the <disk> of the domain XML) and makes or removes what that disk needs on
the host: a libvirt secret for the credentials, a host-side login for the
kernel initiator, nothing for a local file. ``disk`` is pure (the driver
builds domain XML from the record at any time); ``connect`` and
``disconnect`` are idempotent (hard reboot and delete run them again).
"""

from __future__ import annotations

import abc
import uuid as uuidlib
from collections.abc import Callable

from compute_agent import objects
from compute_agent.virt.libvirt.config import GuestVolume

# Secrets the agent creates are named from (instance, volume), so every run
# finds the same one again (hard reboot, delete after a restart).
_SECRET_NS = uuidlib.UUID("9b4c2d0e-8f7a-4c7e-9d1a-6a3e5f2b7c10")


def secret_uuid(instance_uuid: str, volume_id: str) -> str:
    return str(uuidlib.uuid5(_SECRET_NS, f"{instance_uuid}/{volume_id}"))


def secret_usage(instance_uuid: str, volume_id: str) -> str:
    return f"{secret_usage_prefix(instance_uuid)}{volume_id}"


def secret_usage_prefix(instance_uuid: str) -> str:
    return f"compute-agent/{instance_uuid}/"


def bus_for(device: str) -> str:
    """sdX volumes go on the virtio-scsi controller (hot-unplug needs nothing
    of the guest); vdX on virtio-blk (PCI hot-unplug: the guest must agree)."""
    return "scsi" if device.startswith("sd") else "virtio"


def serial_for(bdm: objects.BlockDevice) -> str:
    # QEMU's limits: 20 bytes for virtio-blk, 36 for scsi-hd.
    return bdm.volume_id[:36 if bus_for(bdm.device) == "scsi" else 20]


def alias_for(bdm: objects.BlockDevice) -> str:
    # A libvirt user alias ("ua-" prefix): device names are unique per domain.
    return "ua-" + bdm.device


class VolumeDriver(abc.ABC):
    def __init__(self, conf, get_host: Callable):
        self.conf = conf
        self._get_host = get_host

    @property
    def host(self):
        return self._get_host()

    def base_disk(self, instance_uuid: str, bdm: objects.BlockDevice,
                  source_type: str) -> GuestVolume:
        return GuestVolume(source_type=source_type, target_dev=bdm.device,
                           bus=bus_for(bdm.device), serial=serial_for(bdm),
                           alias=alias_for(bdm), cache=self.conf.libvirt.disk_cachemode,
                           boot_order=1 if bdm.boot_index == 0 else None)

    @abc.abstractmethod
    def disk(self, instance_uuid: str, bdm: objects.BlockDevice, conn) -> GuestVolume:
        """The domain's <disk> for this volume. No side effects."""

    def connect(self, instance_uuid: str, bdm: objects.BlockDevice,  # noqa: B027
                conn) -> None:
        """Make what the disk needs on the host (secret, login). Idempotent."""

    def disconnect(self, instance_uuid: str, bdm: objects.BlockDevice,  # noqa: B027
                   conn) -> None:
        """Remove what ``connect`` made. Idempotent; safe when never connected."""
