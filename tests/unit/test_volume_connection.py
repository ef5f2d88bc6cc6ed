"""Volume connection data: validation (before anything touches the host) and
the <disk> XML each connector builds, checked on the parsed tree."""

from __future__ import annotations

import base64
import os
import types

import pytest
from lxml import etree

from compute_agent import exception, objects
from compute_agent.virt.libvirt import config
from compute_agent.virt.libvirt.volume import base
from compute_agent.virt.libvirt.volume.attachments import Volumes
from compute_agent.volume import connection

INST = "3f1c3a0e-7d56-4a4b-9b0e-2d9a8f6c1e01"
PASSWORD = "s3cret-chap-pw"
KEY = base64.b64encode(b"0123456789abcdef0123456789ab").decode()


def iscsi_bdm(volume_id="vol-1", device="sdb", chap=True, **data) -> dict:
    d = {"target_portal": "127.0.0.1:3260", "target_iqn": "iqn.2026-11.test.x:vol1",
         "target_lun": 1}
    if chap:
        d.update(auth_method="CHAP", auth_username="user1", auth_password=PASSWORD)
    d.update(data)
    return {"volume_id": volume_id, "device": device, "boot_index": None,
            "connection_info": {"driver_volume_type": "iscsi", "data": d}}


def rbd_bdm(volume_id="vol-2", device="sdc", **data) -> dict:
    d = {"name": "rbd/vol-2", "hosts": ["127.0.0.1"], "ports": ["6789"],
         "auth_enabled": True, "auth_username": "admin", "key": KEY}
    d.update(data)
    return {"volume_id": volume_id, "device": device, "boot_index": None,
            "connection_info": {"driver_volume_type": "rbd", "data": d}}


def bdm_of(d: dict) -> objects.BlockDevice:
    return objects.BlockDevice.from_dict(d, "block_devices[0].")


def vconf(allowed=()):
    return types.SimpleNamespace(allowed_local_volume_dirs=list(allowed))


def parse(d: dict, allowed=()):
    return connection.parse(bdm_of(d), "block_devices[0].", vconf(allowed))


# --- validation -------------------------------------------------------------------

def test_iscsi_with_chap():
    conn = parse(iscsi_bdm())
    assert (conn.host, conn.port, conn.iqn, conn.lun) == (
        "127.0.0.1", 3260, "iqn.2026-11.test.x:vol1", 1)
    assert conn.auth_username == "user1" and conn.auth_password == PASSWORD
    assert PASSWORD not in repr(conn)


@pytest.mark.parametrize("portal, host, port", [
    ("10.0.0.1", "10.0.0.1", 3260), ("[::1]:3261", "::1", 3261),
    ("storage.example.org:3260", "storage.example.org", 3260)])
def test_iscsi_portal_forms(portal, host, port):
    conn = parse(iscsi_bdm(target_portal=portal))
    assert (conn.host, conn.port) == (host, port)


@pytest.mark.parametrize("field, value", [
    ("target_portal", "127.0.0.1:99999"), ("target_portal", "a b:3260"),
    ("target_portal", 3260), ("target_iqn", "not-an-iqn"),
    ("target_iqn", "iqn.2026-11.x:a'/><evil"), ("target_lun", -1), ("target_lun", True),
    ("auth_method", "kerberos"), ("auth_username", "us er"), ("auth_username", None)])
def test_iscsi_bad_fields_are_named(field, value):
    with pytest.raises(exception.InvalidSpec) as info:
        parse(iscsi_bdm(**{field: value}))
    assert f"block_devices[0].connection_info.data.{field}" in str(info.value)


@pytest.mark.parametrize("password", [None, "", "x" * 256, "a\0b", 12345])
def test_bad_chap_password_is_refused_without_echoing_it(password):
    with pytest.raises(exception.InvalidSpec) as info:
        parse(iscsi_bdm(auth_password=password))
    assert "auth_password" in str(info.value) and "value not shown" in str(info.value)
    if isinstance(password, str) and password:
        assert password not in str(info.value)


def test_rbd():
    conn = parse(rbd_bdm(hosts=["127.0.0.1", "10.0.0.2"], ports=["6789", 6790]))
    assert (conn.pool, conn.image) == ("rbd", "vol-2")
    assert conn.hosts == (("127.0.0.1", 6789), ("10.0.0.2", 6790))
    assert conn.key == KEY and KEY not in repr(conn)


@pytest.mark.parametrize("field, value", [
    ("name", "novolume"), ("name", "a/b/c"), ("name", "rbd/../x"), ("hosts", []),
    ("ports", ["6789", "1"]), ("auth_username", "client.admin x"), ("key", "!!notbase64"),
    ("auth_enabled", "yes")])
def test_rbd_bad_fields_are_named(field, value):
    with pytest.raises(exception.InvalidSpec) as info:
        parse(rbd_bdm(**{field: value}))
    assert f"connection_info.data.{field}" in str(info.value)
    assert KEY not in str(info.value)


def test_rbd_auth_needs_a_key_or_an_existing_secret():
    d = rbd_bdm()
    del d["connection_info"]["data"]["key"]
    with pytest.raises(exception.InvalidSpec, match="data.key"):
        parse(d)
    conn = parse(rbd_bdm(key=None, secret_uuid="5b0a3b1c-2f4e-4d6a-8c1b-9e7f6a5d4c3b"))
    assert conn.secret_uuid == "5b0a3b1c-2f4e-4d6a-8c1b-9e7f6a5d4c3b" and conn.key is None


def local_bdm(path, kind="file"):
    return {"volume_id": "vol-l", "device": "sdd", "boot_index": None,
            "connection_info": {"driver_volume_type": kind, "data": {"device_path": path}}}


def test_local_paths_only_inside_allowed_dirs(tmp_path):
    allowed = str(tmp_path / "vols")
    assert parse(local_bdm(f"{allowed}/a.img"), [allowed]).path == f"{allowed}/a.img"
    for bad in (f"{allowed}/../etc/passwd", "relative.img", f"{allowed}//a.img",
                "/etc/shadow", f"{allowed}-other/a.img", allowed):
        with pytest.raises(exception.InvalidSpec, match="device_path"):
            parse(local_bdm(bad), [allowed])
    with pytest.raises(exception.InvalidSpec, match="allowed_local_volume_dirs: none"):
        parse(local_bdm(f"{allowed}/a.img"), [])


def test_local_file_symlink_out_of_the_allowed_dir_is_refused_on_connect(tmp_path):
    allowed = tmp_path / "vols"
    allowed.mkdir()
    (allowed / "ok.img").write_bytes(b"\0" * 512)
    os.symlink("/etc/hostname", allowed / "escape.img")
    ok = parse(local_bdm(str(allowed / "ok.img")), [str(allowed)])
    assert connection.resolve_local_path(ok, [str(allowed)]) == str(allowed / "ok.img")
    bad = parse(local_bdm(str(allowed / "escape.img")), [str(allowed)])
    with pytest.raises(exception.InvalidSpec, match="resolved"):
        connection.resolve_local_path(bad, [str(allowed)])
    block = parse(local_bdm(str(allowed / "ok.img"), "block"), [str(allowed)])
    with pytest.raises(exception.VolumeConnectFailed, match="not a block device"):
        connection.resolve_local_path(block, [str(allowed)])


def spec_with(*bdms, image=True, **flavor) -> objects.InstanceSpec:
    d = {"uuid": INST, "name": "vm",
         "flavor": {"name": "f", "vcpus": 1, "memory_mb": 64, "root_gb": 1, **flavor},
         "block_devices": list(bdms)}
    if image:
        d["image"] = {"id": "img"}
    return objects.InstanceSpec.from_dict(d)


def test_validate_spec_device_and_volume_clashes():
    connection.validate_spec(spec_with(iscsi_bdm(), rbd_bdm()), vconf())
    with pytest.raises(exception.InvalidSpec, match=r"block_devices\[1\].device"):
        connection.validate_spec(spec_with(iscsi_bdm(), rbd_bdm(device="sdb")), vconf())
    with pytest.raises(exception.InvalidSpec, match=r"block_devices\[1\].volume_id"):
        connection.validate_spec(spec_with(iscsi_bdm(), rbd_bdm(volume_id="vol-1")),
                                 vconf())
    with pytest.raises(exception.InvalidSpec, match="vda is already used by a local disk"):
        connection.validate_spec(spec_with(iscsi_bdm(device="vda")), vconf())
    with pytest.raises(exception.InvalidSpec, match="vdb is already used by a local disk"):
        connection.validate_spec(spec_with(iscsi_bdm(device="vdb"), ephemeral_gb=1), vconf())


def test_validate_spec_boot_from_volume():
    root = dict(rbd_bdm(device="sda"), boot_index=0)
    connection.validate_spec(spec_with(root, image=False), vconf())
    with pytest.raises(exception.InvalidSpec, match="image.id"):
        connection.validate_spec(spec_with(root), vconf())
    with pytest.raises(exception.InvalidSpec, match="only one block device"):
        connection.validate_spec(spec_with(root, dict(iscsi_bdm(), boot_index=0),
                                           image=False), vconf())
    with pytest.raises(exception.InvalidSpec, match="ephemeral"):
        connection.validate_spec(spec_with(root, image=False, ephemeral_gb=1), vconf())
    with pytest.raises(exception.InvalidSpec, match="boot_index"):
        connection.validate_spec(spec_with(dict(iscsi_bdm(), boot_index=2)), vconf())


def test_instance_record_over_rpc_hides_connection_data():
    inst = objects.Instance(spec=spec_with(iscsi_bdm(), rbd_bdm()), host="h1",
                            vm_state="active")
    text = repr(inst.to_dict())
    assert PASSWORD not in text and KEY not in text
    assert "vol-1" in text and "iscsi" in text


# --- the <disk> of each connector ------------------------------------------------

class FakeHost:
    def __init__(self):
        self.secrets: dict[str, tuple[str, str, bytes]] = {}

    def define_secret(self, secret_uuid, usage_type, usage_id, description, value):
        self.secrets[secret_uuid] = (usage_type, usage_id, value)

    def delete_secret(self, secret_uuid):
        return self.secrets.pop(secret_uuid, None) is not None

    def secrets_by_usage_prefix(self, prefix):
        return {u: usage for u, (_, usage, _) in self.secrets.items()
                if usage.startswith(prefix)}


@pytest.fixture
def vol_conf(conf, tmp_path):
    conf.set_override("allowed_local_volume_dirs", [str(tmp_path)], group="volume")
    return conf


def disk_tree(vol: config.GuestVolume) -> etree._Element:
    return etree.fromstring(config.volume_disk_xml(vol).encode())


def test_iscsi_disk_and_its_secret(vol_conf):
    host = FakeHost()
    volumes = Volumes(vol_conf, lambda: host)
    bdm = bdm_of(iscsi_bdm())
    el = disk_tree(volumes.disk(INST, bdm))
    assert (el.get("type"), el.find("target").get("bus"), el.find("target").get("dev")) == (
        "network", "scsi", "sdb")
    src = el.find("source")
    assert (src.get("protocol"), src.get("name")) == ("iscsi", "iqn.2026-11.test.x:vol1/1")
    assert (src.find("host").get("name"), src.find("host").get("port")) == ("127.0.0.1",
                                                                              "3260")
    secret_uuid = base.secret_uuid(INST, "vol-1")
    assert el.find("auth").get("username") == "user1"
    assert el.find("auth/secret").attrib == {"type": "iscsi", "uuid": secret_uuid}
    assert (el.findtext("serial"), el.find("alias").get("name")) == ("vol-1", "ua-sdb")
    assert PASSWORD not in config.volume_disk_xml(volumes.disk(INST, bdm))

    volumes.connect(INST, bdm)
    assert host.secrets[secret_uuid] == ("iscsi", f"compute-agent/{INST}/vol-1",
                                         PASSWORD.encode())
    volumes.disconnect(INST, bdm)
    volumes.disconnect(INST, bdm)  # idempotent
    assert host.secrets == {}


def test_iscsi_without_chap_needs_no_secret(vol_conf):
    host = FakeHost()
    volumes = Volumes(vol_conf, lambda: host)
    bdm = bdm_of(iscsi_bdm(chap=False, device="vdb"))
    el = disk_tree(volumes.disk(INST, bdm))
    assert el.find("auth") is None and el.find("target").get("bus") == "virtio"
    volumes.connect(INST, bdm)
    assert host.secrets == {}


def test_rbd_disk_and_ceph_secret_holds_the_raw_key(vol_conf):
    host = FakeHost()
    volumes = Volumes(vol_conf, lambda: host)
    bdm = bdm_of(dict(rbd_bdm(device="sda"), boot_index=0))
    el = disk_tree(volumes.disk(INST, bdm))
    assert (el.find("source").get("protocol"), el.find("source").get("name")) == (
        "rbd", "rbd/vol-2")
    assert el.find("auth/secret").get("type") == "ceph"
    assert el.find("boot").get("order") == "1"
    assert KEY not in config.volume_disk_xml(volumes.disk(INST, bdm))
    volumes.connect(INST, bdm)
    (value,) = [v for _, _, v in host.secrets.values()]
    assert value == base64.b64decode(KEY)


def test_rbd_with_an_operator_secret_leaves_it_alone(vol_conf):
    host = FakeHost()
    volumes = Volumes(vol_conf, lambda: host)
    op_secret = "5b0a3b1c-2f4e-4d6a-8c1b-9e7f6a5d4c3b"
    bdm = bdm_of(rbd_bdm(key=None, secret_uuid=op_secret))
    assert disk_tree(volumes.disk(INST, bdm)).find("auth/secret").get("uuid") == op_secret
    host.secrets[op_secret] = ("ceph", "op", b"k")
    volumes.connect(INST, bdm)
    volumes.disconnect(INST, bdm)
    assert list(host.secrets) == [op_secret]


def test_local_file_disk(vol_conf, tmp_path):
    path = tmp_path / "data.img"
    path.write_bytes(b"\0" * 4096)
    volumes = Volumes(vol_conf, FakeHost)
    el = disk_tree(volumes.disk(INST, bdm_of(dict(local_bdm(str(path)),
                                                  connection_info={
                                                      "driver_volume_type": "file",
                                                      "data": {"device_path": str(path),
                                                               "access_mode": "ro"}}))))
    assert (el.get("type"), el.find("source").get("file")) == ("file", str(path))
    assert el.find("readonly") is not None


def test_domain_xml_boots_from_the_root_volume_on_virtio_scsi(vol_conf):
    volumes = Volumes(vol_conf, FakeHost)
    root = bdm_of(dict(rbd_bdm(device="sda"), boot_index=0))
    cfg = config.GuestConfig(
        uuid=INST, name="instance-x", virt_type="kvm", memory_mb=64, vcpus=1,
        cpu_mode="none", metadata=config.GuestMetadata("vm", "f", None, "h1"),
        volumes=[volumes.disk(INST, root)])
    dom = etree.fromstring(config.to_xml(cfg).encode())
    assert dom.find("os/boot") is None  # per-device boot order instead
    assert dom.find("devices/controller[@type='scsi']").get("model") == "virtio-scsi"
    assert dom.find("devices/disk/boot").get("order") == "1"


def test_domain_without_volumes_keeps_os_boot_and_gets_the_controller_on_request():
    cfg = config.GuestConfig(
        uuid=INST, name="instance-x", virt_type="kvm", memory_mb=64, vcpus=1,
        cpu_mode="none", metadata=config.GuestMetadata("vm", "f", "img", "h1"))
    dom = etree.fromstring(config.to_xml(cfg).encode())
    assert dom.find("os/boot").get("dev") == "hd"
    assert dom.find("devices/controller") is None
    cfg.scsi_controller = True
    dom = etree.fromstring(config.to_xml(cfg).encode())
    assert dom.find("devices/controller").get("model") == "virtio-scsi"
