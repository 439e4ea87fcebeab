"""Looking inside a model: first-layer filters, stage activations, CAM and Grad-CAM.

``medtrain visualize MODEL [FILE...] --out DIR`` writes PNGs and ``DIR/index.html``
that shows them together:

* ``filters.png``: the first convolution's filters, each scaled to its own range;
* for each FILE, ``<name>-activations.png``: each ResNet stage's strongest
  activation maps (the channels of highest mean activation on that image);
* for each FILE, ``<name>-cams.png``: Grad-CAM at each stage (layer1 ... layer4)
  beside CAM (the head's weights on layer4's channels: CAM exists at layer4
  only, the stage the head reads).
"""

from __future__ import annotations

import html
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from inference import ModelArtifact
from inference.gradcam import gradcam_map, upsample
from training.data import Sample, preprocessed
from training.progress import Progress
from training.report import pyplot

__all__ = ["STAGES", "StageMaps", "Visualized", "stage_maps", "visualize"]

STAGES = ("layer1", "layer2", "layer3", "layer4")
TOP_CHANNELS = 8  # activation maps shown per stage

FloatImage = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Visualized:
    """What :func:`visualize` wrote.

    Parameters
    ----------
    index
        ``DIR/index.html``.
    images
        Every PNG, in the order the page shows them.
    """

    index: Path
    images: list[Path]


def visualize(
    artifact: ModelArtifact,
    files: Sequence[Path],
    out: Path,
    device: torch.device,
    progress: Progress | None = None,
) -> Visualized:
    """Write the filters, and each file's stage activations and heatmaps.

    Parameters
    ----------
    artifact
        The model.
    files
        DICOM, PNG or JPEG images (the first frame of a multi-frame one).
    out
        The folder (made when missing).
    device
        Where the model runs.
    progress
        Called with 1 after each file.

    Returns
    -------
    Visualized
        The page and the PNGs.

    Raises
    ------
    DataError
        If a file cannot be read as an image.
    """
    out.mkdir(parents=True, exist_ok=True)
    model = artifact.build().to(device).eval()
    label = artifact.labels[0]
    filters = out / "filters.png"
    _filter_grid(cast(Any, model).conv1.weight.detach().cpu(), filters)
    sections: list[str] = []
    images = [filters]
    names: set[str] = set()
    for path in files:
        frames = preprocessed(Sample(path, "", ""), artifact.preprocessing, None)
        x = frames[:1].to(device)
        maps = stage_maps(model, x, {artifact.gradcam_layer: artifact.gradcam_offset})
        probability = float(torch.sigmoid(torch.tensor(maps.logit)))
        name = _unique(path.stem, names)
        image = _unit(x[0].float().mean(dim=0).cpu().numpy())
        strongest = out / f"{name}-activations.png"
        _activation_grid(maps.activations, strongest)
        cams = out / f"{name}-cams.png"
        _cam_row(image, maps.gradcam, maps.cam, cams, artifact.gradcam_layer)
        verdict = "Present" if probability >= label.threshold else "Absent"
        sections.append(
            f"<section><h2>{html.escape(path.name)}</h2>"
            f"<p>p({html.escape(label.name)}) = {probability:.3f}: {verdict} at the "
            f"threshold {label.threshold:.2f}</p>"
            f"<h3>Grad-CAM at each stage, and CAM</h3>"
            f'<img src="{_src(cams.name)}" alt="heatmaps of '
            f'{html.escape(name)}">'
            f"<h3>Each stage's {TOP_CHANNELS} strongest activation maps</h3>"
            f'<img src="{_src(strongest.name)}" alt="activations of '
            f'{html.escape(name)}"></section>'
        )
        images += [cams, strongest]
        if progress is not None:
            progress(1)
    index = out / "index.html"
    index.write_text(_page(artifact, sections), encoding="utf-8")
    return Visualized(index, images)


@dataclass(frozen=True, slots=True)
class StageMaps:
    """What a model makes of one input, stage by stage.

    Parameters
    ----------
    activations
        Each stage's output [1, K, h, w].
    gradcam
        Grad-CAM of the first label at each stage, at the input's size, in [0, 1].
    cam
        CAM of the first label (the head's weights on layer4's channels) at the
        input's size, in [0, 1].
    logit
        The first label's logit.
    """

    activations: dict[str, torch.Tensor]
    gradcam: dict[str, FloatImage]
    cam: FloatImage
    logit: float


def stage_maps(
    model: nn.Module,
    x: torch.Tensor,
    offsets: Mapping[str, tuple[float, float]] | None = None,
) -> StageMaps:
    """Run one input [1, C, H, W] with the stages hooked; one backward for all.

    Parameters
    ----------
    model
        The ResNet, in eval mode.
    x
        The input.
    offsets
        Per stage, (rows, columns) in input pixels by which its heatmap is
        drawn displaced (the artifact's ``gradcam_offset`` at its layer).

    Returns
    -------
    StageMaps
        Activations, Grad-CAM at each stage, CAM and the logit.
    """
    kept: dict[str, torch.Tensor] = {}
    handles = [
        cast(nn.Module, getattr(model, stage)).register_forward_hook(
            lambda _m, _i, output, stage=stage: kept.__setitem__(stage, output)
        )
        for stage in STAGES
    ]
    try:
        with torch.enable_grad():
            logits = model(x.float())
            grads = torch.autograd.grad(logits[0, 0], [kept[s] for s in STAGES])
    finally:
        for handle in handles:
            handle.remove()
    activations = {s: kept[s].detach() for s in STAGES}
    size = x.shape[-2:]
    gradcam = {
        stage: upsample(
            gradcam_map(activations[stage], grad),
            size,
            (offsets or {}).get(stage, (0.0, 0.0)),
        )[0]
        .cpu()
        .numpy()
        for stage, grad in zip(STAGES, grads, strict=True)
    }
    fc: Any = cast(Any, model).fc
    linear: Any = fc[-1] if isinstance(fc, nn.Sequential) else fc  # dropout first
    weights = linear.weight.detach()[0]
    cam = torch.relu((weights[None, :, None, None] * activations["layer4"]).sum(1))
    cam = cam / cam.amax().clamp_min(1e-12)
    return StageMaps(
        activations,
        gradcam,
        upsample(cam, size)[0].cpu().numpy(),
        float(logits[0, 0].detach()),
    )


def _src(name: str) -> str:
    """Return a file name as an HTML attribute's URL (``#``, ``?``, ``%`` kept)."""
    return html.escape(urllib.parse.quote(name))


def _unit(values: npt.NDArray[Any]) -> FloatImage:
    """Scale to [0, 1] (a constant image becomes 0)."""
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.asarray(scaled, dtype=np.float32)


def _unique(stem: str, names: set[str]) -> str:
    name, n = stem, 1
    while name in names:
        n += 1
        name = f"{stem}-{n}"
    names.add(name)
    return name


def _filter_grid(weight: torch.Tensor, path: Path) -> None:
    """Draw the first convolution's filters [K, C, k, k] as a grid, one panel each."""
    plt = pyplot()
    count = weight.shape[0]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.6, rows * 0.6 + 0.4))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i >= count:
            continue
        kernel = weight[i].numpy()
        if kernel.shape[0] == 3:
            ax.imshow(_unit(kernel.transpose(1, 2, 0)), interpolation="nearest")
        else:
            ax.imshow(_unit(kernel.mean(axis=0)), cmap="gray", interpolation="nearest")
    fig.suptitle(f"conv1: {count} filters of {weight.shape[-1]}x{weight.shape[-2]}")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _activation_grid(activations: dict[str, torch.Tensor], path: Path) -> None:
    """Draw per stage (a row) the channels of highest mean activation."""
    plt = pyplot()
    fig, axes = plt.subplots(
        len(STAGES),
        TOP_CHANNELS,
        figsize=(TOP_CHANNELS * 1.3, len(STAGES) * 1.45),
        squeeze=False,
    )
    for row, stage in enumerate(STAGES):
        maps = activations[stage][0].float().cpu()
        strongest = maps.mean(dim=(1, 2)).argsort(descending=True)[:TOP_CHANNELS]
        for column, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if column >= len(strongest):
                ax.axis("off")
                continue
            channel = int(strongest[column])
            ax.imshow(_unit(maps[channel].numpy()), cmap="viridis")
            ax.set_title(f"#{channel}", fontsize=7)
            if column == 0:
                side = f"{maps.shape[-2]}x{maps.shape[-1]}"
                ax.set_ylabel(f"{stage}\n{side}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cam_row(
    image: FloatImage,
    heatmaps: dict[str, FloatImage],
    cam: FloatImage,
    path: Path,
    node_layer: str,
) -> None:
    """Draw the image under Grad-CAM at each stage, then under CAM."""
    plt = pyplot()
    panels = [
        (f"Grad-CAM {s}" + (" (the node's)" if s == node_layer else ""), heatmaps[s])
        for s in STAGES
    ] + [("CAM layer4", cam)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.7))
    for ax, (title, heatmap) in zip(axes, panels, strict=True):
        ax.imshow(image, cmap="gray")
        ax.imshow(heatmap, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _page(artifact: ModelArtifact, sections: list[str]) -> str:
    label = artifact.labels[0]
    side = artifact.preprocessing.size
    about = (
        f"{html.escape(artifact.name)} {html.escape(artifact.version)}: "
        f"{html.escape(artifact.architecture)}, {side[0]}x{side[1]} input, "
        f"{html.escape(label.name)} at threshold {label.threshold:.2f}; the node's "
        f"heatmaps are Grad-CAM at {html.escape(artifact.gradcam_layer)}"
    )
    files = "".join(sections) or "<p>No images given: the filters only.</p>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Inside {html.escape(artifact.name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:80em}"
        "img{max-width:100%;border:1px solid #ccc}</style></head><body>"
        f"<h1>Inside {html.escape(artifact.name)}</h1><p>{about}</p>"
        "<h2>First convolution's filters</h2>"
        '<img src="filters.png" alt="first convolution filters">'
        f"{files}</body></html>\n"
    )
