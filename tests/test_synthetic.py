"""medtrain synth: valid DICOM (dciodvfy), truthful labels and masks, reproducible."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from inference import PreprocessSpec
from inference.preprocess import preprocess
from tests.factories import dcmtk
from training.cli import main


def read_labels(out: Path) -> list[dict[str, str]]:
    with (out / "labels.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("modality", ["DX", "CT"])
def test_synth_writes_valid_dicom_with_labels_and_masks(
    tmp_path: Path, modality: str
) -> None:
    out = tmp_path / modality

    assert (
        main(
            [
                "synth",
                str(out),
                "--n",
                "12",
                "--seed",
                "3",
                "--modality",
                modality,
                "--size",
                "96",
            ]
        )
        == 0
    )

    rows = read_labels(out)
    assert len(rows) == 12
    assert sorted({r["label"] for r in rows}) == ["nodule", "normal"]
    assert sum(r["label"] == "nodule" for r in rows) == 6  # prevalence 0.5
    patients = {r["patient_id"] for r in rows}
    assert len(patients) < 12  # patients have several studies
    syntaxes = set()
    for row in rows:
        ds = dcmread(out / row["path"])
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        assert ds.Modality == modality
        assert ds.PatientID == row["patient_id"]
        assert ds.StudyInstanceUID == row["study_uid"]
        assert ds.pixel_array.shape == (96, 96)
        result = subprocess.run(
            [dcmtk("dciodvfy"), str(out / row["path"])],
            capture_output=True,
            text=True,
            check=False,
        )
        problems = [
            line
            for line in result.stderr.splitlines()
            if line.startswith(("Error", "Warning"))
        ]
        assert problems == [], row["path"]
        if row["label"] == "nodule":
            mask = np.array(Image.open(out / row["mask"])) > 0
            assert mask.shape == (96, 96)
            assert 0 < mask.sum() < 0.05 * mask.size
        else:
            assert row["mask"] == ""
    assert len(syntaxes) >= 2  # some instances are compressed


def test_nodule_is_brighter_than_its_surroundings(tmp_path: Path) -> None:
    # The truth must be in the pixels: inside the mask, the windowed image is
    # brighter than in a ring around it (subtle: a few percent of the range).
    out = tmp_path / "dx"
    assert (
        main(
            [
                "synth",
                str(out),
                "--n",
                "10",
                "--seed",
                "5",
                "--size",
                "128",
                "--prevalence",
                "1",
            ]
        )
        == 0
    )
    spec = PreprocessSpec(size=(128, 128), mean=(0.0,), std=(1.0,))
    contrasts = []
    for row in read_labels(out):
        image = preprocess(dcmread(out / row["path"]), spec).pixels[0, 0].numpy()
        mask = np.array(Image.open(out / row["mask"])) > 0
        from scipy.ndimage import binary_dilation  # type: ignore[import-untyped]

        ring = binary_dilation(mask, iterations=4) & ~binary_dilation(
            mask, iterations=1
        )
        contrasts.append(float(image[mask].mean() - image[ring].mean()))
    assert min(contrasts) > 0.01
    assert np.mean(contrasts) > 0.03


def test_same_seed_same_data(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert (
            main(
                [
                    "synth",
                    str(tmp_path / name),
                    "--n",
                    "4",
                    "--seed",
                    "9",
                    "--size",
                    "64",
                ]
            )
            == 0
        )
    a, b = read_labels(tmp_path / "a"), read_labels(tmp_path / "b")
    assert a == b  # labels, patients and UIDs
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(
            dcmread(tmp_path / "a" / ra["path"]).pixel_array,
            dcmread(tmp_path / "b" / rb["path"]).pixel_array,
        )


def test_synth_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "x"), "--n", "0"])
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "x"), "--n", "2", "--prevalence", "1.5"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["synth", str(tmp_path / "full"), "--n", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
