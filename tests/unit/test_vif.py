"""NetworkDriver (plug / unplug / security groups) and DHCP bookkeeping on a
fake netlink kernel, fake iptables and a fake dnsmasq; the interface XML."""

from __future__ import annotations

import os
import signal

import pytest
from lxml import etree

from compute_agent import exception, objects
from compute_agent.network import dhcp as dhcp_mod
from compute_agent.network import linux_net, model
from compute_agent.network.vif import NetworkDriver
from compute_agent.virt.libvirt import config
from tests.unit.fake_netlink import FakeKernel
from tests.unit.test_firewall import FakeTables

VLAN_NET = {"id": "net-v", "bridge": "brq100", "cidr": "10.0.0.0/24",
            "segment": {"type": "vlan", "id": 100, "physical_interface": "eth1"}}


def _spec(uuid_tail: str, port_id: str, ip: str, network: dict = VLAN_NET,
          mac: str | None = None) -> objects.InstanceSpec:
    return objects.InstanceSpec.from_dict({
        "uuid": f"3f1c3a0e-7d56-4a4b-9b0e-2d9a8f6c1e{uuid_tail}", "name": f"vm-{uuid_tail}",
        "flavor": {"name": "m1", "vcpus": 1, "memory_mb": 64, "root_gb": 1},
        "image": {"id": "img"},
        "networks": [{"network": network,
                      "port": {"id": port_id, "mac": mac or f"fa:16:3e:00:00:{uuid_tail}",
                               "ip": ip}}]})


class FakeNetns:
    def __init__(self):
        self.names: set[str] = set()

    def listnetns(self):
        return sorted(self.names)

    def create(self, name):
        self.names.add(name)

    def remove(self, name):
        self.names.remove(name)


@pytest.fixture
def kernel(monkeypatch):
    k = FakeKernel()
    k.add_link("eth1", None)
    monkeypatch.setattr(linux_net, "IPRoute", k.iproute)
    return k


@pytest.fixture
def netns(monkeypatch):
    fake = FakeNetns()
    monkeypatch.setattr(linux_net, "pr_netns", fake)
    return fake


@pytest.fixture
def driver(conf, kernel, netns):
    conf.set_override("allowed_physical_interfaces", ["eth1"], group="network")
    return NetworkDriver(conf, tables=FakeTables())


def test_plug_builds_bridge_and_vlan_and_returns_the_interfaces(driver, kernel):
    spec = _spec("01", "port-aaaaaaaa-1", "10.0.0.5")
    (vif,) = driver.plug(spec)
    assert vif == model.VifConfig(port_id="port-aaaaaaaa-1", network_id="net-v",
                                  bridge="brq100", tap="tapport-aaaaaa",
                                  mac="fa:16:3e:00:00:01")
    assert kernel.links["eth1.100"]["master"] == kernel.links["brq100"]["index"]
    assert [p.port_id for p in driver.registry.ports("net-v")] == ["port-aaaaaaaa-1"]
    driver.plug(spec)  # hard reboot: the same again, nothing new
    assert sum(1 for what, cmd, _ in kernel.requests if cmd == "add") == 2


def test_the_network_goes_with_its_last_port_and_the_physical_interface_stays(driver,
                                                                            kernel):
    a, b = _spec("01", "port-a", "10.0.0.5"), _spec("02", "port-b", "10.0.0.6")
    driver.plug(a)
    driver.plug(b)
    driver.unplug(a)
    assert "brq100" in kernel.links and "eth1.100" in kernel.links
    assert [p.port_id for p in driver.registry.ports("net-v")] == ["port-b"]
    driver.unplug(b)
    assert "brq100" not in kernel.links and "eth1.100" not in kernel.links
    assert "eth1" in kernel.links
    assert driver.registry.network_ids() == []
    driver.unplug(b)  # idempotent


def test_a_flat_physical_interface_is_detached_never_deleted(driver, kernel):
    flat = {"id": "net-f", "bridge": "brflat", "cidr": "10.0.0.0/24",
            "segment": {"type": "flat", "physical_interface": "eth1"}}
    spec = _spec("01", "port-a", "10.0.0.5", flat)
    driver.plug(spec)
    assert kernel.links["eth1"]["master"] == kernel.links["brflat"]["index"]
    driver.unplug(spec)
    assert "brflat" not in kernel.links and "eth1" in kernel.links


def test_a_bridge_with_ports_the_agent_did_not_plug_is_left_alone(driver, kernel):
    spec = _spec("01", "port-a", "10.0.0.5")
    driver.plug(spec)
    kernel.add_link("operator0", None)["master"] = kernel.links["brq100"]["index"]
    driver.unplug(spec)
    assert "brq100" in kernel.links


def test_a_port_of_another_instance_is_a_conflict_and_its_chains_survive(driver):
    driver.plug(_spec("01", "port-a", "10.0.0.5"))
    thief = _spec("02", "port-a", "10.0.0.6")
    with pytest.raises(exception.NetworkConflict, match="plugged for instance"):
        driver.plug(thief)
    tables = driver.firewall.tables
    tables.restored.clear()
    driver.unplug(thief)  # the failed spawn's clean-up
    assert all("tapport-a" not in text for _, text in tables.restored)
    assert [p.instance_uuid[-2:] for p in driver.registry.ports("net-v")] == ["01"]


def test_the_same_bridge_for_another_network_is_a_conflict(driver):
    driver.plug(_spec("01", "port-a", "10.0.0.5"))
    other = dict(VLAN_NET, id="net-w")
    with pytest.raises(exception.NetworkConflict, match="already serves network net-v"):
        driver.plug(_spec("02", "port-b", "10.0.0.6", other))


def test_vlan_without_kernel_support_fails_before_registering(driver, kernel):
    kernel.vlan_supported = False
    with pytest.raises(exception.NetworkError, match="802.1Q"):
        driver.plug(_spec("01", "port-a", "10.0.0.5"))
    assert driver.registry.all_ports() == []


def test_security_groups_can_be_turned_off(conf, driver):
    conf.set_override("enable_security_groups", False, group="network")
    driver = NetworkDriver(conf, tables=FakeTables())
    driver.apply_firewall(_spec("01", "port-a", "10.0.0.5"))
    assert driver.firewall.tables.restored == []


# --- DHCP ---------------------------------------------------------------------

DHCP_NET = {"id": "net-d", "bridge": "brd", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1",
            "dhcp": True}


class FakeDnsmasq:
    """Stands in for processutils.execute and os.kill of the dhcp module."""

    def __init__(self, monkeypatch):
        self.started: list[list[str]] = []
        self.signals: list[int] = []
        self.pid: int | None = None
        monkeypatch.setattr(dhcp_mod.processutils, "execute", self.execute)
        monkeypatch.setattr(dhcp_mod.os, "kill", self.kill)
        monkeypatch.setattr(dhcp_mod.DhcpServers, "pid", lambda _self, net_id: self.pid)

    def execute(self, *argv, **kwargs):
        self.started.append(list(argv))
        self.pid = 4242
        return "", ""

    def kill(self, pid, sig):
        self.signals.append(sig)
        if sig in (signal.SIGTERM, signal.SIGKILL):
            self.pid = None


def test_dhcp_serves_static_leases_and_follows_the_ports(driver, kernel, netns, monkeypatch):
    dnsmasq = FakeDnsmasq(monkeypatch)
    a = _spec("01", "port-a", "10.0.0.5", DHCP_NET)
    b = _spec("02", "port-b", "10.0.0.6", DHCP_NET)
    driver.plug(a)
    ns, veth = model.dhcp_namespace("net-d"), model.dhcp_veth("net-d")
    assert netns.names == {ns}
    assert kernel.links[veth]["master"] == kernel.links["brd"]["index"]
    assert driver.linux.__class__(netns=ns).addresses("dhcp0") == ["10.0.0.254/24"]
    (argv,) = dnsmasq.started
    assert argv[:4] == ["ip", "netns", "exec", ns]
    assert "--dhcp-range=10.0.0.0,static,255.255.255.0,3600s" in argv
    assert "--dhcp-option=option:router,10.0.0.1" in argv
    assert "--port=0" in argv and "--interface=dhcp0" in argv
    assert driver.dhcp.hosts("net-d") == ["fa:16:3e:00:00:01,10.0.0.5,vm-01"]

    driver.plug(b)
    assert dnsmasq.signals == [signal.SIGHUP] and len(dnsmasq.started) == 1
    assert driver.dhcp.hosts("net-d") == ["fa:16:3e:00:00:01,10.0.0.5,vm-01",
                                          "fa:16:3e:00:00:02,10.0.0.6,vm-02"]
    driver.plug(b)  # nothing changed: no signal
    assert dnsmasq.signals == [signal.SIGHUP]

    driver.unplug(a)
    assert driver.dhcp.hosts("net-d") == ["fa:16:3e:00:00:02,10.0.0.6,vm-02"]
    driver.unplug(b)
    assert dnsmasq.signals[-1] == signal.SIGTERM and dnsmasq.pid is None
    assert netns.names == set() and veth not in kernel.links and "brd" not in kernel.links
    assert not os.path.exists(os.path.join(driver.dhcp.root, "net-d"))


def test_dhcp_restarts_when_the_network_settings_change(driver, monkeypatch):
    dnsmasq = FakeDnsmasq(monkeypatch)
    driver.plug(_spec("01", "port-a", "10.0.0.5", DHCP_NET))
    net = objects.Network.from_dict(dict(DHCP_NET, gateway="10.0.0.2"), "n.")
    driver.dhcp.sync(net, driver.registry.ports("net-d"))
    assert dnsmasq.signals == [signal.SIGTERM] and len(dnsmasq.started) == 2
    assert "--dhcp-option=option:router,10.0.0.2" in dnsmasq.started[1]


def test_interface_xml():
    cfg = config.GuestConfig(
        uuid="3f1c3a0e-7d56-4a4b-9b0e-2d9a8f6c1e01", name="instance-x", virt_type="qemu",
        memory_mb=64, vcpus=1, cpu_mode="none",
        metadata=config.GuestMetadata(name="x", flavor_name="m1", image_id="i", host="h"),
        interfaces=[config.GuestInterface(mac="fa:16:3e:00:00:01", bridge="br100",
                                          tap="tapport-aaaaaa")])
    (nic,) = etree.fromstring(config.to_xml(cfg).encode()).findall("./devices/interface")
    assert etree.tostring(nic, encoding="unicode").split() == (
        "<interface type=\"bridge\"> <mac address=\"fa:16:3e:00:00:01\"/> "
        "<source bridge=\"br100\"/> <target dev=\"tapport-aaaaaa\"/> "
        "<model type=\"virtio\"/> </interface>").split()


def test_a_bridge_that_was_there_before_is_used_but_never_removed(driver, kernel):
    kernel.add_link("brq100", "bridge")
    spec = _spec("01", "port-a", "10.0.0.5")
    driver.plug(spec)
    driver.unplug(spec)
    assert "brq100" in kernel.links and "eth1.100" not in kernel.links


def test_a_bridge_carrying_host_addresses_is_refused(driver, kernel):
    br = kernel.add_link("brq100", "bridge")
    kernel.addrs[br["index"]] = {("192.168.122.1", 24)}
    with pytest.raises(exception.NetworkConflict, match="addresses of this host"):
        driver.plug(_spec("01", "port-a", "10.0.0.5"))
    assert driver.registry.all_ports() == []
