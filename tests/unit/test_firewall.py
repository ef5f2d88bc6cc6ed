"""The iptables/ebtables files generated for an instance, chain names, and how
Firewall applies them (atomically, only ca- chains, hooks once)."""

from __future__ import annotations

import pytest

from compute_agent import exception, objects
from compute_agent.network import firewall
from compute_agent.network.firewall import Firewall, PortFilter

PORT_ID = "5b7d2c1e-4f6a-4b8c-9d0e-1f2a3b4c5d6e"
UUID = "3f1c3a0e-7d56-4a4b-9b0e-2d9a8f6c1e01"

EMPTY_SAVE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
"""


def _spec(groups=(), ports=((PORT_ID, "fa:16:3e:00:00:01", "10.0.0.5"),)) -> objects.InstanceSpec:
    return objects.InstanceSpec.from_dict({
        "uuid": UUID, "name": "web-1",
        "flavor": {"name": "m1", "vcpus": 1, "memory_mb": 64, "root_gb": 1},
        "image": {"id": "img"},
        "networks": [{"network": {"id": "net-1", "bridge": "br100", "cidr": "10.0.0.0/24"},
                      "port": {"id": pid, "mac": mac, "ip": ip}} for pid, mac, ip in ports],
        "security_groups": list(groups)})


WEB = {"name": "web", "rules": [
    {"direction": "ingress", "protocol": "tcp", "port_range_min": 80, "port_range_max": 80,
     "remote_ip_prefix": "0.0.0.0/0"},
    {"direction": "ingress", "protocol": "tcp", "port_range_min": 8000,
     "port_range_max": 8080, "remote_ip_prefix": "10.1.0.0/16"},
    {"direction": "ingress", "protocol": "icmp", "port_range_min": 8, "port_range_max": 0},
    {"direction": "ingress", "protocol": "udp", "port_range_min": 53}]}


def test_chain_names_come_from_the_port_id_and_fit_iptables():
    pf = PortFilter(PORT_ID, "fa:16:3e:00:00:01", "10.0.0.5")
    assert pf.tap == "tap5b7d2c1e-4f" and len(pf.tap) <= 14
    assert [pf.chain(k) for k in "iosa"] == ["ca-i5b7d2c1e-4f", "ca-o5b7d2c1e-4f",
                                              "ca-s5b7d2c1e-4f", "ca-a5b7d2c1e-4f"]
    assert all(len(pf.chain(k)) <= 28 for k in "iosa")


def test_iptables_file_for_one_instance():
    spec = _spec([WEB])
    text = firewall.iptables_text(EMPTY_SAVE, firewall.port_filters(spec), spec.security_groups)
    s, t = "5b7d2c1e-4f", "tap5b7d2c1e-4f"
    assert text == f"""*filter
:ca-FORWARD - [0:0]
:ca-INPUT - [0:0]
:ca-i{s} - [0:0]
:ca-o{s} - [0:0]
:ca-s{s} - [0:0]
-I FORWARD 1 -j ca-FORWARD
-I INPUT 1 -j ca-INPUT
-A ca-FORWARD -m physdev --physdev-in {t} --physdev-is-bridged -j ca-o{s}
-A ca-FORWARD -m physdev --physdev-out {t} --physdev-is-bridged -j ca-i{s}
-A ca-FORWARD -m physdev --physdev-in {t} --physdev-is-bridged -j ACCEPT
-A ca-INPUT -m physdev --physdev-in {t} -j ca-o{s}
-A ca-i{s} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ca-i{s} -m conntrack --ctstate INVALID -j DROP
-A ca-i{s} -p udp -m udp --sport 67 --dport 68 -j ACCEPT
-A ca-i{s} -s 0.0.0.0/0 -p tcp -m tcp --dport 80 -m comment --comment "sg web" -j ACCEPT
-A ca-i{s} -s 10.1.0.0/16 -p tcp -m tcp --dport 8000:8080 -m comment --comment "sg web" -j ACCEPT
-A ca-i{s} -p icmp -m icmp --icmp-type 8/0 -m comment --comment "sg web" -j ACCEPT
-A ca-i{s} -p udp -m udp --dport 53 -m comment --comment "sg web" -j ACCEPT
-A ca-i{s} -j DROP
-A ca-o{s} -s 0.0.0.0/32 -d 255.255.255.255/32 -p udp -m udp --sport 68 --dport 67 -m mac --mac-source fa:16:3e:00:00:01 -j RETURN
-A ca-o{s} -j ca-s{s}
-A ca-o{s} -p udp -m udp --sport 67 --dport 68 -j DROP
-A ca-o{s} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A ca-o{s} -m conntrack --ctstate INVALID -j DROP
-A ca-o{s} -p udp -m udp --sport 68 --dport 67 -j RETURN
-A ca-o{s} -j RETURN
-A ca-s{s} -s 10.0.0.5/32 -m mac --mac-source fa:16:3e:00:00:01 -j RETURN
-A ca-s{s} -j DROP
COMMIT
"""  # noqa: E501


def test_no_group_closes_ingress_but_keeps_dhcp_and_replies():
    pf = PortFilter(PORT_ID, "fa:16:3e:00:00:01", "10.0.0.5")
    assert firewall.ingress_rules(pf, ()) == [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-m conntrack --ctstate INVALID -j DROP",
        "-p udp -m udp --sport 67 --dport 68 -j ACCEPT",
        "-j DROP"]


def test_egress_rules_turn_the_default_to_drop():
    pf = PortFilter(PORT_ID, "fa:16:3e:00:00:01", "10.0.0.5")
    groups = _spec([{"name": "out", "rules": [
        {"direction": "egress", "protocol": "tcp", "port_range_min": 443,
         "port_range_max": 443, "remote_ip_prefix": "192.0.2.0/24"},
        {"direction": "egress", "protocol": "icmp"}]}]).security_groups
    rules = firewall.egress_rules(pf, groups)
    assert rules[-3:] == [
        '-d 192.0.2.0/24 -p tcp -m tcp --dport 443 -m comment --comment "sg out" -j RETURN',
        '-p icmp -m comment --comment "sg out" -j RETURN',
        "-j DROP"]


def test_rules_that_allow_everything_and_duplicates():
    pf = PortFilter(PORT_ID, "fa:16:3e:00:00:01", "10.0.0.5")
    any_rule = {"direction": "ingress", "remote_ip_prefix": "10.0.0.0/24"}
    groups = _spec([{"name": "a", "rules": [any_rule, any_rule]}]).security_groups
    assert firewall.ingress_rules(pf, groups)[3:] == [
        '-s 10.0.0.0/24 -m comment --comment "sg a" -j ACCEPT', "-j DROP"]


def test_a_port_without_ip_is_held_to_its_mac():
    pf = PortFilter(PORT_ID, "fa:16:3e:00:00:01", None)
    assert firewall.spoof_rules(pf) == ["-m mac --mac-source fa:16:3e:00:00:01 -j RETURN",
                                        "-j DROP"]
    assert not any("arp-ip-src" in r for r in firewall.arp_rules(pf))


def test_ebtables_file_closes_arp_and_mac_spoofing_and_ipv6():
    spec = _spec()
    text = firewall.ebtables_text("*filter\n:INPUT ACCEPT\n:FORWARD ACCEPT\n",
                                  firewall.port_filters(spec), add=True)
    s, t = "5b7d2c1e-4f", "tap5b7d2c1e-4f"
    assert text.splitlines() == [
        "*filter", ":ca-FORWARD RETURN", ":ca-INPUT RETURN", f":ca-a{s} RETURN",
        "-I FORWARD 1 -j ca-FORWARD", "-I INPUT 1 -j ca-INPUT",
        f"-A ca-FORWARD -i {t} -j ca-a{s}", f"-A ca-FORWARD -o {t} -p IPv6 -j DROP",
        f"-A ca-INPUT -i {t} -j ca-a{s}",
        f"-A ca-a{s} -s ! fa:16:3e:00:00:01 -j DROP",
        f"-A ca-a{s} -p ARP --arp-mac-src ! fa:16:3e:00:00:01 -j DROP",
        f"-A ca-a{s} -p ARP --arp-ip-src 10.0.0.5 -j RETURN",
        f"-A ca-a{s} -p ARP --arp-ip-src 0.0.0.0 -j RETURN",
        f"-A ca-a{s} -p ARP -j DROP",
        f"-A ca-a{s} -p IPv6 -j DROP",
        "COMMIT"]


OTHER_SAVED = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:ca-FORWARD - [0:0]
:ca-INPUT - [0:0]
:ca-iotherport01 - [0:0]
:ca-ootherport01 - [0:0]
:ca-sotherport01 - [0:0]
:ca-ihalfport001 - [0:0]
:somebody-elses - [0:0]
-A INPUT -j ca-INPUT
-A FORWARD -j ca-FORWARD
-A FORWARD -j somebody-elses
COMMIT
"""


def test_shared_chains_keep_other_ports_and_hooks_are_not_repeated():
    spec = _spec([WEB])
    text = firewall.iptables_text(OTHER_SAVED, firewall.port_filters(spec),
                                  spec.security_groups)
    assert "-I FORWARD" not in text and "-I INPUT" not in text
    assert ("-A ca-FORWARD -m physdev --physdev-in tapotherport01 --physdev-is-bridged "
            "-j ca-ootherport01") in text
    assert "halfport" not in text, "a port without all its chains is not hooked"
    assert "somebody-elses" not in text, "chains that are not ours are never declared"
    assert "FORWARD DROP" not in text, "built-in chains and policies are not touched"


def test_removal_deletes_only_existing_chains_of_the_instance():
    saved = OTHER_SAVED.replace(":ca-INPUT - [0:0]\n", ":ca-INPUT - [0:0]\n"
                                ":ca-i5b7d2c1e-4f - [0:0]\n:ca-o5b7d2c1e-4f - [0:0]\n")
    text = firewall.iptables_text(saved, firewall.port_filters(_spec()), None)
    assert "-X ca-i5b7d2c1e-4f" in text and "-X ca-o5b7d2c1e-4f" in text
    assert "ca-s5b7d2c1e-4f" not in text
    assert "tap5b7d2c1e-4f" not in text, "its hooks are gone from the shared chains"
    assert "tapotherport01" in text
    assert firewall.iptables_text(EMPTY_SAVE, firewall.port_filters(_spec()), None).count(
        "-X") == 0


class FakeTables:
    def __init__(self, fail_on: str | None = None):
        self.saved = {"iptables": EMPTY_SAVE, "ebtables": "*filter\n"}
        self.restored: list[tuple[str, str]] = []
        self.fail_on = fail_on
        self.locks = 0

    def locked(self):
        import contextlib

        @contextlib.contextmanager
        def cm():
            self.locks += 1
            yield
        return cm()

    def save(self, tool):
        return self.saved[tool]

    def restore(self, tool, text):
        if tool == self.fail_on:
            raise exception.FirewallError(reason=f"{tool} said no")
        self.restored.append((tool, text))

    def ensure_br_netfilter(self):
        pass


def test_apply_restores_iptables_then_ebtables_under_the_lock():
    tables = FakeTables()
    Firewall(tables).apply(_spec([WEB]))
    assert [t for t, _ in tables.restored] == ["iptables", "ebtables"]
    assert tables.locks == 1


def test_a_rejected_iptables_file_stops_before_ebtables():
    tables = FakeTables(fail_on="iptables")
    with pytest.raises(exception.FirewallError, match="iptables said no"):
        Firewall(tables).apply(_spec([WEB]))
    assert tables.restored == []


def test_an_instance_without_ports_needs_no_firewall():
    tables = FakeTables()
    Firewall(tables).apply(_spec(ports=()))
    Firewall(tables).remove(_spec(ports=()))
    assert tables.restored == []
