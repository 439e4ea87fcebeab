"""The long-running parts of `dicom-node serve`: receivers, scheduler, shutdown.

The worker loop (which loads PyTorch) is imported where it starts: a receiving
process or a results process imports this module without it.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from dicom_node import metrics
from dicom_node.config import NodeConfig
from dicom_node.errors import DicomNodeError, ListenError, ThreadEndedError
from dicom_node.index import IndexDB
from dicom_node.retention import RetentionSweeper
from dicom_node.scheduler import Scheduler
from dicom_node.scp import Arrival, Receiver
from dicom_node.storage import Storage
from dicom_node.web import Probes, WebServer

__all__ = [
    "MALLOC_ARENAS",
    "ChildProcess",
    "cap_malloc_arenas",
    "keep_out_kernel_compiler",
    "open_index",
    "run_receiver",
    "run_worker",
    "running_node",
    "serve",
]

logger = logging.getLogger(__name__)


class ChildProcess(Protocol):
    """The part of multiprocessing.Process that serve uses."""

    def start(self) -> None:
        """Start the process."""

    def is_alive(self) -> bool:
        """Return whether it still runs."""

    def terminate(self) -> None:
        """Send SIGTERM."""

    def kill(self) -> None:
        """Send SIGKILL."""

    def join(self, timeout: float | None = None) -> None:
        """Wait for it to end."""

    @property
    def exitcode(self) -> int | None:
        """Return its exit code, or None while it runs."""


def open_index(config: NodeConfig) -> IndexDB:
    """Create the state folder if needed and open the index.

    Parameters
    ----------
    config
        The node configuration.

    Returns
    -------
    IndexDB
        The open index, its tables created.
    """
    config.state_dir.mkdir(parents=True, exist_ok=True)
    return IndexDB(
        config.effective_database_url,
        pool_size=min(config.max_associations, 16) + 2,
        touch_interval=min(1.0, config.stable_after / 4),
    )


# glibc malloc arenas a node process may use (glibc's own default: 8 per core).
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


def cap_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Let glibc's malloc use at most ``arenas`` arenas in this process.

    A node runs many threads (two per association, scoring, results,
    sending, preprocessing); by default glibc gives each thread that
    allocates an arena of its own, up to 8 per core, and memory freed in one
    stays with it: with 2 arenas, ``serve``'s peak RSS in ``bench/peers.py``
    fell from ~1,130 to ~1,050 MiB at the same speed. Must run before the
    threads start. ``MALLOC_ARENA_MAX`` in the environment wins; elsewhere
    than glibc nothing changes.

    Returns
    -------
    bool
        Whether the cap was set.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc
        return False


def keep_out_kernel_compiler() -> bool:
    """Keep Triton, PyTorch's GPU kernel compiler, out of this process.

    The node never compiles a model (no ``torch.compile``), yet torchvision's
    operators import ``torch._dynamo``, which imports Triton wherever it is
    installed (the CUDA build of PyTorch brings it): 55-75 MB resident in each
    scoring process for nothing. Marked absent, PyTorch runs as where Triton is
    not installed. Must run before PyTorch is imported.

    Returns
    -------
    bool
        Whether it was kept out (False: something imported it or PyTorch
        already).
    """
    if "triton" in sys.modules:
        return sys.modules["triton"] is None
    if "torch" in sys.modules:
        # PyTorch looked for Triton at import and may call it later: leave it.
        return False
    # None in sys.modules: an import of it raises ImportError (Python's import
    # system). Measured with torch 2.14.1 and torchvision 0.29.1, whose
    # torch._dynamo.utils probes for Triton at import.
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


def _wait_watching(
    stop: threading.Event,
    threads: Sequence[tuple[str, Callable[[], bool]]],
    every: Callable[[], None] | None = None,
) -> None:
    """Wait for ``stop``, checking each second that every thread still runs.

    ``every`` is called each second too. Returns once ``stop`` is set.

    Raises
    ------
    ThreadEndedError
        If a thread ended first: the node stops (exit status 1), so that its
        service manager starts it again, instead of running on without it.
    """
    while not stop.wait(1.0):
        if every is not None:
            every()
        ended = [name for name, alive in threads if not alive()]
        if ended:
            logger.error(
                "thread %s ended while the node ran: stopping (the service "
                "manager starts the node again)",
                ", ".join(ended),
            )
            raise ThreadEndedError(f"thread {', '.join(ended)} ended")


def _freeze_startup_objects() -> None:
    # What start-up made (torch, highdicom's tables, the models: ~430,000
    # objects) lives as long as the process: out of the collector's way, a full
    # collection takes well under a millisecond instead of ~190 ms holding the
    # GIL, for Python's own collections and the spool sweep's alike.
    gc.collect()
    gc.freeze()


def run_receiver(
    config: NodeConfig, port: int, stop: threading.Event, reuse_port: bool
) -> None:
    """Run one extra receiving process's SCP until ``stop`` is set.

    Parameters
    ----------
    config
        The node configuration.
    port
        The port shared with the other receiving processes.
    stop
        Set to shut down.
    reuse_port
        Whether to bind with SO_REUSEPORT.
    """
    index = open_index(config)
    receiver = Receiver(config, index, port=port, reuse_port=reuse_port)
    receiver.start()
    _freeze_startup_objects()
    logger.info("receiving process listening on %s:%d", config.host, receiver.port)
    try:
        # Ended, the process exits and serve starts another.
        _wait_watching(stop, [("receiver", receiver.alive)])
    finally:
        receiver.stop()
        index.close()


def serve(
    config: NodeConfig,
    stop: threading.Event,
    spawn_receiver: Callable[[int], ChildProcess],
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Receive, index and schedule until ``stop`` is set; then shut down cleanly.

    Parameters
    ----------
    config
        The node configuration.
    stop
        Set (by a signal handler) to shut down.
    spawn_receiver
        Makes an extra receiving process for the given port (not yet started);
        used when ``config.scp_processes`` is above 1.
    on_ready
        Called with the port once the node accepts associations.
    """
    # Loads PyTorch (seconds): before anything listens, so the receiver never
    # stores while its arrivals have nowhere to go.
    from dicom_node.worker import start_workers

    # Before any metric exists: every process of the node writes its figures
    # there, and /metrics adds them up.
    metrics.share(config.state_dir)
    metrics.process_figures()  # loads prometheus-client now, not in a C-STORE
    index = open_index(config)
    # Listening (and its token read) before anything starts: a bad [http]
    # stops serve here, with nothing to wind down.
    threads: list[tuple[str, Callable[[], bool]]] = []
    models: list[Callable[[], set[str]]] = []
    try:
        web = _web_server(
            config,
            index,
            lambda: [(name, alive()) for name, alive in threads],
            (lambda: models[0]() if models else set()) if config.workers else None,
        )
    except BaseException:
        index.close()
        raise
    swept = Storage(config.storage_dir).sweep_incoming()
    if swept:
        logger.warning(
            "removed %d partly received or temporary file(s) left by processes that "
            "ended",
            swept,
        )
    for caller in config.callers:
        if caller.host is None and not config.allow_any_caller:
            logger.warning(
                "caller %r has no host: its AE title is accepted from any address "
                '(AE titles are not secret; give it host = "<IP address>")',
                caller.ae_title,
            )
    for model in config.models if not config.workers else ():
        # (With worker threads here, they say it when they load the models.)
        if not model.path.is_file():
            logger.warning(
                "model file %s not found: its jobs will wait until it exists",
                model.path,
            )
    shared = config.scp_processes > 1
    receiver = Receiver(config, index, reuse_port=shared)
    receiver.start()
    port = receiver.port
    workers = start_workers(
        config, index, config.workers, score_on_arrival=config.score_on_arrival
    )
    scheduler = Scheduler(
        index,
        [m.key for m in config.models],
        config.stable_after,
        on_queued=workers.nudge,
    )
    arrivals = workers.arrivals

    def on_stored(arrival: Arrival) -> None:
        scheduler.arrived()
        if arrivals is not None:
            arrivals.arrived(arrival)

    receiver.ctx.on_stored = on_stored
    scheduler.start()
    periods = config.retention
    retention = (
        RetentionSweeper(index, config)
        if periods.studies_days or periods.results_days or periods.audit_days
        else None
    )
    if retention is not None:
        retention.start()
    threads.append(("receiver", receiver.alive))
    for loop in (scheduler, *workers.loops, *([retention] if retention else [])):
        threads.append((loop.name, loop.is_alive))
    if workers.models is not None:
        models.append(workers.models.loaded_keys)
    if web is not None:
        web.start()
    _freeze_startup_objects()
    children: list[ChildProcess] = []
    for _ in range(config.scp_processes - 1):
        child = spawn_receiver(port)
        child.start()
        children.append(child)
    logger.info(
        "listening as %s on %s:%d (%d receiving process%s), state in %s",
        config.ae_title,
        config.host,
        port,
        config.scp_processes,
        "" if config.scp_processes == 1 else "es",
        config.state_dir,
    )
    if on_ready:
        on_ready(port)

    def restart_ended_children() -> None:
        for i, child in enumerate(children):
            if not child.is_alive():
                logger.error(
                    "receiving process ended (exit code %s); starting another",
                    child.exitcode,
                )
                children[i] = spawn_receiver(port)
                children[i].start()

    try:
        _wait_watching(stop, threads, restart_ended_children)
    finally:
        logger.info("shutting down: no new associations, finishing running ones")
        if web is not None:
            web.stop()
        for child in children:
            child.terminate()
        receiver.stop()
        for child in children:
            child.join(timeout=15)
            if child.is_alive():
                child.kill()
                child.join()
        scheduler.stop()
        if retention is not None:
            retention.stop()
        workers.stop(timeout=30)
        index.close()
        logger.info("stopped")


def run_worker(config: NodeConfig, stop: threading.Event) -> None:
    """Run job and delivery threads against the shared index until ``stop`` is set.

    Parameters
    ----------
    config
        The node configuration (same index and storage as ``serve``).
    stop
        Set (by a signal handler) to shut down after the current job.
    """
    joined = metrics.share(config.state_dir, join=True)
    metrics.process_figures()  # shown from the start, not from the first beat
    index = open_index(config)
    from dicom_node.worker import start_workers

    workers = start_workers(config, index, max(1, config.workers))
    # A worker has no listener of its own ([http] is serve's port, and serve
    # may be restarting): its figures reach serve's /metrics on this host.
    if joined:
        logger.info("metrics counted by the serve process of %s", config.state_dir)
    else:
        logger.info("no serve process found here: this worker's metrics are not served")
    logger.info(
        "worker running %d job thread(s) on the index of %s",
        len(workers.loops) - 1,
        config.state_dir,
    )
    try:
        _wait_watching(stop, [(loop.name, loop.is_alive) for loop in workers.loops])
    finally:
        logger.info("stopping: finishing the current jobs")
        workers.stop()
        index.close()
        logger.info("stopped")


def _web_server(
    config: NodeConfig,
    index: IndexDB,
    threads: Callable[[], list[tuple[str, bool]]],
    models_loaded: Callable[[], set[str]] | None,
) -> WebServer | None:
    """Return the HTTP listener (bound, not yet serving) when [http] port is set.

    Raises
    ------
    ListenError
        If its address cannot be listened on.
    """
    if not config.http.port:
        return None
    try:
        web = WebServer(Probes(index, config, threads, models_loaded))
    except OSError as exc:
        raise ListenError(
            config.http.host,
            config.http.port,
            f"[http] {exc.strerror or exc}: choose another [http] port, or 0 to "
            "turn the listener off",
        ) from exc
    logger.info(
        "http on %s:%d: /metrics, /healthz, /readyz, status page at /",
        config.http.host,
        web.port,
    )
    return web


@contextmanager
def running_node(config: NodeConfig) -> Iterator[int]:
    """Run ``serve`` (one receiving process) in a background thread.

    For the demo, the tests and the benchmarks. Yields the listening port; on
    exit, stops the node as SIGTERM would and waits for it.

    Raises
    ------
    DicomNodeError
        If the node does not start within a minute.
    """
    stop = threading.Event()
    ready: list[int] = []
    failed: list[BaseException] = []

    def no_children(_: int) -> Any:
        raise DicomNodeError("running_node runs one receiving process")

    def run() -> None:
        try:
            serve(config, stop, no_children, on_ready=ready.append)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="dicom-node-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not ready and not failed and time.monotonic() < deadline:
        time.sleep(0.05)
    if failed or not ready:
        raise DicomNodeError(
            f"the node did not start: {failed[0] if failed else 'timeout'}"
        )
    try:
        yield ready[0]
    finally:
        stop.set()
        thread.join(timeout=60)
