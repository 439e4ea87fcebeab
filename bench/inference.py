"""Inference benchmark: bare model forward against the whole path, and Grad-CAM cost.

For resnet18 and resnet50 at 224 px, batch 8, on this machine's CPU (or CUDA):

  (a) the bare model forward on a random batch [8, 1, 224, 224],
  (b) the whole path for studies of 8 in-memory 512x512 16-bit CT data sets:
      preprocessing, classification and Grad-CAM of each study's top frame,

and prints images/s for both with the ratio b/a (target >= 0.8), and the cost of
Grad-CAM for one image relative to one forward of one image (target <= 1.3).

    python bench/inference.py [--studies 6] [--device cpu] [--preprocess-workers N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import torch
from pydicom import dcmread
from pydicom.dataset import Dataset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference import (  # noqa: E402
    Classifier,
    CodedConcept,
    Label,
    ModelArtifact,
    PreprocessSpec,
    build_model,
)
from inference.gradcam import gradcam  # noqa: E402
from tests.factories import make_ct  # noqa: E402


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def artifact(architecture: str) -> ModelArtifact:
    torch.manual_seed(0)
    return ModelArtifact(
        name="bench",
        version="0",
        device_uid="2.25.1",
        architecture=architecture,
        preprocessing=PreprocessSpec(size=(224, 224), channels=1),
        labels=(Label("nodule", CodedConcept("27925004", "SCT", "Nodule")),),
        state_dict=build_model(architecture, 1, 1).state_dict(),
    )


def fresh_studies(encoded: Sequence[Sequence[bytes]]) -> list[list[Dataset]]:
    """New Dataset objects each time: pydicom caches decoded pixels on a Dataset."""
    return [[dcmread(BytesIO(raw)) for raw in study] for study in encoded]


def bench_one(
    architecture: str,
    device: str,
    encoded: Sequence[Sequence[bytes]],
    repeat: int,
    preprocess_workers: int = 1,
) -> tuple[float, float, float]:
    """Return (a) forward images/s, (b) whole-path images/s, Grad-CAM/forward."""
    classifier = Classifier(
        artifact(architecture),
        device=device,
        batch_size=8,
        preprocess_workers=preprocess_workers,
    )
    model = classifier.model
    if model is None:
        raise SystemExit("the classifier was compiled; this bench times the model")
    batch = torch.randn(8, 1, 224, 224, device=device).contiguous(
        memory_format=torch.channels_last
    )
    n_images = sum(len(study) for study in encoded)
    n_batches = n_images // 8

    def forward(x: torch.Tensor) -> None:
        with torch.inference_mode():
            model(x)
        sync(device)

    forward(batch)  # warm-up
    classifier.predict(fresh_studies(encoded[:1])[0], explain_top_k=1)
    forward_s: list[float] = []
    whole_s: list[float] = []
    for _ in range(repeat):  # interleaved, so drifts of the machine hit both
        started = time.perf_counter()
        for _ in range(n_batches):
            forward(batch)
        forward_s.append(time.perf_counter() - started)
        studies = fresh_studies(encoded)
        started = time.perf_counter()
        for study in studies:
            classifier.predict(study, explain_top_k=1)
        sync(device)
        whole_s.append(time.perf_counter() - started)

    one = batch[:1]
    one_forward: list[float] = []
    one_gradcam: list[float] = []
    for _ in range(5 * repeat):
        started = time.perf_counter()
        forward(one)
        one_forward.append(time.perf_counter() - started)
        started = time.perf_counter()
        gradcam(model, one, 0)
        sync(device)
        one_gradcam.append(time.perf_counter() - started)
    return (
        n_images / median(forward_s),
        n_images / median(whole_s),
        median(one_gradcam) / median(one_forward),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6, help="studies of 8 images")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: best)")
    parser.add_argument(
        "--preprocess-workers",
        type=int,
        default=1,
        metavar="N",
        help="preprocessing threads per classifier (default 1, as the node runs)",
    )
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workers = max(1, args.preprocess_workers)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {workers} preprocessing thread(s)"
    )
    encoded = [
        [encode(make_ct(rows=512, columns=512, seed=8 * s + i)) for i in range(8)]
        for s in range(args.studies)
    ]
    print(
        f"{'model':<10}{'(a) forward':>14}{'(b) whole path':>17}{'b/a':>7}"
        f"{'Grad-CAM/forward':>19}"
    )
    for architecture in ("resnet18", "resnet50"):
        bare, whole, cam = bench_one(
            architecture, device, encoded, args.repeat, workers
        )
        print(
            f"{architecture:<10}{bare:>10.1f} im/s{whole:>11.1f} im/s"
            f"{whole / bare:>7.2f}{cam:>19.2f}",
            flush=True,
        )
    print("\ntargets: b/a >= 0.8; Grad-CAM of one image <= 1.3 forwards of one image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
