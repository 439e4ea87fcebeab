"""Scoring on arrival: each image is scored while its study is still arriving.

The receiver of ``serve`` hands every instance it stored and indexed to an
:class:`ArrivalScorer` thread (next to the worker threads, sharing their
models). It reads the image, applies each model's eligibility rule (the one a
job applies), and runs the eligible ones through the model, a batch of
whatever has arrived meanwhile at a time, keeping the scores per study and
model in :class:`dicom_node.scoring.EarlyScores`. When the study goes quiet,
its job takes those scores, scores only the images missing from them (one
that arrived through another process, one evicted, one that changed), and
aggregates, explains, writes the results and sends: the forward passes are
done while the study arrives, not after its quiet timer.

With results processes, a study whose every image is scored and that has been
quiet for half its timer has its results built then too
(:class:`dicom_node.completion.PreparedResults`); its job sends those if they
are what it would build.

The scores are a cache of one process, never the record: jobs, leases and the
index decide what runs, exactly once, as before; a job that finds no scores
scores its study itself and gets the same result.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Hashable

from pydicom.dataset import Dataset

from dicom_node.completion import PreparedResults
from dicom_node.config import ModelConfig, NodeConfig
from dicom_node.eligibility import model_match, passed_over_reason
from dicom_node.errors import ModelMissingError
from dicom_node.index import IndexDB
from dicom_node.log import describe_exception
from dicom_node.loop import BEAT_SECONDS, Loop, lower_thread_priority
from dicom_node.scoring import (
    EarlyScores,
    EarlyStudy,
    LoadedModel,
    ModelCache,
    file_identity,
)
from dicom_node.scp import Arrival
from dicom_node.storage import read_stored
from inference import StudyScores

__all__ = ["ArrivalScorer"]

logger = logging.getLogger(__name__)

# Arrivals waiting to be scored; beyond it, an image is left to its job.
_MAX_WAITING = 4096
# Most arrivals scored at once: a forward batch (the classifier's default).
_MOST_AT_ONCE = 8
# Longest wait for more arrivals to score with the first, seconds.
_GATHER = 0.25
# A study's results are built once it has been quiet for this part of
# stable_after: not after every image of a study still streaming in.
_PREPARE_AFTER = 0.5


class ArrivalScorer(Loop):
    """Scores the images this process stores, as they arrive.

    Runs ``scoring_nice`` steps below the node's other threads, like the
    scoring threads: acknowledging what arrives comes first.

    Parameters
    ----------
    config
        The node configuration.
    index
        The index (the thread's health row; the studies' images and runs).
    models
        The process's models (shared with its worker threads).
    early
        Where the scores are kept for the studies' jobs.
    prepared
        Where the results of a study whose every image is scored are built
        while its quiet timer runs; None: they are built by its job.
    """

    def __init__(
        self,
        config: NodeConfig,
        index: IndexDB,
        models: ModelCache,
        early: EarlyScores,
        prepared: PreparedResults | None = None,
    ) -> None:
        super().__init__("arrivals", index, idle=0.0)
        self.config, self.models, self.early = config, models, early
        self.index, self.prepared = index, prepared
        self.waiting: queue.Queue[Arrival | None] = queue.Queue(_MAX_WAITING)
        # Seconds arrivals are gathered into one forward pass: a small part of
        # the quiet timer, so the images are scored well before the study is due.
        self.gather = min(_GATHER, config.stable_after / 8)
        # Each study's latest arrival here (its job is due stable_after later).
        self._latest: dict[str, float] = {}
        # Models whose file failed to load, by its mtime then.
        self._broken: dict[str, float] = {}
        # (study, model) -> when its results may be built, and its newest image
        # then (a study still arriving is not: a newer image cancels it).
        self._to_prepare: dict[tuple[str, str], tuple[float, float]] = {}
        # (study, model) -> its files the model does not take (an SR, a KO beside
        # the images): the study's job will not choose them either.
        self._passed: dict[tuple[str, str], set[str]] = {}

    def arrived(self, arrival: Arrival) -> None:
        """Queue a stored instance for scoring (never blocks the receiver)."""
        self._latest[arrival.study_instance_uid] = arrival.at
        with contextlib.suppress(queue.Full):  # full: its job scores it
            self.waiting.put_nowait(arrival)

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current batch; what still waits is left to the jobs."""
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self.waiting.put_nowait(None)
        super().stop(timeout)

    def _run(self) -> None:
        self.health.started()
        lower_thread_priority(self.config.scoring_nice)
        self.run_steps()
        self.health.stopped()

    def step(self) -> bool:
        """Score what arrived (up to a forward batch); False when idle.

        Arrivals are gathered for up to :attr:`gather` seconds after the first
        (the rest of its series, more studies of a burst): a forward pass of 8
        images costs about half as much per image as 8 passes of one, and the
        quiet timer leaves the time.
        """
        due = min((when for when, _ in self._to_prepare.values()), default=None)
        wait = BEAT_SECONDS if due is None else max(0.0, due - time.monotonic())
        try:
            first = self.waiting.get(timeout=min(BEAT_SECONDS, wait))
        except queue.Empty:
            self._prepare_due()
            return False
        batch = [first]
        deadline = time.monotonic() + self.gather
        while first is not None and len(batch) < _MOST_AT_ONCE:
            left = max(0.0, deadline - time.monotonic())
            try:
                arrival = self.waiting.get(timeout=left)
            except queue.Empty:
                break
            batch.append(arrival)
            if arrival is None:
                break
        # The same file twice (sent again meanwhile): its last copy only.
        stored = list({a.path: a for a in batch if a is not None}.values())
        # An image whose study is due soon is left to the job: scored here
        # late, it would be scored twice (the job does not wait for it).
        soon = time.monotonic() - self.config.stable_after / 2
        latest = self._latest
        arrivals = [a for a in stored if latest.get(a.study_instance_uid, a.at) > soon]
        if len(latest) > _MAX_WAITING:  # forget studies long quiet
            for study, at in list(latest.items()):
                if at < soon:
                    latest.pop(study, None)
            for key in [k for k in self._passed if k[0] not in latest]:
                del self._passed[key]
        if arrivals:
            self.score(arrivals)
        self._prepare_due()
        return True

    def score(self, arrivals: list[Arrival]) -> int:
        """Score arrivals with every model that takes them; return images scored.

        An image that cannot be read or scored here is left to its job, which
        reads it again and says why it fails.
        """
        models: list[tuple[ModelConfig, LoadedModel]] = []
        for model in self.config.models:
            try:
                mtime = model.path.stat().st_mtime
            except OSError:
                continue  # its jobs wait for it
            if self._broken.get(model.key) == mtime:
                continue  # not loaded again until the file changes
            try:
                models.append((model, self.models.get(model)))
            except ModelMissingError:
                continue
            except Exception as exc:  # noqa: BLE001 - the jobs say why
                self._broken[model.key] = mtime
                logger.debug("arrivals: model not loaded: %s", type(exc).__name__)
        if not models:
            return 0
        taken: dict[tuple[str, str], EarlyStudy] = {}
        items: dict[str, list[tuple[StudyScores, Hashable, Dataset]]] = {}
        for arrival in arrivals:
            key = str(arrival.path)
            try:
                identity = file_identity(arrival.path)
                ds = read_stored(arrival.path)
            except Exception as exc:  # noqa: BLE001 - its job reads it again
                logger.debug("arrivals: not read: %s", type(exc).__name__)
                continue
            for model, loaded in models:
                match = model.match or model_match(loaded.classifier.artifact.accepts)
                study = (arrival.study_instance_uid, model.key)
                try:
                    if passed_over_reason(
                        ds, arrival.sop_class_uid, match, arrival.calling_ae_title
                    ):
                        self._passed.setdefault(study, set()).add(key)
                        continue
                except Exception as exc:  # noqa: BLE001 - its job says why
                    logger.debug("arrivals: not checked: %s", type(exc).__name__)
                    continue
                self._passed.get(study, set()).discard(key)  # sent again, taken now
                entry = taken.get(study) or self.early.take(*study)
                if entry is None or entry.model is not loaded or key in entry.files:
                    # New, or scored by a model file since replaced, or this
                    # image sent again: start the study's scores afresh (its
                    # job scores the images it then misses).
                    entry = EarlyStudy(
                        loaded,
                        loaded.classifier.study_scores(self.config.gradcam_top_k),
                    )
                taken[study] = entry
                entry.files[key] = identity
                items.setdefault(model.key, []).append((entry.scores, key, ds))
        scored = 0
        failed: set[tuple[str, str]] = set()
        for model, loaded in models:
            todo = items.get(model.key)
            if not todo:
                continue
            try:
                loaded.classifier.score_into(todo)
                scored += len(todo)
            except Exception as exc:  # noqa: BLE001 - the jobs score them again
                logger.debug(
                    "arrivals: %d image(s) not scored: %s",
                    len(todo),
                    describe_exception(exc),
                )
                failed.update(s for s in taken if s[1] == model.key)
        newest: dict[str, float] = {}
        for arrival in arrivals:
            uid = arrival.study_instance_uid
            newest[uid] = max(newest.get(uid, arrival.at), arrival.at)
        for study, entry in taken.items():
            if study in failed:
                continue
            # Its newest image is scored: once no other follows for half the
            # quiet timer, its results are built while the rest of it runs.
            at = newest.get(study[0])
            latest = self._latest.get(study[0])
            if self.prepared is not None and at is not None and at == latest:
                when = at + self.config.stable_after * _PREPARE_AFTER
                self._to_prepare[study] = (when, at)
            self.early.put(*study, entry)
        return scored

    def _prepare_due(self) -> None:
        """Build the results of the studies quiet long enough (their scores held)."""
        prepared = self.prepared
        if prepared is None:
            return
        now = time.monotonic()
        for study, (when, at) in list(self._to_prepare.items()):
            if when > now:
                continue
            del self._to_prepare[study]
            if self._latest.get(study[0]) != at:
                continue  # a newer image came (not scored here: due soon)
            entry = self.early.take(*study)
            if entry is None:
                continue  # its job has the scores
            self._prepare(prepared, study, entry)
            self.early.put(*study, entry)

    def _prepare(
        self, prepared: PreparedResults, study: tuple[str, str], entry: EarlyStudy
    ) -> None:
        try:
            prepared.prepare(
                self.config,
                self.index,
                study[0],
                study[1],
                entry.model.classifier,
                entry,
                frozenset(self._passed.get(study, ())),
            )
        except Exception as exc:
            # Nothing is lost (the job builds them), but it should not happen.
            logger.error(
                "arrivals: results not prepared: %s",
                describe_exception(exc),
                exc_info=exc,
            )
