"""What hosts send each other during a live migration is checked field by field;
the migration XML and the downtime schedule."""

from __future__ import annotations

import copy

import pytest
from lxml import etree

from compute_agent import exception, objects
from compute_agent.virt import migrate_data as md
from compute_agent.virt.libvirt import config
from compute_agent.virt.libvirt.migration import downtime_steps, local_disks, migration_xml
from tests.unit.conftest import MINIMAL_SPEC

UUID = "3f1c3a0e-7d56-4a4b-9b0e-2d9a8f6c1e01"
HOST_INFO = {"host": "h1", "hypervisor_id": "0b6f6d0e-8a3c-4f7e-9d61-6f2f3c0e9a11",
             "virt_type": "kvm", "libvirt_version": "9.0.0", "qemu_version": "7.2.0",
             "cpu_mode": "none"}
SOURCE = {"host_info": HOST_INFO, "block_migration": True,
          "shared_storage_probe": ".live-migration-probe-" + "a" * 32,
          "disks": [{"name": "disk", "target_dev": "vda", "virtual_size": 1 << 30,
                     "actual_size": 1 << 20, "backed_by_image": True}],
          "guest_cpu_xml": None}


def test_source_data_round_trip():
    data = md.SourceCheckData.from_dict(SOURCE)
    assert data.to_dict() == SOURCE
    assert data.disk_bytes == 1 << 20


@pytest.mark.parametrize("path, value, field", [
    (("shared_storage_probe",), "../../etc/passwd", "source.shared_storage_probe"),
    (("disks", 0, "name"), "../disk", "source.disks[0].name"),
    (("disks", 0, "target_dev"), "vda; rm", "source.disks[0].target_dev"),
    (("disks", 0, "virtual_size"), -1, "source.disks[0].virtual_size"),
    (("disks", 0, "virtual_size"), True, "source.disks[0].virtual_size"),
    (("block_migration",), "yes", "source.block_migration"),
    (("host_info", "host"), "h 1", "source.host_info.host"),
    (("host_info", "qemu_version"), "7.2", "source.host_info.qemu_version"),
    (("host_info", "virt_type"), "xen", "source.host_info.virt_type"),
    (("guest_cpu_xml",), "<domain/>", "source.guest_cpu_xml"),
    (("guest_cpu_xml",), "<cpu", "source.guest_cpu_xml"),
])
def test_bad_source_data_is_refused_naming_the_field(path, value, field):
    d = copy.deepcopy(SOURCE)
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(exception.InvalidArgument) as info:
        md.SourceCheckData.from_dict(d)
    assert f"'{field}'" in str(info.value)


@pytest.mark.parametrize("path", ["relative/" + UUID, "/srv/../etc/" + UUID, "/srv/other",
                                  "/srv/x\n/" + UUID])
def test_prepared_instance_dir_must_be_a_clean_path_ending_in_the_uuid(path):
    with pytest.raises(exception.InvalidArgument):
        md.DestPrepared.from_dict({"instance_dir": path}, UUID)


def test_dest_data():
    d = {"host_info": dict(HOST_INFO, host="h2"), "shared_storage": False,
         "libvirt_uri": "qemu+tcp://127.0.0.2/system", "inbound_addr": "127.0.0.2"}
    assert md.DestCheckData.from_dict(d).to_dict() == d
    with pytest.raises(exception.InvalidArgument):
        md.DestCheckData.from_dict(dict(d, libvirt_uri="qemu+tcp://x/system\n--evil"))
    with pytest.raises(exception.InvalidArgument):
        md.DestCheckData.from_dict(dict(d, inbound_addr="1.2.3.4 5"))


def test_progress_percent():
    p = md.MigrationProgress(data_total=200, data_remaining=50, memory_total=150)
    assert p.percent == 75 and p.to_dict()["percent"] == 75
    assert md.MigrationProgress().percent is None
    assert md.MigrationProgress(data_total=10, memory_total=10).percent == 99
    assert md.MigrationProgress(data_total=10, disk_total=10).percent is None


def test_figures_ignore_junk():
    f = md.MigrationFigures.from_dict({"time_elapsed_ms": 1500, "downtime_ms": "x"})
    assert (f.time_elapsed_ms, f.downtime_ms) == (1500, None)
    assert f.summary() == "1.50s"


def test_downtime_steps_follow_nova_schedule():
    steps = list(downtime_steps(500, 10, 75, 0.5))
    assert steps[0] == (0, 50) and steps[-1] == (375.0, 500) and len(steps) == 11
    assert all(b[0] > a[0] and b[1] > a[1] for a, b in zip(steps, steps[1:], strict=False))


def _live_xml():
    cfg = config.GuestConfig(
        uuid=UUID, name="instance-" + UUID, virt_type="kvm", memory_mb=64, vcpus=1,
        cpu_mode="none", metadata=config.GuestMetadata("web", "m1", "img", "h1"),
        disks=[config.GuestDisk(f"/srv/a/{UUID}/disk", "vda")],
        serial_log=config.GuestSerialLog(f"/srv/a/{UUID}/console.log"))
    root = etree.fromstring(config.to_xml(cfg).encode())
    # libvirt shows the backing chain in the live XML
    disk_el = root.find("./devices/disk")
    backing = etree.SubElement(disk_el, "backingStore", type="file")
    etree.SubElement(backing, "source", file="/srv/a/_base/abc")
    etree.SubElement(root.find("./devices/disk"), "source-not-ours", file="/srv/a/x")
    return etree.tostring(root, encoding="unicode")


def test_migration_xml_moves_paths_and_names_the_destination():
    out = etree.fromstring(migration_xml(_live_xml(), "/srv/a", "/srv/b", "h2").encode())
    assert out.find("./devices/disk/source").get("file") == f"/srv/b/{UUID}/disk"
    assert out.find("./devices/disk/backingStore/source").get("file") == "/srv/b/_base/abc"
    assert out.find("./devices/serial/source").get("path") == f"/srv/b/{UUID}/console.log"
    assert out.find("./devices/console/source").get("path") == f"/srv/b/{UUID}/console.log"
    ns = {"ca": config.METADATA_NS}
    assert out.find("./metadata/ca:instance/ca:host", ns).text == "h2"


def test_migration_xml_leaves_other_paths_alone():
    out = migration_xml(_live_xml(), "/srv/a/", "/srv/b", "h2")
    assert "/srv/b/" + UUID in out
    same = migration_xml(_live_xml().replace("/srv/a/", "/srv/ab/"), "/srv/a", "/srv/b", "h2")
    assert "/srv/b/" not in same


def test_a_block_migration_copies_the_root_disk_never_a_volume():
    spec = dict(MINIMAL_SPEC, block_devices=[
        {"volume_id": "v1", "device": "sdb", "boot_index": None,
         "connection_info": {"driver_volume_type": "file",
                             "data": {"device_path": "/srv/vols/v1.img"}}}])
    inst = objects.Instance(spec=objects.InstanceSpec.from_dict(spec), host="h1",
                            vm_state="active")
    xml = (f"<domain><devices>"
           f"<disk type='file'><source file='/srv/a/{inst.uuid}/disk'/><target dev='vda'/></disk>"
           f"<disk type='file'><source file='/srv/vols/v1.img'/><target dev='sdb'/></disk>"
           f"<disk type='network'><source protocol='rbd' name='p/i'/><target dev='sdc'/></disk>"
           f"</devices></domain>")
    assert [d.target_dev for d in local_disks(inst, xml)] == ["vda"]
