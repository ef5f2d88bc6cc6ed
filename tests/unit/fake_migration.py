"""Live migration for ``FakeDriver`` (mixed into it).

Tests wire drivers together with ``connect``: each driver gets the others as
peers, and drivers given the same ``storage`` set share "instance storage"
(probe files are visible to all of them). Steering, on ``driver.lm``:
``fail`` (live_migration raises it, the guest stays), ``during`` (called in
the middle of the migration, e.g. to abort), ``job_running`` (uuids with a
migration job, for reconciliation), versions, virt type and hypervisor id.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field

from compute_agent import exception, objects, states
from compute_agent.journal import Journal
from compute_agent.virt import migrate_data as md


@dataclass
class FakeLiveMigration:
    host: str
    hypervisor_id: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    virt_type: str = "kvm"
    qemu_version: str = "7.2.0"
    libvirt_version: str = "9.0.0"
    storage: set = field(default_factory=set)
    peers: dict = field(default_factory=dict)
    fail: Exception | None = None
    during: object = None
    job_running: set = field(default_factory=set)
    aborted: list = field(default_factory=list)


def connect(*drivers, shared: bool) -> None:
    storage: set = set()
    for d in drivers:
        d.lm.peers = {p.hostname: p for p in drivers if p is not d}
        d.lm.storage = storage if shared else set()


class FakeLiveMigrationMixin:
    @property
    def lm(self) -> FakeLiveMigration:
        return self.__dict__.setdefault("_lm", FakeLiveMigration(self.hostname))

    def live_migration_host_info(self) -> md.HostInfo:
        return md.HostInfo(host=self.hostname, hypervisor_id=self.lm.hypervisor_id,
                           virt_type=self.lm.virt_type, libvirt_version=self.lm.libvirt_version,
                           qemu_version=self.lm.qemu_version, cpu_mode="none")

    def check_can_live_migrate_source(self, instance: objects.Instance,
                                      block_migration: bool) -> md.SourceCheckData:
        self.calls.append(("check_can_live_migrate_source", instance.uuid))
        if self.guests.get(instance.uuid) != states.RUNNING:
            raise exception.MigrationPreCheckError(uuid=instance.uuid, dest="another host",
                                                   reason="its guest is not running")
        probe = f".live-migration-probe-{uuidlib.uuid4().hex}"
        self.lm.storage.add(probe)
        return md.SourceCheckData(
            host_info=self.live_migration_host_info(), block_migration=block_migration,
            shared_storage_probe=probe,
            disks=(md.MigrationDisk("disk", "vda", 1 << 30, 1 << 20, True),),
            guest_cpu_xml=None)

    def cleanup_live_migration_source_check(self, data: md.SourceCheckData) -> None:
        self.lm.storage.discard(data.shared_storage_probe)

    def check_can_live_migrate_destination(self, instance: objects.Instance,
                                           source: md.SourceCheckData) -> md.DestCheckData:
        self.calls.append(("check_can_live_migrate_destination", instance.uuid))
        return md.DestCheckData(host_info=self.live_migration_host_info(),
                                shared_storage=source.shared_storage_probe in self.lm.storage,
                                libvirt_uri=f"qemu+tcp://{self.hostname}/system",
                                inbound_addr=None)

    def pre_live_migration(self, instance: objects.Instance, journal: Journal,
                           source: md.SourceCheckData, shared_storage: bool) -> md.DestPrepared:
        uuid = instance.uuid
        self.calls.append(("pre_live_migration", uuid))
        try:
            with self._step(journal, "instance_dir"):
                pass
            if not shared_storage:
                with self._step(journal, "create_disks"):
                    self.disks[uuid] = [d.name for d in source.disks]
            if instance.spec.networks:
                with self._step(journal, "plug_vifs"):
                    pass
        except BaseException:
            if not shared_storage:
                self.disks.pop(uuid, None)
            raise
        return md.DestPrepared(instance_dir=f"/fake/{self.hostname}/{uuid}")

    def live_migration(self, instance: objects.Instance, journal: Journal,
                       dest: md.DestCheckData, prepared: md.DestPrepared, block_migration: bool,
                       on_progress, abort_requested) -> None:
        uuid = instance.uuid
        self.calls.append(("live_migration", uuid))
        on_progress(md.MigrationProgress(elapsed_ms=500, data_total=100 << 20,
                                         data_remaining=40 << 20, memory_total=100 << 20,
                                         memory_remaining=40 << 20, memory_bps=50 << 20))
        if self.lm.during:
            self.lm.during()
        if abort_requested.is_set():
            raise exception.LiveMigrationAborted(uuid=uuid, dest=dest.host_info.host,
                                                 reason=md.OPERATOR_ABORT)
        if self.lm.fail is not None:
            raise self.lm.fail
        peer = self.lm.peers[dest.host_info.host]
        peer.guests[uuid] = self.guests.pop(uuid)
        if not block_migration:
            peer.disks[uuid] = self.disks.get(uuid, [])

    def post_live_migration_at_destination(self, instance: objects.Instance,
                                           journal: Journal) -> md.MigrationFigures:
        self.calls.append(("post_live_migration_at_destination", instance.uuid))
        with self._step(journal, "define_domain"):
            if self.guests.get(instance.uuid) != states.RUNNING:
                raise exception.LiveMigrationFailed(uuid=instance.uuid, dest=self.hostname,
                                                    reason="its guest is not running here")
        return md.MigrationFigures(time_elapsed_ms=1500, downtime_ms=40,
                                   data_processed=3 << 20, memory_iterations=2)

    def post_live_migration_at_source(self, instance: objects.Instance, journal: Journal,
                                      shared_storage: bool) -> None:
        self.calls.append(("post_live_migration_at_source", instance.uuid))
        with self._step(journal, "remove_domain"):
            self.guests.pop(instance.uuid, None)
        if not shared_storage:
            with self._step(journal, "remove_files"):
                self.disks.pop(instance.uuid, None)

    def rollback_live_migration_at_source(self, instance: objects.Instance,
                                          journal: Journal) -> None:
        self.calls.append(("rollback_live_migration_at_source", instance.uuid))
        with self._step(journal, "check_guest"):
            if self.guests.get(instance.uuid) != states.RUNNING:
                raise exception.LiveMigrationFailed(uuid=instance.uuid, dest="?",
                                                    reason="its guest is no longer running")

    def rollback_live_migration_at_destination(self, instance: objects.Instance,
                                               journal: Journal, shared_storage: bool) -> None:
        self.calls.append(("rollback_live_migration_at_destination", instance.uuid))
        with self._step(journal, "destroy_domain"):
            self.guests.pop(instance.uuid, None)
        if not shared_storage:
            self.disks.pop(instance.uuid, None)

    def live_migration_source_state(self, instance: objects.Instance) -> str:
        if instance.uuid in self.lm.job_running:
            return "migrating"
        return "running" if self.guests.get(instance.uuid) == states.RUNNING else "gone"

    def live_migration_abort_job(self, instance: objects.Instance) -> None:
        self.lm.aborted.append(instance.uuid)
        self.lm.job_running.discard(instance.uuid)
