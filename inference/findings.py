"""What a model says, as plain data: labels, codes, predictions, heatmaps.

Free of PyTorch, so that what reads a prediction (the result builders, in a
process of their own) does not load the runtime that made it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from inference.pixels import FrameSource

__all__ = [
    "CodedConcept",
    "Explanation",
    "Label",
    "LabelPrediction",
    "StudyPrediction",
    "text_problem",
]


def text_problem(value: str, most: int | None = None) -> str | None:
    """Say why a text cannot be one DICOM string value (PS3.5 6.2), or None.

    The model's name, version and codes are written into the result objects
    (LO, SH and UC values): a backslash would split a value in two, a control
    character is not allowed, and a Code Meaning (LO) holds 64 characters.

    Parameters
    ----------
    value
        The text.
    most
        Most characters it may have; None: no limit.

    Returns
    -------
    str or None
        The problem, e.g. ``"a backslash"``; None when the text is fit.
    """
    if "\\" in value:
        return "a backslash (it separates DICOM values)"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):  # C0, DEL, C1
        return "a control character"
    if most is not None and len(value) > most:
        return f"more than {most} characters"
    return None


@dataclass(frozen=True, slots=True)
class CodedConcept:
    """A coded concept (PS3.3 8.8): code value, coding scheme, code meaning.

    Parameters
    ----------
    value
        Code Value, e.g. ``27925004``.
    scheme
        Coding Scheme Designator, e.g. ``SCT``.
    meaning
        Code Meaning, e.g. ``Nodule``.
    """

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        """Check that each part is there and fits its DICOM value."""
        if not (self.value and self.scheme and self.meaning):
            raise ValueError("coded concept: value, scheme and meaning are required")
        for part, text, most in (
            ("value", self.value, None),
            ("scheme", self.scheme, 16),
            ("meaning", self.meaning, 64),
        ):
            problem = text_problem(text, most)
            if problem is not None:
                raise ValueError(f"coded concept: its {part} {text!r} has {problem}")


@dataclass(frozen=True, slots=True)
class Label:
    """One output of the model.

    Parameters
    ----------
    name
        Short name, e.g. ``nodule``.
    concept
        The finding's code, used in the SR.
    threshold
        Operating threshold on the probability: at or above is positive.
    finding_site
        Optional code of the anatomic site, e.g. (39607008, SCT, Lung).
    """

    name: str
    concept: CodedConcept
    threshold: float = 0.5
    finding_site: CodedConcept | None = None

    def __post_init__(self) -> None:
        """Check the name and the threshold."""
        if not self.name:
            raise ValueError("label: name is required")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"label {self.name}: threshold must be in [0, 1]")


@dataclass(frozen=True, slots=True)
class LabelPrediction:
    """The study-level result for one label.

    Parameters
    ----------
    label
        The label (name, code, threshold).
    probability
        Study-level probability by the artifact's aggregation rule.
    positive
        Whether ``probability`` reaches the label's operating threshold.
    top_frame
        Index (into the prediction's frames) of the highest-scoring frame.
    """

    label: Label
    probability: float
    positive: bool
    top_frame: int


@dataclass(frozen=True, slots=True)
class Explanation:
    """A Grad-CAM heatmap of one frame for one label.

    Parameters
    ----------
    label_index
        Which label it explains.
    frame
        Index into the prediction's frames.
    source
        Where that frame came from.
    probability
        The frame's probability for the label.
    heatmap
        float32 [rows, columns] in [0, 1], at the source image's resolution.
    """

    label_index: int
    frame: int
    source: FrameSource
    probability: float
    heatmap: npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class StudyPrediction:
    """What a model says about a study.

    Parameters
    ----------
    model_name
        The artifact's name.
    model_version
        The artifact's version.
    device_uid
        The artifact's Device UID.
    labels
        One per label, in the artifact's order.
    frames
        Every frame scored, in order.
    frame_probabilities
        float32 [frames, labels].
    explanations
        Grad-CAM heatmaps of the top frames.
    model_seconds
        Wall time of preprocessing and forward passes spent on this study (its
        share, by frames, of batches shared with other studies).
    gradcam_seconds
        Wall time of its Grad-CAM heatmaps.
    """

    model_name: str
    model_version: str
    device_uid: str
    labels: tuple[LabelPrediction, ...]
    frames: tuple[FrameSource, ...]
    frame_probabilities: npt.NDArray[np.float32]
    explanations: tuple[Explanation, ...] = ()
    model_seconds: float = 0.0
    gradcam_seconds: float = 0.0
