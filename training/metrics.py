"""Binary classification metrics in numpy: AUROC, ROC, thresholds, calibration."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "auroc",
    "binary_metrics",
    "calibration_error",
    "pointing_game",
    "roc_curve",
    "threshold_for_sensitivity",
    "youden_threshold",
]

Floats = npt.NDArray[np.floating]


def _check(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[Floats, Floats]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(
            "scores and labels: expected two 1-D arrays of one length, "
            f"found {s.shape} and {y.shape}"
        )
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels: expected 0 or 1")
    return s, y


def auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half).

    Parameters
    ----------
    scores
        Higher means more likely positive.
    labels
        1 for positive, 0 for negative.

    Returns
    -------
    float
        AUROC, or NaN when one class is absent.
    """
    s, y = _check(scores, labels)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty_like(s)
    sorted_s = s[order]
    # Average ranks over ties.
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(
    scores: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[Floats, Floats, Floats]:
    """Return false-positive rates, true-positive rates and their thresholds.

    Parameters
    ----------
    scores
        Higher means more likely positive.
    labels
        1 for positive, 0 for negative.

    Returns
    -------
    tuple of numpy.ndarray
        fpr, tpr (both from 0 to 1) and the threshold of each point (predict
        positive when score >= threshold; the first is +inf).
    """
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.flatnonzero(np.diff(s)) if len(s) > 1 else np.array([], dtype=int)
    cut = np.concatenate((distinct, [len(s) - 1]))
    tps = np.cumsum(y)[cut]
    fps = (cut + 1) - tps
    n_pos, n_neg = max(y.sum(), 1.0), max((1 - y).sum(), 1.0)
    tpr = np.concatenate(([0.0], tps / n_pos))
    fpr = np.concatenate(([0.0], fps / n_neg))
    thresholds = np.concatenate(([np.inf], s[cut]))
    return fpr, tpr, thresholds


def youden_threshold(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Return the threshold that maximizes sensitivity + specificity - 1.

    Parameters
    ----------
    scores
        Validation scores.
    labels
        Validation labels.

    Returns
    -------
    float
        The operating threshold (0.5 when the curve is degenerate).
    """
    fpr, tpr, thresholds = roc_curve(scores, labels)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1 if len(j) > 1 else 0
    value = thresholds[best]
    return float(value) if np.isfinite(value) else 0.5


def threshold_for_sensitivity(
    scores: npt.ArrayLike, labels: npt.ArrayLike, target: float
) -> float:
    """Return the highest threshold whose sensitivity reaches ``target``.

    Parameters
    ----------
    scores
        Validation scores.
    labels
        Validation labels.
    target
        Wanted sensitivity, in (0, 1].

    Returns
    -------
    float
        The operating threshold.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity: expected (0, 1], found {target}")
    _, tpr, thresholds = roc_curve(scores, labels)
    reaching = np.flatnonzero(tpr >= target)
    value = thresholds[reaching[0]] if len(reaching) else thresholds[-1]
    return float(value) if np.isfinite(value) else 1.0


def binary_metrics(
    scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float
) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, PPV and NPV at a threshold.

    Parameters
    ----------
    scores
        Probabilities.
    labels
        1 for positive, 0 for negative.
    threshold
        Positive when score >= threshold.

    Returns
    -------
    dict
        The five rates (NaN where the denominator is zero) and the four counts.
    """
    s, y = _check(scores, labels)
    predicted = s >= threshold
    tp = float((predicted & (y == 1)).sum())
    tn = float((~predicted & (y == 0)).sum())
    fp = float((predicted & (y == 0)).sum())
    fn = float((~predicted & (y == 1)).sum())

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {
        "accuracy": ratio(tp + tn, tp + tn + fp + fn),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


def calibration_error(
    scores: npt.ArrayLike, labels: npt.ArrayLike, bins: int = 10
) -> float:
    """Return the expected calibration error over equal-width probability bins.

    Parameters
    ----------
    scores
        Probabilities in [0, 1].
    labels
        1 for positive, 0 for negative.
    bins
        Number of bins.

    Returns
    -------
    float
        The weighted mean |observed rate - mean probability| over the bins.
    """
    s, y = _check(scores, labels)
    index = np.minimum((s * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += inside.sum() * abs(y[inside].mean() - s[inside].mean())
    return float(total / len(s)) if len(s) else float("nan")


def pointing_game(
    heatmaps: Sequence[npt.NDArray[np.floating]], masks: Sequence[npt.NDArray[np.bool_]]
) -> float:
    """Fraction of heatmaps whose maximum falls inside the lesion mask.

    Parameters
    ----------
    heatmaps
        One per positive image, at the mask's resolution.
    masks
        The lesion masks.

    Returns
    -------
    float
        Hits / images (NaN for none).
    """
    if len(heatmaps) != len(masks):
        raise ValueError("heatmaps and masks: expected one mask per heatmap")
    if not heatmaps:
        return float("nan")
    hits = 0
    for heatmap, mask in zip(heatmaps, masks, strict=True):
        if heatmap.shape != mask.shape:
            raise ValueError(
                f"heatmap {heatmap.shape} and mask {mask.shape} differ in size"
            )
        hits += bool(mask.flat[int(np.argmax(heatmap))])
    return hits / len(heatmaps)
