"""Offline scoring: the node's scoring and result writing, on files."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.config import ModelMatch
from dicom_node.dimse import is_decode_error
from dicom_node.eligibility import (
    NO_PIXEL_DATA,
    instance_problem,
    match_problem,
    model_match,
)
from dicom_node.errors import DicomNodeError
from dicom_node.export import find_files
from dicom_node.identity import node_device_uid
from dicom_node.log import describe_exception
from dicom_node.results import NodeIdentity
from dicom_node.results.build import build_results
from dicom_node.results.store import (
    capture_png,
    remove_result_files,
    write_result_files,
)
from dicom_node.storage import validate_uid
from inference import Classifier, InferenceError, ModelArtifact, StudyPrediction

# The observer device name of results written by `dicom-node score`.
OFFLINE_STATION = "DICOMNODE-SCORE"

__all__ = [
    "ScoreRun",
    "StudySummary",
    "capture_png",
    "score_run",
    "sr_text",
    "write_result_files",
]


@dataclass(slots=True)
class StudySummary:
    """One scored study: its labels and where its results were written.

    Parameters
    ----------
    study_uid
        The Study Instance UID.
    images
        Images scored.
    labels
        Per label: name, finding, probability, positive, threshold.
    folder
        Where the SR and Secondary Captures are.
    pngs
        The Grad-CAM images as PNG.
    """

    study_uid: str
    images: int
    labels: list[dict[str, Any]]
    folder: Path
    pngs: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-able values."""
        return {
            "study_instance_uid": self.study_uid,
            "images": self.images,
            "labels": self.labels,
            "folder": str(self.folder),
            "gradcam_png": [str(p) for p in self.pngs],
        }

    def text(self) -> str:
        """Return the summary as lines a person reads."""
        lines = [f"study {self.study_uid} ({self.images} image(s)) -> {self.folder}"]
        for label in self.labels:
            lines.append(
                f"  {label['finding']}: {'Present' if label['positive'] else 'Absent'}"
                f"  probability {100 * label['probability']:.1f} %"
                f"  (threshold {100 * label['threshold']:.1f} %)"
            )
        return "\n".join(lines)


@dataclass(slots=True)
class ScoreRun:
    """What a ``score`` run did: the studies scored and the files passed over.

    Parameters
    ----------
    studies
        One summary per study scored, in the order first seen.
    passed_over
        Files not scored, counted per reason (``"not an image: Segmentation
        Storage"``, ``"modality not in ['DX']"``, ...).
    match
        The rule applied: the model's accepted modalities, body parts and SOP
        classes, as the options replaced them.
    not_accepted
        The reasons in ``passed_over`` that come from ``match`` (images the
        model does not accept), not from the files themselves.
    failed
        Studies that could not be scored or written: Study Instance UID and
        why (the node's own message, or the error's type and where; no values
        of the files).
    """

    studies: list[StudySummary]
    passed_over: dict[str, int]
    match: ModelMatch
    not_accepted: frozenset[str] = frozenset()
    failed: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the run as JSON-able values."""
        return {
            "studies": [s.to_dict() for s in self.studies],
            "failed": [
                {"study_instance_uid": study, "reason": reason}
                for study, reason in self.failed
            ],
            "passed_over": dict(self.passed_over),
            "accepts": {
                "modalities": list(self.match.modalities),
                "body_parts": list(self.match.body_parts),
                "sop_classes": list(self.match.sop_classes),
            },
        }

    def passed_over_text(self) -> str:
        """Return the files passed over as lines a person reads; empty if none."""
        if not self.passed_over:
            return ""
        total = sum(self.passed_over.values())
        lines = [f"passed over {total} file(s):"]
        for reason, count in sorted(
            self.passed_over.items(), key=lambda item: (-item[1], item[0])
        ):
            lines.append(f"  {count:5d}  {reason}")
        return "\n".join(lines)

    def text(self) -> str:
        """Return the studies and the files passed over as lines a person reads."""
        parts = [s.text() for s in self.studies]
        parts += [f"study {study} FAILED: {reason}" for study, reason in self.failed]
        if self.passed_over:
            parts.append(self.passed_over_text())
        return "\n".join(parts)


def score_run(
    paths: Sequence[Path],
    model: Path,
    out: Path,
    *,
    device: str = "",
    gradcam_top_k: int = 1,
    jpeg: bool = False,
    parametric_map: bool = False,
    explain_absent: bool = False,
    modalities: Sequence[str] | None = None,
    body_parts: Sequence[str] | None = None,
    sop_classes: Sequence[str] | None = None,
    any_image: bool = False,
) -> ScoreRun:
    """Score DICOM files per study the way the node does; write each result set.

    An instance is scored when the node would score it with this model
    (:func:`dicom_node.eligibility.passed_over_reason`): an image storage SOP
    class, not a result of the node, of a modality, body part and SOP class the
    model accepts (each list replaced when given here).

    Parameters
    ----------
    paths
        Files and folders (searched recursively).
    model
        The model file.
    out
        Results go to ``out/<Study Instance UID>/``.
    device
        cpu or cuda; empty for CUDA when present.
    gradcam_top_k
        Images explained per label.
    jpeg
        Secondary Captures as JPEG baseline.
    parametric_map
        Also the raw Grad-CAM as a Parametric Map, for images with patient
        geometry.
    explain_absent
        Also picture the Grad-CAM of findings called absent.
    modalities
        When given, replaces the model's accepted Modality values.
    body_parts
        When given, replaces the model's accepted Body Part Examined values.
    sop_classes
        When given, replaces the model's accepted SOP Class UIDs.
    any_image
        Ignore the model's accepted lists: every image storage instance is
        scored (unless ``modalities``, ``body_parts`` or ``sop_classes`` restrict).

    Returns
    -------
    ScoreRun
        The studies scored, and the files passed over with the reasons; no
        study when nothing was eligible.
    """
    artifact = ModelArtifact.load(model)
    match = model_match(
        {} if any_image else artifact.accepts,
        modalities=modalities,
        body_parts=body_parts,
        sop_classes=sop_classes,
    )
    studies, passed_over, not_accepted = _select(paths, match)
    summaries: list[StudySummary] = []
    if not studies:
        return ScoreRun(summaries, passed_over, match, not_accepted)
    classifier = Classifier(artifact, device or None)
    # Each invocation's objects get UIDs of their own: never those of the node's
    # runs (a PACS keeps the first copy of a UID and drops the next).
    run_key = f"offline-{uuid.uuid4()}"
    node = NodeIdentity(OFFLINE_STATION, node_device_uid(OFFLINE_STATION))
    failed: list[tuple[str, str]] = []
    for study, datasets in studies.items():
        try:  # one study that cannot be scored does not stop the others
            prediction = classifier.predict(datasets, explain_top_k=gradcam_top_k)
            result = build_results(
                datasets,
                prediction,
                1,
                node=node,
                run_key=run_key,
                jpeg=jpeg,
                parametric_map=parametric_map,
                explain_absent=explain_absent,
            )
            folder = out / study
            pngs = write_result_files(folder, result)
        except Exception as exc:  # noqa: BLE001 - reported per study
            # The node's and the model runtime's own messages hold no values of
            # the files (as a job's reason); any other error by type and place.
            own = isinstance(exc, DicomNodeError | InferenceError)
            reason = str(exc) if own else describe_exception(exc)
            # An earlier run's results of the study would read as this run's.
            try:
                remove_result_files(out / study)
            except OSError as kept:
                reason += f"; an earlier run's files left ({type(kept).__name__})"
            failed.append((study, reason))
            continue
        summaries.append(_summary(study, len(datasets), prediction, folder, pngs))
    return ScoreRun(summaries, passed_over, match, not_accepted, failed)


def _select(
    paths: Sequence[Path], match: ModelMatch
) -> tuple[dict[str, list[Dataset]], dict[str, int], frozenset[str]]:
    """Read the files; group those to score by study, count the others by reason.

    Returns the studies, the counts, and which reasons come from the match.
    """
    studies: dict[str, list[Dataset]] = {}
    passed_over: Counter[str] = Counter()
    not_accepted: set[str] = set()
    for path, _ in find_files(paths):
        try:
            ds = dcmread(path)
        except Exception as exc:
            if not is_decode_error(exc):
                raise
            passed_over["not a DICOM file pydicom can read"] += 1
            continue
        sop_class_uid = str(ds.get("SOPClassUID", "")) or str(
            ds.file_meta.get("MediaStorageSOPClassUID", "")
        )
        reason = instance_problem(ds, sop_class_uid)
        if reason == NO_PIXEL_DATA:
            # Every image IOD has Pixel Data (or Float Pixel Data): pydicom
            # reads a truncated file without raising, and keeps what it read.
            reason = "an image without pixel data: the file is damaged or truncated"
        if not reason:
            reason = match_problem(ds, sop_class_uid, match)
            if reason:
                not_accepted.add(reason)
        if not reason:
            try:
                study = validate_uid(ds.get("StudyInstanceUID", ""), "StudyInstanceUID")
            except ValueError:
                reason = "no valid Study Instance UID"
            else:
                studies.setdefault(study, []).append(ds)
                continue
        passed_over[reason] += 1
    return studies, dict(passed_over), frozenset(not_accepted)


def _summary(
    study: str,
    images: int,
    prediction: StudyPrediction,
    folder: Path,
    pngs: list[Path],
) -> StudySummary:
    return StudySummary(
        study,
        images,
        [
            {
                "label": p.label.name,
                "finding": p.label.concept.meaning,
                "probability": p.probability,
                "positive": p.positive,
                "threshold": p.label.threshold,
            }
            for p in prediction.labels
        ],
        folder,
        pngs,
    )


def sr_text(sr: Dataset) -> str:
    """Render an SR's content tree as indented text (what a reader sees).

    Parameters
    ----------
    sr
        The Structured Report.

    Returns
    -------
    str
        One line per content item: ``name: value``.
    """
    lines = [str(sr.ConceptNameCodeSequence[0].CodeMeaning)]

    def walk(items: Sequence[Dataset], depth: int) -> None:
        for item in items:
            name = (
                str(item.ConceptNameCodeSequence[0].CodeMeaning)
                if item.get("ConceptNameCodeSequence")
                else ""
            )
            kind = str(item.get("ValueType", ""))
            value = ""
            if kind == "TEXT":
                value = str(item.TextValue)
            elif kind == "CODE":
                value = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif kind == "NUM":
                measured = item.MeasuredValueSequence[0]
                unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
                value = f"{measured.NumericValue} {unit}"
            elif kind == "UIDREF":
                value = str(item.UID)
            elif kind == "IMAGE":
                reference = item.ReferencedSOPSequence[0]
                value = "image " + str(reference.ReferencedSOPClassUID.name)
                if "ReferencedFrameNumber" in reference:
                    value += f", frame {reference.ReferencedFrameNumber}"
            elif kind == "PNAME":
                value = str(item.PersonName)
            elif kind == "SCOORD":
                data = [float(v) for v in item.GraphicData]
                points = ", ".join(
                    f"({x:g}, {y:g})"
                    for x, y in zip(data[::2], data[1::2], strict=True)
                )
                value = f"{item.GraphicType} {points} (column, row)"
            lines.append("  " * depth + (f"{name}: {value}" if value else name))
            if "ContentSequence" in item and kind != "IMAGE":
                walk(item.ContentSequence, depth + 1)

    walk(sr.get("ContentSequence", []), 1)
    return "\n".join(lines)
