"""`medtrain export`: deployment variants the node runs, measured against it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.dataset import Dataset
from safetensors import safe_open
from safetensors.torch import save_file

from inference import ArtifactError, Classifier, ModelArtifact, file_sha256
from inference.compiled import load_compiled
from tests.helpers import run_cli
from training.cli import main
from training.data import DataError, load_samples
from training.export import check_tolerance

TINY = ["--size", "64", "--epochs", "3", "--batch-size", "16"]
# A test that comes first sets up the module's fit and int8 export (~30 s alone).
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small model fit on synthetic DX images, and held-out images."""
    root = tmp_path_factory.mktemp("export")
    train, test = root / "train", root / "test"
    assert main(["synth", str(train), "--n", "64", "--seed", "31", "--size", "64"]) == 0
    assert main(["synth", str(test), "--n", "48", "--seed", "32", "--size", "64"]) == 0
    model = root / "model.safetensors"
    assert main(["fit", str(train), "--out", str(model), *TINY]) == 0
    return model, test


@pytest.fixture(scope="module")
def int8(trained: tuple[Path, Path]) -> tuple[Path, str]:
    """The trained model's int8 variant, and what export printed."""
    model, test = trained
    out = model.with_name("int8.safetensors")
    argv = ["export", str(model), "--format", "int8", "--data", str(test)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*argv, "--out", str(out), "--tolerance", "1"]) == 0
    return out, printed.getvalue()


def held_out(test: Path) -> list[Dataset]:
    return [dcmread(s.path) for s in load_samples(test)]


def test_an_int8_variant_lets_go_of_its_file_once_built(
    trained: tuple[Path, Path], int8: tuple[Path, str]
) -> None:
    (_, test), (out, _) = trained, int8
    variant = ModelArtifact.load(out)
    quantized = Classifier(variant, device="cpu", trace=True)
    assert str(out).encode() in Path("/proc/self/maps").read_bytes()

    variant.release_weights()

    # Its activation ranges stay, as copies: the file is no longer mapped.
    assert variant.quantization
    assert str(out).encode() not in Path("/proc/self/maps").read_bytes()
    assert quantized.int8
    assert quantized.predict(held_out(test)[:1]).frame_probabilities.shape[0] == 1


def test_int8_variant_carries_the_model_and_runs_quantized_in_the_node(
    trained: tuple[Path, Path], int8: tuple[Path, str]
) -> None:
    (model, test), (out, printed) = trained, int8
    assert "int8 of medtrain-model" in printed
    assert "agreement at the threshold" in printed

    source, variant = ModelArtifact.load(model), ModelArtifact.load(out)
    assert variant.variant["format"] == "int8"
    assert variant.variant["source"]["sha256"] == file_sha256(model)
    assert variant.variant["source"]["device_uid"] == source.device_uid
    assert variant.device_uid != source.device_uid  # a Device UID of its own
    assert variant.labels == source.labels
    assert variant.preprocessing == source.preprocessing
    measured = variant.variant["measured"]
    assert measured["images"] == 48
    assert 0 <= measured["agreement_at_threshold"] <= 1
    assert measured["auroc_delta"] == pytest.approx(
        measured["auroc"] - measured["auroc_source"]
    )

    # The node's classifier runs it quantized and explains it with Grad-CAM.
    fp32 = Classifier(source, device="cpu", trace=True)
    quantized = Classifier(variant, device="cpu", trace=True)
    assert quantized.int8
    assert not fp32.int8
    datasets = held_out(test)
    agree, differences = 0, []
    for ds in datasets:
        a, b = fp32.predict([ds]).labels[0], quantized.predict([ds]).labels[0]
        agree += a.positive == b.positive
        differences.append(abs(a.probability - b.probability))
    # Grad-CAM as the fp32 model draws it, nearly: at the model's layer (layer2
    # at 64 px: the fp32 weights) and at layer4 (the int8 trunk's activations).
    at4 = dataclasses.replace(variant, gradcam_layer="layer4")
    pairs = [
        (quantized, fp32),
        (
            Classifier(at4, device="cpu"),
            Classifier(dataclasses.replace(source, gradcam_layer="layer4"), "cpu"),
        ),
    ]
    for ds in datasets[:3]:
        for int8_model, fp32_model in pairs:
            heatmap = int8_model.predict([ds], 1).explanations[0].heatmap
            reference = fp32_model.predict([ds], 1).explanations[0].heatmap
            assert heatmap.shape == (ds.Rows, ds.Columns)
            np.testing.assert_allclose(heatmap, reference, atol=0.25)
    # Decisions agree but where the fp32 probability sits within the
    # quantization's difference (< 0.1) of the threshold: this 3-epoch model's
    # probabilities crowd around it, and a run flipped one of 48 (CI).
    assert agree >= 0.95 * len(datasets)
    assert max(differences) < 0.1
    assert max(differences) > 0  # it is not the fp32 model


def test_int8_variant_scores_through_dicom_node_score(
    trained: tuple[Path, Path], int8: tuple[Path, str], tmp_path: Path
) -> None:
    (_, test), (out, _) = trained, int8
    image = load_samples(test)[0].path
    result = str(tmp_path / "r")
    done = run_cli(
        "score", "--model", str(out), str(image), "--out", result, timeout=180
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "r").rglob("sr.dcm"))) == 1


def test_an_int8_variant_runs_compiled_as_it_runs_built(
    trained: tuple[Path, Path], int8: tuple[Path, str], tmp_path: Path
) -> None:
    # The node runs it from its compiled file: the quantized trunk, and the
    # fp32 network around its Grad-CAM layer (layer2 at 64 px).
    (_, test), (out, _) = trained, int8
    variant = ModelArtifact.load(out)
    assert variant.gradcam_layer != "layer4"
    compiled = load_compiled(variant, out, file_sha256(out), tmp_path, "cpu")
    assert compiled is not None
    fast = Classifier(variant, device="cpu", trace=True, compiled=compiled)
    built = Classifier(ModelArtifact.load(out), device="cpu", trace=True)
    assert built.int8
    for ds in held_out(test)[:3]:
        got, want = fast.predict([ds], 1), built.predict([ds], 1)
        np.testing.assert_allclose(
            got.frame_probabilities, want.frame_probabilities, atol=1e-6
        )
        for a, b in zip(got.explanations, want.explanations, strict=True):
            np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_half_precision_variants_store_their_type_and_run_on_the_cpu(
    trained: tuple[Path, Path], tmp_path: Path, kind: str, dtype: torch.dtype
) -> None:
    model, test = trained
    out = tmp_path / f"{kind}.safetensors"
    argv = ["export", str(model), "--format", kind, "--data", str(test)]
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    variant = ModelArtifact.load(out)
    assert variant.variant["format"] == kind
    assert variant.state_dict["conv1.weight"].dtype == dtype
    assert out.stat().st_size < 0.6 * model.stat().st_size
    source = ModelArtifact.load(model)
    fp32 = Classifier(source, device="cpu")
    half = Classifier(variant, device="cpu")  # widened to fp32 on the CPU
    for ds in held_out(test)[:8]:
        a, b = fp32.predict([ds]).labels[0], half.predict([ds]).labels[0]
        assert b.probability == pytest.approx(a.probability, abs=0.02)


def test_a_tampered_variant_is_refused(int8: tuple[Path, str], tmp_path: Path) -> None:
    out = tmp_path / "int8.safetensors"
    shutil.copy(int8[0], out)
    pinned = file_sha256(out)
    with safe_open(str(out), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    ranges = [k for k in tensors if k.startswith("int8.") and k.endswith("max_val")]
    assert ranges  # the activation ranges are in the file
    tensors[ranges[0]] = tensors[ranges[0]] * 4  # a range changed, the rest kept
    save_file(tensors, str(out), metadata=header)

    with pytest.raises(ArtifactError, match="do not match their recorded SHA-256"):
        ModelArtifact.load(out)
    with pytest.raises(ArtifactError, match="the file changed"):
        ModelArtifact.load(out, expected_sha256=pinned)


def test_export_refuses_what_it_cannot_measure(
    trained: tuple[Path, Path],
    int8: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (model, test), (variant, _) = trained, int8
    out = tmp_path / "v.safetensors"
    # A variant is not exported again.
    argv = ["--data", str(test), "--tolerance", "1"]
    again = ["export", str(variant), "--format", "bf16", "--out", str(out)]
    assert main([*again, *argv]) == 1
    assert "already a variant (int8)" in capsys.readouterr().err
    # Held-out data of one class cannot measure an AUROC.
    normals = tmp_path / "normals"
    normals.mkdir()
    rows = (test / "labels.csv").read_text().splitlines()
    kept = [rows[0]] + [r for r in rows[1:] if ",normal," in r]
    (normals / "labels.csv").write_text(
        "\n".join(r.replace("dicom/", str(test / "dicom") + "/", 1) for r in kept)
    )
    export = ["export", str(model), "--format", "int8", "--out", str(out)]
    assert main([*export, "--data", str(normals)]) == 1
    assert "one class only" in capsys.readouterr().err
    assert main([*export, "--data", str(test), "--tolerance", "-1"]) == 1
    assert "--tolerance: expected >= 0" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def onnx_variant(trained: tuple[Path, Path]) -> tuple[Path, str]:
    """The trained model's ONNX variant, and what export printed."""
    # The onnx extra (CI installs it; `bootstrap.sh dev,train,onnx` here).
    pytest.importorskip("onnxruntime")
    model, test = trained
    out = model.with_name("onnx.safetensors")
    argv = ["export", str(model), "--format", "onnx", "--data", str(test)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*argv, "--out", str(out)]) == 0
    return out, printed.getvalue()


def test_onnx_variant_runs_in_onnxruntime_as_the_model_does(
    trained: tuple[Path, Path], onnx_variant: tuple[Path, str], tmp_path: Path
) -> None:
    import onnx  # the onnx extra, which CI installs

    (model, test), (out, printed) = trained, onnx_variant
    assert "onnx of medtrain-model" in printed
    source, variant = ModelArtifact.load(model), ModelArtifact.load(out)
    assert variant.variant["format"] == "onnx"
    assert variant.variant["opset"] == 18
    assert variant.variant["onnxruntime"]
    assert variant.device_uid != source.device_uid
    measured = variant.variant["measured"]
    assert measured["images"] == 48
    assert measured["agreement_at_threshold"] == 1.0
    assert measured["largest_probability_difference"] < 1e-3

    # The graph in the file is a valid ONNX model of the trunk, at the opset stated.
    graph = onnx.load_from_string(variant.onnx_graph)
    onnx.checker.check_model(graph)
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {
        18
    }
    assert [i.name for i in graph.graph.input] == ["pixels"]

    # The node's classifier runs it in onnxruntime; scores and Grad-CAM (at the
    # model's layer and at layer4, from the graph's activations) match PyTorch's.
    fp32 = Classifier(source, device="cpu", trace=True)
    runtime = Classifier(variant, device="cpu", trace=True)
    assert runtime.onnx
    assert not runtime.traced
    at4 = dataclasses.replace(variant, gradcam_layer="layer4")
    pairs = [
        (runtime, fp32),
        (
            Classifier(at4, device="cpu"),
            Classifier(dataclasses.replace(source, gradcam_layer="layer4"), "cpu"),
        ),
    ]
    for ds in held_out(test)[:6]:
        for onnx_model, torch_model in pairs:
            a, b = torch_model.predict([ds], 1), onnx_model.predict([ds], 1)
            assert b.labels[0].probability == pytest.approx(
                a.labels[0].probability, abs=1e-4
            )
            assert b.labels[0].positive == a.labels[0].positive
            np.testing.assert_allclose(
                b.explanations[0].heatmap, a.explanations[0].heatmap, atol=1e-2
            )

    # dicom-node score runs it too.
    image = load_samples(test)[0].path
    done = run_cli(
        "score",
        "--model",
        str(out),
        str(image),
        "--out",
        str(tmp_path / "r"),
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "r").rglob("sr.dcm"))) == 1


def test_a_tampered_onnx_graph_is_refused(
    onnx_variant: tuple[Path, str], tmp_path: Path
) -> None:
    out = tmp_path / "onnx.safetensors"
    shutil.copy(onnx_variant[0], out)
    with safe_open(str(out), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    graph = tensors["onnx.graph"].clone()
    graph[-100] ^= 1  # one bit of the graph's weights
    tensors["onnx.graph"] = graph
    save_file(tensors, str(out), metadata=header)
    with pytest.raises(ArtifactError, match="do not match their recorded SHA-256"):
        ModelArtifact.load(out)


def test_a_variant_whose_auroc_drops_past_the_tolerance_is_refused() -> None:
    data = Path("held-out")
    check_tolerance("int8", data, 0.90, 0.895, 0.01)  # within
    check_tolerance("int8", data, 0.90, 0.93, 0.0)  # better
    with pytest.raises(DataError) as refused:
        check_tolerance("int8", data, 0.90, 0.88, 0.01)
    assert str(refused.value) == (
        "the int8 variant's AUROC on held-out is 0.8800 against the source's "
        "0.9000, a drop of 0.0200 over --tolerance 0.01; nothing written"
    )
