"""What the two hosts of a live migration tell each other.

Typed here, dicts on the wire (``to_dict``/``from_dict``). Everything a peer
sends came over RPC from another agent and ends up in paths, XML and libvirt
calls, so every ``from_dict`` checks it and raises ``InvalidArgument`` naming
the field.

The exchange (see compute_agent/live_migration.py):

    source                                   destination
    SourceCheckData  --check_can_live_migrate_destination-->
                     <--  DestCheckData
    SourceCheckData  --pre_live_migration-->
                     <--  DestPrepared
    (migration)      --post_live_migration_at_destination-->
                     <--  MigrationFigures
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

from lxml import etree

from compute_agent import exception

HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_VERSION_RE = re.compile(r"^\d{1,6}\.\d{1,6}\.\d{1,6}$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9._/+:@-]{0,4000}$")
_URI_RE = re.compile(r"^[a-z][a-z0-9+]{0,31}://[A-Za-z0-9._~:/?#@!$&()*+,;=%\[\]-]{0,1000}$")
_ADDR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$")
_PROBE_RE = re.compile(r"^\.live-migration-probe-[0-9a-f]{32}$")
# The disks an instance directory holds (virt/libvirt/disk.py) and their devices.
DISK_NAMES = ("disk", "disk.local", "disk.swap")
_DEV_RE = re.compile(r"^vd[a-z]$")
MAX_DISK_BYTES = 64 * 1024 ** 4
MAX_CPU_XML = 64 * 1024
# The reason of an abort the operator asked for (live_migration_abort).
OPERATOR_ABORT = "by the operator"


def _bad(name: str, reason: str):
    raise exception.InvalidArgument(name=name, reason=reason)


def _field(d: Any, key: str, prefix: str, kind, required: bool = True):
    if not isinstance(d, dict):
        _bad(prefix.rstrip(".") or "data", "must be an object")
    value = d.get(key)
    if value is None and not required:
        return None
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        _bad(prefix + key, f"must be {getattr(kind, '__name__', kind)}, got {value!r}"[:200])
    return value


def _match(d: Any, key: str, prefix: str, pattern: re.Pattern, required: bool = True):
    value = _field(d, key, prefix, str, required)
    if value is not None and not pattern.fullmatch(value):
        _bad(prefix + key, f"has an unexpected form: {value!r}"[:200])
    return value


def check_host(value: Any, name: str = "dest") -> str:
    if not isinstance(value, str) or not HOST_RE.fullmatch(value):
        _bad(name, f"must be a host name, got {value!r}"[:200])
    return value


def check_path(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _PATH_RE.fullmatch(value) \
            or os.path.normpath(value) != value:
        _bad(name, f"must be a normalised absolute path, got {value!r}"[:200])
    return value


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


@dataclass(frozen=True)
class HostInfo:
    """What a peer needs to judge whether a guest can move between two hosts."""

    host: str
    hypervisor_id: str  # libvirt's host UUID: one hypervisor cannot migrate to itself
    virt_type: str
    libvirt_version: str
    qemu_version: str
    cpu_mode: str  # none | host-model | host-passthrough

    @classmethod
    def from_dict(cls, d: Any, prefix: str = "host_info.") -> HostInfo:
        virt_type = _field(d, "virt_type", prefix, str)
        if virt_type not in ("kvm", "qemu"):
            _bad(prefix + "virt_type", f"must be kvm or qemu, got {virt_type!r}"[:200])
        cpu_mode = _field(d, "cpu_mode", prefix, str)
        if cpu_mode not in ("none", "host-model", "host-passthrough"):
            _bad(prefix + "cpu_mode", f"unexpected {cpu_mode!r}"[:200])
        return cls(host=check_host(_field(d, "host", prefix, str), prefix + "host"),
                   hypervisor_id=_match(d, "hypervisor_id", prefix, _UUID_RE),
                   virt_type=virt_type,
                   libvirt_version=_match(d, "libvirt_version", prefix, _VERSION_RE),
                   qemu_version=_match(d, "qemu_version", prefix, _VERSION_RE),
                   cpu_mode=cpu_mode)


@dataclass(frozen=True)
class MigrationDisk:
    """One disk of the instance directory, as a block migration recreates it."""

    name: str  # disk | disk.local | disk.swap
    target_dev: str
    virtual_size: int
    actual_size: int
    backed_by_image: bool  # qcow2 over _base/<sha1(image id)>

    @classmethod
    def from_dict(cls, d: Any, prefix: str) -> MigrationDisk:
        name = _field(d, "name", prefix, str)
        if name not in DISK_NAMES:
            _bad(prefix + "name", f"must be one of {', '.join(DISK_NAMES)}, got {name!r}"[:200])
        sizes = {}
        for key in ("virtual_size", "actual_size"):
            sizes[key] = _field(d, key, prefix, int)
            if not 0 <= sizes[key] <= MAX_DISK_BYTES:
                _bad(prefix + key, f"out of range: {sizes[key]}")
        return cls(name=name, target_dev=_match(d, "target_dev", prefix, _DEV_RE),
                   backed_by_image=_field(d, "backed_by_image", prefix, bool), **sizes)


@dataclass(frozen=True)
class SourceCheckData:
    """Source -> destination: who the source is and what would move."""

    host_info: HostInfo
    block_migration: bool
    shared_storage_probe: str  # a file the source created in its instances_path
    disks: tuple[MigrationDisk, ...]
    guest_cpu_xml: str | None  # the running guest's <cpu>, for compareCPU

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), disks=[dataclasses.asdict(d) for d in self.disks])

    @classmethod
    def from_dict(cls, d: Any) -> SourceCheckData:
        disks = _field(d, "disks", "source.", list)
        if len(disks) > len(DISK_NAMES):
            _bad("source.disks", "too many disks")
        cpu_xml = _field(d, "guest_cpu_xml", "source.", str, required=False)
        if cpu_xml is not None:
            _check_cpu_xml(cpu_xml)
        return cls(
            host_info=HostInfo.from_dict(_field(d, "host_info", "source.", dict),
                                         "source.host_info."),
            block_migration=_field(d, "block_migration", "source.", bool),
            shared_storage_probe=_match(d, "shared_storage_probe", "source.", _PROBE_RE),
            disks=tuple(MigrationDisk.from_dict(x, f"source.disks[{i}].")
                        for i, x in enumerate(disks)),
            guest_cpu_xml=cpu_xml)

    @property
    def disk_bytes(self) -> int:
        return sum(d.actual_size for d in self.disks)


def _check_cpu_xml(xml: str) -> None:
    if len(xml) > MAX_CPU_XML:
        _bad("source.guest_cpu_xml", "too long")
    try:
        parser = etree.XMLParser(resolve_entities=False, no_network=True)
        root = etree.fromstring(xml.encode(), parser)
    except etree.XMLSyntaxError as exc:
        _bad("source.guest_cpu_xml", f"is not XML: {exc}")
    if root.tag != "cpu":
        _bad("source.guest_cpu_xml", f"must be a <cpu> element, got <{root.tag}>"[:200])


@dataclass(frozen=True)
class DestCheckData:
    """Destination -> source: the checks passed; how to reach it."""

    host_info: HostInfo
    shared_storage: bool
    libvirt_uri: str  # where the source sends the migration (peer-to-peer or direct)
    inbound_addr: str | None  # tcp://ADDR for the migration stream

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> DestCheckData:
        return cls(
            host_info=HostInfo.from_dict(_field(d, "host_info", "dest.", dict),
                                         "dest.host_info."),
            shared_storage=_field(d, "shared_storage", "dest.", bool),
            libvirt_uri=_match(d, "libvirt_uri", "dest.", _URI_RE),
            inbound_addr=_match(d, "inbound_addr", "dest.", _ADDR_RE, required=False))


@dataclass(frozen=True)
class DestPrepared:
    """Destination -> source: where the instance's files are over there."""

    instance_dir: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, uuid: str) -> DestPrepared:
        path = check_path(_field(d, "instance_dir", "prepared.", str), "prepared.instance_dir")
        if os.path.basename(path) != uuid:
            _bad("prepared.instance_dir", f"must end in the instance uuid, got {path!r}"[:200])
        return cls(instance_dir=path)


@dataclass
class MigrationProgress:
    """One reading of the migration job (libvirt jobStats), for the record."""

    elapsed_ms: int = 0
    data_total: int = 0
    data_remaining: int = 0
    memory_total: int = 0
    memory_remaining: int = 0
    disk_total: int = 0
    disk_remaining: int = 0
    memory_bps: int = 0
    disk_bps: int = 0
    max_downtime_ms: int | None = None

    @property
    def percent(self) -> int | None:
        """Of all data to move; None until the memory copy has started (while
        a block migration's disks are set up, only they are counted)."""
        if not self.data_total or not self.memory_total:
            return None
        done = self.data_total - self.data_remaining
        return max(0, min(99, 100 * done // self.data_total))

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), percent=self.percent)


@dataclass
class MigrationFigures:
    """The completed job as libvirt measured it (``jobStats(COMPLETED)``)."""

    time_elapsed_ms: int | None = None
    downtime_ms: int | None = None
    data_processed: int | None = None
    memory_iterations: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> MigrationFigures:
        if not isinstance(d, dict):
            return cls()
        values = {}
        for f in dataclasses.fields(cls):
            v = d.get(f.name)
            values[f.name] = v if isinstance(v, int) and not isinstance(v, bool) else None
        return cls(**values)

    def summary(self) -> str:
        parts = []
        if self.time_elapsed_ms is not None:
            parts.append(f"{self.time_elapsed_ms / 1000:.2f}s")
        if self.downtime_ms is not None:
            parts.append(f"downtime {self.downtime_ms} ms")
        if self.data_processed is not None:
            parts.append(f"{self.data_processed / 2 ** 20:.1f} MiB sent")
        return ", ".join(parts)
