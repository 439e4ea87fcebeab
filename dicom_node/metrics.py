"""Prometheus metrics of the node, shared by its processes (prometheus-client).

The receiving processes, the results processes and the process that serves
``/metrics`` are different processes; prometheus-client's multiprocess mode
lets each write its figures to files in one folder, which the scrape adds up.
The folder is chosen once, before any metric exists (:func:`share`): ``serve``
makes a temporary folder (gone when it ends), which the processes it starts
inherit through the environment, and names it in ``<state_dir>/metrics.path``;
a ``dicom-node worker`` on the same host and state folder joins it, so
``serve``'s ``/metrics`` counts the worker's studies too (the systemd units
share one private /tmp for this). A worker on another host has no listener:
its figures are not served.

Metrics are made on first use; every recording function is cheap and never
raises.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import resource
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "CONTENT_TYPE",
    "ENV",
    "association",
    "delivered",
    "exposition",
    "images_scored",
    "job_waited",
    "process_figures",
    "received",
    "result_latency",
    "results_prepared",
    "scored",
    "share",
]

logger = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
# The pid that chose ENV (not a DICOM_NODE_* name: those are configuration).
_OWNER = "PROMETHEUS_MULTIPROC_DIR_OWNER"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a study's wait for a worker, its model and Grad-CAM time, and the
# time from stable to delivered.
_FAST = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SLOW = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

_lock = threading.Lock()
_made: dict[str, Any] = {}


def share(state_dir: Path, join: bool = False) -> bool:
    """Write this process's metrics, and its children's, to files in one folder.

    Must run before the first metric is made in this process. A folder this
    process chose before is kept (a node run again in one process); one named
    in the environment by another process (a program that started this one)
    is not: this process's own children inherit it, not its own commands.

    Parameters
    ----------
    state_dir
        The node's state folder, where ``serve`` names its folder.
    join
        Join the folder ``serve`` named there, when it still exists (a
        worker); else (``serve``) make one and name it there.

    Returns
    -------
    bool
        Whether this process joined another's folder (its figures are then
        served by that process's ``/metrics``).
    """
    named = state_dir / "metrics.path"
    if os.environ.get(ENV) and os.environ.get(_OWNER) == str(os.getpid()):
        if not join:  # named for this state folder's workers too
            _name_folder(named, Path(os.environ[ENV]))
        return False
    os.environ[_OWNER] = str(os.getpid())
    if join:
        try:
            folder = Path(named.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError):
            folder = None
        if folder is not None and folder.is_dir():
            os.environ[ENV] = str(folder)
            return True
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-metrics-"))
    os.environ[ENV] = str(folder)
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not in a child that inherited the handler
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(remove)
    if not join:
        _name_folder(named, folder)
    return False


def _name_folder(named: Path, folder: Path) -> None:
    """Name the metrics folder in the state folder, for workers to join."""
    try:
        named.parent.mkdir(parents=True, exist_ok=True)
        partial = named.with_name(f".{named.name}.{os.getpid()}")
        partial.write_text(str(folder), encoding="utf-8")
        partial.replace(named)
    except OSError as exc:
        logger.warning(
            "workers cannot join this node's metrics: %s", exc.strerror or exc
        )


def _metric(name: str, make: Callable[[Any], Any]) -> Any:
    with _lock:
        found = _made.get(name)
        if found is None:
            import prometheus_client

            found = _made[name] = make(prometheus_client)
        return found


def _safely(record: Callable[[], None]) -> None:
    try:
        record()
    except Exception as exc:  # noqa: BLE001 - a metric never fails the node's work
        logger.debug("metric not recorded: %s", type(exc).__name__)


def received(size: int) -> None:
    """Count an instance stored (Success) and its bytes."""

    def record() -> None:
        _metric(
            "instances",
            lambda p: p.Counter(
                "dicom_node_instances_received",
                "Instances stored and acknowledged with Success",
            ),
        ).inc()
        _metric(
            "bytes",
            lambda p: p.Counter(
                "dicom_node_bytes_received", "Bytes of the instances stored"
            ),
        ).inc(size)

    _safely(record)


def association(outcome: str, reason: str = "") -> None:
    """Count an association by its outcome (accepted, rejected, aborted) and reason.

    Numbers in the reason (lengths, counts) are replaced by N: one series per
    kind of reason, however many peers send whatever lengths.
    """
    reason = re.sub(r"\d+", "N", reason)[:80]
    _safely(
        lambda: (
            _metric(
                "associations",
                lambda p: p.Counter(
                    "dicom_node_associations",
                    "Associations by outcome, with the reason of a rejection or abort",
                    ["outcome", "reason"],
                ),
            )
            .labels(outcome, reason)
            .inc()
        )
    )


def job_waited(seconds: float) -> None:
    """Observe how long a job waited from queued to claimed."""
    _safely(
        lambda: _metric(
            "job_wait",
            lambda p: p.Histogram(
                "dicom_node_job_wait_seconds",
                "Time a job waited from queued to claimed by a worker",
                buckets=_SLOW,
            ),
        ).observe(max(0.0, seconds))
    )


def scored(model: str, model_seconds: float, gradcam_seconds: float) -> None:
    """Observe a study's model time (preprocessing, forward) and Grad-CAM time."""

    def record() -> None:
        _metric(
            "inference",
            lambda p: p.Histogram(
                "dicom_node_inference_seconds",
                "Model time per study: decoding, preprocessing and forward passes",
                ["model"],
                buckets=_FAST,
            ),
        ).labels(model).observe(model_seconds)
        _metric(
            "gradcam",
            lambda p: p.Histogram(
                "dicom_node_gradcam_seconds",
                "Grad-CAM time per study",
                ["model"],
                buckets=_FAST,
            ),
        ).labels(model).observe(gradcam_seconds)

    _safely(record)


def images_scored(model: str, when: str, count: int) -> None:
    """Count the images of a study's job: scored on ``arrival`` or by the ``job``.

    Per job: a study aggregated again for a late image counts its earlier
    images again (as scored on arrival: the job did not score them).
    """
    if not count:
        return

    def record() -> None:
        _metric(
            "images_scored",
            lambda p: p.Counter(
                "dicom_node_images_scored",
                "Images scored for studies' jobs: when they arrived, or by the job",
                ["model", "when"],
            ),
        ).labels(model, when).inc(count)

    _safely(record)


def results_prepared(outcome: str) -> None:
    """Count a result set built while its study arrived: built, used, not used."""

    def record() -> None:
        _metric(
            "prepared",
            lambda p: p.Counter(
                "dicom_node_results_prepared_total",
                "Result sets built while their study arrived (built), and whether "
                "its job took them (used) or built its own (not used)",
                ["outcome"],
            ),
        ).labels(outcome).inc()

    _safely(record)


def delivered(outcome: str) -> None:
    """Count a delivery try by its outcome: done, retry or dead."""
    _safely(
        lambda: (
            _metric(
                "deliveries",
                lambda p: p.Counter(
                    "dicom_node_deliveries",
                    "Delivery tries by outcome (done, retry, dead)",
                    ["outcome"],
                ),
            )
            .labels(outcome)
            .inc()
        )
    )


def result_latency(seconds: float) -> None:
    """Observe the time from a study becoming stable to its results delivered."""
    _safely(
        lambda: _metric(
            "latency",
            lambda p: p.Histogram(
                "dicom_node_result_latency_seconds",
                "Time from a study becoming stable to its results delivered",
                buckets=_SLOW,
            ),
        ).observe(max(0.0, seconds))
    )


def process_figures() -> None:
    """Record this process's resident memory and CPU time (one series per pid)."""

    def record() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        _metric(
            "cpu",
            lambda p: p.Gauge(
                "dicom_node_process_cpu_seconds",
                "CPU time of each node process (user and system)",
                multiprocess_mode="liveall",
            ),
        ).set(usage.ru_utime + usage.ru_stime)
        _metric(
            "rss",
            lambda p: p.Gauge(
                "dicom_node_process_resident_memory_bytes",
                "Resident memory of each node process",
                multiprocess_mode="liveall",
            ),
        ).set(_resident_bytes())

    _safely(record)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# A process's own figures (memory, CPU): one file per live process.
_PER_PROCESS = re.compile(r"^gauge_liveall_(\d+)\.db$")


def _forget_ended_processes(folder: Path, forget: Callable[[int], None]) -> None:
    """Drop the per-process figures of the processes that have ended.

    Counters and histograms of an ended process stay (the totals include its
    work); its memory and CPU gauges would stay too, a stopped worker shown as
    running, until ``serve`` started again. A process killed without a chance
    to clean up is found here, when ``/metrics`` is read.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        found = _PER_PROCESS.match(name)
        if found is None:
            continue
        pid = int(found[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            forget(pid)
        except PermissionError:
            continue  # alive: another user's


def exposition(extra: Iterable[Any] = ()) -> bytes:
    """Return every process's metrics in Prometheus's text format.

    Parameters
    ----------
    extra
        Collectors to add (figures read from the index at scrape time).
    """
    import prometheus_client
    from prometheus_client import multiprocess, values

    process_figures()
    registry = prometheus_client.CollectorRegistry()
    if values.ValueClass is not values.MutexValue:  # chosen at its import
        _forget_ended_processes(Path(os.environ[ENV]), multiprocess.mark_process_dead)
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:  # one process (no folder was chosen before): its own metrics
        registry = prometheus_client.REGISTRY
    for collector in extra:
        registry.register(collector)
    try:
        return bytes(prometheus_client.generate_latest(registry))
    finally:
        if registry is prometheus_client.REGISTRY:
            for collector in extra:
                registry.unregister(collector)
