"""Networking with real bridges, dnsmasq, iptables and ebtables, and real
traffic between network namespaces - no VM needed.

The agent's NetworkDriver plugs "instances" whose guests are namespaces: a
veth pair stands in for the tap libvirt would create (host end named like the
tap, attached to the bridge; the other end, with the port's MAC, in the guest
namespace). A client namespace on the same bridge plays the outside world.
Every namespace, device, chain and dnsmasq is removed at the end.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
import uuid as uuidlib

import libvirt
import pytest
from oslo_config import cfg

from compute_agent import conf as ca_conf
from compute_agent import exception, objects
from compute_agent.network import firewall, model
from compute_agent.network.iptables import Tables
from compute_agent.network.linux_net import LinuxNet
from compute_agent.network.vif import NetworkDriver
from tests.functional.agent_fixture import wait_for, wait_for_console
from tests.functional.conftest import make_spec
from tests.functional.netns_env import NetEnv, run

pytestmark = pytest.mark.skipif(
    subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0",
    reason="needs root (network namespaces, iptables)")


@pytest.fixture
def env():
    e = NetEnv()
    yield e
    errors = e.cleanup()
    assert not errors, errors


def _conf(state_path: str, **network) -> cfg.ConfigOpts:
    c = cfg.ConfigOpts()
    ca_conf.register_opts(c)
    c([], project="compute-agent-ft", default_config_files=[])
    c.set_override("state_path", state_path)
    for k, v in network.items():
        c.set_override(k, v, group="network")
    return c


def _driver(env: NetEnv, state_path: str, **kwargs) -> tuple[NetworkDriver, list]:
    """A NetworkDriver; every spec it plugged is unplugged at clean-up."""
    conf = _conf(state_path, **kwargs.pop("network", {}))
    driver = NetworkDriver(conf, **kwargs)
    plugged: list[objects.InstanceSpec] = []

    def unplug_all():
        for spec in plugged:
            driver.unplug(spec)
    env.cleanups.append(unplug_all)
    return driver, plugged


def _spec(env: NetEnv, name: str, net: dict, port_letter: str, ip: str | None,
          groups: list | None = None) -> objects.InstanceSpec:
    mac = f"fa:16:3e:{random.randrange(256):02x}:{random.randrange(256):02x}:" \
          f"{ord(port_letter):02x}"
    return objects.InstanceSpec.from_dict({
        "uuid": str(uuidlib.uuid4()), "name": name,
        "flavor": {"name": "ft", "vcpus": 1, "memory_mb": 64, "root_gb": 1},
        "image": {"id": "none"},
        # port ids differ in their first 11 characters: one tap each
        "networks": [{"network": net, "port": {"id": f"{port_letter}{env.suffix}-port-x",
                                               "mac": mac, "ip": ip}}],
        "security_groups": groups or []})


def _subnet() -> str:
    return f"10.{random.randrange(100, 250)}.{random.randrange(256)}"


def _chains_of(spec: objects.InstanceSpec) -> list[str]:
    short = model.port_short(spec.networks[0].port.id)
    saved = run("iptables-save", "-t", "filter").stdout + run("ebtables-save").stdout
    return [line for line in saved.splitlines() if short in line]


WEB = {"name": "web", "rules": [
    {"direction": "ingress", "protocol": "tcp", "port_range_min": 80, "port_range_max": 80,
     "remote_ip_prefix": "0.0.0.0/0"},
    {"direction": "ingress", "protocol": "icmp", "port_range_min": 8}]}
ALT = {"name": "alt", "rules": [
    {"direction": "ingress", "protocol": "tcp", "port_range_min": 8080,
     "port_range_max": 8080}]}


def test_dhcp_security_groups_and_anti_spoofing(env, tmp_path):
    driver, plugged = _driver(env, str(tmp_path / "state"))
    sub = _subnet()
    net = {"id": f"ftnet-{env.suffix}", "bridge": env.name("ftbr"), "cidr": f"{sub}.0/24",
           "gateway": f"{sub}.1", "dhcp": True}
    a = _spec(env, "guest-a", net, "a", f"{sub}.5", [WEB])
    b = _spec(env, "guest-b", net, "b", f"{sub}.6")
    # The driver's order: plug, firewall, then the domain (here: the namespace) starts.
    for spec in (a, b):
        vif, = driver.plug(spec)
        plugged.append(spec)
        driver.apply_firewall(spec)
        assert vif.bridge == net["bridge"] and vif.mac == spec.networks[0].port.mac
    ga, gb, client = env.netns("ftga"), env.netns("ftgb"), env.netns("ftcl")
    tap_a, tap_b = (model.tap_name(s.networks[0].port.id) for s in (a, b))
    env.plug_namespace(net["bridge"], tap_a, ga, mac=a.networks[0].port.mac)
    env.plug_namespace(net["bridge"], tap_b, gb, mac=b.networks[0].port.mac)
    client_mac = f"02:00:00:00:{random.randrange(256):02x}:01"
    env.plug_namespace(net["bridge"], env.name("ftcl"), client, mac=client_mac,
                       cidr=f"{sub}.100/24")

    # The host has no address on the network; DHCP lives in its own namespace.
    assert LinuxNet().addresses(net["bridge"]) == []
    assert f"{sub}.254/24" in LinuxNet(model.dhcp_namespace(net["id"])).addresses("dhcp0")

    # DHCP: each guest gets its static lease (through its own firewall chains).
    assert env.dhcp_lease(ga) == f"{sub}.5"
    assert env.dhcp_lease(gb) == f"{sub}.6"
    env.sh(ga, "ip", "addr", "add", f"{sub}.5/24", "dev", "eth0")
    env.sh(gb, "ip", "addr", "add", f"{sub}.6/24", "dev", "eth0")
    for g, text in ((ga, "a"), (gb, "b")):
        env.httpd(g, 80, f"hello from {text}")
        env.httpd(g, 8080, f"alt from {text}")

    # Ingress: only what a rule allows.
    assert env.http_get(client, f"{sub}.5") == "hello from a"
    assert not env.tcp_open(client, f"{sub}.5", 8080), "no rule for 8080"
    assert not env.tcp_open(client, f"{sub}.6", 80), "b has no security group"
    assert env.ping(client, f"{sub}.5"), "ICMP echo allowed on a"
    assert not env.ping(client, f"{sub}.6"), "ICMP not allowed on b"
    # Egress is open by default; guest to guest, a's ingress rules decide.
    assert env.http_get(gb, f"{sub}.5") == "hello from a"
    assert not env.tcp_open(ga, f"{sub}.6", 80)

    # Anti-spoofing, frame by frame: from b, only its own MAC/IP (and ARP for its IP) pass.
    b_mac = b.networks[0].port.mac
    frames = [
        {"kind": "udp", "src_mac": b_mac, "dst_mac": client_mac, "src_ip": f"{sub}.6",
         "dst_ip": f"{sub}.100", "marker": "legit"},
        {"kind": "udp", "src_mac": b_mac, "dst_mac": client_mac, "src_ip": f"{sub}.77",
         "dst_ip": f"{sub}.100", "marker": "forged-ip"},
        {"kind": "udp", "src_mac": b_mac, "dst_mac": client_mac, "src_ip": f"{sub}.5",
         "dst_ip": f"{sub}.100", "marker": "stolen-ip"},
        {"kind": "udp", "src_mac": "fa:16:3e:99:99:99", "dst_mac": client_mac,
         "src_ip": f"{sub}.6", "dst_ip": f"{sub}.100", "marker": "forged-mac"},
        {"kind": "arp", "src_mac": b_mac, "dst_mac": "ff:ff:ff:ff:ff:ff",
         "src_ip": f"{sub}.6", "dst_ip": f"{sub}.100"},
        {"kind": "arp", "src_mac": b_mac, "dst_mac": "ff:ff:ff:ff:ff:ff",
         "src_ip": f"{sub}.5", "dst_ip": f"{sub}.100"},  # claims a's address
        {"kind": "arp", "src_mac": b_mac, "arp_mac": "fa:16:3e:99:99:99",
         "dst_mac": "ff:ff:ff:ff:ff:ff", "src_ip": f"{sub}.6", "dst_ip": f"{sub}.100"},
    ]
    sniffer = env.sniff(client)
    env.send_frames(gb, frames)
    seen = env.sniffed(sniffer)
    markers = {f["marker"] for f in seen if f["kind"] == "udp"}
    assert markers == {"legit"}, seen
    arps = {(f["src_ip"], f["arp_mac"]) for f in seen if f["kind"] == "arp"
            and f["src_mac"] == b_mac}
    assert arps == {(f"{sub}.6", b_mac)}, seen

    # A guest cannot answer DHCP for others (a control frame shows the sniffer hears).
    sniffer = env.sniff(client)
    env.send_frames(gb, [dict(frames[0], marker="dhcp-offer", sport=67, dport=68),
                         dict(frames[0], marker="control")])
    heard = {f.get("marker") for f in env.sniffed(sniffer)}
    assert "control" in heard and "dhcp-offer" not in heard

    # Rules change at run time, atomically: 80 closes, 8080 opens.
    a2 = objects.InstanceSpec.from_dict(dict(a.to_dict(), security_groups=[ALT]))
    driver.update_security_groups(a2)
    assert not env.tcp_open(client, f"{sub}.5", 80)
    assert env.http_get(client, f"{sub}.5", 8080) == "alt from a"
    assert not env.ping(client, f"{sub}.5")
    driver.update_security_groups(a)  # and back
    assert env.http_get(client, f"{sub}.5") == "hello from a"
    assert not env.tcp_open(client, f"{sub}.5", 8080)

    # Hard reboot re-runs everything: same result, nothing duplicated.
    before = _chains_of(a)
    driver.plug(a)
    driver.apply_firewall(a)
    assert _chains_of(a) == before
    assert env.http_get(client, f"{sub}.5") == "hello from a"

    # Unplug a (its domain gone first): its chains and lease go, b keeps DHCP.
    env.unplug_root_device(tap_a)
    driver.unplug(a)
    plugged.remove(a)
    assert _chains_of(a) == []
    assert [h.split(",")[1] for h in driver.dhcp.hosts(net["id"])] == [f"{sub}.6"]
    assert env.dhcp_lease(gb) == f"{sub}.6"
    assert driver.dhcp.pid(net["id"]) is not None

    # The last one: the DHCP server, its namespace and the bridge go too.
    env.unplug_root_device(tap_b)
    env.unplug_root_device(env.name("ftcl"))
    driver.unplug(b)
    plugged.remove(b)
    assert _chains_of(b) == []
    assert driver.dhcp.pid(net["id"]) is None
    assert model.dhcp_namespace(net["id"]) not in LinuxNet.namespaces()
    assert not LinuxNet().exists(net["bridge"])
    assert not LinuxNet().exists(model.dhcp_veth(net["id"]))


def test_generated_rules_are_accepted_by_iptables(env):
    """Every rule form the generator writes is valid for iptables/ebtables 1.8
    (nft): applied for real in a scratch namespace."""
    ns = env.netns("ftfw")
    tables = Tables("/run/compute-agent-firewall.lock", netns=ns)
    groups = [{"name": "all-forms", "rules": [
        {"direction": "ingress"},
        {"direction": "ingress", "remote_ip_prefix": "192.0.2.0/24"},
        {"direction": "ingress", "protocol": "tcp"},
        {"direction": "ingress", "protocol": "tcp", "port_range_min": 22},
        {"direction": "ingress", "protocol": "udp", "port_range_min": 1,
         "port_range_max": 65535},
        {"direction": "ingress", "protocol": "icmp"},
        {"direction": "ingress", "protocol": "icmp", "port_range_min": 3},
        {"direction": "ingress", "protocol": "icmp", "port_range_min": 3, "port_range_max": 4},
        {"direction": "egress", "protocol": "tcp", "port_range_min": 443,
         "remote_ip_prefix": "0.0.0.0/0"},
        {"direction": "egress", "protocol": "icmp"}]}]
    net = {"id": "n", "bridge": "br0", "cidr": "10.0.0.0/24"}
    spec = _spec(env, "x", net, "r", "10.0.0.5", groups)
    fw = firewall.Firewall(tables)
    fw.apply(spec)
    short = model.port_short(spec.networks[0].port.id)
    assert fw.chains() == {"iptables": {short}, "ebtables": {short}}
    saved = env.sh(ns, "iptables-save").stdout
    assert saved.count(f"-A ca-i{short} ") == 3 + 8 + 1
    # A rule the kernel refuses rolls the whole change back.
    with pytest.raises(exception.FirewallError, match="rolled back"):
        tables.restore("iptables", f"*filter\n:ca-i{short} - [0:0]\n"
                                   f"-A ca-i{short} -p tcp --dport 99999 -j ACCEPT\nCOMMIT\n")
    assert env.sh(ns, "iptables-save").stdout.count(f"-A ca-i{short} ") == 12
    fw.remove(spec)
    fw.remove(spec)
    assert fw.chains() == {"iptables": set(), "ebtables": set()}


def test_vxlan_carries_traffic_between_two_hosts(env, tmp_path):
    """Two namespaces play two hypervisors joined by an underlay link; each
    runs its own NetworkDriver (bridges, vxlan device, firewall inside its
    namespace). Guests on the two hosts share VNI and bridge, and talk."""
    host_a, host_b = env.netns("fthA", host=True), env.netns("fthB", host=True)
    u = f"192.168.{random.randrange(256)}"
    run("ip", "link", "add", "ul0", "netns", host_a, "type", "veth", "peer", "name", "ul0",
        "netns", host_b)
    env.sh(host_a, "ip", "addr", "add", f"{u}.1/24", "dev", "ul0")
    env.sh(host_b, "ip", "addr", "add", f"{u}.2/24", "dev", "ul0")
    env.sh(host_a, "ip", "link", "set", "ul0", "up")
    env.sh(host_b, "ip", "link", "set", "ul0", "up")

    vni = random.randrange(1000, 16000000)
    sub = _subnet()
    net = {"id": f"ftvx-{env.suffix}", "bridge": "brvx", "cidr": f"{sub}.0/24",
           "segment": {"type": "vxlan", "id": vni}}
    drivers = {}
    for host, local, remote in ((host_a, f"{u}.1", f"{u}.2"), (host_b, f"{u}.2", f"{u}.1")):
        drivers[host] = _driver(
            env, str(tmp_path / host), linux_net=LinuxNet(host),
            tables=Tables("/run/compute-agent-firewall.lock", netns=host),
            network={"vxlan_local_ip": local, "vxlan_remote_ips": [remote],
                     "vxlan_underlay_interface": "ul0"})
    guests = {}
    for host, letter, ip in ((host_a, "v", f"{sub}.11"), (host_b, "w", f"{sub}.12")):
        driver, plugged = drivers[host]
        spec = _spec(env, f"guest-{letter}", net, letter, ip, [WEB])
        driver.plug(spec)
        plugged.append(spec)
        driver.apply_firewall(spec)
        g = env.netns("ftg" + letter)
        env.plug_namespace("brvx", model.tap_name(spec.networks[0].port.id), g,
                           mac=spec.networks[0].port.mac, cidr=f"{ip}/24", bridge_ns=host)
        guests[letter] = g

    for host in (host_a, host_b):
        vx = LinuxNet(host).get_link(f"vx-{vni}")
        assert vx.kind == "vxlan" and vx.vxlan_id == vni and vx.mtu == 1450
        assert f"vx-{vni}" in LinuxNet(host).bridge_ports("brvx")
    env.httpd(guests["w"], 80, "hello across hosts")
    assert env.ping(guests["v"], f"{sub}.12", count=2)
    assert env.http_get(guests["v"], f"{sub}.12") == "hello across hosts"
    assert not env.tcp_open(guests["v"], f"{sub}.12", 22), "security groups apply too"
    # The encapsulation is real: UDP 4789 on the underlay.
    sniffer = env.sniff(host_b, "ul0", seconds=2)
    env.ping(guests["v"], f"{sub}.12")
    under = env.sniffed(sniffer)
    assert any(f["kind"] == "udp" and f["src_ip"] == f"{u}.1" for f in under), under

    # Unplugging on host A removes its vxlan device and bridge, not host B's.
    driver_a, plugged_a = drivers[host_a]
    env.sh(host_a, "ip", "link", "del", model.tap_name(plugged_a[0].networks[0].port.id))
    driver_a.unplug(plugged_a.pop())
    assert not LinuxNet(host_a).exists(f"vx-{vni}") and not LinuxNet(host_a).exists("brvx")
    assert LinuxNet(host_b).exists(f"vx-{vni}")


def test_vlan_segment(env, tmp_path):
    """802.1Q between two hosts; skipped where the kernel cannot make VLAN
    interfaces (as on the machines this project is developed on)."""
    host_a, host_b = env.netns("ftvA", host=True), env.netns("ftvB", host=True)
    run("ip", "link", "add", "phys0", "netns", host_a, "type", "veth", "peer", "name",
        "phys0", "netns", host_b)
    try:
        LinuxNet(host_a).ensure_vlan("phys0", 100)
    except exception.NetworkError as exc:
        if "802.1Q" in str(exc):
            pytest.skip(f"kernel without 802.1Q VLAN support: {exc}")
        raise
    sub = _subnet()
    net = {"id": f"ftvl-{env.suffix}", "bridge": "brvl", "cidr": f"{sub}.0/24",
           "segment": {"type": "vlan", "id": 100, "physical_interface": "phys0"}}
    guests = []
    for host, letter, ip in ((host_a, "v", f"{sub}.11"), (host_b, "w", f"{sub}.12")):
        env.sh(host, "ip", "link", "set", "phys0", "up")
        driver, plugged = _driver(
            env, str(tmp_path / host), linux_net=LinuxNet(host),
            tables=Tables("/run/compute-agent-firewall.lock", netns=host),
            network={"allowed_physical_interfaces": ["phys0"]})
        spec = _spec(env, f"guest-{letter}", net, letter, ip, [WEB])
        driver.plug(spec)
        plugged.append(spec)
        driver.apply_firewall(spec)
        g = env.netns("ftq" + letter)
        env.plug_namespace("brvl", model.tap_name(spec.networks[0].port.id), g,
                           mac=spec.networks[0].port.mac, cidr=f"{ip}/24", bridge_ns=host)
        guests.append(g)
    assert env.ping(guests[0], f"{sub}.12", count=2)


# --- with the real agent and real guests (TCG) ------------------------------------

def _wait_op(api, ctxt, host: str, uuid: str, name: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ops = [o for o in api.get_operations(ctxt, host, uuid, limit=5) if o["name"] == name]
        if ops and ops[0]["status"] != "running":
            return ops[0]
        time.sleep(0.3)
    raise AssertionError(f"{name} of {uuid} did not finish in {timeout}s")


def _unplug_after_agent(env: NetEnv, agent, specs: list[dict]) -> None:
    """If the test stops half-way: stop the agent, remove its guests' domains
    (their taps go with them), then unplug with the agent's own state."""
    def cleanup():
        agent.kill()
        conn = libvirt.open("qemu:///system")
        try:
            for spec in specs:
                try:
                    dom = conn.lookupByUUIDString(spec["uuid"])
                except libvirt.libvirtError:
                    continue
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        finally:
            conn.close()
        driver = NetworkDriver(_conf(agent.state_path))
        for spec in specs:
            driver.unplug(objects.InstanceSpec.from_dict(spec))
    env.cleanups.append(cleanup)


@pytest.mark.tcg
def test_real_guests_get_dhcp_and_follow_their_security_groups(api, ctxt, agent_factory,
                                                                env):
    agent = agent_factory("net", virt_type="qemu")
    sub = _subnet()
    net = {"id": f"ftnet-{env.suffix}", "bridge": env.name("ftbr"), "cidr": f"{sub}.0/24",
           "gateway": f"{sub}.1", "dhcp": True}
    specs = []
    for letter, ip, groups in (("a", f"{sub}.5", [WEB]), ("b", f"{sub}.6", [])):
        spec = make_spec(name=f"net-{letter}")
        spec["networks"] = [{"network": net, "port": {
            "id": f"{letter}{env.suffix}-port-x", "ip": ip,
            "mac": f"fa:16:3e:{random.randrange(256):02x}:00:{ord(letter):02x}"}}]
        spec["security_groups"] = groups
        specs.append(spec)
    _unplug_after_agent(env, agent, specs)
    for spec in specs:
        api.spawn(ctxt, agent.host, spec)
    for spec in specs:
        inst = wait_for(api, ctxt, agent.host, spec["uuid"],
                        lambda i: i["task_state"] is None, what="spawn")
        assert inst["vm_state"] == "active", (inst["fault"], agent.log_tail())
    (a, b) = (s["uuid"] for s in specs)
    steps = [s["name"] for s in api.get_operations(ctxt, agent.host, a)[0]["steps"]]
    assert steps.index("plug_vifs") < steps.index("apply_firewall") \
        < steps.index("define_domain")
    xml = os.path.join(agent.instances_path, a, "libvirt.xml")
    res = subprocess.run(["virt-xml-validate", xml, "domain"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr

    # The taps libvirt made, named from the port ids, are on the bridge.
    taps = [model.tap_name(s["networks"][0]["port"]["id"]) for s in specs]
    assert set(taps) <= set(LinuxNet().bridge_ports(net["bridge"]))
    client = env.netns("ftcl")
    env.plug_namespace(net["bridge"], env.name("ftcl"), client, cidr=f"{sub}.100/24")

    # Both guests take their static lease by DHCP.
    for spec, ip in zip(specs, (f"{sub}.5", f"{sub}.6"), strict=True):
        wait_for_console(api, ctxt, agent.host, spec["uuid"], f"GUEST-IP {ip}", timeout=180)
    assert env.http_get(client, f"{sub}.5") == f"hostname=net-a ip={sub}.5"
    assert not env.tcp_open(client, f"{sub}.6", 80), "b has no rule for port 80"
    assert env.ping(client, f"{sub}.5", count=2)
    assert not env.ping(client, f"{sub}.6")

    # Security groups change over RPC while the guests run.
    api.update_security_groups(ctxt, agent.host, a, [])
    api.update_security_groups(ctxt, agent.host, b, [WEB])
    for uuid in (a, b):
        op = _wait_op(api, ctxt, agent.host, uuid, "update_security_groups")
        assert op["status"] == "done", op
    assert not env.tcp_open(client, f"{sub}.5", 80)
    assert env.http_get(client, f"{sub}.6") == f"hostname=net-b ip={sub}.6"
    assert api.get_instance(ctxt, agent.host, b)["spec"]["security_groups"][0]["name"] == "web"
    with pytest.raises(exception.InvalidSpec):  # refused by the client before sending
        api.update_security_groups(ctxt, agent.host, b, [{"name": "x", "rules": [
            {"direction": "ingress", "protocol": "tcp", "port_range_min": 0}]}])

    # Hard reboot re-plugs (idempotent); the guest comes back with its address.
    api.reboot(ctxt, agent.host, b, "HARD")
    wait_for(api, ctxt, agent.host, b, lambda i: i["task_state"] is None, what="reboot")
    assert _wait_op(api, ctxt, agent.host, b, "reboot")["status"] == "done"
    wait_for_console(api, ctxt, agent.host, b, "GUEST-BOOT 2", timeout=180)
    deadline = time.monotonic() + 60
    while env.http_get(client, f"{sub}.6") is None and time.monotonic() < deadline:
        time.sleep(1)
    assert env.http_get(client, f"{sub}.6") == f"hostname=net-b ip={sub}.6"

    # Delete a: no chain, tap or lease of it is left; b keeps its network.
    hosts = os.path.join(agent.state_path, "dhcp", net["id"], "hosts")
    api.delete(ctxt, agent.host, a)
    wait_for(api, ctxt, agent.host, a, lambda i: i["vm_state"] == "deleted", what="delete")
    assert _chains_of(objects.InstanceSpec.from_dict(specs[0])) == []
    assert not LinuxNet().exists(taps[0])
    with open(hosts) as f:
        assert [line.split(",")[1] for line in f.read().split()] == [f"{sub}.6"]
    assert env.http_get(client, f"{sub}.6") is not None

    # Delete b: the network is gone from the host.
    env.unplug_root_device(env.name("ftcl"))
    api.delete(ctxt, agent.host, b)
    wait_for(api, ctxt, agent.host, b, lambda i: i["vm_state"] == "deleted", what="delete")
    assert _chains_of(objects.InstanceSpec.from_dict(specs[1])) == []
    assert not LinuxNet().exists(net["bridge"])
    assert model.dhcp_namespace(net["id"]) not in LinuxNet.namespaces()
    assert not os.path.exists(hosts)
