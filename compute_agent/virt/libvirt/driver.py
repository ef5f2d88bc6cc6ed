"""LibvirtDriver: one short method per operation, orchestrating the parts
(image cache, disks, domain config, host connection)."""

from __future__ import annotations

import contextlib
import os
import shutil

import libvirt
from oslo_log import log as logging

from compute_agent import exception, objects, states
from compute_agent.image.cache import ImageCache
from compute_agent.journal import Journal
from compute_agent.virt import driver
from compute_agent.virt.libvirt import config, disk
from compute_agent.virt.libvirt.guest import POWER_STATES
from compute_agent.virt.libvirt.host import Host

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


class LibvirtDriver(driver.ComputeDriver):
    def __init__(self, conf, image_cache: ImageCache):
        self.conf = conf
        self.image_cache = image_cache
        self.host: Host | None = None

    def init_host(self, on_power_state: driver.PowerStateHandler) -> None:
        def on_event(uuid: str, event: int, detail: int) -> None:
            power = _EVENT_POWER.get(event)
            if power == states.SHUTDOWN and detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED:
                power = states.SUSPENDED_POWER
            if power is not None:
                on_power_state(uuid, power)

        self.host = Host(self.conf.libvirt.connection_uri, on_event)
        self.host.connect()

    def cleanup_host(self) -> None:
        if self.host:
            self.host.close()

    def is_connected(self) -> bool:
        return self.host is not None and self.host.is_alive()

    # --- paths ---------------------------------------------------------------

    def instance_dir(self, uuid: str) -> str:
        # uuid is validated canonical, so this cannot escape instances_path.
        return os.path.join(self.conf.instances_path, uuid)

    @staticmethod
    def domain_name(uuid: str) -> str:
        return "instance-" + uuid

    # --- spawn ---------------------------------------------------------------

    def spawn(self, instance: objects.Instance, journal: Journal) -> None:
        spec = instance.spec
        if spec.image_id is None:
            raise exception.NotSupported(what="Boot from volume")
        with journal.step("fetch_image"):
            base = self.image_cache.ensure(spec.image_id)
        inst_dir = self.instance_dir(instance.uuid)
        try:
            os.mkdir(inst_dir, 0o755)
        except FileExistsError:
            # Not ours to reuse or remove: it may hold another instance's data.
            raise exception.InstanceExists(
                f"Instance directory {inst_dir} already exists; refusing to use or "
                f"remove it") from None
        try:
            with journal.step("create_disks"):
                disks = disk.create_disks(inst_dir, base, spec.flavor, spec.image_id)
            with journal.step("define_domain"):
                xml = config.to_xml(self._guest_config(instance, disks))
                self._write_xml_copy(inst_dir, xml)
                guest = self.host.define(xml)
            with journal.step("start_domain"):
                guest.start()
        except BaseException:
            LOG.warning("Spawn failed at step %s; removing what it created",
                        journal.current_step)
            self._remove_domain(instance.uuid)
            shutil.rmtree(inst_dir, ignore_errors=True)
            raise

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
            serial_log=config.GuestSerialLog(
                os.path.join(self.instance_dir(instance.uuid), "console.log")))

    @staticmethod
    def _write_xml_copy(inst_dir: str, xml: str) -> None:
        # For humans only; the agent never reads it back.
        tmp = os.path.join(inst_dir, ".libvirt.xml.tmp")
        with open(tmp, "w") as f:
            f.write(xml)
        os.rename(tmp, os.path.join(inst_dir, "libvirt.xml"))

    # --- delete --------------------------------------------------------------

    def destroy(self, instance: objects.Instance, journal: Journal) -> None:
        with journal.step("destroy_domain"):
            self._remove_domain(instance.uuid)
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
        st = os.statvfs(self.conf.instances_path)
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
            instances_path_free_mb=st.f_bavail * st.f_frsize // MiB,
            instances_path_total_mb=st.f_blocks * st.f_frsize // MiB,
            image_cache_bytes=cache_bytes, image_cache_files=cache_files,
            domains_running=running)
