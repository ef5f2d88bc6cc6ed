"""Real volume back ends for the functional tests, one of each per test session.

- ``IscsiTarget``: tgt's user-space iSCSI target (``tgtd``) on a free loopback
  port with its own control port, so it never touches another tgtd. Targets,
  LUNs (sparse files in a temp dir) and CHAP accounts are made with tgtadm.
  tgtd ignores SIGTERM: it is stopped with ``tgtadm --op delete --mode system``.
- ``CephCluster``: a single-node Ceph (one mon on 127.0.0.1, one bluestore OSD
  on a 2 GiB sparse file, no mgr, pools of size 1) from one config file, in a
  temp dir. It takes ~1-2 min to come up, so the session fixture starts it in a
  background thread and only the RBD tests wait for it.

Both stop only the processes they started and remove their directories.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib

import libvirt
import pytest

MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float = 60, input: bytes | None = None) -> str:
    res = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): "
                           f"{res.stderr.decode(errors='replace').strip()}")
    return res.stdout.decode(errors="replace")


class IscsiTarget:
    """tgtd on 127.0.0.1:<port>; one target per LUN created by ``add_lun``."""

    IQN_PREFIX = "iqn.2026-11.invalid.compute-agent-tests"

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ca-tgt-", dir="/var/tmp")
        self.port = _free_port()
        # tgtd's management socket is /var/run/tgtd/socket.<control port>.
        self.control_port = 1000 + os.getpid() % 20000
        self.proc: subprocess.Popen | None = None
        self._tid = 0
        self._accounts: dict[str, str] = {}

    def _adm(self, *args: str) -> str:
        return _run(["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args])

    def start(self, timeout: float = 20) -> None:
        log = open(os.path.join(self.dir, "tgtd.log"), "wb")
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", str(self.control_port),
             "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._adm("--op", "show", "--mode", "target")
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except (RuntimeError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tgtd did not start; see {self.dir}/tgtd.log") \
                        from None
                time.sleep(0.2)

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_lun(self, name: str, size_mb: int = 64, chap: tuple[str, str] | None = None,
                data: bytes | None = None) -> tuple[str, str]:
        """A new target with LUN 1 backed by a sparse file (starting with
        ``data`` if given). Returns (iqn, backing file)."""
        self._tid += 1
        tid = str(self._tid)
        iqn = f"{self.IQN_PREFIX}:{name}"
        path = os.path.join(self.dir, f"{name}.img")
        with open(path, "wb") as f:
            if data:
                f.write(data)
            f.truncate(size_mb * MiB)
        self._adm("--op", "new", "--mode", "target", "--tid", tid, "-T", iqn)
        self._adm("--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", "1",
                  "-b", path)
        self._adm("--op", "bind", "--mode", "target", "--tid", tid, "-I", "ALL")
        if chap:
            user, password = chap
            if user not in self._accounts:  # accounts are per tgtd, bound per target
                self._adm("--op", "new", "--mode", "account", "--user", user,
                          "--password", password)
                self._accounts[user] = password
            assert self._accounts[user] == password, "one password per CHAP user"
            self._adm("--op", "bind", "--mode", "account", "--tid", tid, "--user", user)
        return iqn, path

    def connection_info(self, iqn: str, chap: tuple[str, str] | None = None) -> dict:
        data = {"target_portal": self.portal, "target_iqn": iqn, "target_lun": 1}
        if chap:
            data.update(auth_method="CHAP", auth_username=chap[0], auth_password=chap[1])
        return {"driver_volume_type": "iscsi", "data": data}

    def initiator_addresses(self, iqn: str) -> list[str]:
        """IP addresses of the initiators logged in to a target (tgtadm's
        "I_T nexus information")."""
        out = self._adm("--op", "show", "--mode", "target")
        section = out.split(f": {iqn}\n", 1)[1].split("\nTarget ", 1)[0]
        nexus = section.split("I_T nexus information:", 1)[1].split("LUN information:", 1)[0]
        return [line.split(":", 1)[1].strip() for line in nexus.splitlines()
                if line.strip().startswith("IP Address:")]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            # tgtd refuses to stop while it has targets.
            for tid in range(1, self._tid + 1):
                self._adm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force")
            _run(["tgtadm", "-C", str(self.control_port), "--op", "delete", "--mode", "system"])
            self.proc.wait(15)
        except (RuntimeError, subprocess.TimeoutExpired):
            self.proc.kill()  # ours alone: the Popen we started
            self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class CephCluster:
    """One mon + one OSD, no mgr; pool ``rbd`` of size 1."""

    POOL = "rbd"

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ca-ceph-", dir="/var/tmp")
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.admin_keyring = os.path.join(self.dir, "admin.keyring")
        self.mon_port = _free_port()  # msgr v1: what QEMU's librbd is given
        self.mon_port_v2 = _free_port()
        self.procs: list[subprocess.Popen] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.bootstrap_seconds: float | None = None
        self._thread: threading.Thread | None = None
        self.admin_key = ""

    # --- start in the background ---------------------------------------------

    def start_background(self) -> None:
        def run():
            t0 = time.monotonic()
            try:
                self.bootstrap()
                self.bootstrap_seconds = time.monotonic() - t0
            except BaseException as exc:  # reported by wait()
                self.error = exc
                self.stop()
            finally:
                self.ready.set()
        self._thread = threading.Thread(target=run, name="ceph-bootstrap", daemon=True)
        self._thread.start()

    def wait(self, timeout: float = 300) -> None:
        if not self.ready.wait(timeout):
            raise RuntimeError(f"Ceph did not come up within {timeout}s; see {self.dir}")
        if self.error is not None:
            raise RuntimeError(f"Ceph bootstrap failed: {self.error}; see {self.dir}")

    # --- the recipe (shared/ENVIRONMENT.md) ------------------------------------

    def _ceph(self, *args: str, timeout: float = 120) -> str:
        return _run(["ceph", "-c", self.conf, "--connect-timeout", "30", *args],
                    timeout=timeout)

    def rbd(self, *args: str, timeout: float = 120) -> str:
        return _run(["rbd", "-c", self.conf, *args], timeout=timeout)

    def bootstrap(self) -> None:
        d = self.dir
        fsid = str(uuidlib.uuid4())
        for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(f"""[global]
fsid = {fsid}
mon_initial_members = a
mon_host = [v2:127.0.0.1:{self.mon_port_v2},v1:127.0.0.1:{self.mon_port}]
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_crush_chooseleaf_type = 0
mon_warn_on_pool_no_redundancy = false
ms_bind_ipv6 = false
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
public_network = 127.0.0.0/8
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
keyring = {self.admin_keyring}
mon_data = {d}/mon/$cluster-$id
osd_data = {d}/osd/$cluster-$id
[osd]
keyring = {d}/osd/ceph-0/keyring
osd_objectstore = bluestore
bluestore_block_path = {d}/osd/block
bluestore_block_size = {2048 * MiB}
bluestore_block_create = true
bluestore_fsck_on_mount = false
osd_memory_target = 536870912
""")
        mon_keyring = os.path.join(d, "mon.keyring")
        _run(["ceph-authtool", "--create-keyring", mon_keyring, "--gen-key", "-n", "mon.",
              "--cap", "mon", "allow *"])
        _run(["ceph-authtool", "--create-keyring", self.admin_keyring, "--gen-key",
              "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
              "--cap", "mgr", "allow *"])
        _run(["ceph-authtool", mon_keyring, "--import-keyring", self.admin_keyring])
        monmap = os.path.join(d, "monmap")
        _run(["monmaptool", "--create", "--addv", "a",
              f"[v2:127.0.0.1:{self.mon_port_v2},v1:127.0.0.1:{self.mon_port}]",
              "--fsid", fsid, monmap])
        _run(["ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", monmap,
              "--keyring", mon_keyring])
        self._spawn(["ceph-mon", "-f", "-c", self.conf, "-i", "a"], "mon")
        osd_uuid = str(uuidlib.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid).strip()
        _run(["ceph-osd", "-c", self.conf, "-i", osd_id, "--mkfs", "--mkkey",
              "--osd-uuid", osd_uuid, "--no-mon-config"], timeout=180)
        self._ceph("auth", "add", f"osd.{osd_id}", "osd", "allow *", "mon",
                   "allow profile osd", "-i", os.path.join(d, "osd/ceph-0/keyring"))
        self._spawn(["ceph-osd", "-f", "-c", self.conf, "-i", osd_id], "osd")
        self._ceph("osd", "pool", "create", self.POOL, "8")
        self._ceph("osd", "pool", "set", self.POOL, "size", "1", "--yes-i-really-mean-it")
        self._ceph("osd", "pool", "application", "enable", self.POOL, "rbd")
        # Block until the placement groups serve I/O (no mgr: `ceph -s` would not say).
        self.rbd("create", "--size", "4", f"{self.POOL}/probe", timeout=240)
        self.rbd("rm", f"{self.POOL}/probe", timeout=120)
        self.admin_key = self._ceph("auth", "get-key", "client.admin").strip()

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(os.path.join(self.dir, "log", f"{name}.stdout"), "wb")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    # --- for tests -------------------------------------------------------------

    def create_image(self, name: str, size_mb: int = 64, data_file: str | None = None) -> str:
        if data_file:
            self.rbd("import", "--image-format", "2", data_file, f"{self.POOL}/{name}")
            if size_mb:
                self.rbd("resize", "--size", str(size_mb), f"{self.POOL}/{name}")
        else:
            self.rbd("create", "--size", str(size_mb), f"{self.POOL}/{name}")
        return f"{self.POOL}/{name}"

    def export(self, name: str, dest: str) -> None:
        self.rbd("export", f"{self.POOL}/{name}", dest)

    def watchers(self, name: str) -> str:
        return self.rbd("status", f"{self.POOL}/{name}")

    def connection_info(self, name: str) -> dict:
        return {"driver_volume_type": "rbd",
                "data": {"name": f"{self.POOL}/{name}", "hosts": ["127.0.0.1"],
                         "ports": [str(self.mon_port)], "auth_enabled": True,
                         "auth_username": "admin", "key": self.admin_key}}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def cleanup(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=300)
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- pytest fixtures (imported by test_volumes.py) -----------------------------

@pytest.fixture(scope="session")
def ceph_cluster(services):
    """Started in the background at the first use (test_volumes.py asks for it
    at module start); ``ceph`` waits until it serves I/O."""
    cluster = CephCluster()
    cluster.start_background()
    yield cluster
    cluster.cleanup()


@pytest.fixture
def ceph(ceph_cluster) -> CephCluster:
    ceph_cluster.wait()
    if not getattr(ceph_cluster, "_reported", False):
        ceph_cluster._reported = True
        print(f"\n[timing] Ceph bootstrap (mon + OSD + pool, in the background): "
              f"{ceph_cluster.bootstrap_seconds:.1f}s", file=sys.stderr)
    return ceph_cluster


@pytest.fixture(scope="session")
def iscsi_target(services):
    target = IscsiTarget()
    target.start()
    yield target
    target.cleanup()


def write_request(token: str) -> bytes:
    """First bytes of a volume asking the Linux test guest to write
    "GUEST-WROTE <token>" into its second sector (tools/guest)."""
    return b"CA-WRITE-REQUEST" + token.encode()


def agent_secrets(uuids, uri: str = "qemu:///system") -> dict[str, str]:
    """libvirt secrets (uuid -> usage id) the agent made for these instances."""
    conn = libvirt.open(uri)
    try:
        found = {}
        for s in conn.listAllSecrets():
            usage = s.usageID() or ""
            if any(usage.startswith(f"compute-agent/{u}/") for u in uuids):
                found[s.UUIDString()] = usage
        return found
    finally:
        conn.close()


def remove_agent_secrets(uuids, uri: str = "qemu:///system") -> None:
    """Test clean-up: secrets a failed test left (the agent removes them on delete)."""
    conn = libvirt.open(uri)
    try:
        for secret_uuid in agent_secrets(uuids, uri):
            conn.secretLookupByUUIDString(secret_uuid).undefine()
    finally:
        conn.close()
