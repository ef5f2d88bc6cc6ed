"""Step-by-step record of one operation, handed down to the driver.

    with journal.step("create_disks"):
        ...

Each step is written to the store when it starts and when it ends, and logged,
so an operator (``compute-agent-ctl show``) and the start-up reconciliation can
see exactly how far an operation got.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from oslo_log import log as logging

LOG = logging.getLogger(__name__)


def _pause_points() -> dict[tuple[str, str], float]:
    """Fault injection for the crash tests: COMPUTE_AGENT_PAUSE_BEFORE_STEP=
    "operation:step:seconds[,...]" makes the agent sleep before that step, so a
    test can kill it at a known point. Unset in production: nothing happens."""
    points = {}
    for item in filter(None, os.environ.get("COMPUTE_AGENT_PAUSE_BEFORE_STEP", "").split(",")):
        operation, step, seconds = item.split(":")
        points[(operation, step)] = float(seconds)
    return points


_PAUSE_BEFORE = _pause_points()


class Journal:
    def __init__(self, store, op_id: int, operation: str):
        self._store = store
        self.op_id = op_id
        self.operation = operation
        self.current_step: str | None = None
        self.completed: list[str] = []
        # A sentence for the operation's record, e.g. how a reboot went.
        self.note: str | None = None
        # What the current step produced, kept in its record (e.g. "image <id>").
        self.step_result: str | None = None

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        pause = _PAUSE_BEFORE.get((self.operation, name))
        if pause:
            LOG.warning("Pausing %ss before %s:%s (COMPUTE_AGENT_PAUSE_BEFORE_STEP)", pause,
                        self.operation, name)
            time.sleep(pause)
        seq = self._store.start_step(self.op_id, name)
        self.current_step = name
        self.step_result = None
        started = time.monotonic()
        LOG.debug("%s: step %s started", self.operation, name)
        try:
            yield
        except BaseException as exc:
            self._store.finish_step(self.op_id, seq, "failed", str(exc) or type(exc).__name__)
            LOG.debug("%s: step %s failed after %.3fs: %s", self.operation, name,
                      time.monotonic() - started, exc)
            raise
        self._store.finish_step(self.op_id, seq, "done", self.step_result)
        self.completed.append(name)
        self.current_step = None
        LOG.debug("%s: step %s done in %.3fs", self.operation, name, time.monotonic() - started)

    def event(self, name: str, message: str) -> None:
        """Record something that happened inside a long step (e.g. a live
        migration's allowed downtime raised) as a finished step with a message.
        Safe from another thread: it does not change ``current_step``."""
        seq = self._store.start_step(self.op_id, name)
        self._store.finish_step(self.op_id, seq, "done", message)
        LOG.debug("%s: %s: %s", self.operation, name, message)


class NullJournal(Journal):
    """For driver calls made outside any operation (e.g. from tests)."""

    def __init__(self, operation: str = "adhoc"):
        self.op_id = 0
        self.operation = operation
        self.current_step = None
        self.completed = []
        self.note = None
        self.step_result = None

    def event(self, name: str, message: str) -> None:
        LOG.debug("%s: %s: %s", self.operation, name, message)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.current_step = name
        yield
        self.completed.append(name)
        self.current_step = None
