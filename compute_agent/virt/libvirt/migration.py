"""Live migration on the libvirt side: checks, preparing the destination, the
migration itself watched by a monitor, and the clean-up on each side.

The flow between the two agents is in compute_agent/live_migration.py; the
methods here are mixed into ``LibvirtDriver`` (one class, one module per
long-running flow, as DESIGN.md puts it).

How a migration is started (``_start``):

- the destination's libvirt URI names a host (qemu+tcp://dest/system): the
  source's libvirtd migrates peer-to-peer (``migrateToURI3`` with
  ``VIR_MIGRATE_PEER2PEER``) and keeps going if this agent dies;
- it is a local URI (qemu:///system, two hypervisors on one machine): the
  source's libvirtd could not reach it, so this agent drives a managed
  migration over its own connection to it (``migrate3``).

Flags: LIVE, PERSIST_DEST, UNDEFINE_SOURCE; for shared storage UNSAFE (the
storage test proved the storage is shared; libvirt only trusts network file
systems by type), for a block migration NON_SHARED_INC with MIGRATE_DISKS
(the destination pre-created the disks over their backing file); POSTCOPY or
AUTO_CONVERGE when permitted. Parameters: the destination XML (paths of the
destination's instances_path, metadata naming it), its inbound address
(URI and LISTEN_ADDRESS) and the bandwidth cap.

The monitor polls ``jobStats()`` every 0.5 s: progress goes to the caller,
the allowed downtime is raised in steps (``migrateSetMaxDowntime``) and a
completion timeout scaled by the data to move either aborts the job or forces
it to complete (post-copy when permitted, else the guest is paused).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import urllib.parse
import uuid as uuidlib
from collections.abc import Callable, Iterator

import libvirt
from lxml import etree
from oslo_log import log as logging

from compute_agent import exception, objects, qemu_img
from compute_agent.diskspace import free_bytes
from compute_agent.journal import Journal
from compute_agent.virt import migrate_data as md
from compute_agent.virt.libvirt import config, disk

LOG = logging.getLogger(__name__)
GiB = 1024 ** 3
MiB = 1024 ** 2
POLL_INTERVAL = 0.5
# Left in an instance directory a block migration's destination created, until
# the migration is finished: a rollback removes only a directory holding it.
INCOMING_MARKER = ".incoming-live-migration"
_VIF_TYPES = ("bridge", "ethernet")


def downtime_steps(max_ms: int, steps: int, delay_per_gib: int,
                   data_gb: float) -> Iterator[tuple[float, int]]:
    """(seconds after the start, allowed downtime ms): from max/steps up to
    max in ``steps`` steps, the delay between them scaled by the data size
    (Nova's schedule)."""
    delay = delay_per_gib * data_gb
    base = max_ms / steps
    offset = (max_ms - base) / steps
    for i in range(steps + 1):
        yield delay * i, int(base + offset * i)


def migration_xml(live_xml: str, src_path: str, dest_path: str, dest_host: str) -> str:
    """The running guest's migratable XML for the destination: files under the
    source's instances_path moved under the destination's, our metadata
    naming the destination host."""
    root = etree.fromstring(live_xml.encode(),
                            etree.XMLParser(resolve_entities=False, no_network=True))

    def moved(path: str | None) -> str | None:
        if path and (path == src_path or path.startswith(src_path.rstrip("/") + "/")):
            return dest_path.rstrip("/") + path[len(src_path.rstrip("/")):]
        return None

    for src in root.iterfind("./devices/disk//source"):
        new = moved(src.get("file"))
        if new:
            src.set("file", new)
    for src in [*root.iterfind("./devices/serial/source"),
                *root.iterfind("./devices/console/source")]:
        new = moved(src.get("path"))
        if new:
            src.set("path", new)
    host = root.find(f"./metadata/{{{config.METADATA_NS}}}instance/{{{config.METADATA_NS}}}host")
    if host is not None:
        host.text = dest_host
    return etree.tostring(root, encoding="unicode")


def local_disks(instance: objects.Instance, xml: str) -> list[config.GuestDisk]:
    """The guest's file disks that are not volumes: what a block migration
    copies (a volume is reached from both hosts and never copied)."""
    volume_devs = {b.device for b in instance.spec.block_devices}
    return [d for d in config.parse_disks(xml) if d.target_dev not in volume_devs]


def _cpu_xml(live_xml: str) -> str | None:
    root = etree.fromstring(live_xml.encode())
    cpu = root.find("./cpu")
    return etree.tostring(cpu, encoding="unicode") if cpu is not None else None


def _progress(stats: dict, elapsed: float, max_downtime: int | None) -> md.MigrationProgress:
    def get(key: str) -> int:
        return int(stats.get(key, 0) or 0)
    return md.MigrationProgress(
        elapsed_ms=get("time_elapsed") or int(elapsed * 1000),
        data_total=get("data_total"), data_remaining=get("data_remaining"),
        memory_total=get("memory_total"), memory_remaining=get("memory_remaining"),
        disk_total=get("disk_total"), disk_remaining=get("disk_remaining"),
        memory_bps=get("memory_bps"), disk_bps=get("disk_bps"), max_downtime_ms=max_downtime)


class LiveMigrationMixin:
    """The live migration methods of LibvirtDriver (see virt/driver.py)."""

    # --- helpers ---------------------------------------------------------------

    def _cpu_mode(self) -> str:
        virt_type = self.conf.libvirt.virt_type
        return self.conf.libvirt.cpu_mode or ("host-model" if virt_type == "kvm" else "none")

    def _dom(self, uuid: str) -> libvirt.virDomain:
        """The raw domain, for the calls the Guest wrapper does not have."""
        return self.host.call(f"lookupByUUIDString({uuid})",
                              lambda c: c.lookupByUUIDString(uuid))

    def _precheck_failed(self, instance: objects.Instance, reason: str):
        raise exception.MigrationPreCheckError(uuid=instance.uuid, dest=self.conf.host,
                                               reason=reason)

    def live_migration_host_info(self) -> md.HostInfo:
        libvirt_version, qemu_version = self.host.versions()
        host_uuid = self.__dict__.get("_hypervisor_id")
        if host_uuid is None:  # getCapabilities can take seconds on a fresh libvirtd
            caps = self.host.call("getCapabilities", lambda c: c.getCapabilities())
            host_uuid = self.__dict__["_hypervisor_id"] = etree.fromstring(
                caps.encode()).findtext("./host/uuid")
        return md.HostInfo(host=self.conf.host, hypervisor_id=host_uuid,
                           virt_type=self.conf.libvirt.virt_type,
                           libvirt_version=libvirt_version, qemu_version=qemu_version,
                           cpu_mode=self._cpu_mode())

    # --- checks ------------------------------------------------------------------

    def check_can_live_migrate_source(self, instance: objects.Instance,
                                      block_migration: bool) -> md.SourceCheckData:
        uuid = instance.uuid
        guest = self.host.lookup(uuid)
        if guest is None or not guest.is_running():
            raise exception.MigrationPreCheckError(
                uuid=uuid, dest="another host", reason="its guest is not running on this host")
        dom = self._dom(uuid)
        job = self.host.call("jobInfo", lambda c: dom.jobInfo())[0]
        if job != libvirt.VIR_DOMAIN_JOB_NONE:
            raise exception.MigrationPreCheckError(
                uuid=uuid, dest="another host", reason="another job is running on its guest")
        live_xml = guest.xml()
        inst_dir = self.instance_dir(uuid)
        disks = []
        for d in local_disks(instance, live_xml):
            name = os.path.basename(d.path)
            if os.path.dirname(d.path) != inst_dir or name not in md.DISK_NAMES:
                raise exception.MigrationPreCheckError(
                    uuid=uuid, dest="another host",
                    reason=f"disk {d.target_dev} ({d.path}) is not in the instance directory")
            capacity, allocation, _ = self.host.call(
                f"blockInfo({d.target_dev})", lambda c, p=d.path: dom.blockInfo(p))
            disks.append(md.MigrationDisk(
                name=name, target_dev=d.target_dev, virtual_size=int(capacity),
                actual_size=int(allocation),
                backed_by_image=name == "disk" and instance.spec.image_id is not None
                and qemu_img.info(d.path, "qcow2", force_share=True).backing_file is not None))
        probe = f".live-migration-probe-{uuidlib.uuid4().hex}"
        with open(os.path.join(self.conf.instances_path, probe), "x"):
            pass
        return md.SourceCheckData(
            host_info=self.live_migration_host_info(), block_migration=block_migration,
            shared_storage_probe=probe, disks=tuple(disks),
            guest_cpu_xml=_cpu_xml(live_xml) if self._cpu_mode() != "none" else None)

    def cleanup_live_migration_source_check(self, data: md.SourceCheckData) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.conf.instances_path, data.shared_storage_probe))

    def check_can_live_migrate_destination(self, instance: objects.Instance,
                                           source: md.SourceCheckData) -> md.DestCheckData:
        shared = os.path.exists(os.path.join(self.conf.instances_path,
                                             source.shared_storage_probe))
        LOG.debug("Storage test: probe %s %s in %s", source.shared_storage_probe,
                  "found" if shared else "not found", self.conf.instances_path,
                  instance_uuid=instance.uuid)
        inst_dir = self.instance_dir(instance.uuid)
        if shared and not os.path.isdir(inst_dir):
            self._precheck_failed(instance, f"the storage is shared but {inst_dir} is not "
                                            f"there (instances_path differs between the hosts)")
        if not shared and os.path.exists(inst_dir):
            self._precheck_failed(instance, f"{inst_dir} already exists on this host")
        if not shared and source.block_migration:
            free = free_bytes(self.conf.instances_path)
            needed = source.disk_bytes + self.conf.image.min_free_disk_mb * MiB
            if free < needed:
                self._precheck_failed(
                    instance, f"not enough free space on {self.conf.instances_path} for its "
                              f"disks: need {needed // MiB} MiB, {free // MiB} MiB free")
        if source.guest_cpu_xml and self._cpu_mode() != "none":
            try:
                result = self.host.call("compareCPU",
                                        lambda c: c.compareCPU(source.guest_cpu_xml, 0))
            except exception.HypervisorError as exc:
                self._precheck_failed(instance, f"its CPU cannot be compared with this "
                                                f"host's: {exc}")
            if result == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
                self._precheck_failed(instance, "its CPU is not compatible with this host's")
        lv = self.conf.libvirt
        return md.DestCheckData(
            host_info=self.live_migration_host_info(), shared_storage=shared,
            libvirt_uri=lv.live_migration_uri or lv.connection_uri,
            inbound_addr=lv.live_migration_inbound_addr)

    # --- the destination before and after --------------------------------------

    def pre_live_migration(self, instance: objects.Instance, journal: Journal,
                           source: md.SourceCheckData, shared_storage: bool) -> md.DestPrepared:
        inst_dir = self.instance_dir(instance.uuid)
        with journal.step("instance_dir"):
            if shared_storage:
                if not os.path.isdir(inst_dir):
                    raise exception.LiveMigrationFailed(
                        uuid=instance.uuid, dest=self.conf.host,
                        reason=f"{inst_dir} is not on the shared storage")
            else:
                self.make_instance_dir(instance.uuid)
                with open(os.path.join(inst_dir, INCOMING_MARKER), "w"):
                    pass
        try:
            base = None
            with journal.step("ensure_image"):
                if any(d.backed_by_image for d in source.disks):
                    base = self.image_cache.ensure(instance.spec.image_id)
            if not shared_storage:
                with journal.step("create_disks"):
                    for d in source.disks:
                        path = os.path.join(inst_dir, d.name)
                        if d.backed_by_image and base:
                            qemu_img.create_overlay(path, base, d.virtual_size)
                        else:
                            qemu_img.create_blank(path, d.virtual_size)
            self._plug_vifs(instance, journal)
            # The same secrets (their UUIDs derive from instance and volume)
            # and logins as on the source, before the guest arrives.
            self.connect_volumes(instance, journal)
        except BaseException:
            LOG.warning("pre_live_migration failed at step %s; removing what it made",
                        journal.current_step, instance_uuid=instance.uuid)
            self._undo_destination(instance, shared_storage)
            raise
        return md.DestPrepared(instance_dir=inst_dir)

    def _undo_destination(self, instance: objects.Instance, shared_storage: bool) -> None:
        """Remove what pre_live_migration made (never the source's files)."""
        if instance.spec.block_devices:
            # Only this host's secrets and logins; the volumes stay as they are.
            self.volumes.disconnect_all(instance, quiet=True)
        if instance.spec.networks:
            try:
                self.network.unplug(instance.spec)
            except Exception:
                LOG.exception("Could not unplug the ports prepared for the migration",
                              instance_uuid=instance.uuid)
        inst_dir = self.instance_dir(instance.uuid)
        if not shared_storage and os.path.exists(os.path.join(inst_dir, INCOMING_MARKER)):
            shutil.rmtree(inst_dir, ignore_errors=True)

    def post_live_migration_at_destination(self, instance: objects.Instance,
                                           journal: Journal) -> md.MigrationFigures:
        with journal.step("check_guest"):
            guest = self.host.lookup(instance.uuid)
            if guest is None or not guest.is_running():
                raise exception.LiveMigrationFailed(
                    uuid=instance.uuid, dest=self.conf.host,
                    reason="its guest is not running on the destination")
        figures = md.MigrationFigures()
        with contextlib.suppress(exception.HypervisorError):
            # libvirt hands the completed job's statistics to the destination.
            dom = self._dom(instance.uuid)
            stats = self.host.call("jobStats(completed)", lambda c: dom.jobStats(
                libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED))
            figures = md.MigrationFigures(
                time_elapsed_ms=stats.get("time_elapsed"), downtime_ms=stats.get("downtime"),
                data_processed=stats.get("data_processed"),
                memory_iterations=stats.get("memory_iteration"))
            journal.event("job_figures", figures.summary() or "none")
        with journal.step("define_domain"):
            # The guest runs with the XML it came with; its persistent
            # definition is rebuilt from the record and this host's config.
            disks = disk.ensure_disks(self.instance_dir(instance.uuid), instance.spec.flavor)
            self._define(instance, disks)
        with journal.step("resume_guest"):
            dom = self._dom(instance.uuid)
            if self.host.call("state", lambda c: dom.state())[0] == libvirt.VIR_DOMAIN_PAUSED:
                self.host.call("resume", lambda c: dom.resume())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.instance_dir(instance.uuid), INCOMING_MARKER))
        return figures

    def rollback_live_migration_at_destination(self, instance: objects.Instance,
                                               journal: Journal, shared_storage: bool) -> None:
        with journal.step("destroy_domain"):
            self._remove_domain(instance.uuid)
        with journal.step("cleanup"):
            self._undo_destination(instance, shared_storage)

    # --- the source ------------------------------------------------------------

    def post_live_migration_at_source(self, instance: objects.Instance, journal: Journal,
                                      shared_storage: bool) -> None:
        with journal.step("remove_domain"):
            guest = self.host.lookup(instance.uuid)
            if guest is not None:
                if guest.is_running():
                    raise exception.LiveMigrationFailed(
                        uuid=instance.uuid, dest="?",
                        reason="its guest still runs on the source; nothing removed")
                guest.undefine()
        self.disconnect_volumes(instance, journal)
        if instance.spec.networks:
            with journal.step("unplug_vifs"):
                self.network.unplug(instance.spec)
        if not shared_storage:
            with journal.step("remove_files"):
                shutil.rmtree(self.instance_dir(instance.uuid), ignore_errors=True)

    def rollback_live_migration_at_source(self, instance: objects.Instance,
                                          journal: Journal) -> None:
        with journal.step("check_guest"):
            guest = self.host.lookup(instance.uuid)
            if guest is None or not guest.is_running():
                raise exception.LiveMigrationFailed(
                    uuid=instance.uuid, dest="?",
                    reason="its guest is no longer running on the source")
            dom = self._dom(instance.uuid)
            if self.host.call("state", lambda c: dom.state())[0] == libvirt.VIR_DOMAIN_PAUSED:
                LOG.info("Resuming the guest paused for the migration",
                         instance_uuid=instance.uuid)
                self.host.call("resume", lambda c: dom.resume())

    def live_migration_source_state(self, instance: objects.Instance) -> str:
        guest = self.host.lookup(instance.uuid)
        if guest is None:
            return "gone"
        try:
            dom = self._dom(instance.uuid)
            job = self.host.call("jobInfo", lambda c: dom.jobInfo())[0]
            if job != libvirt.VIR_DOMAIN_JOB_NONE:
                return "migrating"
            return "running" if guest.is_running() else "gone"
        except exception.HypervisorError:
            if self.host.lookup(instance.uuid) is None:
                return "gone"  # it left while we looked
            raise

    def live_migration_abort_job(self, instance: objects.Instance) -> None:
        """Abort the running migration job (reconciliation after a restart)."""
        dom = self._dom(instance.uuid)
        with contextlib.suppress(exception.HypervisorError):
            self.host.call("abortJob", lambda c: dom.abortJob())

    # --- the migration -----------------------------------------------------------

    def live_migration(self, instance: objects.Instance, journal: Journal,
                       dest: md.DestCheckData, prepared: md.DestPrepared, block_migration: bool,
                       on_progress: Callable[[md.MigrationProgress], None],
                       abort_requested: threading.Event) -> None:
        uuid = instance.uuid
        lv = self.conf.libvirt
        dom = self._dom(uuid)
        live_xml = self.host.call("XMLDesc(migratable)", lambda c: dom.XMLDesc(
            libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE))
        params = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: migration_xml(
            live_xml, self.conf.instances_path, os.path.dirname(prepared.instance_dir),
            dest.host_info.host)}
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        data_bytes = instance.spec.flavor.memory_mb * MiB
        if block_migration:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
            disks = local_disks(instance, live_xml)
            params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = [d.target_dev for d in disks]
            for d in disks:
                data_bytes += self.host.call(f"blockInfo({d.target_dev})",
                                             lambda c, p=d.path: dom.blockInfo(p))[1]
        else:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        postcopy = lv.live_migration_permit_post_copy
        if postcopy:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        elif lv.live_migration_permit_auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if dest.inbound_addr:
            addr = f"[{dest.inbound_addr}]" if ":" in dest.inbound_addr else dest.inbound_addr
            params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{addr}"
            params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = dest.inbound_addr
        if lv.live_migration_bandwidth:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = lv.live_migration_bandwidth
        peer2peer = bool(urllib.parse.urlsplit(dest.libvirt_uri).hostname)
        if peer2peer:
            flags |= libvirt.VIR_MIGRATE_PEER2PEER
        LOG.debug("Migrating to %s (%s) flags=%#x params=%s", dest.libvirt_uri,
                  "peer-to-peer" if peer2peer else "driven by this agent", flags,
                  {k: v for k, v in params.items() if k != libvirt.VIR_MIGRATE_PARAM_DEST_XML},
                  instance_uuid=uuid)

        done = threading.Event()
        outcome: dict[str, BaseException] = {}

        def run() -> None:
            try:
                if peer2peer:
                    dom.migrateToURI3(dest.libvirt_uri, params, flags)
                else:
                    dconn = libvirt.open(dest.libvirt_uri)
                    try:
                        dom.migrate3(dconn, params, flags)
                    finally:
                        dconn.close()
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc
            finally:
                done.set()

        worker = threading.Thread(target=run, name=f"migrate-{uuid[:8]}", daemon=True)
        worker.start()
        reason = self._monitor(instance, dom, done, journal, data_bytes, postcopy,
                               on_progress, abort_requested)
        worker.join()
        error = outcome.get("error")
        if error is None:
            return
        message = (error.get_error_message() if isinstance(error, libvirt.libvirtError)
                   else str(error))
        if reason is not None:
            raise exception.LiveMigrationAborted(uuid=uuid, dest=dest.host_info.host,
                                                 reason=reason) from error
        raise exception.LiveMigrationFailed(uuid=uuid, dest=dest.host_info.host,
                                            reason=message) from error

    def _monitor(self, instance, dom, done: threading.Event, journal: Journal, data_bytes: int,
                 postcopy: bool, on_progress, abort_requested: threading.Event) -> str | None:
        """Watch the job until the migration call returns. Returns why it was
        aborted, or None."""
        lv = self.conf.libvirt
        data_gb = data_bytes / GiB
        steps = list(downtime_steps(lv.live_migration_downtime, lv.live_migration_downtime_steps,
                                    lv.live_migration_downtime_delay, data_gb))
        timeout = lv.live_migration_completion_timeout * data_gb
        LOG.debug("Monitoring: %.3f GiB to move, completion timeout %.1fs (%s), downtime "
                  "steps %s", data_gb, timeout, lv.live_migration_timeout_action, steps,
                  instance_uuid=instance.uuid)
        started = time.monotonic()
        max_downtime = None
        acted = reason = None
        aborted_at = 0.0
        while not done.wait(POLL_INTERVAL):
            try:
                stats = dom.jobStats()  # may wait while libvirt sets the migration up
            except libvirt.libvirtError as exc:
                LOG.debug("jobStats: %s", exc.get_error_message(), instance_uuid=instance.uuid)
                continue
            elapsed = time.monotonic() - started
            if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
                continue  # not started yet, or just ended
            if acted == "abort":
                # Its figures mean nothing now; ask again if it does not stop.
                if elapsed - aborted_at > 5:
                    aborted_at = elapsed
                    self._abort_job(instance, dom, journal, reason)
                continue
            while steps and elapsed >= steps[0][0]:
                try:
                    dom.migrateSetMaxDowntime(steps[0][1], 0)
                except libvirt.libvirtError as exc:
                    LOG.debug("migrateSetMaxDowntime: %s", exc.get_error_message(),
                              instance_uuid=instance.uuid)
                    break  # again at the next tick
                max_downtime = steps.pop(0)[1]
                journal.event("max_downtime", f"{max_downtime} ms after {elapsed:.1f}s")
            if abort_requested.is_set():
                acted, reason, aborted_at = "abort", md.OPERATOR_ABORT, elapsed
                self._abort_job(instance, dom, journal, reason)
            elif timeout and elapsed > timeout and acted is None:
                what = (f"completion timeout ({timeout:.1f}s for {data_gb:.2f} GiB at "
                        f"{lv.live_migration_completion_timeout}s/GiB)")
                if lv.live_migration_timeout_action == "abort":
                    acted, reason, aborted_at = "abort", what, elapsed
                    self._abort_job(instance, dom, journal, reason)
                else:
                    acted = "force_complete"
                    self._force_complete(instance, dom, journal, postcopy, what)
            progress = _progress(stats, elapsed, max_downtime)
            LOG.debug("Migration progress: %s", progress.to_dict(), instance_uuid=instance.uuid)
            try:
                on_progress(progress)
            except Exception:
                LOG.exception("Recording migration progress failed",
                              instance_uuid=instance.uuid)
        return reason

    @staticmethod
    def _abort_job(instance, dom, journal: Journal, reason: str) -> None:
        LOG.warning("Aborting the live migration: %s", reason, instance_uuid=instance.uuid)
        journal.event("abort", reason)
        try:
            dom.abortJob()
        except libvirt.libvirtError as exc:
            LOG.warning("abortJob: %s", exc.get_error_message(), instance_uuid=instance.uuid)

    @staticmethod
    def _force_complete(instance, dom, journal: Journal, postcopy: bool, why: str) -> None:
        try:
            if postcopy:
                dom.migrateStartPostCopy(0)
                how = "switched to post-copy"
            else:
                dom.suspend()
                how = "guest paused so the migration completes"
        except libvirt.libvirtError as exc:
            LOG.warning("Forcing the migration to complete failed: %s",
                        exc.get_error_message(), instance_uuid=instance.uuid)
            return
        LOG.warning("%s: %s", why, how, instance_uuid=instance.uuid)
        journal.event("force_complete", f"{why}: {how}")
