"""The Structured Report: TID 1500, built with highdicom's templates.

A Comprehensive 3D SR (the IOD highdicom writes TID 1500 into, and the one
OHIF and IHE AI Results expect; no 3D coordinates are used). One Measurement
Group per label: TID 1410 with a SCOORD POINT at the Grad-CAM peak when the
finding is present and explained (what OHIF can draw, and the Grad-CAM
pictures as "Illustration of ROI"), else TID 1501, a score of the whole study.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.identity import MANUFACTURER
from dicom_node.results.common import algorithm_equipment, finish, highdicom_view
from dicom_node.results.naming import NodeIdentity, model_text, series_number
from inference import CodedConcept, Explanation, StudyPrediction

__all__ = ["POINT_MEANING", "SR_CODES", "build_report", "summary_lines"]

# What the SCOORD point of a positive finding stands for (in its Tracking
# Identifier and summary).
POINT_MEANING = "where the model looked, not a boundary"

_Code = hd.sr.CodedConcept
_dict = hd.sr.CodedConcept.from_code  # from pydicom's code dictionary
_PRESENT = _dict(codes.SCT.Present)
_ABSENT = _dict(codes.SCT.Absent)
_PROBABILITY = _dict(codes.DCM.Probability)
_PERCENT = _dict(codes.UCUM.Percent)
_SUMMARY = _dict(codes.DCM.Summary)
_ILLUSTRATION = _dict(codes.DCM.IllustrationOfROI)
# 260753009 with SNOMED's preferred term, as the node has always written it;
# pydicom's dictionary carries its fully specified name, "Source (attribute)".
_SOURCE = _Code("260753009", "SCT", "Source")
_IMAGE_LIBRARY = _dict(codes.DCM.ImageLibrary)
_IMAGE_LIBRARY_GROUP = _dict(codes.DCM.ImageLibraryGroup)
_DEVICE = _dict(codes.DCM.Device)
# Procedure Reported: one code of CID 100, describing the imaging. CID 100 has
# no code for projection radiography: radiographs (and every modality without
# its own code) report the generic imaging procedure.
_PROCEDURES = {
    "CT": _dict(codes.LN.CTUnspecifiedBodyRegion),
    "MR": _dict(codes.LN.MRIUnspecifiedBodyRegion),
    "NM": _dict(codes.LN.NMUnspecifiedBodyRegion),
    "PT": _dict(codes.LN.PETUnspecifiedBodyRegion),
}
_IMAGING = _dict(codes.SCT.ImagingProcedure)

# The codes the node itself writes (findings use the model's): the
# conformance statement lists them.
SR_CODES: tuple[tuple[str, str, str], ...] = tuple(
    (str(c.value), str(c.scheme_designator), str(c.meaning))
    for c in (
        _PRESENT,
        _ABSENT,
        _PROBABILITY,
        _PERCENT,
        _SUMMARY,
        _ILLUSTRATION,
        _SOURCE,
        _IMAGE_LIBRARY,
        _IMAGE_LIBRARY_GROUP,
        _DEVICE,
        *_PROCEDURES.values(),
        _IMAGING,
    )
)


def summary_lines(prediction: StudyPrediction) -> list[str]:
    """Return the plain-language result, one line per label.

    Parameters
    ----------
    prediction
        The study's prediction.

    Returns
    -------
    list of str
        e.g. ``Nodule: Present (probability 87.3 %, operating threshold 63.2 %)``.
    """
    return [
        f"{p.label.concept.meaning}: {'Present' if p.positive else 'Absent'} "
        f"(probability {100 * p.probability:.1f} %, operating threshold "
        f"{100 * p.label.threshold:.1f} %)"
        for p in prediction.labels
    ]


def _code(concept: CodedConcept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning)


def _tracking_text(name: str, what: str) -> str:
    """Return "AI <name>: <what>" in 64 characters, shortening the name if needed."""
    room = 64 - len(f"AI : {what}")
    return f"AI {name[: max(room, 1)]}: {what}"[:64]


def _image_item(name: hd.sr.CodedConcept, ds: Dataset) -> hd.sr.ImageContentItem:
    return hd.sr.ImageContentItem(
        name=name,
        referenced_sop_class_uid=ds.SOPClassUID,
        referenced_sop_instance_uid=ds.SOPInstanceUID,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _peak_region(source: Dataset, explanation: Explanation) -> hd.sr.ImageRegion:
    """Return a SCOORD POINT at the Grad-CAM peak of the explained image."""
    heatmap = explanation.heatmap
    row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    multi = int(source.get("NumberOfFrames", 1) or 1) > 1
    # Image coordinates (PS3.3 C.18.6.1.1): the centre of the pixel at row r,
    # column c is (c + 0.5, r + 0.5), column first.
    sop_class = str(source.SOPClassUID)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[float(column) + 0.5, float(row) + 0.5]]),
        source_image=hd.sr.SourceImageForRegion(
            # highdicom looks the class up in its IOD tables, which lack the
            # retired classes; the reference names the source's own below.
            highdicom_view(source).SOPClassUID,
            source.SOPInstanceUID,
            [explanation.source.frame_index + 1] if multi else None,
        ),
    )
    region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPClassUID = sop_class
    return region


def _groups(
    sources: dict[str, Dataset],
    illustrations: Sequence[tuple[int, Dataset]],
    prediction: StudyPrediction,
    uid: Callable[[str], str],
) -> list[
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
]:
    algorithm = hd.sr.AlgorithmIdentification(
        name=prediction.model_name[:64], version=prediction.model_version[:64]
    )
    model = model_text(prediction)
    lines = summary_lines(prediction)
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    for index, p in enumerate(prediction.labels):
        finding = _code(p.label.concept)
        explanation = next(
            (
                e
                for e in prediction.explanations
                if e.label_index == index and e.source.sop_instance_uid in sources
            ),
            None,
        )
        point = p.positive and explanation is not None
        identifier = _tracking_text(
            p.label.name, POINT_MEANING if point else "whole-study score"
        )
        options: dict[str, Any] = {
            "tracking_identifier": hd.sr.TrackingIdentifier(
                uid=uid(f"tracking-{index}"), identifier=identifier
            ),
            "finding_type": finding,
            "algorithm_id": algorithm,
            "finding_sites": (
                [hd.sr.FindingSite(_code(p.label.finding_site))]
                if p.label.finding_site
                else None
            ),
            "measurements": [
                hd.sr.Measurement(
                    name=_PROBABILITY,
                    value=round(100 * p.probability, 2),
                    unit=_PERCENT,
                )
            ],
            "qualitative_evaluations": [
                hd.sr.QualitativeEvaluation(
                    name=finding, value=_PRESENT if p.positive else _ABSENT
                )
            ],
        }
        summary = lines[index]
        group: (
            hd.sr.MeasurementsAndQualitativeEvaluations
            | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        )
        if point:
            assert explanation is not None
            source = sources[explanation.source.sop_instance_uid]
            group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_region=_peak_region(source, explanation), **options
            )
            summary += f"; the point is the Grad-CAM peak: {POINT_MEANING}"
        else:
            group = hd.sr.MeasurementsAndQualitativeEvaluations(**options)
        content = group[0].ContentSequence
        content.append(
            hd.sr.TextContentItem(
                name=_SUMMARY,
                value=f"{summary}; model {model}; unverified, not for diagnostic use",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
        if point:  # TID 1410: the pictures of where the model looked
            content.extend(
                _image_item(_ILLUSTRATION, picture)
                for label_index, picture in illustrations
                if label_index == index
            )
        groups.append(group)
    return groups


def _library(images: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """Return the Image Library (TID 1600) of the images scored, one IMAGE each.

    Without the ~15 acquisition-context items per image highdicom's
    ImageLibraryEntryDescriptors add (a 500-slice CT's SR went from 177 KB to
    2 MB), and without the attributes they require that real sources lack
    (Imager Pixel Spacing on a CR).
    """
    group = hd.sr.ContainerContentItem(
        name=_IMAGE_LIBRARY_GROUP,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    group.ContentSequence = hd.sr.ContentSequence(
        [_image_item(_SOURCE, ds) for ds in images]
    )
    library = hd.sr.ContainerContentItem(
        name=_IMAGE_LIBRARY, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def build_report(
    scored: Sequence[Dataset],
    illustrations: Sequence[tuple[int, Dataset]],
    maps: Sequence[Dataset],
    prediction: StudyPrediction,
    uid: Callable[[str], str],
    *,
    node: NodeIdentity,
    previous_sr: Dataset | None,
) -> Dataset:
    """Return the SR of one scored study.

    Parameters
    ----------
    scored
        The images scored (the Image Library), the first one's Patient and
        Study copied.
    illustrations
        (label index, Secondary Capture or Parametric Map) of each explained
        image: "Illustration of ROI" of the label's TID 1410 group, and evidence.
    maps
        The Parametric Maps written beside the SR (evidence).
    prediction
        The study's prediction.
    uid
        Derives the objects' UIDs from a role.
    node
        The node writing the report.
    previous_sr
        The SR this one replaces (its predecessor).
    """
    sources = {str(ds.SOPInstanceUID): ds for ds in scored}
    modality = str(scored[0].get("Modality", ""))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=_DEVICE,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=prediction.device_uid,
                    name=node.station,
                    manufacturer_name=MANUFACTURER,
                    model_name=model_text(prediction),
                ),
            )
        ),
        procedure_reported=_PROCEDURES.get(modality, _IMAGING),
        imaging_measurements=_groups(sources, illustrations, prediction, uid),
    )
    root = report[0]
    # The Image Library sits before Imaging Measurements (TID 1500 row order).
    root.ContentSequence.insert(len(root.ContentSequence) - 1, _library(scored))
    evidence = list(
        {
            str(ds.SOPInstanceUID): ds
            for ds in (
                highdicom_view(scored[0]),
                *scored[1:],
                *(picture for _, picture in illustrations),
                *maps,
            )
        }.values()
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root,
        series_instance_uid=uid("sr-series"),
        series_number=series_number(prediction.model_name, 1),
        sop_instance_uid=uid("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_verified=False,
        previous_versions=[previous_sr] if previous_sr is not None else None,
        series_description=f"AI Results: {prediction.model_name}"[:64],
        contributing_equipment=[algorithm_equipment(prediction)],
    )
    # The evidence names each source's own SOP class (the view gave highdicom
    # the class that replaced a retired one).
    classes = {str(ds.SOPInstanceUID): ds.SOPClassUID for ds in scored}
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for reference in series.ReferencedSOPSequence:
                uid_ = str(reference.ReferencedSOPInstanceUID)
                if uid_ in classes:
                    reference.ReferencedSOPClassUID = classes[uid_]
    return finish(sr, scored[0], node)
