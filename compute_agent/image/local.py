"""The embedded image service: a directory of images on this host.

``<dir>/<image_id>`` holds the data and ``<dir>/<image_id>.json`` the record:
``{"name": "...", "disk_format": "raw"|"qcow2"}``, optionally with
``os_hash_algo``/``os_hash_value`` to verify the data against.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid as uuidlib
from collections.abc import Iterator

from compute_agent import exception
from compute_agent.image.service import ImageService
from compute_agent.objects import ImageMeta

CHUNK = 1024 * 1024


class LocalImageService(ImageService):
    def __init__(self, directory: str):
        self.directory = directory

    def _paths(self, image_id: str) -> tuple[str, str]:
        # image_id was validated (no '/', no leading '.'), so this stays inside.
        data = os.path.join(self.directory, image_id)
        return data, data + ".json"

    def show(self, image_id: str) -> ImageMeta:
        data, record = self._paths(image_id)
        try:
            with open(record) as f:
                meta = json.load(f)
            size = os.path.getsize(data)
        except FileNotFoundError:
            raise exception.ImageNotFound(image_id=image_id) from None
        except (OSError, ValueError) as exc:
            raise exception.ImageFetchFailed(image_id=image_id,
                                             reason=f"unreadable record {record}: {exc}") from exc
        return ImageMeta(id=image_id, name=meta.get("name", image_id),
                         disk_format=meta.get("disk_format", ""), size=size,
                         hash_algo=meta.get("os_hash_algo"),
                         hash_value=meta.get("os_hash_value"),
                         properties=meta.get("properties", {}))

    def download(self, image_id: str) -> Iterator[bytes]:
        data, _ = self._paths(image_id)
        try:
            f = open(data, "rb")
        except FileNotFoundError:
            raise exception.ImageNotFound(image_id=image_id) from None
        with f:
            while chunk := f.read(CHUNK):
                yield chunk

    # --- writing (snapshots): the record first, the data renamed into place ------

    def create_image(self, name: str, disk_format: str, container_format: str = "bare",
                     min_disk: int = 0, min_ram: int = 0,
                     properties: dict[str, str] | None = None) -> str:
        image_id = str(uuidlib.uuid4())
        self._write_record(image_id, {
            "name": name, "disk_format": disk_format, "container_format": container_format,
            "min_disk": min_disk, "min_ram": min_ram, "properties": properties or {},
            "status": "queued"})
        return image_id

    def upload(self, image_id: str, data: Iterator[bytes], size: int | None = None) -> None:
        path, record = self._paths(image_id)
        try:
            with open(record) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise exception.ImageNotFound(image_id=image_id) from None
        tmp = f"{path}.part-{os.getpid()}"
        hasher = hashlib.sha512()
        try:
            with open(tmp, "xb") as f:
                for chunk in data:
                    hasher.update(chunk)
                    f.write(chunk)
            os.rename(tmp, path)
        except OSError as exc:
            raise exception.ImageUploadFailed(image_id=image_id, reason=str(exc)) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        meta.update(status="active", os_hash_algo="sha512", os_hash_value=hasher.hexdigest())
        self._write_record(image_id, meta)

    def delete(self, image_id: str) -> None:
        path, record = self._paths(image_id)
        if not os.path.exists(record):
            raise exception.ImageNotFound(image_id=image_id)
        for p in (path, record):
            if os.path.exists(p):
                os.unlink(p)

    def _write_record(self, image_id: str, meta: dict) -> None:
        _, record = self._paths(image_id)
        with open(record + ".tmp", "w") as f:
            json.dump(meta, f)
        os.rename(record + ".tmp", record)
