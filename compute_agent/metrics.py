"""Prometheus metrics (prometheus-client), served on an optional port that is
loopback-only by default (``[DEFAULT] metrics_port``, ``metrics_host``).

Operations are counted and timed as they end; everything that is a state
(instances by state, cache, save files, free space, connections) is read when
the endpoint is scraped, so it can never drift from the truth.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry()

OPERATIONS = Counter("compute_agent_operations", "Operations by type and outcome",
                     ["operation", "outcome"], registry=REGISTRY)
OPERATION_SECONDS = Histogram(
    "compute_agent_operation_duration_seconds", "How long operations take",
    ["operation"], registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
RPC_IN_FLIGHT = Gauge("compute_agent_rpc_requests_in_flight",
                      "RPC requests being handled now", registry=REGISTRY)


def observe_operation(operation: str, outcome: str, seconds: float) -> None:
    OPERATIONS.labels(operation, outcome).inc()
    OPERATION_SECONDS.labels(operation).observe(seconds)


@contextlib.contextmanager
def rpc_in_flight() -> Iterator[None]:
    RPC_IN_FLIGHT.inc()
    try:
        yield
    finally:
        RPC_IN_FLIGHT.dec()


class StateCollector:
    """Reads the state gauges at scrape time from a callable returning a dict:
    {"instances": [(vm_state, power_state), ...], "image_cache_bytes": ..,
     "image_cache_hits": .., "image_cache_misses": .., "save_files_bytes": ..,
     "instances_path_free_bytes": .., "libvirt_up": bool, "rabbitmq_up": bool}"""

    def __init__(self, snapshot: Callable[[], dict]):
        self._snapshot = snapshot

    def collect(self):
        s = self._snapshot()
        by_vm = GaugeMetricFamily("compute_agent_instances", "Instances by vm_state",
                                  labels=["vm_state"])
        by_power = GaugeMetricFamily("compute_agent_instances_by_power_state",
                                     "Instances by power_state", labels=["power_state"])
        vm_counts: dict[str, int] = {}
        power_counts: dict[str, int] = {}
        for vm_state, power_state in s["instances"]:
            vm_counts[vm_state] = vm_counts.get(vm_state, 0) + 1
            power_counts[power_state] = power_counts.get(power_state, 0) + 1
        for k, v in sorted(vm_counts.items()):
            by_vm.add_metric([k], v)
        for k, v in sorted(power_counts.items()):
            by_power.add_metric([k], v)
        yield by_vm
        yield by_power
        for name, doc in (
                ("image_cache_bytes", "Bytes allocated by the _base image cache"),
                ("image_cache_hits", "Image cache hits since start"),
                ("image_cache_misses", "Image cache misses (fetches) since start"),
                ("save_files_bytes", "Bytes taken by managed-save (suspend) files"),
                ("instances_path_free_bytes", "Free bytes on instances_path")):
            yield GaugeMetricFamily(f"compute_agent_{name}", doc, value=s[name])
        yield GaugeMetricFamily("compute_agent_libvirt_up", "libvirt connection is up",
                                value=int(s["libvirt_up"]))
        yield GaugeMetricFamily("compute_agent_rabbitmq_up",
                                "RPC through RabbitMQ answered at the last health check",
                                value=int(s["rabbitmq_up"]))


def serve(port: int, host: str, snapshot: Callable[[], dict]) -> None:
    REGISTRY.register(StateCollector(snapshot))
    start_http_server(port, addr=host, registry=REGISTRY)
