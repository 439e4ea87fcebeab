"""Hostile-peer benchmark: the node beside dcmtk's storescp under abuse and load.

Each case starts a fresh receiver: ``dicom-node serve`` (default settings; callers
STORESCU and ECHOSCU bound to 127.0.0.1; workers = 0, no model) and dcmtk's
``storescp -od DIR`` (default options), and measures, in the same run:

  claim   RSS growth of the receiving process while 4 raw TCP connections each
          send an A-ASSOCIATE-RQ header claiming 0xFFFFFFF0 bytes and then junk as
          fast as the peer reads it, for --claim-seconds or until the peer closes;
          when and whether the peer closed.
  big     RSS growth while an allowed caller sends one --big-gib GiB uncompressed
          CT instance with dcmtk ``storescu`` (which streams it from disk); the
          C-STORE status and time. storescp runs with ``+B`` here (bit-preserving:
          it writes the data set to disk as it arrives, the way the node does).
  idle    C-ECHO latency (dcmtk ``echoscu``, tried every 1.5 s for
          --flood-seconds) while 40 TCP connections are held open sending nothing.
  loris   the same while 40 connections each send a valid A-ASSOCIATE-RQ one
          byte every 2 s.
  ingest  instances/s of --instances 512x512 16-bit CT instances (0.5 MB each)
          sent with ``storescu`` over one association to storescp, to the node as
          it was at --before (a git worktree of that revision, run with this
          Python and the same configuration) and to the node now (medians of
          --ingest-repeat interleaved runs); the node now / node before ratio, and
          the node/storescp ratio for information.

RSS is VmRSS of the server process from /proc, sampled every 50 ms; growth is the
peak less the value when the case began. A server whose RSS passes --guard-gb is
killed (this machine must survive a receiver that buffers what it is sent). The
abusive connections come from --attacker-host (another loopback address, so the
allowed caller at 127.0.0.1 is a different host, as it would be in practice).

Targets: claim growth < 64 MB; 1 GiB instance growth < 256 MB; C-ECHO served in
< 2 s (no failure) in both floods; ingest node now / node before >= 0.90 (10 % for
this VM's drift).

    python bench/hostile.py [--cases claim,big,idle,loris,ingest] [--node-only]
                            [--instances 300] [--big-gib 1.0] [--before REV]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.factories import dcmtk, make_ct, storescu_folder, write_study  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
NODE_AE = "DICOMNODE"
STORESCP_AE = "STORESCP"
SERVERS = ("node", "storescp")
CASES = ("claim", "big", "idle", "loris", "ingest")
MB = 1e6
FLOOD_CONNECTIONS = 40
CLAIM_CONNECTIONS = 4
ECHO_EVERY = 1.5  # seconds between the starts of two C-ECHO tries
ECHO_TIMEOUT = 5  # dcmtk's connect, ACSE and DIMSE timeouts of one try, seconds
LORIS_STEP = 2.0  # seconds between two bytes of a slow-loris connection
# The last commit before the connection gate, the per-PDU limits and the spool:
# the ingest case measures the node at this revision beside the node now.
BEFORE = "eacf46b"
INGEST_FLOOR = 0.90  # node now / node before; 10 % for this VM's drift
NODE_KINDS = ("node", "before")  # servers that run dicom-node
LABELS = {"node": "node now", "before": "node before", "storescp": "storescp"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_command() -> list[str]:
    beside = Path(sys.executable).parent / "dicom-node"
    return [str(beside if beside.is_file() else REPO / ".venv" / "bin" / "dicom-node")]


@contextlib.contextmanager
def worktree(rev: str, path: Path) -> Iterator[Path]:
    """Check ``rev`` out, detached, in a git worktree at ``path``; yield it, remove
    it (also when interrupted)."""
    added = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev],
        check=False,
        capture_output=True,
        text=True,
    )
    if added.returncode != 0:
        raise SystemExit(f"--before {rev}: {added.stderr.strip()}")
    try:
        yield path
    finally:
        removed = subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
            check=False,
            capture_output=True,
        )
        if removed.returncode != 0:  # e.g. its folder already gone
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "prune"],
                check=False,
                capture_output=True,
            )


def before_command(tree: Path) -> list[str]:
    """Run the node checked out in ``tree`` with this Python (``-m`` puts the working
    directory, ``tree``, first on sys.path); check that it imports from there."""
    found = subprocess.run(
        [sys.executable, "-c", "import dicom_node; print(dicom_node.__file__)"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"dicom_node imported from {found}, not from {tree}")
    return [sys.executable, "-m", "dicom_node"]


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a live process in bytes; None when it is gone or a zombie."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


# --- servers -----------------------------------------------------------------


class ServerDownError(Exception):
    """The server did not start, or is gone."""


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    called: str
    out: Path  # where received instances land
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None and rss_bytes(self.proc.pid) is not None

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return " | ".join(text[-lines:])

    def stored(self) -> int:
        if self.name in NODE_KINDS:
            return sum(1 for _ in self.out.rglob("*.dcm"))
        return sum(1 for p in self.out.rglob("*") if p.is_file() and p.suffix != ".tmp")


def echo_once(port: int, called: str) -> tuple[bool, float]:
    """One C-ECHO with dcmtk's echoscu; (served, seconds)."""
    started = time.perf_counter()
    try:
        result = subprocess.run(
            [
                dcmtk("echoscu"),
                *("-aet", "STORESCU", "-aec", called),
                *("-to", str(ECHO_TIMEOUT), "-ta", str(ECHO_TIMEOUT)),
                *("-td", str(ECHO_TIMEOUT)),
                "127.0.0.1",
                str(port),
            ],
            capture_output=True,
            env=ENV,
            timeout=3 * ECHO_TIMEOUT,
            check=False,
        )
        ok = result.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    return ok, time.perf_counter() - started


def wait_ready(server: Server, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerDownError(f"exited with {server.proc.returncode}")
        if echo_once(server.port, server.called)[0]:
            return
        time.sleep(0.3)
    raise ServerDownError(f"no C-ECHO answer in {timeout:.0f} s")


def node_config(work: Path, port: int) -> Path:
    config = work / "node.toml"
    config.write_text(
        "[node]\n"
        f"port = {port}\n"
        f'state_dir = "{work / "state"}"\n'
        "workers = 0\n"
        "[[callers]]\n"
        'ae_title = "STORESCU"\n'
        'host = "127.0.0.1"\n'
        "[[callers]]\n"
        'ae_title = "ECHOSCU"\n'
        'host = "127.0.0.1"\n'
    )
    return config


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a server we started and anything in its process group."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


@contextlib.contextmanager
def serving(
    name: str,
    work: Path,
    node: Sequence[str],
    bit_preserving: bool = False,
    cwd: Path | None = None,
) -> Iterator[Server]:
    """Start the node (``node`` runs dicom-node, in ``cwd``) or storescp in ``work``
    (its own session), yield it, end it."""
    work.mkdir(parents=True)
    port = free_port()
    log = work / "server.log"
    if name in NODE_KINDS:
        command = [*node, "serve", "--config", str(node_config(work, port))]
        called, out = NODE_AE, work / "state" / "storage"
    else:
        out = work / "received"
        out.mkdir()
        command = [dcmtk("storescp"), "--aetitle", STORESCP_AE, "-od", str(out)]
        if bit_preserving:
            command.append("+B")
        command.append(str(port))
        called = STORESCP_AE
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=ENV,
            cwd=cwd,
            start_new_session=True,
        )
    server = Server(name, proc, port, called, out, log)
    try:
        try:
            wait_ready(server)
        except ServerDownError as e:
            raise ServerDownError(f"{e}; log: {server.log_tail()[-300:]}") from e
        yield server
    finally:
        stop(proc)


# --- memory ------------------------------------------------------------------


class RssMonitor:
    """Samples a process's VmRSS every 50 ms; kills it above ``guard`` bytes."""

    def __init__(self, pid: int, guard: float, interval: float = 0.05) -> None:
        self.pid = pid
        self.guard = guard
        self.interval = interval
        first = rss_bytes(pid)
        if first is None:
            raise ServerDownError("gone before the case began")
        self.baseline = self.peak = first
        self.started = time.monotonic()
        self.died_at: float | None = None  # seconds into the case
        self.killed_at: float | None = None  # by the guard
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = rss_bytes(self.pid)
            if value is None:
                self.died_at = time.monotonic() - self.started
                return
            self.peak = max(self.peak, value)
            if value > self.guard:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.killed_at = time.monotonic() - self.started
                return

    @property
    def ended(self) -> bool:
        return self.died_at is not None or self.killed_at is not None

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / MB

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def describe(self, name: str) -> str:
        """Growth and peak, or how the process ended."""
        text = f"+{self.growth_mb:.0f} MB (peak {self.peak / MB:.0f} MB)"
        if self.killed_at is not None:
            return f"killed: RSS > {self.guard / 1e9:.1f} GB at {self.killed_at:.1f} s"
        if self.died_at is not None:
            return f"{name} died at {self.died_at:.1f} s, {text}"
        return text


# --- results -----------------------------------------------------------------


@dataclass
class Outcome:
    text: str
    value: float | None = None  # the figure the target is judged on
    ok: bool | None = None


@dataclass
class Row:
    label: str
    target: str
    cells: dict[str, Outcome] = field(default_factory=dict)


def down(name: str, why: str) -> Outcome:
    return Outcome(f"{name} down: {why}"[:60], None, False)


# --- case 1: a 4 GiB association claim ----------------------------------------


def open_from(host: str, port: int, timeout: float = 5.0) -> socket.socket | None:
    sock = socket.socket()
    try:
        sock.bind((host, 0))
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def claim(server: Server, args: argparse.Namespace) -> dict[str, Outcome]:
    header = struct.pack(">BBI", 0x01, 0x00, 0xFFFFFFF0)
    junk = np.random.default_rng(0).bytes(256 * 1024)
    closed: dict[int, float] = {}
    sent = 0
    socks: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    with RssMonitor(server.proc.pid, args.guard_gb * 1e9) as monitor:
        try:
            for i in range(CLAIM_CONNECTIONS):
                sock = open_from(args.attacker_host, server.port)
                if sock is None:
                    closed[i] = time.monotonic() - monitor.started
                    continue
                try:
                    sock.sendall(header)
                except OSError:
                    closed[i] = time.monotonic() - monitor.started
                    sock.close()
                    continue
                sock.setblocking(False)
                socks.append(sock)
                selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
            deadline = monitor.started + args.claim_seconds
            while (
                selector.get_map() and time.monotonic() < deadline and not monitor.ended
            ):
                for key, events in selector.select(0.05):
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    gone = False
                    try:
                        if events & selectors.EVENT_READ and not conn.recv(65536):
                            gone = True  # the peer closed (after a reply or not)
                        elif events & selectors.EVENT_WRITE:
                            sent += conn.send(junk)
                    except BlockingIOError:
                        pass
                    except OSError:
                        gone = True
                    if gone:
                        closed[key.data] = time.monotonic() - monitor.started
                        selector.unregister(conn)
        finally:
            selector.close()
            for sock in socks:
                sock.close()
        time.sleep(0.3)  # the server frees what it held once the sockets are gone
    memory = monitor.describe(server.name)
    value = None if monitor.died_at is not None else monitor.growth_mb
    if monitor.killed_at is not None:
        value = (monitor.guard - monitor.baseline) / MB
    growth = Outcome(memory, value, value is not None and value < 64)
    if closed:
        last = max(closed.values())
        text = f"{len(closed)}/{CLAIM_CONNECTIONS} by {last:.2f} s"
    else:
        text = f"0/{CLAIM_CONNECTIONS} in {args.claim_seconds:.0f} s"
    peer = Outcome(f"{text}, {sent / 1e9:.2f} GB read")
    return {"claim-rss": growth, "claim-closed": peer}


# --- case 2: one big instance -------------------------------------------------


def make_big(path: Path, gib: float) -> Path:
    """Write an uncompressed 16-bit CT of ``gib`` GiB of pixels, streamed to disk:
    the header by pydicom, then a raw (7FE0,0010) OW element of defined length."""
    columns = 16384
    rows_total = max(1, int(gib * 2**30) // (2 * columns))
    frames = -(-rows_total // 32768)
    rows = rows_total // frames
    length = rows * columns * 2 * frames
    ds = make_ct(rows=1, columns=1, seed=0)
    del ds.PixelData
    ds.Rows = rows
    ds.Columns = columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.save_as(path, enforce_file_format=True)
    chunk = np.random.default_rng(1).integers(
        -1024, 2000, size=8 * 2**20, dtype=np.int16
    )
    raw = chunk.tobytes()
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        left = length
        while left:
            n = min(left, len(raw))
            f.write(raw[:n])
            left -= n
    check = dcmread(path, stop_before_pixels=True)
    if (check.Rows, check.Columns) != (rows, columns):
        raise RuntimeError(f"{path} does not read back")
    return path


def big(server: Server, args: argparse.Namespace, source: Path) -> dict[str, Outcome]:
    with RssMonitor(server.proc.pid, args.guard_gb * 1e9) as monitor:
        started = time.perf_counter()
        try:
            result = subprocess.run(
                [
                    dcmtk("storescu"),
                    *("-v", "-aec", server.called, "127.0.0.1", str(server.port)),
                    str(source),
                ],
                capture_output=True,
                text=True,
                env=ENV,
                timeout=args.big_timeout,
                check=False,
            )
            output = result.stdout + result.stderr
        except subprocess.TimeoutExpired:
            output = f"storescu timed out after {args.big_timeout:.0f} s"
        seconds = time.perf_counter() - started
        time.sleep(0.5)  # what the server does once it has answered
    found = re.findall(r"Received Store Response \(([^)]*)\)", output)
    if found:
        status = found[-1]
    else:
        lines = [x for x in output.strip().splitlines() if x.startswith(("E:", "F:"))]
        status = (lines[-1] if lines else output.strip()[-60:]).strip()
    died = monitor.ended or not server.alive()
    if died and "died" not in status:
        status = f"{server.name} died; {status}"
    memory = monitor.describe(server.name)
    value = None if monitor.died_at is not None else monitor.growth_mb
    if monitor.killed_at is not None:
        value = (monitor.guard - monitor.baseline) / MB
    gib = source.stat().st_size / 2**30
    return {
        "big-rss": Outcome(memory, value, value is not None and value < 256),
        "big-store": Outcome(f"{status[:40]}, {seconds:.1f} s ({gib:.2f} GiB)"),
    }


# --- case 3: floods while a legitimate C-ECHO is tried -----------------------


def associate_rq(called: str, calling: str) -> bytes:
    """A valid A-ASSOCIATE-RQ for Verification, Implicit VR Little Endian."""

    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value

    def uid(text: str) -> bytes:
        return text.encode("ascii")

    context = item(
        0x20,
        bytes([1, 0, 0, 0])
        + item(0x30, uid("1.2.840.10008.1.1"))
        + item(0x40, uid("1.2.840.10008.1.2")),
    )
    user = item(
        0x50,
        item(0x51, struct.pack(">I", 16384))
        + item(0x52, uid(str(PYDICOM_IMPLEMENTATION_UID))),
    )
    body = (
        struct.pack(">HH", 1, 0)
        + called.encode("ascii").ljust(16)
        + calling.encode("ascii").ljust(16)
        + bytes(32)
        + item(0x10, uid("1.2.840.10008.3.1.1.1"))
        + context
        + user
    )
    return struct.pack(">BBI", 0x01, 0x00, len(body)) + body


def peer_closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def flood(
    server: Server, args: argparse.Namespace, slow_loris: bool
) -> dict[str, Outcome]:
    prefix = "loris" if slow_loris else "idle"
    stop_sending = threading.Event()
    socks: list[socket.socket] = []
    refused = 0
    sender: threading.Thread | None = None
    tries: list[tuple[bool, float]] = []
    rq = associate_rq(server.called, "STORESCU")
    gone: set[int] = set()

    def drip() -> None:
        for offset in range(len(rq)):
            for i, sock in enumerate(socks):
                if i in gone:
                    continue
                try:
                    sock.send(rq[offset : offset + 1])
                except OSError:
                    gone.add(i)
            if stop_sending.wait(LORIS_STEP):
                return

    with RssMonitor(server.proc.pid, args.guard_gb * 1e9) as monitor:
        try:
            for _ in range(FLOOD_CONNECTIONS):
                sock = open_from(args.attacker_host, server.port, timeout=2.0)
                if sock is None:
                    refused += 1
                else:
                    socks.append(sock)
            if slow_loris:
                sender = threading.Thread(target=drip, daemon=True)
                sender.start()
            time.sleep(0.2)
            deadline = time.monotonic() + args.flood_seconds
            while time.monotonic() < deadline and not monitor.ended:
                began = time.monotonic()
                tries.append(echo_once(server.port, server.called))
                time.sleep(max(0.0, ECHO_EVERY - (time.monotonic() - began)))
            closed = refused + sum(
                1 for i, s in enumerate(socks) if i in gone or peer_closed(s)
            )
        finally:
            stop_sending.set()
            if sender is not None:
                sender.join()
            for sock in socks:
                sock.close()
    served = [seconds for ok, seconds in tries if ok]
    failed = len(tries) - len(served)
    if monitor.ended or not server.alive():
        text = f"{server.name} died; served {len(served)}/{len(tries)}"
        echo = Outcome(text, None, False)
    elif served:
        worst = max(served)
        text = (
            f"worst {worst:.2f} s, median {statistics.median(served):.2f} s, "
            f"failed {failed}/{len(tries)}"
        )
        echo = Outcome(text, worst, failed == 0 and worst < 2.0)
    else:
        slowest = max(seconds for _, seconds in tries) if tries else 0.0
        echo = Outcome(
            f"failed {failed}/{len(tries)} (within {slowest:.1f} s)", None, False
        )
    held = Outcome(f"{closed}/{FLOOD_CONNECTIONS} (+{monitor.growth_mb:.0f} MB RSS)")
    return {f"{prefix}-echo": echo, f"{prefix}-closed": held}


# --- case 4: one-association ingest -------------------------------------------


def ingest(
    server: Server, args: argparse.Namespace, folder: Path
) -> dict[str, Outcome]:
    started = time.perf_counter()
    result = storescu_folder(server.port, folder, server.called, timeout=600)
    seconds = time.perf_counter() - started
    if result.returncode != 0 or not server.alive():
        why = result.stderr.strip().splitlines()[-1:] or ["?"]
        return {"ingest": down(server.name, why[0])}
    time.sleep(0.3)
    stored = server.stored()
    rate = args.instances / seconds
    note = "" if stored == args.instances else f", stored {stored}"
    return {"ingest": Outcome(f"{rate:.0f}/s{note}", rate)}


# --- the run -----------------------------------------------------------------


def run_case(
    rows: dict[str, Row],
    name: str,
    work: Path,
    case: Callable[[Server], dict[str, Outcome]],
    keys: Sequence[str],
    node: Sequence[str],
    bit_preserving: bool = False,
    cwd: Path | None = None,
) -> None:
    """Run one case against a fresh server; a server that is down fills its cells."""
    try:
        with serving(name, work, node, bit_preserving, cwd) as server:
            try:
                outcomes = case(server)
            except ServerDownError as e:
                outcomes = {k: down(name, str(e)) for k in keys}
            if not server.alive() and not any(
                "died" in o.text for o in outcomes.values()
            ):
                for k in keys:
                    outcomes[k].text += f" ({name} died)"
            tail = server.log_tail() if not server.alive() else ""
    except ServerDownError as e:
        outcomes = {k: down(name, f"did not start: {e}") for k in keys}
        tail = str(e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key, outcome in outcomes.items():
        rows[key].cells[name] = outcome
    shown = "; ".join(o.text for o in outcomes.values())
    print(f"  {LABELS[name]:<12}{shown}", flush=True)
    if tail:
        print(f"  {'':<12}log: {tail[-300:]}", flush=True)


def table(rows: Sequence[Row], servers: Sequence[str]) -> None:
    header = ["case", *(LABELS[s] for s in servers), "target"]
    lines = [
        [r.label, *(r.cells.get(s, Outcome("-")).text for s in servers), r.target]
        for r in rows
        if r.cells
    ]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *lines]:
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--node-only",
        "--skip-dcmtk",
        dest="node_only",
        action="store_true",
        help="measure the node alone (no storescp)",
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated, from {','.join(CASES)} (default: all)",
    )
    parser.add_argument("--instances", type=int, default=300, help="ingest instances")
    parser.add_argument(
        "--ingest-repeat", type=int, default=3, help="ingest runs per server (median)"
    )
    parser.add_argument("--big-gib", type=float, default=1.0, help="big instance size")
    parser.add_argument("--big-timeout", type=float, default=240.0, help="seconds")
    parser.add_argument("--claim-seconds", type=float, default=10.0)
    parser.add_argument("--flood-seconds", type=float, default=15.0)
    parser.add_argument(
        "--guard-gb",
        type=float,
        default=3.0,
        help="kill a server whose RSS passes this many GB",
    )
    parser.add_argument(
        "--attacker-host",
        default="127.0.0.2",
        help="source address of the abusive connections",
    )
    parser.add_argument(
        "--before",
        default=BEFORE,
        metavar="REV",
        help="git revision of the node the ingest case compares with, run from a "
        'worktree (default: %(default)s; "" skips it)',
    )
    parser.add_argument(
        "--node-command",
        default=None,
        help="command line that runs dicom-node, e.g. to measure another build "
        "(default: the dicom-node beside this Python)",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    node = shlex.split(args.node_command) if args.node_command else node_command()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    servers = ("node",) if args.node_only else SERVERS
    compared = "ingest" in cases and bool(args.before)
    shown = ("node", *(("before",) if compared else ()), *servers[1:])
    # interleaved in this order, so that drift hits all alike
    ingested = [s for s in ("storescp", "before", "node") if s in shown]

    rows = {
        "claim-rss": Row("4 GiB claim: RSS growth", "< 64 MB"),
        "claim-closed": Row("4 GiB claim: peer closed", "-"),
        "big-rss": Row(f"{args.big_gib:g} GiB instance: RSS growth", "< 256 MB"),
        "big-store": Row(f"{args.big_gib:g} GiB instance: C-STORE", "-"),
        "idle-echo": Row("C-ECHO, 40 idle connections", "< 2 s, none failed"),
        "idle-closed": Row("idle connections closed by peer", "-"),
        "loris-echo": Row("C-ECHO, 40 slow-loris", "< 2 s, none failed"),
        "loris-closed": Row("slow-loris connections closed", "-"),
        "ingest": Row(f"ingest {args.instances} CT, 1 association", ""),
    }
    began = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="hostile-", dir=args.workdir))
    print(
        f"work in {base}; {os.cpu_count()} CPUs; servers: {', '.join(servers)}",
        flush=True,
    )

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # the finally blocks below clean up

    signal.signal(signal.SIGTERM, terminated)
    try:
        if "claim" in cases:
            print("4 GiB association claim ...", flush=True)
            for name in servers:
                run_case(
                    rows,
                    name,
                    base / f"claim-{name}",
                    lambda s: claim(s, args),
                    ("claim-rss", "claim-closed"),
                    node,
                )
        if "big" in cases:
            print(f"writing a {args.big_gib:g} GiB CT instance ...", flush=True)
            source = make_big(base / "big.dcm", args.big_gib)
            print(f"{args.big_gib:g} GiB instance ...", flush=True)
            for name in servers:
                run_case(
                    rows,
                    name,
                    base / f"big-{name}",
                    lambda s: big(s, args, source),
                    ("big-rss", "big-store"),
                    node,
                    bit_preserving=True,
                )
            source.unlink()
        for kind in ("idle", "loris"):
            if kind in cases:
                print(f"C-ECHO under 40 {kind} connections ...", flush=True)
                for name in servers:
                    run_case(
                        rows,
                        name,
                        base / f"{kind}-{name}",
                        functools.partial(flood, args=args, slow_loris=kind == "loris"),
                        (f"{kind}-echo", f"{kind}-closed"),
                        node,
                    )
        if "ingest" in cases:
            print(f"writing {args.instances} CT instances 512x512 ...", flush=True)
            folder = base / "ct"
            write_study(folder, args.instances, rows=512, columns=512)
            rates: dict[str, list[float]] = {name: [] for name in ingested}
            with contextlib.ExitStack() as trees:
                commands: dict[str, tuple[Sequence[str], Path | None]] = {
                    "node": (node, None),
                    "storescp": (node, None),
                }
                if compared:
                    tree = trees.enter_context(worktree(args.before, base / "before"))
                    commands["before"] = (before_command(tree), tree)
                    print(f"node before: {args.before} checked out in {tree}")
                print("ingest over one association ...", flush=True)
                for i in range(args.ingest_repeat):  # interleaved: drift hits all
                    for name in ingested:
                        command, cwd = commands[name]
                        run_case(
                            rows,
                            name,
                            base / f"ingest-{name}-{i}",
                            lambda s: ingest(s, args, folder),
                            ("ingest",),
                            command,
                            cwd=cwd,
                        )
                        rate = rows["ingest"].cells[name].value
                        if rate is not None:
                            rates[name].append(rate)
            for name, values in rates.items():
                if values and len(values) == args.ingest_repeat > 1:
                    rows["ingest"].cells[name] = Outcome(
                        f"{statistics.median(values):.0f}/s "
                        f"({min(values):.0f}-{max(values):.0f})",
                        statistics.median(values),
                    )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    ingest_row = rows["ingest"]
    node_rate = ingest_row.cells.get("node", Outcome("")).value
    before_rate = ingest_row.cells.get("before", Outcome("")).value
    scp_rate = ingest_row.cells.get("storescp", Outcome("")).value
    ratio = node_rate / before_rate if node_rate and before_rate else None
    scp_ratio = node_rate / scp_rate if node_rate and scp_rate else None
    if compared:
        ingest_row.target = f"node now / node before >= {INGEST_FLOOR:.2f}"
        if "node" in ingest_row.cells:
            ingest_row.cells["node"].ok = ratio is not None and ratio >= INGEST_FLOOR
    else:
        ingest_row.target = "- (no --before)"

    print()
    table(list(rows.values()), shown)
    print()
    for key in ("claim-rss", "big-rss", "idle-echo", "loris-echo", "ingest"):
        row = rows[key]
        cell = row.cells.get("node")
        if cell is None:
            continue
        verdict = {True: "PASS", False: "FAIL", None: "INFO"}[cell.ok]
        reference = row.cells.get("storescp")
        if key == "ingest":
            then = row.cells.get("before")
            figure = f"node now {cell.text}" + (
                f" vs node before {then.text}" if then is not None else ""
            )
            if ratio is not None:
                figure = f"ratio {ratio:.2f} ({figure})"
            if reference is not None:
                figure += (
                    f"; node/storescp {scp_ratio:.2f} (storescp {reference.text})"
                    if scp_ratio is not None
                    else f"; storescp {reference.text}"
                )
        else:
            figure = "node " + cell.text
            if reference is not None:
                figure += f" (storescp: {reference.text})"
        print(f"{verdict} {row.label} [{row.target}]: {figure}")
    print(f"\ntook {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
