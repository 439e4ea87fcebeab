"""Fixtures: a real node on an ephemeral loopback port, and a real SCU to feed it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.presentation import build_context

from dicom_node.config import CallerConfig, ModelConfig, NodeConfig
from dicom_node.demo import receiver_ae
from dicom_node.index import IndexDB
from dicom_node.log import quiet_pynetdicom
from dicom_node.scp import Receiver
from dicom_node.service import open_index, running_node
from tests.factories import make_artifact

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RunningNode:
    config: NodeConfig
    index: IndexDB
    receiver: Receiver

    @property
    def port(self) -> int:
        return self.receiver.port

    @property
    def peer(self) -> str:
        return f"{self.config.ae_title}@127.0.0.1:{self.port}"

    def stored_files(self) -> list[Path]:
        return sorted(
            p
            for p in self.config.state_dir.rglob("*")
            if p.is_file() and "storage" in p.parts and ".incoming" not in p.parts
        )


def make_config(tmp_path: Path, **overrides: Any) -> NodeConfig:
    base = NodeConfig(
        port=0,
        state_dir=tmp_path / "state",
        stable_after=60.0,
        callers=(
            CallerConfig("STORESCU"),
            CallerConfig("TESTSCU"),
            CallerConfig("ECHOSCU"),
        ),
        models=(ModelConfig(tmp_path / "model.safetensors"),),
        source="tests",
    )
    return replace(base, **overrides)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small model file (tests.factories.make_artifact) for a node to load.

    Both findings at threshold 0: always present, so that every study gets a
    Grad-CAM capture per label (absent findings get none by default).
    """
    path = tmp_path / "model.safetensors"
    artifact = make_artifact()
    artifact.labels = tuple(replace(label, threshold=0.0) for label in artifact.labels)
    artifact.save(path)
    return path


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    """Start real nodes (SCP on 127.0.0.1, ephemeral port); stop them afterwards."""
    started: list[RunningNode] = []

    def start(**overrides: Any) -> RunningNode:
        config = make_config(tmp_path, **overrides)
        index = open_index(config)
        receiver = Receiver(config, index)
        receiver.start()
        node = RunningNode(config, index, receiver)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.receiver.stop(grace=2.0)
            node.index.close()


@pytest.fixture
def node(start_node: Callable[..., RunningNode]) -> RunningNode:
    return start_node()


def store_datasets(
    port: int,
    datasets: Sequence[Dataset],
    *,
    calling_ae_title: str = "TESTSCU",
    called_ae_title: str = "DICOMNODE",
) -> list[int | None]:
    """Send data sets over one real association; return each C-STORE status."""
    quiet_pynetdicom()
    ae = AE(ae_title=calling_ae_title)
    pairs = sorted(
        {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    )
    ae.requested_contexts = [build_context(UID(c), [UID(t)]) for c, t in pairs]
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae_title)
    assert assoc.is_established, "association with the node failed"
    statuses: list[int | None] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        assoc.release()
    return statuses


def store_files(
    port: int,
    paths: Sequence[Path],
    *,
    calling_ae_title: str = "TESTSCU",
) -> dict[Path, int | None]:
    """Send files through dicom_node.export (our SCU, raw bytes as on disk)."""
    from dicom_node.export import Peer, send_files

    report = send_files(paths, Peer("DICOMNODE", "127.0.0.1", port), calling_ae_title)
    return {o.path: o.status for o in report.outcomes}


def wait_for(
    predicate: Callable[[], bool], timeout: float = 20.0, what: str = ""
) -> None:
    """Poll ``predicate`` until true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dicom_node_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dicom_node", *args]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        dicom_node_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


class Destination:
    """A real receiving SCP (pynetdicom) that records every instance it accepts.

    It listens on a fixed loopback port so that it can be stopped and started
    again at the same address (a PACS going down and coming back).
    """

    def __init__(self, port: int, ae_title: str = "DEST") -> None:
        self.port = port
        self.ae_title = ae_title
        self.received: list[Dataset] = []
        self.associations: set[int] = set()  # those that stored something
        self._server: Any = None

    def start(self) -> None:
        from pynetdicom import evt

        ae = receiver_ae(self.ae_title)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            self.associations.add(id(event.assoc))
            return 0x0000

        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def sop_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.received]


@pytest.fixture
def destination() -> Iterator[Destination]:
    """A running destination SCP on a free loopback port; stopped afterwards."""
    dest = Destination(free_port())
    dest.start()
    try:
        yield dest
    finally:
        dest.stop()


@pytest.fixture
def run_serve() -> Iterator[Callable[[NodeConfig], int]]:
    """Run `serve` (receiver, scheduler, workers, outbox) in this process."""
    with contextlib.ExitStack() as stack:
        yield lambda config: stack.enter_context(running_node(config))


def status(config: NodeConfig) -> dict[str, Any]:
    index = open_index(config)
    try:
        return index.status()
    finally:
        index.close()


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server on a free loopback port: its base URL.

    Started with the server binaries of Debian's postgresql package (installed
    by .ci/setup-system.sh), as the postgres user when run as root (the
    server refuses root). Skipped where they or the driver are missing.
    """
    missing = ""
    try:
        import psycopg  # noqa: F401 - the driver SQLAlchemy will use
    except ImportError:
        missing = "the postgres extra (psycopg) is not installed"
    bindir = _postgres_bin()
    if bindir is None:
        missing = "PostgreSQL server binaries not found (.ci/setup-system.sh)"
    if missing:
        if os.environ.get("CI"):  # CI installs both: never skip there
            pytest.fail(missing)
        pytest.skip(missing)
    assert bindir is not None
    # Not under pytest's folder: that is private to this user, and the server
    # runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    data = folder / "data"
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(*args: str) -> None:
        subprocess.run(
            [*prefix, *args], check=True, capture_output=True, text=True, timeout=120
        )

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust")
    pg(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(folder / "server.log"),
        "-w",
        "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off",
        "start",
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database on the PostgreSQL server, for one test."""
    import psycopg

    name = f"t{secrets.token_hex(6)}"
    dsn = postgres_server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{dsn}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres_server}/{name}"


def write_toml(tmp_path: Path, config: NodeConfig) -> Path:
    """Write the parts of ``config`` a separate process needs as node.toml."""
    path = tmp_path / "node.toml"
    lines = [
        "[node]",
        f'state_dir = "{config.state_dir}"',
        f"stable_after = {config.stable_after}",
        f"workers = {max(1, config.workers)}",
        f"retry_after = {config.retry_after}",
        f"retry_max = {config.retry_max}",
        f"lease_seconds = {config.lease_seconds}",
        f"job_attempts = {config.job_attempts}",
        f"delivery_attempts = {config.delivery_attempts}",
        f"results_processes = {config.results_processes}",
    ]
    for d in config.destinations:
        lines += [
            "[[destinations]]",
            f'name = "{d.name}"',
            f'ae_title = "{d.ae_title}"',
            f'host = "{d.host}"',
            f"port = {d.port}",
        ]
    for m in config.models:
        lines += ["[[models]]", f'path = "{m.path}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def worker_process(
    toml: Path, stderr: Any = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """Start ``dicom-node worker --config TOML`` (output dropped unless ``stderr``)."""
    return subprocess.Popen(
        dicom_node_cmd("worker", "--config", str(toml)),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
