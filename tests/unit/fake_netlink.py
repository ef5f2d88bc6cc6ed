"""A tiny in-memory kernel behind a fake pyroute2 ``IPRoute``: enough links,
fdb entries and addresses for ``LinuxNet`` to be unit-tested, plus a record
of every request, and switches to fail like a kernel without 802.1Q."""

from __future__ import annotations

import errno
import itertools

from pyroute2 import NetlinkError


class Msg(dict):
    """A netlink message: ``get_attr`` over an attrs list, items as a dict."""

    def __init__(self, attrs: dict, **fields):
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name):
        return self.attrs.get(name)


class FakeKernel:
    def __init__(self, vlan_supported: bool = True):
        self.links: dict[str, dict] = {}
        self.fdb: list[tuple[int, str, str | None]] = []
        self.addrs: dict[int, set[tuple[str, int]]] = {}
        self.requests: list[tuple] = []
        self.vlan_supported = vlan_supported
        self._index = itertools.count(10)
        self.add_link("lo", None)

    def add_link(self, name: str, kind: str | None = None, **extra) -> dict:
        link = {"index": next(self._index), "name": name, "kind": kind, "master": None,
                "mtu": extra.pop("mtu", 1500), "up": False, **extra}
        self.links[name] = link
        return link

    def by_index(self, index: int) -> dict:
        return next(v for v in self.links.values() if v["index"] == index)

    def iproute(self, *args, **kwargs) -> FakeIPRoute:
        return FakeIPRoute(self)


class FakeIPRoute:
    def __init__(self, kernel: FakeKernel):
        self.k = kernel

    def close(self):
        pass

    def link_lookup(self, ifname):
        link = self.k.links.get(ifname)
        return [link["index"]] if link else []

    def _msg(self, link: dict) -> Msg:
        info = None
        if link["kind"]:
            data = Msg({"IFLA_VXLAN_ID": link.get("vxlan_id")})
            info = Msg({"IFLA_INFO_KIND": link["kind"], "IFLA_INFO_DATA": data})
        return Msg({"IFLA_IFNAME": link["name"], "IFLA_LINKINFO": info,
                    "IFLA_MASTER": link["master"], "IFLA_MTU": link["mtu"],
                    "IFLA_ADDRESS": "02:00:00:00:00:%02x" % (link["index"] % 256)},
                   flags=1 if link["up"] else 0, index=link["index"])

    def get_links(self, *indexes):
        links = [self.k.by_index(i) for i in indexes] if indexes else self.k.links.values()
        return [self._msg(link) for link in links]

    def link(self, command, **kw):
        self.k.requests.append(("link", command, kw))
        if command == "add":
            if kw["ifname"] in self.k.links:
                raise NetlinkError(errno.EEXIST)
            if kw["kind"] == "vlan" and not self.k.vlan_supported:
                raise NetlinkError(errno.EOPNOTSUPP)
            self.k.add_link(kw["ifname"], kw["kind"], vxlan_id=kw.get("vxlan_id"))
            if kw["kind"] == "veth":  # one kernel for all namespaces: the peer too
                self.k.add_link(kw["peer"]["ifname"], "veth")
        elif command == "set":
            link = self.k.by_index(kw["index"])
            if "master" in kw:
                link["master"] = kw["master"]
            if kw.get("state") == "up":
                link["up"] = True
            if "mtu" in kw:
                link["mtu"] = kw["mtu"]
        elif command == "del":
            link = self.k.by_index(kw["index"])
            del self.k.links[link["name"]]
            if link["kind"] == "veth" and link["name"].startswith("cad"):
                self.k.links.pop("dhcp0", None)  # the peer goes with it
        return ()

    def fdb(self, command, ifindex, lladdr=None, dst=None):
        self.k.requests.append(("fdb", command, {"ifindex": ifindex, "lladdr": lladdr,
                                                 "dst": dst}))
        if command == "dump":
            return [Msg({"NDA_LLADDR": m, "NDA_DST": d}) for i, m, d in self.k.fdb
                    if i == ifindex]
        if command == "append":
            self.k.fdb.append((ifindex, lladdr, dst))
        elif command == "del":
            self.k.fdb.remove((ifindex, lladdr, dst))
        return ()

    def get_addr(self, index, family=None):
        return [Msg({"IFA_ADDRESS": a}, prefixlen=p) for a, p in
                sorted(self.k.addrs.get(index, ()))]

    def addr(self, command, index, address, prefixlen):
        self.k.requests.append(("addr", command, {"index": index, "address": address}))
        entries = self.k.addrs.setdefault(index, set())
        (entries.add if command == "add" else entries.discard)((address, prefixlen))
