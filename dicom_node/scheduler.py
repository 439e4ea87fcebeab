"""Stable studies become jobs: one pending job per configured model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicom_node.index import IndexDB, Job, JobState, Study, utc_now
from dicom_node.log import uid_ref
from dicom_node.loop import Loop

__all__ = ["Scheduler", "earliest_waiting", "schedule_stable_studies"]

logger = logging.getLogger(__name__)


def schedule_stable_studies(
    index: IndexDB,
    model_keys: Sequence[str],
    stable_after: float,
    now: datetime | None = None,
) -> int:
    """Queue jobs for every study that has had no new instance for a while.

    A study waiting for processing whose last instance arrived ``stable_after``
    seconds ago or earlier gets one pending job per model, unless a pending job for
    that model already exists (it will see the new instances when it runs). Safe to
    run from several processes at once: each study is claimed by a conditional
    update, so no two schedulers queue it twice.

    Parameters
    ----------
    index
        The index database.
    model_keys
        The configured models, by the key jobs are filed under.
    stable_after
        Seconds without a new instance before a study counts as complete.
    now
        The current time (for tests); the clock when None.

    Returns
    -------
    int
        How many studies were found stable.
    """
    current = now or utc_now()
    cutoff = current - timedelta(seconds=stable_after)

    def work(session: Session) -> list[tuple[str, int]]:
        candidates = session.execute(
            select(Study.id, Study.study_instance_uid)
            .where(Study.needs_processing.is_(True), Study.last_received_at <= cutoff)
            .order_by(Study.last_received_at, Study.id)  # jobs queued oldest first
        ).all()
        claimed: list[tuple[str, int]] = []
        for study_id, study_uid in candidates:
            result = session.execute(
                update(Study)
                .where(
                    Study.id == study_id,
                    Study.needs_processing.is_(True),
                    Study.last_received_at <= cutoff,
                )
                .values(needs_processing=False)
            )
            if getattr(result, "rowcount", 0) != 1:
                continue  # another scheduler, or a new instance, got there first
            queued = 0
            for key in model_keys:
                pending = session.scalar(
                    select(Job.id).where(
                        Job.study_id == study_id,
                        Job.model == key,
                        Job.state == JobState.PENDING,
                    )
                )
                if pending is not None:
                    continue
                session.add(
                    Job(
                        study_id=study_id,
                        model=key,
                        state=JobState.PENDING,
                        attempts=0,
                        created_at=current,
                        updated_at=current,
                    )
                )
                queued += 1
            claimed.append((study_uid, queued))
        return claimed

    claimed = index.run(work)
    for study_uid, queued in claimed:
        logger.info("study %s is stable: %d job(s) queued", uid_ref(study_uid), queued)
    return len(claimed)


def earliest_waiting(index: IndexDB) -> datetime | None:
    """Return the last arrival of the study that will be stable first, if any waits."""
    return index.read(
        lambda s: s.scalar(
            select(func.min(Study.last_received_at)).where(
                Study.needs_processing.is_(True)
            )
        )
    )


class Scheduler(Loop):
    """Runs :func:`schedule_stable_studies` in a background thread, at the deadlines.

    After each round it sleeps until the earliest waiting study becomes stable
    (its last arrival plus ``stable_after``), so a study is queued the moment
    it is due rather than at the next poll. Arrivals stored by this process
    wake it when no study was waiting (:meth:`arrived`); arrivals through other
    processes (more receiving processes, other hosts) are found by a look at
    least every quarter of ``stable_after`` (at most 1 s), always before they
    are due.

    Parameters
    ----------
    index
        The index database.
    model_keys
        The configured models.
    stable_after
        Seconds without a new instance before a study counts as complete.
    on_queued
        Called after a round that queued jobs (wakes the worker threads).
    """

    def __init__(
        self,
        index: IndexDB,
        model_keys: Sequence[str],
        stable_after: float,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        # Look often enough that another process's new study is seen before it
        # is due.
        self.poll = min(1.0, max(0.05, stable_after / 4))
        super().__init__("scheduler", index, idle=self.poll)
        self.index = index
        self.on_queued = on_queued
        self.model_keys = tuple(model_keys)
        self.stable_after = stable_after
        self._waiting = True  # a study may be waiting: no wake on arrival needed

    def arrived(self) -> None:
        """Say an instance was stored here: wake the thread if nothing waited."""
        if not self._waiting:
            self._waiting = True
            self.wake.set()

    def step(self) -> bool:
        """Queue the studies that became stable; sleep until the next is due."""
        # A look first (no write lock): an idle node's rounds end here.
        earliest = earliest_waiting(self.index)
        stable = timedelta(seconds=self.stable_after)
        if earliest is not None and earliest + stable <= utc_now():
            found = schedule_stable_studies(
                self.index, self.model_keys, self.stable_after
            )
            if found and self.on_queued is not None:
                self.on_queued()
            earliest = earliest_waiting(self.index)
        if earliest is None:
            self._waiting = False
            self.idle = self.poll
            return False
        self._waiting = True
        due = earliest + stable - utc_now()
        # Not less than a few milliseconds: a study just found due is being
        # claimed by another process's scheduler.
        self.idle = min(self.poll, max(0.005, due.total_seconds()))
        return False
