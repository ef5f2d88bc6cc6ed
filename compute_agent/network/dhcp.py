"""DHCP for networks that ask for it: one dnsmasq per network, static leases
only (port MAC -> port IP), in a network namespace of its own.

The host keeps no L3 address on guest networks, so the server lives in
``cadhcp-<network id>`` (like Neutron's qdhcp-<net>), joined to the network's
bridge by a veth pair: ``cad<hash>`` enslaved to the bridge in the root
namespace, ``dhcp0`` in the namespace with the server's address (the last
usable address of the CIDR, see ``model.dhcp_server_ip``). Files live in
``state_path/dhcp/<network id>/``: ``hosts`` (``MAC,IP,hostname`` lines),
``leases``, ``pid``, ``args`` (the command line it was started with),
``dnsmasq.log``. A changed ``hosts`` is re-read on SIGHUP; changed arguments
restart the server; the last port gone stops it and removes the namespace.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time

from oslo_concurrency import processutils
from oslo_log import log as logging

from compute_agent import exception, objects
from compute_agent.network import model
from compute_agent.network.linux_net import LinuxNet
from compute_agent.network.registry import PortRecord

LOG = logging.getLogger(__name__)


class DhcpServers:
    def __init__(self, net_conf, state_path: str, linux_net: LinuxNet | None = None):
        self.conf = net_conf
        self.root = os.path.join(state_path, "dhcp")
        self.net = linux_net or LinuxNet()

    def _dir(self, network_id: str) -> str:
        return os.path.join(self.root, network_id)

    def _path(self, network_id: str, name: str) -> str:
        return os.path.join(self._dir(network_id), name)

    # --- what runs -------------------------------------------------------------

    def pid(self, network_id: str) -> int | None:
        """The pid of this network's dnsmasq if it is running (checked against
        /proc, so a recycled pid is not mistaken for it)."""
        try:
            with open(self._path(network_id, "pid")) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        hosts_arg = f"--dhcp-hostsfile={self._path(network_id, 'hosts')}".encode()
        return pid if hosts_arg in cmdline else None

    def hosts(self, network_id: str) -> list[str]:
        try:
            with open(self._path(network_id, "hosts")) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    # --- sync ---------------------------------------------------------------------

    def sync(self, network: objects.Network, ports: list[PortRecord]) -> None:
        """Make the network's DHCP server serve exactly ``ports`` (all the
        ports registered on it on this host); stop it when there are none."""
        if not network.dhcp or not ports:
            self.stop(network.id)
            return
        os.makedirs(self._dir(network.id), mode=0o700, exist_ok=True)
        mtu = self._plumb(network)
        hosts_changed = self._write_hosts(network.id, ports)
        args = self._args(network, mtu)
        pid = self.pid(network.id)
        if pid is not None and self._read(network.id, "args") != "\n".join(args):
            LOG.info("dnsmasq of network %s: settings changed, restarting", network.id)
            self._kill(network.id, pid)
            pid = None
        if pid is None:
            self._start(network, args)
        elif hosts_changed:
            LOG.debug("dnsmasq of network %s (pid %s): SIGHUP to re-read hosts", network.id,
                      pid)
            os.kill(pid, signal.SIGHUP)

    def _plumb(self, network: objects.Network) -> int:
        """Namespace, veth into the bridge, server address. Returns the MTU."""
        ns, veth = model.dhcp_namespace(network.id), model.dhcp_veth(network.id)
        self.net.ensure_namespace(ns)
        self.net.ensure_veth(veth, model.DHCP_NS_IFACE, ns)
        self.net.enslave(network.bridge, veth)
        bridge = self.net.get_link(network.bridge)
        mtu = bridge.mtu if bridge else 1500
        inside = LinuxNet(netns=ns)
        inside.set_up("lo")
        inside.set_up(model.DHCP_NS_IFACE, mtu=mtu)
        plen = ipaddress.ip_network(network.cidr).prefixlen
        inside.set_addresses(model.DHCP_NS_IFACE,
                             [f"{model.dhcp_server_ip(network.cidr)}/{plen}"])
        return mtu

    def _args(self, network: objects.Network, mtu: int) -> list[str]:
        net = ipaddress.ip_network(network.cidr)
        d = network.id
        args = [self.conf.dnsmasq_path, "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--port=0", f"--interface={model.DHCP_NS_IFACE}", "--bind-interfaces",
                "--except-interface=lo", "--dhcp-authoritative",
                f"--dhcp-range={net.network_address},static,{net.netmask},"
                f"{self.conf.dhcp_lease_time}s",
                f"--dhcp-hostsfile={self._path(d, 'hosts')}",
                f"--dhcp-leasefile={self._path(d, 'leases')}",
                f"--pid-file={self._path(d, 'pid')}",
                f"--log-facility={self._path(d, 'dnsmasq.log')}", "--log-dhcp",
                # Root reads the hosts file on SIGHUP: state_path is 0700.
                "--user=root", "--group=root",
                f"--dhcp-option=option:router,{network.gateway}" if network.gateway
                else "--dhcp-option=option:router",
                "--dhcp-option=option:dns-server" + "".join(
                    "," + s for s in self.conf.dhcp_dns_servers)]
        if mtu < 1500:  # e.g. VXLAN: tell the guest, or large frames vanish
            args.append(f"--dhcp-option-force=option:mtu,{mtu}")
        return args

    def _write_hosts(self, network_id: str, ports: list[PortRecord]) -> bool:
        lines, names = [], set()
        for p in sorted(ports, key=lambda p: p.mac):
            if p.ip is None:
                continue
            name = p.hostname if p.hostname not in names else None
            names.add(p.hostname)
            lines.append(f"{p.mac},{p.ip}" + (f",{name}" if name else ""))
        text = "\n".join(lines) + "\n"
        if self._read(network_id, "hosts") == text:
            return False
        self._write(network_id, "hosts", text)
        LOG.debug("DHCP hosts of network %s:\n%s", network_id, text)
        return True

    def _start(self, network: objects.Network, args: list[str]) -> None:
        ns = model.dhcp_namespace(network.id)
        self._write(network.id, "args", "\n".join(args))
        argv = ["ip", "netns", "exec", ns] + args
        LOG.debug("Starting dnsmasq for network %s: %s", network.id, " ".join(argv))
        try:
            processutils.execute(*argv)  # dnsmasq forks once it is ready
        except (processutils.ProcessExecutionError, OSError) as exc:
            stderr = getattr(exc, "stderr", None) or str(exc)
            raise exception.NetworkError(
                reason=f"starting dnsmasq for network {network.id}: {stderr.strip()}") \
                from exc
        LOG.info("dnsmasq serving network %s in namespace %s (pid %s)", network.id, ns,
                 self.pid(network.id))

    def stop(self, network_id: str) -> None:
        """Stop the server and remove its namespace, veth and files. Idempotent."""
        pid = self.pid(network_id)
        if pid is not None:
            self._kill(network_id, pid)
        self.net.delete_device(model.dhcp_veth(network_id))
        if self.net.delete_namespace(model.dhcp_namespace(network_id)) or pid:
            LOG.info("DHCP of network %s stopped", network_id)
        d = self._dir(network_id)
        if os.path.isdir(d):
            for name in os.listdir(d):
                os.unlink(os.path.join(d, name))
            os.rmdir(d)

    def _kill(self, network_id: str, pid: int) -> None:
        LOG.debug("Stopping dnsmasq of network %s (pid %s)", network_id, pid)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while self.pid(network_id) == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pid(network_id) == pid:
            os.kill(pid, signal.SIGKILL)

    def _read(self, network_id: str, name: str) -> str | None:
        try:
            with open(self._path(network_id, name)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write(self, network_id: str, name: str, text: str) -> None:
        path = self._path(network_id, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
