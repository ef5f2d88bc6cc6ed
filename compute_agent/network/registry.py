"""What this host has plugged, kept under ``state_path/network/``::

    <network id>/network.json        the network as last plugged (bridge, CIDR, segment)
    <network id>/ports/<port id>.json one per plugged port (instance, MAC, IP, hostname)

It answers "does any instance on this host still use that network?" (unplug
tears a network down only when its last port is gone), feeds the DHCP static
leases, and catches conflicts between instances (a port id, tap name or
bridge claimed twice). Ports of stopped instances stay registered: their
network stays up for them. Files are written atomically (temp + rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass

from compute_agent import exception, objects
from compute_agent.network import model


@dataclass(frozen=True)
class PortRecord:
    port_id: str
    instance_uuid: str
    network_id: str
    mac: str
    ip: str | None
    hostname: str


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


class PortRegistry:
    def __init__(self, state_path: str):
        self.root = os.path.join(state_path, "network")

    def _net_dir(self, network_id: str) -> str:
        # Ids are validated ([A-Za-z0-9][A-Za-z0-9._-]*): no '/', never '.' or '..'.
        return os.path.join(self.root, network_id)

    def network_ids(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []

    def network(self, network_id: str) -> objects.Network | None:
        data = _read_json(os.path.join(self._net_dir(network_id), "network.json"))
        if data is None:
            return None
        seg = data.get("segment")
        return objects.Network(**dict(data, segment=objects.Segment(**seg) if seg else None))

    def ports(self, network_id: str) -> list[PortRecord]:
        d = os.path.join(self._net_dir(network_id), "ports")
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
        except FileNotFoundError:
            return []
        return [PortRecord(**data) for n in names
                if (data := _read_json(os.path.join(d, n))) is not None]

    def all_ports(self) -> list[PortRecord]:
        return [p for net_id in self.network_ids() for p in self.ports(net_id)]

    def check_conflicts(self, instance_uuid: str, att: objects.NetworkAttachment) -> None:
        """Refuse a port that would clash with what other instances use here."""
        net, port = att.network, att.port
        recorded = self.network(net.id)
        if recorded is not None and recorded != net and self.ports(net.id):
            raise exception.NetworkConflict(
                reason=f"network {net.id} is plugged here with other settings "
                       f"({recorded}); its ports must be unplugged before it changes")
        for other_id in self.network_ids():
            other = self.network(other_id)
            if other_id != net.id and other is not None and other.bridge == net.bridge \
                    and self.ports(other_id):
                raise exception.NetworkConflict(
                    reason=f"bridge {net.bridge} already serves network {other_id}")
        for rec in self.all_ports():
            if rec.instance_uuid == instance_uuid:
                continue
            if rec.port_id == port.id:
                raise exception.NetworkConflict(
                    reason=f"port {port.id} is plugged for instance {rec.instance_uuid}")
            if model.tap_name(rec.port_id) == model.tap_name(port.id):
                raise exception.NetworkConflict(
                    reason=f"port {port.id} would use tap {model.tap_name(port.id)}, "
                           f"already used by port {rec.port_id}")

    def add(self, instance_uuid: str, instance_name: str,
            att: objects.NetworkAttachment) -> PortRecord:
        d = self._net_dir(att.network.id)
        os.makedirs(os.path.join(d, "ports"), mode=0o700, exist_ok=True)
        _write_json(os.path.join(d, "network.json"), dataclasses.asdict(att.network))
        rec = PortRecord(port_id=att.port.id, instance_uuid=instance_uuid,
                         network_id=att.network.id, mac=att.port.mac, ip=att.port.ip,
                         hostname=model.dhcp_hostname(instance_name))
        _write_json(os.path.join(d, "ports", att.port.id + ".json"), dataclasses.asdict(rec))
        return rec

    def remove(self, network_id: str, port_id: str, instance_uuid: str) -> bool:
        """Forget a port if it is this instance's; True if it was."""
        path = os.path.join(self._net_dir(network_id), "ports", port_id + ".json")
        data = _read_json(path)
        if data is None or data.get("instance_uuid") != instance_uuid:
            return False
        os.unlink(path)
        return True

    def mark_created(self, network_id: str, device: str) -> None:
        """Remember that the agent created ``device`` (it may remove it)."""
        open(os.path.join(self._net_dir(network_id), f"created-{device}"), "w").close()

    def created(self, network_id: str, device: str) -> bool:
        return os.path.exists(os.path.join(self._net_dir(network_id), f"created-{device}"))

    def forget_network(self, network_id: str) -> None:
        shutil.rmtree(self._net_dir(network_id), ignore_errors=True)
