"""medtrain synth --background: nodules on real radiographs, valid and reproducible."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file

from inference import PreprocessSpec
from inference.preprocess import preprocess
from tests.factories import dcmtk
from training.cli import main
from training.realistic import (
    PYDICOM_DATA,
    background_files,
    draw_lesion,
    draw_view,
    load_backgrounds,
    render,
    synthesize_realistic,
)


def read_labels(out: Path) -> list[dict[str, str]]:
    with (out / "labels.csv").open() as f:
        return list(csv.DictReader(f))


def files_of(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_pixels(tmp_path: Path) -> None:
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        synthesize_realistic(tmp_path / name, 5, seed, PYDICOM_DATA, size=48)

    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert a == b  # labels, UIDs, pixels, masks: byte for byte
    pixels_a = [
        dcmread(tmp_path / "a" / r["path"]).pixel_array
        for r in read_labels(tmp_path / "a")
    ]
    pixels_c = [
        dcmread(tmp_path / "c" / r["path"]).pixel_array
        for r in read_labels(tmp_path / "c")
    ]
    assert all(
        not np.array_equal(pa, pc) for pa, pc in zip(pixels_a, pixels_c, strict=True)
    )


def test_lesion_changes_the_image_inside_its_mask_only() -> None:
    backgrounds = load_backgrounds(background_files(PYDICOM_DATA), 96)
    rng = np.random.default_rng(11)
    for _ in range(8):
        view = draw_view(rng, backgrounds, 96)
        background = backgrounds[view.background]
        plain, no_mask = render(background, view, 96, None)
        lesion = draw_lesion(rng, render(background, view, 96, None)[0])
        with_lesion, mask = render(background, view, 96, lesion)

        assert no_mask is None
        assert mask is not None
        difference = with_lesion - plain
        assert 0 < mask.sum() < 0.05 * mask.size
        assert np.all(difference[~mask] == 0.0)  # nothing outside the mask
        assert np.all(difference[mask] >= 0.0)  # denser inside, never less
        # The window's top clips part of some lesions, never most of one.
        assert difference[mask].mean() > 0.1 * lesion.contrast
        row, column = round(lesion.row), round(lesion.column)
        assert mask[row, column]  # the mask is centred on the lesion


def test_cli_writes_valid_dicom_with_both_labels_and_true_masks(
    tmp_path: Path,
) -> None:
    out = tmp_path / "real"

    code = main(
        [
            "synth",
            str(out),
            "--n",
            "8",
            "--seed",
            "3",
            "--size",
            "64",
            "--background",
            PYDICOM_DATA,
        ]
    )

    assert code == 0
    rows = read_labels(out)
    assert len(rows) == 8
    assert sum(r["label"] == "nodule" for r in rows) == 4  # prevalence 0.5
    assert sum(r["label"] == "normal" for r in rows) == 4
    spec = PreprocessSpec(size=(64, 64), mean=(0.0,), std=(1.0,))
    contrasts = []
    for row in rows:
        path = out / row["path"]
        ds = dcmread(path)
        assert ds.Modality == "DX"
        assert ds.PatientID == row["patient_id"]
        assert ds.pixel_array.shape == (64, 64)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == str(
            dcmread(background_files(PYDICOM_DATA)[0]).SOPInstanceUID
        )
        result = subprocess.run(
            [dcmtk("dciodvfy"), str(path)], capture_output=True, text=True, check=False
        )
        problems = [
            line
            for line in result.stderr.splitlines()
            if line.startswith(("Error", "Warning"))
        ]
        assert problems == [], row["path"]  # not even a warning
        if row["label"] == "normal":
            assert row["mask"] == ""
            continue
        mask = np.asarray(Image.open(out / row["mask"])) > 0
        assert mask.shape == (64, 64)
        assert 0 < mask.sum() < 0.05 * mask.size
        image = preprocess(ds, spec).pixels[0, 0].numpy()
        from scipy.ndimage import binary_dilation  # type: ignore[import-untyped]

        ring = binary_dilation(mask, iterations=3) & ~mask
        contrasts.append(float(image[mask].mean() - image[ring].mean()))
    assert np.mean(contrasts) > 0  # on average the nodule is denser than around it


def test_background_folder_and_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "radiographs"
    (folder / "sub").mkdir(parents=True)
    chest = get_testdata_file("RG1_UNCR.dcm", download=False)
    assert isinstance(chest, str)
    (folder / "sub" / "chest.dcm").symlink_to(chest)
    (folder / "notes.txt").write_text("not DICOM")
    assert background_files(folder) == [folder / "sub" / "chest.dcm"]

    code = main(
        [
            *("synth", str(tmp_path / "out"), "--n", "2", "--size", "40"),
            *("--background", str(folder)),
        ]
    )
    assert code == 0
    assert len(read_labels(tmp_path / "out")) == 2

    assert main(["synth", str(tmp_path / "x"), "--n", "2", "--background", "nope"]) == 1
    assert "background" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(["synth", str(tmp_path / "y"), "--n", "2", "--background", str(empty)])
        == 1
    )
    assert "no DICOM file" in capsys.readouterr().err
    code = main(
        [
            *("synth", str(tmp_path / "z"), "--n", "2", "--modality", "CT"),
            *("--background", PYDICOM_DATA),
        ]
    )
    assert code == 2
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "pydicom-data" in capsys.readouterr().out
