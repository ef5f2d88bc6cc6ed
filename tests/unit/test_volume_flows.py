"""Attach/detach flows (virt/libvirt/volume/attachments.py) against a fake guest
and host, the os-brick kernel initiator against a stand-in for os-brick, and
the manager's attach_volume/detach_volume RPCs against the FakeDriver."""

from __future__ import annotations

import dataclasses
import sys
import threading
import types

import pytest

from compute_agent import exception, objects, states
from compute_agent.virt.libvirt.volume import base
from compute_agent.virt.libvirt.volume.attachments import Volumes
from compute_agent.volume import connection
from tests.unit.test_volume_connection import (
    INST,
    KEY,
    PASSWORD,
    FakeHost,
    bdm_of,
    iscsi_bdm,
    rbd_bdm,
)


class FakeRemoval:
    def __init__(self, removed: bool):
        self.removed = removed
        self.closed = False

    def wait(self, timeout):
        return self.removed

    def close(self):
        self.closed = True


class EventHost(FakeHost):
    """Delivers (or not) the device-removed event for each detach request."""

    def __init__(self, guest):
        super().__init__()
        self.guest = guest
        self.waiters = []

    def expect_device_removal(self, uuid, alias):
        w = FakeRemoval(removed=self.guest.releases)
        self.waiters.append(w)
        return w


class FakeGuest:
    def __init__(self, running=True, releases=True):
        self.running = running
        self.releases = releases  # whether the guest lets go on a detach request
        self.live: set[str] = set()
        self.config: set[str] = set()
        self.requests: list[tuple[str, bool, bool]] = []
        self.attach_error: Exception | None = None
        self.controllers_live = ["<controller type='scsi' model='virtio-scsi'/>"]
        self.controllers_config = ["<controller type='scsi' model='virtio-scsi'/>"]

    def is_running(self):
        return self.running

    def _xml(self, live):
        ctrl = self.controllers_live if live else self.controllers_config
        return "<domain><devices>" + "".join(ctrl) + "</devices></domain>"

    def xml(self):
        return self._xml(True)

    def inactive_xml(self):
        return self._xml(False)

    def attach_device(self, xml, live, config=True):
        if self.attach_error:
            raise self.attach_error
        if xml.startswith("<controller"):
            for on, ctrl in ((live, self.controllers_live), (config, self.controllers_config)):
                if on:
                    ctrl.append(xml)
            return
        alias = xml.split("alias name=\"")[1].split('"')[0]
        if live:
            self.live.add(alias)
        if config:
            self.config.add(alias)

    def detach_device(self, xml, live, config):
        alias = xml.split("alias name=\"")[1].split('"')[0]
        self.requests.append((alias, live, config))
        if live and self.releases:
            self.live.discard(alias)
        if config:
            self.config.discard(alias)

    def has_device_alias(self, alias, live):
        return alias in (self.live if live else self.config)

    def volume_disks(self, live):
        return {a: f'<disk><alias name="{a}"/></disk>'
                for a in sorted(self.live if live else self.config)}


@pytest.fixture
def flows(conf):
    conf.set_override("detach_timeout", 1, group="volume")
    conf.set_override("detach_attempts", 3, group="volume")
    guest = FakeGuest()
    host = EventHost(guest)
    inst = objects.Instance(spec=objects.InstanceSpec.from_dict({
        "uuid": INST, "name": "vm", "image": {"id": "img"},
        "flavor": {"name": "f", "vcpus": 1, "memory_mb": 64, "root_gb": 1}}),
        host="h1", vm_state="active")
    return types.SimpleNamespace(volumes=Volumes(conf, lambda: host), guest=guest,
                                 host=host, inst=inst)


def test_attach_live_and_persistent_with_its_secret(flows):
    bdm = bdm_of(iscsi_bdm())
    assert flows.volumes.attach(flows.inst, flows.guest, bdm) == "live"
    assert flows.guest.live == flows.guest.config == {"ua-sdb"}
    assert base.secret_uuid(INST, "vol-1") in flows.host.secrets


def test_attach_to_a_stopped_guest_changes_the_definition_only(flows):
    flows.guest.running = False
    assert flows.volumes.attach(flows.inst, flows.guest, bdm_of(rbd_bdm())) == "config"
    assert (flows.guest.live, flows.guest.config) == (set(), {"ua-sdc"})


def test_failed_attach_leaves_no_secret(flows):
    flows.guest.attach_error = exception.HypervisorError(
        call="attachDeviceFlags", reason="iSCSI: Failed to connect to LUN : "
                                         "Failed to log in to target. Status: "
                                         "Authentication failure(513)")
    with pytest.raises(exception.VolumeAttachFailed, match="Authentication failure") as info:
        flows.volumes.attach(flows.inst, flows.guest, bdm_of(iscsi_bdm()))
    assert PASSWORD not in str(info.value)
    assert flows.host.secrets == {} and flows.guest.config == set()


def test_detach_waits_for_the_event_then_removes_definition_and_secret(flows):
    bdm = bdm_of(iscsi_bdm())
    flows.volumes.attach(flows.inst, flows.guest, bdm)
    assert flows.volumes.detach(flows.inst, flows.guest, bdm) == "live"
    assert flows.guest.requests == [("ua-sdb", True, False), ("ua-sdb", False, True)]
    assert (flows.guest.live, flows.guest.config, flows.host.secrets) == (set(), set(), {})
    assert all(w.closed for w in flows.host.waiters)


def test_detach_the_guest_will_not_let_go_of_fails_with_everything_kept(flows):
    bdm = bdm_of(iscsi_bdm(device="vdb"))
    flows.volumes.attach(flows.inst, flows.guest, bdm)
    flows.guest.releases = False
    with pytest.raises(exception.VolumeDetachFailed,
                       match=r"did not release vdb \(virtio\) after 3 detach requests"):
        flows.volumes.detach(flows.inst, flows.guest, bdm)
    assert flows.guest.requests == [("ua-vdb", True, False)] * 3
    assert flows.guest.live == flows.guest.config == {"ua-vdb"}
    assert base.secret_uuid(INST, "vol-1") in flows.host.secrets  # still connected


def test_detach_when_the_event_is_missed_checks_the_domain(flows):
    bdm = bdm_of(rbd_bdm())
    flows.volumes.attach(flows.inst, flows.guest, bdm)
    flows.host.expect_device_removal = lambda uuid, alias: FakeRemoval(removed=False)
    assert flows.volumes.detach(flows.inst, flows.guest, bdm) == "live"
    assert flows.guest.requests[0] == ("ua-sdc", True, False) and flows.host.secrets == {}


def test_detach_from_a_stopped_guest_or_no_domain(flows):
    bdm = bdm_of(rbd_bdm())
    flows.volumes.attach(flows.inst, flows.guest, bdm)
    flows.guest.running = False
    assert flows.volumes.detach(flows.inst, flows.guest, bdm) == "config"
    assert flows.guest.requests == [("ua-sdc", False, True)]
    assert flows.volumes.detach(flows.inst, None, bdm) == "config"  # idempotent


def test_connect_all_failure_disconnects_what_it_connected(flows, monkeypatch):
    inst = objects.Instance(spec=objects.InstanceSpec.from_dict({
        "uuid": INST, "name": "vm", "image": {"id": "img"},
        "flavor": {"name": "f", "vcpus": 1, "memory_mb": 64, "root_gb": 1},
        "block_devices": [iscsi_bdm(), rbd_bdm()]}), host="h1", vm_state="active")
    real = flows.host.define_secret

    def define(secret_uuid, usage_type, *args):
        if usage_type == "ceph":
            raise exception.HypervisorError(call="secretDefineXML", reason="boom")
        real(secret_uuid, usage_type, *args)
    monkeypatch.setattr(flows.host, "define_secret", define)
    with pytest.raises(exception.VolumeConnectFailed, match="vol-2.*boom"):
        flows.volumes.connect_all(inst)
    assert flows.host.secrets == {}


# --- the kernel initiator through os-brick (not testable for real here) ----------

class FakeConnector:
    calls: list = []

    def connect_volume(self, props):
        self.calls.append(("connect", dict(props)))
        return {"type": "block", "path": "/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-"
                                         "iqn.2026-11.test.x:vol1-lun-1"}

    def disconnect_volume(self, props, info, force=False, ignore_errors=False):
        self.calls.append(("disconnect", info["path"]))
        raise RuntimeError(f"iscsiadm -m node --op update -n node.session.auth.password "
                           f"-v {props['auth_password']} exited 21")


@pytest.fixture
def os_brick(monkeypatch):
    factory_args = []

    class InitiatorConnector:
        @staticmethod
        def factory(protocol, root_helper, **kw):
            factory_args.append((protocol, root_helper, kw))
            return FakeConnector()

    mod = types.ModuleType("os_brick.initiator.connector")
    mod.InitiatorConnector = InitiatorConnector
    monkeypatch.setitem(sys.modules, "os_brick", types.ModuleType("os_brick"))
    monkeypatch.setitem(sys.modules, "os_brick.initiator",
                        types.ModuleType("os_brick.initiator"))
    monkeypatch.setitem(sys.modules, "os_brick.initiator.connector", mod)
    from compute_agent.virt.libvirt.volume.iscsi_kernel import KernelIscsiDriver
    monkeypatch.setattr(KernelIscsiDriver, "_connector", None)
    FakeConnector.calls = []
    return factory_args


def test_kernel_initiator_is_selected_by_config(conf, os_brick):
    conf.set_override("iscsi_initiator", "kernel", group="volume")
    host = FakeHost()
    volumes = Volumes(conf, lambda: host)
    bdm = bdm_of(iscsi_bdm())
    vol = volumes.disk(INST, bdm)
    assert (vol.source_type, vol.path) == (
        "block", "/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-iqn.2026-11.test.x:vol1-lun-1")
    assert vol.secret_uuid is None and host.secrets == {}  # iscsid holds the password
    volumes.connect(INST, bdm)
    assert os_brick[0][0] == "ISCSI" and os_brick[0][2]["use_multipath"] is False
    assert FakeConnector.calls[0] == ("connect", {
        "target_portal": "127.0.0.1:3260", "target_iqn": "iqn.2026-11.test.x:vol1",
        "target_lun": 1, "auth_method": "CHAP", "auth_username": "user1",
        "auth_password": PASSWORD})
    with pytest.raises(exception.VolumeError) as info:
        volumes.disconnect(INST, bdm)
    assert PASSWORD not in str(info.value)  # os-brick's error quoted the command


def test_kernel_initiator_without_os_brick_says_so(conf, monkeypatch):
    conf.set_override("iscsi_initiator", "kernel", group="volume")
    monkeypatch.setitem(sys.modules, "os_brick", None)
    from compute_agent.virt.libvirt.volume.iscsi_kernel import KernelIscsiDriver
    monkeypatch.setattr(KernelIscsiDriver, "_connector", None)
    with pytest.raises(exception.VolumeConnectFailed, match="needs the os-brick package"):
        Volumes(conf, FakeHost).connect(INST, bdm_of(iscsi_bdm()))


# --- the manager's RPCs ----------------------------------------------------------

@pytest.fixture
def active(manager, ctxt, make_spec, driver):
    spec = make_spec(block_devices=[iscsi_bdm()])
    manager.spawn(ctxt, spec)
    driver.calls.clear()
    return spec["uuid"]


def last_op(store, uuid):
    return store.operations(uuid=uuid, limit=1)[0]


def test_spawn_with_volumes_connects_them(manager, store, driver, active):
    inst = store.get_instance(active)
    assert inst.vm_state == states.ACTIVE
    assert driver.connected == {(active, "vol-1")}
    (op,) = store.operations(uuid=active)
    assert "connect_volumes" in [s.name for s in op.steps]


def test_boot_from_volume_needs_no_image(manager, store, driver, ctxt, make_spec):
    spec = make_spec(block_devices=[dict(rbd_bdm(device="sda"), boot_index=0)])
    del spec["image"]
    manager.spawn(ctxt, spec)
    inst = store.get_instance(spec["uuid"])
    assert inst.vm_state == states.ACTIVE and inst.spec.image_id is None
    assert driver.disks[spec["uuid"]] == []
    names = [s.name for s in last_op(store, spec["uuid"]).steps]
    assert "check_image" not in names and "fetch_image" not in names


def test_spawn_with_a_bad_volume_is_refused(manager, store, driver, ctxt, make_spec):
    spec = make_spec(block_devices=[iscsi_bdm(target_iqn="bogus")])
    manager.spawn(ctxt, spec)
    op = last_op(store, spec["uuid"])
    assert op.status == "refused" and "target_iqn" in op.message
    assert driver.calls == []


def test_attach_then_detach_updates_the_stored_spec(manager, store, driver, ctxt, active):
    manager.attach_volume(ctxt, active, rbd_bdm())
    op = last_op(store, active)
    assert (op.status, op.message) == ("done", "volume vol-2 attached as sdc (live)")
    assert [s.name for s in op.steps] == ["attach_volume", "save_spec"]
    assert [b.volume_id for b in store.get_instance(active).spec.block_devices] == [
        "vol-1", "vol-2"]
    assert driver.attached[active] == ["vol-1", "vol-2"]

    manager.detach_volume(ctxt, active, "vol-1")
    op = last_op(store, active)
    assert (op.status, op.message) == ("done", "volume vol-1 detached from sdb (live)")
    assert [b.volume_id for b in store.get_instance(active).spec.block_devices] == ["vol-2"]
    assert driver.connected == {(active, "vol-2")}


def test_detach_the_guest_holds_fails_and_keeps_the_volume(manager, store, driver, ctxt,
                                                          active):
    driver.sticky_volumes.add("vol-1")
    manager.detach_volume(ctxt, active, "vol-1")
    op = last_op(store, active)
    assert op.status == "failed" and "still attached" in op.message
    inst = store.get_instance(active)
    assert (inst.vm_state, inst.task_state) == (states.ACTIVE, None)
    assert [b.volume_id for b in inst.spec.block_devices] == ["vol-1"]
    assert driver.attached[active] == ["vol-1"]


def test_stopped_instance_attach_is_persistent_only(manager, store, driver, ctxt, active):
    manager.power_off(ctxt, active, 0)
    manager.attach_volume(ctxt, active, rbd_bdm())
    assert last_op(store, active).message == "volume vol-2 attached as sdc (config)"


@pytest.mark.parametrize("bdm, reason", [
    (iscsi_bdm(), "volume vol-1 is already attached"),
    (iscsi_bdm(volume_id="vol-9"), "sdb is already used by volume vol-1"),
    (iscsi_bdm(volume_id="vol-9", device="vda"), "vda is already used by a local disk"),
    (dict(iscsi_bdm(volume_id="vol-9", device="sdz"), boot_index=0), "boot_index"),
    (iscsi_bdm(volume_id="vol-9", device="sdz", target_portal="x y"), "target_portal"),
    ({"volume_id": "v"}, "block_device.device"),
])
def test_attach_refusals_change_nothing(manager, store, driver, ctxt, active, bdm, reason):
    manager.attach_volume(ctxt, active, bdm)
    op = last_op(store, active)
    assert op.status == "refused" and reason in op.message
    assert driver.calls == []
    assert len(store.get_instance(active).spec.block_devices) == 1


def test_detach_refusals(manager, store, driver, ctxt, make_spec, active):
    manager.detach_volume(ctxt, active, "vol-404")
    assert "vol-404" in last_op(store, active).message
    spec = make_spec(block_devices=[dict(rbd_bdm(device="sda"), boot_index=0)])
    del spec["image"]
    manager.spawn(ctxt, spec)
    manager.detach_volume(ctxt, spec["uuid"], "vol-2")
    op = last_op(store, spec["uuid"])
    assert op.status == "refused" and "root volume" in op.message
    manager.suspend(ctxt, active)
    manager.detach_volume(ctxt, active, "vol-1")
    assert "vm_state=suspended" in last_op(store, active).message
    assert driver.methods_called(active) == ["suspend"]


def test_hard_reboot_and_delete_reconnect_and_disconnect(manager, store, driver, ctxt,
                                                         active):
    driver.connected.clear()
    manager.reboot(ctxt, active, "HARD")
    assert driver.connected == {(active, "vol-1")}
    assert "connect_volumes" in [s.name for s in last_op(store, active).steps]
    manager.delete(ctxt, active)
    assert driver.connected == set()
    assert "disconnect_volumes" in [s.name for s in last_op(store, active).steps]


def test_secrets_never_reach_the_store_log_or_notifications(manager, notifier, ctxt,
                                                             make_spec, caplog):
    spec = make_spec(block_devices=[iscsi_bdm(), rbd_bdm()])
    manager.spawn(ctxt, spec)
    manager.attach_volume(ctxt, spec["uuid"], rbd_bdm(volume_id="vol-3", device="sdd",
                                                      name="rbd/vol-3"))
    text = repr(notifier.sent) + caplog.text + repr(manager.get_instance(ctxt, spec["uuid"]))
    assert PASSWORD not in text and KEY not in text


def test_host_device_removal_waiter():
    from compute_agent.virt.libvirt.host import Host
    host = Host("test:///default")
    dom = types.SimpleNamespace(UUIDString=lambda: INST, name=lambda: "d")
    w = host.expect_device_removal(INST, "ua-sdb")
    threading.Timer(0.05, host._on_device_removed, (None, dom, "ua-sdb", None)).start()
    assert w.wait(5) is True
    w.close()
    w = host.expect_device_removal(INST, "ua-sdb")
    host._on_device_removal_failed(None, dom, "ua-sdb", None)
    assert w.wait(5) is False
    w.close()
    assert host._device_waiters == {}


def test_used_devices():
    spec = objects.InstanceSpec.from_dict({
        "uuid": INST, "name": "vm", "image": {"id": "img"},
        "flavor": {"name": "f", "vcpus": 1, "memory_mb": 64, "root_gb": 1, "swap_mb": 8},
        "block_devices": [iscsi_bdm()]})
    devices, vols = connection.used_devices(spec)
    assert set(devices) == {"vda", "vdb", "sdb"} and vols == {"vol-1"}


def test_reconcile_finishes_an_interrupted_reboot_of_a_volume_booted_instance(
        manager, store, driver, make_spec):
    spec = objects.InstanceSpec.from_dict(make_spec(
        image=None, block_devices=[dict(rbd_bdm(device="sda"), boot_index=0)]))
    store.create_instance(objects.Instance(spec=spec, host="h1", vm_state=states.ACTIVE,
                                           task_state=states.REBOOTING_HARD))
    op = store.start_operation(spec.uuid, "reboot", "req-before-crash")
    store.finish_step(op, store.start_step(op, "destroy_domain"), "done")
    store.start_step(op, "connect_volumes")
    manager.reconcile()
    inst = store.get_instance(spec.uuid)
    assert (inst.vm_state, inst.task_state) == (states.ACTIVE, None)
    assert driver.connected == {(spec.uuid, "vol-2")} and driver.guests[spec.uuid] == "running"


def test_reconcile_undoes_an_attach_cut_short(flows):
    """The disk and the secret of a volume the record does not have go."""
    with_vol = dataclasses.replace(flows.inst, spec=dataclasses.replace(
        flows.inst.spec, block_devices=(bdm_of(iscsi_bdm()),)))
    flows.volumes.attach(with_vol, flows.guest, bdm_of(iscsi_bdm()))
    assert flows.guest.live == {"ua-sdb"} and flows.host.secrets

    assert flows.volumes.reconcile(flows.inst, flows.guest) == []  # the record has none

    assert flows.guest.live == set() and flows.guest.config == set()
    assert flows.host.secrets == {}


def test_reconcile_finishes_a_detach_cut_short_and_keeps_the_rest(flows):
    """A recorded volume already gone from the domain is disconnected and
    returned; a recorded volume still there keeps its disk and secret."""
    inst = dataclasses.replace(flows.inst, spec=dataclasses.replace(
        flows.inst.spec, block_devices=(bdm_of(iscsi_bdm()), bdm_of(rbd_bdm()))))
    for bdm in inst.spec.block_devices:
        flows.volumes.attach(inst, flows.guest, bdm)
    flows.guest.live.discard("ua-sdb")  # the detach got this far
    flows.guest.config.discard("ua-sdb")

    assert flows.volumes.reconcile(inst, flows.guest) == ["vol-1"]

    assert flows.guest.live == {"ua-sdc"} and flows.guest.config == {"ua-sdc"}
    assert [usage for _, usage, _ in flows.host.secrets.values()] == [
        base.secret_usage(INST, "vol-2")]
    assert flows.guest.requests == []  # nothing the record has was detached


def _interrupted(store, uuid: str, op_name: str) -> None:
    store.update_instance(uuid, task_state=states.task_state_for(op_name))
    op = store.start_operation(uuid, op_name, "req-before-crash")
    store.start_step(op, op_name)


def test_reconcile_of_an_interrupted_attach_rolls_it_back(manager, store, driver, active):
    driver.attached[active].append("vol-2")  # in the domain, never recorded
    driver.connected.add((active, "vol-2"))
    _interrupted(store, active, "attach_volume")

    manager.reconcile()

    inst = store.get_instance(active)
    assert (inst.vm_state, inst.task_state, inst.fault) == (states.ACTIVE, None, None)
    assert [b.volume_id for b in inst.spec.block_devices] == ["vol-1"]
    assert driver.attached[active] == ["vol-1"] and driver.connected == {(active, "vol-1")}
    ops = store.operations(uuid=active, limit=2)
    assert (ops[0].name, ops[0].status, ops[1].status) == ("attach_volume", "done",
                                                           "interrupted")
    assert ops[0].message == "volumes match the record"


def test_reconcile_of_an_interrupted_detach_finishes_it(manager, store, driver, active):
    driver.attached[active].remove("vol-1")  # gone from the domain, still recorded
    _interrupted(store, active, "detach_volume")

    manager.reconcile()

    inst = store.get_instance(active)
    assert (inst.vm_state, inst.task_state) == (states.ACTIVE, None)
    assert inst.spec.block_devices == ()
    assert driver.connected == set()
    op = store.operations(uuid=active, limit=1)[0]
    assert (op.status, op.message) == ("done",
                                       "volumes match the record; detach of vol-1 finished")


def test_client_api_checks_volume_fields_before_sending(make_spec):
    from compute_agent.rpc.api import ComputeAPI
    sent = []
    api = object.__new__(ComputeAPI)
    api._client = types.SimpleNamespace(prepare=lambda **kw: types.SimpleNamespace(
        cast=lambda ctxt, method, **args: sent.append(method)))
    with pytest.raises(exception.InvalidSpec, match="block_device.connection_info.data"):
        api.attach_volume(None, "h1", INST, iscsi_bdm(target_iqn="bogus"))
    with pytest.raises(exception.InvalidSpec, match=r"block_devices\[0\].*data.name"):
        api.spawn(None, "h1", make_spec(block_devices=[rbd_bdm(name="x")]))
    assert sent == []
    local = {"volume_id": "v", "device": "sdd", "boot_index": None, "connection_info": {
        "driver_volume_type": "file", "data": {"device_path": "/anywhere/x.img"}}}
    api.attach_volume(None, "h1", INST, local)  # the agent's config decides on paths
    api.detach_volume(None, "h1", INST, "v")
    assert sent == ["attach_volume", "detach_volume"]


def test_attach_adds_a_virtio_scsi_controller_to_an_older_domain(flows):
    flows.guest.controllers_live, flows.guest.controllers_config = [], []
    flows.volumes.attach(flows.inst, flows.guest, bdm_of(iscsi_bdm()))
    assert flows.guest.controllers_live == flows.guest.controllers_config == [
        "<controller type='scsi' index='0' model='virtio-scsi'/>"]
    flows.volumes.attach(flows.inst, flows.guest, bdm_of(rbd_bdm()))  # not twice
    assert len(flows.guest.controllers_live) == 1
