"""The libvirt snapshot flow's decisions and ordering, with a fake domain: what
prepare() picks, and that a live copy always thaws, ends its job and makes the
domain persistent again, whatever step fails. (The functional tests run the real
thing; their guests have no QEMU guest agent, so quiesce is exercised here.)"""

from __future__ import annotations

import contextlib
import os
import types

import pytest
from oslo_config import cfg

from compute_agent import conf as ca_conf
from compute_agent import exception, objects, states
from compute_agent.virt.libvirt import snapshot
from tests.unit.conftest import MINIMAL_SPEC

MiB = 1024 * 1024
AGENT_CHANNEL = ("<domain><devices><channel type='unix'><target type='virtio' "
                 "name='org.qemu.guest_agent.0'/></channel></devices></domain>")


class FakeGuest:
    def __init__(self, running=True, xml="<domain/>", fail=None, saved=False):
        self.running, self._xml, self.fail, self.saved = running, xml, fail, saved
        self.calls: list[str] = []
        self.job: dict = {}

    def _call(self, name):
        self.calls.append(name)
        if self.fail == name:
            raise exception.HypervisorError(call=name, reason="injected")

    def is_running(self):
        return self.running

    def xml(self):
        return self._xml

    def has_managed_save(self):
        return self.saved

    def inactive_xml(self):
        self._call("inactive_xml")
        return "<domain>saved</domain>"

    def make_transient(self):
        self._call("make_transient")

    def block_copy(self, dev, dest_xml):
        self._call("block_copy")
        self.job = {"cur": 0, "end": 100}

    def block_job(self, dev):
        if self.job:
            self.job = dict(self.job, cur=min(100, self.job["cur"] + 50))
        return dict(self.job)

    def abort_block_job(self, dev):
        self._call("abort_block_job")
        self.job = {}

    def freeze_filesystems(self):
        self._call("freeze")

    def thaw_filesystems(self):
        self._call("thaw")


@pytest.fixture
def conf(tmp_path):
    c = cfg.ConfigOpts()
    ca_conf.register_opts(c)
    c([], project="test")
    c.set_override("host", "h1")
    c.set_override("instances_path", str(tmp_path))
    c.set_override("save_path", str(tmp_path), group="libvirt")
    return c


@pytest.fixture
def driver(conf, tmp_path):
    defined = []

    def define(xml):
        if getattr(driver_obj, "define_fails", False):
            raise exception.HypervisorError(call="defineXML", reason="injected")
        defined.append(xml)

    driver_obj = types.SimpleNamespace(
        conf=conf, instance_dir=lambda uuid: str(tmp_path / uuid),
        host=types.SimpleNamespace(define=define), defined=defined)
    return driver_obj


@pytest.fixture
def instance(tmp_path):
    inst = objects.Instance(spec=objects.InstanceSpec.from_dict(MINIMAL_SPEC), host="h1",
                            vm_state=states.ACTIVE)
    os.makedirs(tmp_path / inst.uuid)
    return inst


@pytest.fixture
def disk(monkeypatch, tmp_path):
    root = snapshot._RootDisk(path=str(tmp_path / "disk"), dev="vda", base="/base",
                              virtual_size=1024 * MiB, top_bytes=64 * MiB,
                              base_bytes=16 * MiB)
    monkeypatch.setattr(snapshot, "_root_disk", lambda *a, **kw: root)
    checks = []
    monkeypatch.setattr(snapshot, "check_free_space",
                        lambda path, needed, purpose, reserve: checks.append((path, needed)))
    monkeypatch.setattr(snapshot.qemu_img, "create_overlay",
                        lambda path, base, size: open(path, "w").close())
    monkeypatch.setattr(snapshot.time, "sleep", lambda s: None)
    root.checks = checks
    return root


def _base(**props):
    return objects.ImageMeta(id="img", name="img", disk_format="raw", size=1,
                             properties=props)


# --- prepare -----------------------------------------------------------------------

@pytest.mark.parametrize("running,fmt,mode,needed_mb", [
    (True, "raw", "live", 64),  # the copy of the top layer
    (True, "qcow2", "live", 80),  # the copy, flattened in place
    (False, "raw", "cold", 0),  # read in place: nothing written, no check
    (False, "qcow2", "cold", 80),  # one converted file
])
def test_prepare_picks_the_flow_and_checks_space(driver, instance, disk, running, fmt, mode,
                                                 needed_mb):
    plan = snapshot.prepare(driver, instance, FakeGuest(running=running),
                            objects.ImageMeta(id="i", name="i", disk_format=fmt, size=1))
    assert (plan.mode, plan.disk_format, plan.needed_bytes) == (mode, fmt, needed_mb * MiB)
    assert plan.consistency == ("crash-consistent" if running else "powered-off")
    assert plan.allocated_bytes == 80 * MiB
    assert disk.checks == ([(snapshot.snapshots_dir(driver.conf), needed_mb * MiB)]
                           if needed_mb else [])


def test_prepare_cold_saved_checks_the_save_path_too(driver, conf, instance, disk):
    conf.set_override("live_snapshot", False, group="libvirt")
    conf.set_override("snapshot_image_format", "qcow2", group="libvirt")
    plan = snapshot.prepare(driver, instance, FakeGuest(), _base())
    assert (plan.mode, plan.disk_format, plan.needed_bytes) == ("cold-saved", "qcow2", 80 * MiB)
    assert [needed for _, needed in disk.checks] == [512 * MiB, 80 * MiB]


def test_prepare_quiesces_only_with_an_agent_channel_and_the_image_asking(driver, instance,
                                                                         disk):
    guest = FakeGuest(xml=AGENT_CHANNEL)
    assert snapshot.prepare(driver, instance, guest, _base()).consistency == "crash-consistent"
    plan = snapshot.prepare(driver, instance, guest, _base(hw_qemu_guest_agent="yes"))
    assert plan.consistency == "quiesced"
    with pytest.raises(exception.QuiesceNotSupported, match="no QEMU guest agent channel"):
        snapshot.prepare(driver, instance, FakeGuest(), _base(
            hw_qemu_guest_agent="yes", os_require_quiesce="yes"))
    with pytest.raises(exception.QuiesceNotSupported, match="hw_qemu_guest_agent is not set"):
        snapshot.prepare(driver, instance, guest, _base(os_require_quiesce="true"))


# --- the live copy ------------------------------------------------------------------

def _live_copy(driver, instance, disk, guest, quiesce=True):
    seen = []
    copy = os.path.join(driver.conf.instances_path, "copy.qcow2")
    snapshot._live_copy(driver, instance, guest, disk, copy, _NullJournal(), quiesce,
                        seen.append)
    return seen


class _NullJournal:
    def step(self, name):
        return contextlib.nullcontext()


def _saved_xml(driver, instance):
    return os.path.join(driver.instance_dir(instance.uuid), snapshot.SAVED_XML)


def test_live_copy_with_quiesce(driver, instance, disk):
    guest = FakeGuest()
    progress = _live_copy(driver, instance, disk, guest)
    assert guest.calls == ["inactive_xml", "make_transient", "block_copy", "freeze",
                           "abort_block_job", "thaw"]
    assert progress == [20, 40]
    assert driver.defined == ["<domain>saved</domain>"]
    assert not os.path.exists(_saved_xml(driver, instance))


@pytest.mark.parametrize("fail,expected", [
    ("freeze", ["freeze", "thaw", "abort_block_job"]),  # thawed, the job ended
    ("abort_block_job", ["freeze", "abort_block_job", "thaw", "abort_block_job"]),
    ("block_copy", ["block_copy"]),  # no job to end
])
def test_live_copy_failure_thaws_ends_the_job_and_redefines(driver, instance, disk, fail,
                                                            expected):
    guest = FakeGuest(fail=fail)
    with pytest.raises(exception.HypervisorError):
        _live_copy(driver, instance, disk, guest)
    calls = guest.calls[guest.calls.index("make_transient") + 1:]
    if fail == "block_copy":
        assert calls == expected
    else:
        assert calls == ["block_copy"] + expected
    assert driver.defined == ["<domain>saved</domain>"]  # persistent again
    assert not os.path.exists(_saved_xml(driver, instance))


def test_live_copy_keeps_the_saved_xml_when_redefining_fails(driver, instance, disk):
    driver.define_fails = True
    with pytest.raises(exception.HypervisorError, match="defineXML"):
        _live_copy(driver, instance, disk, FakeGuest(), quiesce=False)
    with open(_saved_xml(driver, instance)) as f:  # for recover() after a restart
        assert f.read() == "<domain>saved</domain>"


def test_a_mirror_that_never_catches_up_times_out(driver, conf, instance, disk, monkeypatch):
    conf.set_override("snapshot_copy_timeout", 1, group="libvirt")
    clock = iter(range(0, 1000, 1))
    monkeypatch.setattr(snapshot.time, "monotonic", lambda: next(clock))
    guest = FakeGuest()
    guest.block_job = lambda dev: {"cur": 10, "end": 100}
    with pytest.raises(exception.SnapshotFailed, match="did not catch up .* within 1s"):
        _live_copy(driver, instance, disk, guest, quiesce=False)
    assert driver.defined == ["<domain>saved</domain>"]


# --- after a restart ----------------------------------------------------------------

def test_recover_ends_the_job_defines_the_domain_restores_and_cleans(driver, instance,
                                                                      tmp_path):
    inst_dir = driver.instance_dir(instance.uuid)
    guest = FakeGuest(xml=f"<domain><devices><disk type='file'><driver type='qcow2'/><source "
                          f"file='{inst_dir}/disk'/><target dev='vda'/></disk></devices></domain>")
    guest.job = {"cur": 100, "end": 100}
    guest.is_persistent = lambda: False
    guest.saved = True
    guest.start = lambda: guest.calls.append("start")
    driver.host.lookup = lambda uuid: guest
    with open(os.path.join(inst_dir, snapshot.SAVED_XML), "w") as f:
        f.write("<domain>saved</domain>")
    open(os.path.join(inst_dir, snapshot.SAVED_MARK), "w").close()
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    (snaps / f".snap-h1-{os.getpid()}-{instance.uuid}.copy.qcow2").write_bytes(b"x")

    note = snapshot.recover(driver, instance)

    assert guest.calls == ["abort_block_job", "start"]
    assert driver.defined == ["<domain>saved</domain>"]
    assert note == ("ended the copy job of vda; defined the domain again from the XML saved "
                    "before it was made transient; restored the guest the snapshot had saved; "
                    "removed 1 temporary file(s)")
    assert sorted(os.listdir(inst_dir)) == [] and list(snaps.iterdir()) == []


def test_recover_with_nothing_left(driver, instance):
    driver.host.lookup = lambda uuid: None
    assert snapshot.recover(driver, instance) == "nothing to undo"
