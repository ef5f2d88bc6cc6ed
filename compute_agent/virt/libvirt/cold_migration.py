"""Moving a stopped instance's disk file to another host without SSH.

The source agent opens the destination's libvirtd (its ``live_migration_uri``:
libvirt's own authenticated connection), creates a *transient* dir storage
pool on the destination's instance directory, creates a raw-format volume of
the file's size there and uploads the file's bytes through a sparse stream
(``VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM``): holes found with SEEK_DATA /
SEEK_HOLE travel as hole markers, not as zeros. The pool is destroyed when
the upload ends, whatever happens, so the channel exists only during the
transfer. The upload runs in the agent's own process, so it works in both
directions (a namespaced libvirtd never needs to reach the other daemon).

Only a qcow2 overlay's own bytes move (its top layer): the destination has
(or fetches) the same ``_base`` image and rebases the copy onto its own base
path with ``qemu_img.rebase_unsafe`` and checks it with ``qemu_img.check``.
When it cannot have that image (deleted from the image service, or the
service unreachable), the source flattens the root disk and sends that.
The uploaded file is created 0600 by libvirt; the destination fixes that.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from xml.sax.saxutils import escape

import libvirt
from oslo_concurrency import processutils
from oslo_log import log as logging

from compute_agent import exception, qemu_img
from compute_agent.diskspace import check_free_space
from compute_agent.virt.libvirt import disk
from compute_agent.virt.migrate_data import DISK_NAMES

LOG = logging.getLogger(__name__)

# progress(bytes_sent_or_skipped, total_bytes)
Progress = Callable[[int, int], None]
_CHUNK = 4 * 1024 * 1024


def _pool_xml(name: str, path: str) -> str:
    return (f"<pool type='dir'><name>{escape(name)}</name>"
            f"<target><path>{escape(path)}</path></target></pool>")


def _volume_xml(name: str, size: int) -> str:
    # raw: libvirt writes the bytes as they come (the file stays a qcow2).
    return (f"<volume type='file'><name>{escape(name)}</name>"
            f"<capacity unit='bytes'>{size}</capacity>"
            f"<allocation unit='bytes'>0</allocation>"
            f"<target><format type='raw'/></target></volume>")


class _SparseReader:
    """Reads a local file section by section (data or hole), counting progress."""

    def __init__(self, fd: int, size: int, progress: Progress | None):
        self.fd, self.size, self.progress = fd, size, progress
        self.done = 0
        self._reported = 0

    def _advance(self, n: int) -> None:
        self.done += n
        if self.progress and (self.done - self._reported >= 64 * _CHUNK
                              or self.done >= self.size):
            self._reported = self.done
            self.progress(self.done, self.size)

    def section(self, stream, opaque) -> tuple[bool, int]:
        """(in data, length of the current section from the current offset)."""
        cur = os.lseek(self.fd, 0, os.SEEK_CUR)
        if cur >= self.size:
            return True, 0
        try:
            data = os.lseek(self.fd, cur, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = self.size  # only a hole remains
        if data > cur:
            os.lseek(self.fd, cur, os.SEEK_SET)
            return False, data - cur
        hole = os.lseek(self.fd, cur, os.SEEK_HOLE)
        os.lseek(self.fd, cur, os.SEEK_SET)
        return True, min(hole, self.size) - cur

    def read(self, stream, nbytes: int, opaque) -> bytes:
        chunk = os.read(self.fd, min(nbytes, _CHUNK))
        self._advance(len(chunk))
        return chunk

    def skip(self, stream, length: int, opaque) -> int:
        pos = os.lseek(self.fd, length, os.SEEK_CUR)
        self._advance(length)
        return pos


def upload_file(dest_uri: str, local_path: str, dest_dir: str, name: str | None = None,
                progress: Progress | None = None) -> int:
    """Upload ``local_path`` into ``dest_dir/name`` on the host whose libvirtd
    is at ``dest_uri``, sparse. ``dest_dir`` must exist there. Returns the
    file's size. A file of that name already there is refused (never
    overwritten)."""
    name = name or os.path.basename(local_path)
    size = os.path.getsize(local_path)
    try:
        conn = libvirt.open(dest_uri)
    except libvirt.libvirtError as exc:
        raise exception.ComputeAgentError(
            f"cannot reach the destination's libvirtd at {dest_uri}: {exc}") from exc
    pool_name = f"ca-transfer-{os.getpid()}-{os.path.basename(dest_dir.rstrip('/'))}"
    pool = None
    try:
        try:
            pool = conn.storagePoolCreateXML(_pool_xml(pool_name, dest_dir), 0)
        except libvirt.libvirtError as exc:
            raise exception.ComputeAgentError(
                f"cannot open {dest_dir} on the destination: {exc}") from exc
        with contextlib.suppress(libvirt.libvirtError):
            pool.refresh(0)
        if name in (pool.listVolumes() or []):
            raise exception.ComputeAgentError(
                f"{name} already exists in {dest_dir} on the destination")
        vol = pool.createXML(_volume_xml(name, size), 0)
        fd = os.open(local_path, os.O_RDONLY)
        stream = conn.newStream(0)
        try:
            reader = _SparseReader(fd, size, progress)
            vol.upload(stream, 0, size, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
            try:
                stream.sparseSendAll(reader.read, reader.section, reader.skip, None)
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
                raise
        finally:
            os.close(fd)
        LOG.info("uploaded %s (%d bytes) to %s:%s/%s", local_path, size, dest_uri, dest_dir,
                 name)
        return size
    except libvirt.libvirtError as exc:
        raise exception.ComputeAgentError(f"upload of {local_path} to {dest_uri} failed: "
                                          f"{exc}") from exc
    finally:
        if pool is not None:
            with contextlib.suppress(libvirt.libvirtError):
                pool.destroy()  # transient: gone with its definition; files stay
        conn.close()


def _flatten(path: str, reserve_mb: int) -> str:
    """A standalone copy of the qcow2 overlay ``path`` (its base's data in it),
    next to it; removed again if the copy fails."""
    backing = qemu_img.info(path, "qcow2").backing_file
    needed = sum(os.stat(p).st_blocks * 512 for p in (path, backing))
    check_free_space(os.path.dirname(path), needed, "flattening the root disk for a host "
                                                    "without its base image", reserve_mb)
    flat = path + ".flat"
    try:
        qemu_img.convert(path, "qcow2", flat, "qcow2")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(flat)
        raise
    return flat


def resize_dir(instance_dir: str) -> str:
    return instance_dir.rstrip("/") + "_resize"


class ColdMigrationMixin:
    """LibvirtDriver's side of resize and cold migration (orchestrated by
    compute_agent/resize.py). Uses the driver's host, conf, image_cache,
    network, instance_dir, _plug_vifs, _define, hard_reboot, destroy."""

    # --- the destination -----------------------------------------------------------

    def prep_resize_destination(self, instance, journal) -> dict:
        """The image in this host's cache, an empty instance directory; where
        the source sends the disks, and whether it may send only the root
        disk's top layer (``has_base``: this host has its base image)."""
        has_base = True
        if instance.spec.image_id is not None:
            with journal.step("ensure_image"):
                try:
                    self.image_cache.ensure(instance.spec.image_id)
                except (exception.ImageNotFound, exception.ImageFetchFailed) as exc:
                    has_base = False
                    journal.event("no_base", f"{exc}; the source sends the root disk "
                                             f"flattened")
        inst_dir = self.make_instance_dir(instance.uuid)
        lv = self.conf.libvirt
        return {"instance_dir": inst_dir,
                "libvirt_uri": lv.live_migration_uri or lv.connection_uri,
                "has_base": has_base}

    def finish_resize_destination(self, instance, journal, power_on: bool) -> None:
        """The copied top layer onto this host's base, the disks grown to the
        flavor, the domain defined from the record (started if it ran)."""
        inst_dir = self.instance_dir(instance.uuid)
        root = os.path.join(inst_dir, "disk")
        flavor = instance.spec.flavor
        if instance.spec.image_id is not None:
            with journal.step("rebase_disk"):
                info = qemu_img.info(root, "qcow2")
                if info.backing_file:
                    base = self.image_cache.ensure(instance.spec.image_id)
                    qemu_img.rebase_unsafe(root, base)
                qemu_img.check(root)
            with journal.step("grow_disks"):
                for path, _, size in disk._layout(inst_dir, flavor):
                    if path == root:
                        size = flavor.root_gb * disk.GiB
                    if size and os.path.exists(path) and \
                            qemu_img.info(path, "qcow2").virtual_size < size:
                        qemu_img.resize(path, size)
        if power_on:
            self.hard_reboot(instance, journal)
            return
        disks = []
        with journal.step("ensure_disks"):
            if instance.spec.image_id is not None:
                disks = disk.ensure_disks(inst_dir, flavor)
        self._plug_vifs(instance, journal)
        self.connect_volumes(instance, journal)
        with journal.step("define_domain"):
            self._define(instance, disks)

    def cleanup_resize_destination(self, instance, journal) -> None:
        """Remove everything this host made for an incoming resize. Idempotent."""
        self.destroy(instance, journal)

    # --- the source ----------------------------------------------------------------

    def migrate_disks_aside(self, instance, journal) -> None:
        """After the power-off: volumes disconnected, VIFs unplugged, the
        directory moved aside to ``<uuid>_resize`` (the domain stays defined,
        shut off, until confirm)."""
        self.disconnect_volumes(instance, journal)
        if instance.spec.networks:
            with journal.step("unplug_vifs"):
                self.network.unplug(instance.spec)
        with journal.step("move_instance_dir"):
            inst_dir = self.instance_dir(instance.uuid)
            aside = resize_dir(inst_dir)
            if os.path.exists(aside):
                raise exception.InstanceExists(f"{aside} already exists; refusing to "
                                               f"overwrite it")
            os.rename(inst_dir, aside)

    def transfer_disks(self, instance, journal, dest: dict, progress: Progress) -> int:
        """Upload the disk files from ``<uuid>_resize`` to the destination:
        qcow2 files as they are (the root disk's top layer only), unless the
        destination has no base image for it: then the root disk flattened."""
        aside = resize_dir(self.instance_dir(instance.uuid))
        files = {n: os.path.join(aside, n) for n in DISK_NAMES
                 if os.path.exists(os.path.join(aside, n))}
        flat = None
        if not dest.get("has_base", True) and "disk" in files and \
                qemu_img.info(files["disk"], "qcow2").backing_file:
            with journal.step("flatten_disk"):
                flat = files["disk"] = _flatten(files["disk"], self.conf.image.min_free_disk_mb)
        try:
            total = sum(os.path.getsize(p) for p in files.values()) or 1
            moved = 0
            for name, path in files.items():
                with journal.step("transfer_disk"):
                    journal.event("transfer", name)
                    done_before = moved
                    moved += upload_file(
                        dest["libvirt_uri"], path, dest["instance_dir"], name=name,
                        progress=lambda d, t, b=done_before: progress(b + d, total))
        finally:
            if flat:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(flat)
        return moved

    def restore_from_aside(self, instance, journal) -> bool:
        """Rollback/revert on the source: ``<uuid>_resize`` back in place, the
        VIFs plugged and the volumes connected again. True if the directory
        was moved back."""
        inst_dir = self.instance_dir(instance.uuid)
        aside = resize_dir(inst_dir)
        moved = False
        with journal.step("restore_instance_dir"):
            if os.path.isdir(aside):
                if os.path.exists(inst_dir):
                    raise exception.InstanceExists(
                        f"both {inst_dir} and {aside} exist; leaving both for an operator")
                os.rename(aside, inst_dir)
                moved = True
        self._plug_vifs(instance, journal)
        self.connect_volumes(instance, journal)
        return moved

    def remove_aside(self, instance, journal) -> None:
        """Confirm on the source: the shut-off domain and ``<uuid>_resize`` go."""
        with journal.step("undefine_domain"):
            self._remove_domain(instance.uuid)
        self.remove_aside_dir(instance, journal)

    def flush_disks(self, instance, journal) -> None:
        """fsync the instance's disk files: the copies arrived through the
        page cache (their rebase skips the flush), and the source's copy is
        about to go. Cheap by now: the kernel has long written most back."""
        with journal.step("flush_disks"):
            inst_dir = self.instance_dir(instance.uuid)
            for name in DISK_NAMES:
                try:
                    fd = os.open(os.path.join(inst_dir, name), os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def remove_aside_dir(self, instance, journal) -> None:
        with journal.step("remove_resize_dir"):
            aside = resize_dir(self.instance_dir(instance.uuid))
            if os.path.isdir(aside):
                shutil.rmtree(aside)

    # --- a resize on this host (allow_resize_same_host) ---------------------------------

    def copy_disks_from_aside(self, instance, journal) -> int:
        """Copies of the disks in ``<uuid>_resize`` in a new instance directory
        (sparse; reflinked where the file system can, so only their top
        layers' metadata is written). Returns the bytes the copies hold."""
        inst_dir = self.make_instance_dir(instance.uuid)
        aside = resize_dir(inst_dir)
        copied = 0
        for name in DISK_NAMES:
            src = os.path.join(aside, name)
            if os.path.exists(src):
                processutils.execute("cp", "--sparse=always", "--reflink=auto", src,
                                     os.path.join(inst_dir, name))
                copied += os.stat(src).st_blocks * 512
                journal.event("copy", name)
        return copied

    def undo_resize_same_host(self, resized, original, journal, power_on: bool) -> None:
        """Rollback or revert on this host: what the resize made goes (only
        once the old disks are safe in ``<uuid>_resize``), they come back and
        the domain is defined from ``original`` (started if ``power_on``)."""
        if os.path.isdir(resize_dir(self.instance_dir(original.uuid))):
            self.destroy(resized, journal)
            self.restore_from_aside(original, journal)
            self.finish_resize_destination(original, journal, power_on)
            return
        self.restore_from_aside(original, journal)  # nothing moved: as it was
        guest = self.host.lookup(original.uuid)
        if power_on and (guest is None or not guest.is_running()):
            self.power_on(original, journal)
