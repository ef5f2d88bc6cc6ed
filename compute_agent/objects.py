"""Typed objects that cross layers: the instance spec as sent over RPC, the
instance record the agent keeps, and the host status it reports.

``InstanceSpec.from_dict`` is the only way a spec enters the agent. It checks
every field and raises ``InvalidSpec`` naming the first bad one, so nothing
untrusted reaches a path, a command line or XML unchecked.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

from compute_agent import exception

# Names end up in domain metadata, log lines and file names: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Image ids are Glance UUIDs or, for the local image service, file names.
_IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Linux interface names: at most 15 bytes, no '/', whitespace or ':'.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
_DEVICE_RE = re.compile(r"^(vd|sd)[a-z]{1,2}$")

MAX_VCPUS = 256
MAX_MEMORY_MB = 4 * 1024 * 1024  # 4 TiB
MAX_DISK_GB = 64 * 1024
MAX_SWAP_MB = 1024 * 1024


def _fail(field_name: str, reason: str):
    raise exception.InvalidSpec(field=field_name, reason=reason)


def _require_dict(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        _fail(name, f"must be an object, got {type(value).__name__}")
    return value


def _get(d: dict, key: str, prefix: str, required: bool = True, default: Any = None) -> Any:
    if key not in d or d[key] is None:
        if required:
            _fail(prefix + key, "is required")
        return default
    return d[key]


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    # bool is an int subclass: true/false is never a size.
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        _fail(name, f"must be between {lo} and {hi}, got {value}")
    return value


def _str(value: Any, name: str, pattern: re.Pattern, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        _fail(name, f"must be {what}, got {value!r}")
    return value


def validate_uuid(value: Any, name: str = "uuid") -> str:
    """Return the canonical lower-case form of a UUID or raise InvalidSpec."""
    if not isinstance(value, str):
        _fail(name, f"must be a UUID string, got {value!r}")
    try:
        canonical = str(uuidlib.UUID(value))
    except ValueError:
        _fail(name, f"must be a UUID, got {value!r}")
    if canonical != value.lower():
        # Accept only the canonical 8-4-4-4-12 form: a uuid names a directory.
        _fail(name, f"must be a UUID in canonical form, got {value!r}")
    return canonical


def validate_image_id(value: Any, name: str = "image.id") -> str:
    return _str(value, name, _IMAGE_ID_RE, "an image id (letters, digits, '.', '_', '-')")


@dataclass(frozen=True)
class Flavor:
    name: str
    vcpus: int
    memory_mb: int
    root_gb: int
    ephemeral_gb: int = 0
    swap_mb: int = 0

    @classmethod
    def from_dict(cls, d: Any, prefix: str = "flavor.") -> Flavor:
        d = _require_dict(d, prefix.rstrip("."))
        return cls(
            name=_str(_get(d, "name", prefix), prefix + "name", _NAME_RE,
                      "1-63 letters, digits, '.', '_' or '-'"),
            vcpus=_int(_get(d, "vcpus", prefix), prefix + "vcpus", 1, MAX_VCPUS),
            memory_mb=_int(_get(d, "memory_mb", prefix), prefix + "memory_mb", 16,
                           MAX_MEMORY_MB),
            root_gb=_int(_get(d, "root_gb", prefix), prefix + "root_gb", 0, MAX_DISK_GB),
            ephemeral_gb=_int(_get(d, "ephemeral_gb", prefix, False, 0),
                              prefix + "ephemeral_gb", 0, MAX_DISK_GB),
            swap_mb=_int(_get(d, "swap_mb", prefix, False, 0), prefix + "swap_mb", 0,
                         MAX_SWAP_MB),
        )


@dataclass(frozen=True)
class Segment:
    type: str  # flat | vlan | vxlan
    id: int | None
    physical_interface: str | None

    @classmethod
    def from_dict(cls, d: Any, prefix: str) -> Segment:
        d = _require_dict(d, prefix.rstrip("."))
        seg_type = _get(d, "type", prefix)
        if seg_type not in ("flat", "vlan", "vxlan"):
            _fail(prefix + "type", f"must be flat, vlan or vxlan, got {seg_type!r}")
        seg_id = None
        if seg_type != "flat":
            hi = 4094 if seg_type == "vlan" else 16777215
            seg_id = _int(_get(d, "id", prefix), prefix + "id", 1, hi)
        phys = _get(d, "physical_interface", prefix, required=False)
        if phys is not None:
            _str(phys, prefix + "physical_interface", _IFNAME_RE, "a valid interface name")
        return cls(type=seg_type, id=seg_id, physical_interface=phys)


@dataclass(frozen=True)
class Network:
    id: str
    bridge: str
    cidr: str
    gateway: str | None
    dhcp: bool
    segment: Segment | None

    @classmethod
    def from_dict(cls, d: Any, prefix: str) -> Network:
        d = _require_dict(d, prefix.rstrip("."))
        net_id = _str(_get(d, "id", prefix), prefix + "id", _IMAGE_ID_RE, "an identifier")
        bridge = _str(_get(d, "bridge", prefix), prefix + "bridge", _IFNAME_RE,
                      "a valid interface name (at most 15 characters)")
        cidr_raw = _get(d, "cidr", prefix)
        try:
            if not isinstance(cidr_raw, str):  # ipaddress would take an int
                raise TypeError
            cidr = ipaddress.ip_network(cidr_raw, strict=True)
        except (ValueError, TypeError):
            _fail(prefix + "cidr", f"must be a network in CIDR form, got {cidr_raw!r}")
        gateway = _get(d, "gateway", prefix, required=False)
        if gateway is not None:
            _ip_in(gateway, cidr, prefix + "gateway")
        dhcp = _get(d, "dhcp", prefix, required=False, default=False)
        if not isinstance(dhcp, bool):
            _fail(prefix + "dhcp", f"must be true or false, got {dhcp!r}")
        seg = d.get("segment")
        segment = Segment.from_dict(seg, prefix + "segment.") if seg is not None else None
        return cls(id=net_id, bridge=bridge, cidr=str(cidr), gateway=gateway, dhcp=dhcp,
                   segment=segment)


def _ip_in(value: Any, net: ipaddress._BaseNetwork, name: str) -> str:
    try:
        if not isinstance(value, str):  # ipaddress would take an int
            raise TypeError
        addr = ipaddress.ip_address(value)
    except (ValueError, TypeError):
        _fail(name, f"must be an IP address, got {value!r}")
    if addr not in net:
        _fail(name, f"{addr} is not inside {net}")
    return str(addr)


@dataclass(frozen=True)
class Port:
    id: str
    mac: str
    ip: str | None

    @classmethod
    def from_dict(cls, d: Any, prefix: str, network: Network) -> Port:
        d = _require_dict(d, prefix.rstrip("."))
        port_id = _str(_get(d, "id", prefix), prefix + "id", _IMAGE_ID_RE, "an identifier")
        mac = _get(d, "mac", prefix)
        if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac.lower()):
            _fail(prefix + "mac", f"must be a MAC address like fa:16:3e:00:00:01, got {mac!r}")
        if int(mac[:2], 16) & 1:
            _fail(prefix + "mac", f"must be a unicast address, got {mac!r}")
        ip = _get(d, "ip", prefix, required=False)
        if ip is not None:
            ip = _ip_in(ip, ipaddress.ip_network(network.cidr), prefix + "ip")
        return cls(id=port_id, mac=mac.lower(), ip=ip)


@dataclass(frozen=True)
class NetworkAttachment:
    network: Network
    port: Port


@dataclass(frozen=True)
class SecurityGroupRule:
    direction: str
    protocol: str | None
    port_range_min: int | None
    port_range_max: int | None
    remote_ip_prefix: str | None

    @classmethod
    def from_dict(cls, d: Any, prefix: str) -> SecurityGroupRule:
        d = _require_dict(d, prefix.rstrip("."))
        direction = _get(d, "direction", prefix)
        if direction not in ("ingress", "egress"):
            _fail(prefix + "direction", f"must be ingress or egress, got {direction!r}")
        protocol = _get(d, "protocol", prefix, required=False)
        if protocol is not None and protocol not in ("tcp", "udp", "icmp"):
            _fail(prefix + "protocol", f"must be tcp, udp or icmp, got {protocol!r}")
        lo = _get(d, "port_range_min", prefix, required=False)
        hi = _get(d, "port_range_max", prefix, required=False)
        limit = 255 if protocol == "icmp" else 65535
        if lo is not None:
            lo = _int(lo, prefix + "port_range_min", 0, limit)
        if hi is not None:
            hi = _int(hi, prefix + "port_range_max", 0, limit)
        if (lo is not None or hi is not None) and protocol not in ("tcp", "udp", "icmp"):
            _fail(prefix + "protocol", "must be tcp, udp or icmp when a port range is given")
        if lo is not None and hi is not None and lo > hi and protocol != "icmp":
            _fail(prefix + "port_range_min", f"{lo} is greater than port_range_max {hi}")
        remote = _get(d, "remote_ip_prefix", prefix, required=False)
        if remote is not None:
            try:
                if not isinstance(remote, str):  # ipaddress would take an int
                    raise TypeError
                remote = str(ipaddress.ip_network(remote, strict=False))
            except (ValueError, TypeError):
                _fail(prefix + "remote_ip_prefix", f"must be a CIDR, got {remote!r}")
        return cls(direction=direction, protocol=protocol, port_range_min=lo,
                   port_range_max=hi, remote_ip_prefix=remote)


@dataclass(frozen=True)
class SecurityGroup:
    name: str
    rules: tuple[SecurityGroupRule, ...]

    @classmethod
    def from_dict(cls, d: Any, prefix: str) -> SecurityGroup:
        d = _require_dict(d, prefix.rstrip("."))
        name = _str(_get(d, "name", prefix), prefix + "name", _NAME_RE, "a plain name")
        rules = _get(d, "rules", prefix, required=False, default=[])
        if not isinstance(rules, list):
            _fail(prefix + "rules", "must be a list")
        return cls(name=name, rules=tuple(
            SecurityGroupRule.from_dict(r, f"{prefix}rules[{i}].") for i, r in enumerate(rules)))


@dataclass(frozen=True)
class BlockDevice:
    volume_id: str
    device: str
    boot_index: int | None
    driver_volume_type: str
    connection_data: dict

    @classmethod
    def from_dict(cls, d: Any, prefix: str) -> BlockDevice:
        d = _require_dict(d, prefix.rstrip("."))
        vol = _str(_get(d, "volume_id", prefix), prefix + "volume_id", _IMAGE_ID_RE,
                   "an identifier")
        dev = _str(_get(d, "device", prefix), prefix + "device", _DEVICE_RE,
                   "a disk name like vdb")
        boot_index = _get(d, "boot_index", prefix, required=False)
        if boot_index is not None:
            boot_index = _int(boot_index, prefix + "boot_index", 0, 32)
        conn = _require_dict(_get(d, "connection_info", prefix), prefix + "connection_info")
        vtype = _get(conn, "driver_volume_type", prefix + "connection_info.")
        if vtype not in ("iscsi", "rbd", "file", "block"):
            _fail(prefix + "connection_info.driver_volume_type",
                  f"must be iscsi, rbd, file or block, got {vtype!r}")
        data = _require_dict(conn.get("data", {}), prefix + "connection_info.data")
        return cls(volume_id=vol, device=dev, boot_index=boot_index,
                   driver_volume_type=vtype, connection_data=data)


@dataclass(frozen=True)
class InstanceSpec:
    """What the API asked for. Immutable; the agent never edits a spec."""

    uuid: str
    name: str
    flavor: Flavor
    image_id: str | None
    networks: tuple[NetworkAttachment, ...] = ()
    security_groups: tuple[SecurityGroup, ...] = ()
    block_devices: tuple[BlockDevice, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> InstanceSpec:
        d = _require_dict(d, "instance")
        uuid = validate_uuid(_get(d, "uuid", ""), "uuid")
        name = _str(_get(d, "name", ""), "name", _NAME_RE,
                    "1-63 letters, digits, '.', '_' or '-' starting with a letter or digit")
        flavor = Flavor.from_dict(_get(d, "flavor", ""))
        image = d.get("image")
        image_id = None
        if image is not None:
            image = _require_dict(image, "image")
            image_id = validate_image_id(_get(image, "id", "image."))
        networks = []
        for i, n in enumerate(_list(d, "networks")):
            n = _require_dict(n, f"networks[{i}]")
            net = Network.from_dict(_get(n, "network", f"networks[{i}]."),
                                    f"networks[{i}].network.")
            port = Port.from_dict(_get(n, "port", f"networks[{i}]."), f"networks[{i}].port.",
                                  net)
            networks.append(NetworkAttachment(network=net, port=port))
        groups = tuple(SecurityGroup.from_dict(g, f"security_groups[{i}].")
                       for i, g in enumerate(_list(d, "security_groups")))
        bdms = tuple(BlockDevice.from_dict(b, f"block_devices[{i}].")
                     for i, b in enumerate(_list(d, "block_devices")))
        boots_from_volume = any(b.boot_index == 0 for b in bdms)
        if image_id is None and not boots_from_volume:
            _fail("image.id", "is required unless a block device has boot_index 0")
        metadata = d.get("metadata") or {}
        _require_dict(metadata, "metadata")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str) or len(key) > 255 \
                    or len(value) > 255:
                _fail(f"metadata.{key}", "keys and values must be strings of <= 255 chars")
        return cls(uuid=uuid, name=name, flavor=flavor, image_id=image_id,
                   networks=tuple(networks), security_groups=groups, block_devices=bdms,
                   metadata=dict(metadata))

    def to_dict(self) -> dict:
        """The wire form: ``from_dict(spec.to_dict()) == spec``."""
        d = {
            "uuid": self.uuid, "name": self.name,
            "flavor": dataclasses.asdict(self.flavor),
            "image": {"id": self.image_id} if self.image_id else None,
            "networks": [{"network": dataclasses.asdict(a.network),
                          "port": dataclasses.asdict(a.port)} for a in self.networks],
            "security_groups": [{"name": g.name,
                                 "rules": [dataclasses.asdict(r) for r in g.rules]}
                                for g in self.security_groups],
            "block_devices": [{"volume_id": b.volume_id, "device": b.device,
                               "boot_index": b.boot_index,
                               "connection_info": {"driver_volume_type": b.driver_volume_type,
                                                   "data": b.connection_data}}
                              for b in self.block_devices],
            "metadata": dict(self.metadata),
        }
        return d


def _list(d: dict, key: str) -> list:
    value = d.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        _fail(key, f"must be a list, got {type(value).__name__}")
    return value


@dataclass
class Fault:
    """Why an instance is in error: the operation, the step, the message."""

    operation: str
    step: str | None
    message: str
    at: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Instance:
    """The agent's record of one instance: the spec plus its states."""

    spec: InstanceSpec
    host: str
    vm_state: str
    task_state: str | None = None
    power_state: str = "nostate"
    fault: Fault | None = None
    progress: int | None = None
    created_at: str = ""
    updated_at: str = ""
    launched_at: str | None = None

    @property
    def uuid(self) -> str:
        return self.spec.uuid

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict:
        """What get_instance returns over RPC. Volume connection data is left
        out: it may carry credentials."""
        spec = hide_volume_credentials(self.spec.to_dict())
        return {
            "uuid": self.uuid, "name": self.name, "host": self.host,
            "vm_state": self.vm_state, "task_state": self.task_state,
            "power_state": self.power_state,
            "fault": self.fault.to_dict() if self.fault else None,
            "progress": self.progress,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "launched_at": self.launched_at,
            "flavor": spec["flavor"], "image": spec["image"],
            "spec": spec,
        }


@dataclass
class ImageMeta:
    """An image service record, as far as the agent uses it."""

    id: str
    name: str
    disk_format: str
    size: int | None
    hash_algo: str | None = None
    hash_value: str | None = None
    properties: dict = field(default_factory=dict)
    min_disk: int = 0  # GiB
    min_ram: int = 0  # MiB


@dataclass
class SnapshotPlan:
    """How the driver will snapshot an instance, decided (and disk space checked)
    before the image record is created."""

    mode: str  # live | cold (stopped or suspended) | cold-saved (running; managed-saved)
    disk_format: str  # raw | qcow2: the new image's format
    consistency: str  # quiesced | crash-consistent | powered-off
    virtual_size: int  # bytes the guest sees
    allocated_bytes: int  # the root disk's allocation: top layer + base
    needed_bytes: int  # extra space on the snapshots directory at the peak


@dataclass
class HostStats:
    """Capacity and usage of this hypervisor, from libvirt and the disk."""

    hostname: str
    vcpus: int
    memory_mb: int
    memory_mb_reserved: int
    libvirt_version: str
    qemu_version: str
    virt_type: str
    instances_path_free_mb: int
    instances_path_total_mb: int
    image_cache_bytes: int
    image_cache_files: int
    image_cache_hits: int
    image_cache_misses: int
    domains_running: int
    save_files_bytes: int
    save_path_free_mb: int


def hide_volume_credentials(spec: dict) -> dict:
    """A copy of a spec dict for anything that leaves the agent (RPC answers):
    volume connection data may carry credentials (CHAP passwords, cephx keys)."""
    spec = copy.deepcopy(spec)
    for bdm in spec.get("block_devices") or ():
        if isinstance(bdm, dict) and isinstance(bdm.get("connection_info"), dict):
            bdm["connection_info"]["data"] = "<hidden>"
    return spec
