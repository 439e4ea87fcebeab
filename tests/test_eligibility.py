"""What gets scored: image storage instances a model accepts, in node and offline."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from dicom_node.config import DestinationConfig, ModelConfig, NodeConfig
from dicom_node.dimse import SUCCESS
from dicom_node.eligibility import image_storage_problem
from dicom_node.scp import storage_sop_classes
from tests.factories import corpus_file, dcmtk, make_artifact, make_ct
from tests.helpers import (
    Destination,
    make_config,
    run_cli,
    status,
    store_datasets,
    wait_for,
)

RETIRED_US_IMAGE = "1.2.840.10008.5.1.4.1.1.6"
RETIRED_US_MULTI_FRAME = "1.2.840.10008.5.1.4.1.1.3"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
GRAYSCALE_PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"

IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.2.1": "enhanced CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "legacy converted enhanced CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.4.1": "enhanced MR",
    "1.2.840.10008.5.1.4.1.1.4.4": "legacy converted enhanced MR",
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
    "1.2.840.10008.5.1.4.1.1.1.2": "MG",
    "1.2.840.10008.5.1.4.1.1.1.3": "IO",
    "1.2.840.10008.5.1.4.1.1.6.1": "US",
    "1.2.840.10008.5.1.4.1.1.3.1": "US multi-frame",
    RETIRED_US_IMAGE: "US (retired)",
    RETIRED_US_MULTI_FRAME: "US multi-frame (retired)",
    "1.2.840.10008.5.1.4.1.1.6.2": "enhanced US volume",
    "1.2.840.10008.5.1.4.1.1.20": "NM",
    "1.2.840.10008.5.1.4.1.1.5": "NM (retired)",
    "1.2.840.10008.5.1.4.1.1.128": "PET",
    "1.2.840.10008.5.1.4.1.1.130": "enhanced PET",
    "1.2.840.10008.5.1.4.1.1.12.1": "XA",
    "1.2.840.10008.5.1.4.1.1.12.2": "RF",
    "1.2.840.10008.5.1.4.1.1.12.1.1": "enhanced XA",
    "1.2.840.10008.5.1.4.1.1.13.1.3": "breast tomosynthesis",
    "1.2.840.10008.5.1.4.1.1.77.1.1": "VL endoscopic",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL photographic",
    "1.2.840.10008.5.1.4.1.1.77.1.6": "VL whole slide microscopy",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "multi-frame single bit SC",
    "1.2.840.10008.5.1.4.1.1.7.2": "multi-frame grayscale byte SC",
    "1.2.840.10008.5.1.4.1.1.7.3": "multi-frame grayscale word SC",
    "1.2.840.10008.5.1.4.1.1.7.4": "multi-frame true colour SC",
}
NOT_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "not an image: Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.5": "not an image: Surface Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.481.2": "not an image: RT Dose Storage",
    "1.2.840.10008.5.1.4.1.1.481.3": "not an image: RT Structure Set Storage",
    "1.2.840.10008.5.1.4.1.1.481.5": "not an image: RT Plan Storage",
    "1.2.840.10008.5.1.4.1.1.481.1": "not a diagnostic image: RT Image Storage",
    "1.2.840.10008.5.1.4.1.1.88.11": "not an image: Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "not an image: Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "not an image: Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "not an image: Comprehensive 3D SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.67": "not an image: X-Ray Radiation Dose SR Storage",
    KEY_OBJECT_SELECTION: "not an image: Key Object Selection Document Storage",
    GRAYSCALE_PRESENTATION_STATE: (
        "not an image: Grayscale Softcopy Presentation State Storage"
    ),
    "1.2.840.10008.5.1.4.1.1.11.2": (
        "not an image: Color Softcopy Presentation State Storage"
    ),
    "1.2.840.10008.5.1.4.1.1.30": "not an image: Parametric Map Storage",
    "1.2.840.10008.5.1.4.1.1.67": "not an image: Real World Value Mapping Storage",
    "1.2.840.10008.5.1.4.1.1.104.1": "not an image: Encapsulated PDF Storage",
    "1.2.840.10008.5.1.4.1.1.104.2": "not an image: Encapsulated CDA Storage",
    "1.2.840.10008.5.1.4.1.1.66": "not an image: Raw Data Storage",
    "1.2.840.10008.5.1.4.1.1.66.1": "not an image: Spatial Registration Storage",
    "1.2.840.10008.5.1.4.1.1.66.3": (
        "not an image: Deformable Spatial Registration Storage"
    ),
    "1.2.840.10008.5.1.4.1.1.9.1.1": "not an image: 12-lead ECG Waveform Storage",
    "1.2.840.10008.5.1.1.29": (
        "not a diagnostic image: Hardcopy Grayscale Image Storage SOP Class"
    ),
    "1.2.3.4.5": "not an image: unknown SOP class 1.2.3.4.5",
    "": "not an image: no valid SOP Class UID",
    "CT Image Storage": "not an image: no valid SOP Class UID",
}


@pytest.mark.parametrize("sop_class_uid", sorted(IMAGE_CLASSES))
def test_image_storage_classes_are_scored(sop_class_uid: str) -> None:
    assert image_storage_problem(sop_class_uid) == "", IMAGE_CLASSES[sop_class_uid]


@pytest.mark.parametrize("sop_class_uid", sorted(NOT_IMAGE_CLASSES))
def test_other_classes_are_not_scored_and_the_reason_names_the_class(
    sop_class_uid: str,
) -> None:
    assert image_storage_problem(sop_class_uid) == NOT_IMAGE_CLASSES[sop_class_uid]


def test_every_class_the_receiver_accepts_is_named_image_or_not() -> None:
    accepted = storage_sop_classes()
    assert RETIRED_US_IMAGE in accepted
    assert RETIRED_US_MULTI_FRAME in accepted
    for uid in accepted:
        problem = image_storage_problem(uid)
        assert problem == "" or problem.endswith(UID(uid).name), uid


# --- the node -----------------------------------------------------------------


def node_config(tmp_path: Path, model: Path, port: int, **overrides: Any) -> NodeConfig:
    settings: dict[str, Any] = {
        "stable_after": 0.3,
        "models": (ModelConfig(model),),
        "destinations": (DestinationConfig("pacs", "DEST", "127.0.0.1", port),),
        "retry_after": 0.2,
        "retry_max": 0.5,
    }
    settings.update(overrides)
    return make_config(tmp_path, **settings)


def into_study(ds: Dataset, study_uid: str, sop_class_uid: str = "") -> Dataset:
    """File a real corpus instance under ``study_uid`` (a new series and instance).

    With ``sop_class_uid``, the instance is relabelled as that class (SOP Class
    UID and File Meta): the corpus has no KO or Presentation State file, and
    the node decides by the class it is told.
    """
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if sop_class_uid:
        ds.SOPClassUID = UID(sop_class_uid)
        ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    return ds


def non_images(study_uid: str) -> list[Dataset]:
    """Real SEG, RT Dose and SR files, and KO and PR made from a real SR."""
    return [
        into_study(dcmread(corpus_file("liver_1frame.dcm")), study_uid),
        into_study(dcmread(corpus_file("rtdose_1frame.dcm")), study_uid),
        into_study(dcmread(corpus_file("reportsi.dcm")), study_uid),
        into_study(
            dcmread(corpus_file("reportsi.dcm")), study_uid, KEY_OBJECT_SELECTION
        ),
        into_study(
            dcmread(corpus_file("reportsi.dcm")),
            study_uid,
            GRAYSCALE_PRESENTATION_STATE,
        ),
    ]


def test_a_study_of_only_non_images_is_stored_but_not_scored(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    config = node_config(tmp_path, model, destination.port)
    port = run_serve(config)
    study = non_images(generate_uid())

    assert store_datasets(port, study) == [SUCCESS] * 5

    wait_for(lambda: status(config)["jobs"]["skipped"] == 1, 60, "skipped job")
    figures = status(config)
    assert figures["instances"] == 5
    assert figures["results"] == 0
    reason = figures["failed_jobs"][0]["reason"] or ""
    assert reason.startswith("no image the model accepts")
    for name in (
        "Segmentation Storage",
        "RT Dose Storage",
        "Basic Text SR Storage",
        "Key Object Selection Document Storage",
        "Grayscale Softcopy Presentation State Storage",
    ):
        assert f"not an image: {name}" in reason
    assert destination.received == []


def test_a_study_mixing_an_image_and_a_segmentation_scores_only_the_image(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    config = node_config(tmp_path, model, destination.port)
    port = run_serve(config)
    ct = make_ct()
    seg = into_study(dcmread(corpus_file("liver_1frame.dcm")), ct.StudyInstanceUID)

    assert store_datasets(port, [ct, seg]) == [SUCCESS, SUCCESS]

    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "delivery done")
    sr = next(ds for ds in destination.received if ds.Modality == "SR")
    assert sr.StudyInstanceUID == ct.StudyInstanceUID
    assert str(ct.SOPInstanceUID) in str(sr)
    assert str(seg.SOPInstanceUID) not in str(sr)
    captures = [ds for ds in destination.received if ds.Modality != "SR"]
    assert captures
    for capture in captures:
        source = capture.SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == ct.SOPInstanceUID


def referenced_classes(ds: Dataset) -> set[str]:
    """Return every Referenced SOP Class UID in a data set, nested ones included."""
    found: set[str] = set()

    def walk(item: Dataset) -> None:
        for element in item:
            if element.keyword == "ReferencedSOPClassUID":
                found.add(str(element.value))
            elif element.VR == "SQ":
                for nested in element.value:
                    walk(nested)

    walk(ds)
    return found


def test_a_retired_ultrasound_instance_from_storescu_is_stored_and_scored(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    # pydicom's US image relabelled as the retired Ultrasound Image Storage class
    # (SOP Class UID and File Meta), as an old archive sends it. (pydicom-data's
    # real retired-class file, color-px.dcm, carries UIDs that are not valid,
    # which its results would reference; test_scp stores it as it is.)
    us = dcmread(corpus_file("US1_UNCR.dcm"))
    us.SOPClassUID = UID(RETIRED_US_IMAGE)
    us.file_meta.MediaStorageSOPClassUID = UID(RETIRED_US_IMAGE)
    source = tmp_path / "retired-us.dcm"
    us.save_as(source, enforce_file_format=True)
    config = node_config(tmp_path, model, destination.port)
    port = run_serve(config)

    sent = subprocess.run(
        [
            dcmtk("storescu"),
            # -R: propose the file's own class (storescu's default list has no
            # retired class), as an old archive does.
            *("-v", "-R", "-aec", "DICOMNODE", "127.0.0.1", str(port)),
            str(source),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        timeout=60,
        check=False,
    )

    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "Received Store Response (Success)" in sent.stdout + sent.stderr
    stored = config.storage_dir / us.StudyInstanceUID / us.SeriesInstanceUID
    assert dcmread(stored / f"{us.SOPInstanceUID}.dcm").SOPClassUID == RETIRED_US_IMAGE
    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "delivery done")
    sr = next(ds for ds in destination.received if ds.Modality == "SR")
    assert sr.StudyInstanceUID == us.StudyInstanceUID
    assert str(us.SOPInstanceUID) in str(sr)
    # The report's references name the source as what it is.
    assert RETIRED_US_IMAGE in referenced_classes(sr)


# --- dicom-node score -----------------------------------------------------------


@pytest.fixture
def dx_model(tmp_path: Path) -> Path:
    """A model file that accepts only DX images (its ``accepts``)."""
    path = tmp_path / "dx.safetensors"
    artifact = make_artifact()
    artifact.accepts = {"modalities": ["DX"], "body_parts": [], "sop_classes": []}
    artifact.labels = tuple(replace(label, threshold=0.0) for label in artifact.labels)
    artifact.save(path)
    return path


@pytest.fixture
def mixed_folder(tmp_path: Path) -> dict[str, Dataset]:
    """A CT and a real US image, a real SEG and a real RT Dose, in one folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    files = {
        "ct": make_ct(),
        "us": dcmread(corpus_file("US1_UNCR.dcm")),
        "seg": dcmread(corpus_file("liver_1frame.dcm")),
        "rtdose": dcmread(corpus_file("rtdose_1frame.dcm")),
    }
    for name, ds in files.items():
        ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
    return files


def score(
    tmp_path: Path, model: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "out"
    return run_cli(
        "score",
        "--model",
        str(model),
        str(tmp_path / "in"),
        "--out",
        str(out),
        *options,
    )


NEVER_SCORED = {
    "not an image: Segmentation Storage": 1,
    "not an image: RT Dose Storage": 1,
}


def test_score_passes_over_images_the_model_does_not_accept_and_says_why(
    tmp_path: Path, dx_model: Path, mixed_folder: dict[str, Dataset]
) -> None:
    done = score(tmp_path, dx_model, "--json")

    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["studies"] == []
    assert report["accepts"]["modalities"] == ["DX"]
    assert report["passed_over"] == {"modality not in ['DX']": 2, **NEVER_SCORED}
    assert "nothing to score: no image the model accepts" in done.stderr
    assert "modality not in ['DX']: 2 file(s)" in done.stderr
    assert "not an image: Segmentation Storage: 1 file(s)" in done.stderr
    assert "--any-image" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options", [("--modality", "CT", "--modality", "us"), ("--any-image",)]
)
def test_score_options_replace_the_models_accepts_but_never_score_non_images(
    tmp_path: Path,
    dx_model: Path,
    mixed_folder: dict[str, Dataset],
    options: tuple[str, ...],
) -> None:
    done = score(tmp_path, dx_model, *options)

    assert done.returncode == 0, done.stderr
    for name in ("ct", "us"):
        study = str(mixed_folder[name].StudyInstanceUID)
        assert f"study {study} (1 image(s))" in done.stdout
        assert (tmp_path / "out" / study / "sr.dcm").is_file()
    for name in ("seg", "rtdose"):
        assert not (
            tmp_path / "out" / str(mixed_folder[name].StudyInstanceUID)
        ).exists()
    assert "passed over 2 file(s):" in done.stdout
    assert "1  not an image: Segmentation Storage" in done.stdout
    assert "1  not an image: RT Dose Storage" in done.stdout


def test_score_of_only_non_images_fails_naming_them(
    tmp_path: Path, model: Path, mixed_folder: dict[str, Dataset]
) -> None:
    for name in ("ct", "us"):
        (tmp_path / "in" / f"{name}.dcm").unlink()

    done = score(tmp_path, model, "--any-image", "--json")

    assert done.returncode == 1
    assert json.loads(done.stdout)["passed_over"] == NEVER_SCORED
    assert "not an image: RT Dose Storage: 1 file(s)" in done.stderr
    assert "--any-image" not in done.stderr  # no option would change it


def test_score_help_explains_the_accepts_options() -> None:
    shown = run_cli("score", "--help")

    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    for option in ("--modality", "--body-part", "--sop-class", "--any-image"):
        assert option in text
    assert "instead of the modalities the model accepts" in text
    assert "never SEG, RT, SR, KO, PR" in text


def test_score_refuses_a_sop_class_that_is_not_a_uid(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()

    done = score(tmp_path, tmp_path / "model.safetensors", "--sop-class", "CT")

    assert done.returncode == 2
    assert "--sop-class" in done.stderr


def test_score_names_a_truncated_file_as_damaged(
    tmp_path: Path, model: Path, mixed_folder: dict[str, Dataset]
) -> None:
    """pydicom reads a file that ends inside a sequence without raising, and keeps
    no Pixel Data: that read "no pixel data"."""
    folder = tmp_path / "in"
    for name in ("us", "seg", "rtdose"):
        (folder / f"{name}.dcm").unlink()
    ds = mixed_folder["ct"]
    item = Dataset()
    item.PatientID = "X"
    ds.SharedFunctionalGroupsSequence = [item]  # written of undefined length
    ds.save_as(folder / "ct.dcm", enforce_file_format=True)
    whole = (folder / "ct.dcm").read_bytes()
    inside = whole.index(bytes.fromhex("0052 2992")) + 16  # (5200,9229), then a bit
    (folder / "ct.dcm").write_bytes(whole[:inside])

    done = score(tmp_path, model, "--any-image", "--json")

    assert done.returncode == 1
    assert json.loads(done.stdout)["passed_over"] == {
        "an image without pixel data: the file is damaged or truncated": 1
    }
