"""The connection to the local libvirtd: open, keep alive, reconnect, events.

Every libvirt call the driver makes goes through ``Host.call`` (or a
``Guest`` obtained from here), so connection loss, logging and error
translation live in one place. libvirt's default event loop runs in a daemon
thread; it delivers domain lifecycle events and notices a dead connection
(keepalive), after which the next call reconnects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import libvirt
from oslo_log import log as logging

from compute_agent import exception
from compute_agent.virt.libvirt.guest import Guest

LOG = logging.getLogger(__name__)

# libvirt's own error codes that mean "the connection is gone", not "the
# request was bad": after these we reconnect once and retry the call.
_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR,
    libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
}

LifecycleCallback = Callable[[str, int, int], None]

_event_loop_started = False
_event_loop_lock = threading.Lock()


def _start_event_loop() -> None:
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        # libvirt-python prints every error to stderr by default, including the
        # expected ones ("Domain not found" on a lookup): errors reach us as
        # exceptions, which Host.call logs and translates.
        libvirt.registerErrorHandler(lambda ctx, err: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


class Host:
    def __init__(self, uri: str, lifecycle_callback: LifecycleCallback | None = None):
        self.uri = uri
        # (domain uuid, device alias) -> waiter for the device-removed event
        self._device_waiters: dict[tuple[str, str], DeviceRemoval] = {}
        self._lifecycle_callback = lifecycle_callback
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        self.connected_since: float | None = None
        self.last_failure: float | None = None

    # --- the connection ----------------------------------------------------

    def connect(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                LOG.warning("libvirt connection to %s was lost; reconnecting", self.uri)
                self._drop()
            return self._open()

    def _open(self) -> libvirt.virConnect:
        _start_event_loop()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            self.last_failure = time.monotonic()
            raise exception.HypervisorUnavailable(uri=self.uri,
                                                  reason=exc.get_error_message()) from exc
        conn.registerCloseCallback(self._on_close, None)
        # Notice a dead daemon within ~15 s even when the agent is idle.
        conn.setKeepAlive(5, 3)
        if self._lifecycle_callback:
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._on_lifecycle, None)
        self._register_device_events(conn)
        self._conn = conn
        self.connected_since = time.monotonic()
        LOG.info("Connected to libvirt at %s (libvirt %s)", self.uri,
                 _version(conn.getLibVersion()))
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self.connected_since = None
        if conn is not None:
            try:
                conn.unregisterCloseCallback()
                conn.close()
            except libvirt.libvirtError:
                pass

    def _on_close(self, conn, reason, opaque) -> None:
        LOG.warning("libvirt closed the connection to %s (reason %s)", self.uri, reason)
        self.last_failure = time.monotonic()
        with self._lock:
            if self._conn is conn:
                self._conn = None
                self.connected_since = None

    def _on_lifecycle(self, conn, dom, event, detail, opaque) -> None:
        try:
            self._lifecycle_callback(dom.UUIDString(), event, detail)
        except Exception:  # never let a callback kill the event thread
            LOG.exception("Lifecycle event handler failed")

    def is_alive(self) -> bool:
        conn = self._conn
        try:
            return conn is not None and conn.isAlive() == 1
        except libvirt.libvirtError:
            return False

    def close(self) -> None:
        with self._lock:
            self._drop()

    # --- calls ---------------------------------------------------------------

    def call(self, what: str, fn: Callable[[libvirt.virConnect], object]):
        """Run ``fn(conn)``; reconnect and retry once if the connection died."""
        for attempt in (1, 2):
            conn = self.connect()
            try:
                LOG.debug("libvirt: %s", what)
                return fn(conn)
            except libvirt.libvirtError as exc:
                if attempt == 1 and exc.get_error_code() in _CONNECTION_ERRORS \
                        and not self._conn_alive(conn):
                    LOG.warning("libvirt %s failed on a dead connection; retrying", what)
                    with self._lock:
                        if self._conn is conn:
                            self._drop()
                    continue
                raise exception.HypervisorError(call=what,
                                                reason=exc.get_error_message()) from exc

    @staticmethod
    def _conn_alive(conn) -> bool:
        try:
            return conn.isAlive() == 1
        except libvirt.libvirtError:
            return False

    def lookup(self, uuid: str) -> Guest | None:
        """The domain with this UUID, or None when libvirt does not know it."""
        def fn(conn):
            try:
                return conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
        dom = self.call(f"lookupByUUIDString({uuid})", fn)
        return Guest(dom, self) if dom is not None else None

    def define(self, xml: str) -> Guest:
        dom = self.call("defineXML", lambda c: c.defineXML(xml))
        return Guest(dom, self)

    def domain_states(self) -> dict[str, int]:
        """UUID -> libvirt state of every domain, in one bulk call."""
        stats = self.call("getAllDomainStats(state)",
                          lambda c: c.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE))
        return {dom.UUIDString(): int(s["state.state"]) for dom, s in stats}

    def versions(self) -> tuple[str, str]:
        conn = self.connect()
        return _version(conn.getLibVersion()), _version(conn.getVersion())

    def node_info(self) -> tuple[int, int]:
        """(cpus, memory MiB) of the host."""
        info = self.call("getInfo", lambda c: c.getInfo())
        return int(info[2]), int(info[1])

    # --- device removal events (volume detach) ---------------------------------

    def _register_device_events(self, conn) -> None:
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                                    self._on_device_removed, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                                    self._on_device_removal_failed, None)

    def _on_device_removed(self, conn, dom, alias, opaque) -> None:
        waiter = self._device_waiters.get((dom.UUIDString(), alias))
        LOG.debug("libvirt: device %s removed from %s", alias, dom.name())
        if waiter is not None:
            waiter.removed = True
            waiter.event.set()

    def _on_device_removal_failed(self, conn, dom, alias, opaque) -> None:
        waiter = self._device_waiters.get((dom.UUIDString(), alias))
        LOG.debug("libvirt: removal of device %s from %s failed", alias, dom.name())
        if waiter is not None:
            waiter.event.set()

    def expect_device_removal(self, uuid: str, alias: str) -> DeviceRemoval:
        """Register before asking for a detach, so the event cannot be missed;
        ``wait``, then ``close``."""
        waiter = DeviceRemoval(self, uuid, alias)
        self._device_waiters[(uuid, alias)] = waiter
        return waiter

    # --- secrets (volume credentials) ------------------------------------------

    def define_secret(self, secret_uuid: str, usage_type: str, usage_id: str,
                      description: str, value: bytes) -> None:
        """Create or update a private libvirt secret and set its value. The
        value never appears in XML, logs or errors."""
        from lxml import etree
        root = etree.Element("secret", ephemeral="no", private="yes")
        etree.SubElement(root, "uuid").text = secret_uuid
        etree.SubElement(root, "description").text = description
        usage = etree.SubElement(root, "usage", type=usage_type)
        etree.SubElement(usage, "target" if usage_type == "iscsi" else "name").text = usage_id
        xml = etree.tostring(root, encoding="unicode")

        def fn(conn):
            secret = conn.secretDefineXML(xml, 0)
            try:
                secret.setValue(value, 0)
            except libvirt.libvirtError:
                secret.undefine()
                raise
        self.call(f"secretDefineXML({secret_uuid})", fn)

    def delete_secret(self, secret_uuid: str) -> bool:
        """Remove a secret; False if there was none."""
        def fn(conn):
            try:
                secret = conn.secretLookupByUUIDString(secret_uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                    return False
                raise
            secret.undefine()
            return True
        return self.call(f"secret undefine({secret_uuid})", fn)

    def secrets_by_usage_prefix(self, prefix: str) -> dict[str, str]:
        """{secret uuid: usage id} of the secrets whose usage id starts with ``prefix``."""
        def fn(conn):
            return {s.UUIDString(): s.usageID() for s in conn.listAllSecrets(0)
                    if (s.usageID() or "").startswith(prefix)}
        return self.call("listAllSecrets", fn)

    def secret_exists(self, secret_uuid: str) -> bool:
        def fn(conn):
            try:
                conn.secretLookupByUUIDString(secret_uuid)
                return True
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                    return False
                raise
        return self.call(f"secretLookupByUUIDString({secret_uuid})", fn)


class DeviceRemoval:
    """One expected device-removed event (see Host.expect_device_removal)."""

    def __init__(self, host: Host, uuid: str, alias: str):
        self._host = host
        self.key = (uuid, alias)
        self.event = threading.Event()
        self.removed = False

    def wait(self, timeout: float) -> bool:
        """True when libvirt reported the device removed within ``timeout``
        (False on timeout or a removal-failed event)."""
        self.event.wait(timeout)
        self.event.clear()
        return self.removed

    def close(self) -> None:
        self._host._device_waiters.pop(self.key, None)


def _version(v: int) -> str:
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"
