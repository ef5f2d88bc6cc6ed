"""Names and typed records shared by the network modules.

Everything on the host that belongs to a port or a network is named from its
id here, in one place:

- the guest's tap device: ``tap`` + the first 11 characters of the port id
  (Nova's rule, at most 14 characters). libvirt creates it for
  ``<interface type='bridge'>`` with that ``<target dev=.../>``.
- the port's iptables chains: ``ca-i<11>`` (ingress, to the guest),
  ``ca-o<11>`` (egress, from the guest), ``ca-s<11>`` (anti-spoofing), and its
  ebtables chain ``ca-a<11>``; all under iptables' 28-character limit.
- a network's DHCP namespace ``cadhcp-<network id>`` and the veth pair joining
  it to the bridge: ``cad<sha1(network id)[:11]>`` in the root namespace,
  ``dhcp0`` inside.
- the DHCP server's address: the last usable address of the network's CIDR
  (e.g. 10.0.0.254 in 10.0.0.0/24). A port, or the gateway, may not have it.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from compute_agent import objects

CHAIN_PREFIX = "ca-"
PORT_SHORT_LEN = 11
DHCP_NS_PREFIX = "cadhcp-"
DHCP_NS_IFACE = "dhcp0"


def port_short(port_id: str) -> str:
    return port_id[:PORT_SHORT_LEN]


def tap_name(port_id: str) -> str:
    return "tap" + port_short(port_id)


def dhcp_namespace(network_id: str) -> str:
    return DHCP_NS_PREFIX + network_id


def dhcp_veth(network_id: str) -> str:
    return "cad" + hashlib.sha1(network_id.encode()).hexdigest()[:11]


def dhcp_server_ip(cidr: str) -> str:
    """The DHCP server's address: the last usable address of the CIDR."""
    net = ipaddress.ip_network(cidr)
    return str(net.broadcast_address - 1)


def vxlan_device(vni: int) -> str:
    return f"vx-{vni}"


def vlan_device(physical_interface: str, vlan_id: int) -> str:
    return f"{physical_interface}.{vlan_id}"


def segment_device(network: objects.Network) -> str | None:
    """The interface the agent enslaves under the network's bridge, if any."""
    seg = network.segment
    if seg is None:
        return None
    if seg.type == "flat":
        return seg.physical_interface
    if seg.type == "vlan":
        return vlan_device(seg.physical_interface or "", seg.id)
    return vxlan_device(seg.id)


def owns_segment_device(network: objects.Network) -> bool:
    """VLAN and VXLAN devices are created (and removed) by the agent; a flat
    network's physical interface is only attached, never removed."""
    return network.segment is not None and network.segment.type in ("vlan", "vxlan")


@dataclass(frozen=True)
class VifConfig:
    """What the hypervisor driver needs to attach one port to its bridge."""

    port_id: str
    network_id: str
    bridge: str
    tap: str
    mac: str


def vif_configs(spec: objects.InstanceSpec) -> list[VifConfig]:
    """The guest's interfaces, in spec order: a pure function of the spec."""
    return [VifConfig(port_id=a.port.id, network_id=a.network.id, bridge=a.network.bridge,
                      tap=tap_name(a.port.id), mac=a.port.mac)
            for a in spec.networks]


def dhcp_hostname(instance_name: str) -> str:
    """A DNS label from the instance name (letters, digits, '-', <= 63)."""
    label = "".join(c if c.isalnum() else "-" for c in instance_name.lower())
    return label.strip("-")[:63].strip("-") or "instance"
