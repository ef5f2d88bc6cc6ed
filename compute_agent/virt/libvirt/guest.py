"""A thin wrapper over one libvirt domain, addressed by UUID.

Each method looks the domain up again through the Host, so a Guest stays
usable across a libvirt reconnect, and every call is logged and has its
errors translated in one place (``Host.call``).
"""

from __future__ import annotations

import time

import libvirt
from lxml import etree

from compute_agent import states

# libvirt's domain states -> our power_state names
POWER_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: states.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: states.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: states.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: states.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: states.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: states.SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: states.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: states.SUSPENDED_POWER,
}


class Guest:
    def __init__(self, dom: libvirt.virDomain, host):
        self.uuid = dom.UUIDString()
        self.name = dom.name()
        self._host = host

    def _call(self, what: str, fn):
        def run(conn):
            return fn(conn.lookupByUUIDString(self.uuid))
        return self._host.call(f"{what}({self.name})", run)

    def power_state(self) -> str:
        state, _ = self._call("state", lambda d: d.state())
        if state == libvirt.VIR_DOMAIN_SHUTOFF and self.has_managed_save():
            return states.SUSPENDED_POWER
        return POWER_STATES.get(state, states.NOSTATE)

    def is_running(self) -> bool:
        return self._call("isActive", lambda d: d.isActive()) == 1

    def has_managed_save(self) -> bool:
        return self._call("hasManagedSaveImage", lambda d: d.hasManagedSaveImage(0)) == 1

    def start(self) -> None:
        self._call("create", lambda d: d.create())

    def destroy(self) -> None:
        """Stop the QEMU process at once (like pulling the plug). No-op if off."""
        def fn(d):
            if not d.isActive():
                return
            try:
                d.destroy()
            except libvirt.libvirtError as exc:
                # It stopped between the check and the call: that is the goal.
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or d.isActive():
                    raise
        self._call("destroy", fn)

    def shutdown(self) -> None:
        """Ask the guest to power off (ACPI power button)."""
        self._call("shutdown", lambda d: d.shutdown())

    def managed_save(self) -> None:
        self._call("managedSave", lambda d: d.managedSave(0))

    def remove_managed_save(self) -> None:
        self._call("managedSaveRemove", lambda d: d.managedSaveRemove(0))

    def wait_for_shutoff(self, timeout: float, interval: float = 0.25) -> bool:
        """True when the domain stopped within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
        return True

    def undefine(self) -> None:
        """Remove the definition, with any managed-save image and NVRAM."""
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                 | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        self._call("undefineFlags", lambda d: d.undefineFlags(flags))

    def xml(self) -> str:
        return self._call("XMLDesc", lambda d: d.XMLDesc(0))

    # --- live snapshots: a transient domain, a block copy job, the guest agent ---

    def is_persistent(self) -> bool:
        return self._call("isPersistent", lambda d: d.isPersistent()) == 1

    def inactive_xml(self) -> str:
        """The persistent definition (what defineXML takes back)."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        return self._call("XMLDesc(inactive)", lambda d: d.XMLDesc(flags))

    def make_transient(self) -> None:
        """Remove the definition of a running domain: it keeps running, transient."""
        self._call("undefineFlags(0)", lambda d: d.undefineFlags(0))

    def block_copy(self, dev: str, dest_xml: str) -> None:
        """Mirror disk ``dev`` into an existing image sharing its backing file."""
        flags = libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
        self._call(f"blockCopy({dev})", lambda d: d.blockCopy(dev, dest_xml, {}, flags))

    def block_job(self, dev: str) -> dict:
        """{'cur', 'end', ...} of the disk's block job; {} when there is none."""
        return self._call(f"blockJobInfo({dev})", lambda d: d.blockJobInfo(dev, 0)) or {}

    def abort_block_job(self, dev: str) -> None:
        """End the job; a mirror that caught up leaves a consistent copy."""
        self._call(f"blockJobAbort({dev})", lambda d: d.blockJobAbort(dev, 0))

    def freeze_filesystems(self) -> None:
        self._call("fsFreeze", lambda d: d.fsFreeze())

    def thaw_filesystems(self) -> None:
        self._call("fsThaw", lambda d: d.fsThaw())

    # --- devices (volumes) ---------------------------------------------------------

    @staticmethod
    def _device_flags(live: bool, config: bool) -> int:
        return ((libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
                | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0))

    def attach_device(self, xml: str, live: bool, config: bool = True) -> None:
        flags = self._device_flags(live, config)
        self._call("attachDeviceFlags", lambda d: d.attachDeviceFlags(xml, flags))

    def detach_device(self, xml: str, live: bool, config: bool) -> None:
        """Ask for the device to go. For a live guest this only starts the
        unplug: wait for the device-removed event (Host.expect_device_removal)."""
        flags = self._device_flags(live, config)
        self._call("detachDeviceFlags", lambda d: d.detachDeviceFlags(xml, flags))

    def volume_disks(self, live: bool) -> dict[str, str]:
        """{alias: <disk> XML} of the disks with a user alias (``ua-``: the
        agent's volumes) in the live (or the persistent) definition."""
        flags = 0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE
        root = etree.fromstring(self._call("XMLDesc", lambda d: d.XMLDesc(flags)).encode())
        disks = {}
        for disk in root.iterfind("./devices/disk"):
            alias = disk.find("alias")
            if alias is not None and (alias.get("name") or "").startswith("ua-"):
                disks[alias.get("name")] = etree.tostring(disk, encoding="unicode")
        return disks

    def has_device_alias(self, alias: str, live: bool) -> bool:
        """Whether the live (or the persistent) definition has a device with
        this alias."""
        flags = 0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE
        xml = self._call("XMLDesc", lambda d: d.XMLDesc(flags))
        return f"<alias name='{alias}'/>" in xml or f'<alias name="{alias}"/>' in xml
