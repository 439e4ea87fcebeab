"""The model artifact: exact round trip, no pickle, refusals that say what to do."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import inference
from inference import (
    FORMAT_VERSION,
    ArtifactError,
    CodedConcept,
    Label,
    ModelArtifact,
    PreprocessSpec,
    build_model,
    file_sha256,
)
from inference.artifact import METADATA_KEY
from tests.helpers import run_python

NODULE = Label(
    "nodule",
    CodedConcept("27925004", "SCT", "Nodule"),
    0.42,
    CodedConcept("39607008", "SCT", "Lung"),
)
EFFUSION = Label("effusion", CodedConcept("60046008", "SCT", "Pleural effusion"), 0.6)


def make_artifact(architecture: str = "resnet18", channels: int = 1) -> ModelArtifact:
    torch.manual_seed(0)
    model = build_model(architecture, 2, channels, dropout=0.2)
    spec = PreprocessSpec(
        size=(64, 64), channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels
    )
    return ModelArtifact(
        name="chest-test",
        version="1.2.3",
        device_uid="2.25.123456789",
        architecture=architecture,
        preprocessing=spec,
        labels=(NODULE, EFFUSION),
        state_dict=model.state_dict(),
        aggregation="topk_mean",
        top_k=3,
        dropout=0.2,
        accepts={
            "modalities": ["DX", "CR"],
            "body_parts": ["CHEST"],
            "sop_classes": [],
        },
        training={"data": {"images": 600}, "metrics": {"auroc": 0.97}},
    )


def test_round_trip_is_exact(tmp_path: Path) -> None:
    artifact = make_artifact()
    path = tmp_path / "m.safetensors"

    sha = artifact.save(path)
    loaded = ModelArtifact.load(path, expected_sha256=sha)

    assert loaded.metadata() == artifact.metadata()
    assert loaded.labels == (NODULE, EFFUSION)
    assert loaded.preprocessing == artifact.preprocessing
    assert set(loaded.state_dict) == set(artifact.state_dict)
    for name, tensor in artifact.state_dict.items():
        assert torch.equal(loaded.state_dict[name], tensor), name
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(loaded.build()(x), artifact.build()(x))


def test_released_weights_unmap_the_file_and_cannot_be_built_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.safetensors"
    make_artifact().save(path)
    loaded = ModelArtifact.load(path)
    model = loaded.build()
    assert str(path).encode() in Path("/proc/self/maps").read_bytes()

    loaded.release_weights()

    # The file's pages are no longer mapped; the model built before still runs.
    assert str(path).encode() not in Path("/proc/self/maps").read_bytes()
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2)
    assert loaded.labels == (NODULE, EFFUSION)
    copied = dataclasses.replace(loaded)
    for use in (
        loaded.build,
        lambda: loaded.save(tmp_path / "again.safetensors"),
        copied.build,
    ):
        with pytest.raises(ArtifactError, match="no weights"):
            use()


def test_a_heatmap_offset_is_kept_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    dataclasses.replace(make_artifact(), gradcam_offset=(-5.0, 1.5)).save(path)
    assert ModelArtifact.load(path).gradcam_offset == (-5.0, 1.5)

    for bad in ((40.0, 0.0), (float("nan"), 0.0)):  # input is 64 px
        with pytest.raises(ArtifactError, match="gradcam_offset"):
            dataclasses.replace(make_artifact(), gradcam_offset=bad)


def test_document_is_plain_json_in_the_header(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    make_artifact().save(path)

    with safe_open(str(path), framework="pt") as f:
        doc = json.loads(f.metadata()[METADATA_KEY])

    # A model as trained is written as version 1 (older nodes read it); only
    # deployment variants need version 2.
    assert doc["format_version"] == 1 <= FORMAT_VERSION
    assert "variant" not in doc
    assert doc["model"] == {
        "name": "chest-test",
        "version": "1.2.3",
        "device_uid": "2.25.123456789",
    }
    assert doc["input"] == {"channels": 1, "size": [64, 64]}
    assert doc["labels"][0]["code"] == {
        "value": "27925004",
        "scheme": "SCT",
        "meaning": "Nodule",
    }
    assert doc["aggregation"] == {"rule": "topk_mean", "k": 3}
    assert len(doc["weights_sha256"]) == 64
    assert b"pickle" not in path.read_bytes()[:1000].lower()


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    artifact = make_artifact()
    artifact.save(path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["fc.1.bias"] = tensors["fc.1.bias"] + 1.0
    save_file(tensors, str(path), metadata=header)

    with pytest.raises(ArtifactError, match="do not match their recorded SHA-256"):
        ModelArtifact.load(path)


def test_pinned_file_hash_refuses_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    make_artifact().save(path)

    with pytest.raises(ArtifactError, match="the file changed"):
        ModelArtifact.load(path, expected_sha256="0" * 64)
    assert (
        ModelArtifact.load(path, expected_sha256=file_sha256(path).upper()).name
        == "chest-test"
    )


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    make_artifact().save(path)
    rewrite(path, lambda doc: doc.update(architecture="vit_b_16"))

    with pytest.raises(
        ArtifactError, match=r"unknown architecture 'vit_b_16'.*resnet18"
    ):
        ModelArtifact.load(path)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        # LO values: a backslash splits one in two; every study's results failed.
        (lambda doc: doc["model"].update(name="lung\\nodule v2"), "a backslash"),
        (lambda doc: doc["model"].update(version="1\n2"), "a control character"),
        # C1 controls: UTF-8 (ISO_IR 192) values may carry them, DICOM text not.
        (lambda doc: doc["model"].update(name="nodule\u0085"), "a control character"),
        # A Code Meaning (LO) holds 64 characters.
        (
            lambda doc: doc["labels"][0]["code"].update(meaning="N" * 65),
            "more than 64 characters",
        ),
    ],
)
def test_text_the_result_objects_cannot_hold_is_refused_at_load(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], said: str
) -> None:
    path = tmp_path / "m.safetensors"
    make_artifact().save(path)
    rewrite(path, change)

    with pytest.raises(ArtifactError, match=said):
        ModelArtifact.load(path)


def test_newer_format_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    make_artifact().save(path)
    rewrite(path, lambda doc: doc.update(format_version=FORMAT_VERSION + 1))

    with pytest.raises(
        ArtifactError, match=r"newer than this dicom-node reads.*upgrade"
    ):
        ModelArtifact.load(path)


def test_missing_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    make_artifact().save(path)
    rewrite(path, lambda doc: doc["model"].pop("device_uid"))

    with pytest.raises(ArtifactError, match=r"lacks 'model\.device_uid'"):
        ModelArtifact.load(path)


def test_wrong_files_are_refused(tmp_path: Path) -> None:
    not_safetensors = tmp_path / "model.pth"
    torch.save({"x": torch.zeros(1)}, not_safetensors)
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))

    with pytest.raises(ArtifactError, match="not a safetensors model file"):
        ModelArtifact.load(not_safetensors)
    with pytest.raises(ArtifactError, match="without a dicom-node model document"):
        ModelArtifact.load(bare)
    with pytest.raises(ArtifactError, match="not found"):
        ModelArtifact.load(tmp_path / "absent.safetensors")


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    artifact = make_artifact()
    artifact.architecture = "resnet34"

    with pytest.raises(ArtifactError, match="weights do not fit resnet34"):
        artifact.build()


@pytest.mark.parametrize(
    "architecture", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
)
def test_every_resnet_builds_with_any_classes_and_channels(architecture: str) -> None:
    model = build_model(architecture, 3, in_channels=1, dropout=0.1).eval()
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_init_weights_from_a_local_file_sum_rgb_for_one_channel(tmp_path: Path) -> None:
    rgb = build_model("resnet18", 1000, in_channels=3)
    path = tmp_path / "imagenet-like.pth"
    torch.save(rgb.state_dict(), path)

    gray = build_model("resnet18", 2, in_channels=1, init_weights=path)

    torch.testing.assert_close(
        gray.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True)
    )
    torch.testing.assert_close(gray.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)
    assert gray.fc.weight.shape == (2, 512)  # the head stays new


def test_init_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(build_model("resnet50", 10).state_dict(), path)

    with pytest.raises(ArtifactError, match="do not fit"):
        build_model("resnet18", 2, init_weights=path)


def rewrite(path: Path, change: object) -> None:
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    doc = json.loads(header[METADATA_KEY])
    change(doc)  # type: ignore[operator]
    header[METADATA_KEY] = json.dumps(doc)
    save_file(tensors, str(path), metadata=header)


def test_every_public_name_of_inference_is_there_when_first_used() -> None:
    # The package imports its names on first use; a process that reads only
    # predictions and pixels does not load PyTorch.
    code = (
        "import sys, inference\n"
        "from inference import StudyPrediction, Label, FrameSource, render\n"
        "assert 'torch' not in sys.modules, 'torch loaded'\n"
        "missing = [n for n in inference.__all__ if n not in dir(inference)]\n"
        "values = [getattr(inference, n) for n in inference.__all__]\n"
        "print(len(values), missing, StudyPrediction.__module__)\n"
    )
    assert run_python(code).split() == [
        str(len(inference.__all__)),
        "[]",
        "inference.findings",
    ]
