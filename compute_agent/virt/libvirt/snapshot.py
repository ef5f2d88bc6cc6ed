"""Snapshots: an instance's root disk becomes a new image that boots.

The root disk is a qcow2 overlay (the "top" layer: what the guest wrote) on a
raw ``_base`` file that instances of the same image share. ``prepare`` picks a
flow and checks disk space, ``run`` carries it out, ``recover`` undoes what an
interrupted run left behind when the agent restarts.

The flows:

* live (the guest runs): the domain's definition is saved in
  ``<instance dir>/snapshot-domain.xml`` and the domain made transient; the
  root disk is mirrored (block copy, shallow, reusing a qcow2 made beforehand
  on the same backing file) until the copy has caught up; the guest's
  filesystems are frozen if it can be quiesced, the job is ended (the copy is
  kept), the filesystems thawed; the domain is defined again from the saved
  XML whatever happened. The guest never stops.
* cold (stopped, or suspended: a suspended guest stays suspended, its disk is
  not in use while its memory is saved): the disk is read in place.
* cold-saved (running, with ``[libvirt] live_snapshot = false``): managed save,
  the disk converted into a standalone qcow2 copy, the guest restored.

The data that goes up, and the extra disk space it takes on the way (Nova's
flow, a copy then a flattened copy of it, was measured at ~3x the disk's
allocation in its bug 1881727):

* raw image: streamed straight to the image service from the layers, extent by
  extent where ``qemu-img map`` says the bytes are. No flattened file: the extra
  space is the live copy of the top layer (nothing at all for a cold snapshot).
* qcow2 image: the live copy is made standalone in place (``qemu-img rebase``
  onto nothing) and uploaded; a cold snapshot converts the disk into one file.
  The extra space is one flattened copy: the disk's allocation, 1x.

Temporary files live in the snapshots directory, named
``.snap-<host>-<pid>-<uuid>.<kind>.qcow2``: a restarted agent removes its own
host's leftovers and only those (the directory may be shared).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from oslo_log import log as logging

from compute_agent import exception, objects, qemu_img
from compute_agent.diskspace import check_free_space
from compute_agent.journal import Journal
from compute_agent.virt.driver import ProgressFn, UploadFn
from compute_agent.virt.libvirt import config
from compute_agent.virt.libvirt.guest import Guest

LOG = logging.getLogger(__name__)
MiB = 1024 * 1024
CHUNK = MiB
_ZEROS = bytes(CHUNK)
SAVED_XML = "snapshot-domain.xml"  # the definition while the domain is transient
SAVED_MARK = "snapshot-managed-save"  # a cold-saved snapshot saved this running guest
# Progress (percent) at the end of the copy and of the flattening; the upload
# takes it to 100.
COPY_DONE, FLATTEN_DONE = 40, 50


@dataclass
class _RootDisk:
    path: str
    dev: str
    base: str | None  # the raw _base file it overlays
    virtual_size: int
    top_bytes: int  # allocated in the overlay
    base_bytes: int  # allocated in the base


# --- temporary files -----------------------------------------------------------

def snapshots_dir(conf) -> str:
    return conf.snapshots_directory or os.path.join(conf.instances_path, "snapshots")


def _prefix(conf) -> str:
    return f".snap-{conf.host}-"


def _temp_path(conf, uuid: str, kind: str) -> str:
    return os.path.join(snapshots_dir(conf),
                        f"{_prefix(conf)}{os.getpid()}-{uuid}.{kind}.qcow2")


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        LOG.debug("Removed %s", path)


def remove_stale_files(conf, uuid: str | None = None) -> list[str]:
    """Remove this host's temporary files that no running snapshot owns: those
    of a process that is gone (or an earlier one with our pid: called at start),
    or, with ``uuid``, every one of that instance's."""
    directory = snapshots_dir(conf)
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in os.listdir(directory):
        if not name.startswith(_prefix(conf)):
            continue
        pid, _, rest = name[len(_prefix(conf)):].partition("-")
        gone = (not pid.isdigit() or int(pid) == os.getpid()
                or not os.path.exists(f"/proc/{pid}"))
        if rest.startswith(f"{uuid}.") if uuid else gone:
            LOG.info("Removing %s, left by an interrupted snapshot", name)
            _remove(os.path.join(directory, name))
            removed.append(name)
    return removed


def _write_durably(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- deciding -----------------------------------------------------------------

def _yes(value: object) -> bool:
    return str(value).lower() in ("yes", "true", "1", "on")


def _root_disk(driver, instance: objects.Instance, xml: str, in_use: bool) -> _RootDisk:
    path = os.path.join(driver.instance_dir(instance.uuid), "disk")
    disk = next((d for d in config.parse_disks(xml) if d.path == path), None)
    if disk is None or disk.driver_format != "qcow2":
        raise exception.NotSupported(
            what=f"A snapshot of instance {instance.uuid}, whose root disk is not the qcow2 "
                 f"file {path},")
    top = qemu_img.info(path, "qcow2", force_share=in_use)
    base_bytes = 0
    if top.backing_file:
        if top.backing_format != "raw":
            raise exception.NotSupported(what=f"A snapshot of a root disk backed by "
                                              f"{top.backing_format} {top.backing_file}")
        base_bytes = qemu_img.info(top.backing_file, "raw", force_share=True).actual_size
    return _RootDisk(path=path, dev=disk.target_dev, base=top.backing_file,
                     virtual_size=top.virtual_size, top_bytes=top.actual_size,
                     base_bytes=base_bytes)


def prepare(driver, instance: objects.Instance, guest: Guest,
            base: objects.ImageMeta | None) -> objects.SnapshotPlan:
    """Pick the flow and the image format; refuse now, with the reason, what
    would fail later: too little disk space, a quiesce that cannot happen."""
    conf = driver.conf
    running = guest.is_running()
    xml = guest.xml()
    disk = _root_disk(driver, instance, xml, in_use=running)
    fmt = conf.libvirt.snapshot_image_format or (
        base.disk_format if base and base.disk_format in ("raw", "qcow2") else "qcow2")
    flattened = disk.top_bytes + disk.base_bytes
    props = base.properties if base else {}
    if running and conf.libvirt.live_snapshot:
        mode = "live"
        quiesce = _yes(props.get("hw_qemu_guest_agent")) and config.has_guest_agent_channel(xml)
        if _yes(props.get("os_require_quiesce")) and not quiesce:
            raise exception.QuiesceNotSupported(
                uuid=instance.uuid, reason="it has no QEMU guest agent channel" if
                _yes(props.get("hw_qemu_guest_agent")) else "hw_qemu_guest_agent is not set")
        consistency = "quiesced" if quiesce else "crash-consistent"
        needed = flattened if fmt == "qcow2" else disk.top_bytes
    elif running:
        mode, consistency, needed = "cold-saved", "crash-consistent", flattened
        check_free_space(conf.libvirt.save_path, instance.spec.flavor.memory_mb * MiB,
                         "the guest's saved memory (managed save)",
                         conf.libvirt.save_space_margin_mb)
    else:
        mode = "cold"
        consistency = "crash-consistent" if guest.has_managed_save() else "powered-off"
        needed = flattened if fmt == "qcow2" else 0  # raw: read in place
    if needed:
        directory = snapshots_dir(conf)
        os.makedirs(directory, mode=0o711, exist_ok=True)
        check_free_space(directory, needed,
                         f"a {fmt} snapshot of instance {instance.uuid} (its root disk has "
                         f"{flattened // MiB} MiB allocated)", conf.image.min_free_disk_mb)
    plan = objects.SnapshotPlan(mode=mode, disk_format=fmt, consistency=consistency,
                                virtual_size=disk.virtual_size, allocated_bytes=flattened,
                                needed_bytes=needed)
    LOG.debug("Snapshot plan: %s (top layer %d bytes, base %d bytes)", plan, disk.top_bytes,
              disk.base_bytes)
    return plan


# --- doing ----------------------------------------------------------------------

def run(driver, instance: objects.Instance, guest: Guest, journal: Journal,
        plan: objects.SnapshotPlan, upload: UploadFn, progress: ProgressFn) -> str:
    """Carry out ``plan``; every temporary file is gone when this returns or raises."""
    conf, uuid = driver.conf, instance.uuid
    disk = _root_disk(driver, instance, guest.xml(), in_use=plan.mode != "cold")
    temps: list[str] = []
    started = time.monotonic()
    try:
        # source: a qcow2 image holding the snapshot, over ``backing`` (or standalone).
        source, backing = disk.path, disk.base
        if plan.mode == "live":
            source = _temp_path(conf, uuid, "copy")
            temps.append(source)
            _live_copy(driver, instance, guest, disk, source, journal,
                       plan.consistency == "quiesced", progress)
        elif plan.mode == "cold-saved":
            source, backing = _temp_path(conf, uuid, "flat"), None
            temps.append(source)
            _saved_copy(driver, instance, guest, disk, source, journal)
        copied = time.monotonic()
        if plan.disk_format == "qcow2":
            with journal.step("flatten"):
                if plan.mode == "live":
                    qemu_img.rebase_standalone(source)  # in place: no second copy
                elif plan.mode == "cold":
                    source = _temp_path(conf, uuid, "flat")
                    temps.append(source)
                    qemu_img.convert(disk.path, "qcow2", source, "qcow2")
            size, data, start = os.path.getsize(source), _file_chunks(source), FLATTEN_DONE
        else:
            size, data = plan.virtual_size, _raw_chunks(uuid, source, backing)
            start = 0 if plan.mode == "cold" else COPY_DONE
        progress(start)
        flattened = time.monotonic()
        with journal.step("upload"):
            try:
                upload(_counted(data, size, progress, start), size)
            finally:
                data.close()
        done = time.monotonic()
    finally:
        for path in temps:
            _remove(path)
    phases = [("copy", copied - started)] if plan.mode != "cold" else []
    phases += [("flatten", flattened - copied)] if plan.disk_format == "qcow2" else []
    return ", ".join([f"{name} {secs:.1f}s" for name, secs in phases]
                     + [f"upload {done - flattened:.1f}s of {size // MiB} MiB"])


def _live_copy(driver, instance: objects.Instance, guest: Guest, disk: _RootDisk, copy: str,
               journal: Journal, quiesce: bool, progress: ProgressFn) -> None:
    """Mirror the running guest's root disk into ``copy`` (top layer only)."""
    saved = os.path.join(driver.instance_dir(instance.uuid), SAVED_XML)
    with journal.step("create_copy_target"):
        if disk.base:
            qemu_img.create_overlay(copy, disk.base, disk.virtual_size)
        else:
            qemu_img.create_blank(copy, disk.virtual_size)
    with journal.step("make_transient"):
        xml = guest.inactive_xml()
        _write_durably(saved, xml)  # a restarted agent defines it again from here
        guest.make_transient()
    try:
        with journal.step("copy_disk"):
            guest.block_copy(disk.dev, config.copy_target_xml(copy))
            _wait_for_mirror(guest, disk.dev, driver.conf.libvirt.snapshot_copy_timeout,
                             progress, instance.uuid)
        with journal.step("end_copy"):
            try:
                if quiesce:
                    guest.freeze_filesystems()
                guest.abort_block_job(disk.dev)  # ends the mirror; the copy is kept
            finally:
                if quiesce:
                    _thaw(guest)
    except BaseException:
        _cancel_copy(guest, disk.dev)
        raise
    finally:
        with journal.step("make_persistent"):
            driver.host.define(xml)
            _remove(saved)


def _wait_for_mirror(guest: Guest, dev: str, timeout: int, progress: ProgressFn,
                     uuid: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        job = guest.block_job(dev)
        if not job:
            raise exception.SnapshotFailed(
                uuid=uuid, reason=f"the copy job of {dev} ended before it caught up")
        cur, end = int(job.get("cur", 0)), int(job.get("end", 0))
        if end:
            progress(COPY_DONE * cur // end)
            if cur == end:
                LOG.debug("The mirror of %s caught up (%d bytes)", dev, end)
                return
        if time.monotonic() > deadline:
            raise exception.SnapshotFailed(
                uuid=uuid, reason=f"the copy of {dev} did not catch up with the guest's "
                                  f"writes within {timeout}s")
        time.sleep(0.2)


def _cancel_copy(guest: Guest, dev: str) -> None:
    try:
        if guest.block_job(dev):
            guest.abort_block_job(dev)
    except exception.ComputeAgentError as exc:
        LOG.error("Could not end the copy job of %s: %s", dev, exc)


def _thaw(guest: Guest) -> None:
    try:
        guest.thaw_filesystems()
    except exception.ComputeAgentError as exc:
        LOG.error("Could not thaw the guest's filesystems: %s", exc)


def _saved_copy(driver, instance: objects.Instance, guest: Guest, disk: _RootDisk, dest: str,
                journal: Journal) -> None:
    """Managed-save the running guest, copy its disk, restore it."""
    mark = os.path.join(driver.instance_dir(instance.uuid), SAVED_MARK)
    with journal.step("managed_save"):
        _write_durably(mark, "")  # a restarted agent restores the guest
        guest.managed_save()
    try:
        with journal.step("copy_disk"):
            qemu_img.convert(disk.path, "qcow2", dest, "qcow2")
    finally:
        with journal.step("restore_domain"):
            try:
                guest.start()  # with a managed-save image, start() restores it
            except exception.HypervisorError as exc:
                raise exception.RestoreFailed(uuid=instance.uuid, reason=str(exc)) from exc
            _remove(mark)


# --- the data -------------------------------------------------------------------

def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _raw_chunks(uuid: str, source: str, backing: str | None) -> Iterator[bytes]:
    """The guest-visible bytes of the qcow2 ``source`` (over ``backing``) as a raw
    image, read from where ``qemu-img map`` says they are: no flattened file."""
    chain = [source] + ([backing] if backing else [])
    files: dict[int, object] = {}
    pos = 0
    try:
        for e in qemu_img.map_extents(source, "qcow2"):
            if e.start != pos:
                raise exception.SnapshotFailed(uuid=uuid, reason=f"qemu-img map skipped {pos}")
            if e.data:
                if e.offset is None or e.depth >= len(chain):
                    raise exception.SnapshotFailed(
                        uuid=uuid, reason=f"the data at {e.start} of {source} cannot be read "
                                          f"directly (compressed?)")
                if e.depth not in files:
                    files[e.depth] = open(chain[e.depth], "rb")
                yield from _read_range(files[e.depth], e.offset, e.length, uuid)
            elif e.zero:
                for _ in range(e.length // CHUNK):
                    yield _ZEROS
                if e.length % CHUNK:
                    yield _ZEROS[:e.length % CHUNK]
            else:
                raise exception.SnapshotFailed(uuid=uuid, reason=f"no data at {e.start}")
            pos += e.length
    finally:
        for f in files.values():
            f.close()


def _read_range(f, offset: int, length: int, uuid: str) -> Iterator[bytes]:
    f.seek(offset)
    while length:
        chunk = f.read(min(CHUNK, length))
        if not chunk:
            raise exception.SnapshotFailed(uuid=uuid, reason=f"{f.name} ended early")
        length -= len(chunk)
        yield chunk


def _counted(chunks: Iterator[bytes], size: int, progress: ProgressFn,
             start: int) -> Iterator[bytes]:
    """Pass the chunks on, reporting start..100 percent as they go."""
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        progress(start + (100 - start) * sent // max(size, 1))
        yield chunk


# --- after a restart ------------------------------------------------------------

def recover(driver, instance: objects.Instance) -> str:
    """Undo what an interrupted snapshot of ``instance`` left: a copy job still
    running, frozen filesystems, a transient (or vanished) domain, a guest it
    managed-saved, temporary files. Returns what it did."""
    inst_dir = driver.instance_dir(instance.uuid)
    saved, mark = os.path.join(inst_dir, SAVED_XML), os.path.join(inst_dir, SAVED_MARK)
    notes = []
    guest = driver.host.lookup(instance.uuid)
    if guest is not None and guest.is_running():
        xml = guest.xml()
        root = os.path.join(inst_dir, "disk")
        for disk in (d for d in config.parse_disks(xml) if d.path == root):
            if guest.block_job(disk.target_dev):
                guest.abort_block_job(disk.target_dev)
                notes.append(f"ended the copy job of {disk.target_dev}")
        if config.has_guest_agent_channel(xml):
            _thaw(guest)  # a no-op unless it was left frozen
    if os.path.exists(saved):
        if guest is None or not guest.is_persistent():
            with open(saved) as f:
                driver.host.define(f.read())
            notes.append("defined the domain again from the XML saved before it was made "
                         "transient")
        _remove(saved)
    if os.path.exists(mark):
        guest = driver.host.lookup(instance.uuid)
        if guest is not None and guest.has_managed_save():
            guest.start()
            notes.append("restored the guest the snapshot had saved")
        _remove(mark)
    removed = remove_stale_files(driver.conf, instance.uuid)
    if removed:
        notes.append(f"removed {len(removed)} temporary file(s)")
    return "; ".join(notes) or "nothing to undo"
