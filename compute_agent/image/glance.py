"""Glance (image API v2) as the image service, through python-glanceclient
and a keystoneauth1 session: password or token against Keystone, or
``auth_type = admin_token`` / ``none`` with ``endpoint_override`` for a Glance
without Keystone. Options live in the ``[glance]`` group."""

from __future__ import annotations

from collections.abc import Iterator

import glanceclient
from glanceclient import exc as glance_exc
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from oslo_log import log as logging

from compute_agent import exception
from compute_agent.image.service import ImageService
from compute_agent.objects import ImageMeta

LOG = logging.getLogger(__name__)

_UNREACHABLE = (ks_exc.ConnectionError, ks_exc.ConnectFailure, ks_exc.RetriableConnectionFailure,
                glance_exc.CommunicationError, glance_exc.HTTPServiceUnavailable,
                glance_exc.HTTPInternalServerError, glance_exc.HTTPBadGateway)


def register_opts(conf) -> None:
    ks_loading.register_session_conf_options(conf, "glance")
    ks_loading.register_auth_conf_options(conf, "glance")
    ks_loading.register_adapter_conf_options(conf, "glance")


class GlanceImageService(ImageService):
    def __init__(self, conf):
        auth = ks_loading.load_auth_from_conf_options(conf, "glance")
        session = ks_loading.load_session_from_conf_options(conf, "glance", auth=auth)
        g = conf.glance
        self.client = glanceclient.Client(
            "2", session=session, endpoint_override=g.endpoint_override,
            service_type=g.service_type or "image",
            interface=(g.valid_interfaces or ["public"])[0], region_name=g.region_name)

    def _call(self, image_id: str, what: str, fn, error=exception.ImageFetchFailed):
        try:
            return fn()
        except glance_exc.HTTPNotFound:
            raise exception.ImageNotFound(image_id=image_id) from None
        except _UNREACHABLE as exc:
            raise error(
                image_id=image_id, reason=f"the image service is unreachable during {what}: "
                                          f"{exc}") from exc
        except (glance_exc.HTTPException, ks_exc.ClientException) as exc:
            raise error(image_id=image_id, reason=f"{what} failed: {exc}") from exc

    def show(self, image_id: str) -> ImageMeta:
        image = self._call(image_id, "show", lambda: self.client.images.get(image_id))
        if image.get("status") != "active":
            raise exception.ImageUnacceptable(
                image_id=image_id, reason=f"its status is {image.get('status')!r}, not 'active'")
        return ImageMeta(id=image_id, name=image.get("name") or image_id,
                         disk_format=image.get("disk_format") or "",
                         size=image.get("size"), hash_algo=image.get("os_hash_algo"),
                         hash_value=image.get("os_hash_value"),
                         properties={k: v for k, v in image.items()
                                     if k.startswith(("hw_", "os_", "img_"))},
                         min_disk=image.get("min_disk") or 0, min_ram=image.get("min_ram") or 0)

    def download(self, image_id: str) -> Iterator[bytes]:
        # The cache verifies os_hash_value while it streams; glanceclient's
        # own checksum pass would hash everything a second time.
        body = self._call(image_id, "download",
                          lambda: self.client.images.data(image_id, do_checksum=False))
        if body is None:
            raise exception.ImageFetchFailed(image_id=image_id, reason="the image has no data")
        iterator = iter(body)
        while True:
            chunk = self._call(image_id, "download", lambda: next(iterator, None))
            if chunk is None:
                return
            yield chunk

    # --- writing (snapshots) ---------------------------------------------------

    def create_image(self, name: str, disk_format: str, container_format: str = "bare",
                     min_disk: int = 0, min_ram: int = 0,
                     properties: dict[str, str] | None = None) -> str:
        image = self._call(name, "create", lambda: self.client.images.create(
            name=name, disk_format=disk_format, container_format=container_format,
            min_disk=min_disk, min_ram=min_ram, **(properties or {})),
            error=exception.ImageUploadFailed)
        LOG.debug("Created image %s (%s) in Glance, status %s", image["id"], name,
                  image.get("status"))
        return image["id"]

    def upload(self, image_id: str, data: Iterator[bytes], size: int | None = None) -> None:
        # glanceclient streams a file-like body in chunks (chunked encoding).
        self._call(image_id, "upload",
                   lambda: self.client.images.upload(image_id, _Reader(data), image_size=size),
                   error=exception.ImageUploadFailed)

    def delete(self, image_id: str) -> None:
        self._call(image_id, "delete", lambda: self.client.images.delete(image_id),
                   error=exception.ImageUploadFailed)


class _Reader:
    """A file-like view of an iterator of chunks (what glanceclient uploads)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = iter(chunks)
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data
