"""The whole flow in the node: stable study -> worker -> SR/SC -> destination."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.config import (
    CallerConfig,
    ModelConfig,
    ModelMatch,
    NodeConfig,
)
from dicom_node.index import Job
from dicom_node.scoring import ModelCache
from dicom_node.service import open_index, running_node
from dicom_node.worker import start_workers
from inference import ArtifactError, Classifier, ModelArtifact
from tests.factories import make_artifact, make_ct
from tests.helpers import (
    Destination,
    ct_study,
    dicom_node_cmd,
    free_port,
    node_config,
    run_cli,
    status,
    store_datasets,
    wait_for,
    worker_process,
    write_toml,
)


@pytest.mark.parametrize("results_processes", [0, 1])
def test_a_stable_study_is_scored_and_its_results_delivered(
    results_processes: int,
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    config = node_config(
        tmp_path, model, destination.port, results_processes=results_processes
    )
    port = run_serve(config)
    study = ct_study()
    assert store_datasets(port, study) == [0, 0]

    wait_for(lambda: len(destination.received) >= 3, 60, "SR and 2 SCs at the PACS")
    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 10, "delivery done")
    kinds = sorted(str(ds.Modality) for ds in destination.received)
    assert kinds == ["OT", "OT", "SR"]
    for ds in destination.received:
        assert ds.StudyInstanceUID == study[0].StudyInstanceUID
        assert ds.PatientID == study[0].PatientID
    sr = next(ds for ds in destination.received if ds.Modality == "SR")
    assert sr.SeriesDescription == "AI Results: test"
    assert sr.VerificationFlag == "UNVERIFIED"
    # The SR lists both source images and references the delivered captures.
    text = str(sr)
    for source in study:
        assert str(source.SOPInstanceUID) in text
    for capture in (ds for ds in destination.received if ds.Modality == "OT"):
        assert str(capture.SOPInstanceUID) in text
    figures = status(config)
    assert figures["jobs"]["done"] == 1
    assert figures["results"] == 1
    # The result files stay in the node's state folder, valid DICOM.
    # <study>/<run>: not a set prepared on arrival (.early/<token>/<n>), which a
    # job may overtake and which stays until the node stops.
    srs = list((config.state_dir / "results").glob("*/*/sr.dcm"))
    assert len(srs) == 1
    assert dcmread(srs[0]).SOPInstanceUID == sr.SOPInstanceUID


def test_models_are_loaded_at_start_not_when_the_first_study_waits(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    config = node_config(tmp_path, model, destination.port)
    run_serve(config)
    # Nothing sent: the worker loads (and traces) the model by itself.
    wait_for(lambda: "loaded model test 0" in caplog.text, 60, "the model loaded")
    assert "(traced, compiled)" in caplog.text
    assert status(config)["studies"] == 0


def test_parametric_maps_are_delivered_with_the_report_when_asked_for(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    config = node_config(tmp_path, model, destination.port, results_parametric_map=True)
    port = run_serve(config)
    study = ct_study()
    assert store_datasets(port, study) == [0, 0]

    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "delivery done")
    classes = sorted(ds.SOPClassUID.name for ds in destination.received)
    assert classes == [
        "Comprehensive 3D SR Storage",
        "Parametric Map Storage",
        "Parametric Map Storage",
        "Secondary Capture Image Storage",
        "Secondary Capture Image Storage",
    ]
    maps = [ds for ds in destination.received if ds.SOPClassUID.name.startswith("P")]
    sources = {str(ds.SOPInstanceUID) for ds in study}
    for pm in maps:
        assert pm.StudyInstanceUID == study[0].StudyInstanceUID
        derived = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence
        assert derived[0].SourceImageSequence[0].ReferencedSOPInstanceUID in sources
    folder = next((config.state_dir / "results").glob("*/*/sr.dcm")).parent
    assert sorted(p.name for p in folder.glob("pm-*.dcm")) == ["pm-1.dcm", "pm-2.dcm"]


def test_new_images_give_a_new_result_set_that_replaces_the_first(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    config = node_config(tmp_path, model, destination.port)
    port = run_serve(config)
    study = ct_study(3)
    store_datasets(port, study[:2])
    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "first delivery")
    store_datasets(port, study[2:])
    wait_for(lambda: status(config)["deliveries"]["done"] == 2, 60, "second delivery")
    srs = [ds for ds in destination.received if ds.Modality == "SR"]
    assert len(srs) == 2
    assert srs[0].SOPInstanceUID != srs[1].SOPInstanceUID
    predecessor = srs[1].PredecessorDocumentsSequence[0]
    assert (
        predecessor.ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == srs[0].SOPInstanceUID
    )


def test_destination_down_is_retried_then_dead_lettered_and_revived(
    tmp_path: Path, model: Path, run_serve: Callable[[NodeConfig], int]
) -> None:
    dest = Destination(free_port())  # not started: the PACS is down
    config = node_config(tmp_path, model, dest.port, delivery_attempts=3)
    port = run_serve(config)
    store_datasets(port, ct_study())
    wait_for(lambda: status(config)["deliveries"]["dead"] == 1, 60, "dead letter")
    figures = status(config)
    dead = figures["failing_deliveries"][0]
    assert dead["attempts"] == 3
    assert "association failed" in (dead["last_error"] or "")
    shown = run_cli("status", "--config", str(write_toml(tmp_path, config)))
    assert "dead: delivery" in shown.stdout
    assert "dicom-node retry --dead" in shown.stdout

    dest.start()
    try:
        revived = run_cli(
            "retry", "--dead", "--config", str(write_toml(tmp_path, config))
        )
        assert revived.returncode == 0, revived.stderr
        assert "1 dead delivery(ies) queued again" in revived.stdout
        wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "delivered")
        assert len(dest.sop_uids()) == 3
        assert len(set(dest.sop_uids())) == 3
    finally:
        dest.stop()


def test_a_study_no_model_accepts_is_skipped_with_the_reason(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    config = node_config(
        tmp_path,
        model,
        destination.port,
        models=(ModelConfig(model, match=ModelMatch(modalities=("DX", "CR"))),),
    )
    port = run_serve(config)
    store_datasets(port, ct_study())
    wait_for(lambda: status(config)["jobs"]["skipped"] == 1, 60, "skipped job")
    reason = status(config)["failed_jobs"][0]["reason"] or ""
    assert "modality not in ['DX', 'CR']" in reason
    assert destination.received == []


def test_results_also_return_to_the_caller_that_sent_the_study(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    caller = Destination(free_port(), ae_title="TESTSCU")
    caller.start()
    try:
        config = node_config(
            tmp_path,
            model,
            destination.port,
            callers=(CallerConfig("TESTSCU", "127.0.0.1", results_port=caller.port),),
        )
        port = run_serve(config)
        store_datasets(port, ct_study())
        wait_for(lambda: status(config)["deliveries"]["done"] == 2, 60, "2 deliveries")
        assert len(caller.received) == 3
        assert sorted(caller.sop_uids()) == sorted(destination.sop_uids())
    finally:
        caller.stop()


def test_a_worker_killed_mid_job_still_delivers_exactly_once(
    tmp_path: Path, destination: Destination, run_serve: Callable[[NodeConfig], int]
) -> None:
    # A model big enough, and a study long enough, to kill the worker mid-job.
    path = tmp_path / "model.safetensors"
    make_artifact(size=224).save(path)
    config = node_config(tmp_path, path, destination.port, workers=0)
    port = run_serve(config)  # receives and schedules; no worker threads
    study = ct_study(24)
    store_datasets(port, study)
    toml = write_toml(tmp_path, config)
    worker = worker_process(toml)
    try:
        wait_for(lambda: status(config)["jobs"]["running"] == 1, 60, "a running job")
        worker.kill()  # SIGKILL: no cleanup, the lease stays
        worker.wait(timeout=10)
        figures = status(config)
        assert figures["jobs"]["done"] == 0, "the job ended before the kill"
        assert figures["deliveries"]["done"] == 0
        worker = worker_process(toml)
        wait_for(lambda: status(config)["deliveries"]["done"] == 1, 90, "delivery")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    uids = destination.sop_uids()
    assert len(uids) == 3
    assert len(set(uids)) == 3
    figures = status(config)
    assert figures["results"] == 1
    assert figures["jobs"]["done"] == 1


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("started", ["dicom-node", "python -m dicom_node"])
def test_a_workers_results_process_runs_without_pytorch_and_ends_with_it(
    started: str,
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    config = node_config(
        tmp_path, model, destination.port, workers=0, results_processes=1
    )
    port = run_serve(config)
    toml = write_toml(tmp_path, config)
    # Both ways users start it: the console script (which a spawned process
    # imports again as its main module) and `python -m dicom_node` (as the
    # systemd units do).
    command = (
        [str(Path(sys.executable).with_name("dicom-node"))]
        if started == "dicom-node"
        else [sys.executable, "-m", "dicom_node"]
    )
    worker = subprocess.Popen(
        [*command, "worker", "--config", str(toml)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert store_datasets(port, ct_study()) == [0, 0]
        wait_for(lambda: status(config)["deliveries"]["done"] == 1, 90, "delivery")
        children = [
            pid
            for pid in _children(worker.pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert children, "no results process beside the worker"
        # It built the study's results without PyTorch (its cost: ~130 MB, not
        # the ~700 MB torch's libraries would add), while the worker loaded it.
        maps = Path(f"/proc/{worker.pid}/maps").read_bytes()
        assert b"libtorch_cpu" in maps
        # The worker keeps no more than it uses: not the model file (the model
        # holds its own copy of the weights), not PyTorch's GPU kernel compiler
        # (Triton: installed with the CUDA build of PyTorch pyproject.toml asks for).
        assert str(model.resolve()).encode() not in maps
        assert b"libtriton" not in maps
        for pid in children:
            assert b"libtorch" not in Path(f"/proc/{pid}/maps").read_bytes()
        worker.kill()  # SIGKILL: the worker cannot stop its children
        worker.wait(timeout=10)
        wait_for(lambda: not any(_alive(pid) for pid in children), 10, "children gone")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)


def test_score_writes_results_and_a_summary(tmp_path: Path, model: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    study = ct_study()
    for i, ds in enumerate(study):
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
    (folder / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out"
    done = run_cli(
        "score", "--model", str(model), str(folder), "--out", str(out), "--json"
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)["studies"]
    assert len(summary) == 1
    assert summary[0]["study_instance_uid"] == study[0].StudyInstanceUID
    assert {label["label"] for label in summary[0]["labels"]} == {"nodule", "effusion"}
    results = out / str(study[0].StudyInstanceUID)
    assert sorted(p.name for p in results.iterdir()) == [
        "sc-1.dcm",
        "sc-1.png",
        "sc-2.dcm",
        "sc-2.png",
        "sr.dcm",
    ]
    problems = subprocess.run(
        ["/usr/bin/dciodvfy", "-new", str(results / "sr.dcm")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Error" not in problems.stdout + problems.stderr


def test_a_failing_job_is_retried_then_failed_with_the_reason(
    tmp_path: Path, destination: Destination, run_serve: Callable[[NodeConfig], int]
) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    config = node_config(tmp_path, broken, destination.port, job_attempts=2)
    port = run_serve(config)
    store_datasets(port, ct_study())
    wait_for(lambda: status(config)["jobs"]["failed"] == 1, 60, "failed job")
    job = status(config)["failed_jobs"][0]
    assert job["attempts"] == 2
    assert (job["reason"] or "").startswith(
        f"after 2 tries: {broken} is not a safetensors"
    )
    assert destination.received == []


def test_a_stored_file_gone_is_retried_without_a_traceback(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Removed (say, by hand, or aside in a retention sweep) before its job reads
    # it: the files' trouble, retried; once logged as the node's own bug.
    config = node_config(
        tmp_path, model, destination.port, job_attempts=2, stable_after=3.0
    )
    port = run_serve(config)
    store_datasets(port, ct_study())
    for path in config.storage_dir.rglob("*.dcm"):
        path.unlink()

    wait_for(lambda: status(config)["jobs"]["failed"] == 1, 60, "failed job")
    reason = status(config)["failed_jobs"][0]["reason"] or ""
    assert reason.startswith("after 2 tries: file not readable or writable: ")
    assert "FileNotFoundError" in reason
    assert "unexpected" not in caplog.text
    assert "Traceback" not in caplog.text
    assert destination.received == []


def test_a_model_file_that_fails_to_load_is_read_again_once_it_changes(
    tmp_path: Path, model: Path
) -> None:
    good = model.read_bytes()
    path = tmp_path / "chest.safetensors"
    path.write_bytes(b"\0" * len(good))  # not a model, a good one's size
    configured = ModelConfig(path)
    models = ModelCache("cpu")
    for _ in range(2):
        with pytest.raises(ArtifactError, match="is not a safetensors"):
            models.get(configured)
    # The good model written into the same file (same inode, size and
    # modification time) is not read: every job would otherwise read the file
    # again and fail the same way.
    stamp = path.stat()
    with path.open("r+b") as file:
        file.write(good)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_ino == stamp.st_ino
    with pytest.raises(ArtifactError, match="is not a safetensors"):
        models.get(configured)
    # Changed (as a copy into place changes it): loaded.
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    assert models.get(configured).classifier.artifact.name


def test_a_model_that_loads_slowly_holds_up_no_other_model(
    tmp_path: Path, model: Path
) -> None:
    # Model files that cannot be read yet (pipes no one writes to: reading one
    # waits, as a compile of a new model file takes seconds): two load at
    # once, and the model already loaded is handed to its jobs meanwhile.
    models = ModelCache("cpu")
    ready = ModelConfig(model)
    assert models.get(ready).classifier.artifact.name
    pipes = [tmp_path / "slow.safetensors", tmp_path / "slower.safetensors"]
    outcomes: dict[str, BaseException | str] = {}

    def load(configured: ModelConfig) -> None:
        try:
            outcomes[configured.path.name] = models.get(
                configured
            ).classifier.artifact.name
        except Exception as exc:  # noqa: BLE001 - checked below
            outcomes[configured.path.name] = exc

    def reading(pipe: Path, seconds: float = 30) -> int | None:
        # Opening a pipe's writing end without waiting works once a reader
        # has it open (else ENXIO): that load is under way, not waiting.
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                return os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.02)
        return None

    writers: dict[Path, int] = {}
    loaders = []
    try:
        for pipe in pipes:
            os.mkfifo(pipe)
            loader = threading.Thread(
                target=load, args=(ModelConfig(pipe),), daemon=True
            )
            loader.start()
            loaders.append(loader)
        for pipe in pipes:
            writer = reading(pipe)
            assert writer is not None, f"{pipe.name} not read while the other loads"
            writers[pipe] = writer
        other = threading.Thread(target=load, args=(ready,), daemon=True)
        other.start()
        other.join(10)
        assert model.name in outcomes, "the loaded model waited for the others"
        assert not any(pipe.name in outcomes for pipe in pipes)
    finally:
        for pipe in pipes:  # lets each load end (not a model)
            writer = writers[pipe] if pipe in writers else reading(pipe, 10)
            if writer is not None:
                os.write(writer, b"\0" * 64)
                os.close(writer)
        for loader in loaders:
            loader.join(10)
    for pipe in pipes:
        assert isinstance(outcomes[pipe.name], ArtifactError), outcomes[pipe.name]


def test_jobs_wait_for_a_model_file_that_appears_later(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    later = tmp_path / "models" / "later.safetensors"
    config = node_config(tmp_path, later, destination.port, job_attempts=2)
    port = run_serve(config)
    store_datasets(port, ct_study())

    def jobs() -> list[Job]:
        index = open_index(config)
        try:
            with index.sessions() as session:
                return list(session.scalars(select(Job)))
        finally:
            index.close()

    wait_for(lambda: len(jobs()) == 1, 30, "the study's job queued")
    # Five times retry_after (0.2 s): with tries spent on the missing file,
    # job_attempts (2) would have failed it by now.
    time.sleep(1.0)
    (job,) = jobs()
    assert job.state == "pending"
    assert job.attempts == 0
    assert status(config)["jobs"]["failed"] == 0

    later.parent.mkdir()
    later.write_bytes(model.read_bytes())
    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "results sent")
    (job,) = jobs()
    assert job.state == "done"
    assert job.attempts == 1
    assert len(destination.received) >= 3


def test_a_burst_of_studies_is_scored_together_and_a_bad_one_fails_alone(
    tmp_path: Path, model: Path, run_serve: Callable[[NodeConfig], int]
) -> None:
    # Ten one-image studies wait for a worker, which claims eight at once
    # (batch_studies) and scores them in one forward pass, then the last two.
    # The last has truncated pixel data: it fails at its first try (its files
    # would fail every try) with its reason; the nine others get results, each
    # with the probability it gets when scored alone.
    # The PACS is down, so the nine deliveries are dead-lettered; revived
    # together, they reach the PACS over one association.
    dest = Destination(free_port())  # not started: the PACS is down
    config = node_config(
        tmp_path, model, dest.port, workers=0, job_attempts=3, delivery_attempts=1
    )
    port = run_serve(config)  # receives and schedules; no worker threads
    studies = [make_ct(rows=64, columns=64, seed=40 + i) for i in range(10)]
    bad = studies[9]
    bad.PixelData = bad.PixelData[:100]
    assert store_datasets(port, studies) == [0] * 10
    wait_for(lambda: status(config)["jobs"]["pending"] == 10, 30, "10 queued jobs")
    toml = write_toml(tmp_path, config)
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        worker = worker_process(toml, stderr)
        try:
            wait_for(lambda: status(config)["jobs"]["failed"] == 1, 60, "bad job")
            wait_for(lambda: status(config)["deliveries"]["dead"] == 9, 60, "9 dead")
            dest.start()
            revived = run_cli("retry", "--dead", "--config", str(toml))
            assert "9 dead delivery(ies) queued again" in revived.stdout
            wait_for(lambda: status(config)["deliveries"]["done"] == 9, 60, "sent")
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            dest.stop()
    failed = status(config)["failed_jobs"][0]
    assert failed["attempts"] == 1
    assert failed["reason"] == (
        "cannot decode Pixel Data (ValueError); "
        "not retried: the same stored images would fail again"
    )
    text = log.read_text()
    assert text.count("a batch of") == 1
    assert "a batch of 2 studies failed; scoring them one by one" in text
    assert len(dest.associations) == 1
    assert len(dest.received) == 27  # per study an SR and a capture per label
    classifier = Classifier(ModelArtifact.load(model), device="cpu")
    srs = {str(ds.StudyInstanceUID): ds for ds in dest.received if ds.Modality == "SR"}
    assert set(srs) == {str(s.StudyInstanceUID) for s in studies if s is not bad}
    for source in studies:
        if source is bad:
            continue
        alone = classifier.predict([source]).labels
        measured = [
            float(item.MeasuredValueSequence[0].NumericValue)
            for item in _content_items(srs[str(source.StudyInstanceUID)])
            if item.ValueType == "NUM"
        ]
        assert measured == pytest.approx(
            [round(100 * p.probability, 2) for p in alone], abs=0.011
        )


def _content_items(ds: Any) -> list[Any]:
    found = []
    for item in ds.get("ContentSequence", []):
        found.append(item)
        found.extend(_content_items(item))
    return found


@pytest.mark.parametrize(("configured", "threads"), [(0, 1), (0, 2), (3, 2)])
def test_scoring_leaves_a_core_to_the_node_and_gives_torch_back_when_stopped(
    tmp_path: Path, model: Path, configured: int, threads: int
) -> None:
    config = node_config(tmp_path, model, free_port(), torch_threads=configured)
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    index = open_index(config)
    workers = start_workers(config, index, threads)
    try:
        # Automatic: the cores less one, shared by the threads' forward passes.
        expected = configured or max(1, (cores - 1) // threads)
        assert torch.get_num_threads() == expected
    finally:
        workers.stop()
        index.close()
    assert torch.get_num_threads() == before


def _nice(thread: threading.Thread) -> int:
    assert thread.native_id is not None
    return os.getpriority(os.PRIO_PROCESS, thread.native_id)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux threads")
@pytest.mark.parametrize("steps", [0, 5])
def test_scoring_threads_run_below_the_nodes_other_threads(
    tmp_path: Path, model: Path, steps: int
) -> None:
    config = node_config(tmp_path, model, free_port(), scoring_nice=steps)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    index = open_index(config)
    workers = start_workers(config, index, 2)
    try:
        named = {t.name: t for t in threading.enumerate()}
        scoring = [named["worker-1"], named["worker-2"]]
        others = [named["worker-1-results"], named["worker-2-results"]]
        others.append(named["outbox"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
            _nice(t) != min(19, base + steps) for t in scoring
        ):
            time.sleep(0.05)  # each thread lowers itself when it starts
        assert [_nice(t) for t in scoring] == [min(19, base + steps)] * 2
        assert [_nice(t) for t in others] == [base] * 3
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    finally:
        workers.stop()
        index.close()


def test_a_node_and_a_worker_whose_configs_spell_the_model_path_differently_agree(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    (tmp_path / "models").mkdir()
    shutil.copy(model, tmp_path / "models" / "chest.safetensors")
    # serve names it one way (as --config /etc/dicom-node/node.toml would) ...
    spelled = tmp_path / "models" / ".." / "models" / "chest.safetensors"
    config = node_config(tmp_path, spelled, destination.port, workers=0)
    port = run_serve(config)  # receives and schedules; no worker threads
    # ... the worker another: --config node.toml, from the file's own folder.
    toml = write_toml(tmp_path, config)
    toml.write_text(
        toml.read_text().replace(
            f'path = "{spelled}"', 'path = "models/chest.safetensors"'
        )
    )
    worker = subprocess.Popen(
        dicom_node_cmd("worker", "--config", "node.toml"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert store_datasets(port, ct_study()) == [0, 0]
        wait_for(lambda: status(config)["deliveries"]["done"] == 1, 90, "delivery")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    figures = status(config)
    assert figures["jobs"]["done"] == 1
    assert figures["jobs"]["failed"] == 0


def test_a_model_moved_to_another_path_goes_on_counting_its_runs(
    tmp_path: Path, model: Path, destination: Destination
) -> None:
    study = ct_study(3)
    first = node_config(tmp_path, model, destination.port)
    with running_node(first) as port:
        store_datasets(port, study[:2])
        wait_for(lambda: status(first)["deliveries"]["done"] == 1, 60, "run 1 sent")
    results = first.state_dir / "results"
    (run_1,) = [p.parent for p in results.glob("*/*/sr.dcm")]  # <study>/<run>
    assert not list(results.glob(".early/*/*")), "a prepared set left at stop"
    delivered = {p.name: p.read_bytes() for p in run_1.iterdir()}

    moved = tmp_path / "renamed" / "model.safetensors"
    moved.parent.mkdir()
    shutil.move(model, moved)
    second = node_config(tmp_path, moved, destination.port)
    with running_node(second) as port:
        store_datasets(port, study[2:])
        wait_for(lambda: status(second)["deliveries"]["done"] == 2, 60, "run 2 sent")

    folders = sorted(p.parent.name for p in results.glob("*/*/sr.dcm"))
    device_uid = ModelArtifact.load(moved).device_uid
    assert folders == [f"{device_uid}-run1", f"{device_uid}-run2"]
    assert {p.name: p.read_bytes() for p in run_1.iterdir()} == delivered
    srs = [ds for ds in destination.received if ds.Modality == "SR"]
    assert len({ds.SOPInstanceUID for ds in srs}) == 2
    cited = srs[1].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert cited.SeriesInstanceUID == srs[0].SeriesInstanceUID
    assert cited.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        srs[0].SOPInstanceUID
    )
