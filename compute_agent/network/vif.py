"""Plugging an instance's ports: the API the hypervisor driver calls.

    vifs = network.plug(spec)          # bridges, segments, DHCP leases -> VifConfigs
    network.apply_firewall(spec)       # security groups + anti-spoofing chains
    ... define and start the domain with one <interface type='bridge'> per vif ...
    network.unplug(spec)               # after the domain is gone

Every call is idempotent, so hard reboot can simply run them again. The tap
device itself is created by libvirt (``<target dev='tap...'/>`` names it); the
agent makes sure the bridge and segment under it exist, the DHCP server knows
the port and the firewall chains are in place before the guest starts.

``unplug`` removes what only this instance used: its chains and its DHCP lease
always; the DHCP server, segment interface and bridge of a network when no
port of any instance on this host is registered on it any more (see
``registry``); a bridge that still has ports the agent does not know about is
left alone.
"""

from __future__ import annotations

import dataclasses

from oslo_concurrency import lockutils
from oslo_log import log as logging

from compute_agent import exception, objects
from compute_agent.network import model
from compute_agent.network.dhcp import DhcpServers
from compute_agent.network.firewall import Firewall
from compute_agent.network.iptables import Tables
from compute_agent.network.linux_net import LinuxNet
from compute_agent.network.registry import PortRegistry

LOG = logging.getLogger(__name__)


class NetworkDriver:
    def __init__(self, conf, linux_net: LinuxNet | None = None, tables: Tables | None = None):
        self.net_conf = conf.network
        self.linux = linux_net or LinuxNet()
        self.registry = PortRegistry(conf.state_path)
        self.dhcp = DhcpServers(self.net_conf, conf.state_path, self.linux)
        self.firewall = Firewall(tables or Tables(self.net_conf.firewall_lock_file))

    @staticmethod
    def vif_configs(spec: objects.InstanceSpec) -> list[model.VifConfig]:
        return model.vif_configs(spec)

    def plug(self, spec: objects.InstanceSpec) -> list[model.VifConfig]:
        for att in spec.networks:
            with lockutils.lock("network-" + att.network.id):
                self.registry.check_conflicts(spec.uuid, att)
                bridge_created = self._ensure_network(att.network)
                self.registry.add(spec.uuid, spec.name, att)
                if bridge_created:
                    self.registry.mark_created(att.network.id, att.network.bridge)
                self.dhcp.sync(att.network, self.registry.ports(att.network.id))
            LOG.info("Port %s (%s, %s) plugged on bridge %s", att.port.id, att.port.mac,
                     att.port.ip, att.network.bridge, instance_uuid=spec.uuid)
        return model.vif_configs(spec)

    def _ensure_network(self, net: objects.Network) -> bool:
        """Bridge and segment; True if the bridge was created now."""
        created = self.linux.ensure_bridge(net.bridge)
        if not created and not self.registry.ports(net.id):
            addresses = self.linux.addresses(net.bridge)
            if addresses:
                raise exception.NetworkConflict(
                    reason=f"bridge {net.bridge} exists with addresses of this host "
                           f"({', '.join(addresses)}); refusing to attach guests to a host "
                           f"network")
        seg = net.segment
        dev = None
        if seg is not None and seg.type == "flat":
            dev = seg.physical_interface
        elif seg is not None and seg.type == "vlan":
            dev = self.linux.ensure_vlan(seg.physical_interface, seg.id)
        elif seg is not None and seg.type == "vxlan":
            c = self.net_conf
            dev = self.linux.ensure_vxlan(
                seg.id, c.vxlan_local_ip, list(c.vxlan_remote_ips),
                seg.physical_interface or c.vxlan_underlay_interface, c.vxlan_udp_port)
        if dev is not None:
            self.linux.enslave(net.bridge, dev)
        return created

    def apply_firewall(self, spec: objects.InstanceSpec) -> None:
        if self.net_conf.enable_security_groups:
            self.firewall.apply(spec)

    def update_security_groups(self, spec: objects.InstanceSpec) -> None:
        """Replace the rules of a plugged instance (one atomic change)."""
        self.apply_firewall(spec)

    def unplug(self, spec: objects.InstanceSpec) -> None:
        # Never remove chains a port of another instance here uses (same tap
        # name): that is a conflict plug refused, not something of ours.
        foreign = {model.tap_name(r.port_id) for r in self.registry.all_ports()
                   if r.instance_uuid != spec.uuid}
        mine = tuple(a for a in spec.networks if model.tap_name(a.port.id) not in foreign)
        self.firewall.remove(dataclasses.replace(spec, networks=mine))
        for att in spec.networks:
            net = att.network
            with lockutils.lock("network-" + net.id):
                self.registry.remove(net.id, att.port.id, spec.uuid)
                remaining = self.registry.ports(net.id)
                self.dhcp.sync(net, remaining)
                if not remaining:
                    self._teardown(net)
                    self.registry.forget_network(net.id)

    def _teardown(self, net: objects.Network) -> None:
        """The last port of the network on this host is gone."""
        seg_dev = model.segment_device(net)
        others = [p for p in self.linux.bridge_ports(net.bridge) if p != seg_dev]
        if others:
            LOG.info("Bridge %s still has ports %s the agent did not plug; leaving it",
                     net.bridge, others)
            return
        if model.owns_segment_device(net):
            self.linux.delete_device(seg_dev)
        if not self.registry.created(net.id, net.bridge):
            LOG.info("Bridge %s was there before the agent used it; leaving it", net.bridge)
        elif self.linux.delete_device(net.bridge):
            LOG.info("Network %s: last port gone, bridge %s removed", net.id, net.bridge)
