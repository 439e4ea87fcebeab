"""Test helpers: a node in this process, a real SCU and SCP, the CLI in a subprocess."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.presentation import build_context

from dicom_node.config import CallerConfig, DestinationConfig, ModelConfig, NodeConfig
from dicom_node.demo.pacs import receiver_ae
from dicom_node.index import IndexDB
from dicom_node.log import quiet_pynetdicom
from dicom_node.scp import Receiver
from dicom_node.service import open_index
from dicom_node.status import NodeStatus, node_status
from tests.factories import make_ct

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RunningNode:
    """A node started in this process: its configuration, index and receiver."""

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


# The setting of the folder of compiled models, shared by the tests' nodes
# (tests/conftest.py sets it for the session).
MODEL_CACHE_VARIABLE = "DICOM_NODE_NODE_MODEL_CACHE"


def make_config(tmp_path: Path, **overrides: Any) -> NodeConfig:
    """A node configuration in ``tmp_path``: ephemeral port, the test callers."""
    shared = os.environ.get(MODEL_CACHE_VARIABLE)
    base = NodeConfig(
        model_cache=Path(shared) if shared else None,
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


def node_config(tmp_path: Path, model: Path, port: int, **overrides: Any) -> NodeConfig:
    """A quick node (short waits) scoring with ``model``, delivering to ``port``."""
    settings: dict[str, Any] = {
        "stable_after": 0.3,
        "models": (ModelConfig(model),),
        "destinations": (DestinationConfig("pacs", "DEST", "127.0.0.1", port),),
        "retry_after": 0.2,
        "retry_max": 0.5,
        "lease_seconds": 30.0,
    }
    settings.update(overrides)
    return make_config(tmp_path, **settings)


def ct_study(n: int = 2) -> list[Any]:
    """``n`` small CT images of one series."""
    first = make_ct(rows=64, columns=64, seed=11)
    study = [first]
    for i in range(1, n):
        ds = make_ct(rows=64, columns=64, seed=11 + i)
        ds.StudyInstanceUID = first.StudyInstanceUID
        ds.SeriesInstanceUID = first.SeriesInstanceUID
        study.append(ds)
    return study


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
    """A loopback port free at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dicom_node_cmd(*args: str) -> list[str]:
    """The command line of ``dicom-node ARGS`` with this interpreter."""
    return [sys.executable, "-m", "dicom_node", *args]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``dicom-node ARGS`` to its end; its output is captured as text."""
    return subprocess.run(
        dicom_node_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def run_python(code: str, timeout: float = 50) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet); return its
    standard output, failing the test if it fails."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


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


def status(config: NodeConfig) -> NodeStatus:
    """The index figures of the node with ``config`` (``dicom-node status``)."""
    index = open_index(config)
    try:
        return node_status(index)
    finally:
        index.close()


def postgres_bin() -> Path | None:
    """The folder of the PostgreSQL server binaries (initdb, pg_ctl), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


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


def stderr_on_a_terminal(command: list[str]) -> tuple[str, str]:
    """Run a command with stderr on a 24 x 120 pseudo-terminal: (stdout, stderr).

    Asserts that it exits 0 (its stderr is in the message otherwise).
    """
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=slave, text=True
    ) as process:
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed its end
                break
            if not chunk:
                break
            seen += chunk
        out = process.stdout.read() if process.stdout else ""
        assert process.wait(timeout=120) == 0, seen.decode(errors="replace")
    os.close(master)
    return out, seen.decode(errors="replace")


def data_set_digest(path: Path) -> str:
    """Return the sha256 of a Part 10 file's data set (what follows File Meta)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        head = f.read(144)
        assert head[128:132] == b"DICM"
        f.seek(144 + int.from_bytes(head[140:144], "little"))
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
