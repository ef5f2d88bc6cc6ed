"""Resize: which flavors shrink a disk, which states may start it, and the
sparse reader the disk upload feeds libvirt's stream from."""

from __future__ import annotations

import os

import pytest

from compute_agent import objects, states
from compute_agent.resize import _shrinks
from compute_agent.virt.libvirt.cold_migration import _pool_xml, _SparseReader, _volume_xml

MiB = 1024 * 1024


def _flavor(**kw) -> objects.Flavor:
    return objects.Flavor(**{"name": "f", "vcpus": 1, "memory_mb": 64, "root_gb": 2,
                             "ephemeral_gb": 1, **kw})


@pytest.mark.parametrize("new, shrinks", [
    ({}, None),
    ({"vcpus": 4, "memory_mb": 32}, None),
    ({"root_gb": 3, "ephemeral_gb": 2}, None),
    ({"root_gb": 1}, "root disk"),
    ({"root_gb": 0}, "root disk"),
    ({"ephemeral_gb": 0}, "ephemeral disk"),
])
def test_shrinking_disks_are_named(new, shrinks):
    reason = _shrinks(_flavor(), _flavor(**new))
    assert (reason is None) if shrinks is None else (shrinks in reason)


def test_resize_allowed_from_active_or_stopped_only():
    for vm_state in (states.ACTIVE, states.STOPPED):
        assert states.check_allowed("resize", vm_state, None)
    for vm_state in (states.SUSPENDED, states.RESIZED, states.ERROR, states.BUILDING):
        assert not states.check_allowed("resize", vm_state, None)
    assert not states.check_allowed("resize", states.ACTIVE, states.POWERING_OFF)
    for action in ("confirm_resize", "revert_resize"):
        assert states.check_allowed(action, states.RESIZED, None)
        assert not states.check_allowed(action, states.ACTIVE, None)


def test_sparse_reader_sends_data_and_skips_holes(tmp_path):
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(b"a" * MiB)
        f.seek(8 * MiB)
        f.write(b"b" * MiB)
        f.truncate(16 * MiB)
    size = os.path.getsize(path)
    seen = []
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = _SparseReader(fd, size, lambda done, total: seen.append((done, total)))
        out = bytearray()
        # What virStream.sparseSendAll does with the three callbacks.
        while True:
            in_data, length = reader.section(None, None)
            if not in_data and length > 0:
                reader.skip(None, length, None)
                out += b"\0" * length
                continue
            chunk = reader.read(None, min(length, 256 * 1024), None)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert bytes(out) == f.read()
    assert seen[-1] == (size, size)


def test_pool_and_volume_xml_escape_names():
    assert "&lt;x&gt;" in _pool_xml("<x>", "/var/lib/a")
    xml = _volume_xml("disk", 1234)
    assert "<capacity unit='bytes'>1234</capacity>" in xml and "format type='raw'" in xml
