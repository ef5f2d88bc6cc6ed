"""The live migration monitor against a fake libvirt domain: progress, downtime
steps, the completion timeout's actions and the operator's abort."""

from __future__ import annotations

import threading
import types

import libvirt
import pytest
from oslo_config import cfg

from compute_agent import conf as ca_conf
from compute_agent.journal import NullJournal
from compute_agent.virt import migrate_data as md
from compute_agent.virt.libvirt import migration

GiB = 1024 ** 3


class FakeDomain:
    """A migration job that runs for ``polls`` jobStats calls, then ends."""

    def __init__(self, done: threading.Event, polls: int):
        self.done, self.polls, self.calls = done, polls, []

    def jobStats(self):
        self.polls -= 1
        if self.polls <= 0:
            self.done.set()
        return {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "time_elapsed": 100,
                "data_total": 1000, "data_remaining": 400, "memory_total": 1000,
                "memory_remaining": 400, "memory_bps": 10}

    def migrateSetMaxDowntime(self, ms, flags):
        self.calls.append(("max_downtime", ms))

    def abortJob(self):
        self.calls.append(("abortJob",))
        self.done.set()

    def suspend(self):
        self.calls.append(("suspend",))

    def migrateStartPostCopy(self, flags):
        self.calls.append(("postcopy",))


def _monitor(monkeypatch, polls=40, postcopy=False, abort=None, data_gb=0.05, **opts):
    monkeypatch.setattr(migration, "POLL_INTERVAL", 0.01)
    conf = cfg.ConfigOpts()
    ca_conf.register_opts(conf)
    conf([], project="test")
    for name, value in opts.items():
        conf.set_override(name, value, group="libvirt")
    driver = migration.LiveMigrationMixin()
    driver.conf = conf
    done = threading.Event()
    dom = FakeDomain(done, polls)
    seen: list[md.MigrationProgress] = []
    reason = driver._monitor(types.SimpleNamespace(uuid="u"), dom, done, NullJournal(),
                             int(data_gb * GiB), postcopy, seen.append,
                             abort or threading.Event())
    return reason, dom.calls, seen


def test_progress_and_downtime_steps(monkeypatch):
    reason, calls, seen = _monitor(monkeypatch, polls=80, live_migration_downtime_steps=3,
                                   live_migration_downtime_delay=3,
                                   live_migration_completion_timeout=0)
    assert reason is None
    steps = [ms for name, *ms in calls if name == "max_downtime"]
    assert [s[0] for s in steps] == [166, 277, 388, 500]
    assert seen and seen[-1].percent == 60 and seen[-1].max_downtime_ms == 500


def test_completion_timeout_aborts(monkeypatch):
    reason, calls, _ = _monitor(monkeypatch, live_migration_completion_timeout=1)
    assert ("abortJob",) in calls
    assert reason == "completion timeout (0.0s for 0.05 GiB at 1s/GiB)"


@pytest.mark.parametrize("postcopy, action", [(False, "suspend"), (True, "postcopy")])
def test_completion_timeout_forces_completion(monkeypatch, postcopy, action):
    reason, calls, _ = _monitor(monkeypatch, postcopy=postcopy,
                                live_migration_completion_timeout=1,
                                live_migration_timeout_action="force_complete")
    assert reason is None  # not aborted: the migration is to finish
    assert calls.count((action,)) == 1 and ("abortJob",) not in calls


def test_operator_abort(monkeypatch):
    abort = threading.Event()
    abort.set()
    reason, calls, _ = _monitor(monkeypatch, abort=abort)
    assert reason == md.OPERATOR_ABORT and ("abortJob",) in calls
