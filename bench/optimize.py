"""Deployment variants on this CPU: fp32 against int8 and ONNX, speed and AUROC.

Speed: for resnet18 and resnet50 at the node's input (1 channel, 224 px), images/s
of the node's classifier (``Classifier.forward``: what the node runs) with the
fp32 model (traced, channels_last), its int8 variant (traced) and its ONNX
variant (onnxruntime), at batch 1 and 8 (median of --repeat timed batches after
warm-up; random weights, int8 ranges calibrated on random frames: speed does not
depend on them).

Accuracy: ``medtrain export --format int8`` and ``--format onnx`` of a trained
model on held-out images (--model M --data DIR; by default a resnet18 fit here
on 400 ``medtrain synth`` DX images, seed 1, and measured on 200 others, seed 2,
at 128 px), which print the AUROC change, the largest probability difference
and the agreement at the threshold.

Last line: ``int8 vs fp32 at batch 8: N.NNx, AUROC delta D.DDD`` (resnet18).
Target: >= 1.5x with an AUROC delta of at most 0.01.

    python bench/optimize.py [--model M --data DIR] [--repeat 10] [--work DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train import run  # noqa: E402
from inference import (  # noqa: E402
    Classifier,
    CodedConcept,
    Label,
    ModelArtifact,
    PreprocessSpec,
    build_model,
)
from inference.variants import (  # noqa: E402
    ONNX_OPSET,
    observer_state,
    onnx_graph,
    prepare_int8,
)

SIZE = 224
LABEL = Label("nodule", CodedConcept("27925004", "SCT", "Nodule"), 0.5)


def random_model(
    architecture: str,
) -> tuple[ModelArtifact, ModelArtifact, ModelArtifact]:
    """A random-weight fp32 model at the node's input, its int8 and ONNX variants."""
    torch.manual_seed(0)
    fp32 = ModelArtifact(
        name=f"bench-{architecture}",
        version="1",
        device_uid="2.25.1",
        architecture=architecture,
        preprocessing=PreprocessSpec(size=(SIZE, SIZE)),
        labels=(LABEL,),
        state_dict=build_model(architecture, 1, 1).state_dict(),
    )
    prepared = prepare_int8(fp32.build(), 1, (SIZE, SIZE))
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(8, 1, SIZE, SIZE))
    int8 = replace(
        fp32,
        device_uid="2.25.2",
        variant={"format": "int8"},
        quantization=observer_state(prepared),
    )
    onnx = replace(
        fp32,
        device_uid="2.25.3",
        variant={"format": "onnx", "opset": ONNX_OPSET},
        onnx_graph=onnx_graph(fp32.build(), 1, (SIZE, SIZE)),
    )
    return fp32, int8, onnx


def images_per_s(artifact: ModelArtifact, batch: int, repeat: int) -> float:
    """The median images/s of the node's forward pass at this batch size."""
    classifier = Classifier(artifact, device="cpu", trace=True)
    x = torch.randn(batch, 1, SIZE, SIZE)
    for _ in range(2):
        classifier.forward(x)
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        classifier.forward(x)
        seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds)


def trained(work: Path) -> tuple[Path, Path]:
    """A resnet18 fit on synthetic DX images, and held-out images."""
    train, test = work / "train", work / "test"
    for folder, n, seed in ((train, 400, 1), (test, 200, 2)):
        if not (folder / "labels.csv").is_file():
            argv = ["synth", str(folder), "--n", str(n), "--seed", str(seed)]
            run([*argv, "--size", "128"])
    model = work / "model.safetensors"
    if not model.is_file():
        print("fitting a resnet18 on 400 synthetic images (a few minutes) ...")
        run(["fit", str(train), "--out", str(model), "--epochs", "6"])
    return model, test


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a trained model (with --data)")
    parser.add_argument("--data", type=Path, help="held-out labelled images")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--work", type=Path, help="keeps the default model's data")
    args = parser.parse_args()
    if (args.model is None) != (args.data is None):
        parser.error("--model and --data go together")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    speed: dict[tuple[str, int], float] = {}
    for architecture in ("resnet18", "resnet50"):
        fp32, int8, onnx = random_model(architecture)
        for batch in (1, 8):
            a = images_per_s(fp32, batch, args.repeat)
            b = images_per_s(int8, batch, args.repeat)
            c = images_per_s(onnx, batch, args.repeat)
            speed[architecture, batch] = b / a
            print(
                f"{architecture:<9} batch {batch}: fp32 {a:6.1f} im/s, int8 {b:6.1f} "
                f"im/s ({b / a:.2f}x), onnx {c:6.1f} im/s ({c / a:.2f}x)"
            )
    with tempfile.TemporaryDirectory() as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        model, data = (args.model, args.data) if args.model else trained(work)
        for kind in ("onnx", "int8"):
            out = work / f"{kind}.safetensors"
            argv = ["export", str(model), "--format", kind, "--data", str(data)]
            print(run([*argv, "--out", str(out), "--tolerance", "1"]).strip())
        measured = ModelArtifact.load(out).variant["measured"]
    print(
        f"int8 vs fp32 at batch 8: {speed['resnet18', 8]:.2f}x, AUROC delta "
        f"{measured['auroc_delta']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
