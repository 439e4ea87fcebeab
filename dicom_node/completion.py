"""Completion: a scored study's result set written, recorded and queued for delivery.

Runs are counted per study and model Device UID: run N's UIDs follow from the
study, the Device UID and N, so a job done again after a crash writes the same
objects. A result set is written into a folder of its own job and moved into
place only while the job still holds its lease and no recorded result set has
that folder: a delivered run's files are never overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node import metrics
from dicom_node.config import NodeConfig
from dicom_node.export import Peer
from dicom_node.identity import node_device_uid
from dicom_node.index import (
    Delivery,
    DeliveryState,
    IndexDB,
    Job,
    JobState,
    ResultRecord,
    Study,
    utc_now,
)
from dicom_node.jobs import ClaimedJob, JobOutcome, guard
from dicom_node.leases import release
from dicom_node.log import describe_exception, uid_ref
from dicom_node.results import NodeIdentity, report_reference
from dicom_node.results.builder import BuildRequest, Built, Pending, ResultBuilder
from dicom_node.results.store import (
    discard_folder,
    publish_folder,
    result_folder,
    results_root,
    staging_folder,
)
from dicom_node.scoring import (
    EarlyStudy,
    FileIdentity,
    Scored,
    Scoring,
    StudyImage,
    file_identity,
    study_images,
)
from inference import Classifier, StudyPrediction

__all__ = ["PreparedResults", "complete_jobs", "destinations"]

logger = logging.getLogger(__name__)

# Builds result sets in the calling thread (no results processes).
_INLINE = ResultBuilder(0)


def complete_jobs(
    scored: Scored,
    config: NodeConfig,
    index: IndexDB,
    started: float,
    builder: ResultBuilder | None = None,
    prepared: PreparedResults | None = None,
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
    prepared
        Result sets built while their studies arrived, taken where they are
        what the job would build.

    Returns
    -------
    list of JobOutcome
        One per study; each job row is updated to match.
    """
    return [
        guard(
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
            prepared,
        )
        for scoring, prediction in scored
    ]


def _complete(
    scoring: Scoring,
    prediction: StudyPrediction,
    config: NodeConfig,
    index: IndexDB,
    started: float,
    builder: ResultBuilder,
    prepared: PreparedResults | None = None,
) -> JobOutcome:
    """Write a scored study's results and queue its deliveries."""
    job = scoring.job
    device_uid = prediction.device_uid
    previous = _previous_run(index, job.study_id, device_uid)
    run = previous[0] + 1 if previous else 1
    root = results_root(config.state_dir)
    folder = result_folder(job.study_uid, device_uid, run)
    staging = staging_folder(folder, job.id)
    discard_folder(root, staging)  # what an earlier try of this job left
    # The images as stored: a results process reads them itself rather than
    # receiving their pixels; here, the data sets read are used.
    sources = tuple(Path(str(ds.filename)) for ds in scoring.chosen)
    request = _request(
        config, job.study_uid, sources, prediction, previous, root / staging
    )
    found = prepared.take(job.study_uid, job.model, request) if prepared else None
    built = found or builder.build(request, scoring.chosen)
    peers = destinations(config, scoring.images)
    outcome = _commit(
        index,
        job,
        built,
        prediction,
        scoring.model.identity,
        (root, staging, folder),
        peers,
    )
    if outcome.state != JobState.DONE:
        discard_folder(root, staging)
        return outcome
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


def _request(
    config: NodeConfig,
    study_uid: str,
    sources: tuple[Path, ...],
    prediction: StudyPrediction,
    previous: tuple[int, str] | None,
    folder: Path,
) -> BuildRequest:
    """Return what a study's next run is built from, written into ``folder``."""
    device_uid = prediction.device_uid
    return BuildRequest(
        sources=sources,
        prediction=prediction,
        run=previous[0] + 1 if previous else 1,
        node=NodeIdentity(
            config.ae_title, node_device_uid(config.ae_title, config.device_uid)
        ),
        folder=folder,
        previous_sr=(
            report_reference(study_uid, device_uid, previous[0], previous[1])
            if previous
            else None
        ),
        jpeg=config.results_jpeg,
        parametric_map=config.results_parametric_map,
        explain_absent=config.results_explain_absent,
    )


def _previous_run(
    index: IndexDB, study_id: int, device_uid: str
) -> tuple[int, str] | None:
    """Return the last recorded run of a study by a model, and its SR's UID."""
    with index.sessions() as session:
        row = session.execute(
            select(ResultRecord.run, ResultRecord.sr_sop_instance_uid)
            .where(
                ResultRecord.study_id == study_id,
                ResultRecord.device_uid == device_uid,
            )
            .order_by(ResultRecord.run.desc())
            .limit(1)
        ).first()
    return (int(row[0]), str(row[1])) if row else None


def destinations(
    config: NodeConfig, images: Sequence[StudyImage]
) -> list[tuple[str, Peer]]:
    """Return where a study's results go: the destinations, and its senders.

    A caller with a ``results_port`` gets back the results of the studies it
    sent (to its configured host, or the address it sent from).

    Parameters
    ----------
    config
        The node configuration.
    images
        The study's instances, with who sent them.

    Returns
    -------
    list of (name, Peer)
        Each peer once.
    """
    # A DICOMweb destination is recorded by its URL, with no AE title and
    # port 0: the outbox sends it STOW-RS (the index keeps one peer shape).
    peers: list[tuple[str, Peer]] = [
        (d.name, Peer("", d.url, 0) if d.url else Peer(d.ae_title, d.host, d.port))
        for d in config.destinations
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
    model: str,
    place: tuple[Path, str, str],
    peers: Sequence[tuple[str, Peer]],
) -> JobOutcome:
    """Record the result set, move it into place and queue its deliveries.

    In one transaction: the job is done only while this worker holds its
    lease; the run is recorded (a unique key: a second writer of the run
    waits, then fails); the files are moved from the job's folder into the
    run's (a folder there without a record is a leftover and is replaced);
    the deliveries are queued. Whatever fails, the transaction leaves nothing.
    """
    root, staging, folder = place
    summary = json.dumps(
        {
            p.label.name: {"probability": p.probability, "positive": p.positive}
            for p in prediction.labels
        }
    )

    def work(session: Session) -> str:
        now = utc_now()
        if not release(
            session,
            Job,
            job.id,
            job.owner,
            JobState.DONE,
            only_if=Job.state == JobState.RUNNING,
            last_error=None,
        ):
            return "lost"  # the lease ran out and another worker has the job
        taken = session.scalar(
            select(ResultRecord.id).where(
                ResultRecord.study_id == job.study_id,
                ResultRecord.device_uid == prediction.device_uid,
                ResultRecord.run == result.run,
            )
        )
        if taken is not None:
            return "taken"
        record = ResultRecord(
            job_id=job.id,
            study_id=job.study_id,
            model=model[:500],
            run=result.run,
            device_uid=prediction.device_uid,
            sr_sop_instance_uid=result.sr_uid,
            folder=folder,
            summary=summary,
            created_at=now,
        )
        session.add(record)
        session.flush()  # takes the run's unique key before the files move
        for name, peer in peers:
            session.add(
                Delivery(
                    result_id=record.id,
                    destination=name[:100],
                    ae_title=peer.ae_title,
                    host=peer.host,
                    port=peer.port,
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
        session.flush()
        publish_folder(root, staging, folder)
        return "done"

    state = index.run(work)
    if state == "lost":
        logger.warning(
            "job %d: lease lost before it was done; left to its new worker", job.id
        )
        return JobOutcome("lost", "lease lost")
    if state == "taken":
        # Another try of this study and model recorded the run first: this
        # one is done again at once, as the next run.
        def again(session: Session) -> None:
            release(
                session,
                Job,
                job.id,
                job.owner,
                JobState.PENDING,
                attempts=job.attempts - 1,
                next_attempt_at=utc_now(),
            )

        index.run(again)
        logger.info("job %d: run %d was recorded meanwhile; again", job.id, result.run)
        return JobOutcome(JobState.PENDING, "run recorded meanwhile")
    return JobOutcome(JobState.DONE)


@dataclass(slots=True)
class _Prepared:
    """A result set built ahead of its job, what it was built from, where it is.

    The request's prediction is kept as its digest only (its heatmaps are
    what is large).
    """

    same: tuple[object, ...]
    digest: bytes
    files: tuple[FileIdentity | None, ...]
    folder: Path
    pending: Pending


def _same(request: BuildRequest) -> tuple[object, ...]:
    """Return what of a request, beyond its prediction, a prepared set must match."""
    return (
        request.sources,
        request.run,
        request.node,
        request.previous_sr,
        request.jpeg,
        request.parametric_map,
        request.explain_absent,
    )


class PreparedResults:
    """Result sets built while their studies arrive, for their jobs to take.

    When every image of a study has been scored on arrival and it has been
    quiet for a while, the study's next run can be built before its quiet
    timer ends: the arrival thread aggregates and explains it and hands the
    run to a results process, which writes it into a folder of this process
    (``<results>/.early/<token>/<n>``). The study's job, when it comes,
    makes its own request from the index and the files as they are then; only
    if that request is the one prepared (the same images, unchanged on disk
    since they were scored, the same prediction, run and predecessor, the same
    settings) does it take the prepared files instead of building them again.
    Anything else (a late image, a run recorded meanwhile, another process's
    job) builds as before, and the prepared folder is removed. Jobs, leases
    and the index decide what is recorded and sent, exactly as before: this
    only moves when the building happens, into the quiet timer, where the CPU
    is otherwise idle.

    Each process's folders sit under a token of its own, locked (``flock``)
    while it lives: a process starting removes those of processes that ended
    (a crash, a kill), never a live one's, whatever the pids.

    Parameters
    ----------
    builder
        The results processes (nothing is prepared without them).
    root
        The results root.
    most
        Most result sets prepared and not yet taken (the oldest are dropped).
    """

    def __init__(self, builder: ResultBuilder, root: Path, most: int = 64) -> None:
        self.builder, self.root, self.most = builder, root, most
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], _Prepared] = OrderedDict()
        self._count = itertools.count(1)
        self._folder, self._held = _own_folder(root / _EARLY)

    def prepare(
        self,
        config: NodeConfig,
        index: IndexDB,
        study_uid: str,
        model_key: str,
        classifier: Classifier,
        early: EarlyStudy,
        passed: frozenset[str] = frozenset(),
    ) -> bool:
        """Start building a study's next run from the scores of its images.

        Call while no job can use ``early`` (taken out of the process's
        scores).

        Parameters
        ----------
        config
            The node configuration.
        index
            The index (the study's images, its last run).
        study_uid
            The study.
        model_key
            The model's key.
        classifier
            The model that scored the images.
        early
            Their scores and the identities of the files scored.
        passed
            The study's files the model does not take (by the rule its job
            applies), found when they arrived.

        Returns
        -------
        bool
            Whether a build was started: only when ``early`` holds every other
            instance the index has of the study (one not scored here may be
            one the job would choose).
        """
        if not self.builder.processes:
            return False
        found = _study_paths(index, study_uid, config.storage_dir)
        if found is None:
            return False
        study_id, every = found
        paths = [path for path in every if str(path) not in passed]
        order = [str(path) for path in paths]
        if not order or sorted(order) != sorted(map(str, early.scores.keys())):
            return False
        prediction = classifier.prediction(early.scores, order)
        previous = _previous_run(index, study_id, prediction.device_uid)
        folder = self._folder / str(next(self._count))
        request = _request(
            config, study_uid, tuple(paths), prediction, previous, folder
        )
        files = tuple(early.files.get(key) for key in order)
        entry = _Prepared(
            _same(request),
            _digest(prediction),
            files,
            folder,
            self.builder.submit(request),
        )
        with self._lock:
            dropped = [self._entries.pop((study_uid, model_key), None)]
            self._entries[(study_uid, model_key)] = entry
            while len(self._entries) > self.most:
                dropped.append(self._entries.popitem(last=False)[1])
        for old in dropped:
            if old is not None:
                _discard(old)
        metrics.results_prepared(PREPARED_BUILT)
        return True

    def close(self) -> None:
        """Remove this process's folder of prepared sets (what no job took).

        Call once the results processes have stopped.
        """
        with self._lock:
            self._entries.clear()
        shutil.rmtree(self._folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._held)

    def take(
        self, study_uid: str, model_key: str, request: BuildRequest
    ) -> Built | None:
        """Return the prepared run, moved to ``request.folder``, if it is that request.

        Parameters
        ----------
        study_uid
            The job's study.
        model_key
            The job's model.
        request
            What the job would build.

        Returns
        -------
        Built or None
            None when none was prepared, or what was prepared is not what
            ``request`` asks for, or its build did not finish (its process
            died or ran too long: the pool is replaced): the caller builds.

        Raises
        ------
        Exception
            What building raised (the same request would fail the same way).
        """
        with self._lock:
            entry = self._entries.pop((study_uid, model_key), None)
        if entry is None:
            return None
        same = (
            entry.same == _same(request)
            and entry.digest == _digest(request.prediction)
            and entry.files == _identities(request.sources)
        )
        if not same:
            _discard(entry)
            metrics.results_prepared(PREPARED_NOT_USED)
            return None
        used = False
        try:
            built = self.builder.wait(entry.pending)
            request.folder.parent.mkdir(parents=True, exist_ok=True)  # the study's
            os.rename(entry.folder, request.folder)
            used = True
        except (CancelledError, BrokenProcessPool, FutureTimeout, OSError) as exc:
            logger.info("prepared results not used: %s", describe_exception(exc))
            return None
        finally:
            if not used:  # also when building failed: what it left goes
                _discard(entry)
                metrics.results_prepared(PREPARED_NOT_USED)
        metrics.results_prepared(PREPARED_USED)
        return built


# Where prepared result sets are written, under the results root.
_EARLY = ".early"
# The outcomes /metrics counts of prepared result sets.
PREPARED_BUILT, PREPARED_USED, PREPARED_NOT_USED = "built", "used", "not used"


def _discard(entry: _Prepared) -> None:
    """Drop a prepared result set: not built if not started, else removed when done."""
    entry.pending.future.cancel()
    folder = entry.folder

    def remove(_: object) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    entry.pending.future.add_done_callback(remove)


def _own_folder(parent: Path) -> tuple[Path, int]:
    """Make this process's folder of prepared result sets, locked while it lives.

    Removes first the folders of processes that ended (their lock is free).
    Returns the folder and the open descriptor holding its lock.
    """
    parent.mkdir(parents=True, exist_ok=True)
    for other in parent.iterdir():
        lock = other / "lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            shutil.rmtree(other, ignore_errors=True)  # never locked: half made
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live process's
        else:
            shutil.rmtree(other, ignore_errors=True)
        finally:
            os.close(fd)
    folder = parent / uuid.uuid4().hex
    folder.mkdir()
    held = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    return folder, held


def _digest(prediction: StudyPrediction) -> bytes:
    """Return a digest of what results are built from (not the timings)."""
    digest = hashlib.sha256()
    _feed(digest, replace(prediction, model_seconds=0.0, gradcam_seconds=0.0))
    return digest.digest()


def _feed(digest: Any, value: object) -> None:
    """Add a value (dataclasses, arrays, sequences, plain values) to a digest."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(type(value).__name__.encode())
        for item in dataclasses.fields(value):
            digest.update(item.name.encode())
            _feed(digest, getattr(value, item.name))
    elif isinstance(value, np.ndarray):
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, tuple | list):
        digest.update(f"[{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, dict):
        digest.update(f"{{{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def _identities(paths: Sequence[Path]) -> tuple[FileIdentity | None, ...]:
    found: list[FileIdentity | None] = []
    for path in paths:
        try:
            found.append(file_identity(path))
        except OSError:
            found.append(None)
    return tuple(found)


def _study_paths(
    index: IndexDB, study_uid: str, storage_root: Path
) -> tuple[int, list[Path]] | None:
    """Return a study's row id and its instances' files, in the order received."""
    study_id = index.read(
        lambda session: session.scalar(
            select(Study.id).where(Study.study_instance_uid == study_uid)
        )
    )
    if study_id is None:
        return None
    return study_id, [
        image.path for image in study_images(index, study_id, storage_root)
    ]
