"""medtrain's data layer: manifests that name their bad rows, patient-level splits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import PreprocessSpec
from training.cli import main
from training.data import (
    DataError,
    Sample,
    load_samples,
    preprocessed,
    split_by_patient,
)

SPEC = PreprocessSpec(size=(32, 32))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "dx"
    assert main(["synth", str(out), "--n", "40", "--seed", "11", "--size", "64"]) == 0
    return out


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_synth_output_loads_as_a_manifest(synthetic: Path) -> None:
    samples = load_samples(synthetic)

    assert len(samples) == 40
    assert {s.label for s in samples} == {"nodule", "normal"}
    assert all(s.path.is_file() for s in samples)
    assert all((s.mask is not None) == (s.label == "nodule") for s in samples)


def test_split_has_no_patient_in_two_splits_and_is_reproducible(
    synthetic: Path,
) -> None:
    samples = load_samples(synthetic)

    split = split_by_patient(samples, (0.6, 0.2, 0.2), seed=3)

    patients = {name: {s.patient_id for s in items} for name, items in split.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(v) for v in split.values()) == 40
    for name in ("train", "val", "test"):  # stratified: every split sees both
        assert {s.label for s in split[name]} == {"nodule", "normal"}, name
    assert split_by_patient(samples, (0.6, 0.2, 0.2), seed=3) == split
    assert split_by_patient(samples, (0.6, 0.2, 0.2), seed=4) != split


def test_fixed_splits_are_kept(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image)
    samples = [Sample(image, "x", "p1", "test"), Sample(image, "y", "p2", "")]

    split = split_by_patient(samples, (1.0, 0.0, 0.0), seed=0)

    assert [s.patient_id for s in split["test"]] == ["p1"]
    with pytest.raises(DataError, match="p1"):
        split_by_patient(
            [*samples, Sample(image, "x", "p1", "val")], (1.0, 0.0, 0.0), 0
        )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"path": "missing.png", "label": "a"}, "row 3: file 'missing.png' not found"),
        ({"path": "img.png", "label": ""}, "row 3: unknown label ''"),
        ({"path": "img.png", "label": "a", "split": "holdout"}, "row 3: split must be"),
    ],
)
def test_bad_manifest_rows_are_named(
    tmp_path: Path, row: dict[str, str], message: str
) -> None:
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "img.png")
    good = {"path": "img.png", "label": "a", "split": ""}
    manifest = write_manifest(tmp_path / "m.csv", [good, {**good, **row}])

    with pytest.raises(DataError, match=message):
        load_samples(manifest)


def test_class_tree_and_empty_class(tmp_path: Path) -> None:
    for name in ("normal", "nodule"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((8, 8), 9, dtype=np.uint8)).save(
            tmp_path / name / "1.png"
        )

    assert sorted(s.label for s in load_samples(tmp_path)) == ["nodule", "normal"]
    (tmp_path / "effusion").mkdir()
    with pytest.raises(DataError, match="'effusion' holds no image"):
        load_samples(tmp_path)


def test_preprocessing_is_cached_by_content_and_spec(
    synthetic: Path, tmp_path: Path
) -> None:
    sample = load_samples(synthetic)[0]
    cache = tmp_path / "cache"

    first = preprocessed(sample, SPEC, cache)
    again = preprocessed(sample, SPEC, cache)
    other = preprocessed(sample, PreprocessSpec(size=(48, 48)), cache)

    torch.testing.assert_close(first, again)
    assert first.shape == (1, 1, 32, 32)
    assert other.shape == (1, 1, 48, 48)
    assert len(list(cache.glob("*.npy"))) == 2


def test_png_goes_through_the_same_preprocessing(tmp_path: Path) -> None:
    gradient = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    Image.fromarray(gradient).save(tmp_path / "g.png")

    frames = preprocessed(
        Sample(tmp_path / "g.png", "x", "p"),
        PreprocessSpec(size=(64, 64), mean=(0.0,), std=(1.0,)),
        None,
    )

    assert frames.shape == (1, 1, 64, 64)
    assert frames[0, 0, 0, 0] == 0.0  # min-max: the darkest column is 0
    assert frames[0, 0, 0, -1] == 1.0
