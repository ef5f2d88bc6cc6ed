"""A real Glance API for the functional tests (tools/glance/run-glance.sh),
started once per test session on a free loopback port and stopped after."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import glanceclient
from keystoneauth1 import session as ks_session
from keystoneauth1.noauth import NoAuth

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GlanceServer:
    def __init__(self):
        self.state = tempfile.mkdtemp(prefix="ca-glance-", dir="/var/tmp")
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.client = glanceclient.Client(
            "2", session=ks_session.Session(auth=NoAuth()), endpoint_override=self.endpoint)

    def start(self, timeout: float = 90) -> None:
        self.proc = subprocess.Popen(
            [os.path.join(REPO, "tools/glance/run-glance.sh"), self.state, str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.endpoint + "/healthcheck", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Glance did not start; see {self.state}/gunicorn.log")
            time.sleep(0.3)

    def stop(self) -> None:
        """Kill gunicorn and its worker (the whole process group)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.state, ignore_errors=True)

    def upload(self, path: str, disk_format: str, name: str = "ft-image") -> str:
        image = self.client.images.create(name=name, disk_format=disk_format,
                                          container_format="bare")
        with open(path, "rb") as f:
            self.client.images.upload(image["id"], f)
        return image["id"]

    def downloads(self, image_id: str) -> int:
        """How many times the image's data was served (gunicorn access log)."""
        with open(os.path.join(self.state, "access.log")) as f:
            return sum(1 for line in f if f"GET /v2/images/{image_id}/file" in line)

    def store_path(self, image_id: str) -> str:
        return os.path.join(self.state, "images", image_id)

    def agent_conf(self) -> str:
        return (f"[image]\nbackend = glance\n[glance]\nauth_type = none\n"
                f"endpoint_override = {self.endpoint}\n")
