"""Typed libvirt domain configuration, rendered to XML with lxml.

The driver fills a ``GuestConfig`` from the instance; ``to_xml`` turns it into
the domain XML that is defined from memory. Values go into the tree as element
text and attributes through lxml, which escapes them: nothing is pasted into an
XML string. ``parse_disks`` reads back what the driver needs from a live
domain's XML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

METADATA_NS = "https://compute-agent.invalid/xmlns/instance/1.0"


@dataclass
class GuestDisk:
    path: str
    target_dev: str
    driver_format: str = "qcow2"
    bus: str = "virtio"
    cache: str = "none"
    device: str = "disk"


@dataclass
class GuestVolume:
    """A volume's disk: a network disk QEMU opens itself (``protocol`` iscsi or
    rbd, with a libvirt secret for its credentials) or a local file or block
    device. ``alias`` (libvirt user alias, ``ua-`` prefix) names it in
    device-removed events."""

    source_type: str  # network | file | block
    target_dev: str
    bus: str  # scsi | virtio
    serial: str
    alias: str
    protocol: str | None = None
    name: str | None = None  # IQN/LUN or pool/image
    hosts: list[tuple[str, int]] = field(default_factory=list)
    path: str | None = None
    auth_username: str | None = None
    secret_type: str | None = None  # iscsi | ceph
    secret_uuid: str | None = None
    cache: str = "none"
    readonly: bool = False
    boot_order: int | None = None


@dataclass
class GuestSerialLog:
    path: str


@dataclass
class GuestInterface:
    """A virtio NIC on a Linux bridge; libvirt creates the tap named ``tap``."""

    mac: str
    bridge: str
    tap: str
    model: str = "virtio"


@dataclass
class GuestMetadata:
    name: str
    flavor_name: str
    image_id: str | None
    host: str


@dataclass
class GuestConfig:
    uuid: str
    name: str
    virt_type: str  # kvm | qemu
    memory_mb: int
    vcpus: int
    cpu_mode: str  # none | host-model | host-passthrough
    metadata: GuestMetadata
    disks: list[GuestDisk] = field(default_factory=list)
    serial_log: GuestSerialLog | None = None
    machine: str = "pc"
    interfaces: list[GuestInterface] = field(default_factory=list)
    volumes: list[GuestVolume] = field(default_factory=list)
    # A virtio-scsi controller, so volumes on bus scsi hot-(un)plug reliably.
    scsi_controller: bool = False


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs) -> etree._Element:
    el = etree.SubElement(parent, tag, {k.rstrip("_"): str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = str(text)
    return el


def to_xml(cfg: GuestConfig) -> str:
    dom = etree.Element("domain", type=cfg.virt_type)
    _sub(dom, "name", cfg.name)
    _sub(dom, "uuid", cfg.uuid)
    _sub(dom, "title", cfg.metadata.name)
    _metadata(dom, cfg.metadata)
    _sub(dom, "memory", cfg.memory_mb * 1024, unit="KiB")
    _sub(dom, "vcpu", cfg.vcpus)

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=cfg.machine)
    if not any(v.boot_order for v in cfg.volumes):
        _sub(os_el, "boot", dev="hd")  # else the root volume carries <boot order>

    features = _sub(dom, "features")
    _sub(features, "acpi")  # ACPI power button (soft shutdown) and PCI hotplug
    _sub(features, "apic")
    if cfg.cpu_mode != "none":
        _sub(dom, "cpu", mode=cfg.cpu_mode)
    clock = _sub(dom, "clock", offset="utc")
    _sub(clock, "timer", name="rtc", tickpolicy="catchup")
    _sub(clock, "timer", name="pit", tickpolicy="delay")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    for disk in cfg.disks:
        _disk(devices, disk)
    if cfg.scsi_controller or any(v.bus == "scsi" for v in cfg.volumes):
        _sub(devices, "controller", type="scsi", index=0, model="virtio-scsi")
    for vol in cfg.volumes:
        devices.append(volume_disk_element(vol))
    for nic in cfg.interfaces:
        _interface(devices, nic)
    if cfg.serial_log:
        # A file-backed serial port: everything the guest prints on ttyS0 ends
        # up in console.log (written by virtlogd, appended across restarts).
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=cfg.serial_log.path, append="on")
        _sub(serial, "target", port=0)
        console = _sub(devices, "console", type="file")
        _sub(console, "source", path=cfg.serial_log.path, append="on")
        _sub(console, "target", type="serial", port=0)
    _sub(devices, "memballoon", model="virtio")
    return etree.tostring(dom, pretty_print=True, encoding="unicode")


def _metadata(dom: etree._Element, md: GuestMetadata) -> None:
    meta = _sub(dom, "metadata")
    ns = f"{{{METADATA_NS}}}"
    inst = etree.SubElement(meta, ns + "instance", nsmap={"ca": METADATA_NS})
    _sub(inst, ns + "name", md.name)
    _sub(inst, ns + "flavor", md.flavor_name)
    if md.image_id:
        _sub(inst, ns + "image", md.image_id)
    _sub(inst, ns + "host", md.host)


def _disk(devices: etree._Element, disk: GuestDisk) -> None:
    el = _sub(devices, "disk", type="file", device=disk.device)
    _sub(el, "driver", name="qemu", type=disk.driver_format, cache=disk.cache)
    _sub(el, "source", file=disk.path)
    _sub(el, "target", dev=disk.target_dev, bus=disk.bus)


def volume_disk_element(vol: GuestVolume) -> etree._Element:
    el = etree.Element("disk", type=vol.source_type, device="disk")
    _sub(el, "driver", name="qemu", type="raw", cache=vol.cache)
    if vol.source_type == "network":
        src = _sub(el, "source", protocol=vol.protocol, name=vol.name)
        for host, port in vol.hosts:
            _sub(src, "host", name=host, port=port)
        if vol.secret_uuid:
            # Only the user name and a reference: the credential is in the secret.
            auth = _sub(el, "auth", username=vol.auth_username)
            _sub(auth, "secret", type=vol.secret_type, uuid=vol.secret_uuid)
    elif vol.source_type == "block":
        _sub(el, "source", dev=vol.path)
    else:
        _sub(el, "source", file=vol.path)
    _sub(el, "target", dev=vol.target_dev, bus=vol.bus)
    if vol.readonly:
        _sub(el, "readonly")
    _sub(el, "serial", vol.serial)
    if vol.boot_order:
        _sub(el, "boot", order=vol.boot_order)
    _sub(el, "alias", name=vol.alias)
    return el


def volume_disk_xml(vol: GuestVolume) -> str:
    """The <disk> of one volume, for attachDeviceFlags/detachDeviceFlags."""
    return etree.tostring(volume_disk_element(vol), encoding="unicode")


def _interface(devices: etree._Element, nic: GuestInterface) -> None:
    el = _sub(devices, "interface", type="bridge")
    _sub(el, "mac", address=nic.mac)
    _sub(el, "source", bridge=nic.bridge)
    _sub(el, "target", dev=nic.tap)
    _sub(el, "model", type=nic.model)


def parse_disks(xml: str) -> list[GuestDisk]:
    """The file-backed disks of a domain XML, in order."""
    root = etree.fromstring(xml.encode())
    disks = []
    for el in root.findall("./devices/disk"):
        source = el.find("source")
        target = el.find("target")
        driver = el.find("driver")
        if source is None or source.get("file") is None or target is None:
            continue
        disks.append(GuestDisk(
            path=source.get("file"), target_dev=target.get("dev"),
            driver_format=driver.get("type", "raw") if driver is not None else "raw",
            bus=target.get("bus", "virtio"),
            cache=driver.get("cache", "default") if driver is not None else "default",
            device=el.get("device", "disk")))
    return disks


GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


def has_guest_agent_channel(xml: str) -> bool:
    """Whether the domain has the QEMU guest agent's virtio-serial channel."""
    root = etree.fromstring(xml.encode())
    return any(t.get("name") == GUEST_AGENT_CHANNEL
               for t in root.findall("./devices/channel/target"))


def copy_target_xml(path: str, driver_format: str = "qcow2") -> str:
    """The <disk> a block copy job writes into."""
    disk = etree.Element("disk", type="file")
    _sub(disk, "driver", type=driver_format)
    _sub(disk, "source", file=path)
    return etree.tostring(disk, encoding="unicode")
