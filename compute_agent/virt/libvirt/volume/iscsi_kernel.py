"""iSCSI through the host kernel's initiator, via os-brick (optional).

Selected by ``[volume] iscsi_initiator = kernel``. os-brick's ISCSIConnector
(iscsiadm, iscsid, the iscsi_tcp module) logs the host in and gives a block
device; the guest gets ``<disk type='block'>`` on it and the CHAP password
stays with iscsid (os-brick passes it to iscsiadm), never in the domain XML.

NOT TESTED against a real target here: the project's test hosts have no
iscsi_tcp module (see shared/ENVIRONMENT.md), so only the unit tests (with a
stand-in for os-brick) cover this module. os-brick is not a dependency of the
package: install it (``pip install os-brick``) on hosts that use this mode.
"""

from __future__ import annotations

from oslo_utils import strutils

from compute_agent import exception, objects
from compute_agent.virt.libvirt.config import GuestVolume
from compute_agent.virt.libvirt.volume import base
from compute_agent.volume.connection import IscsiConnection


def _properties(conn: IscsiConnection) -> dict:
    """os-brick's connection properties (Cinder's field names)."""
    props = {"target_portal": f"{conn.host}:{conn.port}", "target_iqn": conn.iqn,
             "target_lun": conn.lun}
    if conn.auth_username:
        props.update(auth_method="CHAP", auth_username=conn.auth_username,
                     auth_password=conn.auth_password)
    return props


def _scrub(exc: Exception, conn: IscsiConnection) -> str:
    """An os-brick error may quote an iscsiadm command line: no password in it."""
    text = strutils.mask_password(str(exc))
    return text.replace(conn.auth_password, "***") if conn.auth_password else text


def device_path(conn: IscsiConnection) -> str:
    """The udev path os-brick returns for a single-path LUN."""
    return f"/dev/disk/by-path/ip-{conn.host}:{conn.port}-iscsi-{conn.iqn}-lun-{conn.lun}"


class KernelIscsiDriver(base.VolumeDriver):
    _connector = None

    def connector(self):
        if self._connector is None:
            try:
                from os_brick.initiator import connector
            except ImportError as exc:
                raise exception.VolumeConnectFailed(
                    volume_id="(any)", reason="[volume] iscsi_initiator = kernel needs the "
                                              "os-brick package") from exc
            # The agent runs as root: no rootwrap; os-brick's privsep runs in-process.
            KernelIscsiDriver._connector = connector.InitiatorConnector.factory(
                "ISCSI", root_helper=None, use_multipath=False, device_scan_attempts=3)
        return self._connector

    def disk(self, instance_uuid: str, bdm: objects.BlockDevice,
             conn: IscsiConnection) -> GuestVolume:
        vol = self.base_disk(instance_uuid, bdm, "block")
        vol.path = device_path(conn)
        vol.readonly = conn.readonly
        return vol

    def connect(self, instance_uuid: str, bdm: objects.BlockDevice,
                conn: IscsiConnection) -> None:
        try:
            info = self.connector().connect_volume(_properties(conn))
        except Exception as exc:  # os-brick raises its own hierarchy
            raise exception.VolumeConnectFailed(volume_id=bdm.volume_id,
                                                reason=f"os-brick: {_scrub(exc, conn)}") \
                from None
        if info.get("path") != device_path(conn):
            # Multipath or an unexpected layout: the disk would point elsewhere.
            raise exception.VolumeConnectFailed(
                volume_id=bdm.volume_id,
                reason=f"os-brick gave {info.get('path')!r}, expected {device_path(conn)}")

    def disconnect(self, instance_uuid: str, bdm: objects.BlockDevice,
                   conn: IscsiConnection) -> None:
        try:
            self.connector().disconnect_volume(_properties(conn), {"path": device_path(conn)},
                                               force=True, ignore_errors=True)
        except Exception as exc:
            raise exception.VolumeError(volume_id=bdm.volume_id,
                                        reason=f"os-brick disconnect: {_scrub(exc, conn)}") \
                from None
