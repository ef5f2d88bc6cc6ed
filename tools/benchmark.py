#!/usr/bin/env python3
"""Benchmarks: the agent next to the floor of the same work, in the same run.

Prints figures and ratios; asserts nothing about time. Writes a Markdown table
and JSON to bench-results/ (or --out).

    .venv/bin/python tools/benchmark.py                  # all scenarios
    .venv/bin/python tools/benchmark.py spawn rpc --runs 10

Scenarios:
  spawn  RPC spawn of the boot-sector guest (cached image, KVM) to "running"
         and to its GUEST-READY marker; floor: qemu-img create + defineXML +
         create() of the same domain with libvirt-python.
  rpc    sequential get_instance calls through RabbitMQ; floor: a bare
         oslo.messaging echo server on the same broker.
  burst  10 concurrent spawns of one image not yet in _base, served by a local
         Glance; floor: one curl + sha512sum + qemu-img convert, then 10
         qemu-img create + define + create.
  fetch  a 1 GiB qcow2 image from Glance into _base as raw, verified; floor:
         curl to a file, sha512sum, qemu-img convert, one after another.
  footprint  idle agent RSS and CPU over 60 s with 0 and 10 instances; one
         periodic power-state sync with 10 and 50 domains; floor: one bare
         getAllDomainStats call.
  transfer  a stopped instance's 4 GiB qcow2 (512 MiB top layer over a 2 GiB
         raw base with 384 MiB of data) moved to another directory through
         libvirt (top layer, sparse stream, rebase, check); floor: Nova's
         flatten (qemu-img convert) + a sparse copy (cp, faster than scp).
Needs what tools/prepare-host.sh sets up (libvirtd, RabbitMQ, guest images).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import compute_agent  # noqa: E402,F401  (first: its warning filters)

# isort: split
import libvirt  # noqa: E402
import oslo_messaging as messaging  # noqa: E402
from oslo_config import cfg  # noqa: E402

from compute_agent import rpc  # noqa: E402
from compute_agent.rpc.api import ComputeAPI  # noqa: E402
from tests.functional.agent_fixture import TRANSPORT_URL, AgentProcess  # noqa: E402

GUEST_DIR = os.environ.get("GUEST_DIR", "/var/cache/compute-agent/guest")
POLL = 0.01


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def wait(pred, timeout=120):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(POLL)


def _run_libvirt_events() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


class Bench:
    def __init__(self, runs: int):
        self.runs = runs
        self.rows: list[dict] = []
        cfg.CONF([], project="compute-agent-bench", default_config_files=[])
        self.transport = rpc.get_transport(cfg.CONF, url=TRANSPORT_URL)
        self.api = ComputeAPI(self.transport, timeout=60)
        self.image_dir = tempfile.mkdtemp(prefix="ca-bench-images-", dir="/var/tmp")
        src = os.path.join(GUEST_DIR, "bootsector-guest.raw")
        subprocess.run(["cp", src, os.path.join(self.image_dir, "bootsector")], check=True)
        with open(os.path.join(self.image_dir, "bootsector.json"), "w") as f:
            json.dump({"name": "bootsector", "disk_format": "raw"}, f)
        self.agent = AgentProcess("bench", self.image_dir, "kvm",
                                  "[DEFAULT]\nstate_sync_interval = 0\n")
        self.agent.write_conf()
        # INFO, not DEBUG: what an operator would run in production.
        with open(self.agent.conf_path) as f:
            conf = f.read().replace("debug = true", "debug = false")
        with open(self.agent.conf_path, "w") as f:
            f.write(conf)
        self.agent.start(self.api, self.api.new_context())
        # "Running" is when libvirt says the domain started, for the agent and
        # the floor alike: polling the agent's record every 10 ms instead cost
        # ~20-25 ms of the 2 CPUs' time while QEMU was starting.
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_libvirt_events, name="libvirt-events", daemon=True).start()
        self.conn = libvirt.open("qemu:///system")
        self.started: dict[str, float] = {}  # domain uuid -> monotonic time it started
        self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                         self._on_lifecycle, None)

    def record(self, scenario, figure, unit, agent, floor, better="lower"):
        ratio = median(agent) / median(floor) if floor else None
        row = {"scenario": scenario, "figure": figure, "unit": unit,
               "agent_median": round(median(agent), 4), "floor_median":
               round(median(floor), 4) if floor else None,
               "ratio": round(ratio, 3) if ratio else None, "runs": len(agent),
               "better": better, "agent_all": [round(x, 4) for x in agent],
               "floor_all": [round(x, 4) for x in floor]}
        self.rows.append(row)
        print(f"{scenario:6} {figure:34} agent {row['agent_median']:>9} {unit:5} "
              f"floor {row['floor_median']!s:>9}  ratio {row['ratio']}", flush=True)

    def _on_lifecycle(self, conn, dom, event, detail, opaque):
        if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            self.started.setdefault(dom.UUIDString(), time.monotonic())

    def _started_after(self, uuid: str, t0: float) -> float:
        wait(lambda: uuid in self.started)
        return self.started[uuid] - t0

    # --- spawn -----------------------------------------------------------------

    def spawn(self):
        agent_running, agent_ready, floor_running, floor_ready = [], [], [], []
        host = self.agent.host
        spec_base = {"name": "bench", "image": {"id": "bootsector"},
                     "flavor": {"name": "b", "vcpus": 1, "memory_mb": 64, "root_gb": 1}}
        # Warm the cache (and the first-define costs) once, outside the figures.
        self._agent_spawn(dict(spec_base, uuid=str(uuidlib.uuid4())), host)
        template = None
        steps: dict[str, list[float]] = {}
        for _ in range(self.runs):
            uuid = str(uuidlib.uuid4())
            running, ready, xml = self._agent_spawn(dict(spec_base, uuid=uuid), host)
            agent_running.append(running)
            agent_ready.append(ready)
            template = template or (uuid, xml)
            for name, ms in self._step_times(uuid, host, running).items():
                steps.setdefault(name, []).append(ms)
            self._agent_delete(uuid, host)
            r, rd = self._floor_spawn(*template)
            floor_running.append(r)
            floor_ready.append(rd)
        self.record("spawn", "RPC spawn -> domain running", "s", agent_running, floor_running)
        self.record("spawn", "RPC spawn -> GUEST-READY", "s", agent_ready, floor_ready)
        # Where the agent's time to "running" goes, from its own journal.
        for name, ms in steps.items():
            self.record("spawn", f"  of which {name}", "ms", ms, [])

    def _step_times(self, uuid, host, running_s) -> dict[str, float]:
        """Milliseconds per journalled step, and what lies outside the steps
        (RPC delivery, acceptance, records, the caller's polling)."""
        def ts(value):
            return datetime.datetime.fromisoformat(value).timestamp()
        op = self.api.get_operations(self.api.new_context(), host, uuid, limit=1)[0]
        out = {s["name"]: (ts(s["finished_at"]) - ts(s["started_at"])) * 1000
               for s in op["steps"]}
        out["outside the steps"] = running_s * 1000 - sum(out.values())
        return out

    def _agent_spawn(self, spec, host):
        ctxt = self.api.new_context()
        t0 = time.monotonic()
        self.api.spawn(ctxt, host, spec)
        state = {}

        def running():
            try:
                state.update(self.api.get_instance(ctxt, host, spec["uuid"]))
            except Exception:
                return False
            return state.get("vm_state") in ("active", "error")

        t_running = self._started_after(spec["uuid"], t0)
        wait(running)
        assert state["vm_state"] == "active", state
        console = os.path.join(self.agent.instances_path, spec["uuid"], "console.log")
        wait(lambda: os.path.exists(console) and b"GUEST-READY" in open(console, "rb").read())
        t_ready = time.monotonic() - t0
        with open(os.path.join(self.agent.instances_path, spec["uuid"], "libvirt.xml")) as f:
            xml = f.read()
        return t_running, t_ready, xml

    def _agent_delete(self, uuid, host):
        ctxt = self.api.new_context()
        self.api.delete(ctxt, host, uuid)
        wait(lambda: self.api.get_instance(ctxt, host, uuid)["vm_state"] == "deleted")

    def _floor_spawn(self, template_uuid, template_xml):
        """The same work with bare qemu-img + libvirt-python."""
        uuid = str(uuidlib.uuid4())
        d = os.path.join(self.agent.instances_path, "floor-" + uuid)
        base = os.path.join(self.agent.instances_path, "_base",
                            hashlib.sha1(b"bootsector").hexdigest())
        xml = template_xml.replace(
            os.path.join(self.agent.instances_path, template_uuid), d).replace(
            template_uuid, uuid)
        t0 = time.monotonic()
        os.mkdir(d, 0o755)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
                        os.path.join(d, "disk"), "1G"], check=True)
        dom = self.conn.defineXML(xml)
        try:
            dom.create()
            t_running = self._started_after(uuid, t0)
            console = os.path.join(d, "console.log")
            wait(lambda: os.path.exists(console)
                 and b"GUEST-READY" in open(console, "rb").read())
            t_ready = time.monotonic() - t0
        finally:  # never leave the floor's domain behind, whatever failed
            if dom.isActive():
                dom.destroy()
            dom.undefine()
            subprocess.run(["rm", "-rf", d], check=True)
        return t_running, t_ready

    # --- rpc -------------------------------------------------------------------

    def rpc(self):
        host = self.agent.host
        ctxt = self.api.new_context()
        spec = {"uuid": str(uuidlib.uuid4()), "name": "rpc", "image": {"id": "bootsector"},
                "flavor": {"name": "b", "vcpus": 1, "memory_mb": 64, "root_gb": 1}}
        self.api.spawn(ctxt, host, spec)
        wait(lambda: self.api.get_instance(ctxt, host, spec["uuid"])["vm_state"] == "active")
        n = 300

        class Echo:
            target = messaging.Target(version="1.0")

            def echo(self, ctxt, uuid):
                return {"uuid": uuid}

        server = messaging.get_rpc_server(
            self.transport, messaging.Target(topic="bench-echo", server="echo"), [Echo()],
            executor="threading", serializer=rpc.ContextSerializer())
        server.start()
        echo = messaging.get_rpc_client(self.transport, messaging.Target(
            topic="bench-echo", server="echo", version="1.0"),
            serializer=rpc.ContextSerializer())
        agent_rates, floor_rates, agent_lat, floor_lat = [], [], [], []
        try:
            for _ in range(max(3, self.runs // 3)):
                lat = []
                t0 = time.monotonic()
                for _ in range(n):
                    t = time.monotonic()
                    self.api.get_instance(ctxt, host, spec["uuid"])
                    lat.append((time.monotonic() - t) * 1000)
                agent_rates.append(n / (time.monotonic() - t0))
                agent_lat.append(median(lat))
                lat = []
                t0 = time.monotonic()
                for _ in range(n):
                    t = time.monotonic()
                    echo.call(ctxt, "echo", uuid=spec["uuid"])
                    lat.append((time.monotonic() - t) * 1000)
                floor_rates.append(n / (time.monotonic() - t0))
                floor_lat.append(median(lat))
        finally:
            server.stop()
            server.wait()
        self.record("rpc", "get_instance calls per second", "1/s", agent_rates, floor_rates,
                    better="higher")
        self.record("rpc", "get_instance median latency", "ms", agent_lat, floor_lat)

    def _wait_vm_state(self, ctxt, host, uuid, wanted, timeout=120):
        wait(lambda: self.api.get_instance(ctxt, host, uuid)["vm_state"] in wanted, timeout)

    # --- images from Glance -------------------------------------------------------

    def _glance(self):
        if getattr(self, "glance", None) is None:
            from tests.functional.glance_fixture import GlanceServer
            self.glance = GlanceServer()
            self.glance.start()
            self.gagent = AgentProcess("bench-glance", self.image_dir, "kvm", (
                "[DEFAULT]\nstate_sync_interval = 0\nmax_concurrent_disk_ops = 2\n"
                + self.glance.agent_conf()))
            self.gagent.start(self.api, self.api.new_context())
        return self.glance, self.gagent

    def _floor_fetch(self, image_id, fmt, workdir) -> str:
        """curl, sha512sum, qemu-img convert: one after another."""
        src, raw = os.path.join(workdir, "src"), os.path.join(workdir, "raw")
        subprocess.run(["curl", "-sf", "-o", src, f"{self.glance.endpoint}/v2/images/"
                        f"{image_id}/file"], check=True)
        subprocess.run(["sha512sum", src], check=True, capture_output=True)
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", src, raw], check=True)
        os.unlink(src)
        return raw

    def _drop_base(self, agent, image_id):
        path = os.path.join(agent.instances_path, "_base",
                            hashlib.sha1(image_id.encode()).hexdigest())
        if os.path.exists(path):
            os.unlink(path)
        return path

    def fetch(self):
        glance, agent = self._glance()
        work = tempfile.mkdtemp(prefix="ca-bench-fetch-", dir="/var/tmp")
        try:
            qcow2 = _random_qcow2(os.path.join(work, "1g"), 1024)
            size = os.path.getsize(qcow2)
            image_id = glance.upload(qcow2, "qcow2", "bench-1g")
            os.unlink(qcow2)
            agent_rate, floor_rate = [], []
            for _ in range(max(3, self.runs // 3)):
                base = self._drop_base(agent, image_id)
                t0 = time.monotonic()
                self.api.cache_images(self.api.new_context(), agent.host, [image_id])
                wait(lambda base=base: os.path.exists(base), timeout=600)
                agent_rate.append(size / 1e6 / (time.monotonic() - t0))
                t0 = time.monotonic()
                os.unlink(self._floor_fetch(image_id, "qcow2", work))
                floor_rate.append(size / 1e6 / (time.monotonic() - t0))
            self._drop_base(agent, image_id)
        finally:
            subprocess.run(["rm", "-rf", work], check=True)
        self.record("fetch", "1 GiB qcow2 Glance -> raw _base", "MB/s", agent_rate,
                    floor_rate, better="higher")

    def burst(self):
        glance, agent = self._glance()
        work = tempfile.mkdtemp(prefix="ca-bench-burst-", dir="/var/tmp")
        os.chmod(work, 0o755)  # the floor's disks live here: QEMU must reach them
        try:
            with open(os.path.join(GUEST_DIR, "bootsector-guest.raw"), "rb") as src:
                qcow2 = _random_qcow2(os.path.join(work, "burst"), 256, head=src.read(512))
            image_id = glance.upload(qcow2, "qcow2", "bench-burst")
            os.unlink(qcow2)
            agent_t, floor_t, downloads = [], [], []
            spec = {"name": "burst", "image": {"id": image_id},
                    "flavor": {"name": "b", "vcpus": 1, "memory_mb": 64, "root_gb": 1}}
            for _ in range(max(3, self.runs // 3)):
                self._drop_base(agent, image_id)
                before = glance.downloads(image_id)
                ctxt = self.api.new_context()
                uuids = [str(uuidlib.uuid4()) for _ in range(10)]
                t0 = time.monotonic()
                for u in uuids:
                    self.api.spawn(ctxt, agent.host, dict(spec, uuid=u))
                for u in uuids:
                    self._wait_vm_state(ctxt, agent.host, u, ("active", "error"), 600)
                agent_t.append(time.monotonic() - t0)
                downloads.append(glance.downloads(image_id) - before)
                for u in uuids:
                    self.api.delete(ctxt, agent.host, u)
                for u in uuids:
                    self._wait_vm_state(ctxt, agent.host, u, ("deleted",))
                floor_t.append(self._floor_burst(image_id, work))
        finally:
            subprocess.run(["rm", "-rf", work], check=True)
        self.record("burst", "10 spawns, cold cache -> all running", "s", agent_t, floor_t)
        self.record("burst", "downloads per burst", "", downloads, [1] * len(downloads))

    def _floor_burst(self, image_id, work) -> float:
        t0 = time.monotonic()
        base = self._floor_fetch(image_id, "qcow2", work)
        doms = []
        for i in range(10):
            uuid = str(uuidlib.uuid4())
            disk = os.path.join(work, f"disk{i}")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
                            disk, "1G"], check=True)
            xml = (f"<domain type='kvm'><name>floor-{uuid}</name><uuid>{uuid}</uuid>"
                        f"<memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' "
                        f"machine='pc'>hvm</type></os><features><acpi/><apic/></features>"
                        f"<devices><disk type='file' device='disk'><driver name='qemu' "
                        f"type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/>"
                        f"</disk></devices></domain>")
            dom = self.conn.defineXML(xml)
            dom.create()
            doms.append(dom)
        elapsed = time.monotonic() - t0
        for dom in doms:
            dom.destroy()
            dom.undefine()
        os.unlink(base)
        return elapsed

    # --- footprint ---------------------------------------------------------------

    def footprint(self):
        pid = self.agent.proc.pid
        host = self.agent.host
        for count in (0, 10):
            ctxt = self.api.new_context()
            uuids = [str(uuidlib.uuid4()) for _ in range(count)]
            for u in uuids:
                self.api.spawn(ctxt, host, {"uuid": u, "name": "idle", "image": {
                    "id": "bootsector"}, "flavor": {"name": "b", "vcpus": 1, "memory_mb": 64,
                                                    "root_gb": 1}})
            for u in uuids:
                self._wait_vm_state(ctxt, host, u, ("active",))
            time.sleep(5)
            cpu0, t0 = _cpu_seconds(pid), time.monotonic()
            time.sleep(60)
            cpu = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
            self.record("footprint", f"idle RSS, {count} instances", "MB", [_rss_mb(pid)], [])
            self.record("footprint", f"idle CPU, {count} instances", "%", [cpu], [])
            for u in uuids:
                self.api.delete(ctxt, host, u)
            for u in uuids:
                self._wait_vm_state(ctxt, host, u, ("deleted",))
        for count in (10, 50):
            self.record("footprint", f"power-state sync, {count} domains", "ms",
                        *self._sync_cost(count))

    def _sync_cost(self, count):
        """Time ComputeManager.sync_power_states in-process against the real
        libvirtd and a store holding ``count`` instances with defined domains."""
        from compute_agent import manager, objects, store
        from compute_agent.conf import CONF
        from compute_agent.virt.libvirt.driver import LibvirtDriver
        work = tempfile.mkdtemp(prefix="ca-bench-sync-", dir="/var/tmp")
        db = store.Store(work)
        drv = LibvirtDriver(CONF, image_cache=None)
        mgr = manager.ComputeManager(CONF, db, drv, images=None)
        drv.init_host(lambda *a: None)
        doms = []
        try:
            for i in range(count):
                uuid = str(uuidlib.uuid4())
                db.create_instance(objects.Instance(spec=objects.InstanceSpec.from_dict({
                    "uuid": uuid, "name": f"sync{i}", "image": {"id": "x"},
                    "flavor": {"name": "b", "vcpus": 1, "memory_mb": 64, "root_gb": 1}}),
                    host="bench", vm_state="stopped", power_state="shutdown"))
                doms.append(self.conn.defineXML(
                    f"<domain type='kvm'><name>sync-{uuid}</name><uuid>{uuid}</uuid>"
                    f"<memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os>"
                    f"</domain>"))
            agent_ms, floor_ms = [], []
            for _ in range(max(5, self.runs)):
                t0 = time.monotonic()
                mgr.sync_power_states()
                agent_ms.append((time.monotonic() - t0) * 1000)
                t0 = time.monotonic()
                self.conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
                floor_ms.append((time.monotonic() - t0) * 1000)
            return agent_ms, floor_ms
        finally:
            for dom in doms:
                dom.undefine()
            drv.cleanup_host()
            db.close()
            subprocess.run(["rm", "-rf", work], check=True)

    # --- transfer ----------------------------------------------------------------

    def transfer(self):
        """A stopped instance's disk to another host's directory: the agent's
        way (cold_migration.upload_file: the qcow2 top layer as a sparse
        libvirt volume stream, then rebase -u and check), next to Nova's
        (flatten with qemu-img convert, then a sparse copy: cp --sparse=always
        stands in for scp, and is faster than it)."""
        from compute_agent import qemu_img
        from compute_agent.virt.libvirt import cold_migration
        work = tempfile.mkdtemp(prefix="ca-bench-transfer-", dir="/var/lib")
        os.chmod(work, 0o755)
        src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
        try:
            for d in (src, dst):
                os.makedirs(d)
            base = os.path.join(src, "base.raw")
            with open(base, "wb") as f:  # 384 MiB of data in a 2 GiB base
                f.write(os.urandom(384 * 1024 * 1024))
                f.truncate(2 * 1024 ** 3)
            subprocess.run(["cp", "--sparse=always", base, os.path.join(dst, "base.raw")],
                           check=True)
            disk = os.path.join(src, "disk")
            qemu_img.create_overlay(disk, base, 4 * 1024 ** 3)
            # 512 MiB of data in the top layer, a quarter of it over the base's
            # (neither way compresses, so a pattern moves like random data)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 256M 512M", disk],
                           check=True, capture_output=True)
            agent, floor = [], []
            for _ in range(min(self.runs, 5)):
                subprocess.run(["sync"], check=True)
                t0 = time.monotonic()
                cold_migration.upload_file("qemu:///system", disk, dst)
                qemu_img.rebase_unsafe(os.path.join(dst, "disk"), os.path.join(dst, "base.raw"))
                qemu_img.check(os.path.join(dst, "disk"))
                agent.append(time.monotonic() - t0)
                os.unlink(os.path.join(dst, "disk"))
                subprocess.run(["sync"], check=True)
                t0 = time.monotonic()
                flat = os.path.join(src, "disk.flat")
                subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", disk, flat],
                               check=True)
                subprocess.run(["cp", "--sparse=always", flat, os.path.join(dst, "disk")],
                               check=True)
                floor.append(time.monotonic() - t0)
                os.unlink(flat)
                os.unlink(os.path.join(dst, "disk"))
            self.record("transfer", "disk to another host (top layer)", "s", agent, floor)
        finally:
            subprocess.run(["rm", "-rf", work], check=True)

    def close(self):
        self.agent.cleanup()
        if getattr(self, "glance", None) is not None:
            self.gagent.cleanup()
            self.glance.cleanup()
        self.conn.close()
        subprocess.run(["rm", "-rf", self.image_dir], check=True)
        self.transport.cleanup()


SCENARIOS = ["spawn", "burst", "fetch", "footprint", "rpc", "transfer"]


def _random_qcow2(stem: str, mib: int, head: bytes = b"") -> str:
    """A qcow2 holding ``mib`` MiB of random data (after ``head``): nothing to
    compress or skip, so transfers and conversions do their full work."""
    raw, qcow2 = stem + ".raw", stem + ".qcow2"
    with open(raw, "wb") as f:
        f.write(head)
        f.write(os.urandom(mib * 1024 * 1024 - len(head)))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    os.unlink(raw)
    return qcow2


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_report(rows, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    machine = {"host": platform.node(), "cpus": os.cpu_count(),
               "kernel": platform.release(), "python": platform.python_version(),
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=2)
    lines = [f"Machine: {machine['cpus']} CPUs, kernel {machine['kernel']}, "
             f"Python {machine['python']}, {machine['date']}", "",
             "| scenario | figure | agent (median) | floor (median) | agent/floor | runs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['figure']} | {r['agent_median']} {r['unit']} | "
                     f"{r['floor_median']} {r['unit']} | {r['ratio']} | {r['runs']} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # No argparse choices: with nargs="*", Python 3.11 checks the empty default
    # against them and refuses it.
    p.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", default=os.path.join(REPO, "bench-results"))
    args = p.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from "
                f"{', '.join(SCENARIOS)}")
    bench = Bench(args.runs)
    try:
        for name in args.scenarios or SCENARIOS:
            getattr(bench, name)()
    finally:
        bench.close()
    write_report(bench.rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
