"""``medtrain export``: a deployment variant of a model, measured against it.

int8 (static: activation ranges calibrated on images of DIR) and ONNX (the
trunk as an ONNX graph, run by onnxruntime) for CPU serving, fp16 / bf16 weights
for GPU serving. The variant carries the source's metadata
(labels, thresholds, preprocessing), a Device UID of its own and what was
measured on DIR against the source, as the node runs both (:class:`Classifier`):
AUROC and its change, the largest probability difference, agreement at each
label's threshold, and images/s. A variant whose AUROC drops by more than the
tolerance is refused (nothing is written).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.uid import generate_uid

from inference import Classifier, ModelArtifact, file_sha256
from inference.variants import (
    ONNX_OPSET,
    VARIANTS,
    check_onnx_export,
    observer_state,
    onnx_graph,
    onnxruntime_version,
    prepare_int8,
)
from training.data import DataError, load_samples
from training.engine import load_frames
from training.metrics import auroc
from training.progress import Progress

__all__ = ["CALIBRATION_IMAGES", "Exported", "check_tolerance", "export"]

CALIBRATION_IMAGES = 128  # of DIR, for int8's activation ranges
_BATCH = 8  # the node's batch of frames


@dataclass(frozen=True, slots=True)
class Exported:
    """A variant and what was measured.

    Parameters
    ----------
    artifact
        The variant (not yet saved).
    measured
        Also in ``artifact.variant["measured"]``.
    """

    artifact: ModelArtifact
    measured: dict[str, Any]


def export(
    source: ModelArtifact,
    source_path: Path,
    kind: str,
    data: Path,
    tolerance: float,
    device: torch.device,
    cache: Path | None = None,
    progress: Progress | None = None,
) -> Exported:
    """Make a deployment variant of ``source`` and measure it on ``data``.

    Parameters
    ----------
    source
        The model as trained.
    source_path
        Its file (for its SHA-256 in the variant's record).
    kind
        int8, fp16, bf16 or onnx.
    data
        Labelled held-out images (a ``labels.csv`` folder, as ``fit`` reads);
        int8 calibrates on up to :data:`CALIBRATION_IMAGES` of them.
    tolerance
        The largest AUROC drop accepted.
    device
        Where both models run for the measurement (int8 and onnx run on the
        CPU).
    cache
        Preprocessing cache folder, or None.
    progress
        Called with 1 after each image preprocessed.

    Returns
    -------
    Exported
        The variant and its measurement.

    Raises
    ------
    DataError
        If the data cannot measure it (one class only), or the AUROC drops by
        more than ``tolerance``.
    ArtifactError
        If the variant cannot be made here (no quantized engine, no ONNX
        exporter or onnxruntime).
    ValueError
        If ``kind`` or ``tolerance`` is not valid.
    """
    if kind not in VARIANTS:
        raise ValueError(
            f"--format: expected one of {', '.join(VARIANTS)}, found {kind!r}"
        )
    if not tolerance >= 0:
        raise ValueError(f"--tolerance: expected >= 0, found {tolerance}")
    if source.variant:
        raise DataError(
            f"{source_path} is already a variant ({source.variant.get('format')}); "
            "export from the model fit wrote"
        )
    if kind == "onnx":
        check_onnx_export()  # before minutes of preprocessing, not after
    label = source.labels[0]
    frames = load_frames(
        load_samples(data), label.name, source.preprocessing, cache, progress
    )
    y = frames.y.numpy()
    if len(set(y.tolist())) < 2:
        raise DataError(
            f"{data}: the measurement needs images with and without "
            f"'{label.name}'; found one class only"
        )
    if kind == "int8":
        device = torch.device("cpu")
        spec = source.preprocessing
        prepared = prepare_int8(source.build(), spec.channels, spec.size)
        # A seeded sample of DIR, whatever its order (a CSV sorted by class).
        sample = torch.randperm(len(frames), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            chosen = sample[:CALIBRATION_IMAGES]
            for start in range(0, len(chosen), 16):
                prepared(frames.x[chosen[start : start + 16]])
        variant_fields: dict[str, Any] = {"quantization": observer_state(prepared)}
    elif kind == "onnx":
        # Checked against the PyTorch model in onnxruntime below, as the node
        # runs it.
        device = torch.device("cpu")
        spec = source.preprocessing
        variant_fields = {
            "onnx_graph": onnx_graph(source.build(), spec.channels, spec.size)
        }
    else:
        dtype = torch.float16 if kind == "fp16" else torch.bfloat16
        variant_fields = {
            "state_dict": {
                k: v.to(dtype) if v.is_floating_point() else v
                for k, v in source.state_dict.items()
            }
        }
    record: dict[str, Any] = {
        "format": kind,
        "torch": torch.__version__,
        "source": {
            "name": source.name,
            "version": source.version,
            "device_uid": source.device_uid,
            "sha256": file_sha256(source_path),
        },
    }
    if kind == "int8":
        # Of the images measured: calibration needs no labels, only ranges.
        record["calibration_images"] = min(len(frames), CALIBRATION_IMAGES)
    if kind == "onnx":
        record["opset"] = ONNX_OPSET
        record["onnxruntime"] = onnxruntime_version()
    variant = replace(
        source,
        device_uid=str(generate_uid()),
        variant=record,
        **variant_fields,
    )
    before, before_speed = _run(source, frames.x, device)
    after, after_speed = _run(variant, frames.x, device)
    thresholds = np.array([lab.threshold for lab in source.labels])
    auc_before, auc_after = auroc(before[:, 0], y), auroc(after[:, 0], y)
    measured = {
        "images": len(frames),
        "device": device.type,
        "label": label.name,
        "auroc_source": auc_before,
        "auroc": auc_after,
        "auroc_delta": auc_after - auc_before,
        "largest_probability_difference": float(np.abs(after - before).max()),
        "agreement_at_threshold": float(
            np.mean((after >= thresholds) == (before >= thresholds))
        ),
        "images_per_s_source": before_speed,
        "images_per_s": after_speed,
        "speedup": after_speed / before_speed,
        "tolerance": tolerance,
    }
    check_tolerance(kind, data, auc_before, auc_after, tolerance)
    record["measured"] = measured
    return Exported(replace(variant, variant=record), measured)


def check_tolerance(
    kind: str, data: Path, source_auroc: float, variant_auroc: float, tolerance: float
) -> None:
    """Refuse a variant whose AUROC on ``data`` drops by more than ``tolerance``.

    Raises
    ------
    DataError
        Naming both figures and the tolerance.
    """
    drop = source_auroc - variant_auroc
    if drop > tolerance:
        raise DataError(
            f"the {kind} variant's AUROC on {data} is {variant_auroc:.4f} against "
            f"the source's {source_auroc:.4f}, a drop of {drop:.4f} over "
            f"--tolerance {tolerance}; nothing written"
        )


def _run(
    artifact: ModelArtifact, x: torch.Tensor, device: torch.device
) -> tuple[np.ndarray[Any, np.dtype[np.float64]], float]:
    """Probabilities [N, labels] as the node computes them, and images/s."""
    classifier = Classifier(artifact, device=str(device), trace=True)
    classifier.forward(x[:_BATCH])  # warm up
    probabilities, seconds = [], []
    for start in range(0, len(x), _BATCH):
        started = time.perf_counter()
        p, _ = classifier.forward(x[start : start + _BATCH])
        seconds.append((time.perf_counter() - started) / len(p))
        probabilities.append(p)
    speed = 1 / statistics.median(seconds)
    return torch.cat(probabilities).double().numpy(), speed
