"""Local volumes: a file or a block device on this host, given by path.

Only paths inside ``[volume] allowed_local_volume_dirs`` are used, checked on
the request and again on the real file each time the disk is built (a file
volume's symlinks must stay inside those directories). Raw data only: a
qcow2 header could name any host file as its backing file.
"""

from __future__ import annotations

from compute_agent import objects
from compute_agent.virt.libvirt.config import GuestVolume
from compute_agent.virt.libvirt.volume import base
from compute_agent.volume.connection import LocalConnection, resolve_local_path


class LocalDriver(base.VolumeDriver):
    def disk(self, instance_uuid: str, bdm: objects.BlockDevice,
             conn: LocalConnection) -> GuestVolume:
        vol = self.base_disk(instance_uuid, bdm, conn.kind)
        vol.path = resolve_local_path(conn, list(self.conf.volume.allowed_local_volume_dirs))
        vol.readonly = conn.readonly
        return vol
