"""LinuxNet against a fake netlink kernel: what it asks for, idempotence,
and the errors it turns kernel refusals into."""

from __future__ import annotations

import pytest

from compute_agent import exception
from compute_agent.network import linux_net
from compute_agent.network.linux_net import VXLAN_FLOOD_MAC, LinuxNet
from tests.unit.fake_netlink import FakeKernel


@pytest.fixture
def kernel(monkeypatch):
    k = FakeKernel()
    monkeypatch.setattr(linux_net, "IPRoute", k.iproute)
    return k


def _adds(kernel):
    return [kw for what, cmd, kw in kernel.requests if what == "link" and cmd == "add"]


def test_ensure_bridge_creates_it_up_without_link_local_and_is_idempotent(kernel):
    net = LinuxNet()
    net.ensure_bridge("br100")
    net.ensure_bridge("br100")
    (add,) = _adds(kernel)
    assert add["kind"] == "bridge" and add["ifname"] == "br100"
    assert add["br_forward_delay"] == 0
    assert kernel.links["br100"]["up"]
    af_spec = [kw for _, cmd, kw in kernel.requests if "IFLA_AF_SPEC" in kw]
    assert len(af_spec) == 1, "IPv6 address generation off on the new bridge"


def test_ensure_bridge_refuses_a_device_of_another_kind(kernel):
    kernel.add_link("eth1", None)
    with pytest.raises(exception.NetworkError, match="eth1 exists but is a plain device"):
        LinuxNet().ensure_bridge("eth1")
    assert _adds(kernel) == []


def test_vlan_plugging_asks_for_an_8021q_subinterface_of_the_physical_one(kernel):
    phys = kernel.add_link("eth1", None)
    net = LinuxNet()
    assert net.ensure_vlan("eth1", 100) == "eth1.100"
    (add,) = _adds(kernel)
    assert add == {"ifname": "eth1.100", "kind": "vlan", "link": phys["index"],
                   "vlan_id": 100}
    net.ensure_bridge("brq100")
    net.enslave("brq100", "eth1.100")
    assert kernel.links["eth1.100"]["master"] == kernel.links["brq100"]["index"]
    assert kernel.links["eth1.100"]["up"]
    # Again: nothing new.
    before = len(_adds(kernel))
    assert net.ensure_vlan("eth1", 100) == "eth1.100"
    assert len(_adds(kernel)) == before


def test_vlan_on_a_kernel_without_8021q_fails_with_a_clear_error(kernel):
    kernel.vlan_supported = False
    kernel.add_link("eth1", None)
    with pytest.raises(exception.NetworkError) as err:
        LinuxNet().ensure_vlan("eth1", 100)
    assert "eth1.100" in str(err.value) and "802.1Q" in str(err.value)
    assert "8021q" in str(err.value)


def test_vlan_needs_the_physical_interface(kernel):
    with pytest.raises(exception.NetworkError, match="physical interface eth9 does not exist"):
        LinuxNet().ensure_vlan("eth9", 5)


def test_vxlan_device_and_flood_entries_follow_the_config(kernel):
    net = LinuxNet()
    assert net.ensure_vxlan(5001, "192.0.2.1", ["192.0.2.2", "192.0.2.3"]) == "vx-5001"
    (add,) = _adds(kernel)
    assert add == {"ifname": "vx-5001", "kind": "vxlan", "vxlan_id": 5001,
                   "vxlan_local": "192.0.2.1", "vxlan_port": 4789}
    assert net.vxlan_remotes("vx-5001") == ["192.0.2.2", "192.0.2.3"]
    # A remote leaves the config: its entry goes, the device stays.
    net.ensure_vxlan(5001, "192.0.2.1", ["192.0.2.3"])
    assert net.vxlan_remotes("vx-5001") == ["192.0.2.3"]
    assert len(_adds(kernel)) == 1
    idx = kernel.links["vx-5001"]["index"]
    assert kernel.fdb == [(idx, VXLAN_FLOOD_MAC, "192.0.2.3")]


def test_vxlan_refuses_a_device_with_another_vni(kernel):
    kernel.add_link("vx-7", "vxlan", vxlan_id=8)
    with pytest.raises(exception.NetworkError, match="not a VXLAN device with VNI 7"):
        LinuxNet().ensure_vxlan(7, "192.0.2.1", [])


def test_enslave_refuses_to_steal_a_port_of_another_bridge(kernel):
    net = LinuxNet()
    net.ensure_bridge("br-a")
    net.ensure_bridge("br-b")
    kernel.add_link("eth1", None)
    net.enslave("br-a", "eth1")
    with pytest.raises(exception.NetworkError, match="already attached to another bridge"):
        net.enslave("br-b", "eth1")
    assert net.bridge_ports("br-a") == ["eth1"] and net.bridge_ports("br-b") == []


def test_set_addresses_converges(kernel):
    kernel.add_link("dhcp0", "veth")
    net = LinuxNet()
    net.set_addresses("dhcp0", ["10.0.0.254/24"])
    net.set_addresses("dhcp0", ["10.0.0.253/24"])
    assert net.addresses("dhcp0") == ["10.0.0.253/24"]


def test_delete_device_is_idempotent(kernel):
    kernel.add_link("vx-1", "vxlan", vxlan_id=1)
    net = LinuxNet()
    assert net.delete_device("vx-1") is True
    assert net.delete_device("vx-1") is False
