"""The index database: SQLAlchemy 2 models and the few transactions the node runs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

__all__ = [
    "JOB_STATES",
    "AssociationRecord",
    "Base",
    "ErrorRecord",
    "IndexDB",
    "Instance",
    "InstanceRecordRequest",
    "Job",
    "Series",
    "Study",
    "utc_now",
]

logger = logging.getLogger(__name__)

JOB_STATES = ("pending", "running", "done", "failed", "skipped")

T = TypeVar("T")


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
    model: Mapped[str] = mapped_column(String(500))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, nullable=True
    )
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    study: Mapped[Study] = relationship()

    __table_args__ = (Index("ix_jobs_state", "state"),)


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


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """The index's view of an instance already stored.

    Parameters
    ----------
    study_instance_uid
        The study it is filed under.
    series_instance_uid
        The series it is filed under.
    sha256
        SHA-256 of its data set.
    """

    study_instance_uid: str
    series_instance_uid: str
    sha256: str


class IndexDB:
    """The index: an engine, a session factory and the node's transactions.

    Parameters
    ----------
    url
        SQLAlchemy URL: ``sqlite:///...`` (WAL mode) or ``postgresql+psycopg://...``.
    pool_size
        Connections kept open; the node's threads beyond that wait for one.
    """

    def __init__(self, url: str, pool_size: int = 8) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": pool_size}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self.sessions: sessionmaker[Session] = sessionmaker(
            self.engine, expire_on_commit=False
        )
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

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
        for attempt in range(1, attempts + 1):
            try:
                with self.sessions.begin() as session:
                    return work(session)
            except IntegrityError:
                if attempt == attempts:
                    raise
                logger.debug("unique-key race, retrying the transaction")
        raise AssertionError("unreachable")  # pragma: no cover

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

        return self.run(work)

    def close_association(self, association_id: int, outcome: str) -> None:
        """Record how an association ended.

        Parameters
        ----------
        association_id
            The id from :meth:`open_association`.
        outcome
            ``released`` or ``aborted``.
        """
        now = utc_now()
        self.run(
            lambda s: s.execute(
                update(AssociationRecord)
                .where(AssociationRecord.id == association_id)
                .values(outcome=outcome, ended_at=now)
            )
        )

    # --- instances ----------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> StoredInstance | None:
        """Return where an instance is filed, or None when it is new.

        Parameters
        ----------
        sop_instance_uid
            The instance's UID.

        Returns
        -------
        StoredInstance or None
            Its study, series and data set hash.
        """
        with self.sessions() as session:
            row = session.execute(
                select(
                    Study.study_instance_uid,
                    Series.series_instance_uid,
                    Instance.sha256,
                )
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
                .where(Instance.sop_instance_uid == sop_instance_uid)
            ).one_or_none()
        if row is None:
            return None
        return StoredInstance(row[0], row[1], row[2])

    def record_instance(self, rq: InstanceRecordRequest) -> bool:
        """Index a stored instance and mark its study for processing.

        Parameters
        ----------
        rq
            What to record.

        Returns
        -------
        bool
            True when the instance is new, False when it replaced a stored copy.
        """
        now = utc_now()

        def work(session: Session) -> bool:
            study = session.execute(
                select(Study).where(Study.study_instance_uid == rq.study_instance_uid)
            ).scalar_one_or_none()
            if study is None:
                study = Study(
                    study_instance_uid=rq.study_instance_uid,
                    first_received_at=now,
                    last_received_at=now,
                    needs_processing=True,
                )
                session.add(study)
                session.flush()
            else:
                study.last_received_at = now
                study.needs_processing = True
            series = session.execute(
                select(Series).where(
                    Series.series_instance_uid == rq.series_instance_uid
                )
            ).scalar_one_or_none()
            if series is None:
                series = Series(
                    series_instance_uid=rq.series_instance_uid,
                    study_id=study.id,
                    modality=rq.modality,
                )
                session.add(series)
                session.flush()
            instance = session.execute(
                select(Instance).where(Instance.sop_instance_uid == rq.sop_instance_uid)
            ).scalar_one_or_none()
            is_new = instance is None
            if instance is None:
                instance = Instance(sop_instance_uid=rq.sop_instance_uid)
                session.add(instance)
            instance.sop_class_uid = rq.sop_class_uid
            instance.transfer_syntax_uid = rq.transfer_syntax_uid
            instance.series_id = series.id
            instance.path = rq.path
            instance.size = rq.size
            instance.sha256 = rq.sha256
            instance.received_at = now
            instance.association_id = rq.association_id
            if rq.association_id is not None:
                session.execute(
                    update(AssociationRecord)
                    .where(AssociationRecord.id == rq.association_id)
                    .values(instances_stored=AssociationRecord.instances_stored + 1)
                )
            return is_new

        return self.run(work)

    def count_duplicate(self, association_id: int | None) -> None:
        """Count an identical re-sent instance as stored for its association.

        Parameters
        ----------
        association_id
            The association it came in on.
        """
        if association_id is None:
            return
        self.run(
            lambda s: s.execute(
                update(AssociationRecord)
                .where(AssociationRecord.id == association_id)
                .values(instances_stored=AssociationRecord.instances_stored + 1)
            )
        )

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
            if association_id is not None and source == "store":
                session.execute(
                    update(AssociationRecord)
                    .where(AssociationRecord.id == association_id)
                    .values(instances_failed=AssociationRecord.instances_failed + 1)
                )

        try:
            self.run(work)
        except OperationalError as exc:
            # The index itself is failing (full disk, locked): the log still has it.
            logger.warning(
                "could not record an error in the index: %s", type(exc).__name__
            )

    # --- status -------------------------------------------------------------

    def status(self, last_errors: int = 10) -> dict[str, Any]:
        """Return counts of what the index holds, and the last errors.

        Parameters
        ----------
        last_errors
            How many of the most recent errors to include.

        Returns
        -------
        dict
            ``associations``, ``studies``, ``series``, ``instances``, ``jobs``
            (state -> count) and ``last_errors``.
        """
        with self.sessions() as session:

            def count(model: type[Base]) -> int:
                return int(session.scalar(select(func.count()).select_from(model)) or 0)

            jobs = dict.fromkeys(JOB_STATES, 0)
            for state, n in session.execute(
                select(Job.state, func.count()).group_by(Job.state)
            ):
                jobs[state] = int(n)
            associations = {
                outcome: int(n)
                for outcome, n in session.execute(
                    select(AssociationRecord.outcome, func.count()).group_by(
                        AssociationRecord.outcome
                    )
                )
            }
            errors = session.scalars(
                select(ErrorRecord).order_by(ErrorRecord.id.desc()).limit(last_errors)
            ).all()
            return {
                "associations": count(AssociationRecord),
                "associations_by_outcome": associations,
                "studies": count(Study),
                "series": count(Series),
                "instances": count(Instance),
                "studies_waiting": int(
                    session.scalar(
                        select(func.count())
                        .select_from(Study)
                        .where(Study.needs_processing.is_(True))
                    )
                    or 0
                ),
                "jobs": jobs,
                "last_errors": [
                    {
                        "at": e.at.isoformat(),
                        "source": e.source,
                        "status": None if e.status is None else f"0x{e.status:04X}",
                        "message": e.message,
                    }
                    for e in errors
                ],
            }


def _configure_sqlite(engine: Engine) -> None:
    # WAL lets readers run beside the one writer; synchronous=FULL makes each
    # commit durable across a power cut, not only a process crash.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below issue BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    # BEGIN IMMEDIATE takes the write lock up front, so a transaction never has to
    # upgrade a read lock and fail with SQLITE_BUSY when another process writes.
    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
