"""The manager's side of networking: spawn validation and the
update_security_groups cast."""

from __future__ import annotations

import pytest

from compute_agent import exception

NET = {"network": {"id": "n1", "bridge": "br100", "cidr": "10.0.0.0/24", "dhcp": True},
       "port": {"id": "p1", "mac": "fa:16:3e:00:00:01", "ip": "10.0.0.5"}}
WEB = [{"name": "web", "rules": [{"direction": "ingress", "protocol": "tcp",
                                  "port_range_min": 80, "port_range_max": 80}]}]


@pytest.fixture
def applied(driver, monkeypatch):
    """FakeDriver.update_security_groups, recording the groups it was given."""
    seen = []

    def update(instance, journal):
        with journal.step("apply_firewall"):
            seen.append([g.name for g in instance.spec.security_groups])
    monkeypatch.setattr(driver, "update_security_groups", update, raising=False)
    return seen


@pytest.fixture
def with_net(manager, ctxt, make_spec):
    spec = make_spec(networks=[NET])
    manager.spawn(ctxt, spec)
    return spec["uuid"]


def test_update_security_groups_applies_then_records(manager, store, ctxt, with_net,
                                                     applied, notifier):
    manager.update_security_groups(ctxt, with_net, WEB)
    assert applied == [["web"]]
    inst = store.get_instance(with_net)
    assert [g.name for g in inst.spec.security_groups] == ["web"]
    assert inst.vm_state == "active" and inst.task_state is None
    (op, *_) = store.operations(uuid=with_net)
    assert op.name == "update_security_groups" and op.status == "done"
    assert [s.name for s in op.steps] == ["apply_firewall", "save_spec"]
    assert op.message == "security groups: web"
    assert notifier.events()[-1] == "compute.instance.update_security_groups.end"


def test_a_failed_apply_keeps_the_recorded_groups(manager, store, ctxt, with_net, driver,
                                                  monkeypatch):
    def fail(instance, journal):
        with journal.step("apply_firewall"):
            raise exception.FirewallError(reason="iptables-restore said no")
    monkeypatch.setattr(driver, "update_security_groups", fail, raising=False)
    manager.update_security_groups(ctxt, with_net, WEB)
    inst = store.get_instance(with_net)
    assert inst.spec.security_groups == ()
    assert inst.fault.step == "apply_firewall"


@pytest.mark.parametrize("groups", [
    "web",
    [{"name": "web", "rules": [{"direction": "ingress", "protocol": "tcp",
                                "port_range_min": 0}]}],
    [{"name": "web", "rules": [{"direction": "sideways"}]}],
])
def test_bad_groups_are_refused_and_change_nothing(manager, store, ctxt, with_net, applied,
                                                   groups):
    manager.update_security_groups(ctxt, with_net, groups)
    assert applied == []
    (op, *_) = store.operations(uuid=with_net)
    assert op.status == "refused" and "security_groups" in op.message


def test_update_is_refused_while_another_task_runs(manager, store, ctxt, with_net, applied):
    store.update_instance(with_net, task_state="rebooting")
    manager.update_security_groups(ctxt, with_net, WEB)
    assert applied == []
    (op, *_) = store.operations(uuid=with_net)
    assert op.status == "refused" and "task_state=rebooting" in op.message


def test_update_of_a_deleted_instance_is_refused(manager, store, ctxt, with_net, applied):
    manager.delete(ctxt, with_net)
    manager.update_security_groups(ctxt, with_net, WEB)
    assert applied == []
