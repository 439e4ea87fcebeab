"""The node's long-running threads: one loop class, one error policy, a heartbeat.

Every background thread of the node (the scheduler, each worker's scoring and
results threads, the outbox) survives any error of a step: the index failing
is logged as a warning, anything else at ERROR with the traceback (never the
exception's message, which may quote data); either way the thread pauses,
longer after each failure in a row, and tries again. Each thread's state is in
the index's ``threads`` table (``running``; ``failing`` with the error while
its steps fail; ``stopped``), with a heartbeat that a thread of the process
writes every :data:`BEAT_SECONDS` while the thread is alive, so ``dicom-node
status`` can say when one is failing or its process is gone.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import ClassVar

from sqlalchemy import delete, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from dicom_node import metrics
from dicom_node.errors import IndexUnavailableError
from dicom_node.index import IndexDB, ThreadRecord, ThreadState, utc_now
from dicom_node.leases import backoff, owner_name, process_gone
from dicom_node.log import describe_exception

__all__ = [
    "BEAT_SECONDS",
    "FIRST_PAUSE",
    "LONGEST_PAUSE",
    "Loop",
    "ThreadHealth",
    "forget_gone_threads",
    "lower_thread_priority",
    "report_failure",
]

logger = logging.getLogger(__name__)

# Seconds between two heartbeats of a thread that is well.
BEAT_SECONDS = 10.0
# Pause after a step failed, doubling with each failure in a row up to the longest.
FIRST_PAUSE = 1.0
LONGEST_PAUSE = 60.0
# Rows of threads silent for this long are forgotten when a process starts.
_FORGET_AFTER = timedelta(days=7)


class ThreadHealth:
    """A thread's row in the index's ``threads`` table.

    The thread writes its state when it changes (started, failing, well
    again, stopped); a heartbeat thread of the process writes every
    :data:`BEAT_SECONDS` that it is alive, also during a long step (a slow
    peer, a big study). Writing never raises: when the index fails, the
    thread goes on and the next write tries again (a lost row is written anew).

    Parameters
    ----------
    index
        The index; None keeps nothing (a thread outside a node).
    name
        The thread's name.
    """

    _registry: ClassVar[set[ThreadHealth]] = set()
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()
    _beater: ClassVar[threading.Thread | None] = None

    def __init__(self, index: IndexDB | None, name: str) -> None:
        self.index = index
        self.name = name
        self.owner = owner_name(name)
        self.state = ThreadState.RUNNING
        self.started_at = utc_now()
        self.failing_since: datetime | None = None
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None

    def started(self) -> None:
        """Record that the calling thread runs (replacing an earlier thread's row)."""
        self._thread = threading.current_thread()
        self.state, self.started_at = ThreadState.RUNNING, utc_now()
        self.failing_since = self.last_error = None
        self._write(self._upsert)
        if self.index is not None:
            with self._registry_lock:
                self._registry.add(self)
                if ThreadHealth._beater is None:
                    ThreadHealth._beater = threading.Thread(
                        target=_beat_forever, name="heartbeat", daemon=True
                    )
                    ThreadHealth._beater.start()

    def recovered(self) -> None:
        """Record that a step worked after failures."""
        if self.state != ThreadState.FAILING:
            return
        self.state, self.failing_since, self.last_error = (
            ThreadState.RUNNING,
            None,
            None,
        )
        self._write(self._upsert)

    def failing(self, exc: BaseException) -> None:
        """Record that the thread's last step failed with ``exc``."""
        if self.state != ThreadState.FAILING:
            self.failing_since = utc_now()
        self.state = ThreadState.FAILING
        self.last_error = describe_exception(exc)[:500]
        self._write(self._upsert)

    def stopped(self) -> None:
        """Record that the thread was stopped cleanly."""
        self.state = ThreadState.STOPPED
        with self._registry_lock:
            self._registry.discard(self)
        self._write(self._upsert)

    def _upsert(self, session: Session) -> None:
        values = {
            "name": self.name[:64],
            "state": self.state,
            "started_at": self.started_at,
            "beat_at": utc_now(),
            "failing_since": self.failing_since,
            "last_error": self.last_error,
        }
        changed = session.execute(
            update(ThreadRecord)
            .where(ThreadRecord.owner == self.owner)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if getattr(changed, "rowcount", 0) == 0:
            session.add(ThreadRecord(owner=self.owner, **values))

    def _write(self, work: Callable[[Session], None]) -> None:
        if self.index is None:
            return
        try:
            self.index.run(work)
        except Exception as exc:  # noqa: BLE001 - the thread's work comes first
            logger.debug("%s: health not written: %s", self.name, type(exc).__name__)

    @classmethod
    def beat_all(cls) -> None:
        """Write that each registered thread that is alive still is."""
        with cls._registry_lock:
            alive = [
                h
                for h in cls._registry
                if h._thread is not None and h._thread.is_alive()
            ]
        by_index: dict[int, list[ThreadHealth]] = {}
        for health in alive:
            by_index.setdefault(id(health.index), []).append(health)
        for group in by_index.values():

            def work(session: Session, group: list[ThreadHealth] = group) -> None:
                for health in group:
                    health._upsert(session)

            group[0]._write(work)


def _beat_forever() -> None:
    while True:
        time.sleep(BEAT_SECONDS)
        try:
            ThreadHealth.beat_all()
        except Exception as exc:  # noqa: BLE001 - the heartbeat must go on
            logger.debug("heartbeat failed: %s", type(exc).__name__)
        metrics.process_figures()


def forget_gone_threads(index: IndexDB) -> int:
    """Delete the rows of this host's ended processes' threads, and long-silent ones.

    Parameters
    ----------
    index
        The index.

    Returns
    -------
    int
        How many rows were deleted.
    """

    def work(session: Session) -> int:
        rows = session.execute(
            select(ThreadRecord.id, ThreadRecord.owner, ThreadRecord.beat_at)
        ).all()
        old = utc_now() - _FORGET_AFTER
        gone = [i for i, owner, beat in rows if process_gone(owner) or beat < old]
        if gone:
            session.execute(delete(ThreadRecord).where(ThreadRecord.id.in_(gone)))
        return len(gone)

    return index.run(work)


class Loop:
    """A daemon thread that calls :meth:`step` until stopped, resting when idle.

    Parameters
    ----------
    name
        The thread's name (also its lease owner's last part).
    index
        The index the thread's health is written to; None: not written.
    idle
        Seconds to rest after a step that found nothing to do (or until
        :attr:`wake` is set).
    """

    def __init__(self, name: str, index: IndexDB | None, idle: float = 0.5) -> None:
        self.name = name
        self.idle = idle
        self.health = ThreadHealth(index, name)
        self._stop = threading.Event()
        # Set by whoever queues work for this thread, so it does not wait out
        # its idle time (other processes' work is found by polling).
        self.wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop and wait for it (it finishes its current step)."""
        self._stop.set()
        self.wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        """Return whether the thread runs."""
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (without asking it to)."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def step(self) -> bool:
        """Do one piece of work; return whether there was any."""
        raise NotImplementedError

    def _run(self) -> None:
        self.health.started()
        self.run_steps()
        self.health.stopped()

    def run_steps(self) -> None:
        """Call :meth:`step` until stopped, surviving any error it raises."""
        failures = 0
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception as exc:  # noqa: BLE001 - the thread must go on
                failures += 1
                pause = backoff(failures, FIRST_PAUSE, LONGEST_PAUSE)
                report_failure(
                    self.name, exc, failures, f"trying again in {pause:.1f} s"
                )
                self.health.failing(exc)
                self._stop.wait(pause)
                continue
            if failures:
                logger.warning(
                    "%s: working again after %d failure(s)", self.name, failures
                )
                failures = 0
                self.health.recovered()
            if not busy and not self._stop.is_set():
                self.wake.wait(self.idle)
                self.wake.clear()


def report_failure(name: str, exc: BaseException, failures: int, then: str) -> None:
    """Log a failed step of thread ``name``: the index as a warning, else the traceback.

    Parameters
    ----------
    name
        The thread.
    exc
        What the step raised.
    failures
        Failures in a row so far.
    then
        What happens next, e.g. "trying again in 2.0 s".
    """
    if _index_unavailable(exc):
        logger.warning(
            "%s: index unavailable (%s); %s (failure %d in a row)",
            name,
            type(exc).__name__,
            then,
            failures,
        )
    else:
        logger.error(
            "%s: unexpected %s; %s (failure %d in a row)",
            name,
            describe_exception(exc),
            then,
            failures,
            exc_info=exc,
        )


def _index_unavailable(exc: BaseException) -> bool:
    """Return whether ``exc`` says the index cannot be reached or is busy.

    Anything else from the database (a unique key, a statement it refuses) is
    the node's own error and is logged as one, with its traceback.
    """
    if isinstance(exc, IndexUnavailableError | OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def lower_thread_priority(steps: int) -> None:
    """Lower the calling thread's CPU priority by ``steps`` nice steps (Linux).

    Threads torch starts from this thread afterwards inherit it. Elsewhere, or
    when the system refuses, nothing changes.

    Parameters
    ----------
    steps
        0..19; 0 changes nothing. The result is at most nice 19.
    """
    if not steps or not sys.platform.startswith("linux"):
        return  # elsewhere PRIO_PROCESS with a thread id would name a process
    thread = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, now + steps))
    except OSError as exc:
        logger.debug("scoring thread priority left as it is: %s", exc)
