"""Security groups and anti-spoofing for each port, with iptables (bridged
IPv4, through br_netfilter) and ebtables (ARP, source MAC, IPv6).

Chains (names from ``model``; everything the agent owns starts with ``ca-``)::

    FORWARD -> ca-FORWARD:  for every port, in this order:
        --physdev-in  TAP --physdev-is-bridged -> ca-o<port>   egress of the sender
        --physdev-out TAP --physdev-is-bridged -> ca-i<port>   ingress of the receiver
        --physdev-in  TAP --physdev-is-bridged -> ACCEPT       sender checked, receiver not ours
    INPUT   -> ca-INPUT:    --physdev-in TAP -> ca-o<port>    traffic to this host's addresses
    ca-o<port>: DHCP discover from 0.0.0.0 (port MAC only); then ca-s<port>; no DHCP
                server replies; RELATED,ESTABLISHED; egress rules (all allowed when
                the groups have no egress rule, like Neutron); RETURN = allowed, DROP.
    ca-s<port>: source IP and MAC must be the port's, else DROP.
    ca-i<port>: RELATED,ESTABLISHED; DHCP replies; ingress rules; DROP.
    ebtables FORWARD/INPUT -> ca-FORWARD/ca-INPUT -i TAP -> ca-a<port>: source MAC and
                ARP sender MAC/IP must be the port's; IPv6 (not filtered here) dropped
                both ways.

One instance's change is one ``iptables-restore --noflush`` file (all its
chains and the shared ``ca-FORWARD``/``ca-INPUT``, rebuilt from the port chains
that exist), so rules never have a window where the guest is unprotected and a
bad rule changes nothing. The shared chains are rebuilt under a host-wide lock
from the ``ca-o*`` chains present, so instances of other agents on the host
keep their hooks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from oslo_log import log as logging

from compute_agent import objects
from compute_agent.network import model
from compute_agent.network.iptables import Tables

LOG = logging.getLogger(__name__)

P = model.CHAIN_PREFIX
FWD, INP = P + "FORWARD", P + "INPUT"
_CHAIN_RE = {"iptables": re.compile(rf"^:{P}([ios])(\S+) ", re.M),
             "ebtables": re.compile(rf"^:{P}(a)(\S+) ", re.M)}


@dataclass(frozen=True)
class PortFilter:
    port_id: str
    mac: str
    ip: str | None

    @property
    def short(self) -> str:
        return model.port_short(self.port_id)

    @property
    def tap(self) -> str:
        return model.tap_name(self.port_id)

    def chain(self, kind: str) -> str:
        """i: ingress, o: egress, s: spoofing (iptables); a: ARP/MAC (ebtables)."""
        return f"{P}{kind}{self.short}"


def port_filters(spec: objects.InstanceSpec) -> list[PortFilter]:
    return [PortFilter(a.port.id, a.port.mac, a.port.ip) for a in spec.networks]


# --- rules of one port --------------------------------------------------------

def _rule_match(rule: objects.SecurityGroupRule) -> list[str]:
    m: list[str] = []
    if rule.remote_ip_prefix is not None:
        m += ["-s" if rule.direction == "ingress" else "-d", rule.remote_ip_prefix]
    if rule.protocol is not None:
        m += ["-p", rule.protocol]
        lo, hi = rule.port_range_min, rule.port_range_max
        # The match module only with an option: "-m icmp" alone is an error.
        if rule.protocol == "icmp" and lo is not None:
            m += ["-m", "icmp", "--icmp-type", f"{lo}/{hi}" if hi is not None else str(lo)]
        elif lo is not None:
            m += ["-m", rule.protocol, "--dport", str(lo) if hi in (None, lo) else f"{lo}:{hi}"]
    return m


def _group_rules(groups: tuple[objects.SecurityGroup, ...], direction: str,
                 target: str) -> list[str]:
    out: list[str] = []
    for group in groups:
        for rule in group.rules:
            if rule.direction != direction:
                continue
            line = " ".join(_rule_match(rule) + ["-m", "comment", "--comment",
                                                 f'"sg {group.name}"', "-j", target])
            if line not in out:
                out.append(line)
    return out


_DHCP_REPLY = "-p udp -m udp --sport 67 --dport 68"
_DHCP_REQUEST = "-p udp -m udp --sport 68 --dport 67"
_ESTABLISHED = "-m conntrack --ctstate RELATED,ESTABLISHED"
_INVALID = "-m conntrack --ctstate INVALID"


def ingress_rules(pf: PortFilter, groups: tuple[objects.SecurityGroup, ...]) -> list[str]:
    return ([f"{_ESTABLISHED} -j ACCEPT", f"{_INVALID} -j DROP", f"{_DHCP_REPLY} -j ACCEPT"]
            + _group_rules(groups, "ingress", "ACCEPT") + ["-j DROP"])


def egress_rules(pf: PortFilter, groups: tuple[objects.SecurityGroup, ...]) -> list[str]:
    allowed = _group_rules(groups, "egress", "RETURN")
    has_egress = any(r.direction == "egress" for g in groups for r in g.rules)
    return ([f"-s 0.0.0.0/32 -d 255.255.255.255/32 {_DHCP_REQUEST} -m mac --mac-source "
             f"{pf.mac} -j RETURN",
             f"-j {pf.chain('s')}",
             f"{_DHCP_REPLY} -j DROP",
             f"{_ESTABLISHED} -j RETURN",
             f"{_INVALID} -j DROP",
             f"{_DHCP_REQUEST} -j RETURN"]
            + (allowed + ["-j DROP"] if has_egress else ["-j RETURN"]))


def spoof_rules(pf: PortFilter) -> list[str]:
    src = f"-s {pf.ip}/32 " if pf.ip else ""
    return [f"{src}-m mac --mac-source {pf.mac} -j RETURN", "-j DROP"]


def arp_rules(pf: PortFilter) -> list[str]:
    rules = [f"-s ! {pf.mac} -j DROP", f"-p ARP --arp-mac-src ! {pf.mac} -j DROP"]
    if pf.ip:
        rules += [f"-p ARP --arp-ip-src {pf.ip} -j RETURN",
                  "-p ARP --arp-ip-src 0.0.0.0 -j RETURN",  # address probes (RFC 5227)
                  "-p ARP -j DROP"]
    return rules + ["-p IPv6 -j DROP"]


# --- whole files ----------------------------------------------------------------

def ported_shorts(saved: str, tool: str) -> set[str]:
    """Ports whose chains exist, from ``*-save`` output."""
    found: dict[str, set[str]] = {}
    for kind, short in _CHAIN_RE[tool].findall(saved):
        found.setdefault(short, set()).add(kind)
    need = {"i", "o", "s"} if tool == "iptables" else {"a"}
    return {short for short, kinds in found.items() if need <= kinds}


def existing_chains(saved: str) -> set[str]:
    """Every ``ca-`` chain declared in ``*-save`` output."""
    return {line[1:].split()[0] for line in saved.splitlines()
            if line.startswith(":" + P)}


def _hook_missing(saved: str, builtin: str, chain: str) -> bool:
    return f"-A {builtin} -j {chain}" not in saved.splitlines()


def iptables_text(saved: str, ports: list[PortFilter],
                  groups: tuple[objects.SecurityGroup, ...] | None) -> str:
    """The restore file that gives ``ports`` their chains (``groups`` given)
    or removes them (``groups`` None), rebuilding the shared chains."""
    shorts = ported_shorts(saved, "iptables")
    mine = {pf.short for pf in ports}
    shorts = shorts | mine if groups is not None else shorts - mine
    # Removal declares (flushes) and deletes only the chains that exist.
    have = existing_chains(saved) if groups is None else None
    chains = [pf.chain(k) for pf in ports for k in "ios"
              if have is None or pf.chain(k) in have]
    lines = ["*filter", f":{FWD} - [0:0]", f":{INP} - [0:0]"]
    lines += [f":{c} - [0:0]" for c in chains]
    if _hook_missing(saved, "FORWARD", FWD):
        lines.append(f"-I FORWARD 1 -j {FWD}")
    if _hook_missing(saved, "INPUT", INP):
        lines.append(f"-I INPUT 1 -j {INP}")
    ordered = sorted(shorts)
    phys = "-m physdev --physdev-{} tap{} --physdev-is-bridged -j {}"
    lines += [f"-A {FWD} " + phys.format("in", s, f"{P}o{s}") for s in ordered]
    lines += [f"-A {FWD} " + phys.format("out", s, f"{P}i{s}") for s in ordered]
    lines += [f"-A {FWD} " + phys.format("in", s, "ACCEPT") for s in ordered]
    lines += [f"-A {INP} -m physdev --physdev-in tap{s} -j {P}o{s}" for s in ordered]
    if groups is None:
        return "\n".join(lines + [f"-X {c}" for c in chains] + ["COMMIT", ""])
    for pf in ports:
        lines += [f"-A {pf.chain('i')} {r}" for r in ingress_rules(pf, groups)]
        lines += [f"-A {pf.chain('o')} {r}" for r in egress_rules(pf, groups)]
        lines += [f"-A {pf.chain('s')} {r}" for r in spoof_rules(pf)]
    return "\n".join(lines + ["COMMIT", ""])


def ebtables_text(saved: str, ports: list[PortFilter], add: bool) -> str:
    shorts = ported_shorts(saved, "ebtables")
    mine = {pf.short for pf in ports}
    shorts = shorts | mine if add else shorts - mine
    have = existing_chains(saved)
    chains = [pf.chain("a") for pf in ports if add or pf.chain("a") in have]
    lines = ["*filter", f":{FWD} RETURN", f":{INP} RETURN"]
    lines += [f":{c} RETURN" for c in chains]
    if _hook_missing(saved, "FORWARD", FWD):
        lines.append(f"-I FORWARD 1 -j {FWD}")
    if _hook_missing(saved, "INPUT", INP):
        lines.append(f"-I INPUT 1 -j {INP}")
    for s in sorted(shorts):
        lines += [f"-A {FWD} -i tap{s} -j {P}a{s}", f"-A {FWD} -o tap{s} -p IPv6 -j DROP",
                  f"-A {INP} -i tap{s} -j {P}a{s}"]
    if not add:
        return "\n".join(lines + [f"-X {c}" for c in chains] + ["COMMIT", ""])
    for pf in ports:
        lines += [f"-A {pf.chain('a')} {r}" for r in arp_rules(pf)]
    return "\n".join(lines + ["COMMIT", ""])


class Firewall:
    def __init__(self, tables: Tables):
        self.tables = tables

    def apply(self, spec: objects.InstanceSpec) -> None:
        """Give every port of the instance its chains for the spec's groups
        (create or replace). Idempotent."""
        ports = port_filters(spec)
        if not ports:
            return
        self.tables.ensure_br_netfilter()
        with self.tables.locked():
            self.tables.restore("iptables", iptables_text(
                self.tables.save("iptables"), ports, spec.security_groups))
            self.tables.restore("ebtables", ebtables_text(
                self.tables.save("ebtables"), ports, add=True))
        LOG.info("Security groups applied to ports %s: %s", [p.port_id for p in ports],
                 [g.name for g in spec.security_groups] or "(none: ingress closed)",
                 instance_uuid=spec.uuid)

    def remove(self, spec: objects.InstanceSpec) -> None:
        """Remove the instance's chains and hooks. Idempotent."""
        ports = port_filters(spec)
        if not ports:
            return
        with self.tables.locked():
            self.tables.restore("ebtables", ebtables_text(
                self.tables.save("ebtables"), ports, add=False))
            self.tables.restore("iptables", iptables_text(
                self.tables.save("iptables"), ports, None))
        LOG.info("Firewall chains of ports %s removed", [p.port_id for p in ports],
                 instance_uuid=spec.uuid)

    def chains(self) -> dict[str, set[str]]:
        """Port short ids whose chains exist, per tool (for checks and tests)."""
        return {tool: ported_shorts(self.tables.save(tool), tool)
                for tool in ("iptables", "ebtables")}
