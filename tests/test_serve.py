"""`dicom-node serve` as a process: shutdown, kill -9, several receivers, no PHI."""

from __future__ import annotations

import gc
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.config import CallerConfig, ModelConfig, NodeConfig, load_config
from dicom_node.dimse import SUCCESS
from dicom_node.errors import ThreadEndedError
from dicom_node.export import Peer, SendOutcome, send_files
from dicom_node.index import IndexDB, Instance
from dicom_node.log import PhiFilter
from dicom_node.scp import Receiver
from dicom_node.service import serve
from tests.factories import (
    SENTINEL_BIRTH_DATE,
    SENTINEL_NAME,
    SENTINEL_PATIENT_ID,
    make_ct,
    storescu_folder,
    write_study,
)
from tests.helpers import (
    RunningNode,
    ct_study,
    dicom_node_cmd,
    free_port,
    run_cli,
    store_datasets,
    store_files,
    wait_for,
    worker_process,
)
from tests.hostile_peers import echo

SENTINELS = (SENTINEL_NAME, "SENTINEL^PHI", SENTINEL_BIRTH_DATE, SENTINEL_PATIENT_ID)


def write_config(tmp_path: Path, http_port: int = 0, **node: object) -> Path:
    values = {"port": 0, "stable_after": 0.5, "log_level": "DEBUG", **node}
    lines = ["[node]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    if http_port:
        lines += ["[http]", f"port = {http_port}"]
    lines += [
        "[[callers]]",
        'ae_title = "TESTSCU"',
        "[[callers]]",
        'ae_title = "STORESCU"',
    ]
    lines += ["[[models]]", 'path = "model.safetensors"']
    path = tmp_path / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)


def start_serve(config: Path, timeout: float = 60.0) -> ServeProcess:
    proc = subprocess.Popen(
        dicom_node_cmd("serve", "--config", str(config)),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    port_seen = threading.Event()
    port: list[int] = []

    def read() -> None:
        assert proc.stderr is not None
        with proc.stderr:  # closed at the end of the output
            for line in proc.stderr:
                lines.append(line.rstrip("\n"))
                match = re.search(r"listening as \S+ on [\d.]+:(\d+)", line)
                if match:
                    port.append(int(match.group(1)))
                    port_seen.set()
        port_seen.set()

    threading.Thread(target=read, daemon=True).start()
    port_seen.wait(timeout)
    if not port:
        proc.kill()
        raise AssertionError("serve did not start:\n" + "\n".join(lines))
    return ServeProcess(proc, port[0], lines)


@pytest.fixture
def serve_processes() -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    try:
        yield started
    finally:
        for s in started:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait(10)


def test_serve_stops_cleanly_on_sigterm(
    tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    serve = start_serve(write_config(tmp_path))
    serve_processes.append(serve)
    assert (
        run_cli(
            "echo", f"DICOMNODE@127.0.0.1:{serve.port}", "--aet", "TESTSCU"
        ).returncode
        == 0
    )
    # The callers of this configuration have no host: said at start.
    assert "caller 'TESTSCU' has no host" in serve.log

    serve.proc.send_signal(signal.SIGTERM)

    assert serve.proc.wait(30) == 0
    wait_for(
        lambda: any("stopped" in line for line in serve.lines), what="the last log line"
    )
    assert (
        run_cli(
            "echo",
            f"DICOMNODE@127.0.0.1:{serve.port}",
            "--aet",
            "TESTSCU",
            "--timeout",
            "5",
        ).returncode
        == 1
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_mid_stream_loses_nothing_acknowledged(
    tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    config = write_config(tmp_path)
    files = write_study(tmp_path / "study", 300, rows=128, columns=128)
    uid_of = {p: dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    serve = start_serve(config)
    serve_processes.append(serve)
    acked: list[Path] = []

    def progress(outcome: SendOutcome) -> None:
        if outcome.status == SUCCESS:
            acked.append(outcome.path)
            if len(acked) == 100:
                serve.proc.send_signal(signal.SIGKILL)

    report = send_files(
        files,
        Peer("DICOMNODE", "127.0.0.1", serve.port),
        "TESTSCU",
        timeout=10,
        progress=progress,
    )
    serve.proc.wait(10)

    assert 100 <= len(acked) < 300, "the kill must land mid-stream"
    assert report.failed, "the sender must see that the rest was not acknowledged"
    # Restart: every acknowledged instance is on disk, whole, and in the index.
    serve = start_serve(config)
    serve_processes.append(serve)
    node_config = load_config(config)
    index = IndexDB(node_config.effective_database_url)
    try:
        with index.sessions() as s:
            indexed = set(s.scalars(select(Instance.sop_instance_uid)).all())
    finally:
        index.close()
    for path in acked:
        uid = uid_of[path]
        assert uid in indexed
        [stored] = node_config.storage_dir.rglob(f"{uid}.dcm")
        assert dcmread(stored) == dcmread(path)
    # The sender resends the rest, and everything is there once.
    resent = store_files(serve.port, [p for p in files if p not in acked])
    assert set(resent.values()) == {SUCCESS}
    status = json.loads(run_cli("status", "--config", str(config), "--json").stdout)
    assert status["instances"] == 300
    assert status["studies"] == 1
    assert len(list(node_config.storage_dir.rglob("*.dcm"))) == 300


def test_status_json_counts(
    tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    config = write_config(tmp_path)
    serve = start_serve(config)
    serve_processes.append(serve)
    study = generate_uid()
    assert (
        store_datasets(serve.port, [make_ct(study), make_ct(study), make_ct()])
        == [SUCCESS] * 3
    )
    bad = make_ct()
    bad.StudyInstanceUID = "1.2.x"
    store_datasets(serve.port, [bad])

    def status() -> dict[str, object]:
        result = run_cli("status", "--config", str(config), "--json")
        assert result.returncode == 0, result.stderr
        parsed: dict[str, object] = json.loads(result.stdout)
        return parsed

    # stable_after is 0.5 s: both studies get their one job.
    wait_for(
        lambda: (
            status()["jobs"]
            == {"pending": 2, "running": 0, "done": 0, "failed": 0, "skipped": 0}
        )
    )
    final = status()
    assert (final["studies"], final["series"], final["instances"]) == (2, 3, 3)
    assert final["associations"] == 2
    errors = final["last_errors"]
    assert isinstance(errors, list)
    assert errors[0]["status"] == "0xC001"
    text = run_cli("status", "--config", str(config))
    assert "instances     3" in text.stdout
    assert "0xC001" in text.stdout


@pytest.mark.timeout(120)
def test_several_receiving_processes_share_the_port(
    tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    web = free_port()
    serve = start_serve(
        write_config(tmp_path, http_port=web, scp_processes=3, log_level="INFO")
    )
    serve_processes.append(serve)
    wait_for(
        lambda: serve.log.count("receiving process listening") == 2,
        what="two more receivers",
    )
    study = generate_uid()
    folders = [tmp_path / f"s{i}" for i in range(6)]
    for folder in folders:
        write_study(folder, 20, study_uid=study, rows=32, columns=32)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda f: storescu_folder(serve.port, f), folders))
    assert [r.returncode for r in results] == [0] * 6

    status = json.loads(
        run_cli("status", "--config", str(tmp_path / "node.toml"), "--json").stdout
    )
    assert status["instances"] == 120
    # /metrics adds up what every receiving process counted.
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=10) as r:
        text = r.read().decode()
    received = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("dicom_node_instances_received_total ")
    ]
    assert received == [120.0]
    accepted = [
        line
        for line in text.splitlines()
        if line.startswith('dicom_node_associations_total{outcome="accepted"')
    ]
    assert accepted
    assert float(accepted[0].split()[-1]) == 6.0
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(30) == 0


def sentinel_datasets() -> list[object]:
    kwargs = {
        "patient_name": SENTINEL_NAME,
        "patient_birth_date": SENTINEL_BIRTH_DATE,
        "patient_id": SENTINEL_PATIENT_ID,
    }
    good = make_ct(**kwargs)  # type: ignore[arg-type]
    good.StudyDescription = "SENTINEL^PHI"
    bad_uid = make_ct(**kwargs)  # type: ignore[arg-type]
    bad_uid.StudyInstanceUID = "1.2.345.SENTINEL"
    missing = make_ct(**kwargs)  # type: ignore[arg-type]
    del missing.SeriesInstanceUID
    return [good, good, bad_uid, missing]


def test_no_patient_data_in_the_serve_log(
    tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    config = write_config(tmp_path)  # log_level DEBUG
    serve = start_serve(config)
    serve_processes.append(serve)

    statuses = store_datasets(serve.port, sentinel_datasets())  # type: ignore[arg-type]
    assert statuses[:2] == [SUCCESS, SUCCESS]
    assert SUCCESS not in statuses[2:]
    serve.proc.send_signal(signal.SIGTERM)
    serve.proc.wait(30)

    log = serve.log
    assert "stored (" in log  # DEBUG lines were written...
    assert "refused" in log
    for sentinel in SENTINELS:  # ...and none carries patient data
        assert sentinel not in log


@pytest.mark.filterwarnings("default")  # pydicom's warnings must reach the filter
def test_no_patient_data_in_captured_records(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    # As configure_logging installs it: PhiFilter on the handler, warnings captured.
    caplog.handler.addFilter(PhiFilter())
    logging.captureWarnings(True)
    caplog.set_level(logging.DEBUG)
    try:
        statuses = store_datasets(node.port, sentinel_datasets())  # type: ignore[arg-type]
    finally:
        logging.captureWarnings(False)
    assert statuses[0] == SUCCESS
    assert "stored (" in caplog.text
    assert "text withheld" in caplog.text  # pydicom did warn about the bad DA
    for sentinel in SENTINELS:
        assert sentinel not in caplog.text


def test_a_worker_process_is_counted_by_serves_metrics(
    tmp_path: Path, model: Path, serve_processes: list[ServeProcess]
) -> None:
    web = free_port()
    toml = write_config(tmp_path, http_port=web, workers=0, log_level="INFO")
    serve = start_serve(toml)
    serve_processes.append(serve)
    worker = worker_process(toml)
    try:
        assert store_datasets(serve.port, ct_study()) == [0, 0]

        def scored_by_the_worker() -> float:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{web}/metrics", timeout=10
            ) as r:
                text = r.read().decode()
            return sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("dicom_node_inference_seconds_count{")
            )

        wait_for(lambda: scored_by_the_worker() == 1, 90, "the worker's study counted")
    finally:
        worker.terminate()
        worker.wait(30)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's malloc arenas"
)
def test_serve_caps_malloc_arenas_unless_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Many threads, each with a glibc arena of its own, would hold freed
    # memory apart (bench/peers.py: ~80 MiB of serve's peak).
    from dicom_node.service import MALLOC_ARENAS, cap_malloc_arenas

    assert cap_malloc_arenas(MALLOC_ARENAS) is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert cap_malloc_arenas(MALLOC_ARENAS) is False


def test_serve_stops_with_an_error_when_its_receiver_thread_ends(
    tmp_path: Path, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Once it ran on without receiving (only /readyz said so); a service
    # manager restarts a process that stops with an error.
    config = NodeConfig(
        port=0,
        state_dir=tmp_path / "state",
        workers=0,
        callers=(CallerConfig("ECHOSCU", "127.0.0.1"),),
        models=(ModelConfig(model),),
        source="tests",
    )
    stop = threading.Event()
    ready: list[int] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            serve(config, stop, lambda _: None, on_ready=ready.append)  # type: ignore[arg-type,return-value]
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: bool(ready or raised), 60, "serve to start")
    assert not raised
    gc.unfreeze()  # serve froze what it made at start, its receiver among them
    [receiver] = [
        o for o in gc.get_objects() if type(o) is Receiver and o.port == ready[0]
    ]
    assert echo(ready[0]) == SUCCESS

    receiver.server.gate.stop()  # its thread's loop ends, as by a fault

    thread.join(10)
    try:
        assert not thread.is_alive(), "serve ran on without its receiver"
        assert len(raised) == 1
        assert isinstance(raised[0], ThreadEndedError)
        assert "thread receiver ended while the node ran" in caplog.text
    finally:
        stop.set()
        thread.join(30)
