"""Free space on the host's filesystems: one place to ask, one error to raise."""

from __future__ import annotations

import os

from compute_agent import exception

MiB = 1024 * 1024


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem
    (0 when the path does not exist)."""
    try:
        st = os.statvfs(path)
    except FileNotFoundError:
        return 0
    return st.f_bavail * st.f_frsize


def total_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except FileNotFoundError:
        return 0
    return st.f_blocks * st.f_frsize


def check_free_space(path: str, needed_bytes: int, purpose: str, reserve_mb: int) -> None:
    """Refuse, naming what is needed and what is free, before writing a lot."""
    free = free_bytes(path)
    if free < needed_bytes + reserve_mb * MiB:
        raise exception.InsufficientDiskSpace(
            path=path, purpose=purpose, needed_mb=needed_bytes // MiB + reserve_mb,
            free_mb=free // MiB)
