"""The one place qemu-img is run.

Every call names the input format explicitly (never let qemu-img probe an
untrusted file) and runs under resource limits (prlimit), so a hostile image
header cannot make qemu-img eat the host's memory or CPU: reading metadata is
capped in CPU time and address space, copying data in CPU time only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from oslo_concurrency import processutils

from compute_agent import exception
from compute_agent.conf import CONF

GiB = 1024 ** 3


@dataclass
class DiskInfo:
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None
    backing_format: str | None


def _limits(cpu_time: int, copies_data: bool) -> processutils.ProcessLimits:
    if copies_data:
        # A copy runs qemu-img's I/O thread pool (up to 64 threads, each with
        # its stack and its own malloc arena): its virtual size grows with
        # the host's cores and how slow the disk is, so an address-space cap
        # makes it fail at random in qemu_thread_create (seen in CI). Its
        # input has already been read by the format inspector and by ``info``
        # under the cap, so only CPU time is limited here.
        return processutils.ProcessLimits(cpu_time=cpu_time)
    return processutils.ProcessLimits(
        cpu_time=cpu_time,
        address_space=CONF.image.qemu_img_address_space_mb * 1024 * 1024)


def _run(*args: str, cpu_time: int | None = None, limited: bool = True,
         copies_data: bool = False) -> str:
    cpu = cpu_time or CONF.image.qemu_img_cpu_time
    try:
        out, _ = processutils.execute("qemu-img", *args,
                                      prlimit=_limits(cpu, copies_data) if limited else None)
    except processutils.ProcessExecutionError as exc:
        raise exception.CommandFailed(cmd="qemu-img " + args[0], exit_code=exc.exit_code,
                                      stderr=(exc.stderr or "").strip()[-500:]) from exc
    return out


def info(path: str, fmt: str, force_share: bool = False) -> DiskInfo:
    """Parse ``qemu-img info`` of ``path`` read as ``fmt`` (never probed).
    ``force_share``: read an image a running QEMU holds (-U)."""
    data = json.loads(_run("info", "-f", fmt, "--output=json", *(["-U"] if force_share else []),
                           path))
    return DiskInfo(format=data["format"], virtual_size=int(data["virtual-size"]),
                    actual_size=int(data.get("actual-size", 0)),
                    backing_file=data.get("backing-filename"),
                    backing_format=data.get("backing-filename-format"))


def convert_to_raw(src: str, src_fmt: str, dest: str) -> None:
    # -W: out-of-order writes, faster on a local file.
    _run("convert", "-f", src_fmt, "-O", "raw", "-W", src, dest,
         cpu_time=CONF.image.qemu_img_cpu_time * 20, copies_data=True)


# Creating a disk reads no untrusted data (the backing file is a raw _base file
# that passed inspection), so it runs without the prlimit wrapper, which costs a
# Python interpreter start (~25 ms) on every spawn.

def create_overlay(path: str, backing_file: str, size_bytes: int) -> None:
    _run("create", "-q", "-f", "qcow2", "-b", backing_file, "-F", "raw", path,
         str(size_bytes), limited=False)


def create_blank(path: str, size_bytes: int) -> None:
    _run("create", "-q", "-f", "qcow2", path, str(size_bytes), limited=False)


@dataclass
class Extent:
    """One range of ``qemu-img map``: where the guest's bytes at ``start`` live."""

    start: int
    length: int
    depth: int  # 0: the image itself, 1: its backing file, ...
    data: bool  # the bytes are at ``offset`` in the file at ``depth``
    zero: bool  # the range reads as zeros
    offset: int | None


def map_extents(path: str, fmt: str) -> list[Extent]:
    """The image's guest-visible layout, through its backing chain."""
    return [Extent(start=int(e["start"]), length=int(e["length"]), depth=int(e["depth"]),
                   data=bool(e.get("data")), zero=bool(e.get("zero")),
                   offset=int(e["offset"]) if "offset" in e else None)
            for e in json.loads(_run("map", "-f", fmt, "--output=json", path))]


def convert(src: str, src_fmt: str, dest: str, dest_fmt: str) -> None:
    """Copy ``src`` with its backing chain into a standalone image."""
    _run("convert", "-f", src_fmt, "-O", dest_fmt, src, dest,
         cpu_time=CONF.image.qemu_img_cpu_time * 20, copies_data=True)


def rebase_standalone(path: str) -> None:
    """Make a qcow2 overlay standalone, in place: the data it takes from its
    backing file is copied into it (safe rebase onto nothing)."""
    _run("rebase", "-f", "qcow2", "-b", "", path, cpu_time=CONF.image.qemu_img_cpu_time * 20,
         copies_data=True)


def rebase_unsafe(path: str, backing_file: str) -> None:
    """Point a qcow2 overlay at ``backing_file`` (raw) without touching its
    data (-u): for a copied top layer whose base is the same image at
    another path.

    ``-t unsafe``: no flush on close. The file was just copied through the
    page cache, so a flush here would write all of it out (~0.2 s for
    512 MiB, most of the transfer's time); a resize's destination flushes
    its disks before the source's copy is deleted (flush_disks)."""
    _run("rebase", "-q", "-u", "-t", "unsafe", "-f", "qcow2", "-b", backing_file, "-F", "raw",
         path)


def check(path: str, fmt: str = "qcow2") -> None:
    """``qemu-img check``: raises CommandFailed when the image is corrupt or leaks."""
    _run("check", "-q", "-f", fmt, path)


def resize(path: str, size_bytes: int, fmt: str = "qcow2") -> None:
    """Grow the image's virtual size (never shrinks: --shrink is not passed)."""
    _run("resize", "-q", "-f", fmt, path, str(size_bytes))
