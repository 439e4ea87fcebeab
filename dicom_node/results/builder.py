"""Result sets built and written in a process of their own.

Building the objects with highdicom is Python work (deep copies, template
checks, IOD table lookups: tens of milliseconds a study) that would hold the
scoring process's GIL while its scoring threads wait for it. With ``[node]
results_processes`` above 0, a worker hands each scored study to a small pool
of processes instead: the child reads the sources from storage, builds the
result set and writes its files; the worker gets back what the index needs.
The child does not load PyTorch (what it unpickles comes from
:mod:`inference.findings`, what it renders from :mod:`inference.pixels`): about
110-130 MB more each (highdicom's tables, 67 MB, then live here only).

The pool's processes are started fresh (``spawn``), never forked from the
threaded worker; they import the results package once, when the worker starts.
(``forkserver`` would put its socket in tempfile's folder, which the receiver
points at its spool.)
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node.log import configure_logging
from dicom_node.results.naming import NodeIdentity
from dicom_node.results.store import write_result_files
from dicom_node.storage import read_stored
from inference import StudyPrediction

__all__ = ["BuildRequest", "Built", "ResultBuilder", "build_and_write"]


@dataclass(frozen=True, slots=True)
class BuildRequest:
    """What a result set is built from; every field crosses a process boundary.

    Parameters
    ----------
    sources
        The stored files of the images scored.
    prediction
        The study's prediction (heatmaps included).
    run
        The run number.
    node
        The node writing the results.
    folder
        Where the result set's files go.
    previous_sr
        The SR this run replaces, if any, as
        :func:`dicom_node.results.report_reference` gives it.
    jpeg, parametric_map, explain_absent
        As :func:`dicom_node.results.build.build_results`.
    """

    sources: tuple[Path, ...]
    prediction: StudyPrediction
    run: int
    node: NodeIdentity
    folder: Path
    previous_sr: Dataset | None = None
    jpeg: bool = False
    parametric_map: bool = False
    explain_absent: bool = False


@dataclass(frozen=True, slots=True)
class Pending:
    """A build started in a results process (:meth:`ResultBuilder.submit`)."""

    pool: ProcessPoolExecutor
    future: Future[Built]


@dataclass(frozen=True, slots=True)
class Built:
    """What the index records of a written result set.

    Parameters
    ----------
    run
        The run number.
    sr_uid
        The SR's SOP Instance UID.
    """

    run: int
    sr_uid: str


def build_and_write(
    request: BuildRequest, sources: Sequence[Dataset] | None = None
) -> Built:
    """Build the result set and write its files.

    Parameters
    ----------
    request
        What to build.
    sources
        The sources, already read; None: read them from ``request.sources``.

    Returns
    -------
    Built
        The run and the SR's UID.
    """
    # Here, not at the top: a process that only hands results to its results
    # processes (serve) never imports highdicom (~20 MB; ~65 MB more for its
    # tables once read).
    from dicom_node.results.build import build_results

    if sources is None:
        # As when the images were scored: long values are not read here.
        sources = [read_stored(path) for path in request.sources]
    previous = request.previous_sr
    result = build_results(
        sources,
        request.prediction,
        request.run,
        node=request.node,
        previous_sr=previous,
        jpeg=request.jpeg,
        parametric_map=request.parametric_map,
        explain_absent=request.explain_absent,
    )
    write_result_files(request.folder, result, png=False)
    return Built(result.run, str(result.sr.SOPInstanceUID))


def warm_up() -> None:
    """Import the builders and load highdicom's tables, where results are built.

    A results process runs it when it starts (or the node itself without
    them); see :func:`dicom_node.results.build.warm_up`.
    """
    from dicom_node.results.build import warm_up as load_tables

    load_tables()


def _start_process(parent: int, log_level: str) -> None:
    """Set up a results process: the node's logging, and an end with its parent.

    Its records (pydicom's and highdicom's warnings quote data element values)
    pass the same filters as the parent's; without this they would reach
    standard error as they are.
    """
    configure_logging(log_level, network=False)
    _follow_parent(parent)


def _follow_parent(parent: int) -> None:
    """End this process when its parent is gone (killed: it cannot stop us)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


class ResultBuilder:
    """A pool of processes that build and write result sets.

    Parameters
    ----------
    processes
        How many; 0 builds in the calling thread.
    timeout
        Longest a result set may take in a process, in seconds; then the pool
        is replaced and the study's job fails this try.
    log_level
        The node's log level, for the processes' own logging.
    """

    def __init__(
        self, processes: int = 1, timeout: float = 600.0, log_level: str = "INFO"
    ) -> None:
        self.processes = processes
        self.timeout = timeout
        self.log_level = log_level
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def start(self) -> None:
        """Load highdicom's tables (in the processes, or here) before a study waits."""
        if self.processes:
            self._executor().submit(warm_up).result()
        else:
            warm_up()

    def build(
        self, request: BuildRequest, sources: Sequence[Dataset] | None = None
    ) -> Built:
        """Build and write one result set; raise what building raised.

        ``sources`` (already read) are used when building here; a process
        reads the files. A pool whose process died, or that ran past
        ``timeout``, is replaced; the study's job fails this try and is
        retried.
        """
        if not self.processes:
            return build_and_write(request, sources)
        return self.wait(self.submit(request))

    def submit(self, request: BuildRequest) -> Pending:
        """Start building a result set in a process (with processes only).

        :meth:`wait` gives its outcome (results prepared before their job,
        :mod:`dicom_node.completion`, are started here and waited for later).
        """
        pool = self._executor()
        try:
            future = pool.submit(build_and_write, request)
        except BrokenProcessPool:  # its process died since it last built
            self._drop(pool)
            raise
        return Pending(pool, future)

    def wait(self, pending: Pending) -> Built:
        """Return a started build's outcome; raise what building raised.

        A pool whose process died, or that ran past ``timeout``, is replaced
        (what it still had to do is dropped: CancelledError).
        """
        try:
            return pending.future.result(self.timeout)
        except (BrokenProcessPool, FutureTimeout):
            self._drop(pending.pool)
            raise

    def _drop(self, pool: ProcessPoolExecutor) -> None:
        """Take no more work to a pool whose process died or is stuck."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        # A process stuck past the timeout is left to finish or die with the
        # node; its pool takes no more work.
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the processes (waiting for the one at work); no more builds."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the results processes are stopped")
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(
                    self.processes,
                    mp_context=context,
                    initializer=_start_process,
                    initargs=(os.getpid(), self.log_level),
                )
            return self._pool
