"""The agent's own database: instance records and the journal of operations.

SQLite under ``state_path`` (WAL mode, every write in a transaction), so a
crash leaves either the old or the new row, never half of one. The journal
records each operation and each of its steps with times; after a restart the
manager reads the unfinished ones to reconcile.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from compute_agent import exception, objects

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    uuid TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    host TEXT NOT NULL,
    vm_state TEXT NOT NULL,
    task_state TEXT,
    power_state TEXT NOT NULL,
    fault TEXT,
    progress INTEGER,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    launched_at TEXT
);
CREATE TABLE IF NOT EXISTS operations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_uuid TEXT NOT NULL,
    name TEXT NOT NULL,
    request_id TEXT,
    status TEXT NOT NULL,          -- running | done | failed | refused | interrupted
    started_at TEXT NOT NULL,
    finished_at TEXT,
    message TEXT
);
CREATE INDEX IF NOT EXISTS operations_by_instance ON operations (instance_uuid, id);
CREATE TABLE IF NOT EXISTS steps (
    operation_id INTEGER NOT NULL REFERENCES operations (id),
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,          -- running | done | failed
    started_at TEXT NOT NULL,
    finished_at TEXT,
    message TEXT,
    PRIMARY KEY (operation_id, seq)
);
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_uuid TEXT NOT NULL,
    role TEXT NOT NULL,            -- source | destination
    source TEXT NOT NULL,
    dest TEXT NOT NULL,
    block_migration INTEGER NOT NULL,
    request_id TEXT,
    status TEXT NOT NULL,          -- see live_migration.py
    started_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    details TEXT                   -- JSON: progress figures, outcome
);
CREATE INDEX IF NOT EXISTS migrations_by_instance ON migrations (instance_uuid, id);
"""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


@dataclass
class Step:
    name: str
    status: str
    started_at: str
    finished_at: str | None
    message: str | None


@dataclass
class Operation:
    id: int
    instance_uuid: str
    name: str
    request_id: str | None
    status: str
    started_at: str
    finished_at: str | None
    message: str | None
    steps: list[Step]

    @property
    def last_step(self) -> Step | None:
        return self.steps[-1] if self.steps else None

    def to_dict(self) -> dict:
        return {
            "id": self.id, "name": self.name, "request_id": self.request_id,
            "status": self.status, "started_at": self.started_at,
            "finished_at": self.finished_at, "message": self.message,
            "steps": [vars(s) for s in self.steps],
        }


class Store:
    def __init__(self, state_path: str):
        os.makedirs(state_path, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_path, "compute-agent.sqlite")
        # One connection shared by the worker threads, serialised by a lock:
        # the writes are tiny and SQLite serialises writers anyway.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- instances ---------------------------------------------------------

    def create_instance(self, instance: objects.Instance) -> None:
        instance.created_at = instance.updated_at = now()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM instances WHERE uuid = ?",
                          (instance.uuid,)).fetchone():
                raise exception.InstanceExists(uuid=instance.uuid)
            db.execute(
                "INSERT INTO instances (uuid, spec, host, vm_state, task_state, power_state,"
                " fault, progress, created_at, updated_at, launched_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (instance.uuid, json.dumps(instance.spec.to_dict()), instance.host,
                 instance.vm_state, instance.task_state, instance.power_state,
                 _fault_json(instance.fault), instance.progress, instance.created_at,
                 instance.updated_at, instance.launched_at))

    def get_instance(self, uuid: str) -> objects.Instance:
        with self._lock:
            row = self._db.execute("SELECT * FROM instances WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            raise exception.InstanceNotFound(uuid=uuid)
        return _instance_from_row(row)

    def list_instances(self) -> list[objects.Instance]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM instances ORDER BY created_at").fetchall()
        return [_instance_from_row(r) for r in rows]

    def update_instance(self, uuid: str, expected_task_state: object = ...,
                        **values) -> objects.Instance:
        """Update columns of one instance; with ``expected_task_state``, only if
        the task_state is still that (compare-and-set), else InvalidState."""
        if "fault" in values:
            values["fault"] = _fault_json(values["fault"])
        values["updated_at"] = now()
        with self._tx() as db:
            row = db.execute("SELECT * FROM instances WHERE uuid = ?", (uuid,)).fetchone()
            if row is None:
                raise exception.InstanceNotFound(uuid=uuid)
            if expected_task_state is not ... and row["task_state"] != expected_task_state:
                raise exception.InvalidState(action="update", uuid=uuid,
                                             vm_state=row["vm_state"],
                                             task_state=row["task_state"])
            cols = ", ".join(f"{k} = ?" for k in values)
            db.execute(f"UPDATE instances SET {cols} WHERE uuid = ?",
                       (*values.values(), uuid))
            row = db.execute("SELECT * FROM instances WHERE uuid = ?", (uuid,)).fetchone()
        return _instance_from_row(row)

    def delete_instance(self, uuid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE uuid = ?", (uuid,))

    # --- the journal -------------------------------------------------------

    def start_operation(self, uuid: str, name: str, request_id: str | None,
                        status: str = "running", message: str | None = None) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO operations (instance_uuid, name, request_id, status, started_at,"
                " finished_at, message) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (uuid, name, request_id, status, now(),
                 None if status == "running" else now(), message))
            return cur.lastrowid

    def finish_operation(self, op_id: int, status: str, message: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE operations SET status = ?, finished_at = ?, message = ?"
                       " WHERE id = ?", (status, now(), message, op_id))
            # A step still marked running when its operation ends did not finish.
            db.execute("UPDATE steps SET status = ?, finished_at = ? WHERE operation_id = ?"
                       " AND status = 'running'", ("failed" if status != "done" else "done",
                                                   now(), op_id))

    def start_step(self, op_id: int, name: str) -> int:
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM steps WHERE operation_id = ?",
                             (op_id,)).fetchone()[0]
            db.execute("INSERT INTO steps (operation_id, seq, name, status, started_at)"
                       " VALUES (?, ?, ?, 'running', ?)", (op_id, seq, name, now()))
            return seq

    def finish_step(self, op_id: int, seq: int, status: str, message: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE steps SET status = ?, finished_at = ?, message = ?"
                       " WHERE operation_id = ? AND seq = ?", (status, now(), message, op_id, seq))

    def operations(self, uuid: str | None = None, status: str | None = None,
                   limit: int = 20) -> list[Operation]:
        query, args = "SELECT * FROM operations WHERE 1=1", []
        if uuid is not None:
            query += " AND instance_uuid = ?"
            args.append(uuid)
        if status is not None:
            query += " AND status = ?"
            args.append(status)
        query += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            ops = self._db.execute(query, args).fetchall()
            result = []
            for op in ops:
                steps = self._db.execute("SELECT * FROM steps WHERE operation_id = ? ORDER BY seq",
                                         (op["id"],)).fetchall()
                result.append(Operation(
                    id=op["id"], instance_uuid=op["instance_uuid"], name=op["name"],
                    request_id=op["request_id"], status=op["status"],
                    started_at=op["started_at"], finished_at=op["finished_at"],
                    message=op["message"],
                    steps=[Step(s["name"], s["status"], s["started_at"], s["finished_at"],
                                s["message"]) for s in steps]))
        return result

    # --- live migrations -----------------------------------------------------

    def start_migration(self, uuid: str, role: str, source: str, dest: str,
                        block_migration: bool, request_id: str | None,
                        status: str, details: dict | None = None) -> Migration:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO migrations (instance_uuid, role, source, dest, block_migration,"
                " request_id, status, started_at, updated_at, details)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (uuid, role, source, dest, int(block_migration), request_id, status, now(),
                 now(), json.dumps(details or {})))
            row = db.execute("SELECT * FROM migrations WHERE id = ?",
                             (cur.lastrowid,)).fetchone()
        return _migration_from_row(row)

    def update_migration(self, mig_id: int, status: str | None = None,
                         details: dict | None = None) -> None:
        """Set the status and/or merge ``details`` into the stored ones."""
        with self._tx() as db:
            row = db.execute("SELECT status, details FROM migrations WHERE id = ?",
                             (mig_id,)).fetchone()
            if row is None:
                return
            merged = dict(json.loads(row["details"] or "{}"), **(details or {}))
            db.execute("UPDATE migrations SET status = ?, details = ?, updated_at = ?"
                       " WHERE id = ?", (status or row["status"], json.dumps(merged), now(),
                                         mig_id))

    def get_migration(self, uuid: str, role: str | None = None) -> Migration | None:
        """The latest migration of an instance on this host (in that role)."""
        query, args = "SELECT * FROM migrations WHERE instance_uuid = ?", [uuid]
        if role is not None:
            query += " AND role = ?"
            args.append(role)
        with self._lock:
            row = self._db.execute(query + " ORDER BY id DESC LIMIT 1", args).fetchone()
        return _migration_from_row(row) if row else None


@dataclass
class Migration:
    id: int
    instance_uuid: str
    role: str
    source: str
    dest: str
    block_migration: bool
    request_id: str | None
    status: str
    started_at: str
    updated_at: str
    details: dict

    def to_dict(self) -> dict:
        return dict(vars(self))


def _migration_from_row(row: sqlite3.Row) -> Migration:
    return Migration(
        id=row["id"], instance_uuid=row["instance_uuid"], role=row["role"],
        source=row["source"], dest=row["dest"], block_migration=bool(row["block_migration"]),
        request_id=row["request_id"], status=row["status"], started_at=row["started_at"],
        updated_at=row["updated_at"], details=json.loads(row["details"] or "{}"))


def _fault_json(fault: objects.Fault | None) -> str | None:
    return json.dumps(fault.to_dict()) if fault else None


def _instance_from_row(row: sqlite3.Row) -> objects.Instance:
    fault = json.loads(row["fault"]) if row["fault"] else None
    return objects.Instance(
        spec=objects.InstanceSpec.from_dict(json.loads(row["spec"])),
        host=row["host"], vm_state=row["vm_state"], task_state=row["task_state"],
        power_state=row["power_state"],
        fault=objects.Fault(**fault) if fault else None,
        progress=row["progress"], created_at=row["created_at"],
        updated_at=row["updated_at"], launched_at=row["launched_at"])
