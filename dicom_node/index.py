"""The index database: SQLAlchemy 2 models and the few transactions the node runs."""

from __future__ import annotations

import enum
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.schema import CreateIndex

from dicom_node.errors import (
    IndexCorruptError,
    IndexSchemaError,
    IndexUnavailableError,
)

__all__ = [
    "AssociationRecord",
    "Base",
    "Delivery",
    "DeliveryState",
    "ErrorRecord",
    "IndexDB",
    "Instance",
    "InstanceRecordRequest",
    "Job",
    "JobState",
    "RecordOutcome",
    "ResultRecord",
    "RetentionRecord",
    "Series",
    "Study",
    "ThreadRecord",
    "ThreadState",
    "utc_now",
]

logger = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    """Where a job stands; the README's "Jobs and deliveries" table says who moves it.

    Stored as its value; compares equal to it.
    """

    PENDING = "pending"  # waiting to be claimed (after next_attempt_at, if set)
    RUNNING = "running"  # claimed: a worker holds its lease
    DONE = "done"  # its result set is written and its deliveries queued
    FAILED = "failed"  # given up on; `dicom-node retry --failed-jobs` queues it again
    SKIPPED = "skipped"  # the study has no image the model accepts


class DeliveryState(enum.StrEnum):
    """Where a delivery stands; see the README's "Jobs and deliveries" table."""

    PENDING = "pending"  # waiting to be sent (after next_attempt_at)
    SENDING = "sending"  # claimed: the outbox of some process holds its lease
    DONE = "done"  # every file was accepted by the destination
    DEAD = "dead"  # out of tries; `dicom-node retry --dead` queues it again


class ThreadState(enum.StrEnum):
    """How a long-running thread of the node last reported itself."""

    RUNNING = "running"  # its last step worked (or it had nothing to do)
    FAILING = "failing"  # its last step raised; it tries again after a pause
    STOPPED = "stopped"  # it was stopped cleanly


T = TypeVar("T")
S = TypeVar("S")

# Study and series ids are remembered per process to spare two look-ups per
# instance; past this many entries the memory starts again.
_ID_CACHE_SIZE = 100_000

# Seconds a transaction off the receiving path waits for a locked index.
_WAIT = 60.0
# Execution option: milliseconds a transaction waits for a lock.
_WAIT_OPTION = "dicom_node_lock_wait_ms"
# A transaction that only reads: on SQLite a deferred BEGIN (no write lock).
_READ_OPTION = "dicom_node_read_only"


def utc_now() -> datetime:
    """Return the current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        """Convert to naive UTC for storage."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("datetimes stored in the index must be timezone-aware")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        """Mark the stored naive value as UTC."""
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base of the index tables."""


class AssociationRecord(Base):
    """One association, accepted or rejected (the audit trail)."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # open, released, aborted or rejected
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)


class Study(Base):
    """A study the node holds instances of."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Set by every new or changed instance; cleared when the scheduler queues jobs.
    needs_processing: Mapped[bool] = mapped_column(Boolean, default=True)

    series: Mapped[list[Series]] = relationship(back_populates="study")

    __table_args__ = (Index("ix_studies_needs_processing", "needs_processing"),)


class Series(Base):
    """A series of a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """A stored SOP instance."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    # Relative to the storage root: <study>/<series>/<sop>.dcm
    path: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id"), nullable=True
    )

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One model to run on one study."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    # The configured model, by its file's absolute path (ModelConfig.key).
    model: Mapped[str] = mapped_column(String(500))
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, nullable=True
    )
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # A failed try waits until then before the job is claimed again.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    study: Mapped[Study] = relationship()

    __table_args__ = (
        Index("ix_jobs_state", "state"),
        # One job per study and model runs at a time: a second claim fails.
        Index(
            "ux_jobs_one_running",
            "study_id",
            "model",
            unique=True,
            sqlite_where=text("state = 'running'"),
            postgresql_where=text("state = 'running'"),
        ),
    )


class ResultRecord(Base):
    """One result set (SR and Secondary Captures) of a study and model."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    # The model that made it: its name and version, and the start of its SHA-256.
    model: Mapped[str] = mapped_column(String(500))
    # 1 for the first result set of this study by this Device UID, then 2, 3, ...
    run: Mapped[int] = mapped_column(Integer)
    # The model's Device UID (new for each training run): what runs are counted by.
    device_uid: Mapped[str] = mapped_column(String(64))
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    # Folder of the result files, relative to the results root.
    folder: Mapped[str] = mapped_column(String(300))
    # JSON: per label name, probability and positive (no patient data).
    summary: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    # A run is recorded once: a second writer of run N waits, then fails.
    __table_args__ = (UniqueConstraint("study_id", "device_uid", "run"),)


class Delivery(Base):
    """One result set to send to one destination: the durable outbox."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"))
    destination: Mapped[str] = mapped_column(String(100))
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, nullable=True
    )
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    result: Mapped[ResultRecord] = relationship()

    __table_args__ = (Index("ix_deliveries_state", "state"),)


class ErrorRecord(Base):
    """A failure worth showing an operator; the message never holds patient data."""

    __tablename__ = "errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    source: Mapped[str] = mapped_column(String(32))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(String(500))
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id"), nullable=True
    )


class RetentionRecord(Base):
    """What the retention sweep deleted, and when (no patient data).

    One row per study whose instances were deleted (``kind`` "study"), per
    result set whose files were deleted ("results"), and per sweep that
    deleted audit rows ("audit").
    """

    __tablename__ = "retention"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(16))
    study_id: Mapped[int | None] = mapped_column(
        ForeignKey("studies.id"), nullable=True
    )
    result_id: Mapped[int | None] = mapped_column(
        ForeignKey("results.id"), nullable=True, unique=True
    )
    # Files (or rows, for "audit") deleted, and the bytes of the files.
    count: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Where a study's files wait (relative to the storage root) until the
    # sweep has checked that no instance arriving meanwhile took their place;
    # None once they are gone.
    holding: Mapped[str | None] = mapped_column(String(300), nullable=True)


class ThreadRecord(Base):
    """A long-running thread of a node process: its last heartbeat and error.

    Written by :class:`dicom_node.loop.Loop`; read by ``dicom-node status``.
    """

    __tablename__ = "threads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # host:pid:name, as lease owners are written.
    owner: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=ThreadState.RUNNING)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    beat_at: Mapped[datetime] = mapped_column(UTCDateTime)
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The exception's type and place, never its message.
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)


@dataclass(frozen=True, slots=True)
class InstanceRecordRequest:
    """What the index records of one stored instance.

    Parameters
    ----------
    study_instance_uid
        The study's UID.
    series_instance_uid
        The series' UID.
    sop_instance_uid
        The instance's UID.
    sop_class_uid
        The SOP class.
    transfer_syntax_uid
        The transfer syntax it was received (and stored) in.
    modality
        The series' modality, if present.
    path
        Path relative to the storage root.
    size
        Size of the stored file in bytes.
    sha256
        SHA-256 of the data set as received.
    association_id
        The association it came in on.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    path: str
    size: int
    sha256: str
    association_id: int | None


class _ConflictError(Exception):
    """Raised inside a transaction to roll it back on a UID conflict."""


class RecordOutcome(enum.Enum):
    """What :meth:`IndexDB.record_instance` did with an instance."""

    NEW = "new"  # first copy of this SOP Instance UID
    REPLACED = "replaced"  # same UID and series, different content
    DUPLICATE = "duplicate"  # same UID, series and content: nothing changed
    CONFLICT = "conflict"  # the UID (or its series) is filed under another study/series


class IndexDB:
    """The index: an engine, a session factory and the node's transactions.

    Parameters
    ----------
    url
        SQLAlchemy URL: ``sqlite:///...`` (WAL mode) or ``postgresql+psycopg://...``.
    pool_size
        Connections kept open; the node's threads beyond that wait for one.
    touch_interval
        Seconds between two updates of a study's last-received time by this
        process; must stay below the scheduler's ``stable_after``.
    store_busy_timeout
        Seconds the receiving path (:meth:`record_instance`,
        :meth:`open_association`, :meth:`close_association`) waits for a locked
        index before it fails, so that a C-STORE is refused while the sender
        still waits for the answer; :meth:`record_error` waits a fifth of it.
        The other transactions (scheduler, workers, outbox) wait up to 60 s.

    Raises
    ------
    IndexCorruptError
        If the SQLite file is damaged or is not an SQLite database.
    IndexUnavailableError
        If the index cannot be opened: locked, unreadable, server unreachable.
    IndexSchemaError
        If the index was made by an earlier version.
    """

    def __init__(
        self,
        url: str,
        pool_size: int = 8,
        touch_interval: float = 1.0,
        store_busy_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine: Engine = _make_engine(url, pool_size, _WAIT)
        self.sessions: sessionmaker[Session] = sessionmaker(
            self.engine, expire_on_commit=False
        )
        # The receiving path has its own pool, so the scheduler and workers never
        # hold the connections a C-STORE needs, and its own shorter lock waits.
        self._store_engine = _make_engine(url, pool_size, store_busy_timeout)
        self._store_sessions: sessionmaker[Session] = sessionmaker(
            self._store_engine, expire_on_commit=False
        )
        # record_error follows a failed C-STORE, before the answer goes back.
        self._error_sessions: sessionmaker[Session] = sessionmaker(
            self._store_engine.execution_options(
                **{_WAIT_OPTION: _milliseconds(store_busy_timeout / 5)}
            ),
            expire_on_commit=False,
        )
        # Readers (the status page, /metrics) take no write lock: on SQLite's
        # WAL they never hold up a C-STORE.
        self._read_sessions: sessionmaker[Session] = sessionmaker(
            self.engine.execution_options(**{_READ_OPTION: True}),
            expire_on_commit=False,
        )
        self.touch_interval = touch_interval
        self._study_ids: dict[str, int] = {}
        self._series: dict[str, tuple[int, int]] = {}
        self._study_touched: dict[str, float] = {}
        try:
            try:
                Base.metadata.create_all(self.engine)
                _check_schema(self.engine)
                _add_missing_indexes(self.engine)
            except DBAPIError as exc:
                raise _unusable(self.engine, exc) from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
        self._store_engine.dispose()

    def run(self, work: Callable[[Session], T], attempts: int = 3) -> T:
        """Run ``work`` in one transaction, retrying on a lost uniqueness race.

        Parameters
        ----------
        work
            A function of the session; it must be safe to run again.
        attempts
            How many times to try when a concurrent writer wins a unique key.

        Returns
        -------
        T
            What ``work`` returned.

        Raises
        ------
        sqlalchemy.exc.SQLAlchemyError
            If the database fails, or the race is lost ``attempts`` times.
        """
        return _retrying(self.sessions.begin, work, attempts)

    def read(self, work: Callable[[Session], T]) -> T:
        """Run ``work``, which only reads, in a transaction that takes no write lock.

        Parameters
        ----------
        work
            A function of the session; it must not write.

        Returns
        -------
        T
            What ``work`` returned.
        """
        with self._read_sessions.begin() as session:
            return work(session)

    # --- associations -------------------------------------------------------

    def open_association(
        self,
        calling_ae_title: str,
        called_ae_title: str,
        peer_address: str,
        peer_port: int,
        *,
        rejected_reason: str | None = None,
    ) -> int:
        """Record an association request; return its id.

        Parameters
        ----------
        calling_ae_title
            The peer's AE title.
        called_ae_title
            The AE title the peer asked for.
        peer_address
            The peer's IP address.
        peer_port
            The peer's TCP port.
        rejected_reason
            When set, the association was rejected for this reason.

        Returns
        -------
        int
            The association's id.
        """
        now = utc_now()

        def work(session: Session) -> int:
            record = AssociationRecord(
                calling_ae_title=calling_ae_title,
                called_ae_title=called_ae_title,
                peer_address=peer_address,
                peer_port=peer_port,
                started_at=now,
                ended_at=now if rejected_reason else None,
                outcome="rejected" if rejected_reason else "open",
                reason=rejected_reason,
                instances_stored=0,
                instances_failed=0,
            )
            session.add(record)
            session.flush()
            return record.id

        return _retrying(self._store_sessions.begin, work)

    def close_association(
        self,
        association_id: int,
        outcome: str,
        instances_stored: int = 0,
        instances_failed: int = 0,
    ) -> None:
        """Record how an association ended and what it carried.

        Parameters
        ----------
        association_id
            The id from :meth:`open_association`.
        outcome
            ``released``, ``aborted`` or ``closed``.
        instances_stored
            C-STOREs answered Success.
        instances_failed
            C-STOREs answered with a failure status.
        """
        now = utc_now()
        _retrying(
            self._store_sessions.begin,
            lambda s: s.execute(
                update(AssociationRecord)
                .where(AssociationRecord.id == association_id)
                .values(
                    outcome=outcome,
                    ended_at=now,
                    instances_stored=instances_stored,
                    instances_failed=instances_failed,
                )
            ),
        )

    # --- instances ----------------------------------------------------------

    def record_instance(self, rq: InstanceRecordRequest) -> RecordOutcome:
        """Index a stored instance and mark its study for processing.

        One short transaction (the hot path of every C-STORE). A SOP Instance UID
        already filed under another series, or a series already filed under
        another study, is a conflict: the transaction is rolled back. An
        identical copy (same series, same data set hash) changes nothing, so a
        re-sent study is not processed again.

        Parameters
        ----------
        rq
            What to record.

        Returns
        -------
        RecordOutcome
            What happened.
        """
        clock = time.monotonic()
        remembered: dict[str, Any] = {}

        def work(conn: Connection) -> RecordOutcome:
            remembered.clear()  # from an attempt that was rolled back
            now = utc_now()
            study_id = self._study_ids.get(rq.study_instance_uid)
            if study_id is None:
                study_id = self._study_id(conn, rq.study_instance_uid, now)
                remembered["study"] = study_id
            series = self._series.get(rq.series_instance_uid)
            if series is None:
                series = self._series_ids(conn, rq, study_id)
                remembered["series"] = series
            if series[1] != study_id:
                raise _ConflictError  # the series belongs to another study
            values = {
                "sop_class_uid": rq.sop_class_uid,
                "transfer_syntax_uid": rq.transfer_syntax_uid,
                "series_id": series[0],
                "path": rq.path,
                "size": rq.size,
                "sha256": rq.sha256,
                "received_at": now,
                "association_id": rq.association_id,
            }
            insert = self._insert_ignore(Instance).values(
                sop_instance_uid=rq.sop_instance_uid, **values
            )
            if conn.dialect.name == "postgresql":
                # psycopg reports no row count for this insert (-1): ask for
                # the new row instead (SQLite before 3.35 has no RETURNING).
                is_new = conn.execute(insert.returning(Instance.id)).first() is not None
            else:
                is_new = getattr(conn.execute(insert), "rowcount", 0) == 1
            if is_new:
                outcome = RecordOutcome.NEW
            else:
                existing = conn.execute(
                    select(Instance.id, Instance.series_id, Instance.sha256).where(
                        Instance.sop_instance_uid == rq.sop_instance_uid
                    )
                ).one()
                if existing[1] != series[0]:
                    raise _ConflictError
                if existing[2] == rq.sha256:
                    return RecordOutcome.DUPLICATE
                outcome = RecordOutcome.REPLACED
                conn.execute(
                    update(Instance).where(Instance.id == existing[0]).values(**values)
                )
            # Mark the study; at most once per touch_interval per study and process.
            # Safe because touch_interval < stable_after: a study the scheduler has
            # claimed was last touched longer ago than that, so it is touched again.
            last = self._study_touched.get(rq.study_instance_uid)
            if (
                "study" in remembered
                or last is None
                or clock - last >= self.touch_interval
            ):
                conn.execute(
                    update(Study)
                    .where(Study.id == study_id)
                    .values(last_received_at=now, needs_processing=True)
                )
                remembered["touched"] = clock
            return outcome

        try:
            # A bare connection: the ORM session costs too much on this hot path.
            outcome = _retrying(self._store_engine.begin, work)
        except _ConflictError:
            return RecordOutcome.CONFLICT
        # Only ids of committed rows are remembered (a rolled-back insert is not).
        if len(self._study_ids) > _ID_CACHE_SIZE:
            self._study_ids.clear()
            self._series.clear()
            self._study_touched.clear()
        if "study" in remembered:
            self._study_ids[rq.study_instance_uid] = remembered["study"]
        if "series" in remembered:
            self._series[rq.series_instance_uid] = remembered["series"]
        if "touched" in remembered:
            self._study_touched[rq.study_instance_uid] = remembered["touched"]
        return outcome

    def _insert_ignore(self, table: type[Base]) -> Any:
        # INSERT ... ON CONFLICT DO NOTHING, in the dialect's own spelling.
        if self.engine.dialect.name == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        return sqlite.insert(table).on_conflict_do_nothing()

    def _study_id(
        self, conn: Connection, study_instance_uid: str, now: datetime
    ) -> int:
        conn.execute(
            self._insert_ignore(Study).values(
                study_instance_uid=study_instance_uid,
                first_received_at=now,
                last_received_at=now,
                needs_processing=True,
            )
        )
        return int(
            conn.execute(
                select(Study.id).where(Study.study_instance_uid == study_instance_uid)
            ).scalar_one()
        )

    def _series_ids(
        self, conn: Connection, rq: InstanceRecordRequest, study_id: int
    ) -> tuple[int, int]:
        conn.execute(
            self._insert_ignore(Series).values(
                series_instance_uid=rq.series_instance_uid,
                study_id=study_id,
                modality=rq.modality,
            )
        )
        row = conn.execute(
            select(Series.id, Series.study_id).where(
                Series.series_instance_uid == rq.series_instance_uid
            )
        ).one()
        return int(row[0]), int(row[1])

    def record_error(
        self,
        source: str,
        message: str,
        *,
        status: int | None = None,
        association_id: int | None = None,
    ) -> None:
        """Record a failure for ``dicom-node status``; never raises.

        Parameters
        ----------
        source
            Which part failed (``store``, ``association``, ``scheduler``).
        message
            What happened, without patient data.
        status
            The DIMSE status sent back, if any.
        association_id
            The association concerned, if any.
        """
        now = utc_now()

        def work(session: Session) -> None:
            session.add(
                ErrorRecord(
                    at=now,
                    source=source,
                    status=status,
                    message=message[:500],
                    association_id=association_id,
                )
            )

        try:
            _retrying(self._error_sessions.begin, work)
        except Exception as exc:  # noqa: BLE001 - it must never raise
            # The index itself is failing (locked, full disk, damaged): the log
            # still has it.
            logger.warning(
                "could not record an error in the index: %s", type(exc).__name__
            )


def _check_schema(engine: Engine) -> None:
    """Refuse an index whose tables lack columns this version uses.

    ``create_all`` makes missing tables but leaves existing ones as they are,
    so an index made by an earlier version would fail on its first query.

    Raises
    ------
    IndexSchemaError
        Naming the tables and columns missing.
    """
    inspector = inspect(engine)
    missing = []
    for table in Base.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        lacking = [c.name for c in table.columns if c.name not in present]
        if lacking:
            missing.append(f"{table.name} ({', '.join(lacking)})")
    if missing:
        where = engine.url.render_as_string(hide_password=True)
        raise IndexSchemaError(
            f"the index at {where} was made by an earlier dicom-node and lacks "
            f"columns this version needs: {'; '.join(missing)}. Move the old index "
            "aside or set database_url to a new one (instances stored under "
            "state_dir/storage stay where they are, but the new index does not "
            "know them), or add the columns to the old index"
        )


def _add_missing_indexes(engine: Engine) -> None:
    """Make the indexes that an index made by an earlier version lacks.

    ``create_all`` leaves existing tables as they are, and their indexes with
    them. Some are not only for speed: ``ux_jobs_one_running`` is what makes a
    second claim of a running job fail. Processes opening the same index at
    once do not trip over each other (``IF NOT EXISTS``, and a lost race is
    checked).
    """
    inspector = inspect(engine)
    for table in Base.metadata.sorted_tables:
        present = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            if index.name in present:
                continue
            try:
                with engine.begin() as connection:
                    connection.execute(CreateIndex(index, if_not_exists=True))
            except DBAPIError:
                # PostgreSQL's IF NOT EXISTS can still lose a race to another
                # process making the same index: then it is there.
                made = inspect(engine).get_indexes(table.name)
                if index.name not in {i["name"] for i in made}:
                    raise
                continue
            logger.info(
                "index: made %s on %s (the index was made by an earlier dicom-node)",
                index.name,
                table.name,
            )


def _retrying(
    begin: Callable[[], AbstractContextManager[S]],
    work: Callable[[S], T],
    attempts: int = 3,
) -> T:
    # One transaction per try; a concurrent writer winning a unique key (two
    # associations creating the same study) makes the loser try again.
    for attempt in range(1, attempts + 1):
        try:
            with begin() as handle:
                return work(handle)
        except IntegrityError:
            if attempt == attempts:
                raise
            logger.debug("unique-key race, retrying the transaction")
    raise AssertionError("unreachable")  # pragma: no cover


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _make_engine(url: str, pool_size: int, wait: float) -> Engine:
    """Return an engine whose transactions wait at most ``wait`` s for a lock.

    On SQLite that is the busy timeout (also while connecting). On PostgreSQL
    the lock and statement timeouts are set only when ``wait`` is below the
    default wait (the receiving path); other transactions wait as long as it
    takes, as before.
    """
    wait_ms = _milliseconds(wait)
    kwargs: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": pool_size,
        "pool_timeout": min(wait, 30.0),
        "execution_options": {_WAIT_OPTION: wait_ms},
    }
    if url.startswith("sqlite"):
        # pysqlite's timeout is SQLite's busy timeout from the moment the
        # connection opens (the PRAGMAs below); "connect" sets it again.
        kwargs["connect_args"] = {"timeout": wait, "check_same_thread": False}
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine, wait_ms)
        return engine
    if url.startswith("postgresql") and "connect_timeout" not in make_url(url).query:
        # libpq waits forever for a server that does not answer.
        kwargs["connect_args"] = {"connect_timeout": max(2, min(10, math.ceil(wait)))}
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "postgresql" and wait < _WAIT:
        _configure_postgresql(engine, wait_ms)
    return engine


def _configure_sqlite(engine: Engine, wait_ms: int) -> None:
    # WAL lets readers run beside the one writer; synchronous=FULL makes each
    # commit durable across a power cut, not only a process crash.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below issue BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={wait_ms}")
        cursor.close()
        record.info[_WAIT_OPTION] = wait_ms

    # BEGIN IMMEDIATE takes the write lock up front, so a transaction never has to
    # upgrade a read lock and fail with SQLITE_BUSY when another process writes.
    # A transaction asking for another wait (execution option) sets it first;
    # the connection remembers it, so the usual case costs no statement.
    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        wanted = connection.get_execution_options()[_WAIT_OPTION]
        info = connection.connection.info
        if info.get(_WAIT_OPTION) != wanted:
            connection.exec_driver_sql(f"PRAGMA busy_timeout={int(wanted)}")
            info[_WAIT_OPTION] = wanted
        options = connection.get_execution_options()
        connection.exec_driver_sql(
            "BEGIN" if options.get(_READ_OPTION) else "BEGIN IMMEDIATE"
        )


def _configure_postgresql(engine: Engine, wait_ms: int) -> None:
    # Set once per connection, so the receiving path pays no statement for it.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET lock_timeout = {wait_ms}")
        cursor.execute(f"SET statement_timeout = {wait_ms}")
        cursor.close()
        dbapi_connection.autocommit = autocommit

    # A transaction asking for another wait (execution option) sets it for itself.
    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        wanted = int(connection.get_execution_options()[_WAIT_OPTION])
        if wanted != wait_ms:
            connection.exec_driver_sql(
                f"SELECT set_config('lock_timeout', '{wanted}', true), "
                f"set_config('statement_timeout', '{wanted}', true)"
            )


# Primary SQLite result codes (https://sqlite.org/rescode.html).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def _unusable(engine: Engine, exc: DBAPIError) -> IndexUnavailableError:
    """Name why the index cannot be opened, and what the operator can do."""
    lines = str(exc.orig).strip().splitlines() if exc.orig is not None else []
    reason = lines[0] if lines else type(exc).__name__
    if engine.dialect.name != "sqlite":
        where = engine.url.render_as_string(hide_password=True)
        return IndexUnavailableError(
            f"the index database at {where} cannot be used ({reason}). Check that "
            "the server runs and accepts this host and user, and database_url"
        )
    path = engine.url.database or ":memory:"
    code = getattr(exc.orig, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        what = (
            f"is not a valid SQLite database ({reason})"
            if primary == _SQLITE_NOTADB
            else f"is damaged ({reason}; quick_check: {_quick_check(path)})"
        )
        return IndexCorruptError(
            f"the index at {path} {what}. Stop every dicom-node process using it, "
            f"move it aside (mv {path} {path}.corrupt; and, where they exist, "
            f"mv {path}-wal {path}.corrupt-wal; rm {path}-shm) and start again: "
            "a new index is made; instances under state_dir/storage stay but the "
            "new index does not know them (re-send the studies from the PACS). Or "
            f"restore it from a backup; 'sqlite3 {path}.corrupt .recover' may save "
            "its rows"
        )
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return IndexUnavailableError(
            f"the index at {path} stayed locked by another process ({reason}): "
            "end the program holding it (a sqlite3 shell, a backup) and start again"
        )
    return IndexUnavailableError(
        f"the index at {path} cannot be opened ({reason}): check that its folder "
        f"exists, that this user may read and write it and {path}-wal and "
        f"{path}-shm beside it, and that the disk is not full"
    )


def _quick_check(path: str) -> str:
    # Only on a failed start: on a 100k-instance index it takes ~0.15-0.2 s.
    try:
        with closing(
            sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=1.0)
        ) as conn:
            row = conn.execute("PRAGMA quick_check(1)").fetchone()
    except sqlite3.Error as exc:
        return str(exc)
    text = str(row[0]) if row else "no answer"
    return " ".join(text.split())[:200]
