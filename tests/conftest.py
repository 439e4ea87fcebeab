"""Fixtures: a real node on an ephemeral loopback port, and a real SCU to feed it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import NodeConfig
from dicom_node.scp import Receiver
from dicom_node.service import open_index, running_node
from inference import ModelArtifact, file_sha256, load_compiled
from tests.factories import make_artifact
from tests.helpers import (
    MODEL_CACHE_VARIABLE,
    Destination,
    RunningNode,
    free_port,
    make_config,
    postgres_bin,
)

# What may be skipped where CI runs (.ci/run sets CI): a GPU it does not have,
# root (a tmpfs mount) where it runs with sudo.
# Anything else (Orthanc, PostgreSQL, dcmtk, chromium...) .ci/setup-system.sh
# installs, and a test skipped for want of it would pass unseen.
_CI_MAY_SKIP = ("CUDA", "needs root")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    """In CI, fail a test skipped for any reason but those of :data:`_CI_MAY_SKIP`."""
    outcome: Any = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else "")
        if not any(allowed in reason for allowed in _CI_MAY_SKIP):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI: {reason}"


@pytest.fixture(scope="session", autouse=True)
def shared_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One folder of compiled models for every node the tests start.

    Each node compiles a model it has not seen in a child process (~8 s here);
    the tests' model files are mostly the same file, compiled once this way.
    Nodes started in this process get it through tests.helpers.make_config,
    ``dicom-node`` commands run as processes through the environment.
    """
    folder = tmp_path_factory.mktemp("compiled-models")
    # The model most tests' nodes load, compiled here once (~10 s) rather
    # than in whichever test comes first, within its time limit.
    path = folder.parent / "model.safetensors"
    always_present_artifact().save(path)
    compiled = load_compiled(
        ModelArtifact.load(path), path, file_sha256(path), folder, "cpu"
    )
    assert compiled is not None, "the tests' model does not compile"
    previous = os.environ.get(MODEL_CACHE_VARIABLE)
    os.environ[MODEL_CACHE_VARIABLE] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(MODEL_CACHE_VARIABLE, None)
        else:
            os.environ[MODEL_CACHE_VARIABLE] = previous


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small model file (tests.factories.make_artifact) for a node to load.

    Both findings at threshold 0: always present, so that every study gets a
    Grad-CAM capture per label (absent findings get none by default).
    """
    path = tmp_path / "model.safetensors"
    always_present_artifact().save(path)
    return path


def always_present_artifact() -> ModelArtifact:
    """The model of the ``model`` fixture: its findings at threshold 0."""
    artifact = make_artifact()
    artifact.labels = tuple(replace(label, threshold=0.0) for label in artifact.labels)
    return artifact


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
    bindir = postgres_bin()
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


@pytest.fixture(scope="session")
def browser_type_launch_args(
    browser_type_launch_args: dict[str, Any],
) -> dict[str, Any]:
    """Debian's chromium (setup-system.sh), never a browser Playwright downloads.

    Without its sandbox when the tests run as root (as in CI), which chromium
    refuses otherwise.
    """
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    return {
        **browser_type_launch_args,
        "executable_path": "/usr/bin/chromium",
        "args": args,
    }
