"""medtrain's recipe, one component at a time, on the realistic set.

What usually helps when data is small and the finding small, each measured
against ``medtrain fit`` at its defaults on the same data (bench/train.py's
realistic set: 600 training images, seed 1, and 300 test images, seed 2, at
128 px; nodules on crops of a real chest radiograph), one change per run:

* ``tta``: the defaults' model, its test probabilities averaged over the image
  and 7 augmented views of it (the training augmentation);
* ``swa``: the defaults' run, its last 4 epochs' weights averaged (BatchNorm
  statistics computed again on the training images);
* ``mixup``: ``--mixup 0.2``;
* ``augment``: twice the rotation, shift, zoom and intensity change;
* ``size``: a larger input (1.2x the side fit chooses, a multiple of 32);
* ``longer``: 1.5x the epochs (and the patience).

``tta`` and ``swa`` reuse the defaults' run; the others are a fit each (about
8-12 min on a 2-core CPU). Each row prints test AUROC and Grad-CAM pointing
game (``medtrain evaluate``) and the fit's time; a component pays when it
raises test AUROC without lowering the pointing game or passing 15 minutes.
fit is deterministic on one CPU, so single runs compare.

    python bench/recipe.py [--work DIR] [--components size,augment,...]
                           [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train import FIT_MINUTES, make_data, progress, run  # noqa: E402
from inference import ModelArtifact  # noqa: E402
from training.config import TrainConfig, choose  # noqa: E402
from training.data import load_samples  # noqa: E402
from training.engine import (  # noqa: E402
    Dataset,
    augment,
    evaluate,
    fit,
    load_frames,
    measure,
)
from training.metrics import auroc  # noqa: E402

COMPONENTS = ("tta", "swa", "mixup", "augment", "size", "longer")
TTA_VIEWS = 7
SWA_EPOCHS = 4


def changes(component: str, defaults: TrainConfig) -> dict[str, Any]:
    """The settings a fit-measured component changes from the defaults."""
    if component == "size":
        # The epochs kept: fit would choose fewer for a larger input.
        size = round(defaults.size * 1.2 / 32) * 32
        return {"size": size, "epochs": defaults.epochs, "patience": defaults.patience}
    if component == "augment":
        return {
            "rotation": defaults.rotation * 2,
            "translate": defaults.translate * 2,
            "scale": defaults.scale * 2,
            "intensity": defaults.intensity * 2,
        }
    if component == "longer":
        return {
            "epochs": int(defaults.epochs * 1.5),
            "patience": int(defaults.patience * 1.5),
        }
    if component == "mixup":
        return {"mixup": 0.2}
    raise ValueError(component)


def train_and_evaluate(
    work: Path,
    name: str,
    train: Path,
    test: Path,
    given: dict[str, Any],
    device: torch.device,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> tuple[float, dict[str, Any], Path, TrainConfig]:
    """fit (as ``medtrain fit`` does) with ``given``, save, ``medtrain evaluate``."""
    samples = load_samples(train)
    config, _ = choose(given, measure(samples))
    folder = work / "recipe" / name
    folder.mkdir(parents=True, exist_ok=True)
    progress(f"{name}: fit with {given or 'the defaults'}")
    started = time.perf_counter()
    result = fit(
        samples,
        config,
        folder / "model.ckpt",
        work / "recipe" / f"cache-{config.size}",
        device,
        log=lambda line: progress(f"  {line}"),
        on_epoch=on_epoch,
    )
    seconds = time.perf_counter() - started
    model = folder / "model.safetensors"
    result.artifact.save(model)
    return seconds, evaluated(model, test, device), model, config


def evaluated(model: Path, test: Path, device: torch.device) -> dict[str, Any]:
    """``medtrain evaluate --json`` of a model on the test images."""
    argv = ["evaluate", str(model), str(test), "--json", "--device", device.type]
    return dict(json.loads(run(argv)))


def frames_of(work: Path, artifact: ModelArtifact, folder: Path) -> Dataset:
    """A folder's frames in the model's preprocessing (through the recipe cache)."""
    spec = artifact.preprocessing
    cache = work / "recipe" / f"cache-{spec.size[0]}"
    return load_frames(load_samples(folder), artifact.labels[0].name, spec, cache)


def tta_auroc(
    work: Path, model: Path, test: Path, config: TrainConfig, device: torch.device
) -> float:
    """Test AUROC of the mean probability over the image and augmented views."""
    artifact = ModelArtifact.load(model)
    data = frames_of(work, artifact, test)
    net = artifact.build().to(device)
    _, plain = evaluate(net, data, device)
    views = [plain]
    generator = torch.Generator().manual_seed(0)
    for _ in range(TTA_VIEWS):
        x, _ = augment(data.x, config, generator)
        _, p = evaluate(net, replace(data, x=x), device)
        views.append(p)
    return auroc(np.mean(views, axis=0), data.y.numpy())


def swa_model(
    work: Path,
    model: Path,
    train: Path,
    states: list[dict[str, torch.Tensor]],
    device: torch.device,
) -> Path:
    """The model with the mean of ``states``' weights, BatchNorm recomputed."""
    artifact = ModelArtifact.load(model)
    net = artifact.build().to(device)
    mean = {
        k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
        for k, v in states[-1].items()
    }
    net.load_state_dict(mean)
    data = frames_of(work, artifact, train)
    loader = [data.x[i : i + 64].to(device) for i in range(0, len(data), 64)]
    torch.optim.swa_utils.update_bn(loader, net)
    out = model.with_name("model-swa.safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    replace(artifact, state_dict=state).save(out)
    return out


def row(name: str, figures: dict[str, Any], base: float, minutes: str) -> str:
    auc, game = figures["auroc"], figures.get("pointing_game")
    return (
        f"  {name:<10} test AUROC {auc:.3f} ({auc - base:+.3f})   pointing game "
        f"{'-' if game is None else f'{game:.3f}'}   {minutes}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="data and models (default: temp)")
    parser.add_argument(
        "--components",
        default=",".join(COMPONENTS),
        help=f"comma-separated, of {', '.join(COMPONENTS)} (default: all)",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    chosen = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(COMPONENTS))
    if unknown:
        parser.error(f"--components: unknown {', '.join(unknown)}")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as temp:
        work = args.work or Path(temp)
        train, test = make_data(work, "realistic", ["--background", "pydicom-data"])
        states: list[dict[str, torch.Tensor]] = []

        def keep(_: int, net: nn.Module) -> None:
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            states[:] = [*states[-(SWA_EPOCHS - 1) :], state]

        seconds, base, model, config = train_and_evaluate(
            work, "defaults", train, test, {}, device, keep
        )
        lines = [
            f"medtrain's recipe on the realistic set (600 / 300 at 128 px), one "
            f"change at a time; the defaults chose a {config.size}-px input",
            row("defaults", base, base["auroc"], f"fit {seconds / 60:.1f} min"),
        ]
        print(lines[-1], flush=True)
        for component in chosen:
            if component == "tta":
                auc = tta_auroc(work, model, test, config, device)
                figures = {"auroc": auc, "pointing_game": base.get("pointing_game")}
                extra = f"{TTA_VIEWS + 1} forwards per image"
            elif component == "swa":
                figures = evaluated(
                    swa_model(work, model, train, states, device), test, device
                )
                extra = f"mean of the last {len(states)} epochs' weights"
            else:
                given = changes(component, config)
                seconds, figures, _, _ = train_and_evaluate(
                    work, component, train, test, given, device
                )
                over = "" if seconds < FIT_MINUTES * 60 else " (over 15 min)"
                extra = f"fit {seconds / 60:.1f} min{over}; {given}"
            lines.append(row(component, figures, base["auroc"], extra))
            print(lines[-1], flush=True)
        print()
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
