"""Network namespaces for the functional network tests, and their clean-up.

``NetEnv`` creates namespaces playing guests, clients and hosts, veth pairs
standing in for the taps libvirt would create, and processes inside the
namespaces (httpd, sniffers); it remembers all of it and removes it at the
end, whatever happened. Every name carries a per-test random suffix. The
only L3 addresses are inside these namespaces.

``rawpkt`` (a script run inside a namespace) sends hand-made frames (forged
source IP, MAC or ARP sender) and sniffs what arrives, so a test can tell
exactly which frames crossed the bridge.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib

RAWPKT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rawpkt.py")


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}: "
                             f"{res.stdout}{res.stderr}")
    return res


class NetEnv:
    def __init__(self):
        self.suffix = uuidlib.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self.host_namespaces: list[str] = []  # removed last: drivers work inside them
        self.root_devices: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.tmpdirs: list[str] = []
        self.cleanups: list = []  # callables, run first (e.g. unplug)

    def name(self, prefix: str) -> str:
        return f"{prefix}{self.suffix}"

    # --- building -------------------------------------------------------------

    def netns(self, prefix: str, host: bool = False) -> str:
        ns = self.name(prefix)
        run("ip", "netns", "add", ns)
        (self.host_namespaces if host else self.namespaces).append(ns)
        self.sh(ns, "ip", "link", "set", "lo", "up")
        return ns

    def sh(self, ns: str, *cmd: str, check: bool = True,
           timeout: float = 30) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)

    def plug_namespace(self, bridge: str, port_dev: str, ns: str, mac: str | None = None,
                       cidr: str | None = None, bridge_ns: str | None = None) -> None:
        """A veth pair: ``port_dev`` attached to ``bridge`` (in the root
        namespace, or in ``bridge_ns``), ``eth0`` in ``ns`` - what libvirt does
        with a tap for a guest."""
        where = ["ip", "netns", "exec", bridge_ns] if bridge_ns else []
        run(*where, "ip", "link", "add", port_dev, "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        if bridge_ns is None:
            self.root_devices.append(port_dev)
        run(*where, "ip", "link", "set", port_dev, "master", bridge, "up")
        if mac:
            self.sh(ns, "ip", "link", "set", "eth0", "address", mac)
        self.sh(ns, "ip", "link", "set", "eth0", "up")
        if cidr:
            self.sh(ns, "ip", "addr", "add", cidr, "dev", "eth0")

    def unplug_root_device(self, dev: str) -> None:
        run("ip", "link", "del", dev, check=False)
        if dev in self.root_devices:
            self.root_devices.remove(dev)

    def spawn(self, ns: str, *cmd: str) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def httpd(self, ns: str, port: int, text: str) -> None:
        d = tempfile.mkdtemp(prefix="ft-httpd-")
        self.tmpdirs.append(d)
        with open(os.path.join(d, "index.html"), "w") as f:
            f.write(text + "\n")
        self.spawn(ns, "busybox", "httpd", "-f", "-p", str(port), "-h", d)
        deadline = time.monotonic() + 10
        while f":{port} " not in self.sh(ns, "ss", "-Hltn").stdout:
            assert time.monotonic() < deadline, f"httpd on port {port} in {ns} never listened"
            time.sleep(0.05)

    # --- probing ---------------------------------------------------------------

    def tcp_open(self, ns: str, ip: str, port: int, timeout: int = 1) -> bool:
        return self.sh(ns, "nc", "-z", "-w", str(timeout), ip, str(port),
                       check=False).returncode == 0

    def http_get(self, ns: str, ip: str, port: int = 80) -> str | None:
        # (busybox wget crashes in these namespaces: no resolver config)
        res = self.sh(ns, sys.executable, "-c",
                      "import sys, urllib.request; print(urllib.request.urlopen("
                      "sys.argv[1], timeout=2).read().decode())", f"http://{ip}:{port}/",
                      check=False)
        return res.stdout.strip() if res.returncode == 0 else None

    def ping(self, ns: str, ip: str, count: int = 1) -> bool:
        return self.sh(ns, "ping", "-n", "-c", str(count), "-W", "1", ip,
                       check=False).returncode == 0

    def dhcp_lease(self, ns: str, iface: str = "eth0", tries: int = 5) -> str | None:
        """Run udhcpc once (without configuring anything); the leased address."""
        res = self.sh(ns, "busybox", "udhcpc", "-i", iface, "-n", "-q", "-f", "-t",
                      str(tries), "-T", "1", "-s", "/bin/true", check=False, timeout=30)
        for line in (res.stdout + res.stderr).splitlines():
            if "lease of" in line and "obtained" in line:
                return line.split("lease of", 1)[1].split()[0]
        return None

    def sniff(self, ns: str, iface: str = "eth0", seconds: float = 3) -> subprocess.Popen:
        proc = self.spawn(ns, sys.executable, RAWPKT, "sniff", iface, str(seconds))
        time.sleep(0.3)  # let the socket open
        return proc

    @staticmethod
    def sniffed(proc: subprocess.Popen) -> list[dict]:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        return json.loads(out)

    def send_frames(self, ns: str, frames: list[dict], iface: str = "eth0") -> None:
        self.sh(ns, sys.executable, RAWPKT, "send", iface, json.dumps(frames))

    # --- clean-up -----------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Guests go first (as their domains would), then the agent's unplug
        runs, then the namespaces playing hosts."""
        errors = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for dev in self.root_devices:
            run("ip", "link", "del", dev, check=False)
        self._remove_namespaces(self.namespaces)
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as exc:  # keep cleaning
                errors.append(f"{fn}: {exc}")
        self._remove_namespaces(self.host_namespaces)
        for d in self.tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
        return errors

    @staticmethod
    def _remove_namespaces(namespaces: list[str]) -> None:
        for ns in namespaces:
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "del", ns, check=False)
