"""iSCSI through QEMU's own initiator (libiscsi, Debian package qemu-block-extra).

The guest's QEMU process logs in to the target itself: no host kernel module,
no host block device. CHAP credentials go into a private libvirt secret of
usage type iscsi, one per instance and volume, created on connect and removed
on disconnect; the domain XML carries only the user name and the secret's
UUID. This is what Nova's LibvirtNetVolumeDriver does for iSCSI with
``[libvirt] iscsi_use_native``-style setups; os-brick is not involved (it only
drives host-side initiators).
"""

from __future__ import annotations

from compute_agent import objects
from compute_agent.virt.libvirt.config import GuestVolume
from compute_agent.virt.libvirt.volume import base
from compute_agent.volume.connection import IscsiConnection


class QemuIscsiDriver(base.VolumeDriver):
    def disk(self, instance_uuid: str, bdm: objects.BlockDevice,
             conn: IscsiConnection) -> GuestVolume:
        vol = self.base_disk(instance_uuid, bdm, "network")
        vol.protocol = "iscsi"
        vol.name = f"{conn.iqn}/{conn.lun}"
        vol.hosts = [(conn.host, conn.port)]
        vol.readonly = conn.readonly
        if conn.auth_username:
            vol.auth_username = conn.auth_username
            vol.secret_type = "iscsi"
            vol.secret_uuid = base.secret_uuid(instance_uuid, bdm.volume_id)
        return vol

    def connect(self, instance_uuid: str, bdm: objects.BlockDevice,
                conn: IscsiConnection) -> None:
        if conn.auth_username:
            self.host.define_secret(
                base.secret_uuid(instance_uuid, bdm.volume_id), "iscsi",
                base.secret_usage(instance_uuid, bdm.volume_id),
                f"CHAP password of volume {bdm.volume_id} for instance {instance_uuid}",
                conn.auth_password.encode())

    def disconnect(self, instance_uuid: str, bdm: objects.BlockDevice,
                   conn: IscsiConnection) -> None:
        self.host.delete_secret(base.secret_uuid(instance_uuid, bdm.volume_id))
