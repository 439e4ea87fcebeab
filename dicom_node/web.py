"""The node's HTTP listener (``[http]``): metrics, health and a read-only status page.

- ``/metrics``: Prometheus text format, every process of the node
  (:mod:`dicom_node.metrics`) plus the index's job and outbox states.
- ``/healthz``: 200 while the process runs.
- ``/readyz``: 200 when the index answers, the storage is writable with more
  than ``min_free_bytes`` free, every configured model is loaded and every
  thread of the node is alive; else 503. Both answer JSON with the reasons.
- ``/``: recent studies (by uid_ref; patient name and ID only with
  ``show_patient``), each model's job, verdict and deliveries, failures with
  their reasons, queue depths and the Grad-CAM captures as thumbnails (without
  ``show_patient``, only those whose source says its pixels do not identify
  the patient); it reloads itself every 10 seconds.

Only GET. With ``token_file``, every request but ``/healthz`` needs
``Authorization: Bearer <token>``. Without one, a request whose Host names
a domain other than localhost or the configured ``host`` gets 421 (a page in
the operator's browser cannot read the node's pages by DNS rebinding).
Connections are served by at most :data:`MAX_CLIENTS` threads, at most
:data:`MAX_PER_HOST` for one source, each read with a timeout and the whole
exchange within a deadline; when all are taken, the connection that has waited
longest without sending its request is closed for a new one.
"""

from __future__ import annotations

import contextlib
import hmac
import html
import io
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image
from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node import metrics
from dicom_node.config import NodeConfig, read_token
from dicom_node.gate import HostSlots
from dicom_node.index import (
    Delivery,
    DeliveryState,
    ErrorRecord,
    IndexDB,
    Instance,
    Job,
    JobState,
    ResultRecord,
    Series,
    Study,
)
from dicom_node.log import describe_exception, uid_ref
from dicom_node.results.store import capture_files, identifying_capture, results_root
from dicom_node.status import counts_by

__all__ = ["MAX_CLIENTS", "Probes", "WebServer"]

logger = logging.getLogger(__name__)

MAX_CLIENTS = 16  # connections served at once
MAX_PER_HOST = 8  # of them from one source address (IPv6: its /64; a browser opens 6)
_TIMEOUT = 5.0  # seconds a client has for each read of its request
_DEADLINE = 15.0  # seconds for a whole request and its answer
_GIVE_WAY = 1.0  # seconds a new connection waits for a cut one's slot
_THUMBNAIL = 192  # pixels, the longer side
_RECENT = 30  # studies on the status page
_REFRESH = 10  # seconds between the page's reloads
_CAPTURE = re.compile(r"^/capture/(\d{1,12})/(\d{1,3})\.png$")


@dataclass(frozen=True, slots=True)
class Probes:
    """What the listener reads: the index, the configuration, the live threads.

    Parameters
    ----------
    index
        The index.
    config
        The node configuration.
    threads
        The node's long-running threads of this process: (name, alive) pairs.
    models_loaded
        The keys of the configured models this process has loaded; None when
        this process scores nothing (worker processes do).
    """

    index: IndexDB
    config: NodeConfig
    threads: Callable[[], Sequence[tuple[str, bool]]]
    models_loaded: Callable[[], set[str]] | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], probes: Probes, token: str | None):
        self.probes = probes
        self.token = token
        self.host_name = address[0].lower().rstrip(".")  # accepted as Host
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._deadlines: dict[Any, float] = {}
        # Connections whose request has not been read yet, since when.
        self._unread: dict[Any, float] = {}
        self._hosts = HostSlots(MAX_PER_HOST)
        self._deadlines_lock = threading.Lock()
        self.stopped = threading.Event()
        super().__init__(address, _Handler)
        threading.Thread(target=self._watch, name="http-deadlines", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        # A thread per connection, but never more than MAX_CLIENTS of them, nor
        # MAX_PER_HOST from one source. When all are taken, the connection
        # that has waited longest without sending its request gives way: a
        # few silent connections would otherwise keep /healthz from a probe.
        address = str(client_address[0])
        if not self._hosts.take(address):
            self.shutdown_request(request)
            return
        if not self.slots.acquire(blocking=False):
            with self._deadlines_lock:
                oldest = min(self._unread, key=self._unread.__getitem__, default=None)
            if oldest is not None:
                _cut(oldest)
            if oldest is None or not self.slots.acquire(timeout=_GIVE_WAY):
                self._hosts.release(address)
                self.shutdown_request(request)
                return
        with self._deadlines_lock:  # from now on it may give way in turn
            self._unread[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._deadlines_lock:
                self._unread.pop(request, None)
            self.slots.release()
            self._hosts.release(address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # A whole request and its answer within _DEADLINE, however slowly the
        # client sends (a byte every few seconds would meet every read's
        # timeout): one watchdog thread cuts what is past its deadline.
        with self._deadlines_lock:
            self._deadlines[request] = time.monotonic() + _DEADLINE
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._deadlines_lock:
                self._deadlines.pop(request, None)
                self._unread.pop(request, None)
            self.slots.release()
            self._hosts.release(str(client_address[0]))

    def request_read(self, request: Any) -> None:
        """Note that a connection has sent its request (it no longer gives way)."""
        with self._deadlines_lock:
            self._unread.pop(request, None)

    def _watch(self) -> None:
        while not self.stopped.wait(1.0):
            now = time.monotonic()
            with self._deadlines_lock:
                late = [r for r, due in self._deadlines.items() if due < now]
            for request in late:
                _cut(request)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _TIMEOUT
    server_version = "dicom-node"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http %s", format % args)

    def parse_request(self) -> bool:
        """Read the request's headers; then the connection is served, not cut."""
        parsed = super().parse_request()
        self.server.request_read(self.request)
        return parsed

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path != "/healthz" and not self._host_accepted():
                self._json(
                    HTTPStatus.MISDIRECTED_REQUEST,
                    {
                        "error": "Host not accepted without a token: use an IP "
                        "address, localhost or the configured host, or set "
                        "token_file"
                    },
                )
                return
            if path != "/healthz" and not self._authorised():
                self._send(
                    HTTPStatus.UNAUTHORIZED,
                    b'{"error": "bearer token required"}\n',
                    "application/json",
                    {"WWW-Authenticate": "Bearer"},
                )
                return
            if path == "/healthz":
                self._json(HTTPStatus.OK, {"status": "alive"})
            elif path == "/readyz":
                problems = readiness(self.server.probes)
                self._json(
                    HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK,
                    {"ready": not problems, "problems": problems},
                )
            elif path == "/metrics":
                body = metrics.exposition([_IndexCollector(self.server.probes.index)])
                self._send(HTTPStatus.OK, body, metrics.CONTENT_TYPE)
            elif path == "/":
                page = status_page(self.server.probes)
                self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
            elif match := _CAPTURE.match(path):
                image = capture_thumbnail(
                    self.server.probes, int(match[1]), int(match[2])
                )
                if image is None:
                    self._json(HTTPStatus.NOT_FOUND, {"error": "no such capture"})
                else:
                    self._send(HTTPStatus.OK, image, "image/png")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        except (ConnectionError, TimeoutError):
            return
        except Exception as exc:  # noqa: BLE001 - a page fails, the node goes on
            logger.warning("http %s failed: %s", path[:40], describe_exception(exc))
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "failed"})

    def do_HEAD(self) -> None:
        self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "GET only"})

    def _host_accepted(self) -> bool:
        # DNS rebinding: a web page the operator opens can point a name of its
        # own at this listener and read the status page and its captures from
        # the operator's browser. Such a request names that domain in Host, so
        # without a token (a secret such a page cannot send) Host must be an IP
        # address, localhost or the configured host.
        if self.server.token is not None:
            return True
        given = self.headers.get("Host")
        if given is None:
            return True  # HTTP/1.0 without Host: no browser sends that
        try:
            name = urlsplit(f"//{given.strip()}").hostname
        except ValueError:
            return False
        if not name:
            return False
        name = name.rstrip(".")
        if name in ("localhost", self.server.host_name):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def _authorised(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.encode()
        )

    def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        self._send(status, (json.dumps(body) + "\n").encode(), "application/json")

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'self'; style-src 'self' 'unsafe-inline'",
        )
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _IndexCollector:
    """Job and outbox states read from the index at scrape time."""

    def __init__(self, index: IndexDB) -> None:
        self.index = index

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        def counts(session: Session) -> tuple[dict[str, int], dict[str, int]]:
            return counts_by(session, Job.state), counts_by(session, Delivery.state)

        jobs, deliveries = self.index.read(counts)
        family = GaugeMetricFamily(
            "dicom_node_jobs", "Jobs in the index by state", labels=["state"]
        )
        for state in JobState:
            family.add_metric([state.value], float(jobs.get(state.value, 0)))
        yield family
        family = GaugeMetricFamily(
            "dicom_node_outbox", "Deliveries in the index by state", labels=["state"]
        )
        for outbox_state in DeliveryState:
            family.add_metric(
                [outbox_state.value], float(deliveries.get(outbox_state.value, 0))
            )
        yield family


def readiness(probes: Probes) -> list[str]:
    """Return what keeps the node from being ready (empty: ready)."""
    problems: list[str] = []
    try:
        # A plain read on a pooled connection, outside the index's write
        # transactions (which take SQLite's write lock).
        raw = probes.index.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
        finally:
            raw.close()
    except Exception as exc:  # noqa: BLE001 - any failure: not ready
        problems.append(f"index unavailable ({type(exc).__name__})")
    storage = probes.config.storage_dir
    try:
        probe = storage / f".ready-{os.getpid()}-{threading.get_ident()}"
        with probe.open("wb") as f:
            f.write(b"ready")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        free = os.statvfs(storage)
        left = free.f_bavail * free.f_frsize
        if left < probes.config.http.min_free_bytes:
            problems.append(
                f"storage has {left} bytes free, under min_free_bytes "
                f"{probes.config.http.min_free_bytes}"
            )
    except OSError as exc:
        problems.append(f"storage not writable ({exc.strerror or type(exc).__name__})")
    if probes.models_loaded is not None:
        loaded = probes.models_loaded()
        problems += [
            f"model {m.path.name} not loaded"
            for m in probes.config.models
            if m.key not in loaded
        ]
    problems += [
        f"thread {name} not running" for name, alive in probes.threads() if not alive
    ]
    return problems


@dataclass(frozen=True, slots=True)
class _Row:
    study_id: int
    ref: str
    modalities: str
    instances: int
    arrived: datetime
    patient: str
    jobs: list[tuple[str, str, str]]  # model, state, error
    results: list[
        tuple[int, str, list[tuple[str, str]], list[int]]
    ]  # id, verdict, deliveries, the numbers of the captures shown


def _recent(session: Session, probes: Probes) -> list[_Row]:
    rows: list[_Row] = []
    studies = session.scalars(
        select(Study).order_by(Study.last_received_at.desc()).limit(_RECENT)
    ).all()
    root = results_root(probes.config.state_dir)
    for study in studies:
        modalities = sorted(
            {
                str(m)
                for m in session.scalars(
                    select(Series.modality).where(Series.study_id == study.id)
                )
                if m
            }
        )
        instances = session.scalar(
            select(func.count())
            .select_from(Instance)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study.id)
        )
        jobs = [
            (Path(model).stem, str(state), (error or "")[:200])
            for model, state, error in session.execute(
                select(Job.model, Job.state, Job.last_error)
                .where(Job.study_id == study.id)
                .order_by(Job.id)
            )
        ]
        results = []
        for result in session.scalars(
            select(ResultRecord)
            .where(ResultRecord.study_id == study.id)
            .order_by(ResultRecord.id)
        ):
            deliveries = [
                (str(d), str(s))
                for d, s in session.execute(
                    select(Delivery.destination, Delivery.state).where(
                        Delivery.result_id == result.id
                    )
                )
            ]
            captures = shown_captures(
                capture_files(root / result.folder), probes.config
            )
            results.append((result.id, _verdict(result), deliveries, captures))
        patient = ""
        if probes.config.http.show_patient:
            patient = _patient(session, probes.config.storage_dir, study.id)
        rows.append(
            _Row(
                study.id,
                uid_ref(study.study_instance_uid),
                ", ".join(modalities),
                int(instances or 0),
                study.last_received_at,
                patient,
                jobs,
                results,
            )
        )
    return rows


def _verdict(result: ResultRecord) -> str:
    try:
        labels = json.loads(result.summary)
        return "; ".join(
            f"{name}: {'Present' if v['positive'] else 'Absent'} "
            f"{100 * float(v['probability']):.0f} %"
            for name, v in labels.items()
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?"


def _patient(session: Session, storage: Path, study_id: int) -> str:
    path = session.scalar(
        select(Instance.path)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
        .limit(1)
    )
    if path is None:
        return ""
    try:
        ds = dcmread(
            storage / path,
            stop_before_pixels=True,
            specific_tags=["SpecificCharacterSet", "PatientName", "PatientID"],
        )
        return f"{ds.get('PatientName', '')} ({ds.get('PatientID', '')})"
    except Exception:  # noqa: BLE001 - a page never fails on one file
        return "?"


def status_page(probes: Probes) -> str:
    """Return the status page's HTML."""

    def read(
        session: Session,
    ) -> tuple[list[_Row], dict[str, int], dict[str, int], list[Any], list[Any]]:
        rows = _recent(session, probes)
        jobs = counts_by(session, Job.state)
        outbox = counts_by(session, Delivery.state)
        errors = session.execute(
            select(ErrorRecord.at, ErrorRecord.source, ErrorRecord.message)
            .order_by(ErrorRecord.id.desc())
            .limit(10)
        ).all()
        failing = session.execute(
            select(
                Delivery.destination,
                Delivery.state,
                Delivery.attempts,
                Delivery.last_error,
            )
            .where(Delivery.last_error.is_not(None), Delivery.state != "done")
            .order_by(Delivery.updated_at.desc())
            .limit(10)
        ).all()
        return rows, jobs, outbox, [*errors], [*failing]

    rows, jobs, outbox, errors, failing = probes.index.read(read)
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{_REFRESH}">',
        f"<title>dicom-node {e(probes.config.ae_title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}"
        "table{border-collapse:collapse}th,td{border:1px solid #bbb;"
        "padding:.2em .4em;vertical-align:top;text-align:left}"
        ".failed,.dead{color:#b00}.done{color:#070}img{max-height:96px}</style>",
        "</head><body>",
        f"<h1>dicom-node {e(probes.config.ae_title)}</h1>",
        '<p id="queues">Jobs: '
        + ", ".join(f"{e(s.value)} {jobs.get(s.value, 0)}" for s in JobState)
        + ". Deliveries: "
        + ", ".join(f"{e(s.value)} {outbox.get(s.value, 0)}" for s in DeliveryState)
        + ".</p>",
        "<h2>Recent studies</h2>",
        '<table id="studies"><tr><th>Study</th>'
        + ("<th>Patient</th>" if probes.config.http.show_patient else "")
        + "<th>Modality</th><th>Images</th><th>Last arrival (UTC)</th>"
        "<th>Jobs</th><th>Results</th></tr>",
    ]
    for row in rows:
        jobs_cell = "<br>".join(
            f'{e(model)}: <span class="{e(state)}">{e(state)}</span>'
            + (f" ({e(error)})" if error and state != "done" else "")
            for model, state, error in row.jobs
        )
        results_cell = "<br>".join(
            f"{e(verdict)} "
            + ", ".join(
                f'{e(dest)} <span class="{e(state)}">{e(state)}</span>'
                for dest, state in deliveries
            )
            + "".join(
                f'<br><img alt="Grad-CAM capture {n}" src="/capture/{rid}/{n}.png">'
                for n in captures
            )
            for rid, verdict, deliveries, captures in row.results
        )
        out.append(
            f'<tr class="study"><td>{e(row.ref)}</td>'
            + (f"<td>{e(row.patient)}</td>" if probes.config.http.show_patient else "")
            + f"<td>{e(row.modalities)}</td><td>{row.instances}</td>"
            f"<td>{e(row.arrived.strftime('%Y-%m-%d %H:%M:%S'))}</td>"
            f"<td>{jobs_cell}</td><td>{results_cell}</td></tr>"
        )
    out.append("</table>")
    out.append('<h2>Failing deliveries</h2><ul id="failing">')
    out += [
        f"<li>{e(destination)}: {e(str(state))} after {attempts} tr"
        f"{'y' if attempts == 1 else 'ies'}: {e((error or '')[:300])}</li>"
        for destination, state, attempts, error in failing
    ]
    out.append("</ul>")
    out.append('<h2>Last errors</h2><ul id="errors">')
    out += [
        f"<li>{e(at.strftime('%Y-%m-%d %H:%M:%S'))} {e(source)}: {e(message)}</li>"
        for at, source, message in errors
    ]
    out.append("</ul></body></html>")
    return "\n".join(out) + "\n"


def shown_captures(captures: list[Path], config: NodeConfig) -> list[int]:
    """Return the numbers (1-based) of a result set's captures the pages show.

    Without ``show_patient``, not a capture whose pixels may identify the
    patient (its source did not say NO to both burned-in identifying text and
    recognizable features; or it cannot be read): the page names studies by
    uid_ref only.

    Parameters
    ----------
    captures
        The result set's captures (:func:`dicom_node.results.store.capture_files`).
    config
        The node configuration (``[http] show_patient``).

    Returns
    -------
    list of int
        The captures' numbers, in order.
    """
    return [
        number
        for number, path in enumerate(captures, start=1)
        if config.http.show_patient or not identifying_capture(path)
    ]


def capture_thumbnail(probes: Probes, result_id: int, number: int) -> bytes | None:
    """Return a result set's capture ``number`` (1-based) as a small PNG.

    None when there is no such capture, or the pages do not show it
    (:func:`shown_captures`).
    """
    folder = probes.index.read(
        lambda s: s.scalar(
            select(ResultRecord.folder).where(ResultRecord.id == result_id)
        )
    )
    if folder is None:
        return None
    captures = capture_files(results_root(probes.config.state_dir) / folder)
    if number not in shown_captures(captures, probes.config):
        return None
    image = Image.fromarray(dcmread(captures[number - 1]).pixel_array)
    image.thumbnail((_THUMBNAIL, _THUMBNAIL))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class WebServer:
    """The listener in a thread of its own.

    Parameters
    ----------
    probes
        What it reads.

    Raises
    ------
    ConfigError
        If the token file is not usable.
    OSError
        If the address cannot be listened on.
    """

    def __init__(self, probes: Probes) -> None:
        http = probes.config.http
        token = (
            read_token(http.token_file, "[http] token_file")
            if http.token_file is not None
            else None
        )
        self._server = _Server((http.host, http.port), probes, token)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="http", daemon=True
        )

    @property
    def port(self) -> int:
        """Return the port listened on."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def alive(self) -> bool:
        """Return whether the listener's thread runs."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
