"""Retention: received studies, result files and audit rows deleted after their time.

``[retention]`` gives the periods (:class:`dicom_node.config.RetentionConfig`);
``serve`` sweeps once an hour (:class:`RetentionSweeper`). Each deletion leaves
a row in the index's ``retention`` table saying what went and when.

Nothing still needed is touched: a study is settled only when every job of it
has ended, every delivery of its results has ended (delivered, or dead-
lettered) and nothing has arrived since, all of it longer ago than the period.
An instance that arrives for the study while it is being swept is kept: the
study's files are first moved aside (``storage/.retention/<row>``) in the same
transaction that deletes their rows, and only removed once the sweep has seen
that no instance indexed since needs one of them back; one that does is put
back (a link, which never replaces a file).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

from sqlalchemy import ColumnElement, and_, delete, exists, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node.config import NodeConfig, RetentionConfig
from dicom_node.index import (
    AssociationRecord,
    Delivery,
    DeliveryState,
    ErrorRecord,
    IndexDB,
    Instance,
    Job,
    JobState,
    ResultRecord,
    RetentionRecord,
    Series,
    Study,
    utc_now,
)
from dicom_node.log import describe_exception
from dicom_node.loop import Loop
from dicom_node.results.store import results_root

__all__ = [
    "HOLDING",
    "SWEEP_SECONDS",
    "RetentionSweeper",
    "SweepReport",
    "sweep",
]

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 3600.0  # a sweep once an hour
HOLDING = ".retention"  # under the storage root: files waiting for their check
# How long moved-aside files wait before their check: longer than an instance
# may take from its rename into storage to its row (the index's lock wait).
SETTLE_SECONDS = 10.0
_BATCH = 100  # studies or result sets per transaction

_ENDED_JOBS = (JobState.DONE, JobState.FAILED, JobState.SKIPPED)
_ENDED_DELIVERIES = (DeliveryState.DONE, DeliveryState.DEAD)


@dataclass(slots=True)
class SweepReport:
    """What one sweep deleted.

    Parameters
    ----------
    studies, study_files, study_bytes
        Studies whose instances were deleted; their files and bytes.
    result_sets, result_bytes
        Result sets whose files were deleted; their bytes.
    audit_rows
        Association and error rows deleted.
    restored
        Files put back because an instance indexed meanwhile needed them.
    """

    studies: int = 0
    study_files: int = 0
    study_bytes: int = 0
    result_sets: int = 0
    result_bytes: int = 0
    audit_rows: int = 0
    restored: int = 0
    held: list[int] = field(default_factory=list)


def sweep(
    index: IndexDB,
    config: NodeConfig,
    now: datetime | None = None,
    stop: threading.Event | None = None,
    settle_seconds: float = SETTLE_SECONDS,
) -> SweepReport:
    """Delete what the retention periods say is due; record each deletion.

    Parameters
    ----------
    index
        The index.
    config
        The node configuration (its ``retention`` periods, state folder).
    now
        The time to measure the periods from (default: now).
    stop
        Set to stop: the sweep ends at the next study, and files moved aside
        are then left for the next sweep to check (after its own wait).
    settle_seconds
        How long moved-aside files wait before their check.

    Returns
    -------
    SweepReport
        What was deleted.
    """
    periods: RetentionConfig = config.retention
    now = now or utc_now()
    report = SweepReport()
    storage = config.storage_dir
    # Files a sweep that ended early (a crash, a stop) left aside.
    report.held += _held_rows(index)
    stop = stop or threading.Event()
    # On PostgreSQL an instance can be indexed again between the check and the
    # delete (no database-wide write lock as on SQLite): received studies are
    # kept there; results and audit rows go as configured.
    if periods.studies_days > 0 and index.is_sqlite:
        cutoff = now - timedelta(days=periods.studies_days)
        skipped: set[int] = set()
        while not stop.is_set():
            ids = [
                i
                for i in index.run(lambda s: _settled_studies(s, cutoff, skipped))
                if i not in skipped
            ]
            if not ids:
                break
            for study_id in ids:
                if stop.is_set():
                    break
                try:
                    row = _purge_study(index, storage, study_id, cutoff, now)
                except (OSError, SQLAlchemyError) as exc:
                    # This study waits for the next sweep; the others go on.
                    skipped.add(study_id)
                    logger.warning(
                        "retention: a study's instances not deleted (%s)",
                        describe_exception(exc),
                    )
                    continue
                if row is not None:
                    report.held.append(row)
    if report.held:
        stop.wait(settle_seconds)
        if stop.is_set():
            # Stopping: the moved files are checked by the next sweep, after
            # its own wait, never sooner.
            return report
        for row in report.held:
            files, size, restored = _finish_holding(index, storage, row)
            report.studies += 1
            report.study_files += files
            report.study_bytes += size
            report.restored += restored
    if periods.results_days > 0:
        cutoff = now - timedelta(days=periods.results_days)
        root = results_root(config.state_dir)
        while True:
            due = index.run(lambda s: _settled_results(s, cutoff))
            for result_id, folder in due:
                size = _tree_size(root / folder)
                # The row first: a crash after it leaves files, never a row
                # pointing at files that are gone and not said to be.
                if index.run(
                    partial(_record_result, result_id=result_id, size=size, now=now)
                ):
                    shutil.rmtree(root / folder, ignore_errors=True)
                    report.result_sets += 1
                    report.result_bytes += size
            if len(due) < _BATCH:
                break
    if periods.audit_days > 0:
        cutoff = now - timedelta(days=periods.audit_days)
        report.audit_rows = index.run(lambda s: _purge_audit(s, cutoff, now))
    return report


def _settled_studies(
    session: Session, cutoff: datetime, skipped: set[int]
) -> list[int]:
    query = select(Study.id).where(_settled(cutoff))
    if skipped:
        query = query.where(Study.id.not_in(skipped))
    return list(session.scalars(query.order_by(Study.id).limit(_BATCH)))


def _settled(cutoff: datetime) -> ColumnElement[bool]:
    """Return the condition on a Study row that its instances may go."""
    return and_(
        Study.needs_processing.is_(False),
        Study.last_received_at < cutoff,
        exists().where(Series.study_id == Study.id, Instance.series_id == Series.id),
        ~exists().where(
            Job.study_id == Study.id,
            or_(Job.state.not_in(_ENDED_JOBS), Job.updated_at >= cutoff),
        ),
        ~exists().where(
            ResultRecord.study_id == Study.id,
            Delivery.result_id == ResultRecord.id,
            or_(
                Delivery.state.not_in(_ENDED_DELIVERIES),
                Delivery.updated_at >= cutoff,
            ),
        ),
    )


def _purge_study(
    index: IndexDB, storage: Path, study_id: int, cutoff: datetime, now: datetime
) -> int | None:
    """Move a settled study's files aside and delete their rows; return the row id.

    The retention row (with the folder the files go to) is committed first:
    should the deleting transaction fail after files were moved, the check
    that follows puts back every file whose row is still there.
    """

    def open_row(session: Session) -> int:
        record = RetentionRecord(at=now, kind="study", study_id=study_id)
        session.add(record)
        session.flush()
        record.holding = f"{HOLDING}/{record.id}"
        return record.id

    row = index.run(open_row)
    target = storage / HOLDING / str(row)
    target.mkdir(parents=True, exist_ok=True)

    def move(session: Session) -> bool:
        # Checked again inside the transaction that deletes (SQLite: under
        # its write lock, so no instance of the study is indexed meanwhile).
        settled = select(Study.id).where(Study.id == study_id, _settled(cutoff))
        record = session.get(RetentionRecord, row)
        if record is None:
            return False
        if session.scalar(settled) is None:
            session.delete(record)
            return False
        rows = session.execute(
            select(Instance.id, Instance.path, Instance.size)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
        ).all()
        for instance_id, path, _ in rows:
            try:
                os.rename(storage / path, target / _held_name(instance_id, path))
            except FileNotFoundError:
                continue  # already gone: its row goes all the same
        session.execute(delete(Instance).where(Instance.id.in_([r[0] for r in rows])))
        record.count = len(rows)
        record.bytes = sum(size for _, _, size in rows)
        return True

    if index.run(move):
        return row
    shutil.rmtree(target, ignore_errors=True)
    return None


def _held_name(instance_id: int, path: str) -> str:
    # <instance row id>~<relative path with / as ~>: the way back is in the name.
    return f"{instance_id}~{path.replace('/', '~')}"


def _held_rows(index: IndexDB) -> list[int]:
    return list(
        index.run(
            lambda s: list(
                s.scalars(
                    select(RetentionRecord.id).where(
                        RetentionRecord.holding.is_not(None)
                    )
                )
            )
        )
    )


def _finish_holding(index: IndexDB, storage: Path, row: int) -> tuple[int, int, int]:
    """Remove a row's moved-aside files, putting back any an instance needs now."""
    holding = index.run(
        lambda s: s.scalar(
            select(RetentionRecord.holding).where(RetentionRecord.id == row)
        )
    )
    if holding is None:
        return 0, 0, 0
    folder = storage / holding
    names = sorted(os.listdir(folder)) if folder.is_dir() else []
    paths = [name.split("~", 1)[1].replace("~", "/") for name in names]
    wanted = set(
        index.run(
            lambda s: list(
                s.scalars(select(Instance.path).where(Instance.path.in_(paths)))
            )
        )
        if paths
        else []
    )
    files = size = 0
    restored: list[str] = []
    for name, path in zip(names, paths, strict=True):
        held = folder / name
        if path in wanted and _put_back(held, storage / path):
            restored.append(path)
        files += 1
        size += held.stat().st_size
        held.unlink()
    if folder.is_dir():
        folder.rmdir()
    for path in paths:
        _remove_empty_parents(storage, storage / path)
    index.run(lambda s: _held_done(s, row, restored))
    return files, size, len(restored)


def _put_back(held: Path, target: Path) -> bool:
    """Link a moved-aside file back for an instance indexed again since; True if done.

    Its file is this one unless a newer copy is in place already, which is
    never replaced.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(held, target)
    except FileExistsError:
        return False  # the newer copy stays
    return True


def _held_done(session: Session, row: int, restored: list[str]) -> None:
    record = session.get(RetentionRecord, row)
    if record is not None:
        record.holding = None
    if restored:
        # A file put back arrives again for its study: a job that ran while it
        # was aside failed to read it, so the study is processed again.
        studies = (
            select(Series.study_id)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.path.in_(restored))
        )
        session.execute(
            update(Study)
            .where(Study.id.in_(studies))
            .values(needs_processing=True, last_received_at=utc_now())
        )


def _remove_empty_parents(root: Path, path: Path) -> None:
    # The series and study folders, when nothing else is in them; a folder
    # an arriving instance is about to use makes that instance answer 0xA700
    # (the sender tries again), never a loss.
    for parent in (path.parent, path.parent.parent):
        if parent == root or root not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:
            return


def _settled_results(session: Session, cutoff: datetime) -> list[tuple[int, str]]:
    done = exists().where(RetentionRecord.result_id == ResultRecord.id)
    unsettled = exists().where(
        Delivery.result_id == ResultRecord.id,
        or_(
            Delivery.state.not_in(_ENDED_DELIVERIES),
            Delivery.updated_at >= cutoff,
        ),
    )
    rows = session.execute(
        select(ResultRecord.id, ResultRecord.folder)
        .where(ResultRecord.created_at < cutoff, ~done, ~unsettled)
        .order_by(ResultRecord.id)
        .limit(_BATCH)
    ).all()
    return [(int(i), str(f)) for i, f in rows]


def _record_result(
    session: Session, *, result_id: int, size: int, now: datetime
) -> bool:
    if session.scalar(
        select(func.count()).where(RetentionRecord.result_id == result_id)
    ):
        return False  # another sweeper's
    session.add(
        RetentionRecord(
            at=now, kind="results", result_id=result_id, count=1, bytes=size
        )
    )
    return True


def _tree_size(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += (Path(dirpath) / name).stat().st_size
            except OSError:
                continue
    return total


def _purge_audit(session: Session, cutoff: datetime, now: datetime) -> int:
    errors = getattr(
        session.execute(delete(ErrorRecord).where(ErrorRecord.at < cutoff)),
        "rowcount",
        0,
    )
    held = exists().where(Instance.association_id == AssociationRecord.id)
    cited = exists().where(ErrorRecord.association_id == AssociationRecord.id)
    associations = getattr(
        session.execute(
            delete(AssociationRecord).where(
                AssociationRecord.started_at < cutoff, ~held, ~cited
            )
        ),
        "rowcount",
        0,
    )
    count = int(errors or 0) + int(associations or 0)
    if count:
        session.add(RetentionRecord(at=now, kind="audit", count=count))
    return count


class RetentionSweeper(Loop):
    """Runs :func:`sweep` at start and then once an hour, in a thread of ``serve``.

    Parameters
    ----------
    index
        The index.
    config
        The node configuration; with every period 0 the thread is not needed.
    """

    def __init__(self, index: IndexDB, config: NodeConfig) -> None:
        super().__init__("retention", index, idle=SWEEP_SECONDS)
        self.index = index
        self.config = config
        if config.retention.studies_days and not index.is_sqlite:
            logger.warning(
                "retention: studies_days is not applied on PostgreSQL (received "
                "studies are kept); results_days and audit_days are"
            )

    def step(self) -> bool:
        """Sweep once; log what went (counts, never patient data)."""
        report = sweep(self.index, self.config, stop=self._stop)
        if report.studies or report.result_sets or report.audit_rows:
            logger.info(
                "retention: deleted the instances of %d stud%s (%d files, %.1f MB), "
                "%d result set(s) (%.1f MB) and %d audit row(s)%s",
                report.studies,
                "y" if report.studies == 1 else "ies",
                report.study_files,
                report.study_bytes / 1e6,
                report.result_sets,
                report.result_bytes / 1e6,
                report.audit_rows,
                f"; {report.restored} file(s) kept for instances that arrived meanwhile"
                if report.restored
                else "",
            )
        return False
