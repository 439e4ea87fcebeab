"""medtrain acceptance: `medtrain fit` at its defaults on two data sets, and its speed.

Sets (``--sets synthetic,realistic``, both by default):

* ``synthetic``: ``medtrain synth``, 600 drawn DX images (seed 1) to train on and
  300 (seed 2) to test on, at 128 px. ``medtrain fit DATA --out MODEL`` with no
  recipe flags (it picks the input size and the Grad-CAM layer from the data),
  then ``medtrain evaluate`` on the test images. Targets: AUROC >= 0.95, Grad-CAM
  pointing game >= 0.8 (printed beside its ceiling on the model's grid), fit
  under 15 minutes. Then fit's training images/s (median over epochs) against a
  bare loop on random tensors with the same model, input size, batch and
  precision, measured in the same run (target >= 0.85).
* ``realistic``: ``medtrain synth --background pydicom-data``, 600 images
  (seed 1) and 300 (seed 2) at 128 px, simulated nodules on crops of a real
  chest radiograph. ``medtrain fit`` at its defaults against a plain training
  loop on the same images (resnet18 from scratch, 128 px, 10 epochs, Adam, BCE,
  no augmentation), whose test AUROC is printed at its last epoch and at its
  best epoch (chosen on the test set: a generous baseline). Targets: medtrain's
  test AUROC >= the plain loop's best + 0.05, fit under 15 minutes.
* ``pretrain`` (only when named): the realistic set again, now with
  ``medtrain pretrain`` at its defaults on 600 other unlabelled images of the
  same kind (seed 3; their labels unused) and ``medtrain fit --init-weights``
  from its backbone; prints both times and the test AUROC beside the realistic
  set's from scratch when that ran in the same run or the same --work.

    python bench/train.py [--work DIR] [--sets synthetic,realistic,pretrain]
                          [--device cpu]

The data and the models stay in DIR (a temporary folder by default), so a second
run with the same --work reuses the data.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference import ModelArtifact, build_model  # noqa: E402
from inference.gradcam import gradcam_at, upsample  # noqa: E402
from inference.preprocess import PreprocessSpec  # noqa: E402
from training.cli import main as medtrain  # noqa: E402
from training.data import load_samples  # noqa: E402
from training.engine import cuda_autocast_dtype, load_frames  # noqa: E402
from training.metrics import auroc  # noqa: E402

SETS = ("synthetic", "realistic", "pretrain")
DEFAULT_SETS = ("synthetic", "realistic")
FIT_MINUTES = 15.0


def run(argv: list[str]) -> str:
    """Run a medtrain command in this process and return what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = medtrain(argv)
    if code != 0:
        raise SystemExit(f"medtrain {argv[0]} failed ({code}):\n{out.getvalue()}")
    return out.getvalue()


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def fit_time(seconds: float) -> str:
    """The report line of a fit's time against the target."""
    return (
        f"  fit time        {seconds / 60:6.1f} min   (target < {FIT_MINUTES:.0f} "
        f"min: {verdict(seconds < FIT_MINUTES * 60)})"
    )


def make_data(work: Path, name: str, extra: list[str]) -> tuple[Path, Path]:
    """Write (or reuse) the 600-image training and 300-image test folders."""
    train, test = work / name / "train", work / name / "test"
    for folder, n, seed in ((train, 600, 1), (test, 300, 2)):
        if not (folder / "labels.csv").is_file():
            progress(f"{name}: writing {n} images (seed {seed})")
            argv = ["synth", str(folder), "--n", str(n), "--seed", str(seed)]
            run([*argv, "--size", "128", *extra])
    return train, test


def fit_and_evaluate(
    work: Path,
    name: str,
    train: Path,
    test: Path,
    device: str,
    extra: tuple[str, ...] = (),
) -> tuple[float, dict[str, Any], Path]:
    """``medtrain fit`` at its defaults, then ``evaluate``: seconds, figures, model."""
    model = work / name / "model.safetensors"
    progress(f"{name}: medtrain fit at its defaults")
    started = time.perf_counter()
    log = run(
        [
            "fit",
            str(train),
            "--out",
            str(model),
            "--device",
            device,
            "--cache",
            str(work / name / "cache"),
            *extra,
        ]
    )
    fit_s = time.perf_counter() - started
    print(log, end="")
    figures = json.loads(
        run(["evaluate", str(model), str(test), "--json", "--device", device])
    )
    return fit_s, figures, model


def pointing_ceiling(test: Path, size: int, layer: str) -> tuple[int, float]:
    """The Grad-CAM grid side at this input size, and the best pointing game on it.

    A heatmap is the layer's grid interpolated bilinearly between its nodes
    (each on its receptive field's centre, see ``inference.gradcam.upsample``),
    then resized to the test image; its maximum therefore lies at the pixel
    one grid node lands on. The ceiling is the fraction of test lesions that
    contain such a pixel: a perfect localiser on this grid scores no higher.
    """
    with (test / "labels.csv").open() as f:
        masks = [
            np.asarray(Image.open(test / row["mask"])) > 0
            for row in csv.DictReader(f)
            if row["mask"]
        ]
    model = build_model("resnet18", 1, 1).eval()
    grid = gradcam_at(model, torch.zeros(1, 1, size, size), 0, layer)
    side = grid.shape[-1]
    nodes = []
    for i in range(side * side):
        one_hot = torch.zeros(1, side * side)
        one_hot[0, i] = 1.0
        at_input = upsample(one_hot.view(1, side, side), (size, size))
        heatmap = F.interpolate(  # input to image: a resize, as heatmap_to_source
            at_input[None], size=masks[0].shape, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        nodes.append(np.unravel_index(int(np.argmax(heatmap)), heatmap.shape))
    hits = sum(any(mask[node] for node in nodes) for mask in masks)
    return side, hits / len(masks)


def bare_loop(
    device: torch.device,
    batch: int,
    size: int,
    steps: int,
    dtype: torch.dtype | None,
    rounds: int = 3,
) -> float:
    """Images/s of a bare training loop on random tensors (the speed baseline).

    The median of ``rounds`` rounds of ``steps`` steps, as fit's figure is the
    median of its epochs (one round alone varies by 20 % on a shared CPU);
    ``dtype``: the autocast type fit trains in, None for fp32.
    """
    torch.manual_seed(0)
    # channels_last, as fit runs it (about 10 % faster here than the default).
    model = build_model("resnet18", 1, 1)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    x = torch.randn(batch, 1, size, size, device=device)
    y = (torch.rand(batch, device=device) > 0.5).float()
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            logits = model(x)[:, 0].float()
        loss = F.binary_cross_entropy_with_logits(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - started))
    return statistics.median(rates)


def load_set(folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (through inference.preprocess, the file's window) and 0/1 labels."""
    data = load_frames(
        load_samples(folder), "nodule", PreprocessSpec((size, size)), None
    )
    return data.x, data.y


def plain_loop(
    train: Path, test: Path, device: torch.device, epochs: int = 10, size: int = 128
) -> list[float]:
    """The baseline recipe: resnet18 from scratch, Adam, BCE, no augmentation.

    Returns the test AUROC after each epoch.
    """
    x, y = load_set(train, size)
    x_test, y_test = load_set(test, size)
    torch.manual_seed(0)
    model = build_model("resnet18", 1, 1).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    aurocs = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 32):
            batch = order[start : start + 32]
            logits = model(x[batch].to(device))[:, 0]
            loss = F.binary_cross_entropy_with_logits(logits, y[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        model.eval()
        with torch.no_grad():
            scores = torch.cat(
                [
                    model(x_test[i : i + 64].to(device))[:, 0].float().cpu()
                    for i in range(0, len(x_test), 64)
                ]
            )
        aurocs.append(auroc(scores.double().numpy(), y_test.numpy()))
        progress(f"plain loop epoch {len(aurocs)}: test AUROC {aurocs[-1]:.3f}")
    return aurocs


def synthetic(work: Path, device: str) -> list[str]:
    train, test = make_data(work, "synthetic", [])
    fit_s, figures, model = fit_and_evaluate(work, "synthetic", train, test, device)
    artifact = ModelArtifact.load(model)
    size = artifact.preprocessing.size[0]
    layer = artifact.gradcam_layer
    report = model.with_name(model.stem + "-report")
    with (report / "history.csv").open() as f:
        fit_rate = statistics.median(float(r["images_s"]) for r in csv.DictReader(f))
    config = json.loads((report / "config.json").read_text())
    batch = int(config["batch_size"])
    dtype = (  # as fit computes: mixed precision on CUDA always
        cuda_autocast_dtype()
        if device.startswith("cuda")
        else torch.bfloat16
        if config["precision"] == "bf16"
        else None
    )
    precision = str(dtype).removeprefix("torch.") if dtype else "fp32"
    bare = bare_loop(torch.device(device), batch, size, 6, dtype)
    side, ceiling = pointing_ceiling(test, size, layer)
    auc, game = figures["auroc"], figures.get("pointing_game")
    ratio = fit_rate / bare
    return [
        f"synthetic DX set (600 / 300 at 128 px; fit chose a {size}-px input, "
        f"Grad-CAM at {layer})",
        fit_time(fit_s),
        f"  test AUROC      {auc:8.3f}   (target >= 0.95: {verdict(auc >= 0.95)})",
        f"  pointing game   {game if game is None else f'{game:8.3f}'}   "
        f"(target >= 0.8: {verdict(game is not None and game >= 0.8)}; ceiling "
        f"on the {side}x{side} {layer} grid at {size} px: {ceiling:.3f})",
        f"  test sensitivity {figures['sensitivity']:.3f}, specificity "
        f"{figures['specificity']:.3f} at threshold {figures['threshold']:.3f}",
        f"  images/s        fit {fit_rate:.1f} (median of epochs), bare loop "
        f"{bare:.1f} (median of 3 rounds, batch {batch}, {precision}): ratio "
        f"{ratio:.2f} (target >= 0.85: {verdict(ratio >= 0.85)})",
    ]


def realistic(work: Path, device: str) -> list[str]:
    train, test = make_data(work, "realistic", ["--background", "pydicom-data"])
    fit_s, figures, model = fit_and_evaluate(work, "realistic", train, test, device)
    artifact = ModelArtifact.load(model)
    started = time.perf_counter()
    aurocs = plain_loop(train, test, torch.device(device))
    plain_s = time.perf_counter() - started
    best = int(np.argmax(aurocs))
    auc, game = figures["auroc"], figures.get("pointing_game")
    goal = aurocs[best] + 0.05
    return [
        "realistic set (600 / 300 at 128 px, nodules on real chest radiograph "
        f"crops; fit chose a {artifact.preprocessing.size[0]}-px input, Grad-CAM "
        f"at {artifact.gradcam_layer})",
        fit_time(fit_s),
        f"  plain loop      test AUROC {aurocs[-1]:.3f} after {len(aurocs)} epochs, "
        f"best {aurocs[best]:.3f} at epoch {best + 1} ({plain_s / 60:.1f} min; per "
        f"epoch {' '.join(f'{a:.3f}' for a in aurocs)})",
        f"  medtrain fit    test AUROC {auc:.3f}   (target >= plain best + 0.05 = "
        f"{goal:.3f}: {verdict(auc >= goal)})",
        f"  pointing game   {'-' if game is None else f'{game:.3f}'}; test "
        f"sensitivity {figures['sensitivity']:.3f}, specificity "
        f"{figures['specificity']:.3f} at threshold {figures['threshold']:.3f}",
    ]


def pretrained(work: Path, device: str) -> list[str]:
    train, test = make_data(work, "realistic", ["--background", "pydicom-data"])
    unlabelled = work / "pretrain" / "unlabelled"
    if not (unlabelled / "labels.csv").is_file():
        progress("pretrain: writing 600 unlabelled images (seed 3)")
        argv = ["synth", str(unlabelled), "--n", "600", "--seed", "3"]
        run([*argv, "--size", "128", "--background", "pydicom-data"])
    weights = work / "pretrain" / "ssl.safetensors"
    progress("pretrain: medtrain pretrain at its defaults")
    started = time.perf_counter()
    log = run(
        [
            "pretrain",
            str(unlabelled / "dicom"),
            "--out",
            str(weights),
            "--device",
            device,
            "--cache",
            str(work / "pretrain" / "cache"),
        ]
    )
    pretrain_s = time.perf_counter() - started
    print(log, end="")
    fit_s, figures, _ = fit_and_evaluate(
        work, "pretrain", train, test, device, ("--init-weights", str(weights))
    )
    scratch = work / "realistic" / "model.safetensors"
    versus = "no fit from scratch in this --work to compare"
    if scratch.is_file():
        progress("pretrain: evaluating the realistic set's model from scratch")
        before = json.loads(run(["evaluate", str(scratch), str(test), "--json"]))
        versus = f"from scratch (the realistic set's fit): {before['auroc']:.3f}"
    return [
        "realistic set with self-supervised starting weights (600 unlabelled images)",
        f"  pretrain        {pretrain_s / 60:6.1f} min, then fit --init-weights "
        f"{fit_s / 60:.1f} min ({(pretrain_s + fit_s) / 60:.1f} min in all)",
        f"  test AUROC      {figures['auroc']:.3f}; {versus}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for data and models")
    parser.add_argument(
        "--sets",
        default=",".join(DEFAULT_SETS),
        help="comma-separated: synthetic, realistic, pretrain (default: the first two)",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = sorted(set(sets) - set(SETS))
    if unknown or not sets:
        parser.error(f"--sets: expected some of {', '.join(SETS)}, found {args.sets}")
    lines: list[str] = []
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        for name in sets:
            lines += {
                "synthetic": synthetic,
                "realistic": realistic,
                "pretrain": pretrained,
            }[name](work, args.device)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
