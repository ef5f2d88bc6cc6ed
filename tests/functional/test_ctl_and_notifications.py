"""The operator's path (compute-agent-ctl as a subprocess) and the lifecycle
notifications, both through the real RabbitMQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid as uuidlib

import oslo_messaging as messaging
from oslo_config import cfg

from tests.functional.agent_fixture import TRANSPORT_URL
from tests.functional.conftest import make_spec

CTL = os.path.join(os.path.dirname(sys.executable), "compute-agent-ctl")


def _ctl(agent, *args, check=True):
    res = subprocess.run([CTL, "--config-file", agent.conf_path, *args],
                         capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_ctl_boot_console_show_delete(kvm_agent):
    uuid = str(uuidlib.uuid4())
    res = _ctl(kvm_agent, "boot", "--uuid", uuid, "--name", "ctl-guest", "--image",
               "bootsector", "--memory", "64", "--wait")
    assert "| vm_state    | active" in res.stdout
    deadline = time.monotonic() + 60
    while "GUEST-READY" not in _ctl(kvm_agent, "console-log", uuid).stdout:
        assert time.monotonic() < deadline, "no ready marker"
        time.sleep(0.5)
    shown = json.loads(_ctl(kvm_agent, "-f", "json", "show", uuid).stdout)
    assert shown["vm_state"] == "active" and shown["host"] == kvm_agent.host
    assert shown["operations"][0]["name"] == "spawn"
    assert shown["operations"][0]["status"] == "done"
    listed = json.loads(_ctl(kvm_agent, "-f", "json", "list").stdout)
    assert [i["uuid"] for i in listed] == [uuid]
    status = json.loads(_ctl(kvm_agent, "-f", "json", "host-status").stdout)
    assert status["instances"] == 1 and status["libvirt_connected"] is True

    res = _ctl(kvm_agent, "reboot", "--hard", uuid, "--wait")
    assert "reboot: hard reboot" in res.stderr
    res = _ctl(kvm_agent, "delete", uuid, "--wait")
    assert "| vm_state    | deleted" in res.stdout


def test_ctl_reports_refusals_and_bad_input(kvm_agent):
    res = _ctl(kvm_agent, "boot", "--name", "<b>", "--image", "bootsector", check=False)
    assert res.returncode == 1
    assert "field 'name'" in res.stderr
    res = _ctl(kvm_agent, "suspend", str(uuidlib.uuid4()), "--wait", check=False)
    assert res.returncode == 1
    assert "suspend refused" in res.stderr and "is not known to this host" in res.stderr


class _Collector:
    def __init__(self):
        self.events: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()

    def _record(self, priority, event_type, payload):
        with self.lock:
            self.events.append((priority, event_type, payload))

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self._record("info", event_type, payload)

    def error(self, ctxt, publisher_id, event_type, payload, metadata):
        self._record("error", event_type, payload)


def test_lifecycle_notifications(api, kvm_agent):
    collector = _Collector()
    transport = messaging.get_notification_transport(cfg.CONF, url=TRANSPORT_URL)
    listener = messaging.get_notification_listener(
        transport, [messaging.Target(topic="notifications")], [collector],
        executor="threading", pool=f"ft-{uuidlib.uuid4().hex[:8]}")
    listener.start()
    try:
        ctxt = api.new_context()
        good = make_spec(image="bootsector", memory_mb=64)
        bad = make_spec(image="no-such-image")
        api.spawn(ctxt, kvm_agent.host, good)
        api.spawn(ctxt, kvm_agent.host, bad)
        wanted = {("info", "compute.instance.spawn.start", good["uuid"]),
                  ("info", "compute.instance.spawn.end", good["uuid"]),
                  ("info", "compute.instance.spawn.start", bad["uuid"]),
                  ("error", "compute.instance.spawn.error", bad["uuid"])}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with collector.lock:
                seen = {(p, e, pl.get("uuid")) for p, e, pl in collector.events}
            if wanted <= seen:
                break
            time.sleep(0.2)
        assert wanted <= seen, seen
        end = next(pl for p, e, pl in collector.events
                   if e == "compute.instance.spawn.end" and pl["uuid"] == good["uuid"])
        assert end["vm_state"] == "active" and end["host"] == kvm_agent.host
        error = next(pl for p, e, pl in collector.events
                     if e == "compute.instance.spawn.error" and pl["uuid"] == bad["uuid"])
        assert "no-such-image was not found" in error["message"]
    finally:
        listener.stop()
        listener.wait()
        transport.cleanup()
