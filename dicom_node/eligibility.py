"""Which instances a model scores: image storage SOP classes its match accepts."""

# The node's worker and offline `dicom-node score` both decide here, so the two
# pass over the same instances for the same reasons.

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node.config import ModelMatch
from dicom_node.identity import MANUFACTURER

__all__ = [
    "NO_PIXEL_DATA",
    "image_storage_problem",
    "instance_problem",
    "match_problem",
    "model_match",
    "passed_over_reason",
]

# Why an instance without Pixel Data (or Float Pixel Data) is not scored.
NO_PIXEL_DATA = "no pixel data"
# pydicom's UID dictionary names every image storage class "... Image Storage"
# (with "- For Presentation", "- For Processing", "- Trial" or " SOP Class"
# after it for some), the retired US, NM, XA Bi-Plane and VL classes included.
_IMAGE_STORAGE = re.compile(r"\bImage Storage\b")
# Image storage classes whose name does not say so.
_IMAGES_NAMED_OTHERWISE = frozenset({"Enhanced US Volume Storage"})
# Image storage classes of no diagnostic imaging: radiotherapy verification
# images (ARCHITECTURE: never RT), printed film sheets, baggage screening
# (DICOS) and industrial testing (DICONDE).
_NOT_SCORED_PREFIXES = (
    "RT ",
    "Enhanced RT ",
    "Enhanced Continuous RT ",
    "Hardcopy ",
    "DICOS ",
    "Eddy Current ",
)
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


def image_storage_problem(sop_class_uid: str) -> str:
    """Return why instances of a SOP class are never scored; empty for images.

    Only image storage SOP classes are scored: never Segmentation, RT (Dose,
    Structure Set, Plan, Image, ...), SR (all kinds, Key Object Selection
    included), Presentation States, Parametric Map, Real World Value Mapping,
    encapsulated documents, raw data, registration or waveforms.

    Parameters
    ----------
    sop_class_uid
        The instance's SOP Class UID.

    Returns
    -------
    str
        Empty when the class is an image storage class (CT, MR, CR, DX, MG, IO,
        US and its retired classes, NM, PET, XA/RF, VL, Secondary Capture, their
        enhanced and legacy-converted forms, ...); else the reason, naming the
        class, e.g. ``"not an image: Segmentation Storage"``.
    """
    uid = UID(sop_class_uid)
    if uid.type != "SOP Class":
        if not uid or len(uid) > 64 or _UID_PATTERN.fullmatch(uid) is None:
            return "not an image: no valid SOP Class UID"
        return f"not an image: unknown SOP class {uid}"
    name = uid.name
    if name in _IMAGES_NAMED_OTHERWISE or _IMAGE_STORAGE.search(name):
        if name.startswith(_NOT_SCORED_PREFIXES):
            return f"not a diagnostic image: {name}"
        return ""
    return f"not an image: {name}"


def model_match(
    accepts: Mapping[str, Sequence[str]],
    *,
    modalities: Sequence[str] | None = None,
    body_parts: Sequence[str] | None = None,
    sop_classes: Sequence[str] | None = None,
) -> ModelMatch:
    """Return the match a model file's ``accepts`` stands for, lists replaced.

    Parameters
    ----------
    accepts
        The artifact's accepted ``modalities``, ``body_parts`` and
        ``sop_classes``; a missing or empty list accepts any.
    modalities
        When given, replaces the model's modalities.
    body_parts
        When given, replaces the model's body parts.
    sop_classes
        When given, replaces the model's SOP classes.

    Returns
    -------
    ModelMatch
        The match, with no calling AE title restriction.
    """
    return ModelMatch(
        modalities=tuple(
            accepts.get("modalities", []) if modalities is None else modalities
        ),
        body_parts=tuple(
            accepts.get("body_parts", []) if body_parts is None else body_parts
        ),
        sop_classes=tuple(
            accepts.get("sop_classes", []) if sop_classes is None else sop_classes
        ),
    )


def instance_problem(ds: Dataset, sop_class_uid: str) -> str:
    """Return why no model scores an instance; empty when a model may.

    Parameters
    ----------
    ds
        The instance.
    sop_class_uid
        Its SOP Class UID (as indexed, or as read).

    Returns
    -------
    str
        Empty for an image with pixel data that the node did not write; else
        why not (:func:`image_storage_problem`, no pixel data, or a result of
        this node).
    """
    problem = image_storage_problem(sop_class_uid)
    if problem:
        return problem
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return NO_PIXEL_DATA
    if str(ds.get("Manufacturer", "")) == MANUFACTURER:
        return "a result of this node"
    return ""


def match_problem(
    ds: Dataset,
    sop_class_uid: str,
    match: ModelMatch,
    calling_ae_title: str | None = None,
) -> str:
    """Return why a match leaves an instance out; empty when it takes it.

    Parameters
    ----------
    ds
        The instance.
    sop_class_uid
        Its SOP Class UID.
    match
        Which images the model runs on.
    calling_ae_title
        Who sent it, for a match that restricts senders.

    Returns
    -------
    str
        Empty when each of the match's lists takes the instance; else the
        first list that does not, e.g. ``"modality not in ['DX']"``.
    """
    if match.modalities and str(ds.get("Modality", "")) not in match.modalities:
        return f"modality not in {list(match.modalities)}"
    body_parts = sorted({b.upper() for b in match.body_parts})
    if body_parts and str(ds.get("BodyPartExamined", "")).upper() not in body_parts:
        return f"body part not in {body_parts}"
    if match.sop_classes and sop_class_uid not in match.sop_classes:
        return f"SOP class not in {list(match.sop_classes)}"
    if match.calling_ae_titles and calling_ae_title not in match.calling_ae_titles:
        return f"sender not in {list(match.calling_ae_titles)}"
    return ""


def passed_over_reason(
    ds: Dataset,
    sop_class_uid: str,
    match: ModelMatch,
    calling_ae_title: str | None = None,
) -> str:
    """Return why a model does not score an instance; empty when it does.

    :func:`instance_problem` first (non-images, no pixel data, the node's own
    results are never scored), then :func:`match_problem`. The reasons name the
    rule, never a patient or study value, so they may go to the log and the
    index.

    Parameters
    ----------
    ds
        The instance.
    sop_class_uid
        Its SOP Class UID (as indexed, or as read).
    match
        Which images the model runs on (:func:`model_match` for a model file's
        own ``accepts``; ``ModelMatch()`` for every image).
    calling_ae_title
        Who sent it, for a match that restricts senders.

    Returns
    -------
    str
        Empty when the model scores the instance; else why not.
    """
    return instance_problem(ds, sop_class_uid) or match_problem(
        ds, sop_class_uid, match, calling_ae_title
    )
