"""The interface the manager drives. It speaks in instances, never in libvirt."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator

from compute_agent.exception import NotSupported
from compute_agent.journal import Journal
from compute_agent.objects import BlockDevice, HostStats, ImageMeta, Instance, SnapshotPlan
from compute_agent.virt import migrate_data as md

# (instance uuid, new power_state)
PowerStateHandler = Callable[[str, str], None]
# Snapshots: upload(chunks, size in bytes) sends an image's data; progress(percent).
UploadFn = Callable[[Iterator[bytes], int], None]
ProgressFn = Callable[[int], None]


class ComputeDriver(abc.ABC):
    @abc.abstractmethod
    def init_host(self, on_power_state: PowerStateHandler) -> None:
        """Connect to the hypervisor; report power-state changes to the handler."""

    @abc.abstractmethod
    def spawn(self, instance: Instance, journal: Journal) -> None:
        """Create disks, define and start the guest. On failure, remove
        everything this call created and raise."""

    @abc.abstractmethod
    def destroy(self, instance: Instance, journal: Journal) -> None:
        """Stop and undefine the guest and remove its directory. Idempotent."""

    @abc.abstractmethod
    def reboot(self, instance: Instance, journal: Journal, hard: bool, timeout: int) -> str:
        """Soft (ACPI, hard after ``timeout``) or hard reboot. Returns 'soft',
        'hard' or 'hard-after-soft-timeout'."""

    @abc.abstractmethod
    def hard_reboot(self, instance: Instance, journal: Journal) -> None:
        """Destroy, recreate whatever is missing from the record, start."""

    @abc.abstractmethod
    def power_off(self, instance: Instance, journal: Journal, timeout: int) -> bool:
        """Clean shutdown within ``timeout`` s, then forced. True if clean."""

    @abc.abstractmethod
    def power_on(self, instance: Instance, journal: Journal) -> None:
        """Start a stopped guest, recreating what is missing."""

    @abc.abstractmethod
    def suspend(self, instance: Instance, journal: Journal) -> None:
        """Save the guest's memory to disk and stop it (managed save)."""

    @abc.abstractmethod
    def resume(self, instance: Instance, journal: Journal,
               discard_saved_state: bool = False) -> None:
        """Restore a suspended guest; or, when asked explicitly, discard the
        saved state and cold-boot."""

    @abc.abstractmethod
    def has_saved_state(self, instance: Instance) -> bool:
        """Whether the guest has a managed-save image."""

    @abc.abstractmethod
    def power_state(self, instance: Instance) -> str:
        """The guest's power_state now ('nostate' when it has no domain)."""

    @abc.abstractmethod
    def all_power_states(self) -> dict[str, str]:
        """uuid -> power_state for every guest on the hypervisor, in one call."""

    @abc.abstractmethod
    def console_output(self, instance: Instance, lines: int) -> str:
        """The last ``lines`` lines of the guest's serial console."""

    @abc.abstractmethod
    def host_stats(self) -> HostStats:
        """Capacity and usage of this host."""

    @abc.abstractmethod
    def cache_image(self, image_id: str) -> None:
        """Fetch an image into the host's cache if it is not there."""

    @abc.abstractmethod
    def age_image_cache(self, in_use: Callable[[], set[str]], max_age: float) -> list[str]:
        """Remove cached images not in ``in_use()`` and unused for ``max_age`` s."""

    def prepare_snapshot(self, instance: Instance, base_image: ImageMeta | None) -> SnapshotPlan:
        """Decide how to snapshot the root disk (live or cold, the image format)
        and check there is disk space for it. Changes nothing."""
        raise NotSupported(what="Snapshots with this driver")

    def snapshot(self, instance: Instance, journal: Journal, plan: SnapshotPlan,
                 upload: UploadFn, progress: ProgressFn) -> str:
        """Copy the root disk as planned and ``upload`` it in the plan's format;
        the instance ends in the state it was in. Every temporary file is gone
        when this returns or raises. Returns a note on how it went."""
        raise NotSupported(what="Snapshots with this driver")

    def recover_snapshot(self, instance: Instance) -> str:
        """After a restart: undo what an interrupted snapshot left (domain
        transient, block job, managed save, temporary files). Returns a note."""
        return ""

    def update_security_groups(self, instance: Instance, journal: Journal) -> None:
        """Replace the firewall rules of the instance's ports with those of
        ``instance.spec.security_groups``, atomically."""
        raise NotSupported(what="Updating security groups with this driver")

    def is_connected(self) -> bool:
        return True

    def check_connection(self) -> bool:
        """Reconnect to the hypervisor if needed; True when it answers."""
        return True

    # --- volumes --------------------------------------------------------------------

    def connect_volumes(self, instance: Instance, journal: Journal) -> None:
        """Make what the instance's volumes need on this host (secrets, logins)
        before its domain is defined: spawn, hard reboot, the destination of
        a live migration. Idempotent; a failure leaves nothing connected."""
        if instance.spec.block_devices:
            raise NotSupported(what="Volumes with this driver")

    def disconnect_volumes(self, instance: Instance, journal: Journal) -> None:
        """Undo connect_volumes (delete; the source after a live migration)."""
        if instance.spec.block_devices:
            raise NotSupported(what="Volumes with this driver")

    def attach_volume(self, instance: Instance, journal: Journal, bdm: BlockDevice) -> str:
        """Connect ``bdm`` and add its disk, live if the guest runs and to the
        persistent definition. Raises VolumeAttachFailed with nothing left
        attached or connected. Returns 'live' or 'config'."""
        raise NotSupported(what="Volumes with this driver")

    def detach_volume(self, instance: Instance, journal: Journal, bdm: BlockDevice) -> str:
        """Remove the disk (waiting for the guest to let go) and disconnect.
        Raises VolumeDetachFailed, the disk still there, when the guest keeps
        it. Returns 'live' or 'config'."""
        raise NotSupported(what="Volumes with this driver")

    def reconcile_volumes(self, instance: Instance, journal: Journal) -> list[str]:
        """After an attach or detach cut short by a restart: make this host
        match the record. A disk or secret of a volume the record does not
        have goes (the attach is undone); a recorded volume whose disk is
        already gone from the domain is disconnected (the detach is
        finished). Returns the ids of those, for the record to drop."""
        if instance.spec.block_devices:
            raise NotSupported(what="Volumes with this driver")
        return []

    def cleanup_host(self) -> None:  # noqa: B027 - optional hook
        """Release connections on shutdown."""

    # --- live migration (the flow is in compute_agent/live_migration.py) -------

    def live_migration_host_info(self) -> md.HostInfo:
        """Versions, virt type, CPU mode and hypervisor identity of this host."""
        raise NotSupported(what="Live migration with this driver")

    def check_can_live_migrate_source(self, instance: Instance,
                                      block_migration: bool) -> md.SourceCheckData:
        """Source side: the guest can leave (running, no saved state, no job);
        describe it for the destination and leave a shared-storage probe file
        in instances_path (removed by ``cleanup_live_migration_source_check``)."""
        raise NotSupported(what="Live migration with this driver")

    def cleanup_live_migration_source_check(  # noqa: B027 - optional hook
            self, data: md.SourceCheckData) -> None:
        """Remove the shared-storage probe file. Idempotent."""

    def check_can_live_migrate_destination(self, instance: Instance,
                                           source: md.SourceCheckData) -> md.DestCheckData:
        """Destination side: CPU compatible, the storage test (does this host
        see the source's probe file?), room for the disks of a block
        migration. Raises MigrationPreCheckError. Changes nothing."""
        raise NotSupported(what="Live migration with this driver")

    def pre_live_migration(self, instance: Instance, journal: Journal,
                           source: md.SourceCheckData, shared_storage: bool) -> md.DestPrepared:
        """Destination: instance dir, backing file, empty disks (block
        migration), VIFs and firewall, volume connections."""
        raise NotSupported(what="Live migration with this driver")

    def live_migration(self, instance: Instance, journal: Journal, dest: md.DestCheckData,
                       prepared: md.DestPrepared, block_migration: bool,
                       on_progress: Callable[[md.MigrationProgress], None],
                       abort_requested) -> None:
        """Source: move the running guest; watch it to the end (progress,
        downtime steps, completion timeout). Raises LiveMigrationFailed or
        LiveMigrationAborted when the guest is still here."""
        raise NotSupported(what="Live migration with this driver")

    def post_live_migration_at_destination(self, instance: Instance,
                                           journal: Journal) -> md.MigrationFigures:
        """Destination: the guest runs here; define it from this host's config."""
        raise NotSupported(what="Live migration with this driver")

    def post_live_migration_at_source(self, instance: Instance, journal: Journal,
                                      shared_storage: bool) -> None:
        """Source: the guest left; remove what is left of it here (the
        instance dir only when the storage is not shared)."""
        raise NotSupported(what="Live migration with this driver")

    def rollback_live_migration_at_source(self, instance: Instance, journal: Journal) -> None:
        """Source: the migration failed; the guest must run here as before."""
        raise NotSupported(what="Live migration with this driver")

    def rollback_live_migration_at_destination(self, instance: Instance, journal: Journal,
                                               shared_storage: bool) -> None:
        """Destination: remove everything pre_live_migration made. Idempotent."""
        raise NotSupported(what="Live migration with this driver")

    def live_migration_source_state(self, instance: Instance) -> str:
        """For reconciliation on the source: 'migrating' (a migration job is
        running), 'running' (the guest is here), or 'gone'."""
        raise NotSupported(what="Live migration with this driver")

    # --- resize / cold migration (compute_agent/resize.py) ------------------------

    def prep_resize_destination(self, instance: Instance, journal: Journal) -> dict:
        """Destination: the image cached, an empty instance dir; returns
        {instance_dir, libvirt_uri} for the source's disk transfer."""
        raise NotSupported(what="Resize with this driver")

    def finish_resize_destination(self, instance: Instance, journal: Journal,
                                  power_on: bool) -> None:
        """Destination: the transferred disks rebased and grown to the
        instance's flavor, the domain defined (and started if power_on)."""
        raise NotSupported(what="Resize with this driver")

    def cleanup_resize_destination(self, instance: Instance, journal: Journal) -> None:
        """Destination: remove everything of an incoming resize. Idempotent."""
        raise NotSupported(what="Resize with this driver")

    def migrate_disks_aside(self, instance: Instance, journal: Journal) -> None:
        """Source, guest shut off: VIFs unplugged, the dir moved to <uuid>_resize."""
        raise NotSupported(what="Resize with this driver")

    def transfer_disks(self, instance: Instance, journal: Journal, dest: dict,
                       progress) -> int:
        """Source: upload the disks from <uuid>_resize; returns the bytes moved."""
        raise NotSupported(what="Resize with this driver")

    def restore_from_aside(self, instance: Instance, journal: Journal) -> bool:
        """Source: <uuid>_resize back in place, VIFs plugged (rollback/revert)."""
        raise NotSupported(what="Resize with this driver")

    def remove_aside(self, instance: Instance, journal: Journal) -> None:
        """Source, on confirm: the shut-off domain and <uuid>_resize removed."""
        raise NotSupported(what="Resize with this driver")

    def remove_aside_dir(self, instance: Instance, journal: Journal) -> None:
        """<uuid>_resize removed (a same-host confirm; the domain stays)."""
        raise NotSupported(what="Resize with this driver")

    def flush_disks(self, instance: Instance, journal: Journal) -> None:
        """Destination, before a confirm deletes the source's copy: the
        instance's disks on stable storage."""
        raise NotSupported(what="Resize with this driver")

    def copy_disks_from_aside(self, instance: Instance, journal: Journal) -> int:
        """Same-host resize: copies of <uuid>_resize's disks become the
        instance's; returns the bytes they hold."""
        raise NotSupported(what="Resize with this driver")

    def undo_resize_same_host(self, resized: Instance, original: Instance, journal: Journal,
                              power_on: bool) -> None:
        """Same-host revert or rollback: back to ``original``'s disks and flavor."""
        raise NotSupported(what="Resize with this driver")
