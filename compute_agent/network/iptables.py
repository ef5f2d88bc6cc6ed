"""The one place iptables and ebtables are run: ``*-save`` to read, and
``*-restore --noflush`` to change, under a host-wide lock.

``iptables-restore --noflush`` applies a whole file in one transaction: every
chain the file declares is flushed and refilled, other chains are left alone,
and a bad line rolls the whole file back (exit 2; 4 when the kernel rejects a
rule). ``ebtables-restore --noflush`` (nft backend) behaves the same way.

``Tables(netns=NAME)`` runs the commands inside a network namespace (tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator

from oslo_concurrency import processutils
from oslo_log import log as logging

from compute_agent import exception

LOG = logging.getLogger(__name__)

_TOOLS = ("iptables", "ebtables")
_BR_NF_KEY = "net.bridge.bridge-nf-call-iptables"


class Tables:
    def __init__(self, lock_file: str, netns: str | None = None):
        self.lock_file = lock_file
        self.netns = netns
        self._thread_lock = threading.Lock()

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _run(self, *cmd: str, stdin: str | None = None, what: str) -> str:
        argv = self._prefix() + list(cmd)
        LOG.debug("Running %s%s", " ".join(argv),
                  f" with input:\n{stdin}" if stdin is not None else "")
        try:
            out, _ = processutils.execute(*argv, process_input=stdin)
        except processutils.ProcessExecutionError as exc:
            stderr = (exc.stderr or "").strip()
            raise exception.FirewallError(
                reason=f"{what}: {cmd[0]} exited {exc.exit_code}: {stderr[-800:]}") from exc
        except OSError as exc:
            raise exception.FirewallError(reason=f"{what}: cannot run {cmd[0]}: {exc}") \
                from exc
        return out

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise read-modify-write of the shared chains between threads
        and between agent processes on this host."""
        with self._thread_lock:
            os.makedirs(os.path.dirname(self.lock_file) or ".", exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def save(self, tool: str) -> str:
        assert tool in _TOOLS
        if tool == "iptables":
            return self._run("iptables-save", "-t", "filter", what="reading iptables")
        return self._run("ebtables-save", "-t", "filter", what="reading ebtables")

    def restore(self, tool: str, text: str) -> None:
        """Apply ``text`` atomically; on any error nothing of it is applied."""
        assert tool in _TOOLS
        self._run(f"{tool}-restore", "--noflush", stdin=text,
                  what=f"applying {tool} rules (rolled back)")

    def ensure_br_netfilter(self) -> None:
        """Bridged IPv4 must traverse iptables, or the chains filter nothing."""
        try:
            value = self._run("sysctl", "-n", _BR_NF_KEY, what="reading " + _BR_NF_KEY)
        except exception.FirewallError as exc:
            raise exception.FirewallError(
                reason=f"br_netfilter is not available ({exc}); bridged traffic cannot be "
                       f"filtered, refusing to plug ports unprotected") from exc
        if value.strip() != "1":
            LOG.warning("%s was %s; setting it to 1 so bridged traffic is filtered",
                        _BR_NF_KEY, value.strip())
            self._run("sysctl", "-q", "-w", f"{_BR_NF_KEY}=1", what="enabling " + _BR_NF_KEY)
