"""End to end with a real PACS: Orthanc sends a study, the node returns SR and SC."""

from __future__ import annotations

import io
import json
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.config import CallerConfig, DestinationConfig, ModelConfig, NodeConfig
from dicom_node.demo.pacs import Orthanc, find_orthanc
from dicom_node.index import Delivery
from dicom_node.service import open_index
from tests.factories import corpus_file, make_artifact, make_ct
from tests.helpers import (
    free_port,
    make_config,
    status,
    wait_for,
    worker_process,
    write_toml,
)

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    find_orthanc() is None, reason="Orthanc not installed (.ci/setup-system.sh)"
)


@pytest.mark.parametrize("source", ["DX sample", "CR chest (pydicom-data)"])
def test_orthanc_sends_a_study_and_finds_the_results_in_it(
    source: str, tmp_path: Path, run_serve: Callable[[NodeConfig], int]
) -> None:
    model = tmp_path / "model.safetensors"
    artifact = make_artifact()  # both findings present: a Grad-CAM image each
    artifact.labels = tuple(replace(label, threshold=0.0) for label in artifact.labels)
    artifact.save(model)
    node_port = free_port()
    binary = find_orthanc()
    assert binary is not None
    pacs = Orthanc(
        binary,
        tmp_path / "orthanc",
        modalities={"node": ["DICOMNODE", "127.0.0.1", node_port]},
        ae_title="ORTHANC",
    )
    pacs.start()
    try:
        config = make_config(
            tmp_path,
            port=node_port,
            stable_after=0.5,
            callers=(CallerConfig("ORTHANC", "127.0.0.1"),),
            destinations=(
                DestinationConfig("orthanc", "ORTHANC", "127.0.0.1", pacs.port),
            ),
            models=(ModelConfig(model),),
        )
        run_serve(config)
        path = (
            next((REPO / "sample_dicoms" / "dx" / "dicom").rglob("*.dcm"))
            if source == "DX sample"
            else corpus_file("RG1_UNCR.dcm")  # a real chest CR, 1760 x 2140
        )
        uploaded = json.loads(pacs.request("/instances", path.read_bytes()))
        study_id = uploaded["ParentStudy"]
        sent = json.loads(
            pacs.request("/modalities/node/store", json.dumps(study_id).encode())
        )
        assert sent.get("FailedInstancesCount", 0) == 0, sent

        def series_by_modality() -> dict[str, list[str]]:
            found: dict[str, list[str]] = {}
            for series in pacs.get(f"/studies/{study_id}/series"):
                modality = series["MainDicomTags"].get("Modality", "")
                found.setdefault(modality, []).extend(series["Instances"])
            return found

        wait_for(
            lambda: {"SR", "OT"} <= set(series_by_modality()),
            60,
            "SR and SC in Orthanc",
        )
        wait_for(lambda: status(config)["deliveries"]["done"] == 1, 10, "delivery")
        instances = series_by_modality()
        assert len(instances["SR"]) == 1
        assert len(instances["OT"]) == 2  # one Grad-CAM image per label
        for modality in ("SR", "OT"):
            for instance in instances[modality]:
                path = tmp_path / f"{instance}.dcm"
                path.write_bytes(pacs.request(f"/instances/{instance}/file"))
                checked = subprocess.run(
                    ["/usr/bin/dciodvfy", "-new", str(path)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert "Error" not in checked.stdout + checked.stderr, modality
        sr = hd.sr.srread(tmp_path / f"{instances['SR'][0]}.dcm")
        report = sr.content
        assert isinstance(report, hd.sr.MeasurementReport)
        # A positive finding is a TID 1410 group (a point where the model
        # looked), a negative one a TID 1501 group.
        groups = [
            *report.get_image_measurement_groups(),
            *report.get_planar_roi_measurement_groups(),
        ]
        findings = {g.finding_type.meaning: g for g in groups if g.finding_type}
        assert set(findings) == {"Nodule", "Pleural effusion"}
        nodule = findings["Nodule"]
        probability = nodule.get_measurements()[0]
        assert probability.name.meaning == "Probability"
        assert 0.0 <= probability.value <= 100.0
        evaluation = nodule.get_qualitative_evaluations()[0]
        meaning = evaluation[0].ConceptCodeSequence[0].CodeMeaning
        assert meaning in ("Present", "Absent")
    finally:
        pacs.stop()


def _orthanc(tmp_path: Path, node_port: int) -> Orthanc:
    binary = find_orthanc()
    assert binary is not None
    return Orthanc(
        binary,
        tmp_path / "orthanc",
        modalities={"node": ["DICOMNODE", "127.0.0.1", node_port]},
        ae_title="ORTHANC",
    )


def _node_config(
    tmp_path: Path, node_port: int, pacs: Orthanc, **more: Any
) -> NodeConfig:
    settings: dict[str, Any] = {
        "port": node_port,
        "stable_after": 0.5,
        "callers": (CallerConfig("ORTHANC", "127.0.0.1"),),
        "destinations": (
            DestinationConfig("orthanc", "ORTHANC", "127.0.0.1", pacs.port),
        ),
        "models": (ModelConfig(tmp_path / "model.safetensors"),),
        "retry_after": 0.2,
        "retry_max": 0.5,
    }
    settings.update(more)
    return make_config(tmp_path, **settings)


def _upload(pacs: Orthanc, datasets: Sequence[Dataset]) -> str:
    """Store a study in Orthanc through its REST API; return Orthanc's study ID."""
    study_id = ""
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        study_id = json.loads(pacs.request("/instances", buffer.getvalue()))[
            "ParentStudy"
        ]
    return study_id


def _send_to_node(pacs: Orthanc, study_id: str) -> None:
    sent = json.loads(
        pacs.request(
            "/modalities/node/store", json.dumps(study_id).encode(), timeout=120
        )
    )
    assert sent.get("FailedInstancesCount", 0) == 0, sent


def _instances(pacs: Orthanc, study_id: str) -> dict[str, list[str]]:
    """Modality -> Orthanc instance IDs of that study."""
    found: dict[str, list[str]] = {}
    for series in pacs.get(f"/studies/{study_id}/series"):
        modality = series["MainDicomTags"].get("Modality", "")
        found.setdefault(modality, []).extend(series["Instances"])
    return found


def _deliveries(config: NodeConfig) -> list[tuple[str, int, str | None]]:
    index = open_index(config)
    try:
        return index.run(
            lambda session: [
                (str(state), int(attempts), error)
                for state, attempts, error in session.execute(
                    select(Delivery.state, Delivery.attempts, Delivery.last_error)
                )
            ]
        )
    finally:
        index.close()


def test_orthanc_down_gets_the_results_once_it_is_back(
    tmp_path: Path, run_serve: Callable[[NodeConfig], int]
) -> None:
    make_artifact().save(tmp_path / "model.safetensors")
    node_port = free_port()
    pacs = _orthanc(tmp_path, node_port)
    pacs.start()
    try:
        # Stable after 4 s: Orthanc is surely down before the results exist.
        config = _node_config(
            tmp_path, node_port, pacs, delivery_attempts=100, stable_after=4.0
        )
        run_serve(config)
        study = [make_ct(rows=64, columns=64, seed=21)]
        study_id = _upload(pacs, study)
        _send_to_node(pacs, study_id)
        pacs.stop()  # the PACS goes down before the results are ready

        def retried() -> bool:
            return any(a >= 2 and s == "pending" for s, a, _ in _deliveries(config))

        wait_for(retried, 60, "a delivery retried while Orthanc is down")
        ((_, _, error),) = _deliveries(config)
        assert error is not None
        assert "association failed" in error

        pacs.start(keep=True)  # back, with what it stored before
        wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "delivery")
        instances = _instances(pacs, study_id)
        assert len(instances["CT"]) == 1
        assert len(instances["SR"]) == 1  # one result set
        assert len(instances["OT"]) == 2
    finally:
        pacs.stop()


def test_a_worker_killed_mid_job_puts_one_result_set_in_orthanc(
    tmp_path: Path, run_serve: Callable[[NodeConfig], int]
) -> None:
    # A model big enough, and a study long enough, to kill the worker mid-job.
    make_artifact(size=224).save(tmp_path / "model.safetensors")
    node_port = free_port()
    pacs = _orthanc(tmp_path, node_port)
    pacs.start()
    worker = None
    try:
        config = _node_config(tmp_path, node_port, pacs, workers=0, lease_seconds=30.0)
        run_serve(config)  # receives and schedules; the worker is a process
        first = make_ct(rows=64, columns=64, seed=31)
        study = [first]
        for i in range(1, 24):
            ds = make_ct(rows=64, columns=64, seed=31 + i)
            ds.StudyInstanceUID = first.StudyInstanceUID
            ds.SeriesInstanceUID = first.SeriesInstanceUID
            study.append(ds)
        study_id = _upload(pacs, study)
        _send_to_node(pacs, study_id)
        toml = write_toml(tmp_path, config)
        worker = worker_process(toml)
        wait_for(lambda: status(config)["jobs"]["running"] == 1, 60, "a running job")
        worker.kill()  # SIGKILL: no cleanup, the lease stays
        worker.wait(timeout=10)
        assert status(config)["jobs"]["done"] == 0, "the job ended before the kill"
        worker = worker_process(toml)
        wait_for(lambda: status(config)["deliveries"]["done"] == 1, 90, "delivery")
        instances = _instances(pacs, study_id)
        assert len(instances["CT"]) == 24
        assert len(instances["SR"]) == 1  # one result set, not two
        assert len(instances["OT"]) == 2
        assert status(config)["results"] == 1
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        pacs.stop()


def test_orthanc_whose_port_was_taken_meanwhile_starts_on_another(
    tmp_path: Path,
) -> None:
    binary = find_orthanc()
    assert binary is not None
    pacs = Orthanc(binary, tmp_path / "orthanc")
    taken = pacs.port
    with socket.socket() as squatter:  # takes the port between choice and start
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        pacs.start()
        try:
            assert pacs.port != taken
            assert pacs.get("/system")["DicomPort"] == pacs.port
            assert (
                "already in use" in (tmp_path / "orthanc" / "orthanc.log").read_text()
            )
        finally:
            pacs.stop()
