"""LibvirtDriver: one short method per operation, orchestrating the parts
(image cache, disks, domain config, host connection)."""

from __future__ import annotations

import contextlib
import os
import shutil

import libvirt
from oslo_log import log as logging

from compute_agent import exception, objects, qemu_img, states
from compute_agent.diskspace import check_free_space, free_bytes, total_bytes
from compute_agent.image.cache import ImageCache
from compute_agent.journal import Journal
from compute_agent.network.vif import NetworkDriver
from compute_agent.virt import driver
from compute_agent.virt.libvirt import config, disk, snapshot
from compute_agent.virt.libvirt.cold_migration import ColdMigrationMixin
from compute_agent.virt.libvirt.guest import POWER_STATES, Guest
from compute_agent.virt.libvirt.host import Host
from compute_agent.virt.libvirt.migration import LiveMigrationMixin
from compute_agent.virt.libvirt.volume.attachments import Volumes

LOG = logging.getLogger(__name__)
MiB = 1024 * 1024

# Lifecycle events that change what power_state we report.
_EVENT_POWER = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: states.RUNNING,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: states.RUNNING,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: states.PAUSED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: states.SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: states.CRASHED,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: states.SUSPENDED_POWER,
}


class LibvirtDriver(LiveMigrationMixin, ColdMigrationMixin, driver.ComputeDriver):
    # Live migration: virt/libvirt/migration.py; resize: virt/libvirt/cold_migration.py.
    def __init__(self, conf, image_cache: ImageCache):
        self.conf = conf
        self.image_cache = image_cache
        self.host: Host | None = None
        self.network = NetworkDriver(conf)
        self.volumes = Volumes(conf, lambda: self.host)

    def init_host(self, on_power_state: driver.PowerStateHandler) -> None:
        def on_event(uuid: str, event: int, detail: int) -> None:
            power = _EVENT_POWER.get(event)
            if power == states.SHUTDOWN and detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED:
                power = states.SUSPENDED_POWER
            if power is not None:
                on_power_state(uuid, power)

        self.host = Host(self.conf.libvirt.connection_uri, on_event)
        self.host.connect()
        snapshot.remove_stale_files(self.conf)

    def cleanup_host(self) -> None:
        if self.host:
            self.host.close()

    def is_connected(self) -> bool:
        return self.host is not None and self.host.is_alive()

    def check_connection(self) -> bool:
        try:
            self.host.connect()
        except exception.HypervisorUnavailable:
            return False
        return self.host.is_alive()

    # --- paths ---------------------------------------------------------------

    def instance_dir(self, uuid: str) -> str:
        # uuid is validated canonical, so this cannot escape instances_path.
        return os.path.join(self.conf.instances_path, uuid)

    def make_instance_dir(self, uuid: str) -> str:
        """Create the instance directory; an existing one is never reused or
        removed: it may hold another instance's data."""
        inst_dir = self.instance_dir(uuid)
        try:
            os.mkdir(inst_dir, 0o755)
        except FileExistsError:
            raise exception.InstanceExists(
                f"Instance directory {inst_dir} already exists on {self.conf.host}; refusing "
                f"to use or remove it") from None
        return inst_dir

    @staticmethod
    def domain_name(uuid: str) -> str:
        return "instance-" + uuid

    # --- spawn ---------------------------------------------------------------

    def spawn(self, instance: objects.Instance, journal: Journal) -> None:
        spec = instance.spec
        base = None  # boot from volume: no image, no _base, no root disk
        if spec.image_id is not None:
            with journal.step("fetch_image"):
                max_size = spec.flavor.root_gb * disk.GiB if spec.flavor.root_gb else None
                base = self.image_cache.ensure(spec.image_id, max_size)
        inst_dir = self.make_instance_dir(instance.uuid)
        try:
            disks = []
            if base is not None:
                with journal.step("create_disks"):
                    disks = disk.create_disks(inst_dir, base, spec.flavor, spec.image_id)
            self._plug_define_start(instance, journal, disks)
        except BaseException:
            LOG.warning("Spawn failed at step %s; removing what it created",
                        journal.current_step)
            self._remove_domain(instance.uuid)
            self.volumes.disconnect_all(instance, quiet=True)
            if spec.networks:
                try:
                    self.network.unplug(spec)
                except Exception:
                    LOG.exception("Could not unplug the ports of the failed spawn")
            shutil.rmtree(inst_dir, ignore_errors=True)
            raise

    def _plug_vifs(self, instance: objects.Instance, journal: Journal) -> None:
        """Bridges, segments, DHCP and firewall chains, before the domain is
        defined: the guest never runs unprotected. Idempotent."""
        if not instance.spec.networks:
            return
        with journal.step("plug_vifs"):
            self.network.plug(instance.spec)
        with journal.step("apply_firewall"):
            self.network.apply_firewall(instance.spec)

    def update_security_groups(self, instance: objects.Instance, journal: Journal) -> None:
        with journal.step("apply_firewall"):
            self.network.update_security_groups(instance.spec)

    def _define(self, instance: objects.Instance, disks: list[tuple[str, str]]) -> Guest:
        """Build the domain XML from the record, keep a copy for humans, define."""
        xml = config.to_xml(self._guest_config(instance, disks))
        self._write_xml_copy(self.instance_dir(instance.uuid), xml)
        return self.host.define(xml)

    def _guest_config(self, instance: objects.Instance,
                      disks: list[tuple[str, str]]) -> config.GuestConfig:
        spec = instance.spec
        virt_type = self.conf.libvirt.virt_type
        cpu_mode = self.conf.libvirt.cpu_mode or ("host-model" if virt_type == "kvm" else "none")
        cache = self.conf.libvirt.disk_cachemode
        return config.GuestConfig(
            uuid=instance.uuid, name=self.domain_name(instance.uuid), virt_type=virt_type,
            memory_mb=spec.flavor.memory_mb, vcpus=spec.flavor.vcpus, cpu_mode=cpu_mode,
            metadata=config.GuestMetadata(name=spec.name, flavor_name=spec.flavor.name,
                                          image_id=spec.image_id, host=self.conf.host),
            disks=[config.GuestDisk(path=p, target_dev=dev, cache=cache) for p, dev in disks],
            interfaces=[config.GuestInterface(mac=v.mac, bridge=v.bridge, tap=v.tap)
                        for v in self.network.vif_configs(spec)],
            volumes=self.volumes.disks(instance), scsi_controller=True,
            serial_log=config.GuestSerialLog(
                os.path.join(self.instance_dir(instance.uuid), "console.log")))

    @staticmethod
    def _write_xml_copy(inst_dir: str, xml: str) -> None:
        # For humans only; the agent never reads it back.
        tmp = os.path.join(inst_dir, ".libvirt.xml.tmp")
        with open(tmp, "w") as f:
            f.write(xml)
        os.rename(tmp, os.path.join(inst_dir, "libvirt.xml"))

    # --- lifecycle -------------------------------------------------------------

    def reboot(self, instance: objects.Instance, journal: Journal, hard: bool,
               timeout: int) -> str:
        """Reboot; returns how it went: 'soft', 'hard' or 'hard-after-soft-timeout'."""
        guest = self.host.lookup(instance.uuid)
        if hard or guest is None or not guest.is_running():
            self.hard_reboot(instance, journal)
            return "hard"
        with journal.step("acpi_shutdown"):
            guest.shutdown()
            clean = guest.wait_for_shutoff(timeout)
        if clean:
            with journal.step("start_domain"):
                guest.start()
            return "soft"
        LOG.warning("Guest did not power off within %ss of the ACPI request; "
                    "falling back to a hard reboot", timeout)
        self.hard_reboot(instance, journal)
        return "hard-after-soft-timeout"

    def hard_reboot(self, instance: objects.Instance, journal: Journal) -> None:
        """The repair tool: assume nothing about the host, recreate whatever is
        missing (domain, backing file, XML), then start. Idempotent."""
        guest = self.host.lookup(instance.uuid)
        if guest is not None and guest.has_managed_save():
            raise exception.SavedStateExists(uuid=instance.uuid)
        with journal.step("destroy_domain"):
            if guest is not None:
                guest.destroy()
        with journal.step("ensure_image"):
            if instance.spec.image_id and self._root_disk_is_backed(instance):
                self.image_cache.ensure(instance.spec.image_id)
        with journal.step("ensure_disks"):
            disks = []
            if instance.spec.image_id is not None:  # else it boots from a volume
                disks = disk.ensure_disks(self.instance_dir(instance.uuid),
                                          instance.spec.flavor)
            else:
                os.makedirs(self.instance_dir(instance.uuid), 0o755, exist_ok=True)
        self._plug_define_start(instance, journal, disks)

    def _root_disk_is_backed(self, instance: objects.Instance) -> bool:
        """Whether the root disk needs its base image (a resize to a host
        without that image flattens it)."""
        root = os.path.join(self.instance_dir(instance.uuid), "disk")
        return not os.path.exists(root) or qemu_img.info(
            root, "qcow2", force_share=True).backing_file is not None

    def _plug_define_start(self, instance: objects.Instance, journal: Journal,
                           disks: list[tuple[str, str]]) -> None:
        """The common end of spawn and hard reboot: network, volumes, domain."""
        self._plug_vifs(instance, journal)
        self.connect_volumes(instance, journal)
        with journal.step("define_domain"):
            guest = self._define(instance, disks)
        with journal.step("start_domain"):
            guest.start()

    def power_off(self, instance: objects.Instance, journal: Journal, timeout: int) -> bool:
        """Clean shutdown within ``timeout`` seconds, then forced. True if clean."""
        guest = self.host.lookup(instance.uuid)
        if guest is None or not guest.is_running():
            return True
        clean = False
        if timeout > 0:
            with journal.step("acpi_shutdown"):
                guest.shutdown()
                clean = guest.wait_for_shutoff(timeout)
        if not clean:
            with journal.step("destroy_domain"):
                guest.destroy()
        return clean

    def power_on(self, instance: objects.Instance, journal: Journal) -> None:
        # Like Nova: powering on rebuilds from the record, as a hard reboot does.
        self.hard_reboot(instance, journal)

    def suspend(self, instance: objects.Instance, journal: Journal) -> None:
        guest = self._require_guest(instance)
        with journal.step("check_save_space"):
            needed = instance.spec.flavor.memory_mb * MiB
            check_free_space(self.conf.libvirt.save_path, needed,
                             "the guest's saved memory (managed save)",
                             self.conf.libvirt.save_space_margin_mb)
        with journal.step("managed_save"):
            guest.managed_save()

    def resume(self, instance: objects.Instance, journal: Journal,
               discard_saved_state: bool = False) -> None:
        guest = self._require_guest(instance)
        if discard_saved_state:
            with journal.step("discard_saved_state"):
                if guest.has_managed_save():
                    guest.remove_managed_save()
            self.hard_reboot(instance, journal)
            return
        with journal.step("restore_domain"):
            try:
                guest.start()  # with a managed-save image, start() restores it
            except exception.HypervisorError as exc:
                raise exception.RestoreFailed(uuid=instance.uuid, reason=str(exc)) from exc

    def has_saved_state(self, instance: objects.Instance) -> bool:
        guest = self.host.lookup(instance.uuid)
        return guest is not None and guest.has_managed_save()

    def _require_guest(self, instance: objects.Instance) -> Guest:
        guest = self.host.lookup(instance.uuid)
        if guest is None:
            raise exception.NotFound(what=f"libvirt domain of instance {instance.uuid} "
                                          f"(a hard reboot recreates it)")
        return guest

    # --- delete --------------------------------------------------------------

    def destroy(self, instance: objects.Instance, journal: Journal) -> None:
        with journal.step("destroy_domain"):
            self._remove_domain(instance.uuid)
        self.disconnect_volumes(instance, journal)
        if instance.spec.networks:
            with journal.step("unplug_vifs"):
                self.network.unplug(instance.spec)
        with journal.step("remove_files"):
            inst_dir = self.instance_dir(instance.uuid)
            if os.path.isdir(inst_dir):
                shutil.rmtree(inst_dir)

    def _remove_domain(self, uuid: str) -> None:
        guest = self.host.lookup(uuid)
        if guest is None:
            return
        guest.destroy()
        guest.undefine()

    # --- volumes (connectors and flows in volume/) ---------------------------------

    def connect_volumes(self, instance: objects.Instance, journal: Journal) -> None:
        """Make what the instance's volumes need on this host (libvirt secrets,
        host logins), before its domain is defined: spawn, hard reboot, and a
        live migration's destination (pre_live_migration). Idempotent; on a
        failure nothing of it is left."""
        if instance.spec.block_devices:
            with journal.step("connect_volumes"):
                self.volumes.connect_all(instance)

    def disconnect_volumes(self, instance: objects.Instance, journal: Journal) -> None:
        """Undo connect_volumes once no domain here uses the volumes: delete,
        and a live migration's source after the guest left. Idempotent."""
        if instance.spec.block_devices:
            with journal.step("disconnect_volumes"):
                self.volumes.disconnect_all(instance)

    def reconcile_volumes(self, instance: objects.Instance, journal: Journal) -> list[str]:
        with journal.step("reconcile_volumes"):
            return self.volumes.reconcile(instance, self.host.lookup(instance.uuid))

    def attach_volume(self, instance: objects.Instance, journal: Journal,
                      bdm: objects.BlockDevice) -> str:
        guest = self._require_guest(instance)
        with journal.step("attach_volume"):
            return self.volumes.attach(instance, guest, bdm)

    def detach_volume(self, instance: objects.Instance, journal: Journal,
                      bdm: objects.BlockDevice) -> str:
        guest = self.host.lookup(instance.uuid)
        with journal.step("detach_volume"):
            return self.volumes.detach(instance, guest, bdm)

    # --- snapshots (the flows are in snapshot.py) ---------------------------------

    def prepare_snapshot(self, instance: objects.Instance,
                         base_image: objects.ImageMeta | None) -> objects.SnapshotPlan:
        return snapshot.prepare(self, instance, self._require_guest(instance), base_image)

    def snapshot(self, instance: objects.Instance, journal: Journal,
                 plan: objects.SnapshotPlan, upload: driver.UploadFn,
                 progress: driver.ProgressFn) -> str:
        return snapshot.run(self, instance, self._require_guest(instance), journal, plan,
                            upload, progress)

    def recover_snapshot(self, instance: objects.Instance) -> str:
        return snapshot.recover(self, instance)

    # --- the image cache -------------------------------------------------------

    def cache_image(self, image_id: str) -> None:
        self.image_cache.ensure(image_id)

    def age_image_cache(self, in_use, max_age: float) -> list[str]:
        return self.image_cache.age(in_use, max_age)

    # --- state and reports ---------------------------------------------------

    def power_state(self, instance: objects.Instance) -> str:
        guest = self.host.lookup(instance.uuid)
        return guest.power_state() if guest else states.NOSTATE

    def all_power_states(self) -> dict[str, str]:
        return {uuid: POWER_STATES.get(state, states.NOSTATE)
                for uuid, state in self.host.domain_states().items()}

    def console_output(self, instance: objects.Instance, lines: int) -> str:
        path = os.path.join(self.instance_dir(instance.uuid), "console.log")
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - MiB))  # the tail is all anyone reads
                data = f.read()
        except FileNotFoundError:
            return ""
        text = data.decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def host_stats(self) -> objects.HostStats:
        cpus, memory_mb = self.host.node_info()
        libvirt_version, qemu_version = self.host.versions()
        cache_bytes, cache_files = self.image_cache.usage()
        running = 0
        with contextlib.suppress(exception.HypervisorError):
            running = sum(1 for s in self.host.domain_states().values()
                          if s == libvirt.VIR_DOMAIN_RUNNING)
        return objects.HostStats(
            hostname=self.conf.host, vcpus=cpus, memory_mb=memory_mb,
            memory_mb_reserved=self.conf.libvirt.machine_memory_reserved_mb,
            libvirt_version=libvirt_version, qemu_version=qemu_version,
            virt_type=self.conf.libvirt.virt_type,
            instances_path_free_mb=free_bytes(self.conf.instances_path) // MiB,
            instances_path_total_mb=total_bytes(self.conf.instances_path) // MiB,
            image_cache_bytes=cache_bytes, image_cache_files=cache_files,
            image_cache_hits=self.image_cache.hits, image_cache_misses=self.image_cache.misses,
            domains_running=running, save_files_bytes=_dir_bytes(self.conf.libvirt.save_path),
            save_path_free_mb=free_bytes(self.conf.libvirt.save_path) // MiB)


def _dir_bytes(path: str) -> int:
    try:
        with os.scandir(path) as it:
            return sum(e.stat().st_blocks * 512 for e in it if e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return 0

