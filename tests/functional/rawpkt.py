"""Send hand-made Ethernet frames, or sniff them, on one interface (run inside
a test namespace as root).

    rawpkt.py send IFACE '[{"kind": "udp", "src_mac": ..., "dst_mac": ..., "src_ip": ...,
                            "dst_ip": ..., "marker": "..."}, {"kind": "arp", ...}]'
    rawpkt.py sniff IFACE SECONDS      -> JSON list of what arrived

UDP frames carry their marker as payload, so the sniffer reports exactly
which of them crossed; ARP frames are told apart by their sender address.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time

ETH_P_ALL, ETH_P_IP, ETH_P_ARP = 0x0003, 0x0800, 0x0806


def _mac(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))


def _unmac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build(f: dict) -> bytes:
    eth = _mac(f["dst_mac"]) + _mac(f["src_mac"])
    if f["kind"] == "arp":
        arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, f.get("op", 1))
        arp += _mac(f.get("arp_mac", f["src_mac"])) + socket.inet_aton(f["src_ip"])
        arp += b"\0" * 6 + socket.inet_aton(f["dst_ip"])
        return eth + struct.pack("!H", ETH_P_ARP) + arp + b"\0" * 18
    payload = f["marker"].encode()
    udp = struct.pack("!HHHH", f.get("sport", 40000), f.get("dport", 9999), 8 + len(payload),
                      0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(f["src_ip"]), socket.inet_aton(f["dst_ip"]))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return eth + struct.pack("!H", ETH_P_IP) + ip + udp


def parse(frame: bytes) -> dict:
    out = {"dst_mac": _unmac(frame[0:6]), "src_mac": _unmac(frame[6:12])}
    ethertype = struct.unpack("!H", frame[12:14])[0]
    body = frame[14:]
    if ethertype == ETH_P_ARP and len(body) >= 28:
        out.update(kind="arp", op=struct.unpack("!H", body[6:8])[0],
                   arp_mac=_unmac(body[8:14]), src_ip=socket.inet_ntoa(body[14:18]),
                   dst_ip=socket.inet_ntoa(body[24:28]))
    elif ethertype == ETH_P_IP and len(body) >= 20:
        ihl = (body[0] & 0x0F) * 4
        out.update(kind="ip", proto=body[9], src_ip=socket.inet_ntoa(body[12:16]),
                   dst_ip=socket.inet_ntoa(body[16:20]))
        if body[9] == 17:
            out.update(kind="udp", marker=body[ihl + 8:].decode(errors="replace"))
    else:
        out["kind"] = hex(ethertype)
    return out


def main() -> int:
    mode, iface = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    if mode == "send":
        for f in json.loads(sys.argv[3]):
            s.send(build(f))
            time.sleep(0.05)
        return 0
    seen, deadline = [], time.monotonic() + float(sys.argv[3])
    while (left := deadline - time.monotonic()) > 0:
        if select.select([s], [], [], left)[0]:
            frame, addr = s.recvfrom(65535)
            if addr[2] != socket.PACKET_OUTGOING:
                seen.append(parse(frame))
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
