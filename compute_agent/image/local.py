"""The embedded image service: a directory of images on this host.

``<dir>/<image_id>`` holds the data and ``<dir>/<image_id>.json`` the record:
``{"name": "...", "disk_format": "raw"|"qcow2"}``, optionally with
``os_hash_algo``/``os_hash_value`` to verify the data against.
"""

from __future__ import annotations

import json
import os
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
