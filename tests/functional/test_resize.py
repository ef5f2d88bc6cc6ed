"""Resize and cold migration between two hypervisor hosts on this machine (the
system libvirtd, "host A", and second_host.py's namespaced libvirtd, "host B").

So far: the disk transfer without SSH (virt/libvirt/cold_migration.py): a
qcow2 top layer uploaded through the destination's libvirtd as a sparse
storage-volume stream into a transient pool, rebased onto the destination's
own copy of the base, byte for byte the same disk as the guest sees it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid as uuidlib

import libvirt
import pytest

from compute_agent import exception, qemu_img
from compute_agent.virt.libvirt import cold_migration

SYSTEM_URI = "qemu:///system"
TEST_ROOT = "/var/lib/compute-agent-tests"
MiB = 1024 * 1024
libvirt.registerErrorHandler(lambda ctx, err: None, None)


def _qemu_io(path: str, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    subprocess.run(args + [path], check=True, capture_output=True)


@pytest.fixture
def disk_dirs():
    """(source dir with base + overlay, destination dir with its own base copy)."""
    root = os.path.join(TEST_ROOT, f"resize-transfer-{uuidlib.uuid4().hex[:8]}")
    src, dst = os.path.join(root, "src"), os.path.join(root, "dst")
    for d in (src, dst):
        os.makedirs(d)
    base = os.path.join(src, "base.raw")
    with open(base, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.truncate(64 * MiB)
    shutil.copyfile(base, os.path.join(dst, "base.raw"))
    disk = os.path.join(src, "disk")
    qemu_img.create_overlay(disk, base, 256 * MiB)
    # Data over the base, data past it, and zeroes hiding part of the base.
    _qemu_io(disk, "write -P 0xab 1M 2M", "write -P 0x5c 100M 8M", "write -z 3M 512k")
    yield src, dst
    shutil.rmtree(root, ignore_errors=True)


def _pools(uri: str) -> list[str]:
    conn = libvirt.open(uri)
    try:
        return [p.name() for p in conn.listAllStoragePools()]
    finally:
        conn.close()


@pytest.mark.parametrize("to_b", [True, False], ids=["A->B", "B->A"])
def test_top_layer_upload_is_the_same_disk(disk_dirs, second_host, to_b):
    src, dst = disk_dirs
    uri = second_host.uri if to_b else SYSTEM_URI
    pools_before = _pools(uri)
    seen = []
    size = cold_migration.upload_file(uri, os.path.join(src, "disk"), dst,
                                      progress=lambda done, total: seen.append((done, total)))
    copied = os.path.join(dst, "disk")
    assert size == os.path.getsize(os.path.join(src, "disk"))
    assert os.path.getsize(copied) == size
    assert seen and seen[-1] == (size, size)
    # Sparse: the copy allocates about what the source does, not its size.
    src_alloc = os.stat(os.path.join(src, "disk")).st_blocks * 512
    assert os.stat(copied).st_blocks * 512 <= src_alloc + 4 * MiB
    # The channel is gone after the transfer.
    assert _pools(uri) == pools_before
    qemu_img.rebase_unsafe(copied, os.path.join(dst, "base.raw"))
    qemu_img.check(copied)
    info = qemu_img.info(copied, "qcow2")
    assert info.backing_file == os.path.join(dst, "base.raw")
    assert info.virtual_size == 256 * MiB
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                    os.path.join(src, "disk"), copied], check=True, capture_output=True)
    # Grown for a bigger flavor, the data stays.
    qemu_img.resize(copied, 512 * MiB)
    assert qemu_img.info(copied, "qcow2").virtual_size == 512 * MiB
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                    os.path.join(src, "disk"), copied], check=True, capture_output=True)


def test_upload_never_overwrites(disk_dirs, second_host):
    src, dst = disk_dirs
    with open(os.path.join(dst, "disk"), "wb") as f:
        f.write(b"keep")
    with pytest.raises(exception.ComputeAgentError, match="already exists"):
        cold_migration.upload_file(second_host.uri, os.path.join(src, "disk"), dst)
    with open(os.path.join(dst, "disk"), "rb") as f:
        assert f.read() == b"keep"
    assert not [p for p in _pools(second_host.uri) if p.startswith("ca-transfer-")]
