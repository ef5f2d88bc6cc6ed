"""Hostile or impossible network input is refused, naming the field, before
anything is plugged: by the spec parser (shapes) or by network.validate (what
this host can build)."""

from __future__ import annotations

import copy

import pytest
from oslo_config import cfg

from compute_agent import conf as ca_conf
from compute_agent import exception, objects
from compute_agent.network import validate

BASE = {
    "uuid": "3f1c3a0e-7d56-4a4b-9b0e-2d9a8f6c1e01", "name": "web-1",
    "flavor": {"name": "m1", "vcpus": 1, "memory_mb": 64, "root_gb": 1},
    "image": {"id": "img"},
    "networks": [{"network": {"id": "net-1", "bridge": "br100", "cidr": "10.0.0.0/24",
                              "gateway": "10.0.0.1", "dhcp": True},
                  "port": {"id": "port-1", "mac": "fa:16:3e:00:00:01", "ip": "10.0.0.5"}}],
    "security_groups": [{"name": "web", "rules": [
        {"direction": "ingress", "protocol": "tcp", "port_range_min": 80,
         "port_range_max": 80}]}],
}


@pytest.fixture
def net_conf():
    c = cfg.ConfigOpts()
    ca_conf.register_opts(c)
    c([], project="test")
    c.set_override("allowed_physical_interfaces", ["eth1"], group="network")
    return c.network


def _set(d: dict, path: str, value) -> dict:
    d = copy.deepcopy(d)
    keys = path.replace("]", "").replace("[", ".").split(".")
    target = d
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    last = keys[-1]
    if value is _DELETE:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return d


_DELETE = object()


def _check(d: dict, net_conf) -> None:
    validate.validate_spec(objects.InstanceSpec.from_dict(d), net_conf)


def test_the_base_spec_is_fine(net_conf):
    _check(BASE, net_conf)


@pytest.mark.parametrize("path,value,field", [
    # shapes, refused by the spec parser
    ("networks[0].port.mac", "fa:16:3e:00:00", "networks[0].port.mac"),
    ("networks[0].port.mac", "01:00:5e:00:00:01", "networks[0].port.mac"),
    ("networks[0].port.mac", "fa:16:3e:00:00:01\n", "networks[0].port.mac"),
    ("networks[0].port.ip", "10.0.0.300", "networks[0].port.ip"),
    ("networks[0].port.ip", "10.0.1.5", "networks[0].port.ip"),
    ("networks[0].port.ip", "10.0.0.5 -j ACCEPT", "networks[0].port.ip"),
    ("networks[0].network.cidr", "10.0.0.1/24", "networks[0].network.cidr"),
    ("networks[0].network.cidr", "10.0.0.0/33", "networks[0].network.cidr"),
    ("networks[0].network.cidr", "any", "networks[0].network.cidr"),
    ("networks[0].network.bridge", "br0; reboot", "networks[0].network.bridge"),
    ("networks[0].network.bridge", "a" * 16, "networks[0].network.bridge"),
    ("networks[0].network.bridge", "../etc", "networks[0].network.bridge"),
    ("networks[0].network.bridge", "br 0", "networks[0].network.bridge"),
    ("networks[0].network.segment", {"type": "flat", "physical_interface": "eth1/x"},
     "networks[0].network.segment.physical_interface"),
    ("networks[0].network.segment", {"type": "vlan", "id": 4095,
                                     "physical_interface": "eth1"},
     "networks[0].network.segment.id"),
    ("networks[0].network.segment", {"type": "vxlan", "id": 2 ** 24},
     "networks[0].network.segment.id"),
    ("networks[0].port.id", "../../x", "networks[0].port.id"),
    ("security_groups[0].rules[0].port_range_min", 90, "security_groups[0].rules[0]."
                                                       "port_range_min"),  # 90 > 80
    ("security_groups[0].rules[0].port_range_max", 65536,
     "security_groups[0].rules[0].port_range_max"),
    ("security_groups[0].rules[0].protocol", "gre", "security_groups[0].rules[0].protocol"),
    ("security_groups[0].rules[0].remote_ip_prefix", "10.0.0.0/8 -j ACCEPT",
     "security_groups[0].rules[0].remote_ip_prefix"),
    # what this host can build, refused by network.validate
    ("networks[0].network.bridge", "tap5b7d2c1e-4f", "networks[0].network.bridge"),
    ("networks[0].network.bridge", "vx-100", "networks[0].network.bridge"),
    ("networks[0].network.bridge", "lo", "networks[0].network.bridge"),
    ("networks[0].port.ip", "10.0.0.254", "networks[0].port.ip"),  # the DHCP server's
    ("networks[0].port.ip", "10.0.0.1", "networks[0].port.ip"),  # the gateway
    ("networks[0].port.ip", "10.0.0.255", "networks[0].port.ip"),  # broadcast
    ("networks[0].port.ip", "10.0.0.0", "networks[0].port.ip"),  # network address
    ("networks[0].network.gateway", "10.0.0.254", "networks[0].network.gateway"),
    ("security_groups[0].rules[0].port_range_min", 0,
     "security_groups[0].rules[0].port_range_min"),
    ("security_groups[0].rules[0].port_range_min", _DELETE,
     "security_groups[0].rules[0].port_range_min"),  # a max without a min
    ("security_groups[0].rules[0].remote_ip_prefix", "::/0",
     "security_groups[0].rules[0].remote_ip_prefix"),
    ("networks[0].network.segment", {"type": "flat", "physical_interface": "eth0"},
     "networks[0].network.segment.physical_interface"),  # not allowed on this host
    ("networks[0].network.segment", {"type": "vlan", "id": 100},
     "networks[0].network.segment.physical_interface"),
    ("networks[0].network.segment", {"type": "vxlan", "id": 100},
     "networks[0].network.segment.type"),  # no vxlan_local_ip configured
    ("networks[0].network.segment", {"type": "flat", "physical_interface": "br100"},
     "networks[0].network.segment.physical_interface"),
])
def test_hostile_or_impossible_input_is_refused(net_conf, path, value, field):
    with pytest.raises(exception.InvalidSpec) as err:
        _check(_set(BASE, path, value), net_conf)
    assert f"field '{field}'" in str(err.value)


def test_vlan_interface_name_must_fit(net_conf):
    net_conf_overrides = ["eth1", "enp0s31f6abcd"]
    c = net_conf
    c._conf.set_override("allowed_physical_interfaces", net_conf_overrides, group="network")
    d = _set(BASE, "networks[0].network.segment",
             {"type": "vlan", "id": 4000, "physical_interface": "enp0s31f6abcd"})
    with pytest.raises(exception.InvalidSpec, match="would exceed 15 characters"):
        _check(d, c)


def test_ipv6_networks_are_refused(net_conf):
    d = _set(BASE, "networks[0].network", {"id": "n6", "bridge": "br6", "cidr": "fd00::/64"})
    d = _set(d, "networks[0].port.ip", "fd00::5")
    with pytest.raises(exception.InvalidSpec, match="'networks.0..network.cidr'.*only IPv4"):
        _check(d, net_conf)


def test_dhcp_needs_room_for_the_server(net_conf):
    d = _set(BASE, "networks[0].network", {"id": "n", "bridge": "br1", "cidr": "10.0.0.4/31",
                                           "dhcp": True})
    d = _set(d, "networks[0].port.ip", "10.0.0.4")
    with pytest.raises(exception.InvalidSpec, match="too small for DHCP"):
        _check(d, net_conf)


def test_icmp_code_needs_a_type(net_conf):
    d = _set(BASE, "security_groups[0].rules[0]",
             {"direction": "ingress", "protocol": "icmp", "port_range_max": 0})
    with pytest.raises(exception.InvalidSpec, match="ICMP code"):
        _check(d, net_conf)


def _two_ports(**second) -> dict:
    d = copy.deepcopy(BASE)
    att = copy.deepcopy(d["networks"][0])
    att["port"].update(id="port-000002", mac="fa:16:3e:00:00:02", ip="10.0.0.6")
    for k, v in second.items():
        att["port"][k] = v
    d["networks"].append(att)
    d["networks"][0]["port"]["id"] = "port-000001-a"  # taps use the first 11 characters
    return d


def test_two_ports_fine(net_conf):
    _check(_two_ports(), net_conf)


@pytest.mark.parametrize("second,message", [
    ({"id": "port-000001-b"}, "both would use tap tapport-000001"),
    ({"mac": "fa:16:3e:00:00:01"}, "used by another port"),
    ({"ip": "10.0.0.5"}, "used twice"),
])
def test_ports_of_one_spec_may_not_clash(net_conf, second, message):
    with pytest.raises(exception.InvalidSpec, match=message):
        _check(_two_ports(**second), net_conf)


def test_one_bridge_for_two_different_networks_is_refused(net_conf):
    d = _two_ports()
    d["networks"][1]["network"] = dict(d["networks"][1]["network"], id="net-2")
    with pytest.raises(exception.InvalidSpec, match="bridge of another network"):
        _check(d, net_conf)


def test_security_groups_of_the_update_rpc():
    groups = validate.parse_security_groups(BASE["security_groups"])
    assert groups[0].rules[0].port_range_min == 80
    for bad in ({"name": "x"}, [{"name": "x; y", "rules": []}],
                [{"name": "x", "rules": [{"direction": "ingress", "protocol": "tcp",
                                          "port_range_min": 0}]}]):
        with pytest.raises(exception.InvalidSpec):
            validate.parse_security_groups(bad)
