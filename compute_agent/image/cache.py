"""The per-host image cache: ``_base/<sha1(image_id)>``, one raw file per image.

A fetch streams the image into a temporary file inside ``_base`` while hashing
it, inspects it, converts it to raw if needed and renames it into place: the
final name only ever holds a complete, verified, raw image. One fetch per image
per host: an inter-process lock per image makes concurrent spawns of the same
image wait for a single download, while other images are not blocked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable

from oslo_concurrency import lockutils
from oslo_log import log as logging

from compute_agent import exception, qemu_img
from compute_agent.diskspace import check_free_space
from compute_agent.image import inspector
from compute_agent.image.service import ImageService

LOG = logging.getLogger(__name__)
MiB = 1024 * 1024


def base_name(image_id: str) -> str:
    return hashlib.sha1(image_id.encode()).hexdigest()


class ImageCache:
    def __init__(self, conf, image_service: ImageService):
        self.conf = conf
        self.images = image_service
        self.base_dir = os.path.join(conf.instances_path, "_base")
        self.lock_path = os.path.join(self.base_dir, ".locks")
        self.hits = self.misses = 0
        limit = conf.max_concurrent_disk_ops
        self._disk_ops = (threading.BoundedSemaphore(limit) if limit
                          else contextlib.nullcontext())
        os.makedirs(self.base_dir, mode=0o755, exist_ok=True)
        os.makedirs(self.lock_path, mode=0o700, exist_ok=True)
        self._remove_stale_partials()

    def _partial_prefix(self) -> str:
        # Names carry the host so agents sharing _base (shared storage) only
        # ever clean up their own leftovers.
        return f".part-{self.conf.host}-"

    def _remove_stale_partials(self) -> None:
        """Remove temporary files a killed fetch of this host left behind."""
        prefix = self._partial_prefix()
        for name in os.listdir(self.base_dir):
            if prefix not in name:
                continue
            pid = name.split(prefix, 1)[1].split("-", 1)[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                LOG.info("Removing %s left by an interrupted image fetch", name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.base_dir, name))

    def path_for(self, image_id: str) -> str:
        return os.path.join(self.base_dir, base_name(image_id))

    def _lock(self, image_id: str):
        # Lock files live in _base itself, so agents sharing _base (shared
        # instance storage) serialise on the same file.
        return lockutils.lock("image-" + base_name(image_id), external=True,
                              lock_path=self.lock_path)

    def ensure(self, image_id: str, max_virtual_size: int | None = None) -> str:
        """Return the path of the raw base file, fetching it if missing.

        Always under the image's lock: the fetch happens once, and ageing (which
        takes the same lock) cannot remove a file between this check and its
        use, because the file's mtime is refreshed here."""
        path = self.path_for(image_id)
        with self._lock(image_id):
            if os.path.exists(path):
                os.utime(path)  # "last used", for ageing
                self.hits += 1
                return path
            self.misses += 1
            with self._disk_ops:
                self._fetch(image_id, path, max_virtual_size)
        return path

    def _fetch(self, image_id: str, path: str, max_virtual_size: int | None) -> None:
        meta = self.images.show(image_id)
        reserve = self.conf.image.min_free_disk_mb
        check_free_space(self.base_dir, meta.size or 0, f"downloading image {image_id}",
                         reserve)
        tmp = f"{path}{self._partial_prefix()}{os.getpid()}-{threading.get_ident()}"
        raw_tmp = tmp + ".raw"
        try:
            LOG.info("Fetching image %s (%s, %s bytes)", image_id, meta.disk_format, meta.size)
            self._download(meta, tmp)
            info = inspector.inspect(tmp, image_id, meta.disk_format,
                                     self.conf.image.allowed_disk_formats, max_virtual_size)
            if meta.disk_format != "raw":
                check_free_space(self.base_dir, info.virtual_size,
                                 f"converting image {image_id} to raw", reserve)
                qemu_img.convert_to_raw(tmp, meta.disk_format, raw_tmp)
                os.unlink(tmp)
                tmp = raw_tmp
            os.chmod(tmp, 0o644)
            os.rename(tmp, path)
            LOG.info("Cached image %s (%s, %d bytes virtual) as %s", image_id,
                     meta.disk_format, info.virtual_size, path)
        finally:
            for leftover in (tmp, raw_tmp):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)

    def age(self, in_use: Callable[[], set[str]], max_age: float) -> list[str]:
        """Remove base files no instance uses and nobody used for ``max_age``
        seconds. The in-use check is redone under each image's lock, so a spawn
        that starts meanwhile either keeps its file or fetches it again."""
        removed = []
        used = {base_name(i) for i in in_use()}
        for name in os.listdir(self.base_dir):
            path = os.path.join(self.base_dir, name)
            if len(name) != 40 or name in used or not os.path.isfile(path):
                continue  # not a base file (locks, partial fetches) or in use
            with lockutils.lock("image-" + name, external=True, lock_path=self.lock_path):
                if name in {base_name(i) for i in in_use()}:
                    continue
                try:
                    age = time.time() - os.stat(path).st_mtime
                except FileNotFoundError:
                    continue
                if age < max_age:
                    continue
                os.unlink(path)
            removed.append(name)
            LOG.info("Image cache: removed %s, unused for %.0fs", name, age)
        return removed

    def _download(self, meta, dest: str) -> None:
        hasher = hashlib.new(meta.hash_algo) if meta.hash_algo else None
        size = 0
        try:
            with open(dest, "xb") as f:
                for chunk in self.images.download(meta.id):
                    if hasher:
                        hasher.update(chunk)
                    if chunk.count(0) == len(chunk):
                        f.seek(len(chunk), os.SEEK_CUR)  # keep zeros sparse
                    else:
                        f.write(chunk)
                    size += len(chunk)
                f.truncate(size)
                os.fsync(f.fileno())
        except exception.ComputeAgentError:
            raise
        except Exception as exc:
            raise exception.ImageFetchFailed(image_id=meta.id, reason=str(exc)) from exc
        if meta.size is not None and size != meta.size:
            raise exception.ImageFetchFailed(
                image_id=meta.id, reason=f"got {size} bytes, the record says {meta.size}")
        if hasher and hasher.hexdigest() != meta.hash_value:
            raise exception.ImageFetchFailed(
                image_id=meta.id,
                reason=f"{meta.hash_algo} of the data is {hasher.hexdigest()}, the record "
                       f"says {meta.hash_value}")

    def usage(self) -> tuple[int, int]:
        """(bytes allocated, number of files) in _base."""
        total = files = 0
        with os.scandir(self.base_dir) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat().st_blocks * 512
                    files += 1
        return total, files

