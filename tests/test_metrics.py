"""Training metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import (
    auroc,
    binary_metrics,
    calibration_error,
    pointing_game,
    roc_curve,
    threshold_for_sensitivity,
    youden_threshold,
)


def test_auroc_known_values() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # 3 positive-negative pairs of 4 ordered correctly, one tie counted half.
    assert auroc([0.1, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.875)
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_auroc_matches_the_area_under_roc_curve() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = labels * 0.6 + rng.random(200)
    fpr, tpr, _ = roc_curve(scores, labels)

    assert auroc(scores, labels) == pytest.approx(float(np.trapezoid(tpr, fpr)))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_thresholds() -> None:
    scores = [0.1, 0.3, 0.35, 0.6, 0.8, 0.9]
    labels = [0, 0, 1, 0, 1, 1]

    assert youden_threshold(scores, labels) == pytest.approx(0.35)
    assert threshold_for_sensitivity(scores, labels, 1.0) == pytest.approx(0.35)
    assert threshold_for_sensitivity(scores, labels, 0.6) == pytest.approx(0.8)


def test_binary_metrics_at_a_threshold() -> None:
    m = binary_metrics([0.1, 0.4, 0.6, 0.9], [0, 1, 0, 1], 0.5)

    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (1, 1, 1, 1)
    assert (
        m["accuracy"]
        == m["sensitivity"]
        == m["specificity"]
        == m["ppv"]
        == m["npv"]
        == 0.5
    )


def test_calibration_error() -> None:
    assert calibration_error([0.0, 0.0, 1.0, 1.0], [0, 0, 1, 1]) == 0.0
    assert calibration_error([0.9] * 10, [1] * 5 + [0] * 5) == pytest.approx(0.4)


def test_pointing_game() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 1] = True
    hit = np.zeros((4, 4))
    hit[1, 1] = 1.0
    miss = np.zeros((4, 4))
    miss[3, 3] = 1.0

    assert pointing_game([hit, miss], [mask, mask]) == 0.5
    with pytest.raises(ValueError, match="differ in size"):
        pointing_game([np.zeros((2, 2))], [mask])
