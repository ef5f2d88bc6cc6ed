"""What the network layer refuses, before anything is plugged.

``objects.InstanceSpec.from_dict`` has already checked the shapes (MAC, IP
inside the CIDR, interface-name syntax, port numbers in range); this adds the
rules that need to know how this host builds networks: addresses the agent
reserves (the DHCP server's), IPv4 only (the firewall is iptables), which
physical interfaces the operator lets specs use, names that would collide with
the devices the agent creates, and port ranges that cannot match anything.
Every refusal is an ``InvalidSpec`` naming the field.
"""

from __future__ import annotations

import ipaddress
import re

from compute_agent import exception, objects
from compute_agent.network import model

# Names of devices the agent creates itself; a spec's bridge may not take them.
_RESERVED_IFNAMES = re.compile(r"^(tap.*|vx-.*|cad[0-9a-f]{11}|lo|dhcp0)$")


def _fail(field: str, reason: str):
    raise exception.InvalidSpec(field=field, reason=reason)


def validate_spec(spec: objects.InstanceSpec, net_conf) -> None:
    """Refuse a spec this host cannot plug as asked. ``net_conf`` is the
    ``[network]`` config group."""
    taps: dict[str, str] = {}
    macs: set[str] = set()
    bridges: dict[str, objects.Network] = {}
    ips: set[tuple[str, str]] = set()
    for i, att in enumerate(spec.networks):
        prefix = f"networks[{i}]."
        _check_network(att.network, prefix + "network.", net_conf)
        _check_port(att.port, att.network, prefix + "port.")
        tap = model.tap_name(att.port.id)
        if tap in taps:
            _fail(prefix + "port.id", f"its first {model.PORT_SHORT_LEN} characters are "
                                      f"those of port {taps[tap]!r} (both would use tap {tap})")
        taps[tap] = att.port.id
        if att.port.mac in macs:
            _fail(prefix + "port.mac", f"{att.port.mac} is used by another port of the spec")
        macs.add(att.port.mac)
        other = bridges.get(att.network.bridge)
        if other is not None and other != att.network:
            _fail(prefix + "network.bridge",
                  f"{att.network.bridge} is the bridge of another network in the spec "
                  f"({other.id}) with other settings")
        bridges[att.network.bridge] = att.network
        if att.port.ip is not None:
            if (att.network.id, att.port.ip) in ips:
                _fail(prefix + "port.ip", f"{att.port.ip} is used twice on network "
                                          f"{att.network.id}")
            ips.add((att.network.id, att.port.ip))
    validate_security_groups(spec.security_groups)


def _check_network(net: objects.Network, prefix: str, net_conf) -> None:
    cidr = ipaddress.ip_network(net.cidr)
    if cidr.version != 4:
        _fail(prefix + "cidr", f"{net.cidr}: only IPv4 networks are supported (security "
                               f"groups are enforced with iptables)")
    if _RESERVED_IFNAMES.match(net.bridge):
        _fail(prefix + "bridge", f"{net.bridge!r} is a name the agent uses for its own "
                                 f"devices (tap*, vx-*, cad*, dhcp0, lo)")
    if net.dhcp:
        if cidr.prefixlen > 30:
            _fail(prefix + "cidr", f"{net.cidr} is too small for DHCP (at most /30: the "
                                   f"DHCP server needs an address of its own)")
        server = model.dhcp_server_ip(net.cidr)
        if net.gateway == server:
            _fail(prefix + "gateway", f"{server} is reserved for the DHCP server (the last "
                                      f"usable address of {net.cidr})")
    if net.gateway is not None and cidr.prefixlen <= 30 and \
            ipaddress.ip_address(net.gateway) in (cidr.network_address, cidr.broadcast_address):
        _fail(prefix + "gateway", f"{net.gateway} is the network or broadcast address")
    _check_segment(net, prefix + "segment.", net_conf)


def _check_segment(net: objects.Network, prefix: str, net_conf) -> None:
    seg = net.segment
    if seg is None:
        return
    phys = seg.physical_interface
    if phys is not None and phys == net.bridge:
        _fail(prefix + "physical_interface", "must differ from the network's bridge")
    if seg.type in ("flat", "vlan") and phys is not None \
            and phys not in net_conf.allowed_physical_interfaces:
        _fail(prefix + "physical_interface",
              f"{phys!r} is not in [network] allowed_physical_interfaces of this host "
              f"({', '.join(net_conf.allowed_physical_interfaces) or 'none'})")
    if seg.type == "vlan":
        if phys is None:
            _fail(prefix + "physical_interface", "is required for a VLAN segment")
        name = model.vlan_device(phys, seg.id)
        if len(name) > 15:
            _fail(prefix + "physical_interface",
                  f"the VLAN interface name {name!r} would exceed 15 characters")
    if seg.type == "vxlan" and not net_conf.vxlan_local_ip:
        _fail(prefix + "type", "VXLAN needs [network] vxlan_local_ip on this host, which "
                               "is not set")


def _check_port(port: objects.Port, net: objects.Network, prefix: str) -> None:
    if port.ip is None:
        return
    cidr = ipaddress.ip_network(net.cidr)
    addr = ipaddress.ip_address(port.ip)
    if cidr.prefixlen <= 30 and addr in (cidr.network_address, cidr.broadcast_address):
        _fail(prefix + "ip", f"{port.ip} is the network or broadcast address of {net.cidr}")
    if net.dhcp and port.ip == model.dhcp_server_ip(net.cidr):
        _fail(prefix + "ip", f"{port.ip} is reserved for the DHCP server (the last usable "
                             f"address of {net.cidr})")
    if net.gateway is not None and port.ip == net.gateway:
        _fail(prefix + "ip", f"{port.ip} is the network's gateway")


def validate_security_groups(groups: tuple[objects.SecurityGroup, ...],
                             prefix: str = "security_groups") -> None:
    for g, group in enumerate(groups):
        for r, rule in enumerate(group.rules):
            _check_rule(rule, f"{prefix}[{g}].rules[{r}].")


def _check_rule(rule: objects.SecurityGroupRule, prefix: str) -> None:
    lo, hi = rule.port_range_min, rule.port_range_max
    if rule.protocol in ("tcp", "udp"):
        if hi is not None and lo is None:
            _fail(prefix + "port_range_min", "is required when port_range_max is given")
        if lo == 0:
            _fail(prefix + "port_range_min", f"port 0 cannot match any {rule.protocol} "
                                             f"packet (ports are 1-65535)")
    if rule.protocol == "icmp" and hi is not None and lo is None:
        _fail(prefix + "port_range_min", "an ICMP code (port_range_max) needs an ICMP type "
                                         "(port_range_min)")
    if rule.remote_ip_prefix is not None and \
            ipaddress.ip_network(rule.remote_ip_prefix).version != 4:
        _fail(prefix + "remote_ip_prefix", f"{rule.remote_ip_prefix}: only IPv4 prefixes "
                                           f"are supported")


def parse_security_groups(raw: object) -> tuple[objects.SecurityGroup, ...]:
    """Validate the ``security_groups`` argument of the update RPC."""
    if not isinstance(raw, list):
        _fail("security_groups", f"must be a list, got {type(raw).__name__}")
    groups = tuple(objects.SecurityGroup.from_dict(g, f"security_groups[{i}].")
                   for i, g in enumerate(raw))
    validate_security_groups(groups)
    return groups
