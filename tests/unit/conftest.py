"""Shared fixtures: a real Store on tmp_path, the fakes, a manager wired to them."""

from __future__ import annotations

import copy
import uuid as uuidlib

import pytest
from oslo_config import cfg
from oslo_context import context as o_context

from compute_agent import conf as ca_conf
from compute_agent.manager import ComputeManager
from compute_agent.store import Store
from tests.unit.fake_driver import FakeDriver, FakeImageService

IMAGE_ID = "cirros-0.6"

MINIMAL_SPEC = {
    "uuid": "3f1c3a0e-7d56-4a4b-9b0e-2d9a8f6c1e01",
    "name": "web-1",
    "flavor": {"name": "m1.tiny", "vcpus": 1, "memory_mb": 512, "root_gb": 1},
    "image": {"id": IMAGE_ID},
}


class FakeNotifier:
    """Records what oslo.messaging's Notifier would have sent."""

    def __init__(self):
        self.sent: list[tuple[str, object, str, dict]] = []  # (priority, ctxt, event, payload)

    def info(self, ctxt, event_type, payload):
        self.sent.append(("info", ctxt, event_type, payload))

    def error(self, ctxt, event_type, payload):
        self.sent.append(("error", ctxt, event_type, payload))

    def events(self) -> list[str]:
        return [event for _, _, event, _ in self.sent]

    def last(self, event_type: str) -> tuple[str, dict]:
        """(priority, payload) of the last notification of that type."""
        for priority, _, event, payload in reversed(self.sent):
            if event == event_type:
                return priority, payload
        raise AssertionError(f"no {event_type} notification in {self.events()}")


@pytest.fixture
def make_spec():
    """A valid minimal spec dict (fresh copy each call), with top-level overrides."""
    def make(**overrides) -> dict:
        spec = copy.deepcopy(MINIMAL_SPEC)
        spec["uuid"] = str(uuidlib.uuid4())
        spec.update(overrides)
        return spec
    return make


@pytest.fixture
def conf(tmp_path):
    c = cfg.ConfigOpts()
    ca_conf.register_opts(c)
    c([], project="test")
    c.set_override("host", "h1")
    c.set_override("state_path", str(tmp_path / "state"))
    c.set_override("instances_path", str(tmp_path / "instances"))
    return c


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "state"))
    yield s
    s.close()


@pytest.fixture
def images():
    service = FakeImageService()
    service.add(IMAGE_ID)
    return service


@pytest.fixture
def driver(images):
    return FakeDriver(images)


@pytest.fixture
def notifier():
    return FakeNotifier()


@pytest.fixture
def manager(conf, store, driver, images, notifier):
    return ComputeManager(conf, store, driver, images, notifier)


@pytest.fixture
def ctxt():
    return o_context.RequestContext()
