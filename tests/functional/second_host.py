"""A second hypervisor host on the same machine, for migration tests.

A second libvirtd (with its own virtlogd) runs inside ``unshare --mount --uts
--propagation private``: in that mount namespace its own directories (under a
test dir) are bind-mounted over /etc/libvirt (a copy of the system's, without
its domain definitions and secrets), /run/libvirt, /var/lib/libvirt,
/var/log/libvirt and /var/cache/libvirt. Everything else, in particular the
test instance directories under /var/lib/compute-agent-tests, is the same
file system as the root namespace's, so two agents can share an
instances_path. It listens on TCP on a loopback address (127.0.0.2 unless
that is taken), unauthenticated, which only the tests on this machine can
reach. ``../../shared/ENVIRONMENT.md`` lists what libvirt 9.0 needs:

- a distinct ``host_uuid`` (else "Attempt to migrate guest to the same host");
- ``migration_address``/``migration_host`` = the loopback address and its own
  ``migration_port_min/max`` (else the destination advertises an unresolvable
  hostname, or both daemons fight over the same ports);
- ``cgroup_controllers = [ ]`` (both daemons number domains from 1 and would
  fight over the same cgroup paths).

Stopping destroys its domains, then kills its libvirtd and virtlogd by the
pids in their own pid files (checked to be those programs, in another mount
namespace) - never the system daemons.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid as uuidlib

import libvirt

TEST_ROOT = "/var/lib/compute-agent-tests"
LIBVIRT_TCP_PORT = 16509
# (bind target in the namespace, directory name under the host's dir)
PRIVATE_DIRS = (("/etc/libvirt", "etc"), ("/run/libvirt", "run"),
                ("/var/lib/libvirt", "lib"), ("/var/log/libvirt", "log"),
                ("/var/cache/libvirt", "cache"))


def _listening(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
        return True
    except OSError:
        return False


def _mnt_ns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _comm(pid: int) -> str | None:
    """The program name of a live (not zombie) process, else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
    return None if state in "ZX" else name


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


class SecondHost:
    """One namespaced libvirtd reachable at ``qemu+tcp://ADDRESS/system``."""

    def __init__(self, address: str | None = None, name: str = "hostb"):
        self.address = address or self._free_address()
        self.name = name
        self.uri = f"qemu+tcp://{self.address}/system"
        self.dir = os.path.join(TEST_ROOT, f"second-host-{self.address}")
        last = int(self.address.rsplit(".", 1)[1])
        # Away from the system daemon's default 49152-49215.
        self.migration_ports = (49400 + 64 * (last % 16), 49400 + 64 * (last % 16) + 63)
        self.host_uuid = str(uuidlib.uuid4())
        self.libvirtd_pidfile = os.path.join(self.dir, "libvirtd.pid")
        self.virtlogd_pidfile = os.path.join(self.dir, "virtlogd.pid")

    @staticmethod
    def _free_address() -> str:
        wanted = os.environ.get("SECOND_HOST_ADDRESS")
        if wanted:
            return wanted
        for last in range(2, 16):
            address = f"127.0.0.{last}"
            if not _listening(address, LIBVIRT_TCP_PORT) and not os.path.exists(
                    os.path.join(TEST_ROOT, f"second-host-{address}", "libvirtd.pid")):
                return address
        raise RuntimeError("no free loopback address 127.0.0.2-15 for a second libvirtd")

    # --- start -----------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        os.chmod(TEST_ROOT, 0o755)
        os.chmod(self.dir, 0o755)
        etc = os.path.join(self.dir, "etc")
        # The system's config, without its domain definitions and secrets.
        shutil.copytree("/etc/libvirt", etc, symlinks=True, ignore=self._ignore_etc)
        for sub in ("qemu/networks/autostart", "secrets"):
            os.makedirs(os.path.join(etc, sub), exist_ok=True)
        with open(os.path.join(etc, "libvirtd.conf"), "a") as f:
            f.write(f'\n# second test host\nlisten_tcp = 1\nlisten_tls = 0\nauth_tcp = "none"\n'
                    f'listen_addr = "{self.address}"\nhost_uuid = "{self.host_uuid}"\n'
                    f'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
        with open(os.path.join(etc, "qemu.conf"), "a") as f:
            f.write(f'\n# second test host\nmigration_address = "{self.address}"\n'
                    f'migration_host = "{self.address}"\n'
                    f"migration_port_min = {self.migration_ports[0]}\n"
                    f"migration_port_max = {self.migration_ports[1]}\n"
                    f"cgroup_controllers = [ ]\n")
        for _, sub in PRIVATE_DIRS[1:]:
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        # QEMU's capabilities, so the first connection does not probe for ~60 s.
        if os.path.isdir("/var/cache/libvirt"):
            shutil.copytree("/var/cache/libvirt", os.path.join(self.dir, "cache"),
                            symlinks=True, dirs_exist_ok=True)
        lib = os.path.join(self.dir, "lib")
        qemu_lib = os.path.join(lib, "qemu")
        os.makedirs(qemu_lib, exist_ok=True)
        shutil.chown(qemu_lib, "libvirt-qemu", "libvirt-qemu")
        os.chmod(qemu_lib, 0o750)

    @staticmethod
    def _ignore_etc(directory: str, names: list[str]) -> list[str]:
        if directory.rstrip("/") == "/etc/libvirt/qemu":
            return [n for n in names if n.endswith(".xml")]
        if directory.rstrip("/") == "/etc/libvirt/secrets":
            return names
        return []

    def start(self, timeout: float = 120) -> None:
        self._prepare_dirs()
        mounts = "".join(f"mount --bind {os.path.join(self.dir, sub)} {target}\n"
                         for target, sub in PRIVATE_DIRS)
        script = (f"set -e\nhostname {self.name}\n{mounts}"
                  f"virtlogd -d -p {self.virtlogd_pidfile}\n"
                  f"libvirtd -d -l -p {self.libvirtd_pidfile}\n")
        subprocess.run(["unshare", "--mount", "--uts", "--propagation", "private",
                        "sh", "-c", script], check=True, capture_output=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                libvirt.open(self.uri).close()
                break
            except libvirt.libvirtError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"second libvirtd at {self.uri} did not answer: "
                                       f"{exc}; see {self.dir}/log/libvirtd.log") from exc
                time.sleep(0.3)
        pid = self.libvirtd_pid()
        if pid is None or _mnt_ns(pid) == _mnt_ns("self"):
            self.stop()
            raise RuntimeError("the second libvirtd is not in its own mount namespace")

    # --- inspection --------------------------------------------------------------

    def libvirtd_pid(self) -> int | None:
        return self._own_pid(self.libvirtd_pidfile, "libvirtd")

    def _own_pid(self, pidfile: str, program: str) -> int | None:
        """The pid in our pid file, if it is that program in another mount namespace."""
        pid = _read_pid(pidfile)
        if pid is None or _comm(pid) != program or _mnt_ns(pid) in (None, _mnt_ns("self")):
            return None
        return pid

    def open(self) -> libvirt.virConnect:
        return libvirt.open(self.uri)

    def domain(self, uuid: str):
        """(active, persistent) of the domain with that uuid, or None."""
        conn = self.open()
        try:
            dom = conn.lookupByUUIDString(uuid)
            return bool(dom.isActive()), bool(dom.isPersistent())
        except libvirt.libvirtError:
            return None
        finally:
            conn.close()

    def destroy_domain(self, uuid: str) -> None:
        conn = self.open()
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            conn.close()
            return
        try:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                  | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        finally:
            conn.close()

    # --- stop ----------------------------------------------------------------------

    def stop(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn = self.open()
            try:
                for dom in conn.listAllDomains():
                    with contextlib.suppress(libvirt.libvirtError):
                        if dom.isActive():
                            dom.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                          | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            finally:
                conn.close()
        for pidfile, program in ((self.libvirtd_pidfile, "libvirtd"),
                                 (self.virtlogd_pidfile, "virtlogd")):
            pid = self._own_pid(pidfile, program)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if _comm(pid) != program:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)
