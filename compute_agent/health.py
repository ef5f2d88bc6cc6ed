"""The agent's health, as systemd and the operator's monitoring see it.

A periodic check asks libvirt whether the connection is alive (reconnecting if
not) and makes one RPC call to the agent's own server through RabbitMQ (so a
healthy result means requests really get consumed). The systemd watchdog is
pinged only while both have answered within ``health_unreachable_timeout``;
when either stays unreachable longer, the pings stop and systemd restarts the
service. Notifications go through oslo.service's sd_notify helper.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from oslo_log import log as logging
from oslo_service import systemd

LOG = logging.getLogger(__name__)


def sd_notify(message: str) -> None:
    """Send one state line to systemd (no-op without NOTIFY_SOCKET).

    oslo.service only exposes READY publicly; its sender is reused for the
    other lines (WATCHDOG, STATUS, STOPPING) rather than writing a second one.
    """
    systemd._sd_notify(False, message.encode())


def watchdog_interval() -> float | None:
    """Half of systemd's WATCHDOG_USEC, in seconds, when a watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or (os.environ.get("WATCHDOG_PID") not in (None, str(os.getpid()))):
        return None
    return int(usec) / 2e6


class HealthMonitor:
    def __init__(self, check_libvirt: Callable[[], bool], check_rpc: Callable[[], bool],
                 unreachable_timeout: float, status: Callable[[], str]):
        self._check_libvirt = check_libvirt
        self._check_rpc = check_rpc
        self._timeout = unreachable_timeout
        self._status = status
        now = time.monotonic()
        self.libvirt_ok_at = now
        self.rpc_ok_at = now
        self.libvirt_up = True
        self.rpc_up = True

    def check(self) -> bool:
        now = time.monotonic()
        self.libvirt_up = _safe(self._check_libvirt)
        if self.libvirt_up:
            self.libvirt_ok_at = now
        self.rpc_up = _safe(self._check_rpc)
        if self.rpc_up:
            self.rpc_ok_at = now
        healthy = (now - self.libvirt_ok_at < self._timeout
                   and now - self.rpc_ok_at < self._timeout)
        if not (self.libvirt_up and self.rpc_up):
            LOG.warning("Health: libvirt %s (last ok %.0fs ago), RabbitMQ %s (last ok %.0fs "
                        "ago)%s", "up" if self.libvirt_up else "DOWN", now - self.libvirt_ok_at,
                        "up" if self.rpc_up else "DOWN", now - self.rpc_ok_at,
                        "" if healthy else "; no longer pinging the watchdog")
        return healthy

    def run(self, stop: threading.Event, interval: float) -> threading.Thread:
        def loop():
            while not stop.wait(interval):
                if self.check():
                    sd_notify("WATCHDOG=1")
                sd_notify(f"STATUS={self._status()}")
        thread = threading.Thread(target=loop, name="health", daemon=True)
        thread.start()
        return thread


def _safe(fn: Callable[[], bool]) -> bool:
    try:
        return bool(fn())
    except Exception as exc:  # a failed probe is an answer, not a crash
        LOG.debug("Health probe %s failed: %s", getattr(fn, "__name__", fn), exc)
        return False
