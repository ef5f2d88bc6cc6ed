"""compute-agent-ctl: the operator's CLI, built on the RPC client API.

    compute-agent-ctl boot --name web-1 --image cirros --memory 256 --wait
    compute-agent-ctl list | show UUID | delete UUID --wait | console-log UUID
    compute-agent-ctl host-status -f json

It reads the same config file as the agent (for transport_url and the default
host) and talks to one agent through RabbitMQ.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
import uuid as uuidlib

from oslo_config import cfg

from compute_agent import exception, rpc
from compute_agent.conf import CONF
from compute_agent.rpc.api import ComputeAPI


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "") if r.get(c) is not None else "-") for c in columns]
             for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    def fmt(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"
    out = [line, fmt(columns), line] + [fmt(row) for row in cells] + [line]
    return "\n".join(out)


def _kv(d: dict) -> str:
    rows = [{"field": k, "value": json.dumps(v) if isinstance(v, dict | list) else v}
            for k, v in d.items()]
    return _table(rows, ["field", "value"])


def _emit(args, data, columns: list[str] | None = None) -> None:
    if args.format == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    elif isinstance(data, list):
        print(_table(data, columns or sorted(data[0]) if data else []))
    else:
        print(_kv(data))


class Ctl:
    def __init__(self, args):
        self.args = args
        self.host = args.host or CONF.host
        self.api = ComputeAPI(rpc.get_transport(CONF), timeout=args.timeout)
        self.ctxt = self.api.new_context()

    # --- following a task to its end ----------------------------------------

    def wait(self, uuid: str, action: str) -> tuple[dict, dict]:
        """Follow this request's operation until it ends; return the instance
        record and the operation. A refusal raises with the agent's reason."""
        spinner = "|/-\\"
        deadline = time.monotonic() + self.args.wait_timeout
        tick, last = 0, None
        tty = sys.stderr.isatty()
        while time.monotonic() < deadline:
            ops = self.api.get_operations(self.ctxt, self.host, uuid, limit=10)
            mine = next((o for o in ops if o["request_id"] == self.ctxt.request_id), None)
            if mine and mine["status"] == "refused":
                raise exception.Invalid(f"{action} refused: {mine['message']}")
            try:
                inst = self.api.get_instance(self.ctxt, self.host, uuid)
            except exception.InstanceNotFound:
                inst = None
            if mine and mine["status"] != "running" and inst is not None:
                if tty:
                    sys.stderr.write("\r" + " " * 120 + "\r")
                return inst, mine
            step = (mine["steps"][-1]["name"] if mine and mine["steps"] else "queued")
            state = (f"{inst['vm_state']}/{inst['task_state']} ({step})" if inst
                     else "accepted")
            percent = inst.get("progress") if inst and inst["task_state"] else None
            if tty:
                sys.stderr.write(f"\r{spinner[tick % 4]} {action} {uuid}: {state}"
                                 f"{_bar(percent)}   ")
            else:  # a line per change; progress in steps of 10%
                state += _bar(None if percent is None else percent // 10 * 10)
                if state != last:
                    sys.stderr.write(f"{action} {uuid}: {state}\n")
            last = state
            sys.stderr.flush()
            tick += 1
            time.sleep(0.5)
        raise exception.ComputeAgentError(
            f"Gave up waiting for {action} of {uuid} after {self.args.wait_timeout}s")

    def _report(self, inst: dict, op: dict) -> int:
        _emit(self.args, _summary(inst))
        if op["message"] and op["status"] == "done":
            print(f"{op['name']}: {op['message']}", file=sys.stderr)
        if op["status"] == "failed" and not inst.get("fault"):
            # An operation whose failure leaves the instance as it was (volumes).
            print(f"{op['name']} FAILED: {op['message']}", file=sys.stderr)
            return 1
        if inst.get("fault"):
            f = inst["fault"]
            print(f"FAULT in {f['operation']} at step {f['step']}: {f['message']}",
                  file=sys.stderr)
            return 1
        return 0

    # --- commands --------------------------------------------------------------

    def boot(self) -> int:
        a = self.args
        if a.spec:
            with open(a.spec) as f:
                spec = json.load(f)
        else:
            spec = {"uuid": a.uuid or str(uuidlib.uuid4()), "name": a.name,
                    "flavor": {"name": a.flavor_name, "vcpus": a.vcpus,
                               "memory_mb": a.memory, "root_gb": a.root_gb,
                               "ephemeral_gb": a.ephemeral_gb, "swap_mb": a.swap_mb},
                    "image": {"id": a.image}}
        self.api.spawn(self.ctxt, self.host, spec)
        print(f"spawn of {spec['uuid']} sent to {self.host} "
              f"(request {self.ctxt.request_id})", file=sys.stderr)
        if not a.wait:
            print(spec["uuid"])
            return 0
        return self._report(*self.wait(spec["uuid"], "spawn"))

    def delete(self) -> int:
        self.api.delete(self.ctxt, self.host, self.args.uuid)
        if not self.args.wait:
            return 0
        return self._report(*self.wait(self.args.uuid, "delete"))

    def _lifecycle(self, action: str, send) -> int:
        send()
        if not self.args.wait:
            return 0
        return self._report(*self.wait(self.args.uuid, action))

    def reboot(self) -> int:
        kind = "HARD" if self.args.hard else "SOFT"
        return self._lifecycle("reboot", lambda: self.api.reboot(
            self.ctxt, self.host, self.args.uuid, kind))

    def stop(self) -> int:
        return self._lifecycle("power_off", lambda: self.api.power_off(
            self.ctxt, self.host, self.args.uuid, self.args.shutdown_timeout))

    def start(self) -> int:
        return self._lifecycle("power_on", lambda: self.api.power_on(
            self.ctxt, self.host, self.args.uuid))

    def suspend(self) -> int:
        return self._lifecycle("suspend", lambda: self.api.suspend(
            self.ctxt, self.host, self.args.uuid))

    def resume(self) -> int:
        return self._lifecycle("resume", lambda: self.api.resume(
            self.ctxt, self.host, self.args.uuid, self.args.discard_saved_state))

    def set_security_groups(self) -> int:
        if self.args.file == "-":
            groups = json.load(sys.stdin)
        else:
            with open(self.args.file) as f:
                groups = json.load(f)
        if isinstance(groups, dict):  # a whole spec, or {"security_groups": [...]}
            groups = groups.get("security_groups", [])
        return self._lifecycle("update_security_groups", lambda: self.api.update_security_groups(
            self.ctxt, self.host, self.args.uuid, groups))

    def snapshot(self) -> int:
        image_id = self.api.snapshot(self.ctxt, self.host, self.args.uuid, self.args.name)
        print(f"snapshot of {self.args.uuid} into image {image_id} started "
              f"(request {self.ctxt.request_id})", file=sys.stderr)
        print(image_id)
        if not self.args.wait:
            return 0
        _, op = self.wait(self.args.uuid, "snapshot")
        if op["status"] != "done":
            print(f"ERROR: snapshot {op['status']}: {op['message']}", file=sys.stderr)
            return 1
        print(f"snapshot: {op['message']}", file=sys.stderr)
        return 0

    def volume_attach(self) -> int:
        if self.args.spec == "-":
            bdm = json.load(sys.stdin)
        else:
            with open(self.args.spec) as f:
                bdm = json.load(f)
        if isinstance(bdm, dict) and "block_device" in bdm:
            bdm = bdm["block_device"]
        return self._lifecycle("attach_volume", lambda: self.api.attach_volume(
            self.ctxt, self.host, self.args.uuid, bdm))

    def volume_detach(self) -> int:
        return self._lifecycle("detach_volume", lambda: self.api.detach_volume(
            self.ctxt, self.host, self.args.uuid, self.args.volume_id))

    def reset_state(self) -> int:
        _emit(self.args, _summary(self.api.reset_state(self.ctxt, self.host, self.args.uuid,
                                                       self.args.state)))
        return 0

    def migrate(self) -> int:
        """Live-migrate from --host (the source) to DEST; --wait follows it
        with the migration's progress."""
        a = self.args
        self.api.live_migrate(self.ctxt, self.host, a.uuid, a.dest, a.block)
        print(f"live migration of {a.uuid} from {self.host} to {a.dest} sent "
              f"(request {self.ctxt.request_id})", file=sys.stderr)
        if not a.wait:
            return 0
        op = self._follow_migration(a.uuid)
        if op["status"] != "done":
            print(f"ERROR: live migration {op['status']}: {op['message']}", file=sys.stderr)
            return 1
        _emit(a, _summary(self.api.get_instance(self.ctxt, a.dest, a.uuid)))
        print(f"live migration: {op['message']}", file=sys.stderr)
        return 0

    def _follow_migration(self, uuid: str) -> dict:
        """Wait for this request's live migration to end, showing its progress
        (the instance leaves the source's records when it succeeds)."""
        deadline = time.monotonic() + self.args.wait_timeout
        tty, last = sys.stderr.isatty(), None
        while time.monotonic() < deadline:
            ops = self.api.get_operations(self.ctxt, self.host, uuid, limit=10)
            mine = next((o for o in ops if o["request_id"] == self.ctxt.request_id), None)
            if mine and mine["status"] == "refused":
                raise exception.Invalid(f"live migration refused: {mine['message']}")
            if mine and mine["status"] != "running":
                if tty:
                    sys.stderr.write("\r" + " " * 120 + "\r")
                return mine
            line = "accepted"
            if mine:
                line = mine["steps"][-1]["name"] if mine["steps"] else "started"
                with contextlib.suppress(exception.ComputeAgentError):
                    mig = self.api.get_migration(self.ctxt, self.host, uuid)
                    if mig["request_id"] == self.ctxt.request_id:
                        line = _migration_line(mig)
            if tty:
                sys.stderr.write(f"\rlive migration {uuid}: {line}   ")
            elif line != last:
                sys.stderr.write(f"live migration {uuid}: {line}\n")
            last = line
            sys.stderr.flush()
            time.sleep(0.5)
        raise exception.ComputeAgentError(
            f"Gave up waiting for the live migration of {uuid} after {self.args.wait_timeout}s")

    def resize(self) -> int:
        """Resize (or, with the flavor unchanged, cold-migrate) from --host
        (the source) to --dest; --wait follows it to its end."""
        a = self.args
        flavor = dict(self.api.get_instance(self.ctxt, self.host, a.uuid)["flavor"])
        for key, value in (("name", a.flavor_name), ("vcpus", a.vcpus), ("memory_mb", a.memory),
                           ("root_gb", a.root_gb), ("ephemeral_gb", a.ephemeral_gb),
                           ("swap_mb", a.swap_mb)):
            if value is not None:
                flavor[key] = value
        self.api.resize(self.ctxt, self.host, a.uuid, flavor, a.dest)
        print(f"resize of {a.uuid} from {self.host} to {a.dest} sent "
              f"(request {self.ctxt.request_id})", file=sys.stderr)
        if not a.wait:
            return 0
        op = self._follow_op(a.uuid, "resize")
        if op["status"] != "done":
            print(f"ERROR: resize {op['status']}: {op['message']}", file=sys.stderr)
            return 1
        _emit(a, _summary(self.api.get_instance(self.ctxt, a.dest, a.uuid)))
        print(f"resize: {op['message']}", file=sys.stderr)
        return 0

    def confirm_resize(self) -> int:
        return self._resize_end("confirm_resize", self.api.confirm_resize)

    def revert_resize(self) -> int:
        return self._resize_end("revert_resize", self.api.revert_resize)

    def _resize_end(self, action: str, send) -> int:
        """On --host, the destination of the resize."""
        send(self.ctxt, self.host, self.args.uuid)
        print(f"{action} of {self.args.uuid} sent to {self.host}", file=sys.stderr)
        if not self.args.wait:
            return 0
        op = self._follow_op(self.args.uuid, action)
        print(f"{action} {op['status']}: {op['message'] or ''}", file=sys.stderr)
        return 0 if op["status"] == "done" else 1

    def _follow_op(self, uuid: str, action: str) -> dict:
        """Wait for this request's operation on --host to end, showing its
        step and the instance's progress (the record may leave the host)."""
        deadline = time.monotonic() + self.args.wait_timeout
        last = None
        while time.monotonic() < deadline:
            ops = self.api.get_operations(self.ctxt, self.host, uuid, limit=10)
            mine = next((o for o in ops if o["request_id"] == self.ctxt.request_id), None)
            if mine and mine["status"] == "refused":
                raise exception.Invalid(f"{action} refused: {mine['message']}")
            if mine and mine["status"] != "running":
                return mine
            line = (mine["steps"][-1]["name"] if mine and mine["steps"] else "accepted")
            with contextlib.suppress(exception.ComputeAgentError):
                inst = self.api.get_instance(self.ctxt, self.host, uuid)
                if inst.get("progress") is not None:
                    line += _bar(inst["progress"])
            if line != last:
                sys.stderr.write(f"{action} {uuid}: {line}\n")
                sys.stderr.flush()
            last = line
            time.sleep(0.5)
        raise exception.ComputeAgentError(
            f"Gave up waiting for {action} of {uuid} after {self.args.wait_timeout}s")

    def migrate_abort(self) -> int:
        _emit(self.args, self.api.live_migration_abort(self.ctxt, self.host, self.args.uuid))
        return 0

    def list(self) -> int:
        rows = [_summary(i) for i in self.api.list_instances(self.ctxt, self.host,
                                                             self.args.all)]
        _emit(self.args, rows, ["uuid", "name", "vm_state", "task_state", "power_state",
                                "flavor", "image"])
        return 0

    def show(self) -> int:
        inst = self.api.get_instance(self.ctxt, self.host, self.args.uuid)
        ops = self.api.get_operations(self.ctxt, self.host, self.args.uuid, limit=5)
        if self.args.format == "json":
            _emit(self.args, dict(inst, operations=ops))
            return 0
        _emit(self.args, _summary(inst, full=True))
        if inst["task_state"] == "migrating":
            with contextlib.suppress(exception.ComputeAgentError):
                print("live migration:", _migration_line(
                    self.api.get_migration(self.ctxt, self.host, self.args.uuid)))
        for op in ops:
            print(f"\n{op['name']} [{op['status']}] request {op['request_id']} "
                  f"{op['started_at']} -> {op['finished_at'] or '...'}"
                  + (f": {op['message']}" if op["message"] else ""))
            for s in op["steps"]:
                print(f"    {s['name']:<20} {s['status']:<8} {s['started_at']}  "
                      f"{_duration(s['started_at'], s['finished_at']):>9}"
                      + (f"  {s['message']}" if s["message"] else ""))
        return 0

    def console_log(self) -> int:
        print(self.api.get_console_output(self.ctxt, self.host, self.args.uuid,
                                          self.args.lines))
        return 0

    def host_status(self) -> int:
        _emit(self.args, self.api.get_host_status(self.ctxt, self.host))
        return 0


def _duration(start: str, end: str | None) -> str:
    if not end:
        return "..."
    delta = datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(start)
    return f"{delta.total_seconds() * 1000:.0f} ms"


def _bar(percent: int | None, width: int = 20) -> str:
    if percent is None:
        return ""
    filled = width * percent // 100
    return f" [{'#' * filled}{'.' * (width - filled)}] {percent:3d}%"


def _migration_line(mig: dict) -> str:
    """status, a progress bar and the figures of a migration record."""
    p = mig["details"].get("progress") or {}
    line = f"{mig['status']} to {mig['dest']}{_bar(p.get('percent'))}"
    if p:
        mib = 1024 * 1024
        line += (f" memory {p['memory_remaining'] / mib:.1f}/{p['memory_total'] / mib:.1f} "
                 f"MiB left")
        if p.get("disk_total"):
            line += f", disk {p['disk_remaining'] / mib:.1f}/{p['disk_total'] / mib:.1f} MiB"
        line += (f", {(p['memory_bps'] + p['disk_bps']) / mib:.1f} MiB/s, "
                 f"{p['elapsed_ms'] / 1000:.1f}s")
    return line


def _summary(inst: dict, full: bool = False) -> dict:
    out = {k: inst[k] for k in ("uuid", "name", "host", "vm_state", "task_state",
                                "power_state")}
    flavor = inst["flavor"]
    out["flavor"] = (f"{flavor['name']} ({flavor['vcpus']} vcpu, {flavor['memory_mb']} MiB, "
                     f"{flavor['root_gb']} GiB)")
    out["image"] = (inst.get("image") or {}).get("id")
    if full:
        out.update({k: inst[k] for k in ("created_at", "updated_at", "launched_at",
                                         "progress")})
        f = inst.get("fault")
        out["fault"] = f"{f['operation']}/{f['step']}: {f['message']}" if f else None
        out["volumes"] = ", ".join(
            f"{b['volume_id']} ({b['device']}, "
            f"{b['connection_info']['driver_volume_type']}"
            f"{', boot' if b['boot_index'] == 0 else ''})"
            for b in inst.get("spec", {}).get("block_devices", [])) or None
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compute-agent-ctl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", action="append", default=[],
                   help="agent config file(s); default: the usual oslo.config locations")
    p.add_argument("--host", help="agent to talk to (default: [DEFAULT] host)")
    p.add_argument("-f", "--format", choices=["table", "json"], default="table")
    p.add_argument("--timeout", type=int, default=60, help="RPC call timeout (s)")
    p.add_argument("--wait-timeout", type=int, default=600,
                   help="how long --wait follows a task (s)")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("boot", help="spawn an instance")
    b.add_argument("--name", default="instance")
    b.add_argument("--image")
    b.add_argument("--uuid")
    b.add_argument("--flavor-name", default="custom")
    b.add_argument("--vcpus", type=int, default=1)
    b.add_argument("--memory", type=int, default=256, help="MiB")
    b.add_argument("--root-gb", type=int, default=1)
    b.add_argument("--ephemeral-gb", type=int, default=0)
    b.add_argument("--swap-mb", type=int, default=0)
    b.add_argument("--spec", help="a JSON instance spec file instead of the options")
    b.add_argument("--wait", action="store_true", help="follow the spawn to its end")

    d = sub.add_parser("delete", help="delete an instance")
    d.add_argument("uuid")
    d.add_argument("--wait", action="store_true")

    for name, help_text in (("reboot", "reboot (ACPI; --hard: destroy and rebuild)"),
                            ("stop", "power off (clean, forced after a timeout)"),
                            ("start", "power on"),
                            ("suspend", "save memory to disk and stop (managed save)"),
                            ("resume", "restore a suspended instance")):
        lp = sub.add_parser(name, help=help_text)
        lp.add_argument("uuid")
        lp.add_argument("--wait", action="store_true")
        if name == "reboot":
            lp.add_argument("--hard", action="store_true")
        if name == "stop":
            lp.add_argument("--shutdown-timeout", type=int,
                            help="seconds to wait for a clean shutdown (agent default if unset)")
        if name == "resume":
            lp.add_argument("--discard-saved-state", action="store_true",
                            help="throw the saved memory away and cold-boot instead")

    sg = sub.add_parser("set-security-groups",
                        help="replace an instance's security groups (applied atomically)")
    sg.add_argument("uuid")
    sg.add_argument("file", help="JSON: a list of groups as in the spec's security_groups "
                                 "(or an object with that key); '-' reads stdin")
    sg.add_argument("--wait", action="store_true")

    sn = sub.add_parser("snapshot", help="create an image from the root disk (live when "
                                         "running); prints the new image's id")
    sn.add_argument("uuid")
    sn.add_argument("name", help="the new image's name")
    sn.add_argument("--wait", action="store_true",
                    help="follow the copy and upload to their end, with a progress bar")

    va = sub.add_parser("volume-attach",
                        help="attach a volume to a running or stopped instance")
    va.add_argument("uuid")
    va.add_argument("--spec", required=True,
                    help="JSON file: one block device as in the spec's block_devices "
                         "(boot_index null), or an object with that under 'block_device'; "
                         "'-' reads stdin")
    va.add_argument("--wait", action="store_true")
    vd = sub.add_parser("volume-detach", help="detach a volume (waits for the guest to "
                                              "release it; fails if it does not)")
    vd.add_argument("uuid")
    vd.add_argument("volume_id")
    vd.add_argument("--wait", action="store_true")

    rs = sub.add_parser("reset-state", help="force vm_state (then use reboot --hard)")
    rs.add_argument("uuid")
    rs.add_argument("state", choices=["active", "error"])

    mg = sub.add_parser("migrate", help="live-migrate a running instance from --host to DEST")
    mg.add_argument("uuid")
    mg.add_argument("dest", help="the destination host (its agent's host name)")
    mg.add_argument("--block", action="store_true",
                    help="block migration: copy the disks (hosts without shared storage)")
    mg.add_argument("--wait", action="store_true",
                    help="follow it to its end, with the migration's progress")

    ma = sub.add_parser("migrate-abort", help="abort a running live migration (on --host, "
                                              "the source); the guest stays there")
    ma.add_argument("uuid")

    rz = sub.add_parser("resize", help="resize (or cold-migrate, flavor unchanged) an "
                                       "instance from --host to --dest")
    rz.add_argument("uuid")
    rz.add_argument("--dest", required=True, help="the destination host (its agent's name)")
    rz.add_argument("--flavor-name")
    rz.add_argument("--vcpus", type=int)
    rz.add_argument("--memory", type=int, help="MiB")
    rz.add_argument("--root-gb", type=int)
    rz.add_argument("--ephemeral-gb", type=int)
    rz.add_argument("--swap-mb", type=int)
    rz.add_argument("--wait", action="store_true", help="follow it to its end")
    for name, help_text in (("confirm-resize", "confirm a resize (on --host, the destination)"
                                               ": the source's copy is deleted"),
                            ("revert-resize", "revert a resize (on --host, the destination):"
                                              " the instance goes back to the source")):
        rc = sub.add_parser(name, help=help_text)
        rc.add_argument("uuid")
        rc.add_argument("--wait", action="store_true")

    ls = sub.add_parser("list", help="list instances")
    ls.add_argument("--all", action="store_true", help="include deleted instances")

    s = sub.add_parser("show", help="an instance and its recent operations")
    s.add_argument("uuid")

    c = sub.add_parser("console-log", help="tail of the serial console")
    c.add_argument("uuid")
    c.add_argument("--lines", type=int, default=50)

    sub.add_parser("host-status", help="capacity and usage of the host")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    conf_args = []
    for path in args.config_file:
        conf_args += ["--config-file", path]
    CONF(conf_args, project="compute-agent")
    if args.command == "boot" and not args.spec and not args.image:
        print("boot needs --image or --spec", file=sys.stderr)
        return 2
    try:
        return getattr(Ctl(args), args.command.replace("-", "_"))()
    except (exception.ComputeAgentError, cfg.Error) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # RemoteError, MessagingTimeout: say what and where
        print(f"ERROR: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
