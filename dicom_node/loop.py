"""The node's long-running threads: one loop class, one error policy, a heartbeat.

Every background thread of the node (the scheduler, each worker's scoring and
results threads, the outbox) survives any error of a step: the index failing
is logged as a warning, anything else at ERROR with the traceback (never the
exception's message, which may quote data); either way the thread pauses,
longer after each failure in a row, and tries again. Each thread writes its
state to the index's ``threads`` table: a heartbeat every :data:`BEAT_SECONDS`,
``failing`` with the error while its steps fail, ``stopped`` when stopped, so
``dicom-node status`` can say when one is unhealthy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

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

    Writing it never raises: when the index fails, the thread goes on and the
    next beat tries again.

    Parameters
    ----------
    index
        The index; None keeps nothing (a thread outside a node).
    name
        The thread's name.
    """

    def __init__(self, index: IndexDB | None, name: str) -> None:
        self.index = index
        self.name = name
        self.owner = owner_name(name)
        self._beaten = 0.0
        self._failing = False

    def started(self) -> None:
        """Record that the thread runs (replacing a row of an earlier thread)."""
        now = utc_now()

        def work(session: Session) -> None:
            session.execute(
                delete(ThreadRecord).where(ThreadRecord.owner == self.owner)
            )
            session.add(
                ThreadRecord(
                    owner=self.owner,
                    name=self.name[:64],
                    state=ThreadState.RUNNING,
                    started_at=now,
                    beat_at=now,
                )
            )

        self._write(work)
        self._beaten = time.monotonic()

    def beat(self) -> None:
        """Record that the thread is well; written at most every BEAT_SECONDS."""
        if not self._failing and time.monotonic() - self._beaten < BEAT_SECONDS:
            return
        self._set(ThreadState.RUNNING, failing_since=None, last_error=None)
        self._failing = False
        self._beaten = time.monotonic()

    def failing(self, exc: BaseException) -> None:
        """Record that the thread's last step failed with ``exc``."""
        values: dict[str, object] = {"last_error": describe_exception(exc)[:500]}
        if not self._failing:
            values["failing_since"] = utc_now()
        self._set(ThreadState.FAILING, **values)
        self._failing = True
        self._beaten = time.monotonic()

    def stopped(self) -> None:
        """Record that the thread was stopped cleanly."""
        self._set(ThreadState.STOPPED)

    def _set(self, state: ThreadState, **values: object) -> None:
        def work(session: Session) -> None:
            session.execute(
                update(ThreadRecord)
                .where(ThreadRecord.owner == self.owner)
                .values(state=state, beat_at=utc_now(), **values)
            )

        self._write(work)

    def _write(self, work: Callable[[Session], None]) -> None:
        if self.index is None:
            return
        try:
            self.index.run(work)
        except Exception as exc:  # noqa: BLE001 - the thread's work comes first
            logger.debug("%s: heartbeat not written: %s", self.name, type(exc).__name__)


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
            self.health.beat()
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
    if isinstance(exc, SQLAlchemyError):
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
