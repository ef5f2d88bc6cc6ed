"""Instance disks: the root qcow2 overlay on its _base file, plus the
ephemeral and swap disks a flavor asks for."""

from __future__ import annotations

import os

from compute_agent import exception, qemu_img
from compute_agent.objects import Flavor

GiB = 1024 ** 3
MiB = 1024 ** 2


def root_size(flavor: Flavor, base_size: int, image_id: str) -> int:
    """The root disk's virtual size: the flavor's, or the image's for root_gb=0.
    A flavor smaller than the image would cut the guest's filesystem: refuse."""
    if flavor.root_gb == 0:
        return base_size
    size = flavor.root_gb * GiB
    if base_size > size:
        raise exception.ImageUnacceptable(
            image_id=image_id,
            reason=f"its virtual size ({base_size} bytes) is larger than the flavor's "
                   f"root disk ({flavor.root_gb} GiB)")
    return size


def create_disks(instance_dir: str, base_path: str, flavor: Flavor,
                 image_id: str) -> list[tuple[str, str]]:
    """Create disk, disk.local, disk.swap as the flavor asks.
    Returns [(path, target_dev)] in boot order."""
    base_size = os.path.getsize(base_path)
    disks = []
    root = os.path.join(instance_dir, "disk")
    qemu_img.create_overlay(root, base_path, root_size(flavor, base_size, image_id))
    disks.append((root, "vda"))
    next_dev = iter("bcdefg")
    if flavor.ephemeral_gb:
        path = os.path.join(instance_dir, "disk.local")
        qemu_img.create_blank(path, flavor.ephemeral_gb * GiB)
        disks.append((path, "vd" + next(next_dev)))
    if flavor.swap_mb:
        path = os.path.join(instance_dir, "disk.swap")
        qemu_img.create_blank(path, flavor.swap_mb * MiB)
        disks.append((path, "vd" + next(next_dev)))
    return disks
