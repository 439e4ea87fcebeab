"""Offline scoring: the node's scoring and result writing, on files."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.dimse import DECODE_ERRORS
from dicom_node.export import find_files
from dicom_node.identity import MANUFACTURER, node_device_uid
from dicom_node.results import NodeIdentity, build_results
from dicom_node.results.store import capture_png, write_result_files
from dicom_node.storage import validate_uid
from inference import Classifier, ModelArtifact, StudyPrediction

# The observer device name of results written by `dicom-node score`.
OFFLINE_STATION = "DICOMNODE-SCORE"

__all__ = [
    "StudySummary",
    "capture_png",
    "score_files",
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


def score_files(
    paths: Sequence[Path],
    model: Path,
    out: Path,
    *,
    device: str = "",
    gradcam_top_k: int = 1,
    jpeg: bool = False,
    parametric_map: bool = False,
    explain_absent: bool = False,
) -> list[StudySummary]:
    """Score DICOM files per study and write each study's result set.

    Parameters
    ----------
    paths
        Files and folders (searched recursively); non-DICOM files and objects
        without pixel data are passed over.
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

    Returns
    -------
    list of StudySummary
        One per study, in the order first seen.
    """
    artifact = ModelArtifact.load(model)
    classifier = Classifier(artifact, device or None)
    studies: dict[str, list[Dataset]] = {}
    for path, _ in find_files(paths):
        try:
            ds = dcmread(path)
        except DECODE_ERRORS:
            continue
        if "PixelData" not in ds or str(ds.get("Manufacturer", "")) == MANUFACTURER:
            continue
        try:
            study = validate_uid(ds.get("StudyInstanceUID", ""), "StudyInstanceUID")
        except ValueError:
            continue
        studies.setdefault(study, []).append(ds)
    summaries = []
    # Each invocation's objects get UIDs of their own: never those of the node's
    # runs (a PACS keeps the first copy of a UID and drops the next).
    run_key = f"offline-{uuid.uuid4()}"
    node = NodeIdentity(OFFLINE_STATION, node_device_uid(OFFLINE_STATION))
    for study, datasets in studies.items():
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
        summaries.append(_summary(study, len(datasets), prediction, folder, pngs))
    return summaries


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
