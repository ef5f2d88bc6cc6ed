"""The image service interface and the factory that picks a backend."""

from __future__ import annotations

import abc
from collections.abc import Iterator

from compute_agent.objects import ImageMeta


class ImageService(abc.ABC):
    """Where images come from. Backends: ``local`` (a directory), ``glance``."""

    @abc.abstractmethod
    def show(self, image_id: str) -> ImageMeta:
        """The image record; raises ImageNotFound."""

    @abc.abstractmethod
    def download(self, image_id: str) -> Iterator[bytes]:
        """The image data as a stream of chunks."""


def get_image_service(conf) -> ImageService:
    if conf.image.backend == "glance":
        from compute_agent.image import glance
        return glance.GlanceImageService(conf)
    from compute_agent.image import local
    return local.LocalImageService(conf.image.local_image_dir)
