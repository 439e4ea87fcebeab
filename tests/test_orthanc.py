"""End to end with a real PACS: Orthanc sends a study, the node returns SR and SC."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pytest

from dicom_node.config import CallerConfig, DestinationConfig, ModelConfig, NodeConfig
from dicom_node.demo import Orthanc, find_orthanc
from tests.conftest import free_port, make_config, status, wait_for
from tests.factories import make_artifact

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    find_orthanc() is None, reason="Orthanc not installed (scripts/setup-system.sh)"
)


def test_orthanc_sends_a_study_and_finds_the_results_in_it(
    tmp_path: Path, run_serve: Callable[[NodeConfig], int]
) -> None:
    model = tmp_path / "model.safetensors"
    make_artifact().save(model)
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
        source = next((REPO / "sample_dicoms" / "dx" / "dicom").rglob("*.dcm"))
        uploaded = json.loads(pacs.request("/instances", source.read_bytes()))
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
