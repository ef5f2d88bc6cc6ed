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


def _layout(instance_dir: str, flavor: Flavor) -> list[tuple[str, str, int]]:
    """[(path, target_dev, size)] of the disks a flavor gives, in boot order."""
    disks = [(os.path.join(instance_dir, "disk"), "vda", 0)]
    devs = iter("bcdefg")
    if flavor.ephemeral_gb:
        disks.append((os.path.join(instance_dir, "disk.local"), "vd" + next(devs),
                      flavor.ephemeral_gb * GiB))
    if flavor.swap_mb:
        disks.append((os.path.join(instance_dir, "disk.swap"), "vd" + next(devs),
                      flavor.swap_mb * MiB))
    return disks


def create_disks(instance_dir: str, base_path: str, flavor: Flavor,
                 image_id: str) -> list[tuple[str, str]]:
    """Create disk, disk.local, disk.swap as the flavor asks.
    Returns [(path, target_dev)] in boot order."""
    size = root_size(flavor, os.path.getsize(base_path), image_id)
    layout = _layout(instance_dir, flavor)
    root = layout[0][0]
    qemu_img.create_overlay(root, base_path, size)
    for path, _, extra_size in layout[1:]:
        qemu_img.create_blank(path, extra_size)
    return [(path, dev) for path, dev, _ in layout]


def ensure_disks(instance_dir: str, flavor: Flavor) -> list[tuple[str, str]]:
    """For hard reboot: the disks must be there. A missing ephemeral or swap
    disk (scratch space by definition) is recreated blank; a missing root disk
    is an error, never silently replaced."""
    layout = _layout(instance_dir, flavor)
    root = layout[0][0]
    if not os.path.exists(root):
        raise exception.DiskMissing(path=root)
    for path, _, size in layout[1:]:
        if not os.path.exists(path):
            qemu_img.create_blank(path, size)
    return [(path, dev) for path, dev, _ in layout]
