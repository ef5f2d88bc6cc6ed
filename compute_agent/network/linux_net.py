"""The one place netlink is spoken (pyroute2's IPRoute): bridges, segment
interfaces (VLAN, VXLAN), veth pairs, addresses and network namespaces.

Every method is idempotent: it looks at what is there, creates what is
missing and checks that what exists is what was asked for (a device of the
expected kind), raising ``NetworkError`` otherwise - it never reuses or
removes a device of another kind that happens to carry the same name.

``LinuxNet(netns=NAME)`` works inside a network namespace instead of the
agent's own; the functional tests use it to play several hosts on one machine.
Devices created in the root namespace get no IPv6 link-local address
(addr_gen_mode none): the host carries no L3 address on guest networks.
"""

from __future__ import annotations

import contextlib
import errno
import logging as std_logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from oslo_log import log as logging
from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pr_netns

from compute_agent import exception

LOG = logging.getLogger(__name__)
# pyroute2 logs every netlink message at debug level; this module logs each
# operation it asks for instead.
std_logging.getLogger("pyroute2").setLevel(std_logging.WARNING)

VXLAN_FLOOD_MAC = "00:00:00:00:00:00"
_NO_LINK_LOCAL = {"attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", 1]]}]]}


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    kind: str | None  # bridge, vxlan, vlan, veth, ... (None: a plain device)
    master: int | None
    mtu: int
    up: bool
    mac: str | None
    vxlan_id: int | None = None


def _fail(what: str, exc: NetlinkError) -> exception.NetworkError:
    reason = os.strerror(exc.code) if exc.code else str(exc)
    return exception.NetworkError(reason=f"{what}: {reason}")


class LinuxNet:
    def __init__(self, netns: str | None = None):
        self.netns = netns

    @contextlib.contextmanager
    def _ipr(self) -> Iterator[IPRoute]:
        # flags=0: never create the namespace as a side effect of opening it.
        ipr = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    def _where(self) -> str:
        return f" in namespace {self.netns}" if self.netns else ""

    def _call(self, ipr: IPRoute, what: str, method: str, *args, **kwargs):
        LOG.debug("netlink%s: %s %s %s", self._where(), method, " ".join(map(str, args)),
                  " ".join(f"{k}={v}" for k, v in kwargs.items()))
        try:
            return getattr(ipr, method)(*args, **kwargs)
        except NetlinkError as exc:
            raise _fail(what + self._where(), exc) from exc

    # --- reading -------------------------------------------------------------

    def get_link(self, name: str) -> Link | None:
        with self._ipr() as ipr:
            return self._get(ipr, name)

    @staticmethod
    def _get(ipr: IPRoute, name: str) -> Link | None:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return None
        msg = ipr.get_links(idx[0])[0]
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        vni = None
        if kind == "vxlan":
            vni = info.get_attr("IFLA_INFO_DATA").get_attr("IFLA_VXLAN_ID")
        return Link(name=name, index=idx[0], kind=kind, master=msg.get_attr("IFLA_MASTER"),
                    mtu=msg.get_attr("IFLA_MTU"), up=bool(msg["flags"] & 1),
                    mac=msg.get_attr("IFLA_ADDRESS"), vxlan_id=vni)

    def exists(self, name: str) -> bool:
        return self.get_link(name) is not None

    def bridge_ports(self, bridge: str) -> list[str]:
        """Names of the devices enslaved to ``bridge`` (empty if it is missing)."""
        with self._ipr() as ipr:
            br = self._get(ipr, bridge)
            if br is None:
                return []
            return sorted(m.get_attr("IFLA_IFNAME") for m in ipr.get_links()
                          if m.get_attr("IFLA_MASTER") == br.index)

    def addresses(self, name: str) -> list[str]:
        """``addr/prefixlen`` of every IPv4 and IPv6 address on a device."""
        with self._ipr() as ipr:
            link = self._get(ipr, name)
            if link is None:
                return []
            return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                    for a in ipr.get_addr(index=link.index)]

    # --- bridges and segments ---------------------------------------------------

    def ensure_bridge(self, name: str) -> bool:
        """A Linux bridge, up, STP off, no forward delay, no IP address added.
        True if it was created by this call."""
        with self._ipr() as ipr:
            link = self._get(ipr, name)
            created = link is None
            if link is None:
                self._call(ipr, f"creating bridge {name}", "link", "add", ifname=name,
                           kind="bridge", br_forward_delay=0, br_stp_state=0)
                link = self._get(ipr, name)
                self._no_link_local(ipr, link)
            elif link.kind != "bridge":
                raise exception.NetworkError(
                    reason=f"{name} exists{self._where()} but is a {link.kind or 'plain'} "
                           f"device, not a bridge; refusing to use it")
            if not link.up:
                self._call(ipr, f"setting {name} up", "link", "set", index=link.index,
                           state="up")
            return created

    def _no_link_local(self, ipr: IPRoute, link: Link) -> None:
        if self.netns is None:
            self._call(ipr, f"disabling IPv6 link-local on {link.name}", "link", "set",
                       index=link.index, IFLA_AF_SPEC=_NO_LINK_LOCAL)

    def enslave(self, bridge: str, dev: str) -> None:
        """Attach ``dev`` to ``bridge`` (both must exist) and set it up."""
        with self._ipr() as ipr:
            br, link = self._get(ipr, bridge), self._get(ipr, dev)
            if br is None or link is None:
                raise exception.NetworkError(
                    reason=f"cannot attach {dev} to {bridge}{self._where()}: "
                           f"{dev if link is None else bridge} does not exist")
            if link.master not in (None, br.index):
                raise exception.NetworkError(
                    reason=f"{dev} is already attached to another bridge (index "
                           f"{link.master}); refusing to move it to {bridge}")
            if link.master is None:
                self._call(ipr, f"attaching {dev} to {bridge}", "link", "set",
                           index=link.index, master=br.index)
            if not link.up:
                self._call(ipr, f"setting {dev} up", "link", "set", index=link.index,
                           state="up")

    def ensure_vlan(self, physical: str, vlan_id: int) -> str:
        """``<physical>.<id>``, an 802.1Q sub-interface of ``physical``."""
        name = f"{physical}.{vlan_id}"
        with self._ipr() as ipr:
            link = self._get(ipr, name)
            if link is not None:
                if link.kind != "vlan":
                    raise exception.NetworkError(
                        reason=f"{name} exists but is a {link.kind or 'plain'} device, "
                               f"not a VLAN interface")
                return name
            phys = self._get(ipr, physical)
            if phys is None:
                raise exception.NetworkError(
                    reason=f"physical interface {physical} does not exist{self._where()}")
            try:
                LOG.debug("netlink%s: link add %s kind=vlan link=%s vlan_id=%s",
                          self._where(), name, physical, vlan_id)
                ipr.link("add", ifname=name, kind="vlan", link=phys.index, vlan_id=vlan_id)
            except NetlinkError as exc:
                if exc.code in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
                    raise exception.NetworkError(
                        reason=f"cannot create VLAN interface {name}: this kernel has no "
                               f"802.1Q VLAN support (module 8021q; netlink said "
                               f"'{os.strerror(exc.code)}')") from exc
                raise _fail(f"creating VLAN interface {name}", exc) from exc
            self._no_link_local(ipr, self._get(ipr, name))
        return name

    def ensure_vxlan(self, vni: int, local_ip: str, remote_ips: list[str],
                     underlay: str | None = None, port: int = 4789) -> str:
        """``vx-<vni>``: a VXLAN device with flood entries to ``remote_ips``
        (entries for other remotes are removed); unicast MACs are learned."""
        name = f"vx-{vni}"
        with self._ipr() as ipr:
            link = self._get(ipr, name)
            if link is not None and (link.kind != "vxlan" or link.vxlan_id != vni):
                raise exception.NetworkError(
                    reason=f"{name} exists but is not a VXLAN device with VNI {vni}")
            if link is None:
                kwargs = {"vxlan_id": vni, "vxlan_local": local_ip, "vxlan_port": port}
                if underlay:
                    dev = self._get(ipr, underlay)
                    if dev is None:
                        raise exception.NetworkError(
                            reason=f"VXLAN underlay interface {underlay} does not exist")
                    kwargs["vxlan_link"] = dev.index
                self._call(ipr, f"creating VXLAN device {name}", "link", "add", ifname=name,
                           kind="vxlan", **kwargs)
                link = self._get(ipr, name)
                self._no_link_local(ipr, link)
            present = {f.get_attr("NDA_DST") for f in ipr.fdb("dump", ifindex=link.index)
                       if f.get_attr("NDA_LLADDR") == VXLAN_FLOOD_MAC}
            for dst in sorted(set(remote_ips) - present):
                self._call(ipr, f"adding VXLAN flood entry {dst} to {name}", "fdb", "append",
                           ifindex=link.index, lladdr=VXLAN_FLOOD_MAC, dst=dst)
            for dst in sorted(present - set(remote_ips) - {None}):
                self._call(ipr, f"removing VXLAN flood entry {dst} from {name}", "fdb",
                           "del", ifindex=link.index, lladdr=VXLAN_FLOOD_MAC, dst=dst)
        return name

    def vxlan_remotes(self, name: str) -> list[str]:
        with self._ipr() as ipr:
            link = self._get(ipr, name)
            if link is None:
                return []
            return sorted(f.get_attr("NDA_DST") for f in ipr.fdb("dump", ifindex=link.index)
                          if f.get_attr("NDA_LLADDR") == VXLAN_FLOOD_MAC
                          and f.get_attr("NDA_DST"))

    def delete_device(self, name: str) -> bool:
        """Remove a device; False if it was not there."""
        with self._ipr() as ipr:
            link = self._get(ipr, name)
            if link is None:
                return False
            self._call(ipr, f"deleting {name}", "link", "del", index=link.index)
            return True

    # --- veth pairs, addresses -----------------------------------------------------

    def ensure_veth(self, name: str, peer: str, peer_netns: str) -> None:
        """A veth pair: ``name`` here, ``peer`` in namespace ``peer_netns``."""
        with self._ipr() as ipr:
            link = self._get(ipr, name)
            if link is not None:
                if link.kind != "veth":
                    raise exception.NetworkError(reason=f"{name} exists but is not a veth")
                return
            self._call(ipr, f"creating veth {name} (peer {peer} in {peer_netns})", "link",
                       "add", ifname=name, kind="veth",
                       peer={"ifname": peer, "net_ns_fd": peer_netns})
            self._no_link_local(ipr, self._get(ipr, name))

    def set_up(self, name: str, mtu: int | None = None) -> None:
        with self._ipr() as ipr:
            link = self._get(ipr, name)
            if link is None:
                raise exception.NetworkError(reason=f"{name} does not exist{self._where()}")
            if mtu is not None and link.mtu != mtu:
                self._call(ipr, f"setting MTU {mtu} on {name}", "link", "set",
                           index=link.index, mtu=mtu)
            if not link.up:
                self._call(ipr, f"setting {name} up", "link", "set", index=link.index,
                           state="up")

    def set_addresses(self, name: str, cidrs: list[str]) -> None:
        """Make ``cidrs`` (``addr/prefixlen``) the IPv4 addresses of ``name``."""
        with self._ipr() as ipr:
            link = self._get(ipr, name)
            if link is None:
                raise exception.NetworkError(reason=f"{name} does not exist{self._where()}")
            have = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                    for a in ipr.get_addr(index=link.index, family=2)}
            for cidr in sorted(have - set(cidrs)):
                addr, plen = cidr.split("/")
                self._call(ipr, f"removing {cidr} from {name}", "addr", "del",
                           index=link.index, address=addr, prefixlen=int(plen))
            for cidr in sorted(set(cidrs) - have):
                addr, plen = cidr.split("/")
                self._call(ipr, f"adding {cidr} to {name}", "addr", "add", index=link.index,
                           address=addr, prefixlen=int(plen))

    # --- namespaces (always named from the root namespace) -----------------------

    @staticmethod
    def namespaces() -> list[str]:
        return sorted(pr_netns.listnetns())

    @staticmethod
    def ensure_namespace(name: str) -> None:
        if name in pr_netns.listnetns():
            return
        LOG.debug("netns: create %s", name)
        try:
            pr_netns.create(name)
        except OSError as exc:
            raise exception.NetworkError(
                reason=f"creating network namespace {name}: {exc}") from exc

    @staticmethod
    def delete_namespace(name: str) -> bool:
        if name not in pr_netns.listnetns():
            return False
        LOG.debug("netns: remove %s", name)
        try:
            pr_netns.remove(name)
        except OSError as exc:
            raise exception.NetworkError(
                reason=f"removing network namespace {name}: {exc}") from exc
        return True
