"""InstanceSpec.from_dict: the only door a spec comes in through."""

from __future__ import annotations

import copy
import re

import pytest

from compute_agent import exception, objects

UUID = "5b0a3b1c-2f4e-4d6a-8c1b-9e7f6a5d4c3b"
DELETE = object()  # marker: remove the key instead of setting it


def full_spec() -> dict:
    """A valid spec using every section."""
    return {
        "uuid": UUID,
        "name": "db-1.example_a",
        "flavor": {"name": "m1.small", "vcpus": 2, "memory_mb": 2048, "root_gb": 20,
                   "ephemeral_gb": 5, "swap_mb": 512},
        "image": {"id": "cirros-0.6.2-x86_64"},
        "networks": [{
            "network": {"id": "net-1", "bridge": "brq1234567890ab", "cidr": "10.0.0.0/24",
                        "gateway": "10.0.0.1", "dhcp": True,
                        "segment": {"type": "vlan", "id": 100,
                                    "physical_interface": "eth1"}},
            "port": {"id": "port-1", "mac": "fa:16:3e:00:00:01", "ip": "10.0.0.5"},
        }],
        "security_groups": [{
            "name": "default",
            "rules": [
                {"direction": "ingress", "protocol": "tcp", "port_range_min": 22,
                 "port_range_max": 22, "remote_ip_prefix": "192.168.0.0/16"},
                {"direction": "egress", "protocol": None, "port_range_min": None,
                 "port_range_max": None, "remote_ip_prefix": None},
            ],
        }],
        "block_devices": [{
            "volume_id": "vol-1", "device": "vdb", "boot_index": None,
            "connection_info": {"driver_volume_type": "iscsi",
                                "data": {"target_iqn": "iqn.2024-01.x:vol-1",
                                         "auth_password": "s3cret"}},
        }],
        "metadata": {"role": "db", "owner": "team-a"},
    }


def set_path(d: dict, path: str, value) -> None:
    """Set (or with DELETE remove) ``a.b[0].c`` in a nested dict/list."""
    keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
    for k in keys[:-1]:
        d = d[k]
    if value is DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


def refused_field(spec: dict) -> tuple[str, str]:
    with pytest.raises(exception.InvalidSpec) as info:
        objects.InstanceSpec.from_dict(spec)
    return info.value.kwargs["field"], str(info.value)


# --- what is accepted ---------------------------------------------------------

def test_full_spec_round_trips():
    spec = objects.InstanceSpec.from_dict(full_spec())
    again = objects.InstanceSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.to_dict() == spec.to_dict()


def test_full_spec_fields_are_parsed():
    spec = objects.InstanceSpec.from_dict(full_spec())
    assert spec.flavor == objects.Flavor("m1.small", 2, 2048, 20, 5, 512)
    assert spec.image_id == "cirros-0.6.2-x86_64"
    (att,) = spec.networks
    assert att.network.segment == objects.Segment("vlan", 100, "eth1")
    assert att.port.ip == "10.0.0.5"
    assert [r.direction for r in spec.security_groups[0].rules] == ["ingress", "egress"]
    assert spec.block_devices[0].connection_data["target_iqn"] == "iqn.2024-01.x:vol-1"
    assert spec.metadata == {"role": "db", "owner": "team-a"}


def test_minimal_spec_gets_defaults_and_round_trips():
    d = {"uuid": UUID, "name": "a", "image": {"id": "img"},
         "flavor": {"name": "f", "vcpus": 1, "memory_mb": 16, "root_gb": 0}}
    spec = objects.InstanceSpec.from_dict(d)
    assert (spec.flavor.ephemeral_gb, spec.flavor.swap_mb) == (0, 0)
    assert spec.networks == () and spec.block_devices == () and spec.metadata == {}
    assert objects.InstanceSpec.from_dict(spec.to_dict()) == spec


def test_uppercase_dashed_uuid_is_canonicalised():
    d = full_spec()
    d["uuid"] = UUID.upper()
    assert objects.InstanceSpec.from_dict(d).uuid == UUID


def test_mac_is_lowercased():
    d = full_spec()
    set_path(d, "networks[0].port.mac", "FA:16:3E:0A:0B:0C")
    assert objects.InstanceSpec.from_dict(d).networks[0].port.mac == "fa:16:3e:0a:0b:0c"


def test_remote_prefix_is_normalised():
    d = full_spec()
    set_path(d, "security_groups[0].rules[0].remote_ip_prefix", "10.1.2.3/8")
    rule = objects.InstanceSpec.from_dict(d).security_groups[0].rules[0]
    assert rule.remote_ip_prefix == "10.0.0.0/8"


def test_icmp_type_code_range_may_be_descending():
    # For icmp the "range" is (type, code): 8/0 is echo request.
    d = full_spec()
    set_path(d, "security_groups[0].rules[0]",
             {"direction": "ingress", "protocol": "icmp", "port_range_min": 8,
              "port_range_max": 0})
    rule = objects.InstanceSpec.from_dict(d).security_groups[0].rules[0]
    assert (rule.port_range_min, rule.port_range_max) == (8, 0)


def test_boot_from_volume_needs_no_image():
    d = full_spec()
    d["image"] = None
    set_path(d, "block_devices[0].boot_index", 0)
    spec = objects.InstanceSpec.from_dict(d)
    assert spec.image_id is None and spec.block_devices[0].boot_index == 0


# --- what is refused, naming the field -------------------------------------------

BAD = [
    # uuid
    ("uuid", "not-a-uuid", "uuid"),
    ("uuid", UUID.replace("-", "").upper(), "uuid"),
    ("uuid", UUID.replace("-", ""), "uuid"),
    ("uuid", "{" + UUID + "}", "uuid"),
    ("uuid", "urn:uuid:" + UUID, "uuid"),
    ("uuid", "../" + UUID, "uuid"),
    ("uuid", 12345, "uuid"),
    ("uuid", DELETE, "uuid"),
    # name
    ("name", "<x>", "name"),
    ("name", "a/b", "name"),
    ("name", "..", "name"),
    ("name", "../etc", "name"),
    ("name", "", "name"),
    ("name", "a" * 64, "name"),
    ("name", "-leading-dash", "name"),
    ("name", "a b", "name"),
    ("name", 7, "name"),
    ("name", DELETE, "name"),
    # flavor sizes
    ("flavor.vcpus", -1, "flavor.vcpus"),
    ("flavor.vcpus", 0, "flavor.vcpus"),
    ("flavor.vcpus", 100000, "flavor.vcpus"),
    ("flavor.vcpus", True, "flavor.vcpus"),
    ("flavor.vcpus", "2", "flavor.vcpus"),
    ("flavor.vcpus", 2.0, "flavor.vcpus"),
    ("flavor.memory_mb", -512, "flavor.memory_mb"),
    ("flavor.memory_mb", 2 ** 40, "flavor.memory_mb"),
    ("flavor.memory_mb", False, "flavor.memory_mb"),
    ("flavor.memory_mb", "512", "flavor.memory_mb"),
    ("flavor.root_gb", -1, "flavor.root_gb"),
    ("flavor.root_gb", 10 ** 9, "flavor.root_gb"),
    ("flavor.root_gb", True, "flavor.root_gb"),
    ("flavor.ephemeral_gb", -5, "flavor.ephemeral_gb"),
    ("flavor.swap_mb", 10 ** 9, "flavor.swap_mb"),
    ("flavor.swap_mb", "1G", "flavor.swap_mb"),
    ("flavor.name", "<tiny>", "flavor.name"),
    # missing flavor fields
    ("flavor.name", DELETE, "flavor.name"),
    ("flavor.vcpus", DELETE, "flavor.vcpus"),
    ("flavor.memory_mb", DELETE, "flavor.memory_mb"),
    ("flavor.root_gb", DELETE, "flavor.root_gb"),
    ("flavor", DELETE, "flavor"),
    ("flavor", "m1.small", "flavor"),
    # image id
    ("image.id", "../etc/passwd", "image.id"),
    ("image.id", "a b", "image.id"),
    ("image.id", "a/b", "image.id"),
    ("image.id", ".hidden", "image.id"),
    ("image.id", "", "image.id"),
    ("image.id", 42, "image.id"),
    ("image", "cirros", "image"),
    # networks: port
    ("networks[0].port.mac", "01:00:5e:00:00:01", "networks[0].port.mac"),  # multicast
    ("networks[0].port.mac", "ff:ff:ff:ff:ff:ff", "networks[0].port.mac"),  # broadcast
    ("networks[0].port.mac", "fa:16:3e:00:00", "networks[0].port.mac"),
    ("networks[0].port.mac", "fa-16-3e-00-00-01", "networks[0].port.mac"),
    ("networks[0].port.mac", "fa:16:3e:00:00:0g", "networks[0].port.mac"),
    ("networks[0].port.mac", "fa:16:3e:00:00:01:02", "networks[0].port.mac"),
    ("networks[0].port.mac", 0xFA163E000001, "networks[0].port.mac"),
    ("networks[0].port.ip", "10.0.1.5", "networks[0].port.ip"),  # outside 10.0.0.0/24
    ("networks[0].port.ip", "fd00::5", "networks[0].port.ip"),
    ("networks[0].port.ip", "10.0.0.256", "networks[0].port.ip"),
    # networks: network
    ("networks[0].network.cidr", "10.0.0.1/24", "networks[0].network.cidr"),  # host bits
    ("networks[0].network.cidr", "10.0.0.0/33", "networks[0].network.cidr"),
    ("networks[0].network.cidr", "banana", "networks[0].network.cidr"),
    ("networks[0].network.cidr", DELETE, "networks[0].network.cidr"),
    ("networks[0].network.gateway", "10.9.0.1", "networks[0].network.gateway"),
    ("networks[0].network.bridge", "brq1234567890abc", "networks[0].network.bridge"),  # 16
    ("networks[0].network.bridge", "br/0", "networks[0].network.bridge"),
    ("networks[0].network.bridge", "br 0", "networks[0].network.bridge"),
    ("networks[0].network.bridge", "br:0", "networks[0].network.bridge"),
    ("networks[0].network.bridge", "", "networks[0].network.bridge"),
    ("networks[0].network.dhcp", "yes", "networks[0].network.dhcp"),
    ("networks[0].network.segment.type", "gre", "networks[0].network.segment.type"),
    ("networks[0].network.segment.id", 4095, "networks[0].network.segment.id"),
    ("networks[0].network.segment.physical_interface", "eth/1",
     "networks[0].network.segment.physical_interface"),
    ("networks", {"network": {}}, "networks"),
    # security groups
    ("security_groups[0].rules[0].port_range_min", 90,
     "security_groups[0].rules[0].port_range_min"),  # 90 > max 22
    ("security_groups[0].rules[0].port_range_max", 65536,
     "security_groups[0].rules[0].port_range_max"),
    ("security_groups[0].rules[0].port_range_min", -1,
     "security_groups[0].rules[0].port_range_min"),
    ("security_groups[0].rules[0].protocol", "sctp", "security_groups[0].rules[0].protocol"),
    ("security_groups[0].rules[0].protocol", None,  # ports without a protocol
     "security_groups[0].rules[0].protocol"),
    ("security_groups[0].rules[0].remote_ip_prefix", "10.0.0.0/33",
     "security_groups[0].rules[0].remote_ip_prefix"),
    ("security_groups[0].rules[0].remote_ip_prefix", "anywhere",
     "security_groups[0].rules[0].remote_ip_prefix"),
    ("security_groups[0].rules[0].direction", "sideways",
     "security_groups[0].rules[0].direction"),
    ("security_groups[0].name", "<default>", "security_groups[0].name"),
    # block devices
    ("block_devices[0].device", "hda", "block_devices[0].device"),
    ("block_devices[0].device", "/dev/vdb", "block_devices[0].device"),
    ("block_devices[0].device", "vdb1", "block_devices[0].device"),
    ("block_devices[0].device", "vd", "block_devices[0].device"),
    ("block_devices[0].connection_info.driver_volume_type", "nfs",
     "block_devices[0].connection_info.driver_volume_type"),
    ("block_devices[0].connection_info.driver_volume_type", DELETE,
     "block_devices[0].connection_info.driver_volume_type"),
    ("block_devices[0].connection_info.data", "secret",
     "block_devices[0].connection_info.data"),
    ("block_devices[0].boot_index", -1, "block_devices[0].boot_index"),
    ("block_devices[0].volume_id", "../vol", "block_devices[0].volume_id"),
    # metadata
    ("metadata", {"role": 1}, "metadata.role"),
    ("metadata", {"role": None}, "metadata.role"),
    ("metadata", {"role": ["db"]}, "metadata.role"),
    ("metadata", {"role": "x" * 256}, "metadata.role"),
    ("metadata", "role=db", "metadata"),
]


@pytest.mark.parametrize("path,value,field", BAD,
                         ids=[f"{p}={'<deleted>' if v is DELETE else repr(v)[:30]}"
                              for p, v, _ in BAD])
def test_bad_field_is_refused_naming_it(path, value, field):
    d = full_spec()
    set_path(d, path, value)
    got_field, message = refused_field(d)
    assert got_field == field
    assert f"field '{field}'" in message


def test_no_image_and_no_boot_volume_is_refused():
    d = full_spec()
    d["image"] = None  # the block device has boot_index None
    assert refused_field(d)[0] == "image.id"


def test_boot_index_other_than_zero_does_not_replace_the_image():
    d = full_spec()
    del d["image"]
    set_path(d, "block_devices[0].boot_index", 1)
    assert refused_field(d)[0] == "image.id"


@pytest.mark.parametrize("spec", [None, [], "spec", 42])
def test_spec_that_is_not_an_object_is_refused(spec):
    assert refused_field(spec)[0] == "instance"


@pytest.mark.parametrize("path,value", [
    ("name", "web\n"),
    ("flavor.name", "m1.small\n"),
    ("image.id", "cirros\n"),
    ("networks[0].network.bridge", "br0\n"),
    ("networks[0].port.mac", "fa:16:3e:00:00:01\n"),
    ("block_devices[0].device", "vdb\n"),
])
def test_trailing_newline_is_refused(path, value):
    d = full_spec()
    set_path(d, path, value)
    assert refused_field(d)[0] == path


@pytest.mark.parametrize("path,value", [
    ("networks[0].network.cidr", 167772160),  # silently becomes 10.0.0.0/32
    ("networks[0].port.ip", 167772165),  # becomes 10.0.0.5
    ("security_groups[0].rules[0].remote_ip_prefix", 0),  # becomes 0.0.0.0/32
])
def test_number_is_not_an_address(path, value):
    d = full_spec()
    if path.endswith("cidr"):
        set_path(d, "networks[0].network.gateway", None)
        set_path(d, "networks[0].port.ip", None)
    set_path(d, path, value)
    assert refused_field(d)[0] == path


# --- Instance -------------------------------------------------------------------

def test_instance_to_dict_hides_volume_connection_data():
    spec = objects.InstanceSpec.from_dict(full_spec())
    original = copy.deepcopy(spec.block_devices[0].connection_data)
    inst = objects.Instance(spec=spec, host="h1", vm_state="active")
    d = inst.to_dict()
    bdm = d["spec"]["block_devices"][0]
    assert bdm["connection_info"]["data"] == "<hidden>"
    assert bdm["connection_info"]["driver_volume_type"] == "iscsi"
    assert "s3cret" not in repr(d)
    # The record itself keeps the data for the driver.
    assert inst.spec.block_devices[0].connection_data == original


def test_instance_to_dict_fields():
    spec = objects.InstanceSpec.from_dict(full_spec())
    fault = objects.Fault("spawn", "create_disks", "boom", "2024-01-01T00:00:00")
    d = objects.Instance(spec=spec, host="h1", vm_state="error", fault=fault).to_dict()
    assert (d["uuid"], d["name"], d["host"], d["vm_state"]) == (UUID, "db-1.example_a", "h1",
                                                                "error")
    assert d["fault"] == {"operation": "spawn", "step": "create_disks", "message": "boom",
                          "at": "2024-01-01T00:00:00"}
    assert d["flavor"]["vcpus"] == 2 and d["image"] == {"id": "cirros-0.6.2-x86_64"}
