"""Resize and cold migration for ``FakeDriver`` (mixed into it).

The driver side of compute_agent/resize.py, modelled on
virt/libvirt/cold_migration.py, in dicts:

- ``driver.disks`` (FakeDriver's own: uuid -> disk file names) is the
  instance directory; the uuid being a key means the directory exists.
- ``driver.aside`` is the ``<uuid>_resize`` directory, in the same shape.
- ``driver.guests`` (FakeDriver's) are the domains; ``domain_flavor(uuid)``
  tells which flavor a resize step last defined a domain from (None: a domain
  no resize step defined, e.g. as spawned).
- Volumes go through FakeDriver's connect_volumes/disconnect_volumes
  (``driver.connected``).

``transfer_disks`` copies this host's ``aside`` into the peer's instance
directory; the peer is the driver of the host named in the destination's
libvirt URI, among those ``fake_migration.connect`` made this driver's peers.
Every journal step below can be made to fail with ``FakeDriver.fail_at``
(the step names are the real driver's); each method records itself in
``driver.calls``.
"""

from __future__ import annotations

from urllib.parse import urlparse

from compute_agent import exception, objects, states
from compute_agent.journal import Journal

# The bytes each fake disk file holds (what transfers and copies report).
DISK_BYTES = 1 << 20


def disks_for(flavor: objects.Flavor) -> list[str]:
    """The disk files an instance of ``flavor`` has (as FakeDriver.spawn makes them)."""
    return ["disk"] + ["disk.local"] * bool(flavor.ephemeral_gb) + \
        ["disk.swap"] * bool(flavor.swap_mb)


class FakeResizeMixin:
    """Needs FakeDriver's hostname, images, guests, disks, attached, calls,
    _step, hard_reboot, power_on, destroy, connect_volumes and
    disconnect_volumes, and FakeLiveMigrationMixin's ``lm.peers``."""

    @property
    def aside(self) -> dict[str, list[str]]:
        """uuid -> the disk files in its ``<uuid>_resize`` directory."""
        return self.__dict__.setdefault("_aside", {})

    @property
    def _defined_flavor(self) -> dict[str, str]:
        return self.__dict__.setdefault("_defined_flavor", {})

    def domain_flavor(self, uuid: str) -> str | None:
        """The flavor name a resize step defined the domain from, if it exists."""
        return self._defined_flavor.get(uuid) if uuid in self.guests else None

    def instance_dir(self, uuid: str) -> str:
        return f"/fake/{self.hostname}/instances/{uuid}"

    def _plug_vifs(self, instance: objects.Instance, journal: Journal) -> None:
        if instance.spec.networks:
            with self._step(journal, "plug_vifs"):
                pass

    # --- the destination -----------------------------------------------------------

    def prep_resize_destination(self, instance: objects.Instance, journal: Journal) -> dict:
        uuid = instance.uuid
        self.calls.append(("prep_resize_destination", uuid))
        has_base = True
        if instance.spec.image_id is not None:
            with self._step(journal, "ensure_image"):
                try:
                    self.images.show(instance.spec.image_id)
                    self.cached.add(instance.spec.image_id)
                except exception.ImageNotFound as exc:
                    has_base = False
                    journal.event("no_base", f"{exc}; the source sends the root disk "
                                             f"flattened")
        if uuid in self.disks:  # make_instance_dir never reuses a directory
            raise exception.InstanceExists(f"Instance directory {self.instance_dir(uuid)} "
                                           f"already exists on {self.hostname}")
        self.disks[uuid] = []
        return {"instance_dir": self.instance_dir(uuid),
                "libvirt_uri": f"qemu+tcp://{self.hostname}/system", "has_base": has_base}

    def finish_resize_destination(self, instance: objects.Instance, journal: Journal,
                                  power_on: bool) -> None:
        uuid = instance.uuid
        self.calls.append(("finish_resize_destination", uuid))
        flavor = instance.spec.flavor
        if instance.spec.image_id is not None:
            with self._step(journal, "rebase_disk"):
                if "disk" not in self.disks.get(uuid, []):
                    raise exception.DiskMissing(path=f"{self.instance_dir(uuid)}/disk")
            with self._step(journal, "grow_disks"):
                # The flavor's disks: a new ephemeral or swap disk appears.
                have = self.disks[uuid]
                have += [d for d in disks_for(flavor) if d not in have]
        if power_on:
            self.hard_reboot(instance, journal)
        else:
            self._plug_vifs(instance, journal)
            self.connect_volumes(instance, journal)
            with self._step(journal, "define_domain"):
                self.guests[uuid] = states.SHUTDOWN
                self.attached[uuid] = [b.volume_id for b in instance.spec.block_devices]
        self._defined_flavor[uuid] = flavor.name

    def cleanup_resize_destination(self, instance: objects.Instance, journal: Journal) -> None:
        self.calls.append(("cleanup_resize_destination", instance.uuid))
        self.destroy(instance, journal)

    # --- the source ----------------------------------------------------------------

    def migrate_disks_aside(self, instance: objects.Instance, journal: Journal) -> None:
        uuid = instance.uuid
        self.calls.append(("migrate_disks_aside", uuid))
        self.disconnect_volumes(instance, journal)
        if instance.spec.networks:
            with self._step(journal, "unplug_vifs"):
                pass
        with self._step(journal, "move_instance_dir"):
            if uuid in self.aside:
                raise exception.InstanceExists(f"{self.instance_dir(uuid)}_resize already "
                                               f"exists; refusing to overwrite it")
            if uuid not in self.disks:
                raise FileNotFoundError(self.instance_dir(uuid))
            self.aside[uuid] = self.disks.pop(uuid)

    def _peer(self, dest: dict):
        host = urlparse(dest.get("libvirt_uri") or "").hostname
        peer = self.lm.peers.get(host)
        if peer is None:
            raise exception.ComputeAgentError(
                f"cannot reach the destination's libvirtd at {dest.get('libvirt_uri')}")
        return peer

    def transfer_disks(self, instance: objects.Instance, journal: Journal, dest: dict,
                       progress) -> int:
        uuid = instance.uuid
        self.calls.append(("transfer_disks", uuid))
        files = list(self.aside.get(uuid, []))
        peer = self._peer(dest)
        if not dest.get("has_base", True) and "disk" in files:
            with self._step(journal, "flatten_disk"):
                pass
        total = len(files) * DISK_BYTES or 1
        moved = 0
        for name in files:
            with self._step(journal, "transfer_disk"):
                journal.event("transfer", name)
                there = peer.disks.get(uuid)
                if dest.get("instance_dir") != peer.instance_dir(uuid) or there is None:
                    raise exception.ComputeAgentError(
                        f"cannot open {dest.get('instance_dir')} on the destination")
                if name in there:
                    raise exception.ComputeAgentError(
                        f"{name} already exists in {dest['instance_dir']} on the destination")
                there.append(name)
                moved += DISK_BYTES
                progress(moved, total)
        return moved

    def restore_from_aside(self, instance: objects.Instance, journal: Journal) -> bool:
        uuid = instance.uuid
        self.calls.append(("restore_from_aside", uuid))
        moved = False
        with self._step(journal, "restore_instance_dir"):
            if uuid in self.aside:
                if uuid in self.disks:
                    raise exception.InstanceExists(
                        f"both {self.instance_dir(uuid)} and its _resize exist; leaving both "
                        f"for an operator")
                self.disks[uuid] = self.aside.pop(uuid)
                moved = True
        self._plug_vifs(instance, journal)
        self.connect_volumes(instance, journal)
        return moved

    def remove_aside(self, instance: objects.Instance, journal: Journal) -> None:
        uuid = instance.uuid
        self.calls.append(("remove_aside", uuid))
        with self._step(journal, "undefine_domain"):
            self.guests.pop(uuid, None)
            self.attached.pop(uuid, None)
        self.remove_aside_dir(instance, journal)

    def flush_disks(self, instance: objects.Instance, journal: Journal) -> None:
        self.calls.append(("flush_disks", instance.uuid))
        with self._step(journal, "flush_disks"):
            pass

    def remove_aside_dir(self, instance: objects.Instance, journal: Journal) -> None:
        self.calls.append(("remove_aside_dir", instance.uuid))
        with self._step(journal, "remove_resize_dir"):
            self.aside.pop(instance.uuid, None)

    # --- a resize on this host --------------------------------------------------------

    def copy_disks_from_aside(self, instance: objects.Instance, journal: Journal) -> int:
        uuid = instance.uuid
        self.calls.append(("copy_disks_from_aside", uuid))
        if uuid in self.disks:
            raise exception.InstanceExists(f"Instance directory {self.instance_dir(uuid)} "
                                           f"already exists on {self.hostname}")
        self.disks[uuid] = []
        for name in self.aside.get(uuid, []):
            self.disks[uuid].append(name)
            journal.event("copy", name)
        return len(self.disks[uuid]) * DISK_BYTES

    def undo_resize_same_host(self, resized: objects.Instance, original: objects.Instance,
                              journal: Journal, power_on: bool) -> None:
        self.calls.append(("undo_resize_same_host", original.uuid))
        if original.uuid in self.aside:
            self.destroy(resized, journal)
            self.restore_from_aside(original, journal)
            self.finish_resize_destination(original, journal, power_on)
            return
        self.restore_from_aside(original, journal)  # nothing moved: as it was
        if power_on and self.guests.get(original.uuid) != states.RUNNING:
            self.power_on(original, journal)
