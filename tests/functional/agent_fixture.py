"""Run a real compute-agent daemon for a test, and clean up after it.

Each AgentProcess has its own host name (its RPC server name), its own
instances_path, state_path and log, and talks to the real libvirtd and the
real RabbitMQ. On stop it terminates the daemon, then destroys and undefines
the domains of the instances in its own database - and only those - and
removes its directories.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid as uuidlib

import libvirt

from compute_agent import exception

TEST_ROOT = "/var/lib/compute-agent-tests"
TRANSPORT_URL = "rabbit://guest:guest@127.0.0.1:5672/"


class AgentProcess:
    def __init__(self, name: str, image_dir: str, virt_type: str, extra_conf: str = ""):
        self.host = f"ft-{name}-{uuidlib.uuid4().hex[:8]}"
        self.root = os.path.join(TEST_ROOT, self.host)
        self.instances_path = os.path.join(self.root, "instances")
        self.state_path = os.path.join(self.root, "state")
        self.log_path = os.path.join(self.root, "agent.log")
        self.conf_path = os.path.join(self.root, "agent.conf")
        self.image_dir = image_dir
        self.virt_type = virt_type
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen | None = None
        # Where its domains are (cleanup): another for an agent of a second host.
        self.libvirt_uri = "qemu:///system"

    def write_conf(self) -> None:
        os.makedirs(self.instances_path, exist_ok=True)
        os.makedirs(self.state_path, exist_ok=True)
        # QEMU runs as libvirt-qemu and must traverse to the disks.
        for d in (TEST_ROOT, self.root, self.instances_path):
            os.chmod(d, 0o755)
        with open(self.conf_path, "w") as f:
            f.write(f"""[DEFAULT]
host = {self.host}
instances_path = {self.instances_path}
state_path = {self.state_path}
transport_url = {TRANSPORT_URL}
debug = true
log_file = {self.log_path}
state_sync_interval = 10
graceful_shutdown_timeout = 20

[libvirt]
virt_type = {self.virt_type}
cpu_mode = none
disk_cachemode = writeback

[image]
local_image_dir = {self.image_dir}
{self.extra_conf}
""")

    def start(self, api, ctxt, timeout: float = 60, env: dict | None = None) -> None:
        """Start (or restart, with the same host and directories) the daemon and
        wait until it answers RPC."""
        if not os.path.exists(self.conf_path):
            self.write_conf()
        with open(self.log_path + ".stderr", "ab") as stderr:
            self.proc = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "compute-agent"),
                 "--config-file", self.conf_path],
                stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.host} exited with {self.proc.returncode}; "
                                   f"see {self.log_path}")
            try:
                api.get_host_status(ctxt, self.host, timeout=2, retry=0)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def kill(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def known_uuids(self) -> list[str]:
        db = os.path.join(self.state_path, "compute-agent.sqlite")
        if not os.path.exists(db):
            return []
        with sqlite3.connect(db) as conn:
            return [r[0] for r in conn.execute("SELECT uuid FROM instances")]

    def cleanup(self) -> None:
        t0 = time.monotonic()
        self.kill()
        print(f"agent {self.host} stopped in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        if os.environ.get("KEEP_AGENT_LOGS"):
            shutil.copy(self.log_path, f"/tmp/{self.host}.log")
        conn = libvirt.open(self.libvirt_uri)
        try:
            for uuid in self.known_uuids():
                try:
                    dom = conn.lookupByUUIDString(uuid)
                except libvirt.libvirtError:
                    continue
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                  | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        finally:
            conn.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def wait_for(api, ctxt, host: str, uuid: str, done, timeout: float = 120,
             what: str = "state") -> dict:
    """Poll get_instance until ``done(instance)`` is true."""
    deadline = time.monotonic() + timeout
    inst = None
    while time.monotonic() < deadline:
        try:
            inst = api.get_instance(ctxt, host, uuid)
        except exception.InstanceNotFound:
            inst = None
        if inst is not None and done(inst):
            return inst
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} of {uuid}; last record: "
                         f"{json.dumps(inst, indent=1)}")


def wait_for_console(api, ctxt, host: str, uuid: str, marker: str,
                     timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = api.get_console_output(ctxt, host, uuid, 500)
        if marker in out:
            return out
        time.sleep(0.5)
    raise AssertionError(f"{marker!r} not on the console of {uuid} after {timeout}s:\n{out}")
