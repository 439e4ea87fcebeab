"""The report folder of a training run: numbers, curves and a model card."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference import ModelArtifact
from training.metrics import roc_curve

__all__ = ["overlay_png", "pyplot", "write_report"]


def pyplot() -> Any:
    """Return matplotlib.pyplot, drawing to files."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    return plt


def _clean(value: Any) -> Any:
    # JSON has no NaN: write null.
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_report(
    folder: Path,
    artifact: ModelArtifact,
    history: Sequence[dict[str, float]],
    metrics: dict[str, Any],
    config: dict[str, Any],
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.float64],
    examples: Sequence[
        tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]
    ] = (),
) -> None:
    """Write metrics.json, history.csv, config.json, plots and model-card.md.

    Parameters
    ----------
    folder
        The report folder (created).
    artifact
        The trained model.
    history
        One row per epoch.
    metrics
        The figures to report.
    config
        The resolved training configuration.
    scores
        Validation probabilities (for ROC, confusion matrix, calibration).
    labels
        Validation labels.
    examples
        (image in [0, 1], heatmap, probability) triples to draw with Grad-CAM.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(_clean(metrics), indent=2) + "\n")
    (folder / "config.json").write_text(
        json.dumps(config, indent=2, default=str) + "\n"
    )
    if history:
        with (folder / "history.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    plt = pyplot()
    threshold = artifact.labels[0].threshold

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    ax[0].plot(epochs, [h["train_loss"] for h in history], label="training")
    ax[0].plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax[0].set(xlabel="epoch", ylabel="loss", title="Loss")
    ax[0].legend()
    ax[1].plot(epochs, [h["val_auroc"] for h in history], color="C2")
    ax[1].set(xlabel="epoch", ylabel="AUROC", title="Validation AUROC", ylim=(0.4, 1.0))
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    fpr, tpr, _ = roc_curve(scores, labels)
    ax[0].plot(fpr, tpr)
    ax[0].plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax[0].set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (validation)")
    predicted = scores >= threshold
    matrix = np.array(
        [
            [np.sum(~predicted & (labels == 0)), np.sum(predicted & (labels == 0))],
            [np.sum(~predicted & (labels == 1)), np.sum(predicted & (labels == 1))],
        ]
    )
    ax[1].imshow(matrix, cmap="Blues")
    for (i, j), n in np.ndenumerate(matrix):
        ax[1].text(j, i, str(n), ha="center", va="center", fontsize=14)
    name = artifact.labels[0].name
    ax[1].set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["absent", "present"],
        yticklabels=["absent", "present"],
        xlabel="predicted",
        ylabel="true",
        title=f"{name} at threshold {threshold:.3f}",
    )
    bins = np.linspace(0, 1, 11)
    index = np.clip(np.digitize(scores, bins) - 1, 0, 9)
    observed = [
        labels[index == b].mean() if np.any(index == b) else np.nan for b in range(10)
    ]
    ax[2].plot((bins[:-1] + bins[1:]) / 2, observed, "o-")
    ax[2].plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax[2].set(
        xlabel="predicted probability", ylabel="observed rate", title="Calibration"
    )
    fig.tight_layout()
    fig.savefig(folder / "evaluation.png", dpi=100)
    plt.close(fig)

    if examples:
        fig, axes = plt.subplots(1, len(examples), figsize=(3 * len(examples), 3.3))
        for ax_i, (image, heatmap, probability) in zip(
            np.atleast_1d(axes), examples, strict=True
        ):
            ax_i.imshow(image, cmap="gray")
            ax_i.imshow(heatmap, cmap="jet", alpha=0.35)
            ax_i.set_title(f"p({name}) = {probability:.2f}")
            ax_i.axis("off")
        fig.tight_layout()
        fig.savefig(folder / "gradcam.png", dpi=100)
        plt.close(fig)

    _model_card(folder / "model-card.md", artifact, metrics, config)


def _model_card(
    path: Path, artifact: ModelArtifact, metrics: dict[str, Any], config: dict[str, Any]
) -> None:
    label = artifact.labels[0]
    data = artifact.training.get("data", {})
    spec = artifact.preprocessing
    modalities = ", ".join(artifact.accepts.get("modalities", [])) or "any"
    rule = metrics.get("threshold_rule", "")

    def figure(value: Any) -> str:
        return (
            "n/a"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else f"{value:.3f}"
        )

    rows = []
    for split in ("val", "test"):
        m = metrics.get(split)
        if isinstance(m, dict):
            rows.append(
                f"| {split} | {m.get('frames', '')} | {figure(m.get('auroc'))} | "
                f"{figure(m.get('sensitivity'))} | {figure(m.get('specificity'))} |"
            )
    lines = [
        f"# Model card: {artifact.name} {artifact.version}",
        "",
        f"- Device UID: `{artifact.device_uid}` (new for this training run)",
        f"- Architecture: {artifact.architecture}, input {spec.channels} x "
        f"{spec.size[0]} x {spec.size[1]}",
        f"- Finding: {label.name} = ({label.concept.value}, {label.concept.scheme}, "
        f'"{label.concept.meaning}")',
        f"- Operating threshold: {label.threshold:.4f} ({rule})",
        f"- Study score: {artifact.aggregation} over frames",
        f"- Accepts modalities: {modalities}",
        f"- Heatmaps: {_heatmaps(artifact, metrics)}",
        "",
        "## Data",
        "",
        f"{data.get('images', '?')} images of {data.get('patients', '?')} patients; "
        f"{data.get('train_frames', '?')} training and {data.get('val_frames', '?')} "
        "validation frames, split by patient.",
        "",
        "## Results",
        "",
        "| split | frames | AUROC | sensitivity | specificity |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "## Intended use and limits",
        "",
        "A decision aid that marks studies for a radiologist's attention; not a "
        "diagnosis. Its figures hold for data like its training data only: check "
        "them on your own before clinical use. Heatmaps (Grad-CAM) show where the "
        "model looked, not the "
        "boundary of a finding.",
        "",
        "## Training configuration",
        "",
        "```json",
        json.dumps(config, indent=2, default=str),
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def overlay_png(
    path: Path,
    image: npt.NDArray[np.float32],
    heatmap: npt.NDArray[np.float32],
    title: str,
) -> None:
    """Write a PNG of an image with its heatmap over it and a title.

    Parameters
    ----------
    path
        The PNG to write.
    image
        Grayscale image in [0, 1].
    heatmap
        Heatmap in [0, 1] of the same size.
    title
        Text above the image (the score).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5.4))
    ax.imshow(image, cmap="gray")
    shown = ax.imshow(heatmap, cmap="jet", alpha=0.35, vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="Grad-CAM")
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _heatmaps(artifact: ModelArtifact, metrics: dict[str, Any]) -> str:
    text = f"Grad-CAM at {artifact.gradcam_layer}"
    measured = metrics.get("gradcam_offset")
    if not isinstance(measured, dict):
        return text + ", cells drawn at their receptive fields' centres"
    rows, columns = artifact.gradcam_offset
    return (
        f"{text}, drawn ({rows:+.1f}, {columns:+.1f}) input px from the cells' "
        f"centres, as measured on {measured['lesions']} validation lesions "
        f"(validation pointing game {measured['val_pointing_game_before']:.3f} "
        f"without, {measured['val_pointing_game']:.3f} with)"
    )
