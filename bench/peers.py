"""Side by side: dicom-node and dicom-ai-router 0.3.0 on the same DX workload.

Both products get the same one-image DX studies (512x512, 16-bit MONOCHROME2,
Modality DX, BodyPartExamined CHEST, new UIDs each) from dcmtk's storescu over
one association, run the same resnet18 at 224 px (bench/e2e.py's model file:
threshold 0, so every study is positive and gets its Grad-CAM picture), wait for
the same 2 s quiet timer, and send their results to dcmtk's storescp, the PACS
stand-in (each tool in its own process); arrival times are the mtimes of
storescp's files.

- dicom-node: `dicom-node serve` in its own process with example.toml's settings
  but the port, a temporary state_dir, stable_after = 2, this model, the bench as
  a caller and storescp as the destination. Its model_cache (the model compiled
  for the CPU, made by a short-lived child process the first time a node loads a
  model file) is kept beside the model for every run: the warm-up round
  compiles it, as a node does once per model update; the runs measure the node
  as it runs from then on.
- dicom-ai-router: installed from the package registry into a virtual
  environment of its own (~/.cache/dicom-node-bench/peer-venv, reused when it is
  there; --peer-wheel installs a local wheel instead) and run as `serve` with a
  router.yaml that routes DX/CHEST studies to a model server written here: the
  HTTP contract of the peer's ai_client (multipart/form-data DICOM in, JSON
  findings out) around inference.Classifier, traced as the node loads it, with
  Grad-CAM of the top image (the contract returns the finding's circle on its
  key image: the Grad-CAM peak), in its own process with this project's
  python, with as many torch threads per forward pass as the node gives each of
  its 2 workers here (the router's 2 workers call it at once; --server-threads).
  The peer's own defaults otherwise (2 workers, de-identification,
  audit log), with one change without which it returns nothing for a DX study:
  it passes only CT images to a model (airouter.pipeline.IMAGE_SOP_CLASSES), and
  its launcher here adds the DX and CR storage classes to that set.

Each run starts the product afresh, sends one warm-up study (not counted: it
also shows which result objects the product sends per study), then --singles
studies one at a time (each once the previous one's results arrived), then
--studies studies at once. Per product:

1. one study alone: storescu's end (last instance acknowledged) -> the study's
   first result at the PACS, less the 2 s timer (median of the singles);
2. burst: the last study quiet (storescu's end + 2 s) -> every study with all of
   its result objects at the PACS;
3. peak memory: the sum of the RSS of all the product's processes (node: serve
   and any children; peer: router and model server), read from /proc every
   50 ms from start to the burst's end;
4. CPU per study in the burst: user + system CPU of those processes from before
   sending the burst to its last result, over the number of studies.

A warm-up round (one short run of each, not counted), then --runs alternating
runs (node, peer, node, peer, ...); the figures are the medians over the runs,
with the ratio node / peer beside the goal (single and burst <= 0.5, memory
<= 1.0, CPU <= 0.7). Linux only (/proc). Not part of the test suite: the peer's
environment is installed here, on the first run (--keep leaves each run's
configurations, logs and PACS files in /tmp).

    python bench/peers.py [--studies 40] [--runs 3] [--singles 5]
                          [--peer-wheel PATH] [--peer-venv DIR]
                          [--server-threads N] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import venv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DCMTK = Path("/usr/bin")  # dcmtk by full path: pynetdicom installs same-named apps
PEER = "dicom-ai-router"
PEER_VERSION = "0.3.0"
CACHE = Path.home() / ".cache" / "dicom-node-bench"
STABLE_AFTER = 2.0  # both products' quiet timer, seconds
SAMPLE_PERIOD = 0.05  # /proc sampling of memory and CPU, seconds
CALLING_AE = "BENCH"
PACS_AE = "PACS"
NODE_AE = "DICOMNODE"
PEER_AE = "AIROUTER"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
sys.path.insert(0, str(REPO))

from bench import e2e  # noqa: E402
from bench.e2e import free_port  # noqa: E402

# Runs the peer's `serve` after one change: its pipeline passes only CT images
# to a model (IMAGE_SOP_CLASSES is CT and Enhanced CT) and answers every other
# study IGNORED, "no eligible images for the model"; DX (for presentation, for
# processing) and CR are added to that set. Nothing else of the peer changes.
PEER_LAUNCHER = """\
import sys
from airouter import pipeline
pipeline.IMAGE_SOP_CLASSES.update({
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image Storage
})
from airouter.__main__ import main
main(sys.argv[1:])
"""

SOP_NAMES = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# --- The peer's model server ------------------------------------------------------


def serve_model(model: Path, port: int, threads: int) -> None:
    """The HTTP contract of the peer's ai_client around inference.Classifier.

    ``POST /infer/<name>`` with multipart/form-data parts named ``files`` (DICOM
    Part-10 instances of one study) answers 200 with the JSON the peer builds its
    SR and key image from: model, model_version, result, summary_lines,
    key_sop_instance_uid (the image the finding is on), overlays ([{cx, cy, r,
    label}]: here a circle at the Grad-CAM peak, its radius that of the area
    above half the peak), display_window, processing_ms; 422 when no part has
    pixel data. ``GET /health`` answers 200. Threaded, as the peer's FastAPI
    server runs its endpoints in a thread pool: the router's 2 workers call it
    at once.
    """
    import numpy as np
    from pydicom import dcmread
    from pydicom.dataset import Dataset

    from inference import Classifier, ModelArtifact, set_cpu_threads

    if threads:
        set_cpu_threads(threads)
    artifact = ModelArtifact.load(model)
    # As the node loads it (traced, the file's weights let go), on the CPU.
    classifier = Classifier(artifact, "cpu", trace=True)
    artifact.release_weights()

    def window(ds: Dataset) -> list[float]:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                return [first_value(center), first_value(width)]
        pixels = ds.pixel_array
        low, high = float(pixels.min()), float(pixels.max())
        return [(low + high) / 2, max(high - low, 1.0)]

    def infer(datasets: Sequence[Dataset]) -> dict[str, Any]:
        started = time.perf_counter()
        prediction = classifier.predict(datasets, explain_top_k=1)
        label = prediction.labels[0]
        lines = [
            [label.label.concept.meaning, "present" if label.positive else "absent"],
            ["Probability", f"{label.probability:.3f}"],
        ]
        overlays: list[dict[str, Any]] = []
        key: str | None = None
        shown = datasets[0]
        if label.positive and prediction.explanations:
            explanation = prediction.explanations[0]
            heatmap = explanation.heatmap
            row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            area = float((heatmap >= 0.5 * float(heatmap.max())).sum())
            key = explanation.source.sop_instance_uid
            shown = next(d for d in datasets if str(d.SOPInstanceUID) == key)
            overlays.append(
                {
                    "cx": float(column),
                    "cy": float(row),
                    "r": max(8.0, float(np.sqrt(area / np.pi))),
                    "label": label.label.concept.meaning[:16],
                }
            )
        return {
            "model": prediction.model_name,
            "model_version": prediction.model_version,
            "study_instance_uid": str(datasets[0].StudyInstanceUID),
            "n_images": len(datasets),
            "result": "POSITIVE" if label.positive else "NEGATIVE",
            "summary_lines": lines,
            "key_sop_instance_uid": key,
            "overlays": overlays,
            "display_window": window(shown),
            "processing_ms": round((time.perf_counter() - started) * 1000, 1),
        }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # no line per request

        def answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self.answer(200, {"ok": True, "models": {artifact.name: "1"}})
            else:
                self.answer(404, {"detail": "not found"})

        def do_POST(self) -> None:
            if not self.path.startswith("/infer/"):
                self.answer(404, {"detail": "not found"})
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                parts = multipart_files(self.headers.get("Content-Type", ""), body)
                datasets = [dcmread(io.BytesIO(p)) for p in parts]
            except Exception as exc:  # noqa: BLE001 - a bad request, whatever the cause
                self.answer(400, {"detail": f"{type(exc).__name__}: {exc}"})
                return
            datasets = [d for d in datasets if "PixelData" in d]
            if not datasets:
                self.answer(422, {"detail": "no images with pixel data"})
                return
            try:
                self.answer(200, infer(datasets))
            except Exception as exc:  # noqa: BLE001 - a 500 the router retries
                self.answer(500, {"detail": f"{type(exc).__name__}: {exc}"})

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    signal.signal(
        signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start()
    )
    server.serve_forever()


def first_value(value: Any) -> float:
    """A DS value as a float; the first of several."""
    return float(value[0] if isinstance(value, list | tuple) else value)


def multipart_files(content_type: str, body: bytes) -> list[bytes]:
    """The contents of the parts named ``files`` of a multipart/form-data body."""
    boundary = ""
    for item in content_type.split(";")[1:]:
        key, _, value = item.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not content_type.lower().startswith("multipart/form-data") or not boundary:
        raise ValueError("expected multipart/form-data with a boundary")
    found = []
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        head, _, content = part.partition(b"\r\n\r\n")
        if b'name="files"' in head:
            found.append(content.removesuffix(b"\r\n"))
    return found


# --- Workload ---------------------------------------------------------------------


def template() -> Any:
    """A 512x512 16-bit MONOCHROME2 DX CHEST data set, uncompressed: the header of
    a sample in sample_dicoms/dx, its 256x256 12-bit image doubled in size and
    scaled to 16 bits."""
    import numpy as np
    from pydicom import dcmread

    ds = dcmread(next((REPO / "sample_dicoms" / "dx" / "dicom").rglob("*.dcm")))
    pixels = ds.pixel_array.astype(np.uint32)
    shift = 16 - int(ds.BitsStored)
    pixels = np.repeat(
        np.repeat(pixels, 512 // pixels.shape[0], 0), 512 // pixels.shape[1], 1
    )
    ds.set_pixel_data((pixels << shift).astype(np.uint16), "MONOCHROME2", 16)
    for key in ("WindowCenter", "WindowWidth"):
        if key in ds:
            value = ds[key].value
            scaled = (
                [float(v) * 2**shift for v in value]
                if ds[key].VM > 1
                else float(value) * 2**shift
            )
            ds[key].value = scaled
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PatientName = "BENCH^DX"
    ds.PatientID = "BENCH-DX"
    assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (512, 512, 16)
    return ds


def write_studies(source: Any, folder: Path, n: int) -> list[str]:
    """Write n one-image studies into folder (new UIDs each); return their UIDs."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    uids = []
    for i in range(n):
        ds = source.copy()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"B{i:05d}"
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
        uids.append(str(ds.StudyInstanceUID))
    return uids


def send(folder: Path, port: int, called: str) -> float:
    """Send a folder with dcmtk's storescu over one association; return when its
    last instance was acknowledged (storescu's end), wall-clock seconds."""
    e2e.send(folder, port, CALLING_AE, called)
    return time.time()


# --- The PACS stand-in ------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    sop_class: str
    at: float  # the file's mtime, wall-clock seconds


class Pacs:
    """dcmtk's storescp in its own process; arrival time = the file's mtime."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self._read: dict[str, tuple[str, str]] = {}  # file -> (study, SOP class)
        folder.mkdir()
        self.process = subprocess.Popen(
            [
                str(DCMTK / "storescp"),
                "-aet",
                PACS_AE,
                "-od",
                str(folder),
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},  # as a tuned PACS would be
        )
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if time.monotonic() > deadline:
                raise SystemExit("storescp did not start")
            time.sleep(0.05)

    def count(self) -> int:
        """How many files there are (received or being written)."""
        with os.scandir(self.folder) as entries:
            return sum(1 for _ in entries)

    def arrivals(self) -> dict[str, list[Arrival]]:
        """Study UID -> its objects received so far (each file read once)."""
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        found: dict[str, list[Arrival]] = {}
        for path in self.folder.iterdir():
            if path.name not in self._read:
                try:
                    ds = dcmread(path, stop_before_pixels=True)
                    self._read[path.name] = (
                        str(ds.StudyInstanceUID),
                        str(ds.SOPClassUID),
                    )
                except (InvalidDicomError, EOFError, OSError, AttributeError):
                    continue  # storescp is still writing it: next time
            study, sop_class = self._read[path.name]
            try:
                at = path.stat().st_mtime
            except OSError:
                continue
            found.setdefault(study, []).append(Arrival(sop_class, at))
        return found

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def complete(arrived: list[Arrival], expected: frozenset[str]) -> bool:
    return expected <= {a.sop_class for a in arrived}


# --- The products' processes: memory and CPU from /proc ---------------------------


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return found


def usage(pid: int) -> tuple[float, int] | None:
    """(user + system CPU seconds, RSS bytes) of a process; None once it ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return (int(stat[11]) + int(stat[12])) / TICK, resident * PAGE


class Monitor:
    """Samples the processes under some roots every 50 ms: the peak of their summed
    RSS (and of each root's own tree), and the CPU of every process seen (also of
    those that ended since)."""

    def __init__(self) -> None:
        self.roots: dict[int, str] = {}  # pid -> what it is
        self.peak_rss = 0
        self.peak_by_root: dict[str, int] = {}
        self._cpu: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def add(self, pid: int, name: str) -> None:
        """Watch this process and its children from now on."""
        with self._lock:
            self.roots[pid] = name
        self.sample()

    def sample(self) -> None:
        with self._lock:
            total = 0
            for root, name in self.roots.items():
                rss = 0
                for pid in descendants(root):
                    seen = usage(pid)
                    if seen is not None:
                        self._cpu[pid] = seen[0]
                        rss += seen[1]
                total += rss
                self.peak_by_root[name] = max(self.peak_by_root.get(name, 0), rss)
            self.peak_rss = max(self.peak_rss, total)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_PERIOD):
            self.sample()

    def cpu(self) -> dict[int, float]:
        """CPU seconds of every process seen so far (read now)."""
        self.sample()
        with self._lock:
            return dict(self._cpu)

    def cpu_since(self, mark: dict[int, float]) -> float:
        return sum(seconds - mark.get(pid, 0.0) for pid, seconds in self.cpu().items())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- The products -----------------------------------------------------------------


@dataclass
class Product:
    name: str
    called_ae: str
    # (work folder, model, PACS, monitor) -> the port, once it accepts studies;
    # its processes are handed to the monitor as they start.
    start: Callable[[Path, Path, Pacs, Monitor], contextlib.AbstractContextManager[int]]
    result_kinds: frozenset[str] = field(default_factory=frozenset)


def wait_for(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    logs: list[Path],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(
                    f"{what}: a process ended (exit {p.returncode})\n"
                    + "\n".join(tail(log_) for log_ in logs)
                )
        if time.monotonic() > deadline:
            raise SystemExit(
                f"{what}: not within {timeout:.0f} s\n"
                + "\n".join(tail(p) for p in logs)
            )
        time.sleep(0.1)


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def node(work: Path, model: Path, pacs: Pacs, monitor: Monitor) -> Iterator[int]:
    """`dicom-node serve` with example.toml's settings but port, state_dir,
    stable_after, the model, the caller and the destination."""
    port = free_port()
    config = work / "node.toml"
    config.write_text(
        f"""\
[node]
ae_title = "{NODE_AE}"
host = "127.0.0.1"
port = {port}
state_dir = "{work / "state"}"
model_cache = "{model.parent / "node-compiled"}"
stable_after = {STABLE_AFTER}
log_level = "INFO"

[[callers]]
ae_title = "{CALLING_AE}"
host = "127.0.0.1"

[[destinations]]
name = "pacs"
ae_title = "{PACS_AE}"
host = "127.0.0.1"
port = {pacs.port}

[http]
host = "127.0.0.1"
port = {free_port()}
show_patient = false
min_free_bytes = 1073741824

[retention]
studies_days = 30
results_days = 90
audit_days = 365

[[models]]
path = "{model}"
"""
    )
    logfile = work / "node.log"
    with logfile.open("wb") as out:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dicom-node"),
                "serve",
                "--config",
                str(config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    monitor.add(process.pid, "serve")
    try:
        wait_for(
            lambda: "listening as" in tail(logfile, 100_000),
            120,
            "dicom-node serve",
            [logfile],
            [process],
        )
        yield port
    finally:
        stop_process(process)


@contextlib.contextmanager
def peer(
    python: Path,
    threads: int,
    work: Path,
    model: Path,
    pacs: Pacs,
    monitor: Monitor,
) -> Iterator[int]:
    """dicom-ai-router `serve` (its defaults but ports, workdir, the 2 s quiet
    timer and one rule) and the model server behind its HTTP contract."""
    port, model_port = free_port(), free_port()
    config = work / "router.yaml"
    # JSON is YAML; the keys are those of the peer's config.py and router.yaml.
    config.write_text(
        json.dumps(
            {
                "router": {
                    "ae_title": PEER_AE,
                    "port": port,
                    "study_quiet_seconds": STABLE_AFTER,
                    "workers": 2,  # its default
                    "workdir": str(work / "data"),
                    "bind_address": "127.0.0.1",
                    "allowed_calling_aes": [],
                },
                "pacs": {
                    "ae_title": PACS_AE,
                    "host": "127.0.0.1",
                    "port": pacs.port,
                    "retries": 3,
                },
                "ai_endpoints": {
                    "chest-dx": {
                        "url": f"http://127.0.0.1:{model_port}/infer/chest-dx",
                        "timeout_s": 30,
                        "retries": 3,
                    }
                },
                "rules": [
                    {
                        "name": "dx-chest",
                        "match": {
                            "Modality": "^DX$",
                            "BodyPartExamined": "^(CHEST|THORAX|LUNG)$",
                        },
                        "model": "chest-dx",
                    }
                ],
                "deid": {"salt": "", "reject_burned_in_annotation": True},
            },
            indent=2,
        )
    )
    server_log, router_log = work / "model-server.log", work / "router.log"
    with server_log.open("wb") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--serve-model",
                str(model),
                "--port",
                str(model_port),
                "--threads",
                str(threads),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    monitor.add(server.pid, "model server")
    router: subprocess.Popen[bytes] | None = None
    try:
        wait_for(
            lambda: http_ok(model_port), 120, "the model server", [server_log], [server]
        )
        with router_log.open("wb") as out:
            router = subprocess.Popen(
                [str(python), "-c", PEER_LAUNCHER, "serve", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                # The salt is read from the environment (the peer refuses to run
                # without one).
                env={**os.environ, "AIROUTER_DEID_SALT": secrets.token_hex(32)},
                cwd=work,
            )
        monitor.add(router.pid, "router")
        wait_for(
            lambda: "AI router listening" in tail(router_log, 100_000),
            60,
            "dicom-ai-router serve",
            [router_log, server_log],
            [router, server],
        )
        yield port
    finally:
        if router is not None:
            stop_process(router, signal.SIGINT)  # its clean stop (KeyboardInterrupt)
        stop_process(server)


def http_ok(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return int(r.status) == 200
    except OSError:
        return False


def peer_python(args: argparse.Namespace) -> Path:
    """The peer's virtual environment's python: made and installed once, reused."""
    folder: Path = args.peer_venv
    python = folder / "bin" / "python"
    check = (
        "import importlib.metadata as m, airouter; print(m.version('dicom-ai-router'))"
    )
    if python.exists():
        found = subprocess.run(
            [str(python), "-c", check], capture_output=True, text=True, check=False
        )
        if found.returncode == 0 and found.stdout.strip() == PEER_VERSION:
            return python
    log(f"installing {PEER} {PEER_VERSION} into {folder}")
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    what = str(args.peer_wheel) if args.peer_wheel else f"{PEER}=={PEER_VERSION}"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--quiet", what], check=True
    )
    found = subprocess.run(
        [str(python), "-c", check], capture_output=True, text=True, check=True
    )
    if found.stdout.strip() != PEER_VERSION:
        raise SystemExit(
            f"{what}: installed {found.stdout.strip()}, expected {PEER_VERSION}"
        )
    return python


# --- One run ----------------------------------------------------------------------


@dataclass
class Figures:
    single: float  # s beyond the timer, median of the singles
    burst: float  # s from the last study quiet to all results
    peak_rss: int  # bytes
    peak_by_process: dict[str, int]  # the peak of each of its processes, bytes
    cpu_per_study: float  # s
    singles: list[float]
    # The peer's model calls that failed and were retried (its 30 s HTTP
    # timeout): a stall of the bench's model server, not the peer's own time.
    retried_calls: int = 0


def wait_complete(
    pacs: Pacs, uids: list[str], expected: frozenset[str], timeout: float, poll: float
) -> dict[str, list[Arrival]]:
    deadline = time.monotonic() + timeout
    while True:
        arrived = pacs.arrivals()
        if all(complete(arrived.get(u, []), expected) for u in uids):
            return arrived
        if time.monotonic() > deadline:
            done = sum(complete(arrived.get(u, []), expected) for u in uids)
            raise SystemExit(
                f"{done} of {len(uids)} studies got all their results "
                f"in {timeout:.0f} s"
            )
        time.sleep(poll)


def run_once(
    product: Product,
    source: Any,
    model: Path,
    studies: int,
    singles: int,
    keep: bool = False,
) -> Figures:
    with contextlib.ExitStack() as stack:
        if keep:
            work = Path(tempfile.mkdtemp(prefix=f"peers-{product.name}-"))
            log(f"  kept in {work}")
        else:
            work = Path(
                stack.enter_context(
                    tempfile.TemporaryDirectory(prefix=f"peers-{product.name}-")
                )
            )
        warm = write_studies(source, work / "warm", 1)
        single_uids = [
            write_studies(source, work / f"single-{i}", 1)[0] for i in range(singles)
        ]
        burst_uids = write_studies(source, work / "burst", studies)
        pacs = Pacs(work / "pacs")
        stack.callback(pacs.stop)
        monitor = Monitor()
        stack.callback(monitor.stop)
        with product.start(work, model, pacs, monitor) as port:
            figures = measure(
                product, pacs, port, monitor, work, warm, single_uids, burst_uids
            )
        router_log = work / "router.log"
        if router_log.exists():
            figures.retried_calls = tail(router_log, 10**8).count("AI call failed")
        return figures
    raise AssertionError("unreachable")


def measure(
    product: Product,
    pacs: Pacs,
    port: int,
    monitor: Monitor,
    work: Path,
    warm: list[str],
    single_uids: list[str],
    burst_uids: list[str],
) -> Figures:
    # Warm-up (not counted): the first result, then until nothing more comes
    # for 3 s; what came is what this product sends per study.
    send(work / "warm", port, product.called_ae)
    deadline = time.monotonic() + 180
    while not pacs.arrivals().get(warm[0]):
        if time.monotonic() > deadline:
            raise SystemExit(
                f"{product.name}: the warm-up study got no result in 180 s"
            )
        time.sleep(0.1)
    count, quiet_since = pacs.count(), time.monotonic()
    while time.monotonic() - quiet_since < 3:
        time.sleep(0.1)
        if pacs.count() != count:
            count, quiet_since = pacs.count(), time.monotonic()
    kinds = frozenset(a.sop_class for a in pacs.arrivals()[warm[0]])
    if product.result_kinds and kinds != product.result_kinds:
        raise SystemExit(
            f"{product.name}: sent {sorted(kinds)}, "
            f"before {sorted(product.result_kinds)}"
        )
    product.result_kinds = kinds
    # One at a time, each once the previous one's results arrived.
    latencies = []
    for i, uid in enumerate(single_uids):
        acknowledged = send(work / f"single-{i}", port, product.called_ae)
        arrived = wait_complete(pacs, [uid], kinds, 60, 0.02)[uid]
        latencies.append(min(a.at for a in arrived) - acknowledged - STABLE_AFTER)
    # The burst: every study over one association.
    expected = pacs.count() + len(burst_uids) * len(kinds)
    mark = monitor.cpu()
    acknowledged = send(work / "burst", port, product.called_ae)
    deadline = time.monotonic() + 900
    # Only count files while the product works (reading them takes CPU).
    while pacs.count() < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    cpu = monitor.cpu_since(mark)
    arrived_all = wait_complete(pacs, burst_uids, kinds, 30, 0.2)
    last = max(a.at for u in burst_uids for a in arrived_all[u])
    return Figures(
        single=statistics.median(latencies),
        burst=last - (acknowledged + STABLE_AFTER),
        peak_rss=monitor.peak_rss,
        peak_by_process=dict(monitor.peak_by_root),
        cpu_per_study=cpu / len(burst_uids),
        singles=latencies,
    )


# --- Report -----------------------------------------------------------------------


def node_version() -> str:
    """The checkout measured: its commit, and whether files differ from it."""
    found = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() or "(not a git checkout)"


def kinds_text(kinds: frozenset[str]) -> str:
    return " + ".join(sorted(SOP_NAMES.get(k, k) for k in kinds))


def report(
    args: argparse.Namespace,
    products: list[Product],
    results: dict[str, list[Figures]],
) -> None:
    node_, peer_ = (results[p.name] for p in products)

    def med(figures: list[Figures], key: Callable[[Figures], float]) -> float:
        return statistics.median(key(f) for f in figures)

    rows: list[
        tuple[str, Callable[[Figures], float], float, Callable[[float], str]]
    ] = [
        (
            "one study alone: acknowledged -> first result, beyond 2 s",
            lambda f: f.single,
            0.5,
            lambda v: f"{v:.2f} s",
        ),
        (
            "burst: last study quiet -> every result at the PACS",
            lambda f: f.burst,
            0.5,
            lambda v: f"{v:.2f} s",
        ),
        (
            "peak memory (all processes, RSS)",
            lambda f: f.peak_rss / 2**20,
            1.0,
            lambda v: f"{v:.0f} MiB",
        ),
        (
            "CPU per study in the burst",
            lambda f: f.cpu_per_study * 1000,
            0.7,
            lambda v: f"{v:.0f} ms",
        ),
    ]
    print(
        f"dicom-node vs {PEER} {PEER_VERSION} on {os.cpu_count()} CPU(s): "
        f"{args.studies} one-image DX studies (512x512, 16-bit, CHEST) over one "
        f"association, resnet18 at 224 px with Grad-CAM, {STABLE_AFTER:.0f} s quiet "
        f"timer, dcmtk storescp as the PACS; medians of {args.runs} alternating "
        f"runs after a warm-up round; {args.singles} singles per run; dicom-node "
        f"{node_version()}; ratio = dicom-node / peer (of the medians)"
    )
    print(f"{'figure':58s} {'dicom-node':>11s} {'peer':>11s} {'ratio':>6s}  goal")
    for name, key, goal, text in rows:
        a, b = med(node_, key), med(peer_, key)
        ratio = a / b if b > 0 else float("inf")
        verdict = "met" if ratio <= goal else "NOT met"
        print(
            f"{name:58s} {text(a):>11s} {text(b):>11s} {ratio:6.2f}  "
            f"<= {goal} ({verdict})"
        )
    for product in products:
        print(f"results per study, {product.name}: {kinds_text(product.result_kinds)}")
    print(
        "model work: the same file, traced, predict + Grad-CAM of the top image in "
        "both (the peer's model server turns the Grad-CAM peak into its key image's "
        "circle); the peer runs with DX/CR added to the image classes it passes to "
        "models"
    )
    from dicom_node.worker import scoring_threads

    threads = (
        f"{args.server_threads} torch thread(s)"
        if args.server_threads
        else "torch's default threads"
    )
    print(
        f"torch threads: the node's torch_threads = 0 gives {scoring_threads(0, 2)} "
        f"per forward pass here (2 workers); the peer's model server: {threads} "
        "per forward pass"
    )
    for product in products:
        for i, f in enumerate(results[product.name], 1):
            singles = ", ".join(f"{s:.2f}" for s in f.singles)
            parts = ", ".join(
                f"{name} {rss / 2**20:.0f}" for name, rss in f.peak_by_process.items()
            )
            print(
                f"  run {i} {product.name:16s} single {f.single:.2f} s ({singles}), "
                f"burst {f.burst:.2f} s, peak {f.peak_rss / 2**20:.0f} MiB "
                f"({parts}), CPU {1000 * f.cpu_per_study:.0f} ms/study"
                + (
                    f"; {f.retried_calls} model call(s) timed out and were retried "
                    "(the bench's model server stalled): not the peer's own burst"
                    if f.retried_calls
                    else ""
                )
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--studies", type=int, default=40, help="studies in the burst (default 40)"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="measured runs of each product (default 3)"
    )
    parser.add_argument(
        "--singles",
        type=int,
        default=5,
        help="studies sent one at a time per run (default 5)",
    )
    parser.add_argument(
        "--peer-wheel",
        type=Path,
        help=f"install {PEER} from this wheel instead of the package registry "
        "(when the virtual environment lacks it)",
    )
    parser.add_argument(
        "--peer-venv",
        type=Path,
        default=CACHE / "peer-venv",
        help="the peer's virtual environment (default %(default)s; made when missing)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep each run's folder (configurations, logs, the PACS's files)",
    )
    parser.add_argument("--serve-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--server-threads",
        type=int,
        default=-1,
        metavar="N",
        help="torch threads per forward pass in the peer's model server (0: "
        "torch's default, all cores; default: what the node's torch_threads = 0 "
        "gives its 2 workers here, as the router's 2 workers call it at once)",
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_model is not None:
        serve_model(args.serve_model, args.port, args.threads)
        return 0
    if min(args.studies, args.runs, args.singles) < 1:
        parser.error("--studies, --runs and --singles must be at least 1")

    from dicom_node.worker import scoring_threads

    threads = args.server_threads
    if threads < 0:
        threads = scoring_threads(0, 2)
    args.server_threads = threads
    python = peer_python(args)
    products = [
        Product("dicom-node", NODE_AE, node),
        Product(
            f"{PEER}",
            PEER_AE,
            lambda work, model, pacs, monitor: peer(
                python, threads, work, model, pacs, monitor
            ),
        ),
    ]
    source = template()
    results: dict[str, list[Figures]] = {p.name: [] for p in products}
    with tempfile.TemporaryDirectory(prefix="peers-model-") as tmp:
        model = e2e.model_file(Path(tmp))
        log("warm-up round (not counted)")
        for product in products:
            run_once(product, source, model, min(args.studies, 8), 1, args.keep)
        for run in range(1, args.runs + 1):
            for product in products:
                log(f"run {run} of {args.runs}: {product.name}")
                figures = run_once(
                    product, source, model, args.studies, args.singles, args.keep
                )
                log(
                    f"  single {figures.single:.2f} s, burst {figures.burst:.2f} s, "
                    f"peak {figures.peak_rss / 2**20:.0f} MiB, "
                    f"CPU {1000 * figures.cpu_per_study:.0f} ms/study"
                    + (
                        f"; {figures.retried_calls} model call(s) timed out and "
                        "were retried: this run's burst is not the peer's own time"
                        if figures.retried_calls
                        else ""
                    )
                )
                results[product.name].append(figures)
    report(args, products, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
