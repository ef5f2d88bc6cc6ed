"""Running as a service: systemd's notify protocol and watchdog, played by the
test, and the Prometheus metrics endpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.functional.agent_fixture import wait_for
from tests.functional.conftest import REPO, make_spec


class NotifySocket:
    """The datagram socket systemd listens on: records (time, message)."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def times(self, message: str) -> list[float]:
        return [t for t, m in list(self.messages) if m == message]

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()
        os.unlink(self.path)


class LibvirtProxy:
    """A unix-socket relay to libvirtd that the test can cut, making libvirt
    unreachable for one agent without touching the shared daemon."""

    def __init__(self, path: str, target: str = "/run/libvirt/libvirt-sock"):
        self.path, self.target = path, target
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(16)
        self.conns: list[socket.socket] = []
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.cut.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.cut.set()
        self.server.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def test_systemd_ready_watchdog_and_unhealthy_libvirt(api, agent_factory, tmp_path):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    proxy = LibvirtProxy(str(tmp_path / "libvirt.sock"))
    try:
        agent_factory_env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}
        agent = agent_factory("systemd", virt_type="kvm", env=agent_factory_env, extra_conf=(
            f"[DEFAULT]\nhealth_unreachable_timeout = 3\n"
            f"[libvirt]\nconnection_uri = qemu:///system?socket={proxy.path}\n"))
        # agent_factory returns once RPC answers; READY must already be there,
        # and nothing said READY before the agent consumed requests.
        deadline = time.monotonic() + 10
        while not notify.times("READY=1"):
            assert time.monotonic() < deadline, notify.messages
            time.sleep(0.05)
        assert len(notify.times("READY=1")) == 1
        assert api.ping(api.new_context(), agent.host, timeout=5, retry=0) == agent.host

        # Healthy: a ping every half WatchdogSec (0.5 s here) and a status line.
        time.sleep(2.5)
        assert len(notify.times("WATCHDOG=1")) >= 3
        assert any(m.startswith("STATUS=0 instance(s); libvirt up") for _, m in notify.messages)

        # libvirt unreachable for longer than health_unreachable_timeout: the
        # pings stop, so systemd would restart the service.
        proxy.close()
        cut_at = time.monotonic()
        time.sleep(6)
        late = [t for t in notify.times("WATCHDOG=1") if t > cut_at + 4]
        assert late == [], "watchdog still pinged with libvirt unreachable"
        assert any("libvirt DOWN" in m for _, m in notify.messages)

        agent.kill()
        assert notify.times("STOPPING=1")
    finally:
        proxy.close()
        notify.close()


def test_unit_file_verifies(tmp_path):
    unit = open(os.path.join(REPO, "etc/systemd/compute-agent.service")).read()
    # The unit names the documented install path; point it at this venv.
    exe = os.path.join(os.path.dirname(sys.executable), "compute-agent")
    path = tmp_path / "compute-agent.service"
    path.write_text(unit.replace("/opt/compute-agent/venv/bin/compute-agent", exe))
    res = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


@pytest.mark.kvm
def test_metrics_during_and_after_a_spawn(api, agent_factory):
    port = _free_port()
    agent = agent_factory("metrics", virt_type="kvm", extra_conf=(
        f"[DEFAULT]\nmetrics_port = {port}\n"),
        env={"COMPUTE_AGENT_PAUSE_BEFORE_STEP": "spawn:start_domain:2"})
    before = _scrape(port)
    assert before["compute_agent_libvirt_up"] == 1
    ctxt = api.new_context()
    spec = make_spec(image="bootsector", memory_mb=64)
    api.spawn(ctxt, agent.host, spec)
    # During: the instance is building and the spawn is not counted yet.
    wait_for(api, ctxt, agent.host, spec["uuid"],
             lambda i: i["vm_state"] == "building", timeout=30)
    during = _scrape(port)
    assert during['compute_agent_instances{vm_state="building"}'] == 1
    assert 'compute_agent_operations_total{operation="spawn",outcome="done"}' not in during
    wait_for(api, ctxt, agent.host, spec["uuid"], lambda i: i["task_state"] is None)
    after = _scrape(port)
    assert after['compute_agent_operations_total{operation="spawn",outcome="done"}'] == 1
    assert after['compute_agent_operation_duration_seconds_count{operation="spawn"}'] == 1
    # The pause before start_domain is inside the observed duration.
    assert after['compute_agent_operation_duration_seconds_sum{operation="spawn"}'] >= 2
    assert after['compute_agent_instances{vm_state="active"}'] == 1
    assert after['compute_agent_instances_by_power_state{power_state="running"}'] == 1
    assert after["compute_agent_image_cache_misses"] == 1
    assert after["compute_agent_image_cache_bytes"] > 0
    assert after["compute_agent_instances_path_free_bytes"] > 0
    assert after["compute_agent_rabbitmq_up"] == 1


def test_sighup_rereads_log_levels(api, agent_factory):
    agent = agent_factory("sighup", virt_type="kvm")

    def log_after(action) -> str:
        start = os.path.getsize(agent.log_path)
        action()
        time.sleep(0.5)
        with open(agent.log_path, errors="replace") as f:
            f.seek(start)
            return f.read()

    def status():
        api.get_host_status(api.new_context(), agent.host)

    assert "DEBUG compute_agent.virt.libvirt.host" in log_after(status)

    def set_debug(value: str):
        with open(agent.conf_path) as f:
            conf = f.read()
        with open(agent.conf_path, "w") as f:
            f.write(conf.replace("debug = true", f"debug = {value}").replace(
                "debug = false", f"debug = {value}"))
        agent.proc.send_signal(signal.SIGHUP)
        time.sleep(1)

    set_debug("false")
    assert " DEBUG " not in log_after(status)
    set_debug("true")
    assert "DEBUG compute_agent.virt.libvirt.host" in log_after(status)
    assert agent.proc.poll() is None, "SIGHUP must not stop the agent"
