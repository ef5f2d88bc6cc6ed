"""In-memory stand-ins for the driver and the image service.

``FakeDriver`` behaves like ``LibvirtDriver`` as far as the manager can see:
it writes the same journal steps, removes what a failed spawn created, makes
``destroy`` idempotent, keeps managed-save images and reports power states, all
in dicts and sets. Tests steer it with ``fail_at(step)``, ``add_domain`` and
``ignores_acpi``, and inspect ``guests``, ``disks``, ``saved`` and ``calls``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from compute_agent import exception, objects, states
from compute_agent.image.service import ImageService
from compute_agent.journal import Journal
from compute_agent.virt.driver import ComputeDriver, PowerStateHandler
from tests.unit.fake_migration import FakeLiveMigrationMixin
from tests.unit.fake_resize import FakeResizeMixin

SPAWN_STEPS = ("fetch_image", "create_disks", "define_domain", "start_domain")
DESTROY_STEPS = ("destroy_domain", "remove_files")


class FakeImageService(ImageService):
    """Images in a dict: image id -> (record, data)."""

    def __init__(self):
        self.images: dict[str, tuple[objects.ImageMeta, bytes]] = {}
        self.created: dict[str, dict] = {}
        self.status: dict[str, str] = {}

    def add(self, image_id: str, data: bytes = b"\0" * 512, disk_format: str = "raw",
            name: str | None = None) -> objects.ImageMeta:
        meta = objects.ImageMeta(id=image_id, name=name or image_id, disk_format=disk_format,
                                 size=len(data))
        self.images[image_id] = (meta, data)
        return meta

    def show(self, image_id: str) -> objects.ImageMeta:
        try:
            return self.images[image_id][0]
        except KeyError:
            raise exception.ImageNotFound(image_id=image_id) from None

    def download(self, image_id: str) -> Iterator[bytes]:
        if image_id not in self.images:
            raise exception.ImageNotFound(image_id=image_id)
        data = self.images[image_id][1]
        for i in range(0, len(data), 64 * 1024):
            yield data[i:i + 64 * 1024]

    # Writing (snapshots): ``created`` keeps each new image's record and
    # ``status`` its Glance-like status; ``fail_upload``/``fail_delete`` inject errors.
    fail_upload: Exception | None = None
    fail_delete: Exception | None = None

    def create_image(self, name, disk_format, container_format="bare", min_disk=0, min_ram=0,
                     properties=None) -> str:
        image_id = f"snap-{len(self.created) + 1}"
        self.created[image_id] = {"name": name, "disk_format": disk_format,
                                  "container_format": container_format, "min_disk": min_disk,
                                  "min_ram": min_ram, "properties": dict(properties or {})}
        self.status[image_id] = "queued"
        return image_id

    def upload(self, image_id: str, data: Iterator[bytes], size: int | None = None) -> None:
        self.status[image_id] = "saving"
        body = b"".join(data)
        if self.fail_upload is not None:
            raise self.fail_upload
        if size is not None and len(body) != size:
            raise exception.ImageUploadFailed(image_id=image_id, reason="size mismatch")
        self.add(image_id, body, self.created[image_id]["disk_format"],
                 self.created[image_id]["name"])
        self.status[image_id] = "active"

    def delete(self, image_id: str) -> None:
        if self.fail_delete is not None:
            raise self.fail_delete
        if self.status.get(image_id, "deleted") == "deleted":
            raise exception.ImageNotFound(image_id=image_id)
        self.status[image_id] = "deleted"
        self.images.pop(image_id, None)


class FakeDriver(FakeResizeMixin, FakeLiveMigrationMixin, ComputeDriver):  # see fake_*.py
    def __init__(self, images: ImageService | None = None, host: str = "h1"):
        self.images = images
        self.hostname = host
        self.guests: dict[str, str] = {}  # uuid -> power_state of defined domains
        self.disks: dict[str, list[str]] = {}  # uuid -> disk names
        self.console: dict[str, str] = {}  # uuid -> console log text
        self.saved: set[str] = set()  # uuids with a managed-save image
        self.cached: set[str] = set()  # image ids in the fake _base
        self.ignores_acpi: set[str] = set()  # guests that never power off on ACPI
        self.calls: list[tuple[str, str | None]] = []  # (method, uuid)
        self.connected: set[tuple[str, str]] = set()  # (uuid, volume_id): secrets etc.
        self.attached: dict[str, list[str]] = {}  # uuid -> volume ids in the domain
        self.sticky_volumes: set[str] = set()  # volume ids the guest never lets go of
        self.on_power_state: PowerStateHandler | None = None
        self._failures: dict[str, Exception] = {}

    # --- steering ------------------------------------------------------------

    def fail_at(self, step: str, exc: Exception | None = None) -> None:
        """Make the next run of journal step ``step`` raise ``exc``."""
        self._failures[step] = exc or exception.CommandFailed(
            cmd="fake " + step, exit_code=1, stderr=f"injected failure at {step}")

    def add_domain(self, uuid: str, power_state: str = states.RUNNING) -> None:
        """A domain that exists on the fake hypervisor, whoever created it."""
        self.guests[uuid] = power_state

    @contextlib.contextmanager
    def _step(self, journal: Journal, name: str) -> Iterator[None]:
        with journal.step(name):
            exc = self._failures.pop(name, None)
            if exc is not None:
                raise exc
            yield

    # --- ComputeDriver -------------------------------------------------------

    def init_host(self, on_power_state: PowerStateHandler) -> None:
        self.calls.append(("init_host", None))
        self.on_power_state = on_power_state

    def spawn(self, instance: objects.Instance, journal: Journal) -> None:
        uuid = instance.uuid
        self.calls.append(("spawn", uuid))
        bfv = instance.spec.image_id is None  # boot from volume: no image, no root disk
        if not bfv:
            with self._step(journal, "fetch_image"):
                if self.images is not None:
                    self.images.show(instance.spec.image_id)
        if uuid in self.disks:
            raise exception.InstanceExists(f"Instance directory for {uuid} already exists")
        try:
            flavor = instance.spec.flavor
            self.disks[uuid] = []
            if not bfv:
                with self._step(journal, "create_disks"):
                    self.disks[uuid] = (["disk"] + ["disk.local"] * bool(flavor.ephemeral_gb)
                                        + ["disk.swap"] * bool(flavor.swap_mb))
            self.connect_volumes(instance, journal)
            with self._step(journal, "define_domain"):
                self.guests[uuid] = states.SHUTDOWN
                self.attached[uuid] = [b.volume_id for b in instance.spec.block_devices]
            with self._step(journal, "start_domain"):
                self.guests[uuid] = states.RUNNING
        except BaseException:
            # Like the real driver: remove everything this call created.
            self.guests.pop(uuid, None)
            self.disks.pop(uuid, None)
            self.attached.pop(uuid, None)
            for b in instance.spec.block_devices:
                self.connected.discard((uuid, b.volume_id))
            raise

    def destroy(self, instance: objects.Instance, journal: Journal) -> None:
        uuid = instance.uuid
        self.calls.append(("destroy", uuid))
        with self._step(journal, "destroy_domain"):
            self.guests.pop(uuid, None)
            self.saved.discard(uuid)
            self.attached.pop(uuid, None)
        self.disconnect_volumes(instance, journal)
        with self._step(journal, "remove_files"):
            self.disks.pop(uuid, None)
            self.console.pop(uuid, None)

    def reboot(self, instance: objects.Instance, journal: Journal, hard: bool,
               timeout: int) -> str:
        uuid = instance.uuid
        self.calls.append(("reboot", uuid))
        if hard or self.guests.get(uuid) != states.RUNNING:
            self.hard_reboot(instance, journal)
            return "hard"
        with self._step(journal, "acpi_shutdown"):
            clean = self._acpi_shutdown(uuid)
        if clean:
            with self._step(journal, "start_domain"):
                self.guests[uuid] = states.RUNNING
            return "soft"
        self.hard_reboot(instance, journal)
        return "hard-after-soft-timeout"

    def hard_reboot(self, instance: objects.Instance, journal: Journal) -> None:
        uuid = instance.uuid
        self.calls.append(("hard_reboot", uuid))
        if uuid in self.saved:
            raise exception.SavedStateExists(uuid=uuid)
        with self._step(journal, "destroy_domain"):
            if uuid in self.guests:
                self.guests[uuid] = states.SHUTDOWN
        with self._step(journal, "ensure_image"):
            if self.images is not None and instance.spec.image_id:
                self.images.show(instance.spec.image_id)
        with self._step(journal, "ensure_disks"):
            if instance.spec.image_id and "disk" not in self.disks.get(uuid, []):
                raise exception.DiskMissing(path=f"{uuid}/disk")
        self.connect_volumes(instance, journal)
        with self._step(journal, "define_domain"):
            self.guests.setdefault(uuid, states.SHUTDOWN)
            self.attached[uuid] = [b.volume_id for b in instance.spec.block_devices]
        with self._step(journal, "start_domain"):
            self.guests[uuid] = states.RUNNING

    def power_off(self, instance: objects.Instance, journal: Journal, timeout: int) -> bool:
        uuid = instance.uuid
        self.calls.append(("power_off", uuid))
        if self.guests.get(uuid) != states.RUNNING:
            return True
        clean = False
        if timeout > 0:
            with self._step(journal, "acpi_shutdown"):
                clean = self._acpi_shutdown(uuid)
        if not clean:
            with self._step(journal, "destroy_domain"):
                self.guests[uuid] = states.SHUTDOWN
        return clean

    def power_on(self, instance: objects.Instance, journal: Journal) -> None:
        self.hard_reboot(instance, journal)

    def suspend(self, instance: objects.Instance, journal: Journal) -> None:
        uuid = self._require_guest(instance)
        self.calls.append(("suspend", uuid))
        with self._step(journal, "check_save_space"):
            pass
        with self._step(journal, "managed_save"):
            self.saved.add(uuid)
            self.guests[uuid] = states.SUSPENDED_POWER

    def resume(self, instance: objects.Instance, journal: Journal,
               discard_saved_state: bool = False) -> None:
        uuid = self._require_guest(instance)
        self.calls.append(("resume", uuid))
        if discard_saved_state:
            with self._step(journal, "discard_saved_state"):
                self.saved.discard(uuid)
                self.guests[uuid] = states.SHUTDOWN
            self.hard_reboot(instance, journal)
            return
        with self._step(journal, "restore_domain"):
            self.saved.discard(uuid)
            self.guests[uuid] = states.RUNNING

    def has_saved_state(self, instance: objects.Instance) -> bool:
        return instance.uuid in self.saved

    def _require_guest(self, instance: objects.Instance) -> str:
        if instance.uuid not in self.guests:
            raise exception.NotFound(what=f"domain of instance {instance.uuid}")
        return instance.uuid

    def _acpi_shutdown(self, uuid: str) -> bool:
        """True if the guest powered off on the ACPI request."""
        if uuid in self.ignores_acpi:
            return False
        self.guests[uuid] = states.SHUTDOWN
        return True

    def power_state(self, instance: objects.Instance) -> str:
        return self.guests.get(instance.uuid, states.NOSTATE)

    # --- volumes -------------------------------------------------------------------

    def connect_volumes(self, instance: objects.Instance, journal: Journal) -> None:
        if instance.spec.block_devices:
            with self._step(journal, "connect_volumes"):
                for b in instance.spec.block_devices:
                    self.connected.add((instance.uuid, b.volume_id))

    def disconnect_volumes(self, instance: objects.Instance, journal: Journal) -> None:
        if instance.spec.block_devices:
            with self._step(journal, "disconnect_volumes"):
                for b in instance.spec.block_devices:
                    self.connected.discard((instance.uuid, b.volume_id))

    def attach_volume(self, instance: objects.Instance, journal: Journal,
                      bdm: objects.BlockDevice) -> str:
        uuid = self._require_guest(instance)
        self.calls.append(("attach_volume", uuid))
        with self._step(journal, "attach_volume"):
            self.attached.setdefault(uuid, []).append(bdm.volume_id)
            self.connected.add((uuid, bdm.volume_id))
        return "live" if self.guests[uuid] == states.RUNNING else "config"

    def detach_volume(self, instance: objects.Instance, journal: Journal,
                      bdm: objects.BlockDevice) -> str:
        uuid = instance.uuid
        self.calls.append(("detach_volume", uuid))
        live = self.guests.get(uuid) == states.RUNNING
        with self._step(journal, "detach_volume"):
            if live and bdm.volume_id in self.sticky_volumes:
                raise exception.VolumeDetachFailed(
                    volume_id=bdm.volume_id, uuid=uuid,
                    reason="the guest did not release it; the volume stays attached")
            if bdm.volume_id in self.attached.get(uuid, []):
                self.attached[uuid].remove(bdm.volume_id)
            self.connected.discard((uuid, bdm.volume_id))
        return "live" if live else "config"

    def reconcile_volumes(self, instance: objects.Instance, journal: Journal) -> list[str]:
        uuid = instance.uuid
        self.calls.append(("reconcile_volumes", uuid))
        recorded = [b.volume_id for b in instance.spec.block_devices]
        with self._step(journal, "reconcile_volumes"):
            attached = self.attached.setdefault(uuid, [])
            attached[:] = [v for v in attached if v in recorded]  # attaches cut short
            finished = [v for v in recorded if v not in attached]  # detaches cut short
            self.connected -= {(u, v) for u, v in self.connected
                               if u == uuid and (v not in recorded or v in finished)}
        return finished

    def all_power_states(self) -> dict[str, str]:
        self.calls.append(("all_power_states", None))
        return dict(self.guests)

    def console_output(self, instance: objects.Instance, lines: int) -> str:
        self.calls.append(("console_output", instance.uuid))
        return "\n".join(self.console.get(instance.uuid, "").splitlines()[-lines:])

    def host_stats(self) -> objects.HostStats:
        return objects.HostStats(
            hostname=self.hostname, vcpus=8, memory_mb=16384, memory_mb_reserved=512,
            libvirt_version="9.0.0", qemu_version="7.2.0", virt_type="kvm",
            instances_path_free_mb=1000, instances_path_total_mb=2000,
            image_cache_bytes=0, image_cache_files=0, image_cache_hits=0, image_cache_misses=0,
            domains_running=sum(1 for p in self.guests.values() if p == states.RUNNING),
            save_files_bytes=0, save_path_free_mb=1000)

    def cache_image(self, image_id: str) -> None:
        self.calls.append(("cache_image", image_id))
        self.images.show(image_id)
        self.cached.add(image_id)

    def age_image_cache(self, in_use, max_age: float) -> list[str]:
        removed = sorted(self.cached - in_use())
        self.cached -= set(removed)
        return removed

    # Snapshots: ``snapshot_hook(stage)`` (stage "copy" or "upload") runs inside
    # the flow, e.g. to block it or to look at the instance meanwhile;
    # ``snapshot_error`` makes prepare_snapshot refuse.
    snapshot_hook = None
    snapshot_error: Exception | None = None

    def prepare_snapshot(self, instance: objects.Instance,
                         base_image: objects.ImageMeta | None) -> objects.SnapshotPlan:
        uuid = self._require_guest(instance)
        self.calls.append(("prepare_snapshot", uuid))
        if self.snapshot_error is not None:
            raise self.snapshot_error
        power = self.guests[uuid]
        fmt = base_image.disk_format if base_image and base_image.disk_format in (
            "raw", "qcow2") else "qcow2"
        return objects.SnapshotPlan(
            mode="live" if power == states.RUNNING else "cold", disk_format=fmt,
            consistency="powered-off" if power == states.SHUTDOWN else "crash-consistent",
            virtual_size=4096, allocated_bytes=2048, needed_bytes=1024)

    def snapshot(self, instance: objects.Instance, journal: Journal,
                 plan: objects.SnapshotPlan, upload, progress) -> str:
        uuid = self._require_guest(instance)
        self.calls.append(("snapshot", uuid))
        with self._step(journal, "copy_disk"):
            if self.snapshot_hook:
                self.snapshot_hook("copy")
            progress(40)
        def data():  # read by the upload, as the real driver's stream is
            if self.snapshot_hook:
                self.snapshot_hook("upload")
            yield b"\1" * 2048
            yield b"\0" * 2048
            progress(100)

        with self._step(journal, "upload"):
            upload(data(), 4096)
        return "fake copy"

    def recover_snapshot(self, instance: objects.Instance) -> str:
        self.calls.append(("recover_snapshot", instance.uuid))
        return "nothing to undo"

    # --- helpers for assertions ------------------------------------------------

    def methods_called(self, uuid: str | None = None) -> list[str]:
        return [m for m, u in self.calls if uuid is None or u == uuid]
