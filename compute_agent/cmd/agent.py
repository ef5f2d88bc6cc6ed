"""compute-agent: the per-hypervisor daemon.

Start-up order: config and logging, the database, the driver (libvirt
connection), reconciliation of anything a previous run left unfinished, then
the RPC server. SIGTERM/SIGINT stop consuming new requests and wait (up to
graceful_shutdown_timeout) for running operations to finish.
"""

from __future__ import annotations

import signal
import sys
import threading

from oslo_log import log as logging
from oslo_service import systemd

from compute_agent import __version__, health, manager, metrics, rpc, store
from compute_agent.conf import CONF
from compute_agent.image import cache, service
from compute_agent.rpc import server as rpc_server
from compute_agent.rpc.api import ComputeAPI
from compute_agent.virt.libvirt import driver as libvirt_driver

LOG = logging.getLogger(__name__)


def _periodic(stop: threading.Event, interval: int, fn, name: str) -> threading.Thread:
    def loop():
        while not stop.wait(interval):
            try:
                fn()
            except Exception:
                LOG.exception("Periodic task %s failed", name)
    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


def build_manager(conf) -> manager.ComputeManager:
    images = service.get_image_service(conf)
    image_cache = cache.ImageCache(conf, images)
    driver = libvirt_driver.LibvirtDriver(conf, image_cache)
    db = store.Store(conf.state_path)
    notifier = rpc.get_notifier(conf, conf.host)
    return manager.ComputeManager(conf, db, driver, images, notifier)


def _wait_until_consuming(api: ComputeAPI, host: str, stop: threading.Event) -> None:
    """READY means requests are consumed: prove it with a call to ourselves."""
    while not stop.is_set():
        try:
            api.ping(api.new_context(), host, timeout=5, retry=0)
            return
        except Exception as exc:
            LOG.info("Waiting for our own RPC server to answer: %s", exc)
            stop.wait(1)


def _start_health(mgr, api: ComputeAPI, stop: threading.Event) -> health.HealthMonitor:
    def status() -> str:
        live = [i for i in mgr.store.list_instances() if i.vm_state != "deleted"]
        return f"{len(live)} instance(s); libvirt {'up' if monitor.libvirt_up else 'DOWN'}"

    monitor = health.HealthMonitor(
        check_libvirt=mgr.driver.check_connection,
        check_rpc=lambda: api.ping(api.new_context(), CONF.host, timeout=5, retry=0),
        unreachable_timeout=CONF.health_unreachable_timeout, status=status)
    monitor.run(stop, health.watchdog_interval() or CONF.health_check_interval)
    return monitor


def main(argv: list[str] | None = None) -> int:
    logging.register_options(CONF)
    CONF(sys.argv[1:] if argv is None else argv, project="compute-agent",
         version=__version__)
    logging.setup(CONF, "compute-agent")
    LOG.info("compute-agent %s starting on host %s", __version__, CONF.host)

    mgr = build_manager(CONF)
    mgr.init_host()

    transport = rpc.get_transport(CONF)
    server = rpc_server.get_server(CONF, transport, mgr)
    api = ComputeAPI(transport)
    stop = threading.Event()

    def on_signal(signum, frame):
        LOG.info("Received %s; stopping", signal.Signals(signum).name)
        stop.set()

    def on_hup(signum, frame):
        # Re-read the config files; oslo.log applies changed log levels
        # (debug, default_log_levels) without a restart.
        threading.Thread(target=CONF.mutate_config_files, name="sighup").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)

    server.start()
    # In a thread of its own: oslo.context keeps the first context a thread
    # creates, and the main thread's log lines are not this ping's.
    pinger = threading.Thread(target=_wait_until_consuming, args=(api, CONF.host, stop))
    pinger.start()
    pinger.join()
    LOG.info("Consuming RPC on topic %s, server %s", rpc.TOPIC, CONF.host)
    monitor = _start_health(mgr, api, stop)
    if CONF.metrics_port:
        metrics.serve(CONF.metrics_port, CONF.metrics_host, lambda: dict(
            mgr.metrics_snapshot(), libvirt_up=monitor.libvirt_up, rabbitmq_up=monitor.rpc_up))
        LOG.info("Metrics on http://%s:%s/metrics", CONF.metrics_host, CONF.metrics_port)
    if CONF.state_sync_interval:
        _periodic(stop, CONF.state_sync_interval, mgr.sync_power_states, "power-state-sync")
    if CONF.image.cache_ageing_interval:
        _periodic(stop, CONF.image.cache_ageing_interval, mgr.age_image_cache,
                  "image-cache-ageing")
    # READY: connected, reconciled, consuming. notify() rather than notify_once():
    # the latter unsets NOTIFY_SOCKET, which the watchdog pings still need.
    systemd.notify()

    stop.wait()
    health.sd_notify("STOPPING=1")
    server.stop()  # no new requests from here on
    def drain():  # requests in flight, then background work (snapshot uploads)
        server.wait()
        mgr.wait_for_background()

    waiter = threading.Thread(target=drain, daemon=True)
    waiter.start()
    waiter.join(CONF.graceful_shutdown_timeout)
    if waiter.is_alive():
        LOG.warning("Operations still running after %ss; exiting anyway (the journal "
                    "lets the next start reconcile them)", CONF.graceful_shutdown_timeout)
    mgr.driver.cleanup_host()
    mgr.store.close()
    transport.cleanup()
    LOG.info("compute-agent stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
