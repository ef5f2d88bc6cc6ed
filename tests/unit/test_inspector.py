"""The image inspector on small images made with the local qemu-img binary."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from compute_agent import exception
from compute_agent.conf import CONF  # noqa: F401 - registers CONF.image.*, read by qemu_img
from compute_agent.image import inspector

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

ALLOWED = ["raw", "qcow2"]
MiB = 1024 * 1024


def qemu_img_create(path, fmt: str, size: str = "1M", *options: str) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *options, str(path), size],
                   check=True, capture_output=True)
    return str(path)


def raw_file(path, size: int = MiB, head: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return str(path)


def mbr(partition_type: int, start_chs=(0, 2, 0), start_lba: int = 1) -> bytes:
    """A first sector with one primary partition and the 0x55AA signature."""
    sector = bytearray(512)
    sector[446:462] = struct.pack("<B3BB3BII", 0, *start_chs, partition_type, 0xFE, 0xFF,
                                  0xFF, start_lba, 2047)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def refusal(path: str, declared: str, allowed=ALLOWED) -> str:
    with pytest.raises(exception.ImageUnacceptable) as info:
        inspector.inspect(path, "img-1", declared, allowed)
    assert "img-1" in str(info.value)
    return str(info.value)


def test_raw_passes(tmp_path):
    info = inspector.inspect(raw_file(tmp_path / "r"), "img-1", "raw", ALLOWED)
    assert (info.format, info.virtual_size, info.backing_file) == ("raw", MiB, None)


def test_qcow2_passes(tmp_path):
    path = qemu_img_create(tmp_path / "q", "qcow2", "3M")
    info = inspector.inspect(path, "img-1", "qcow2", ALLOWED)
    assert (info.format, info.virtual_size, info.backing_file) == ("qcow2", 3 * MiB, None)


def test_qcow2_declared_raw_is_refused(tmp_path):
    message = refusal(qemu_img_create(tmp_path / "q", "qcow2"), "raw")
    assert "'raw'" in message and "'qcow2'" in message


def test_raw_declared_qcow2_is_refused(tmp_path):
    message = refusal(raw_file(tmp_path / "r"), "qcow2")
    assert "'qcow2'" in message and "'raw'" in message


def test_qcow2_with_backing_file_is_refused(tmp_path):
    base = raw_file(tmp_path / "secret", 4096)
    path = qemu_img_create(tmp_path / "q", "qcow2", "1M", "-b", base, "-F", "raw")
    assert "backing_file" in refusal(path, "qcow2")


def test_qcow2_with_external_data_file_is_refused(tmp_path):
    data = raw_file(tmp_path / "data", 0)
    path = qemu_img_create(tmp_path / "q", "qcow2", "1M", "-o", f"data_file={data}")
    assert "data_file" in refusal(path, "qcow2")


def test_truncated_qcow2_is_refused(tmp_path):
    full = qemu_img_create(tmp_path / "q", "qcow2")
    cut = tmp_path / "cut"
    with open(full, "rb") as src:
        cut.write_bytes(src.read(100))
    refusal(str(cut), "qcow2")


@pytest.mark.parametrize("declared,allowed", [
    ("vmdk", ALLOWED),
    ("qcow2", ["raw"]),
    ("raw", ["qcow2"]),
    ("", ALLOWED),
])
def test_format_not_allowed_is_refused(tmp_path, declared, allowed):
    # A well-formed image of the declared kind: refused on the declaration alone.
    path = (qemu_img_create(tmp_path / "i", declared) if declared in ("vmdk", "qcow2")
            else raw_file(tmp_path / "i"))
    message = refusal(path, declared, allowed)
    assert "not one of" in message and repr(declared) in message


def test_mbr_with_invalid_boot_flag_is_refused(tmp_path):
    head = bytearray(mbr(0x83, start_chs=(0, 1, 0), start_lba=2048))
    head[446] = 0x42  # neither 0x00 nor 0x80
    assert "safety checks" in refusal(raw_file(tmp_path / "d", head=bytes(head)), "raw")


@pytest.mark.parametrize("head", [
    mbr(0xEE),  # protective MBR of a GPT disk
    mbr(0x83, start_chs=(0, 1, 0), start_lba=2048),  # DOS MBR with a Linux partition
], ids=["gpt", "dos-mbr"])
def test_raw_disk_with_partition_table_passes_as_raw(tmp_path, head):
    path = raw_file(tmp_path / "disk", 8 * MiB, head)
    info = inspector.inspect(path, "img-1", "raw", ALLOWED)
    assert (info.format, info.virtual_size) == ("raw", 8 * MiB)
