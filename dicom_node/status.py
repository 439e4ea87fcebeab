"""What `dicom-node status` reports: counts, and each thing that is failing."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TypedDict

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from dicom_node.index import (
    AssociationRecord,
    Base,
    Delivery,
    DeliveryState,
    ErrorRecord,
    IndexDB,
    Instance,
    Job,
    JobState,
    ResultRecord,
    Series,
    Study,
    ThreadRecord,
    ThreadState,
    utc_now,
)
from dicom_node.log import uid_ref

__all__ = [
    "STALE_AFTER",
    "ErrorEntry",
    "FailedJob",
    "FailingDelivery",
    "NodeStatus",
    "RejectedAssociation",
    "UnhealthyThread",
    "counts_by",
    "node_status",
    "status_text",
]

# Seconds without a heartbeat after which a thread that did not stop cleanly is
# shown as silent. Its process writes a heartbeat every 10 s for each of its
# threads that is alive (dicom_node.loop.BEAT_SECONDS), so a minute is six beats
# missed: the process was killed (kill -9, out of memory, power cut) or hangs.
STALE_AFTER = 60.0

# AssociationRecord.outcome of an association the node refused (IndexDB
# open_association with a reason; the gate's refusals are audited the same way).
_REJECTED = "rejected"


class FailingDelivery(TypedDict):
    """A delivery that is dead, or waiting to be tried again after failing."""

    id: int
    destination: str  # the [[destinations]] name
    ae_title: str
    host: str
    port: int
    state: str  # DeliveryState: "dead", or "pending" for one to be tried again
    attempts: int
    next_attempt_at: str | None  # ISO 8601, UTC; None when dead
    last_error: str | None
    updated_at: str


class FailedJob(TypedDict):
    """A job given up on (failed) or passed over (skipped), with the reason."""

    id: int
    state: str  # JobState: "failed" or "skipped"
    study: str  # uid_ref of the Study Instance UID, never the UID itself
    model: str  # the model file
    attempts: int
    reason: str | None
    updated_at: str


class RejectedAssociation(TypedDict):
    """An association (or connection) the node refused."""

    id: int
    at: str
    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    peer_port: int
    reason: str | None


class ErrorEntry(TypedDict):
    """A failure the node recorded for the operator (never with patient data)."""

    at: str
    source: str
    status: str | None  # the DIMSE status sent back, as 0xNNNN
    message: str


class UnhealthyThread(TypedDict):
    """A long-running thread whose steps fail, or that has gone silent."""

    name: str
    owner: str  # host:pid:name
    state: str  # ThreadState it last reported
    failing_since: str | None  # set while its steps fail
    last_error: str | None  # the exception's type and place
    beat_at: str  # its last heartbeat
    silent: bool  # no heartbeat for STALE_AFTER seconds though not stopped


class NodeStatus(TypedDict):
    """What ``dicom-node status --json`` prints (see the README)."""

    at: str  # when this status was taken, ISO 8601, UTC
    associations: int
    associations_by_outcome: dict[str, int]
    studies: int
    studies_waiting: int  # not yet stable, or changed since their jobs
    series: int
    instances: int
    jobs: dict[str, int]  # every JobState -> count
    results: int
    deliveries: dict[str, int]  # every DeliveryState -> count
    failing_deliveries: list[FailingDelivery]
    failed_jobs: list[FailedJob]
    rejected_associations: list[RejectedAssociation]
    last_errors: list[ErrorEntry]
    unhealthy_threads: list[UnhealthyThread]


def node_status(index: IndexDB, limit: int = 10) -> NodeStatus:
    """Return what the index holds, and what is failing, newest first.

    Parameters
    ----------
    index
        The index database.
    limit
        The most entries in each list (failing deliveries, failed jobs,
        rejected associations, last errors, unhealthy threads).

    Returns
    -------
    NodeStatus
        Counts, and the failing deliveries, failed or skipped jobs, rejected
        associations, last errors and unhealthy threads.

    Raises
    ------
    ValueError
        If ``limit`` is negative.
    """
    if limit < 0:
        raise ValueError(f"limit: expected >= 0, got {limit}")
    now = utc_now()
    with index.sessions() as session:
        return {
            "at": now.isoformat(),
            "associations": _count(session, AssociationRecord),
            "associations_by_outcome": counts_by(session, AssociationRecord.outcome),
            "studies": _count(session, Study),
            "studies_waiting": int(
                session.scalar(
                    select(func.count())
                    .select_from(Study)
                    .where(Study.needs_processing.is_(True))
                )
                or 0
            ),
            "series": _count(session, Series),
            "instances": _count(session, Instance),
            "jobs": {**{s.value: 0 for s in JobState}, **counts_by(session, Job.state)},
            "results": _count(session, ResultRecord),
            "deliveries": {
                **{s.value: 0 for s in DeliveryState},
                **counts_by(session, Delivery.state),
            },
            "failing_deliveries": _failing_deliveries(session, limit),
            "failed_jobs": _failed_jobs(session, limit),
            "rejected_associations": _rejected_associations(session, limit),
            "last_errors": _last_errors(session, limit),
            "unhealthy_threads": _unhealthy_threads(session, now, limit),
        }


def _count(session: Session, model: type[Base]) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


def counts_by(session: Session, column: InstrumentedAttribute[str]) -> dict[str, int]:
    """Return how many rows have each value of ``column`` (a state, an outcome)."""
    rows = session.execute(select(column, func.count()).group_by(column))
    return {str(key): int(n) for key, n in rows}


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def _failing_deliveries(session: Session, limit: int) -> list[FailingDelivery]:
    rows = session.scalars(
        select(Delivery)
        .where(
            or_(
                Delivery.state == DeliveryState.DEAD,
                and_(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.attempts > 0,
                    Delivery.last_error.is_not(None),
                ),
            )
        )
        .order_by(Delivery.updated_at.desc(), Delivery.id.desc())
        .limit(limit)
    )
    return [
        {
            "id": d.id,
            "destination": d.destination,
            "ae_title": d.ae_title,
            "host": d.host,
            "port": d.port,
            "state": d.state,
            "attempts": d.attempts,
            "next_attempt_at": (
                None if d.state == DeliveryState.DEAD else _iso(d.next_attempt_at)
            ),
            "last_error": d.last_error,
            "updated_at": d.updated_at.isoformat(),
        }
        for d in rows
    ]


def _failed_jobs(session: Session, limit: int) -> list[FailedJob]:
    rows = session.execute(
        select(Job, Study.study_instance_uid)
        .join(Study, Job.study_id == Study.id)
        .where(Job.state.in_((JobState.FAILED, JobState.SKIPPED)))
        .order_by(Job.updated_at.desc(), Job.id.desc())
        .limit(limit)
    ).all()
    return [
        {
            "id": job.id,
            "state": job.state,
            "study": uid_ref(study_instance_uid),
            "model": job.model,
            "attempts": job.attempts,
            "reason": job.last_error,
            "updated_at": job.updated_at.isoformat(),
        }
        for job, study_instance_uid in rows
    ]


def _rejected_associations(session: Session, limit: int) -> list[RejectedAssociation]:
    rows = session.scalars(
        select(AssociationRecord)
        .where(AssociationRecord.outcome == _REJECTED)
        .order_by(AssociationRecord.id.desc())
        .limit(limit)
    )
    return [
        {
            "id": a.id,
            "at": a.started_at.isoformat(),
            "calling_ae_title": a.calling_ae_title,
            "called_ae_title": a.called_ae_title,
            "peer_address": a.peer_address,
            "peer_port": a.peer_port,
            "reason": a.reason,
        }
        for a in rows
    ]


def _last_errors(session: Session, limit: int) -> list[ErrorEntry]:
    rows = session.scalars(
        select(ErrorRecord).order_by(ErrorRecord.id.desc()).limit(limit)
    )
    return [
        {
            "at": e.at.isoformat(),
            "source": e.source,
            "status": None if e.status is None else f"0x{e.status:04X}",
            "message": e.message,
        }
        for e in rows
    ]


def _unhealthy_threads(
    session: Session, now: datetime, limit: int
) -> list[UnhealthyThread]:
    stale = now - timedelta(seconds=STALE_AFTER)
    rows = session.scalars(
        select(ThreadRecord)
        .where(
            or_(
                ThreadRecord.state == ThreadState.FAILING,
                and_(
                    ThreadRecord.state != ThreadState.STOPPED,
                    ThreadRecord.beat_at < stale,
                ),
            )
        )
        .order_by(ThreadRecord.beat_at.desc(), ThreadRecord.id.desc())
        .limit(limit)
    )
    return [
        {
            "name": t.name,
            "owner": t.owner,
            "state": t.state,
            "failing_since": _iso(t.failing_since),
            "last_error": t.last_error,
            "beat_at": t.beat_at.isoformat(),
            "silent": t.beat_at < stale,
        }
        for t in rows
    ]


def status_text(status: NodeStatus, limit: int) -> str:
    """Return the status as ``dicom-node status`` prints it.

    Parameters
    ----------
    status
        What :func:`node_status` returned.
    limit
        The most entries of each list it was asked for (0: the counts only).

    Returns
    -------
    str
        The counts, then one section per kind of trouble, one line per entry.
    """
    by_outcome = ", ".join(
        f"{k} {v}" for k, v in sorted(status["associations_by_outcome"].items())
    )
    lines = [
        f"now           {_when(status['at'])}",
        f"associations  {status['associations']}"
        + (f" ({by_outcome})" if by_outcome else ""),
        f"studies       {status['studies']} ({status['studies_waiting']} waiting "
        "to become stable)",
        f"series        {status['series']}",
        f"instances     {status['instances']}",
        "jobs          " + ", ".join(f"{k} {v}" for k, v in status["jobs"].items()),
        f"results       {status['results']}",
        "deliveries    "
        + ", ".join(f"{k} {v}" for k, v in status["deliveries"].items()),
    ]
    if limit == 0:
        return "\n".join(lines)
    newest = f"newest first, at most {limit}"

    deliveries = []
    for d in status["failing_deliveries"]:
        to = (
            f"{d['destination']} ({d['host']}, STOW-RS)"
            if d["port"] == 0  # a DICOMweb destination: its URL
            else f"{d['destination']} ({d['ae_title']}@{d['host']}:{d['port']})"
        )
        if d["state"] == DeliveryState.DEAD:
            head = f"dead: delivery {d['id']} to {to} after {_tries(d['attempts'])}"
        else:
            next_at = d["next_attempt_at"]
            head = (
                f"retrying: delivery {d['id']} to {to}, {_tries(d['attempts'])} "
                f"so far, next at {_when(next_at) if next_at else 'once due'}"
            )
        deliveries.append(f"{head}: {d['last_error'] or 'no error recorded'}")
    if any(d["state"] == DeliveryState.DEAD for d in status["failing_deliveries"]):
        deliveries.append(
            "(fix the destination, then 'dicom-node retry --dead' sends them again)"
        )
    _section(lines, f"failing deliveries ({newest})", deliveries)

    jobs = [
        f"{j['state']}: job {j['id']} (study {j['study']}, model {j['model']}, "
        f"{_tries(j['attempts'])}): {j['reason'] or 'no reason recorded'}"
        for j in status["failed_jobs"]
    ]
    if any(j["state"] == JobState.FAILED for j in status["failed_jobs"]):
        jobs.append("('dicom-node retry --failed-jobs' queues failed jobs again)")
    _section(lines, f"failed and skipped jobs ({newest})", jobs)

    _section(
        lines,
        f"rejected associations ({newest})",
        [
            f"{_when(a['at'])} from {a['peer_address']}:{a['peer_port']}, calling "
            f"AE {a['calling_ae_title']!r}, called AE {a['called_ae_title']!r}: "
            f"{a['reason'] or 'no reason recorded'}"
            for a in status["rejected_associations"]
        ],
    )
    _section(
        lines,
        f"last errors ({newest})",
        [
            f"{_when(e['at'])} {e['source']}"
            + (f" {e['status']}" if e["status"] else "")
            + f": {e['message']}"
            for e in status["last_errors"]
        ],
    )
    threads = []
    for t in status["unhealthy_threads"]:
        what = f"{t['name']} ({t['owner']})"
        if t["state"] == ThreadState.FAILING:
            since = t["failing_since"]
            what += (
                f" failing since {_when(since) if since else 'unknown'}: "
                f"{t['last_error'] or 'no error recorded'}"
            )
            if t["silent"]:
                what += f"; silent since {_when(t['beat_at'])}"
        else:
            what += (
                f" silent since {_when(t['beat_at'])}: no heartbeat for over "
                f"{STALE_AFTER:g} s (process killed or stuck?)"
            )
        threads.append(what)
    _section(lines, "unhealthy threads", threads)
    return "\n".join(lines)


def _section(lines: list[str], title: str, items: list[str]) -> None:
    lines.append("")
    if not items:
        lines.append(f"{title}: none")
        return
    lines.append(f"{title}:")
    lines.extend(f"  {item}" for item in items)


def _tries(n: int) -> str:
    return f"{n} try" if n == 1 else f"{n} tries"


def _when(iso: str) -> str:
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC")
