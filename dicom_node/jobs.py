"""Jobs: one configured model to run on one study, and how a job moves.

A job is queued ``pending`` by the scheduler, claimed (``running``, with a
lease) by a worker thread, and left ``done``, ``skipped``, ``failed`` or
``pending`` again (a retry, after a pause) by that thread; the README's "Jobs
and deliveries" table lists every move. One job per study and model runs at a
time, so the runs of a study by a model are numbered without gaps or twins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import ColumnElement, and_, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from dicom_node import metrics
from dicom_node.config import NodeConfig
from dicom_node.errors import DicomNodeError, ModelMissingError
from dicom_node.index import (
    Delivery,
    DeliveryState,
    IndexDB,
    Job,
    JobState,
    Study,
    utc_now,
)
from dicom_node.leases import backoff, release
from dicom_node.log import describe_exception, uid_ref
from inference import InferenceError, PreprocessError, SourceChangedError

__all__ = [
    "ClaimedJob",
    "JobOutcome",
    "claim_jobs",
    "finish_job",
    "guard",
    "requeue",
    "retry_or_fail",
    "wait_for_model",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job this worker holds the lease of."""

    id: int
    study_id: int
    study_uid: str
    model: str
    attempts: int
    owner: str
    # Seconds from queued to this claim (its first try only; else 0).
    waited: float = 0.0


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What became of a job (a :class:`JobState`, or ``lost``), and why."""

    state: str
    detail: str = ""


# Another job of the same study and model, in claim_jobs' query: made once, as
# an alias built per call cost most of an idle claim (~1.5 ms of CPU).
_OTHER_JOB = aliased(Job)


def claim_jobs(
    index: IndexDB,
    owner: str,
    lease_seconds: float,
    max_attempts: int,
    limit: int,
    models: Sequence[str],
) -> list[ClaimedJob]:
    """Claim the oldest due jobs of ``models``: pending, or running, lease expired.

    Only jobs of the models the claiming process can run now are claimed
    (configured there, file present): the others wait for a process that can.
    A job is not claimed while another job of its study and model is running
    (the index allows one; it waits its turn). A job whose worker stopped
    during ``max_attempts`` tries is marked failed instead of being claimed
    again.

    Parameters
    ----------
    index
        The index.
    owner
        Who claims them.
    lease_seconds
        How long the claim holds.
    max_attempts
        Tries a job gets.
    limit
        Most jobs to claim.
    models
        The keys (:attr:`dicom_node.config.ModelConfig.key`) of the models the
        claiming process can run.

    Returns
    -------
    list of ClaimedJob
        Oldest first; empty when nothing is due.
    """
    if not models:
        return []
    other = _OTHER_JOB

    def due_at(now: datetime) -> ColumnElement[bool]:
        return or_(
            and_(
                Job.state == JobState.PENDING,
                or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
            ),
            and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
        )

    # Most claims of an idle node find nothing: looked for first in a read
    # transaction (no write lock, a third of the CPU of the claim's).
    if not index.read(
        lambda session: session.scalar(
            select(exists().where(due_at(utc_now()), Job.model.in_(list(models))))
        )
    ):
        return []

    def work(session: Session) -> list[ClaimedJob]:
        now = utc_now()
        due = due_at(now)
        busy = exists().where(
            other.study_id == Job.study_id,
            other.model == Job.model,
            other.id != Job.id,
            other.state == JobState.RUNNING,
        )
        rows = session.execute(
            select(
                Job.id, Job.state, Job.attempts, Job.study_id, Job.model, Job.created_at
            )
            .where(due, Job.model.in_(list(models)), ~busy)
            .order_by(Job.id)
            .limit(limit + 8)
            .with_for_update(skip_locked=True)
        ).all()
        claimed_jobs: list[ClaimedJob] = []
        for job_id, state, attempts, study_id, model, created_at in rows:
            if len(claimed_jobs) == limit:
                break
            if state == JobState.RUNNING and attempts >= max_attempts:
                release(
                    session,
                    Job,
                    job_id,
                    None,
                    JobState.FAILED,
                    only_if=Job.state == JobState.RUNNING,
                    last_error=f"its worker stopped during {attempts} tries",
                )
                continue
            try:
                # A savepoint: another process may have just claimed a job of
                # the same study and model (the unique index says so).
                with session.begin_nested():
                    claimed = session.execute(
                        update(Job)
                        .where(
                            Job.id == job_id,
                            Job.state == state,
                            Job.attempts == attempts,
                        )
                        .values(
                            state=JobState.RUNNING,
                            attempts=attempts + 1,
                            lease_owner=owner,
                            lease_expires_at=now + timedelta(seconds=lease_seconds),
                            updated_at=now,
                        )
                    )
            except IntegrityError:
                continue
            if getattr(claimed, "rowcount", 0) != 1:
                continue
            study_uid = session.scalar(
                select(Study.study_instance_uid).where(Study.id == study_id)
            )
            waited = (now - created_at).total_seconds() if attempts == 0 else 0.0
            claimed_jobs.append(
                ClaimedJob(
                    job_id, study_id, str(study_uid), model, attempts + 1, owner, waited
                )
            )
        return claimed_jobs

    claimed = index.run(work)
    for job in claimed:
        if job.attempts == 1:
            metrics.job_waited(job.waited)
    return claimed


def finish_job(
    index: IndexDB, job: ClaimedJob, state: JobState, detail: str
) -> JobOutcome:
    """Move a held job to ``state`` (skipped, failed) with its reason; log it."""

    def work(session: Session) -> None:
        release(session, Job, job.id, job.owner, state, last_error=detail[:2000])

    index.run(work)
    log = logger.info if state == JobState.SKIPPED else logger.error
    log("job %d (study %s) %s: %s", job.id, uid_ref(job.study_uid), state, detail)
    return JobOutcome(state, detail)


def retry_or_fail(
    index: IndexDB, job: ClaimedJob, config: NodeConfig, detail: str
) -> JobOutcome:
    """Queue a held job again after a pause that doubles with each try; or fail it.

    Parameters
    ----------
    index
        The index.
    job
        The job.
    config
        ``job_attempts``, ``retry_after`` and ``retry_max``.
    detail
        Why this try failed.
    """
    if job.attempts >= config.job_attempts:
        return finish_job(
            index, job, JobState.FAILED, f"after {job.attempts} tries: {detail}"
        )
    wait = backoff(job.attempts, config.retry_after, config.retry_max)

    def work(session: Session) -> None:
        release(
            session,
            Job,
            job.id,
            job.owner,
            JobState.PENDING,
            next_attempt_at=utc_now() + timedelta(seconds=wait),
            last_error=detail[:2000],
        )

    index.run(work)
    logger.warning(
        "job %d (study %s) try %d failed, next in %.0f s: %s",
        job.id,
        uid_ref(job.study_uid),
        job.attempts,
        wait,
        detail,
    )
    return JobOutcome(JobState.PENDING, detail)


def wait_for_model(
    index: IndexDB, job: ClaimedJob, config: NodeConfig, detail: str
) -> JobOutcome:
    """Put a held job back to wait for its model's file, without using up a try.

    It is claimed again after ``retry_after`` seconds, for as long as the
    model stays configured.
    """

    def work(session: Session) -> None:
        release(
            session,
            Job,
            job.id,
            job.owner,
            JobState.PENDING,
            attempts=job.attempts - 1,
            next_attempt_at=utc_now() + timedelta(seconds=config.retry_after),
            last_error=f"waiting: {detail}"[:2000],
        )

    index.run(work)
    logger.debug("job %d waits for its model: %s", job.id, detail)
    return JobOutcome(JobState.PENDING, detail)


def guard(
    job: ClaimedJob,
    config: NodeConfig,
    index: IndexDB,
    step: Callable[..., _T],
    *args: object,
) -> _T | JobOutcome:
    """Run a step of a job; an error retries the job later, then fails it.

    Images that cannot be made into model input (undecodable pixel data, an
    unsupported layout) fail the job at once: the stored files will not change,
    so a retry would fail the same way (``dicom-node retry --failed-jobs`` queues
    it again by hand; new images for the study make a new job). A model file
    that does not exist (yet) makes the job wait for it.
    """
    try:
        return step(*args)
    except ModelMissingError as exc:
        return wait_for_model(index, job, config, str(exc))
    except PreprocessError as exc:
        reason = f"{exc}; not retried: the same stored images would fail again"
        return finish_job(index, job, JobState.FAILED, reason)
    except SourceChangedError as exc:
        # Its message is the node's own (no data): a copy sent again replaced
        # the file while it was read; read again, it is the copy.
        return retry_or_fail(index, job, config, f"stored image replaced: {exc}")
    except OSError as exc:
        # A stored file gone or replaced while read (the retention sweep, a copy
        # sent again), a full disk: the files' trouble, not a bug; tried again.
        return retry_or_fail(
            index,
            job,
            config,
            f"file not readable or writable: {describe_exception(exc)}",
        )
    except Exception as exc:
        if isinstance(exc, DicomNodeError | InferenceError):
            detail = str(exc)
        else:
            detail = describe_exception(exc)
            logger.error(
                "job %d: unexpected %s", job.id, describe_exception(exc), exc_info=exc
            )
        return retry_or_fail(index, job, config, detail)


def requeue(index: IndexDB, *, dead: bool, failed_jobs: bool) -> dict[str, int]:
    """Make waiting deliveries due now; optionally revive dead ones and failed jobs.

    Parameters
    ----------
    index
        The index.
    dead
        Queue dead-lettered deliveries again, with their tries reset.
    failed_jobs
        Queue failed jobs again, with their tries reset.

    Returns
    -------
    dict
        How many ``waiting`` deliveries, ``dead`` deliveries and ``failed`` jobs
        were queued.
    """

    def work(session: Session) -> dict[str, int]:
        now = utc_now()
        counts = {"waiting": 0, "dead": 0, "failed": 0}
        waiting = session.execute(
            update(Delivery)
            .where(
                Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at > now
            )
            .values(next_attempt_at=now, updated_at=now)
        )
        counts["waiting"] = int(getattr(waiting, "rowcount", 0) or 0)
        if dead:
            revived = session.execute(
                update(Delivery)
                .where(Delivery.state == DeliveryState.DEAD)
                .values(
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    updated_at=now,
                )
            )
            counts["dead"] = int(getattr(revived, "rowcount", 0) or 0)
        if failed_jobs:
            again = session.execute(
                update(Job)
                .where(Job.state == JobState.FAILED)
                .values(
                    state=JobState.PENDING,
                    attempts=0,
                    next_attempt_at=None,
                    updated_at=now,
                )
            )
            counts["failed"] = int(getattr(again, "rowcount", 0) or 0)
        return counts

    return index.run(work)
