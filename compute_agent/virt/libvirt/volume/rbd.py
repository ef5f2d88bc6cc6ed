"""RBD (Ceph) volumes: a network disk QEMU's librbd opens itself.

Nothing is mounted or mapped on the host (no kernel rbd). With cephx, the
key given in the connection data goes into a private libvirt secret of usage
type ceph, one per instance and volume (created on connect, removed on
disconnect); or the connection data names an existing secret the operator
made (``secret_uuid``), which the agent uses and never removes.
"""

from __future__ import annotations

import base64

from compute_agent import objects
from compute_agent.virt.libvirt.config import GuestVolume
from compute_agent.virt.libvirt.volume import base
from compute_agent.volume.connection import RbdConnection


class RbdDriver(base.VolumeDriver):
    def disk(self, instance_uuid: str, bdm: objects.BlockDevice,
             conn: RbdConnection) -> GuestVolume:
        vol = self.base_disk(instance_uuid, bdm, "network")
        vol.protocol = "rbd"
        vol.name = f"{conn.pool}/{conn.image}"
        vol.hosts = list(conn.hosts)
        vol.readonly = conn.readonly
        if conn.auth_username:
            vol.auth_username = conn.auth_username
            vol.secret_type = "ceph"
            vol.secret_uuid = conn.secret_uuid or base.secret_uuid(instance_uuid,
                                                                   bdm.volume_id)
        return vol

    def connect(self, instance_uuid: str, bdm: objects.BlockDevice,
                conn: RbdConnection) -> None:
        if conn.key:
            # libvirt keeps the raw key; it hands QEMU the base64 form.
            self.host.define_secret(
                base.secret_uuid(instance_uuid, bdm.volume_id), "ceph",
                base.secret_usage(instance_uuid, bdm.volume_id),
                f"cephx key of volume {bdm.volume_id} for instance {instance_uuid}",
                base64.b64decode(conn.key))

    def disconnect(self, instance_uuid: str, bdm: objects.BlockDevice,
                   conn: RbdConnection) -> None:
        if conn.key:
            self.host.delete_secret(base.secret_uuid(instance_uuid, bdm.volume_id))
