"""The client side of the compute RPC API, for an API service, a scheduler or
compute-agent-ctl. Each method addresses one host's agent.

Long operations are casts; follow them with ``get_instance`` (vm_state,
task_state, power_state, fault) or the ``compute.instance.*`` notifications.
Specs are validated here before they are sent, with the same validator the
agent uses, so a bad field is reported at once to the caller.
"""

from __future__ import annotations

import oslo_messaging as messaging
from oslo_context import context as o_context

from compute_agent import objects, rpc
from compute_agent.manager import RPC_API_VERSION
from compute_agent.network import validate as network_validate
from compute_agent.volume import connection as volume_connection


class ComputeAPI:
    def __init__(self, transport: messaging.Transport, timeout: int = 60):
        self._target = messaging.Target(topic=rpc.TOPIC, version=RPC_API_VERSION)
        self._client = messaging.get_rpc_client(transport, self._target, timeout=timeout,
                                                serializer=rpc.ContextSerializer())

    def _prepare(self, host: str, timeout: int | None = None, retry: int | None = None):
        kw = {"server": host}
        if timeout is not None:
            kw["timeout"] = timeout
        if retry is not None:
            kw["retry"] = retry
        return self._client.prepare(**kw)

    @staticmethod
    def new_context() -> o_context.RequestContext:
        return o_context.RequestContext(overwrite=False)

    # casts ---------------------------------------------------------------------

    def spawn(self, ctxt, host: str, instance: dict, validate: bool = True) -> None:
        if validate:
            spec = objects.InstanceSpec.from_dict(instance)
            for i, bdm in enumerate(spec.block_devices):
                volume_connection.check_remote_fields(bdm, f"block_devices[{i}].")
        self._prepare(host).cast(ctxt, "spawn", instance=instance)

    def delete(self, ctxt, host: str, uuid: str) -> None:
        self._prepare(host).cast(ctxt, "delete", uuid=uuid)

    def reboot(self, ctxt, host: str, uuid: str, reboot_type: str = "SOFT") -> None:
        self._prepare(host).cast(ctxt, "reboot", uuid=uuid, reboot_type=reboot_type)

    def power_off(self, ctxt, host: str, uuid: str, timeout: int | None = None) -> None:
        self._prepare(host).cast(ctxt, "power_off", uuid=uuid, timeout=timeout)

    def power_on(self, ctxt, host: str, uuid: str) -> None:
        self._prepare(host).cast(ctxt, "power_on", uuid=uuid)

    def suspend(self, ctxt, host: str, uuid: str) -> None:
        self._prepare(host).cast(ctxt, "suspend", uuid=uuid)

    def resume(self, ctxt, host: str, uuid: str, discard_saved_state: bool = False) -> None:
        self._prepare(host).cast(ctxt, "resume", uuid=uuid,
                                 discard_saved_state=discard_saved_state)

    def cache_images(self, ctxt, host: str, image_ids: list[str]) -> None:
        self._prepare(host).cast(ctxt, "cache_images", image_ids=image_ids)

    def update_security_groups(self, ctxt, host: str, uuid: str, security_groups: list[dict],
                               validate: bool = True) -> None:
        """Replace an instance's security groups (same form as the spec's)."""
        if validate:
            network_validate.parse_security_groups(security_groups)
        self._prepare(host).cast(ctxt, "update_security_groups", uuid=uuid,
                                 security_groups=security_groups)

    def attach_volume(self, ctxt, host: str, uuid: str, block_device: dict,
                      validate: bool = True) -> None:
        """Attach a volume (one entry of the spec's block_devices, boot_index
        null) to a running or stopped instance."""
        if validate:
            volume_connection.check_remote_fields(
                objects.BlockDevice.from_dict(block_device, "block_device."), "block_device.")
        self._prepare(host).cast(ctxt, "attach_volume", uuid=uuid, block_device=block_device)

    def detach_volume(self, ctxt, host: str, uuid: str, volume_id: str) -> None:
        self._prepare(host).cast(ctxt, "detach_volume", uuid=uuid, volume_id=volume_id)

    # calls ---------------------------------------------------------------------

    def ping(self, ctxt, host: str, timeout: int | None = None,
             retry: int | None = None) -> str:
        return self._prepare(host, timeout, retry).call(ctxt, "ping")

    def reset_state(self, ctxt, host: str, uuid: str, state: str) -> dict:
        return self._prepare(host).call(ctxt, "reset_state", uuid=uuid, state=state)

    def snapshot(self, ctxt, host: str, uuid: str, name: str) -> str:
        """Create an image from the instance's root disk: returns the new image's
        id at once; the copy and upload go on (task_state image_snapshot, then
        image_uploading, ``progress`` in get_instance). Follow the operation
        with get_operations (this context's request id)."""
        return self._prepare(host).call(ctxt, "snapshot", uuid=uuid, name=name)

    def get_instance(self, ctxt, host: str, uuid: str) -> dict:
        return self._prepare(host).call(ctxt, "get_instance", uuid=uuid)

    def list_instances(self, ctxt, host: str, include_deleted: bool = False) -> list[dict]:
        return self._prepare(host).call(ctxt, "list_instances",
                                        include_deleted=include_deleted)

    def get_operations(self, ctxt, host: str, uuid: str, limit: int = 10) -> list[dict]:
        return self._prepare(host).call(ctxt, "get_operations", uuid=uuid, limit=limit)

    def get_console_output(self, ctxt, host: str, uuid: str, lines: int = 100) -> str:
        return self._prepare(host).call(ctxt, "get_console_output", uuid=uuid, lines=lines)

    def get_host_status(self, ctxt, host: str, timeout: int | None = None,
                        retry: int | None = None) -> dict:
        return self._prepare(host, timeout, retry).call(ctxt, "get_host_status")

    # live migration ----------------------------------------------------------------
    # ``live_migrate`` is the cast an API/scheduler sends to the source; the
    # others are the host-to-host calls of the flow (compute_agent/live_migration.py),
    # plus the operator's abort and progress.

    def live_migrate(self, ctxt, host: str, uuid: str, dest: str,
                     block_migration: bool = False) -> None:
        """Move a running instance from ``host`` to ``dest``; follow it with
        get_operations/get_migration on the source, then get_instance on dest."""
        self._prepare(host).cast(ctxt, "live_migrate", uuid=uuid, dest=dest,
                                 block_migration=block_migration)

    def live_migration_abort(self, ctxt, host: str, uuid: str) -> dict:
        return self._prepare(host).call(ctxt, "live_migration_abort", uuid=uuid)

    def get_migration(self, ctxt, host: str, uuid: str) -> dict:
        return self._prepare(host).call(ctxt, "get_migration", uuid=uuid)

    def check_can_live_migrate_source(self, ctxt, host: str, uuid: str,
                                      block_migration: bool = False) -> dict:
        return self._prepare(host).call(ctxt, "check_can_live_migrate_source", uuid=uuid,
                                        block_migration=block_migration)

    def check_can_live_migrate_destination(self, ctxt, host: str, instance: dict,
                                           source: dict) -> dict:
        return self._prepare(host).call(ctxt, "check_can_live_migrate_destination",
                                        instance=instance, source=source)

    def pre_live_migration(self, ctxt, host: str, instance: dict, source: dict,
                           shared_storage: bool, record: dict | None = None,
                           timeout: int | None = None) -> dict:
        return self._prepare(host, timeout).call(
            ctxt, "pre_live_migration", instance=instance, source=source,
            shared_storage=shared_storage, record=record)

    def post_live_migration_at_destination(self, ctxt, host: str, uuid: str,
                                           timeout: int | None = None) -> dict:
        return self._prepare(host, timeout).call(ctxt, "post_live_migration_at_destination",
                                                 uuid=uuid)

    def rollback_live_migration_at_destination(self, ctxt, host: str, uuid: str,
                                               shared_storage: bool | None = None,
                                               timeout: int | None = None) -> None:
        return self._prepare(host, timeout).call(
            ctxt, "rollback_live_migration_at_destination", uuid=uuid,
            shared_storage=shared_storage)

    # resize / cold migration ---------------------------------------------------------
    # ``resize`` is the cast to the source; confirm/revert are casts to the
    # destination (where the record is after a resize); the others are the
    # host-to-host calls of the flow (compute_agent/resize.py).

    def resize(self, ctxt, host: str, uuid: str, flavor: dict, dest: str | None = None) -> None:
        """Cold-migrate (same flavor) or resize an instance from ``host`` to
        ``dest``; it ends ``resized`` on ``dest``, to be confirmed or reverted."""
        self._prepare(host).cast(ctxt, "resize", uuid=uuid, flavor=flavor, dest=dest)

    def confirm_resize(self, ctxt, host: str, uuid: str) -> None:
        self._prepare(host).cast(ctxt, "confirm_resize", uuid=uuid)

    def revert_resize(self, ctxt, host: str, uuid: str) -> None:
        self._prepare(host).cast(ctxt, "revert_resize", uuid=uuid)

    def prep_resize(self, ctxt, host: str, instance: dict, source: str,
                    record: dict | None = None, timeout: int | None = None) -> dict:
        return self._prepare(host, timeout).call(ctxt, "prep_resize", instance=instance,
                                                 source=source, record=record)

    def finish_resize(self, ctxt, host: str, uuid: str, power_on: bool,
                      timeout: int | None = None) -> None:
        return self._prepare(host, timeout).call(ctxt, "finish_resize", uuid=uuid,
                                                 power_on=power_on)

    def cleanup_resize_at_destination(self, ctxt, host: str, uuid: str,
                                      timeout: int | None = None) -> None:
        return self._prepare(host, timeout).call(ctxt, "cleanup_resize_at_destination",
                                                 uuid=uuid)

    def confirm_resize_at_source(self, ctxt, host: str, uuid: str,
                                 timeout: int | None = None) -> None:
        return self._prepare(host, timeout).call(ctxt, "confirm_resize_at_source", uuid=uuid)

    def finish_revert_resize(self, ctxt, host: str, uuid: str, record: dict | None = None,
                             timeout: int | None = None) -> None:
        return self._prepare(host, timeout).call(ctxt, "finish_revert_resize", uuid=uuid,
                                                 record=record)
