"""Scoring: a claimed study's images read, chosen and run through its model.

Small studies of one model share forward passes (a burst of one-image studies
is scored a batch at a time); a study with a batch of images or more is scored
alone, so memory stays bounded. Images scored when they arrived
(:mod:`dicom_node.arrivals`, kept in :class:`EarlyScores`) are not scored
again: a job then scores only what is missing and aggregates.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node import metrics
from dicom_node.config import ModelConfig, ModelMatch, NodeConfig
from dicom_node.eligibility import model_match, passed_over_reason
from dicom_node.errors import DicomNodeError, ModelMissingError
from dicom_node.index import (
    AssociationRecord,
    IndexDB,
    Instance,
    JobState,
    Series,
)
from dicom_node.jobs import ClaimedJob, JobOutcome, finish_job, guard
from dicom_node.log import describe_exception, uid_ref
from dicom_node.storage import read_stored
from inference import (
    Classifier,
    InferenceError,
    ModelArtifact,
    StudyPrediction,
    StudyScores,
    file_sha256,
    load_compiled,
)

__all__ = [
    "EarlyScores",
    "EarlyStudy",
    "LoadedModel",
    "ModelCache",
    "Scored",
    "Scoring",
    "StudyImage",
    "eligible_images",
    "file_identity",
    "process_jobs",
    "study_images",
]

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A configured model, loaded: its classifier and what identifies it.

    Parameters
    ----------
    classifier
        Runs the model.
    sha256
        The SHA-256 of the model file it was loaded from.
    """

    classifier: Classifier
    sha256: str

    @property
    def identity(self) -> str:
        """Return what the index records of the model: name, version, SHA-256 start."""
        artifact = self.classifier.artifact
        return f"{artifact.name} {artifact.version} sha256:{self.sha256[:12]}"


# How long a model file that failed to load is not tried again, unchanged.
BROKEN_MODEL_SECONDS = 300.0


class ModelCache:
    """Loads each configured model once (again when its file changes).

    Parameters
    ----------
    device
        Where models run; empty for CUDA when present.
    compiled
        The folder of compiled models (:mod:`inference.compiled`): a model
        that runs traced on the CPU is loaded from there, compiled first when
        missing, and this process never imports torchvision. None: every model
        is built here.
    """

    def __init__(self, device: str = "", compiled: Path | None = None) -> None:
        self.device = device or None
        self.compiled = compiled
        # Guards _loading, _missing_said and the writes of _loaded and _ready
        # (read without it); a model's entry of _broken is its loading lock's.
        self._lock = threading.Lock()
        # One lock per model, held while it loads (a compile takes seconds):
        # jobs of the other models go on meanwhile.
        self._loading: dict[str, threading.Lock] = {}
        self._loaded: dict[str, tuple[int, LoadedModel]] = {}
        self._ready: frozenset[str] = frozenset()  # its keys, read without the lock
        # A file that failed to load: not read again (hundreds of megabytes, for
        # every job) until it changes, or for BROKEN_MODEL_SECONDS (the cause
        # may lie outside the file: a missing runtime, no memory).
        self._broken: dict[str, tuple[FileIdentity, float, InferenceError]] = {}
        self._missing_said: set[str] = set()

    def get(self, model: ModelConfig) -> LoadedModel:
        """Return a configured model, loaded.

        Raises
        ------
        ModelMissingError
            If its file does not exist.
        inference.ArtifactError
            If it is not a valid model file or its SHA-256 differs from the pin;
            the same error again, without reading the file, until the file
            changes (modification time, size or inode) or for
            :data:`BROKEN_MODEL_SECONDS`.
        """
        mtime = _model_identity(model)[2]
        cached = self._loaded.get(model.key)  # (a dictionary read is atomic)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        with self._lock:
            loading = self._loading.setdefault(model.key, threading.Lock())
        with loading:
            return self._load(model)

    def _load(self, model: ModelConfig) -> LoadedModel:
        """Load ``model`` (its lock held), unless a thread that held it did."""
        # Again: the file may have changed while this thread waited.
        identity = _model_identity(model)
        mtime = identity[2]
        cached = self._loaded.get(model.key)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        broken = self._broken.get(model.key)
        if (
            broken is not None
            and broken[0] == identity
            and time.monotonic() - broken[1] < BROKEN_MODEL_SECONDS
        ):
            raise copy.copy(broken[2])
        try:
            sha256 = file_sha256(model.path)
            # Checked against the hash taken (the compiled file is chosen
            # by it) after the pin: a file replaced between the two reads
            # is refused, read again at the next job.
            if model.sha256 is not None:
                ModelArtifact.check_pin(model.path, sha256, model.sha256)
            artifact = ModelArtifact.load(model.path, expected_sha256=sha256)
            compiled = (
                load_compiled(artifact, model.path, sha256, self.compiled, self.device)
                if self.compiled is not None
                else None
            )
            # Traced: the node's other threads must not stall the forward pass.
            classifier = Classifier(
                artifact, self.device, trace=True, compiled=compiled
            )
            # The model has its own copy: the file's mapped tensors can go.
            artifact.release_weights()
        except InferenceError as exc:
            # Kept without its traceback (and the frames it holds).
            self._broken[model.key] = (identity, time.monotonic(), copy.copy(exc))
            raise
        self._broken.pop(model.key, None)
        loaded = LoadedModel(classifier, sha256)
        with self._lock:
            self._loaded[model.key] = (mtime, loaded)
            self._ready = frozenset(self._loaded)
        logger.info(
            "loaded model %s %s (%s, Device UID %s) on %s%s",
            artifact.name,
            artifact.version,
            model.path.name,
            artifact.device_uid,
            classifier.device,
            " (onnxruntime)"
            if classifier.onnx
            else " (traced, compiled)"
            if compiled is not None
            else " (traced)"
            if classifier.traced
            else " (not traced: runs eagerly)",
        )
        return loaded

    def loaded_keys(self) -> set[str]:
        """Return the keys of the models loaded (for readiness).

        Without waiting for a model being loaded (compiled: seconds).
        """
        return set(self._ready)

    def load_all(self, models: Sequence[ModelConfig]) -> None:
        """Load every model now, so no study waits for one; say which cannot be."""
        for model in models:
            try:
                self.get(model)
            except ModelMissingError as exc:
                with self._lock:
                    said = model.key in self._missing_said
                    self._missing_said.add(model.key)
                if not said:  # once, not once per worker thread
                    logger.warning("%s: its jobs will wait until it exists", exc)
            except Exception as exc:  # noqa: BLE001 - its jobs say why, too
                logger.error(
                    "model not loaded: %s",
                    str(exc)
                    if isinstance(exc, InferenceError | DicomNodeError)
                    else describe_exception(exc),
                )


# A file as it was when read: a copy sent again under the same UIDs is
# another file (stored by rename), so its scores are not reused.
FileIdentity = tuple[int, int, int]


# The identity of a file that changed while it was read: matches none.
_CHANGED: FileIdentity = (-1, -1, -1)


def _model_identity(model: ModelConfig) -> FileIdentity:
    try:
        return file_identity(model.path)
    except OSError as exc:
        raise ModelMissingError(f"model file {model.path} not found") from exc


def file_identity(path: Path) -> FileIdentity:
    """Return what tells a stored file from another one at the same path.

    Raises
    ------
    OSError
        If the file cannot be examined.
    """
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(slots=True)
class EarlyStudy:
    """A study's images scored by one model before its job ran.

    Parameters
    ----------
    model
        The loaded model that scored them (a model file replaced since: not reused).
    scores
        Their scores, keyed by file path.
    files
        Each scored file's identity when it was read.
    """

    model: LoadedModel
    scores: StudyScores
    files: dict[str, FileIdentity] = field(default_factory=dict)


class EarlyScores:
    """Per study and model, the images scored when they arrived (this process).

    A cache, never the record: a job that finds nothing here (another process
    runs it, an entry was evicted, the scores were taken by another thread)
    scores its images itself, and gets the same result. Bounded to
    ``max_studies`` (study, model) entries, those whose jobs are done
    forgotten first, then the least recently used; each holds a few bytes per
    image plus the layer4 activations of each label's top frames (~100 KB for
    a resnet at 224 px, one label, ``gradcam_top_k`` 1; ~700 KB with Grad-CAM
    below layer4, which keeps their input too).

    Parameters
    ----------
    max_studies
        Most (study, model) entries kept.
    """

    def __init__(self, max_studies: int = 64) -> None:
        self.max_studies = max_studies
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], EarlyStudy] = OrderedDict()

    def take(self, study_uid: str, model_key: str) -> EarlyStudy | None:
        """Remove and return a study's entry for a model, if there is one."""
        with self._lock:
            return self._entries.pop((study_uid, model_key), None)

    def put(
        self, study_uid: str, model_key: str, entry: EarlyStudy, done: bool = False
    ) -> None:
        """Keep an entry, as the most recent.

        With ``done`` (its job used it; kept for a late image), not if another
        was kept meanwhile, and first in line to be forgotten: the entries of
        studies still waiting for their jobs are worth more.
        """
        key = (study_uid, model_key)
        with self._lock:
            if done and key in self._entries:
                return
            self._entries[key] = entry
            self._entries.move_to_end(key, last=not done)
            while len(self._entries) > self.max_studies:
                self._entries.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Scoring:
    """A claimed job whose study is read and has images for its model.

    ``early`` holds the scores of the images scored so far (on arrival, or
    none); ``todo`` the chosen images still to score, by key; ``order`` every
    chosen image's key, in the study's order.
    """

    job: ClaimedJob
    model: LoadedModel
    images: list[StudyImage]
    chosen: list[Dataset]
    early: EarlyStudy
    todo: list[tuple[str, Dataset]]
    order: list[str]
    reused: int = 0


# Scored studies and their predictions, on their way to results.
Scored = list[tuple[Scoring, StudyPrediction]]


def process_jobs(
    jobs: Sequence[ClaimedJob],
    config: NodeConfig,
    index: IndexDB,
    models: ModelCache,
    finish: Callable[[Scored, float], None],
    early: EarlyScores | None = None,
) -> None:
    """Score claimed studies with their models; hand each scored group on.

    A job that fails does not fail the others: it is retried with backoff,
    then marked failed (:func:`dicom_node.jobs.guard`).

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
        results and queues the deliveries
        (:func:`dicom_node.completion.complete_jobs`).
    early
        Images this process scored when they arrived; None: none are.
    """
    waiting: list[Scoring] = []  # read, not scored yet: one model, < a batch

    def score_waiting() -> None:
        if waiting:
            started = time.perf_counter()
            scored = _score_together(waiting, config, index, early)
            for _, prediction in scored:
                metrics.scored(
                    prediction.model_name,
                    prediction.model_seconds,
                    prediction.gradcam_seconds,
                )
            finish(scored, started)
            waiting.clear()

    for job in jobs:
        prepared = guard(
            job, config, index, _prepare, job, config, index, models, early
        )
        if isinstance(prepared, JobOutcome):
            continue
        classifier = prepared.model.classifier
        if waiting and waiting[0].model.classifier is not classifier:
            score_waiting()
        waiting.append(prepared)
        # By images read, not images left to score: what is read is held.
        if sum(len(w.chosen) for w in waiting) >= classifier.batch_size:
            score_waiting()
    score_waiting()


def _prepare(
    job: ClaimedJob,
    config: NodeConfig,
    index: IndexDB,
    models: ModelCache,
    early: EarlyScores | None,
) -> Scoring | JobOutcome:
    model = next((m for m in config.models if m.key == job.model), None)
    if model is None:
        return finish_job(
            index,
            job,
            JobState.FAILED,
            f"model {job.model} is not in this process's configuration",
        )
    loaded = models.get(model)
    images = study_images(index, job.study_id, config.storage_dir)
    files: dict[str, FileIdentity] = {}
    datasets = []
    for image in images:
        before = file_identity(image.path)
        datasets.append(read_stored(image.path))
        # Replaced while read: what was read is not known; nothing reused. (A
        # copy sent again before the pixels are read is not read: decoding
        # refuses a file other than the one read, and the job is tried again.)
        files[str(image.path)] = (
            before if file_identity(image.path) == before else _CHANGED
        )
    chosen, reason = eligible_images(
        images, datasets, model.match, loaded.classifier.artifact.accepts
    )
    if not chosen:
        return finish_job(index, job, JobState.SKIPPED, reason)
    chosen_ids = {id(ds) for ds in chosen}
    order = [
        str(image.path)
        for image, ds in zip(images, datasets, strict=True)
        if id(ds) in chosen_ids
    ]
    found = early.take(job.study_uid, model.key) if early is not None else None
    if found is not None and not _reusable(found, loaded, order, files):
        found = None
    if found is None:
        found = EarlyStudy(loaded, loaded.classifier.study_scores(config.gradcam_top_k))
    reused = sum(1 for key in order if key in found.scores)
    found.files.update({key: files[key] for key in order})
    todo = [
        (key, ds)
        for key, ds in zip(order, chosen, strict=True)
        if key not in found.scores
    ]
    return Scoring(job, loaded, images, chosen, found, todo, order, reused)


def _reusable(
    found: EarlyStudy,
    loaded: LoadedModel,
    order: Sequence[str],
    files: dict[str, FileIdentity],
) -> bool:
    """Whether scores from arrival are those of the study's files as they are now.

    Every scored file must be one the job chose, unchanged since: otherwise its
    scores (and the kept top frames) are not the study's.
    """
    if found.model is not loaded:
        return False
    chosen = set(order)
    return all(
        key in chosen and files.get(key) == identity
        for key, identity in found.files.items()
    ) and set(found.scores.keys()) <= set(found.files)


def _score_together(
    group: Sequence[Scoring],
    config: NodeConfig,
    index: IndexDB,
    early: EarlyScores | None = None,
) -> Scored:
    """Score studies of one model in shared batches (one by one if that fails).

    Only the images not scored on arrival run through the model; then each
    study is aggregated and explained. The scores go back to ``early`` for a
    late image's job.
    """
    if len(group) > 1:
        classifier = group[0].model.classifier
        items = [(s.early.scores, key, ds) for s in group for key, ds in s.todo]
        try:
            if items:
                classifier.score_into(items)
        except Exception:  # noqa: BLE001 - found again below, study by study
            logger.info(
                "a batch of %d studies failed; scoring them one by one", len(group)
            )
            # Some of them got scores of this batch: each starts again.
            group = [_from_scratch(s, config) for s in group]
        else:
            group = [replace(s, todo=[]) for s in group]
    scored: Scored = []
    for scoring in group:
        prediction = guard(scoring.job, config, index, _score_one, scoring)
        if isinstance(prediction, JobOutcome):
            continue
        model = prediction.model_name
        metrics.images_scored(model, "arrival", scoring.reused)
        metrics.images_scored(model, "job", len(scoring.order) - scoring.reused)
        if scoring.reused:
            logger.debug(
                "study %s: %d of %d image(s) scored on arrival",
                uid_ref(scoring.job.study_uid),
                scoring.reused,
                len(scoring.order),
            )
        if early is not None:
            # Kept for a late image's job, unless one arrived meanwhile.
            job = scoring.job
            early.put(job.study_uid, job.model, scoring.early, done=True)
        scored.append((scoring, prediction))
    return scored


def _score_one(scoring: Scoring) -> StudyPrediction:
    classifier = scoring.model.classifier
    if scoring.todo:
        classifier.score_into([(scoring.early.scores, k, ds) for k, ds in scoring.todo])
    return classifier.prediction(scoring.early.scores, scoring.order)


def _from_scratch(scoring: Scoring, config: NodeConfig) -> Scoring:
    fresh = EarlyStudy(
        scoring.model,
        scoring.model.classifier.study_scores(config.gradcam_top_k),
        dict(scoring.early.files),
    )
    return replace(
        scoring,
        early=fresh,
        todo=list(zip(scoring.order, scoring.chosen, strict=True)),
        reused=0,
    )
