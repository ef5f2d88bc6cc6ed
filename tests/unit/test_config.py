"""The domain XML builder, checked on the parsed tree."""

from __future__ import annotations

import pytest
from lxml import etree

from compute_agent.virt.libvirt import config

UUID = "5b0a3b1c-2f4e-4d6a-8c1b-9e7f6a5d4c3b"
NS = {"ca": config.METADATA_NS}
INST_DIR = f"/var/lib/compute-agent/instances/{UUID}"


def make_cfg(**overrides) -> config.GuestConfig:
    values = dict(
        uuid=UUID, name=f"instance-{UUID}", virt_type="kvm", memory_mb=2048, vcpus=2,
        cpu_mode="host-model",
        metadata=config.GuestMetadata(name="web-1", flavor_name="m1.small",
                                      image_id="cirros-0.6", host="h1"),
        disks=[
            config.GuestDisk(f"{INST_DIR}/disk", "vda"),
            config.GuestDisk(f"{INST_DIR}/disk.local", "vdb", cache="writeback"),
            config.GuestDisk(f"{INST_DIR}/disk.swap", "vdc", driver_format="raw", bus="scsi"),
        ],
        serial_log=config.GuestSerialLog(f"{INST_DIR}/console.log"),
    )
    values.update(overrides)
    return config.GuestConfig(**values)


def tree(cfg: config.GuestConfig) -> etree._Element:
    return etree.fromstring(config.to_xml(cfg).encode())


def test_domain_basics():
    root = tree(make_cfg())
    assert root.tag == "domain"
    assert root.get("type") == "kvm"
    assert root.findtext("name") == f"instance-{UUID}"
    assert root.findtext("uuid") == UUID
    assert root.findtext("title") == "web-1"
    assert root.find("memory").get("unit") == "KiB"
    assert int(root.findtext("memory")) == 2048 * 1024
    assert int(root.findtext("vcpu")) == 2


@pytest.mark.parametrize("virt_type", ["kvm", "qemu"])
def test_domain_type_follows_virt_type(virt_type):
    assert tree(make_cfg(virt_type=virt_type)).get("type") == virt_type


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_os_type_and_machine(machine):
    os_type = tree(make_cfg(machine=machine)).find("os/type")
    assert os_type.text == "hvm"
    assert os_type.get("machine") == machine
    assert os_type.get("arch") == "x86_64"


def test_features_acpi_and_apic():
    features = tree(make_cfg()).find("features")
    assert features is not None
    assert features.find("acpi") is not None
    assert features.find("apic") is not None


def test_no_cpu_element_for_cpu_mode_none():
    assert tree(make_cfg(cpu_mode="none")).find("cpu") is None


@pytest.mark.parametrize("mode", ["host-model", "host-passthrough"])
def test_cpu_element_carries_mode(mode):
    cpus = tree(make_cfg(cpu_mode=mode)).findall("cpu")
    assert [c.get("mode") for c in cpus] == [mode]


def test_disks_in_order_with_driver_and_target():
    disks = tree(make_cfg()).findall("devices/disk")
    got = [(d.get("type"), d.get("device"),
            d.find("driver").get("name"), d.find("driver").get("type"),
            d.find("driver").get("cache"), d.find("source").get("file"),
            d.find("target").get("dev"), d.find("target").get("bus")) for d in disks]
    assert got == [
        ("file", "disk", "qemu", "qcow2", "none", f"{INST_DIR}/disk", "vda", "virtio"),
        ("file", "disk", "qemu", "qcow2", "writeback", f"{INST_DIR}/disk.local", "vdb",
         "virtio"),
        ("file", "disk", "qemu", "raw", "none", f"{INST_DIR}/disk.swap", "vdc", "scsi"),
    ]


def test_serial_and_console_log_to_file():
    devices = tree(make_cfg()).find("devices")
    log = f"{INST_DIR}/console.log"
    serial, console = devices.find("serial"), devices.find("console")
    for el in (serial, console):
        assert el.get("type") == "file"
        assert el.find("source").get("path") == log
        assert el.find("source").get("append") == "on"
    assert serial.find("target").get("port") == "0"
    assert console.find("target").get("type") == "serial"


def test_no_serial_without_log():
    devices = tree(make_cfg(serial_log=None)).find("devices")
    assert devices.find("serial") is None and devices.find("console") is None


def test_metadata_in_agent_namespace():
    inst = tree(make_cfg()).find("metadata/ca:instance", NS)
    assert inst is not None
    assert {child.tag for child in inst} == {
        f"{{{config.METADATA_NS}}}{t}" for t in ("name", "flavor", "image", "host")}
    assert inst.findtext("ca:name", namespaces=NS) == "web-1"
    assert inst.findtext("ca:flavor", namespaces=NS) == "m1.small"
    assert inst.findtext("ca:image", namespaces=NS) == "cirros-0.6"
    assert inst.findtext("ca:host", namespaces=NS) == "h1"


def test_metadata_without_image_has_no_image_element():
    md = config.GuestMetadata(name="vol-boot", flavor_name="m1.small", image_id=None,
                              host="h1")
    inst = tree(make_cfg(metadata=md)).find("metadata/ca:instance", NS)
    assert inst.find("ca:image", NS) is None
    assert inst.findtext("ca:name", namespaces=NS) == "vol-boot"


def test_special_characters_are_escaped():
    # Bypasses InstanceSpec validation on purpose: the builder must be safe alone.
    nasty = "a<b>&\"c'"
    md = config.GuestMetadata(name=nasty, flavor_name="</flavor><x>", image_id="i&j",
                              host="h1")
    path = f"{INST_DIR}/d'\"<&>.qcow2"
    xml = config.to_xml(make_cfg(metadata=md, disks=[config.GuestDisk(path, "vda")]))
    root = etree.fromstring(xml.encode())
    assert root.findtext("title") == nasty
    assert root.findtext("metadata/ca:instance/ca:name", namespaces=NS) == nasty
    assert root.findtext("metadata/ca:instance/ca:flavor", namespaces=NS) == "</flavor><x>"
    assert root.find("devices/disk/source").get("file") == path
    assert root.find(".//x") is None  # no element was injected


def test_parse_disks_reads_back_what_to_xml_wrote():
    cfg = make_cfg()
    assert config.parse_disks(config.to_xml(cfg)) == cfg.disks


def test_parse_disks_skips_non_file_disks():
    xml = """<domain><devices>
      <disk type="network" device="disk"><source protocol="rbd" name="pool/vol"/>
        <target dev="vdb" bus="virtio"/></disk>
      <disk type="file" device="cdrom"><target dev="sda" bus="sata"/></disk>
      <disk type="file" device="disk"><source file="/x/disk"/>
        <target dev="vda"/></disk>
    </devices></domain>"""
    assert config.parse_disks(xml) == [
        config.GuestDisk(path="/x/disk", target_dev="vda", driver_format="raw",
                         bus="virtio", cache="default", device="disk")]
