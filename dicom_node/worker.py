"""Worker threads: how a process runs jobs and deliveries, and at what priority.

Every step is a state change in the index (:mod:`dicom_node.jobs`,
:mod:`dicom_node.outbox`). A job is claimed with a lease (``lease_seconds``);
a worker that dies loses its jobs when the lease expires (at once when it was
a process of this host that is gone), and another worker takes them.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable, Sequence

from dicom_node.arrivals import ArrivalScorer
from dicom_node.completion import PreparedResults, complete_jobs
from dicom_node.config import NodeConfig
from dicom_node.index import IndexDB, JobState
from dicom_node.jobs import claim_jobs
from dicom_node.leases import owner_name, recover_local_leases
from dicom_node.log import describe_exception
from dicom_node.loop import (
    BEAT_SECONDS,
    Loop,
    forget_gone_threads,
    lower_thread_priority,
)
from dicom_node.outbox import Outbox
from dicom_node.results.builder import ResultBuilder
from dicom_node.results.store import results_root
from dicom_node.scoring import EarlyScores, ModelCache, Scored, process_jobs
from inference import set_cpu_threads

__all__ = [
    "ResultsWriter",
    "Worker",
    "Workers",
    "lower_thread_priority",
    "scoring_threads",
    "start_workers",
]

logger = logging.getLogger(__name__)


class ResultsWriter(Loop):
    """A worker's results thread: writes each scored group's results, in turn.

    Parameters
    ----------
    worker
        The worker whose scored groups it takes.
    """

    def __init__(self, worker: Worker) -> None:
        super().__init__(f"{worker.name}-results", worker.index, idle=0.0)
        self.worker = worker

    def _run(self) -> None:
        self.health.started()
        builder = self.worker.builder
        if builder is not None:
            try:  # while no study waits for it
                builder.start()
            except Exception as exc:
                logger.error(
                    "%s: results processes: %s",
                    self.name,
                    describe_exception(exc),
                    exc_info=exc,
                )
        self.run_steps()
        self.health.stopped()

    def step(self) -> bool:
        """Write the next scored group's results; end at the worker's stop mark."""
        try:
            item = self.worker.scored.get(timeout=BEAT_SECONDS)
        except queue.Empty:
            return False
        if item is None:
            self._stop.set()
            return False
        worker = self.worker
        # A group whose writing fails (the index) is done again when the
        # jobs' leases run out.
        outcomes = complete_jobs(
            item[0],
            worker.config,
            worker.index,
            item[1],
            worker.builder,
            worker.prepared,
        )
        if worker.on_delivery_queued is not None and any(
            o.state == JobState.DONE for o in outcomes
        ):
            worker.on_delivery_queued()
        return True


class Worker(Loop):
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
    early
        Images the process scored when they arrived; None: none are.
    prepared
        Result sets built while their studies arrived; None: none are.
    """

    def __init__(
        self,
        config: NodeConfig,
        index: IndexDB,
        models: ModelCache,
        name: str,
        builder: ResultBuilder | None = None,
        early: EarlyScores | None = None,
        prepared: PreparedResults | None = None,
    ) -> None:
        super().__init__(name, index)
        self.config, self.index, self.models = config, index, models
        self.builder = builder
        self.early = early
        self.prepared = prepared
        self.owner = owner_name(name)
        self.on_delivery_queued: Callable[[], None] | None = None
        self.scored: queue.Queue[tuple[Scored, float] | None] = queue.Queue(1)
        self._writer = ResultsWriter(self)

    def start(self) -> None:
        """Start the scoring and the results threads."""
        self._writer.start()
        super().start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming; write the results of what was scored, then stop."""
        super().stop(timeout)
        self.scored.put(None)
        self._writer.join(timeout)

    def _run(self) -> None:
        self.health.started()
        lower_thread_priority(self.config.scoring_nice)
        # Loaded (and traced) before a study waits for them.
        self.models.load_all(self.config.models)
        self.run_steps()
        self.health.stopped()

    def step(self) -> bool:
        """Claim due jobs (up to ``batch_studies``) and score them."""
        jobs = claim_jobs(
            self.index,
            self.owner,
            self.config.lease_seconds,
            self.config.job_attempts,
            self.config.batch_studies,
            # A missing model's jobs wait, unclaimed, until its file exists.
            [m.key for m in self.config.models if m.path.is_file()],
        )
        if not jobs:
            return False
        process_jobs(
            jobs,
            self.config,
            self.index,
            self.models,
            lambda scored, started: self.scored.put((scored, started)),
            self.early,
        )
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
    models
        The models the job threads load (for readiness).
    arrivals
        The thread scoring images as they arrive (among ``loops``), if any.
    prepared
        Result sets built while their studies arrived; what no job took is
        removed when the threads stop.
    """

    def __init__(
        self,
        loops: Sequence[Loop],
        restore_threads: int | None = None,
        builder: ResultBuilder | None = None,
        models: ModelCache | None = None,
        arrivals: ArrivalScorer | None = None,
        prepared: PreparedResults | None = None,
    ) -> None:
        self.loops = list(loops)
        self.models = models
        self.arrivals = arrivals
        self._restore_threads = restore_threads
        self._builder = builder
        self._prepared = prepared

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
        if self._prepared is not None:  # its builds ended with the builder
            self._prepared.close()
            self._prepared = None
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


def start_workers(
    config: NodeConfig, index: IndexDB, workers: int, score_on_arrival: bool = False
) -> Workers:
    """Start ``workers`` job threads and one outbox thread.

    Parameters
    ----------
    config
        The node configuration.
    index
        The index.
    workers
        Job threads to start.
    score_on_arrival
        Also start a thread that scores each image stored by this process's
        receiver as it arrives (:attr:`Workers.arrivals`; with job threads only).

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
    forget_gone_threads(index)
    models = ModelCache(config.device, config.model_cache_dir)
    outbox = Outbox(config, index, "outbox")
    builder = (
        ResultBuilder(config.results_processes, config.lease_seconds, config.log_level)
        if workers
        else None
    )
    early = EarlyScores() if workers and score_on_arrival else None
    # Results built while a study arrives need results processes to build them.
    prepared = (
        PreparedResults(builder, results_root(config.state_dir))
        if builder is not None and builder.processes and early is not None
        else None
    )
    arrivals = (
        ArrivalScorer(config, index, models, early, prepared)
        if early is not None
        else None
    )
    loops: list[Loop] = [*([arrivals] if arrivals else [])]
    for i in range(workers):
        worker = Worker(
            config, index, models, f"worker-{i + 1}", builder, early, prepared
        )
        worker.on_delivery_queued = outbox.wake.set
        loops.append(worker)
    loops.append(outbox)
    for loop in loops:
        loop.start()
    return Workers(loops, previous_threads, builder, models, arrivals, prepared)
