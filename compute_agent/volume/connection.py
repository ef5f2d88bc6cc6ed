"""Volume connection data: parsed, validated and typed before anything uses it.

A block device's ``connection_info.data`` comes over RPC from whoever attached
the volume (Nova/Cinder's field names). It reaches XML, libvirt secrets and
paths, so every field the agent uses is checked here and turned into a typed,
frozen object; fields it does not use are ignored. Credentials are kept in
fields that never print (``repr=False``) and error messages never echo them.

    conn = connection.parse(bdm, "block_devices[0].", conf.volume)
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

from compute_agent import exception, objects

_IQN_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.-]*(:[A-Za-z0-9.:_-]+)?"
                     r"|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16}([0-9A-Fa-f]{16})?)$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")
_CHAP_USER_RE = re.compile(r"^[A-Za-z0-9._@:-]{1,255}$")
_CEPH_USER_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_RBD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_LUN = 16383


@dataclass(frozen=True)
class IscsiConnection:
    host: str
    port: int
    iqn: str
    lun: int
    auth_username: str | None = None
    auth_password: str | None = field(default=None, repr=False)
    readonly: bool = False


@dataclass(frozen=True)
class RbdConnection:
    pool: str
    image: str
    hosts: tuple[tuple[str, int], ...]
    auth_username: str | None = None
    # A cephx key (base64) for a secret the agent creates per instance and
    # volume, or the UUID of a libvirt secret the operator made (left alone).
    key: str | None = field(default=None, repr=False)
    secret_uuid: str | None = None
    readonly: bool = False


@dataclass(frozen=True)
class LocalConnection:
    kind: str  # file | block
    path: str
    readonly: bool = False


Connection = IscsiConnection | RbdConnection | LocalConnection


def _fail(name: str, reason: str):
    raise exception.InvalidSpec(field=name, reason=reason)


def _host(value: Any, name: str) -> str:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if len(value) <= 253 and _HOSTNAME_RE.fullmatch(value):
                return value
    _fail(name, f"must be an IP address or a host name, got {value!r}")


def _port(value: Any, name: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        _fail(name, f"must be a port number 1-65535, got {value!r}")
    return value


def _secret_text(value: Any, name: str) -> str:
    # Never echo the value: it is a credential.
    if not isinstance(value, str) or not 1 <= len(value) <= 255 or "\0" in value:
        _fail(name, "must be a string of 1-255 characters (value not shown)")
    return value


def _readonly(d: dict, prefix: str) -> bool:
    mode = d.get("access_mode", "rw")
    if mode not in ("rw", "ro"):
        _fail(prefix + "access_mode", f"must be rw or ro, got {mode!r}")
    return mode == "ro"


def parse_iscsi(d: dict, prefix: str) -> IscsiConnection:
    portal = d.get("target_portal")
    if not isinstance(portal, str):
        _fail(prefix + "target_portal", f"must be 'host:port', got {portal!r}")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)|([^:\[\]]+)", portal)
    if not m:
        _fail(prefix + "target_portal", f"must be 'host:port', got {portal!r}")
    host = m.group(1) or m.group(3) or m.group(5)
    port = m.group(2) or m.group(4) or 3260
    host = _host(host, prefix + "target_portal")
    port = _port(port, prefix + "target_portal")
    iqn = d.get("target_iqn")
    if not isinstance(iqn, str) or len(iqn) > 223 or not _IQN_RE.fullmatch(iqn):
        _fail(prefix + "target_iqn", f"must be an iSCSI name (iqn.YYYY-MM.domain:id), "
                                     f"got {iqn!r}")
    lun = d.get("target_lun", 0)
    if isinstance(lun, bool) or not isinstance(lun, int) or not 0 <= lun <= MAX_LUN:
        _fail(prefix + "target_lun", f"must be an integer 0-{MAX_LUN}, got {lun!r}")
    method = d.get("auth_method")
    user = password = None
    if method not in (None, "", "None", "CHAP"):
        _fail(prefix + "auth_method", f"must be CHAP or absent, got {method!r}")
    if method == "CHAP":
        user = d.get("auth_username")
        if not isinstance(user, str) or not _CHAP_USER_RE.fullmatch(user):
            _fail(prefix + "auth_username", f"must be 1-255 letters, digits or ._@:-, "
                                            f"got {user!r}")
        password = _secret_text(d.get("auth_password"), prefix + "auth_password")
    return IscsiConnection(host=host, port=port, iqn=iqn, lun=lun, auth_username=user,
                           auth_password=password, readonly=_readonly(d, prefix))


def parse_rbd(d: dict, prefix: str) -> RbdConnection:
    name = d.get("name")
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) != 2 or not all(_RBD_NAME_RE.fullmatch(p) for p in parts):
        _fail(prefix + "name", f"must be 'pool/image', got {name!r}")
    hosts = d.get("hosts")
    ports = d.get("ports")
    if not isinstance(hosts, list) or not 1 <= len(hosts) <= 16:
        _fail(prefix + "hosts", "must be a list of 1-16 monitor addresses")
    if not isinstance(ports, list) or len(ports) != len(hosts):
        _fail(prefix + "ports", "must be a list with one port per host")
    mons = tuple((_host(h, f"{prefix}hosts[{i}]"), _port(p, f"{prefix}ports[{i}]"))
                 for i, (h, p) in enumerate(zip(hosts, ports, strict=True)))
    user = key = secret_uuid = None
    auth = d.get("auth_enabled", False)
    if not isinstance(auth, bool):
        _fail(prefix + "auth_enabled", f"must be true or false, got {auth!r}")
    if auth:
        user = d.get("auth_username")
        if not isinstance(user, str) or not _CEPH_USER_RE.fullmatch(user):
            _fail(prefix + "auth_username", f"must be a Ceph user name without 'client.', "
                                            f"got {user!r}")
        if d.get("key") is not None:
            key = _secret_text(d["key"], prefix + "key")
            try:
                base64.b64decode(key, validate=True)
            except (binascii.Error, ValueError):
                _fail(prefix + "key", "must be a base64 cephx key (value not shown)")
        elif d.get("secret_uuid") is not None:
            secret_uuid = d["secret_uuid"]
            if not isinstance(secret_uuid, str) or not _UUID_RE.fullmatch(secret_uuid):
                _fail(prefix + "secret_uuid", f"must be a UUID, got {secret_uuid!r}")
        else:
            _fail(prefix + "key", "is required (or secret_uuid of an existing libvirt "
                                  "secret) when auth_enabled is true")
    return RbdConnection(pool=parts[0], image=parts[1], hosts=mons, auth_username=user,
                         key=key, secret_uuid=secret_uuid, readonly=_readonly(d, prefix))


def check_local_path(path: str, kind: str, allowed_dirs: list[str], name: str) -> str:
    """An absolute, normalised path inside one of ``allowed_dirs``. The check on
    the string is made at request time; ``resolve_local_path`` checks the real
    file when it is connected."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path \
            or os.path.normpath(path) != path or len(path) > 4096:
        _fail(name, f"must be an absolute, normalised path, got {path!r}")
    dirs = [os.path.normpath(d) for d in allowed_dirs if d]
    if not any(path.startswith(d.rstrip("/") + "/") for d in dirs):
        _fail(name, f"{path!r} is not inside the directories allowed for {kind} volumes "
                    f"([volume] allowed_local_volume_dirs: {', '.join(dirs) or 'none'})")
    return path


def resolve_local_path(conn: LocalConnection, allowed_dirs: list[str]) -> str:
    """The real path behind ``conn.path``, checked again and of the right kind.
    A file volume's symlinks must not lead out of the allowed directories; a
    block volume's may (LVM's /dev/VG/LV -> /dev/dm-N), to a block device."""
    real = os.path.realpath(conn.path)
    check_local_path(conn.path, conn.kind, allowed_dirs, "device_path")
    if conn.kind == "file":
        check_local_path(real, conn.kind, allowed_dirs, "device_path (resolved)")
    try:
        st = os.stat(real)
    except OSError as exc:
        raise exception.VolumeConnectFailed(volume_id=conn.path,
                                            reason=f"cannot access it: {exc.strerror}") \
            from None
    want = stat.S_ISBLK if conn.kind == "block" else stat.S_ISREG
    if not want(st.st_mode):
        raise exception.VolumeConnectFailed(
            volume_id=conn.path,
            reason=f"{real} is not a {'block device' if conn.kind == 'block' else 'file'}")
    return real


def parse(bdm: objects.BlockDevice, prefix: str, volume_conf) -> Connection:
    """The typed connection of a block device, or InvalidSpec naming the field."""
    d = bdm.connection_data
    dprefix = prefix + "connection_info.data."
    if bdm.driver_volume_type == "iscsi":
        return parse_iscsi(d, dprefix)
    if bdm.driver_volume_type == "rbd":
        return parse_rbd(d, dprefix)
    kind = bdm.driver_volume_type
    path = check_local_path(d.get("device_path"), kind,
                            list(volume_conf.allowed_local_volume_dirs),
                            dprefix + "device_path")
    return LocalConnection(kind=kind, path=path, readonly=_readonly(d, dprefix))


def check_remote_fields(bdm: objects.BlockDevice, prefix: str) -> None:
    """What a client can check without the agent's configuration (rpc/api.py):
    the fields of iscsi and rbd connections. Local paths depend on the host."""
    if bdm.driver_volume_type in ("iscsi", "rbd"):
        parse(bdm, prefix, None)


def validate_spec(spec: objects.InstanceSpec, volume_conf) -> None:
    """Everything about the block devices of a spec that can be checked
    before the host is touched."""
    devices: dict[str, str] = {}
    volumes: set[str] = set()
    roots = [b for b in spec.block_devices if b.boot_index == 0]
    if len(roots) > 1:
        _fail("block_devices", "only one block device may have boot_index 0")
    if roots and spec.image_id is not None:
        _fail("image.id", "must be absent when a block device has boot_index 0 (boot from "
                          "volume)")
    if roots and (spec.flavor.ephemeral_gb or spec.flavor.swap_mb):
        _fail("flavor.ephemeral_gb", "ephemeral and swap disks are not supported with boot "
                                     "from volume yet")
    if spec.image_id is not None:
        devices.update(dict.fromkeys(local_disk_devices(spec.flavor), "a local disk"))
    for i, bdm in enumerate(spec.block_devices):
        prefix = f"block_devices[{i}]."
        check_block_device(bdm, prefix, volume_conf, devices, volumes)


def check_block_device(bdm: objects.BlockDevice, prefix: str, volume_conf,
                       devices: dict[str, str], volumes: set[str]) -> Connection:
    """One block device against the devices and volumes already in use
    (updated in place)."""
    if bdm.volume_id in volumes:
        _fail(prefix + "volume_id", f"volume {bdm.volume_id} is already attached")
    if bdm.device in devices:
        _fail(prefix + "device", f"{bdm.device} is already used by {devices[bdm.device]}")
    if bdm.boot_index not in (None, 0):
        _fail(prefix + "boot_index", "only 0 (the root volume) or null is supported")
    conn = parse(bdm, prefix, volume_conf)
    devices[bdm.device] = f"volume {bdm.volume_id}"
    volumes.add(bdm.volume_id)
    return conn


def local_disk_devices(flavor: objects.Flavor) -> list[str]:
    """Target names of the instance's own disks (see virt/libvirt/disk.py)."""
    names = ["vda"]
    nxt = iter("bcdefg")
    if flavor.ephemeral_gb:
        names.append("vd" + next(nxt))
    if flavor.swap_mb:
        names.append("vd" + next(nxt))
    return names


def used_devices(spec: objects.InstanceSpec) -> tuple[dict[str, str], set[str]]:
    """(device -> what uses it, volume ids) of an instance, for attach."""
    devices = {}
    if spec.image_id is not None:
        devices.update(dict.fromkeys(local_disk_devices(spec.flavor), "a local disk"))
    for b in spec.block_devices:
        devices[b.device] = f"volume {b.volume_id}"
    return devices, {b.volume_id for b in spec.block_devices}
