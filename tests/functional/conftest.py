"""Fixtures for functional tests against the real libvirtd and RabbitMQ.

The services are started by tools/prepare-host.sh (tools/run-tests.sh runs
it first); these fixtures check they are reachable and fail with a clear
message otherwise. Guest images come from tools/guest/ builders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import uuid as uuidlib

import libvirt
import pytest
from oslo_config import cfg

from compute_agent import rpc
from compute_agent.rpc.api import ComputeAPI
from tests.functional.agent_fixture import TEST_ROOT, TRANSPORT_URL, AgentProcess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUEST_DIR = os.environ.get("GUEST_DIR", "/var/cache/compute-agent/guest")


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def services():
    if not _reachable(5672):
        pytest.fail("RabbitMQ is not listening on 127.0.0.1:5672: run tools/prepare-host.sh "
                    "(tools/run-tests.sh does)")
    try:
        libvirt.open("qemu:///system").close()
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd is not reachable ({exc}): run tools/prepare-host.sh")
    os.makedirs(TEST_ROOT, exist_ok=True)


def _register(image_dir: str, image_id: str, src: str, disk_format: str) -> None:
    dest = os.path.join(image_dir, image_id)
    shutil.copyfile(src, dest)
    with open(dest, "rb") as f:
        digest = hashlib.file_digest(f, "sha512").hexdigest()
    with open(dest + ".json", "w") as f:
        json.dump({"name": image_id, "disk_format": disk_format,
                   "os_hash_algo": "sha512", "os_hash_value": digest}, f)


@pytest.fixture(scope="session")
def image_dir(services, tmp_path_factory):
    """A local image service directory holding the test guests."""
    linux = os.path.join(GUEST_DIR, "linux-guest.raw")
    boot = os.path.join(GUEST_DIR, "bootsector-guest.raw")
    for path in (linux, boot):
        if not os.path.exists(path):
            pytest.fail(f"{path} is missing: run tools/prepare-host.sh to build it")
    d = str(tmp_path_factory.mktemp("images"))
    _register(d, "linux-guest", linux, "raw")
    _register(d, "bootsector", boot, "raw")
    # Boots nothing: SeaBIOS finds no boot sector and ignores the power button.
    blank = os.path.join(d, "blank.src")
    with open(blank, "wb") as f:
        f.truncate(1024 * 1024)
    _register(d, "blank", blank, "raw")
    os.unlink(blank)
    qcow2 = os.path.join(d, "linux-guest.qcow2.src")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", linux, qcow2],
                   check=True)
    _register(d, "linux-guest-qcow2", qcow2, "qcow2")
    os.unlink(qcow2)
    return d


@pytest.fixture(scope="session")
def api(services):
    conf = cfg.CONF
    conf([], project="compute-agent-tests", default_config_files=[])
    transport = rpc.get_transport(conf, url=TRANSPORT_URL)
    yield ComputeAPI(transport, timeout=30)
    transport.cleanup()


@pytest.fixture
def ctxt(api):
    return api.new_context()


@pytest.fixture
def agent_factory(api, image_dir):
    """Start agents on demand; every one is stopped and cleaned up after the test."""
    started: list[AgentProcess] = []

    def start(name: str = "agent", virt_type: str = "qemu", extra_conf: str = "",
              env: dict | None = None) -> AgentProcess:
        agent = AgentProcess(name, image_dir, virt_type, extra_conf)
        started.append(agent)
        agent.start(api, api.new_context(), env=env)
        return agent

    yield start
    for agent in started:
        agent.cleanup()


@pytest.fixture
def tcg_agent(agent_factory):
    return agent_factory("tcg", virt_type="qemu")


@pytest.fixture
def kvm_agent(agent_factory):
    return agent_factory("kvm", virt_type="kvm")


def make_spec(image: str = "linux-guest", name: str = "ft-guest", memory_mb: int = 256,
              root_gb: int = 1, **flavor) -> dict:
    return {
        "uuid": str(uuidlib.uuid4()), "name": name,
        "flavor": {"name": "ft.small", "vcpus": 1, "memory_mb": memory_mb,
                   "root_gb": root_gb, "ephemeral_gb": 0, "swap_mb": 0, **flavor},
        "image": {"id": image},
    }


def domain_exists(uuid: str) -> bool:
    conn = libvirt.open("qemu:///system")
    try:
        conn.lookupByUUIDString(uuid)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


@pytest.fixture(scope="session")
def glance(services):
    """A real Glance API (sqlite, file store, no Keystone) for the whole session."""
    from tests.functional.glance_fixture import GlanceServer
    server = GlanceServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def second_host(services):
    """A second hypervisor host for migration tests: its own libvirtd (and
    virtlogd) in a mount/UTS namespace, on TCP at a loopback address. Started
    once per session; stopping it destroys its domains and kills only its own
    daemons (see second_host.py)."""
    from tests.functional.second_host import SecondHost
    host = SecondHost()
    host.start()
    yield host
    host.stop()
