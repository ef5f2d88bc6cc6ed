"""Decide whether downloaded image data is safe to hand to qemu-img.

Three opinions must agree before an image is used: the format the image
record declares, the format oslo.utils' format inspector finds in the bytes
(with its safety checks: no backing file, no external data file, no VMDK
extents pointing elsewhere), and what ``qemu-img info`` reports when told to
read the file as the declared format.
"""

from __future__ import annotations

from oslo_log import log as logging
from oslo_utils.imageutils import format_inspector

from compute_agent import exception, qemu_img

LOG = logging.getLogger(__name__)

# A raw disk with a partition table is detected as 'gpt' (or 'iso' for an
# ISO 9660 image); both are still raw data to qemu.
_RAW_LIKE = {"raw", "gpt", "iso"}


def inspect(path: str, image_id: str, declared_format: str,
            allowed_formats: list[str], max_virtual_size: int | None = None
            ) -> qemu_img.DiskInfo:
    def refuse(reason: str):
        raise exception.ImageUnacceptable(image_id=image_id, reason=reason)

    if declared_format not in allowed_formats:
        refuse(f"disk_format {declared_format!r} is not one of {allowed_formats}")
    try:
        found = format_inspector.detect_file_format(path)
    except format_inspector.ImageFormatError as exc:
        refuse(f"its format cannot be determined: {exc}")
    if found is None:
        refuse("its format cannot be determined")
    detected = "raw" if found.NAME in _RAW_LIKE else found.NAME
    if detected != declared_format:
        refuse(f"the record says disk_format {declared_format!r} but the data is "
               f"{found.NAME!r}")
    try:
        found.safety_check()
    except format_inspector.SafetyCheckFailed as exc:
        refuse(f"it failed the safety checks: {exc}")
    # Checked on the header before qemu-img reads the file at all.
    if max_virtual_size is not None and detected != "raw" and \
            found.virtual_size > max_virtual_size:
        refuse(f"its virtual size ({found.virtual_size} bytes) is larger than the flavor's "
               f"root disk ({max_virtual_size} bytes)")

    info = qemu_img.info(path, declared_format)
    if info.format != declared_format:
        refuse(f"qemu-img reads it as {info.format!r}, not {declared_format!r}")
    if info.backing_file:
        refuse(f"it has a backing file ({info.backing_file!r})")
    # For raw data (with or without a partition table) the inspector's "virtual
    # size" is only what it read; qemu-img's is the file size.
    if detected != "raw" and found.virtual_size and found.virtual_size != info.virtual_size:
        refuse(f"the inspector finds a virtual size of {found.virtual_size} bytes but "
               f"qemu-img {info.virtual_size}")
    if max_virtual_size is not None and info.virtual_size > max_virtual_size:
        refuse(f"its virtual size ({info.virtual_size} bytes) is larger than the flavor's "
               f"root disk ({max_virtual_size} bytes)")
    LOG.debug("Image %s passed inspection: %s, virtual size %d", image_id,
              declared_format, info.virtual_size)
    return info
