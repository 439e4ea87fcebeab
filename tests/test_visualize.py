"""`medtrain visualize`: the filters, stage activations, CAM and Grad-CAM of a model."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import build_model
from inference.gradcam import gradcam_full_backward
from tests.factories import make_artifact
from tests.helpers import ct_study
from training.cli import main
from training.visualize import STAGES, stage_maps


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.safetensors"
    make_artifact(size=64).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    dicom = folder / "chest.dcm"
    ct_study(1)[0].save_as(dicom, enforce_file_format=True)
    png = folder / "hand.png"
    ramp = np.tile(np.arange(96, dtype=np.uint8) * 2, (80, 1))
    Image.fromarray(ramp).save(png)
    return [dicom, png]


def test_visualize_writes_the_page_and_every_image_it_shows(
    model: Path,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "inside"
    assert main(["visualize", str(model), *map(str, images), "--out", str(out)]) == 0
    assert "open it in a browser" in capsys.readouterr().out

    page = (out / "index.html").read_text(encoding="utf-8")
    shown = re.findall(r'<img src="([^"]+)"', page)
    assert shown == [
        "filters.png",
        "chest-cams.png",
        "chest-activations.png",
        "hand-cams.png",
        "hand-activations.png",
    ]
    for name in shown:
        with Image.open(out / name) as image:
            image.verify()  # a whole PNG
    with Image.open(out / "hand-cams.png") as image:
        assert image.width > 4 * image.height  # five panels side by side
    for name in ("chest.dcm", "hand.png"):
        assert f"<h2>{name}</h2>" in page
    assert len(re.findall(r"p\(nodule\) = [01]\.\d{3}: (Present|Absent)", page)) == 2


def test_visualize_without_images_draws_the_filters_only(
    model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "inside"
    assert main(["visualize", str(model), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["filters.png", "index.html"]
    assert "the filters only" in (out / "index.html").read_text(encoding="utf-8")


def test_a_model_with_dropout_before_its_head_is_drawn(
    images: list[Path], tmp_path: Path
) -> None:
    torch.manual_seed(1)
    artifact = dataclasses.replace(
        make_artifact(size=64),
        dropout=0.2,
        state_dict=build_model("resnet18", 2, 1, dropout=0.2).state_dict(),
    )
    model = tmp_path / "dropout.safetensors"
    artifact.save(model)
    out = tmp_path / "inside"
    assert main(["visualize", str(model), str(images[1]), "--out", str(out)]) == 0
    assert (out / "hand-cams.png").is_file()


def test_a_file_that_is_no_image_is_named_in_the_error(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "notes.dcm"
    junk.write_bytes(b"not DICOM at all")
    assert main(["visualize", str(model), str(junk), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{junk}: cannot read as DICOM" in err
    assert "Traceback" not in err


def test_stage_maps_match_the_reference_gradcam_and_cam_at_layer4() -> None:
    artifact = make_artifact(size=64)
    net = artifact.build().eval()
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    maps = stage_maps(net, x)

    assert set(maps.gradcam) == set(STAGES)
    for stage in ("layer2", "layer3", "layer4"):
        reference = gradcam_full_backward(net, x, 0, stage)[0].numpy()
        np.testing.assert_allclose(maps.gradcam[stage], reference, atol=1e-5)
    # With global average pooling before the head, Grad-CAM at layer4 is CAM:
    # every cell's gradient is the head's weight over the cell count.
    np.testing.assert_allclose(maps.cam, maps.gradcam["layer4"], atol=1e-5)
    # Shapes: each stage halves the grid (layer1 at 1/4 of the input side).
    sides = [maps.activations[s].shape[-1] for s in STAGES]
    assert sides == [16, 8, 4, 2]
    with torch.no_grad():
        assert maps.logit == pytest.approx(float(net(x)[0, 0]), abs=1e-5)
