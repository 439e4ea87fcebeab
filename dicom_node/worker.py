"""The worker: claims jobs, scores studies, writes results and fills the outbox.

Every step is a state change in the index. A job is claimed with a lease
(``lease_seconds``); a worker that dies loses its jobs when the lease expires
(at once when it was a process of this host that is gone), and another worker
takes them. A result set's UIDs are derived from the study, the model's Device
UID and the run, so a job that is done again after a crash writes the same
objects, and the PACS ends up with one copy.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node.config import ModelConfig, ModelMatch, NodeConfig
from dicom_node.eligibility import model_match, passed_over_reason
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.export import Peer, send_files
from dicom_node.identity import node_device_uid
from dicom_node.index import (
    AssociationRecord,
    Delivery,
    IndexDB,
    Instance,
    Job,
    ResultRecord,
    Series,
    Study,
    utc_now,
)
from dicom_node.log import describe_exception, uid_ref
from dicom_node.results import NodeIdentity
from dicom_node.results.builder import BuildRequest, Built, ResultBuilder
from dicom_node.tls import client_context
from inference import (
    Classifier,
    InferenceError,
    ModelArtifact,
    PreprocessError,
    StudyPrediction,
    set_cpu_threads,
)

__all__ = [
    "JobOutcome",
    "ModelCache",
    "Outbox",
    "Scored",
    "StudyImage",
    "Worker",
    "Workers",
    "backoff",
    "claim_deliveries",
    "claim_jobs",
    "complete_jobs",
    "eligible_images",
    "lower_thread_priority",
    "process_jobs",
    "recover_local_leases",
    "requeue",
    "results_root",
    "run_deliveries",
    "scoring_threads",
    "start_workers",
    "study_images",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
# Result sets sent to one peer over one association (an SR and its captures each).
_DELIVERIES_AT_ONCE = 16


def results_root(config: NodeConfig) -> Path:
    """Return the folder result sets are written under."""
    return config.state_dir / "results"


def backoff(attempts: int, first: float, longest: float) -> float:
    """Seconds to wait after ``attempts`` failed tries: doubling, with jitter.

    Parameters
    ----------
    attempts
        Tries so far (1 after the first failure).
    first
        The wait after the first failure.
    longest
        The cap.

    Returns
    -------
    float
        A wait between half and all of ``min(longest, first * 2**(attempts-1))``.
    """
    ceiling = min(longest, first * float(2 ** max(0, attempts - 1)))
    return float(ceiling * random.uniform(0.5, 1.0))


def _owner(name: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{name}"[:100]


def recover_local_leases(index: IndexDB) -> int:
    """Release the leases of this host's processes that are gone.

    Parameters
    ----------
    index
        The index.

    Returns
    -------
    int
        How many jobs and deliveries were released.
    """
    host = socket.gethostname()

    def gone(owner: str | None) -> bool:
        if not owner:
            return False
        parts = owner.split(":")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            return False
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def work(session: Session) -> int:
        released = 0
        for table, state in ((Job, "running"), (Delivery, "sending")):
            rows = session.execute(
                select(table.id, table.lease_owner).where(table.state == state)
            ).all()
            for row_id, owner in rows:
                if gone(owner):
                    session.execute(
                        update(table)
                        .where(table.id == row_id, table.lease_owner == owner)
                        .values(lease_expires_at=utc_now() - timedelta(seconds=1))
                    )
                    released += 1
        return released

    return index.run(work)


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job this worker holds the lease of."""

    id: int
    study_id: int
    study_uid: str
    model: str
    attempts: int
    owner: str


def claim_jobs(
    index: IndexDB, owner: str, lease_seconds: float, max_attempts: int, limit: int
) -> list[ClaimedJob]:
    """Claim the oldest due jobs: pending, or running with an expired lease.

    A job whose worker died more than ``max_attempts`` times is marked failed
    instead of being claimed again.

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

    Returns
    -------
    list of ClaimedJob
        Oldest first; empty when nothing is due.
    """

    def work(session: Session) -> list[ClaimedJob]:
        now = utc_now()
        due = or_(
            and_(
                Job.state == "pending",
                or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
            ),
            and_(Job.state == "running", Job.lease_expires_at < now),
        )
        rows = session.execute(
            select(Job.id, Job.state, Job.attempts, Job.study_id, Job.model)
            .where(due)
            .order_by(Job.id)
            .limit(limit + 8)
            .with_for_update(skip_locked=True)
        ).all()
        claimed_jobs: list[ClaimedJob] = []
        for job_id, state, attempts, study_id, model in rows:
            if len(claimed_jobs) == limit:
                break
            if state == "running" and attempts >= max_attempts:
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == "running")
                    .values(
                        state="failed",
                        updated_at=now,
                        lease_owner=None,
                        lease_expires_at=None,
                        last_error=f"its worker stopped during {attempts} tries",
                    )
                )
                continue
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == state, Job.attempts == attempts)
                .values(
                    state="running",
                    attempts=attempts + 1,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    updated_at=now,
                )
            )
            if getattr(claimed, "rowcount", 0) != 1:
                continue
            study_uid = session.scalar(
                select(Study.study_instance_uid).where(Study.id == study_id)
            )
            claimed_jobs.append(
                ClaimedJob(job_id, study_id, str(study_uid), model, attempts + 1, owner)
            )
        return claimed_jobs

    return index.run(work)


@dataclass(frozen=True, slots=True)
class StudyImage:
    """A stored instance of a study, with who sent it."""

    path: Path
    sop_class_uid: str
    modality: str | None
    calling_ae_title: str | None
    peer_address: str | None


def study_images(index: IndexDB, study_id: int, storage_root: Path) -> list[StudyImage]:
    """Return the stored instances of a study.

    Parameters
    ----------
    index
        The index.
    study_id
        The study's row id.
    storage_root
        The storage folder the instance paths are relative to.

    Returns
    -------
    list of StudyImage
        In the order they were received.
    """
    with index.sessions() as session:
        rows = session.execute(
            select(
                Instance.path,
                Instance.sop_class_uid,
                Series.modality,
                AssociationRecord.calling_ae_title,
                AssociationRecord.peer_address,
            )
            .join(Series, Instance.series_id == Series.id)
            .outerjoin(
                AssociationRecord, Instance.association_id == AssociationRecord.id
            )
            .where(Series.study_id == study_id)
            .order_by(Instance.id)
        ).all()
    return [
        StudyImage(storage_root / path, sop_class, modality, calling, address)
        for path, sop_class, modality, calling, address in rows
    ]


def eligible_images(
    images: Sequence[StudyImage],
    datasets: Sequence[Dataset],
    match: ModelMatch | None,
    accepts: dict[str, list[str]],
) -> tuple[list[Dataset], str]:
    """Pick the images a model runs on.

    The rule is :func:`dicom_node.eligibility.passed_over_reason`, the one
    offline ``dicom-node score`` applies: image storage SOP classes only, never
    the node's own results, then the match.

    Parameters
    ----------
    images
        The study's instances.
    datasets
        The same instances, read.
    match
        The configured match, or None to use the model's own ``accepts``.
    accepts
        The artifact's accepted modalities, body parts and SOP classes.

    Returns
    -------
    tuple
        The eligible data sets, and why none was (empty when some were).
    """
    if match is None:
        match = model_match(accepts)
    chosen: list[Dataset] = []
    reasons: set[str] = set()
    for image, ds in zip(images, datasets, strict=True):
        reason = passed_over_reason(
            ds, image.sop_class_uid, match, image.calling_ae_title
        )
        if reason:
            reasons.add(reason)
        else:
            chosen.append(ds)
    if chosen:
        return chosen, ""
    return [], "no image the model accepts (" + "; ".join(sorted(reasons)) + ")"


class ModelCache:
    """Loads each configured model once (again when its file changes).

    Parameters
    ----------
    device
        Where models run; empty for CUDA when present.
    """

    def __init__(self, device: str = "") -> None:
        self.device = device or None
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[float, Classifier]] = {}

    def get(self, model: ModelConfig) -> Classifier:
        """Return the classifier of a configured model.

        Raises
        ------
        DicomNodeError
            If the file is missing.
        inference.ArtifactError
            If it is not a valid model file or its SHA-256 differs from the pin.
        """
        try:
            mtime = model.path.stat().st_mtime
        except OSError as exc:
            raise DicomNodeError(f"model file {model.path} not found") from exc
        with self._lock:
            cached = self._loaded.get(model.key)
            if cached is not None and cached[0] == mtime:
                return cached[1]
            artifact = ModelArtifact.load(model.path, expected_sha256=model.sha256)
            # Traced: the node's other threads must not stall the forward pass.
            classifier = Classifier(artifact, self.device, trace=True)
            self._loaded[model.key] = (mtime, classifier)
            logger.info(
                "loaded model %s %s (%s) on %s%s",
                artifact.name,
                artifact.version,
                model.path.name,
                classifier.device,
                " (traced)" if classifier.traced else "",
            )
            return classifier


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What became of a job: done, skipped, retry or failed, and why."""

    state: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Scoring:
    """A claimed job whose study is read and has images for its model."""

    job: ClaimedJob
    classifier: Classifier
    images: list[StudyImage]
    chosen: list[Dataset]


# Builds result sets in the calling thread (no results processes).
_INLINE = ResultBuilder(0)

# Scored studies and their predictions, on their way to results.
Scored = list[tuple["_Scoring", StudyPrediction]]


def process_jobs(
    jobs: Sequence[ClaimedJob],
    config: NodeConfig,
    index: IndexDB,
    models: ModelCache,
    finish: Callable[[Scored, float], None],
) -> None:
    """Score claimed studies with their models; hand each scored group on.

    Small studies of one model share forward passes (a burst of one-image
    studies is scored a batch at a time); a study with a batch of images or
    more is scored alone, so memory stays bounded. A job that fails does not
    fail the others: it is retried with backoff, then marked failed.

    Parameters
    ----------
    jobs
        The claimed jobs.
    config
        The node configuration.
    index
        The index.
    models
        Loaded models.
    finish
        Called with each scored group and when its scoring started: writes the
        results and queues the deliveries (:func:`complete_jobs`).
    """
    waiting: list[_Scoring] = []  # read, not scored yet: one model, < a batch

    def score_waiting() -> None:
        if waiting:
            started = time.perf_counter()
            finish(_score_together(waiting, config, index), started)
            waiting.clear()

    for job in jobs:
        prepared = _guard(job, config, index, _prepare, job, config, index, models)
        if isinstance(prepared, JobOutcome):
            continue
        if waiting and waiting[0].classifier is not prepared.classifier:
            score_waiting()
        waiting.append(prepared)
        if sum(len(w.chosen) for w in waiting) >= prepared.classifier.batch_size:
            score_waiting()
    score_waiting()


def complete_jobs(
    scored: Scored,
    config: NodeConfig,
    index: IndexDB,
    started: float,
    builder: ResultBuilder | None = None,
) -> list[JobOutcome]:
    """Write the results of scored studies and queue their deliveries.

    Parameters
    ----------
    scored
        Studies and their predictions.
    config
        The node configuration.
    index
        The index.
    started
        When their scoring started (for the log).
    builder
        Builds and writes the result sets (in its processes); None: here.

    Returns
    -------
    list of JobOutcome
        One per study; each job row is updated to match.
    """
    return [
        _guard(
            scoring.job,
            config,
            index,
            _complete,
            scoring,
            prediction,
            config,
            index,
            started,
            builder or _INLINE,
        )
        for scoring, prediction in scored
    ]


def _guard(
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
    it again by hand; new images for the study make a new job).
    """
    try:
        return step(*args)
    except PreprocessError as exc:
        reason = f"{exc}; not retried: the same stored images would fail again"
        return _finish(index, job, "failed", reason)
    except Exception as exc:  # noqa: BLE001 - e.g. a stored file pydicom cannot read
        detail = (
            str(exc)
            if isinstance(exc, DicomNodeError | InferenceError)
            else describe_exception(exc)
        )
        return _retry_or_fail(index, job, config, detail)


def _prepare(
    job: ClaimedJob, config: NodeConfig, index: IndexDB, models: ModelCache
) -> _Scoring | JobOutcome:
    model = next((m for m in config.models if m.key == job.model), None)
    if model is None:
        return _finish(index, job, "failed", "model no longer configured")
    classifier = models.get(model)
    images = study_images(index, job.study_id, config.storage_dir)
    datasets = [dcmread(i.path) for i in images]
    chosen, reason = eligible_images(
        images, datasets, model.match, classifier.artifact.accepts
    )
    if not chosen:
        return _finish(index, job, "skipped", reason)
    return _Scoring(job, classifier, images, chosen)


def _score_together(
    group: Sequence[_Scoring], config: NodeConfig, index: IndexDB
) -> Scored:
    """Score studies of one model in shared batches (one by one if that fails)."""
    if len(group) > 1:
        try:
            predictions = group[0].classifier.predict_many(
                [s.chosen for s in group], explain_top_k=config.gradcam_top_k
            )
        except Exception:  # noqa: BLE001 - found again below, study by study
            logger.info(
                "a batch of %d studies failed; scoring them one by one", len(group)
            )
        else:
            return list(zip(group, predictions, strict=True))
    scored: Scored = []
    for scoring in group:
        prediction = _guard(
            scoring.job,
            config,
            index,
            scoring.classifier.predict,
            scoring.chosen,
            config.gradcam_top_k,
        )
        if not isinstance(prediction, JobOutcome):
            scored.append((scoring, prediction))
    return scored


def _complete(
    scoring: _Scoring,
    prediction: StudyPrediction,
    config: NodeConfig,
    index: IndexDB,
    started: float,
    builder: ResultBuilder,
) -> JobOutcome:
    """Write a scored study's results and queue its deliveries."""
    job, classifier = scoring.job, scoring.classifier
    previous = _previous(index, job)
    run = previous[0] + 1 if previous else 1
    folder = f"{job.study_uid}/{classifier.artifact.device_uid}-run{run}"
    built = builder.build(
        BuildRequest(
            # The images as stored: a results process reads them itself rather
            # than receiving their pixels; here, the data sets read are used.
            sources=tuple(Path(str(ds.filename)) for ds in scoring.chosen),
            prediction=prediction,
            run=run,
            node=NodeIdentity(
                config.ae_title, node_device_uid(config.ae_title, config.device_uid)
            ),
            folder=results_root(config) / folder,
            previous_sr=(
                results_root(config) / previous[1] / "sr.dcm" if previous else None
            ),
            jpeg=config.results_jpeg,
            parametric_map=config.results_parametric_map,
            explain_absent=config.results_explain_absent,
        ),
        scoring.chosen,
    )
    peers = _destinations(config, scoring.images)
    outcome = _commit(index, job, built, prediction, folder, peers)
    logger.info(
        "study %s scored by %s in %.2f s: %s; %d delivery(ies) queued",
        uid_ref(job.study_uid),
        prediction.model_name,
        time.perf_counter() - started,
        ", ".join(
            f"{p.label.name} {'positive' if p.positive else 'negative'}"
            for p in prediction.labels
        ),
        len(peers),
    )
    return outcome


def _previous(index: IndexDB, job: ClaimedJob) -> tuple[int, str] | None:
    with index.sessions() as session:
        row = session.execute(
            select(ResultRecord.run, ResultRecord.folder)
            .where(
                ResultRecord.study_id == job.study_id, ResultRecord.model == job.model
            )
            .order_by(ResultRecord.run.desc())
            .limit(1)
        ).first()
    return (int(row[0]), str(row[1])) if row else None


def _destinations(
    config: NodeConfig, images: Sequence[StudyImage]
) -> list[tuple[str, Peer]]:
    peers: list[tuple[str, Peer]] = [
        (d.name, Peer(d.ae_title, d.host, d.port)) for d in config.destinations
    ]
    senders = {
        (i.calling_ae_title, i.peer_address) for i in images if i.calling_ae_title
    }
    for caller in config.callers:
        port = caller.results_port
        if port is None:
            continue
        for ae_title, address in sorted(senders, key=str):
            if ae_title != caller.ae_title or address is None:
                continue
            if caller.host is not None and caller.host != address:
                continue
            peer = Peer(caller.ae_title, caller.host or address, port)
            peers.append((f"caller {caller.ae_title}", peer))
    unique: dict[Peer, str] = {}
    for name, peer in peers:
        unique.setdefault(peer, name)
    return [(name, peer) for peer, name in unique.items()]


def _commit(
    index: IndexDB,
    job: ClaimedJob,
    result: Built,
    prediction: StudyPrediction,
    folder: str,
    peers: Sequence[tuple[str, Peer]],
) -> JobOutcome:
    summary = json.dumps(
        {
            p.label.name: {"probability": p.probability, "positive": p.positive}
            for p in prediction.labels
        }
    )

    def work(session: Session) -> int | None:
        now = utc_now()
        done = session.execute(
            update(Job)
            .where(
                Job.id == job.id, Job.state == "running", Job.lease_owner == job.owner
            )
            .values(
                state="done",
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
                last_error=None,
            )
        )
        if getattr(done, "rowcount", 0) != 1:
            return None  # the lease ran out and another worker has the job
        record = ResultRecord(
            job_id=job.id,
            study_id=job.study_id,
            model=job.model,
            run=result.run,
            device_uid=prediction.device_uid,
            sr_sop_instance_uid=result.sr_uid,
            folder=folder,
            summary=summary,
            created_at=now,
        )
        session.add(record)
        session.flush()
        for name, peer in peers:
            session.add(
                Delivery(
                    result_id=record.id,
                    destination=name[:100],
                    ae_title=peer.ae_title,
                    host=peer.host,
                    port=peer.port,
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
        return record.id

    result_id = index.run(work)
    if result_id is None:
        logger.warning(
            "job %d: lease lost before it was done; left to its new worker", job.id
        )
        return JobOutcome("lost", "lease lost")
    return JobOutcome("done")


def _finish(index: IndexDB, job: ClaimedJob, state: str, detail: str) -> JobOutcome:
    def work(session: Session) -> None:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.lease_owner == job.owner)
            .values(
                state=state,
                updated_at=utc_now(),
                lease_owner=None,
                lease_expires_at=None,
                last_error=detail[:2000],
            )
        )

    index.run(work)
    log = logger.info if state == "skipped" else logger.error
    log("job %d (study %s) %s: %s", job.id, uid_ref(job.study_uid), state, detail)
    return JobOutcome(state, detail)


def _retry_or_fail(
    index: IndexDB, job: ClaimedJob, config: NodeConfig, detail: str
) -> JobOutcome:
    if job.attempts >= config.job_attempts:
        return _finish(index, job, "failed", f"after {job.attempts} tries: {detail}")
    wait = backoff(job.attempts, config.retry_after, config.retry_max)

    def work(session: Session) -> None:
        now = utc_now()
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.lease_owner == job.owner)
            .values(
                state="pending",
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
                next_attempt_at=now + timedelta(seconds=wait),
                last_error=detail[:2000],
            )
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
    return JobOutcome("retry", detail)


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery this worker holds the lease of."""

    id: int
    folder: str
    destination: str
    peer: Peer
    attempts: int
    owner: str


def claim_deliveries(
    index: IndexDB, owner: str, lease_seconds: float, limit: int
) -> list[ClaimedDelivery]:
    """Claim the oldest due delivery and up to ``limit - 1`` more to its peer.

    Due: pending and due, or sending with an expired lease. Deliveries to one
    peer are claimed together so they share one association.

    Parameters
    ----------
    index
        The index.
    owner
        Who claims them.
    lease_seconds
        How long the claim holds.
    limit
        Most deliveries to claim.

    Returns
    -------
    list of ClaimedDelivery
        Oldest first, all to one peer; empty when nothing is due.
    """

    def work(session: Session) -> list[ClaimedDelivery]:
        now = utc_now()
        due = or_(
            and_(Delivery.state == "pending", Delivery.next_attempt_at <= now),
            and_(Delivery.state == "sending", Delivery.lease_expires_at < now),
        )
        rows = session.execute(
            select(Delivery, ResultRecord.folder)
            .join(ResultRecord, Delivery.result_id == ResultRecord.id)
            .where(due)
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit + 8)
            .with_for_update(skip_locked=True)
        ).all()
        claimed: list[ClaimedDelivery] = []
        for delivery, folder in rows:
            delivery_id, state, attempts = (
                delivery.id,
                delivery.state,
                delivery.attempts,
            )
            peer = Peer(delivery.ae_title, delivery.host, delivery.port)
            if len(claimed) == limit or (claimed and peer != claimed[0].peer):
                continue
            done = session.execute(
                update(Delivery)
                .where(
                    Delivery.id == delivery_id,
                    Delivery.state == state,
                    Delivery.attempts == attempts,
                )
                .values(
                    state="sending",
                    attempts=attempts + 1,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if getattr(done, "rowcount", 0) != 1:
                continue
            claimed.append(
                ClaimedDelivery(
                    delivery_id,
                    str(folder),
                    delivery.destination,
                    peer,
                    attempts + 1,
                    owner,
                )
            )
        return claimed

    return index.run(work)


def _delivery_tls(config: NodeConfig, destination: str) -> ssl.SSLContext | None:
    # A configured destination says itself; results sent back to a caller go
    # over TLS when the node's own port speaks it.
    for d in config.destinations:
        if d.name == destination:
            return client_context(config, d) if d.tls else None
    return client_context(config) if config.tls is not None else None


def run_deliveries(
    deliveries: Sequence[ClaimedDelivery], config: NodeConfig, index: IndexDB
) -> list[str]:
    """Send result sets to their (one) peer over one association; record each outcome.

    Parameters
    ----------
    deliveries
        Claimed deliveries, all to one peer.
    config
        The node configuration (AE title, attempts, backoff).
    index
        The index.

    Returns
    -------
    list of str
        Each delivery's new state: done, pending (to be retried) or dead.
    """
    errors: dict[int, str] = {}
    owner_of: dict[Path, int] = {}
    for delivery in deliveries:
        folder = results_root(config) / delivery.folder
        files = [
            *sorted(folder.glob("sc-*.dcm")),
            *sorted(folder.glob("pm-*.dcm")),
            folder / "sr.dcm",
        ]
        if all(f.is_file() for f in files):
            owner_of.update(dict.fromkeys(files, delivery.id))
        else:
            errors[delivery.id] = "result files missing"
    if owner_of:
        try:
            tls = _delivery_tls(config, deliveries[0].destination)
        except ConfigError as exc:
            tls = None
            for delivery in deliveries:
                errors.setdefault(delivery.id, str(exc))
            owner_of.clear()
        report = send_files(
            list(owner_of),
            deliveries[0].peer,
            calling_ae_title=config.ae_title,
            tls=tls,
        )
        sent: dict[int, list[bool]] = {}
        for outcome in report.outcomes:
            delivery_id = owner_of[outcome.path]
            sent.setdefault(delivery_id, []).append(outcome.ok)
            if not outcome.ok and delivery_id not in errors:
                errors[delivery_id] = outcome.error or "not accepted"
        for delivery_id, oks in sent.items():
            if not all(oks):
                errors[delivery_id] = (
                    f"{oks.count(False)} of {len(oks)} not accepted: "
                    f"{errors[delivery_id]}"
                )
    now = utc_now()
    changes: list[tuple[ClaimedDelivery, str, dict[str, object]]] = []
    for delivery in deliveries:
        error = errors.get(delivery.id, "")
        values: dict[str, object]
        if not error:
            state, values = "done", {"delivered_at": now, "last_error": None}
        elif delivery.attempts >= config.delivery_attempts:
            state, values = "dead", {"last_error": error[:2000]}
        else:
            wait = backoff(delivery.attempts, config.retry_after, config.retry_max)
            state = "pending"
            values = {
                "last_error": error[:2000],
                "next_attempt_at": now + timedelta(seconds=wait),
            }
        changes.append((delivery, state, values))

    def work(session: Session) -> None:
        for delivery, state, values in changes:
            session.execute(
                update(Delivery)
                .where(
                    Delivery.id == delivery.id, Delivery.lease_owner == delivery.owner
                )
                .values(
                    state=state,
                    updated_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                    **values,
                )
            )

    index.run(work)
    for delivery, state, _ in changes:
        if state == "done":
            logger.info(
                "delivered result set %s to %s",
                delivery.folder.split("/")[-1],
                delivery.destination,
            )
        else:
            logger.warning(
                "delivery %d to %s, try %d: %s (now %s)",
                delivery.id,
                delivery.destination,
                delivery.attempts,
                errors[delivery.id],
                state,
            )
    return [state for _, state, _ in changes]


class _Loop:
    """A daemon thread that calls ``step`` until stopped, resting when idle."""

    def __init__(self, name: str, idle: float = 0.5) -> None:
        self.name = name
        self.idle = idle
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

    def step(self) -> bool:
        """Do one piece of work; return whether there was any."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.step()
            except SQLAlchemyError as exc:
                logger.warning(
                    "%s: index unavailable (%s)", self.name, type(exc).__name__
                )
                busy = False
            except Exception as exc:  # noqa: BLE001 - keep the thread alive
                logger.error("%s: unexpected %s", self.name, describe_exception(exc))
                busy = False
            if not busy and not self._stop.is_set():
                self.wake.wait(self.idle)
                self.wake.clear()


class Worker(_Loop):
    """Claims and scores jobs in a thread; a second thread writes their results.

    Scoring (torch, which releases the GIL) and writing results (DICOM
    encoding, files, the index) overlap: while one group's results are
    written, the next group is scored. One scored group waits at most
    (memory: a group being written, one waiting, one being scored).

    The scoring thread runs ``scoring_nice`` steps below the node's other
    threads (:func:`lower_thread_priority`): on a busy small CPU, receiving,
    writing results and sending (which hold Python's GIL, so everything else
    waits while they are off the CPU) come first, and the model uses the CPU
    time they leave.

    Parameters
    ----------
    config
        The node configuration.
    index
        The index.
    models
        The shared model cache.
    name
        The thread's name (part of the lease owner).
    builder
        Builds and writes the result sets (the process's results pool);
        None: the results thread builds them itself.
    """

    def __init__(
        self,
        config: NodeConfig,
        index: IndexDB,
        models: ModelCache,
        name: str,
        builder: ResultBuilder | None = None,
    ) -> None:
        super().__init__(name)
        self.config, self.index, self.models = config, index, models
        self.builder = builder or _INLINE
        self.owner = _owner(name)
        self.on_delivery_queued: Callable[[], None] | None = None
        self._scored: queue.Queue[tuple[Scored, float] | None] = queue.Queue(1)
        self._writer = threading.Thread(
            target=self._write_results, name=f"{name}-results", daemon=True
        )

    def start(self) -> None:
        """Start the scoring and the results threads."""
        self._writer.start()
        super().start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming; write the results of what was scored, then stop."""
        super().stop(timeout)
        self._scored.put(None)
        if self._writer.is_alive():
            self._writer.join(timeout)

    def _run(self) -> None:
        lower_thread_priority(self.config.scoring_nice)
        self._load_models()
        super()._run()

    def _load_models(self) -> None:
        """Load (and trace) the configured models before a study waits for them."""
        for model in self.config.models:
            if self._stop.is_set():
                return
            try:
                self.models.get(model)
            except Exception as exc:  # noqa: BLE001 - a job that needs it says why
                logger.debug(
                    "model %s not loaded at start: %s",
                    model.path.name,
                    describe_exception(exc),
                )

    def step(self) -> bool:
        """Claim due jobs (up to ``batch_studies``) and score them."""
        jobs = claim_jobs(
            self.index,
            self.owner,
            self.config.lease_seconds,
            self.config.job_attempts,
            self.config.batch_studies,
        )
        if not jobs:
            return False
        process_jobs(
            jobs,
            self.config,
            self.index,
            self.models,
            lambda scored, started: self._scored.put((scored, started)),
        )
        return True

    def _write_results(self) -> None:
        try:  # while no study waits for it
            self.builder.start()
        except Exception as exc:  # noqa: BLE001 - the first study tries again
            logger.error(
                "%s: results processes: %s", self.name, describe_exception(exc)
            )
        while (item := self._scored.get()) is not None:
            try:
                outcomes = complete_jobs(
                    item[0], self.config, self.index, item[1], self.builder
                )
            except Exception as exc:  # noqa: BLE001 - keep the thread alive
                # Only the index can fail here (a job's own errors are handled);
                # the leases run out and the jobs are done again.
                logger.error("%s: %s", self.name, describe_exception(exc))
                continue
            if self.on_delivery_queued is not None and any(
                o.state == "done" for o in outcomes
            ):
                self.on_delivery_queued()


class Outbox(_Loop):
    """Sends due deliveries in a thread.

    Parameters
    ----------
    config
        The node configuration.
    index
        The index.
    name
        The thread's name (part of the lease owner).
    """

    def __init__(self, config: NodeConfig, index: IndexDB, name: str) -> None:
        super().__init__(name)
        self.config, self.index = config, index
        self.owner = _owner(name)

    def step(self) -> bool:
        """Claim due deliveries to one peer and send them over one association."""
        deliveries = claim_deliveries(
            self.index, self.owner, self.config.lease_seconds, _DELIVERIES_AT_ONCE
        )
        if not deliveries:
            return False
        run_deliveries(deliveries, self.config, self.index)
        return True


class Workers:
    """The job threads and the outbox thread of one process.

    Parameters
    ----------
    loops
        The started threads: job threads first, the outbox last.
    restore_threads
        torch's CPU threads before the job threads set theirs: set again when
        they stop (a node embedded in a larger program leaves it as it was).
    builder
        The results processes the job threads share; stopped last.
    """

    def __init__(
        self,
        loops: Sequence[_Loop],
        restore_threads: int | None = None,
        builder: ResultBuilder | None = None,
    ) -> None:
        self.loops = list(loops)
        self._restore_threads = restore_threads
        self._builder = builder

    def nudge(self) -> None:
        """Wake the job threads: new jobs were queued."""
        for loop in self.loops:
            if isinstance(loop, Worker):
                loop.wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop every thread after its current step."""
        for loop in self.loops:
            loop.stop(timeout)
        if self._builder is not None:
            self._builder.close()
            self._builder = None
        if self._restore_threads is not None:
            set_cpu_threads(self._restore_threads)
            self._restore_threads = None


def scoring_threads(configured: int, workers: int) -> int:
    """Return the CPU threads torch gets per forward pass (``torch_threads``).

    Parameters
    ----------
    configured
        ``[node] torch_threads``; 0 for automatic.
    workers
        Scoring threads of the process: their forward passes run at once, each
        with this many threads.

    Returns
    -------
    int
        ``configured``, or when 0 one less than the cores this process may use,
        shared among ``workers`` (at least 1 each): with torch on every core,
        the node's own threads (receiving, DICOM encoding, sending) keep
        stalling torch's, which wait for each other at every layer.
    """
    if configured:
        return configured
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, (cores - 1) // max(1, workers))


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


def start_workers(config: NodeConfig, index: IndexDB, workers: int) -> Workers:
    """Start ``workers`` job threads and one outbox thread.

    Parameters
    ----------
    config
        The node configuration.
    index
        The index.
    workers
        Job threads to start.

    Returns
    -------
    Workers
        The started threads.
    """
    previous_threads = None
    if workers:
        threads = scoring_threads(config.torch_threads, workers)
        previous_threads = set_cpu_threads(threads)
        logger.info(
            "%d scoring thread(s), torch uses %d CPU thread(s) for each, "
            "%d nice step(s) below the node's other threads",
            workers,
            threads,
            config.scoring_nice,
        )
    released = recover_local_leases(index)
    if released:
        logger.warning(
            "took back %d job(s)/delivery(ies) of a stopped process", released
        )
    models = ModelCache(config.device)
    outbox = Outbox(config, index, "outbox")
    builder = (
        ResultBuilder(config.results_processes, config.lease_seconds)
        if workers
        else None
    )
    loops: list[_Loop] = []
    for i in range(workers):
        worker = Worker(config, index, models, f"worker-{i + 1}", builder)
        worker.on_delivery_queued = outbox.wake.set
        loops.append(worker)
    loops.append(outbox)
    for loop in loops:
        loop.start()
    return Workers(loops, previous_threads, builder)


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
            .where(Delivery.state == "pending", Delivery.next_attempt_at > now)
            .values(next_attempt_at=now, updated_at=now)
        )
        counts["waiting"] = int(getattr(waiting, "rowcount", 0) or 0)
        if dead:
            revived = session.execute(
                update(Delivery)
                .where(Delivery.state == "dead")
                .values(
                    state="pending", attempts=0, next_attempt_at=now, updated_at=now
                )
            )
            counts["dead"] = int(getattr(revived, "rowcount", 0) or 0)
        if failed_jobs:
            again = session.execute(
                update(Job)
                .where(Job.state == "failed")
                .values(
                    state="pending", attempts=0, next_attempt_at=None, updated_at=now
                )
            )
            counts["failed"] = int(getattr(again, "rowcount", 0) or 0)
        return counts

    return index.run(work)
