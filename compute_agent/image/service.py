"""The image service interface and the factory that picks a backend."""

from __future__ import annotations

import abc
from collections.abc import Iterator

from compute_agent.exception import NotSupported
from compute_agent.objects import ImageMeta


class ImageService(abc.ABC):
    """Where images come from. Backends: ``local`` (a directory), ``glance``."""

    @abc.abstractmethod
    def show(self, image_id: str) -> ImageMeta:
        """The image record; raises ImageNotFound."""

    @abc.abstractmethod
    def download(self, image_id: str) -> Iterator[bytes]:
        """The image data as a stream of chunks."""

    # Writing images (snapshots). Backends that cannot write refuse clearly.

    def create_image(self, name: str, disk_format: str, container_format: str = "bare",
                     min_disk: int = 0, min_ram: int = 0,
                     properties: dict[str, str] | None = None) -> str:
        """Create an image record without data (status 'queued'); its id."""
        raise NotSupported(what=f"Creating images in the {type(self).__name__}")

    def upload(self, image_id: str, data: Iterator[bytes], size: int | None = None) -> None:
        """Upload the data of a queued image; it becomes 'active'. Raises
        ImageUploadFailed."""
        raise NotSupported(what=f"Uploading images to the {type(self).__name__}")

    def delete(self, image_id: str) -> None:
        """Delete an image (a failed snapshot's); ImageNotFound if it is gone."""
        raise NotSupported(what=f"Deleting images from the {type(self).__name__}")


def get_image_service(conf) -> ImageService:
    if conf.image.backend == "glance":
        # Imported (and its options registered) only when used: glanceclient
        # and keystoneauth1 cost ~10 MB of RSS.
        from compute_agent.image import glance
        glance.register_opts(conf)
        return glance.GlanceImageService(conf)
    from compute_agent.image import local
    return local.LocalImageService(conf.image.local_image_dir)
