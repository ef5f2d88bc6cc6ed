"""The snapshot's data paths on small images made with the local qemu-img: the raw
stream read from the layers equals what ``qemu-img convert`` makes, the in-place
flattening keeps the bytes, and leftovers are recognised by host and pid."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from oslo_config import cfg

from compute_agent import conf as ca_conf
from compute_agent import exception, qemu_img
from compute_agent.conf import CONF  # noqa: F401 - registers CONF.image.*, read by qemu_img
from compute_agent.virt.libvirt import snapshot

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-img/io")
MiB = 1024 * 1024


def _run(*args):
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def chain(tmp_path):
    """A 64 MiB qcow2 over a 16 MiB raw base, with data in both, zeros written
    over base data, and a region past the end of the base."""
    base, top = str(tmp_path / "base.raw"), str(tmp_path / "top.qcow2")
    with open(base, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(2 * MiB))
        f.seek(15 * MiB + 4096)
        f.write(b"tail of the base")
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, "64M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 4M 1M", "-c", "write -z 3M 64k",
         "-c", "write -P 0x11 40M 2M", "-c", "write -P 0x22 63M 4k", top)
    return base, top


def _expected(tmp_path, top) -> bytes:
    ref = str(tmp_path / "ref.raw")
    _run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, ref)
    with open(ref, "rb") as f:
        return f.read()


def test_raw_stream_from_two_layers_equals_qemu_img_convert(tmp_path, chain):
    base, top = chain
    streamed = b"".join(snapshot._raw_chunks("u", top, base))
    assert len(streamed) == 64 * MiB
    assert streamed == _expected(tmp_path, top)


def test_in_place_flattening_then_raw_stream(tmp_path, chain):
    base, top = chain
    expected = _expected(tmp_path, top)
    qemu_img.rebase_standalone(top)
    assert qemu_img.info(top, "qcow2").backing_file is None
    os.unlink(base)  # really standalone now
    assert b"".join(snapshot._raw_chunks("u", top, None)) == expected


def test_compressed_data_is_refused_not_misread(tmp_path, chain):
    base, top = chain
    packed = str(tmp_path / "packed.qcow2")
    _run("qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", top, packed)
    with pytest.raises(exception.SnapshotFailed, match="cannot be read directly"):
        b"".join(snapshot._raw_chunks("u", packed, None))


def test_progress_goes_from_start_to_100():
    seen = []
    chunks = list(snapshot._counted(iter([b"a" * 10, b"b" * 30]), 40, seen.append, 40))
    assert chunks == [b"a" * 10, b"b" * 30] and seen == [55, 100]


def test_stale_files_are_this_hosts_and_of_dead_processes(tmp_path):
    conf = cfg.ConfigOpts()
    ca_conf.register_opts(conf)
    conf([], project="test")
    conf.set_override("host", "h1")
    conf.set_override("instances_path", str(tmp_path))
    d = tmp_path / "snapshots"
    d.mkdir()
    dead = 2 ** 22 + 1  # above pid_max's default: never a live process
    names = {
        f".snap-h1-{dead}-u1.copy.qcow2": True,  # ours, process gone
        f".snap-h1-{os.getpid()}-u2.flat.qcow2": True,  # ours, an earlier process's
        f".snap-h1-{os.getppid()}-u3.copy.qcow2": False,  # ours, a live process
        f".snap-h2-{dead}-u4.copy.qcow2": False,  # another host's
        "unrelated": False,
    }
    for name in names:
        (d / name).write_bytes(b"x")
    removed = snapshot.remove_stale_files(conf)
    assert sorted(removed) == sorted(n for n, gone in names.items() if gone)
    assert snapshot.remove_stale_files(conf, "u3") == [f".snap-h1-{os.getppid()}-u3.copy.qcow2"]
    assert sorted(os.listdir(d)) == sorted([f".snap-h2-{dead}-u4.copy.qcow2", "unrelated"])
