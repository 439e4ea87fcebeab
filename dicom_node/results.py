"""Results as DICOM: a TID 1500 Structured Report and Grad-CAM Secondary Captures.

One result set per study, model and run:

- a Comprehensive 3D SR holding a TID 1500 Measurement Report (Comprehensive 3D
  rather than Enhanced SR: it is the IOD highdicom writes TID 1500 into, and the
  one OHIF and the IHE AI Results profile expect; no 3D coordinates are used);
- one Secondary Capture per explained image: the source rendered with its own
  window, the heatmap blended over it, a colour bar, and "AI: not for diagnostic
  use" burned in;
- optionally, one Parametric Map per explained image with patient geometry: the
  raw Grad-CAM (0 to 1) for software, as IHE AI Results names it for heatmaps.

Every UID is derived from the study, the model's Device UID, the run number and
the object's role, so writing the same run again yields the same objects: a
re-delivery after a crash replaces rather than duplicates.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.frame import encode_frame
from PIL import Image, ImageDraw, ImageFont
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import DA, DS, TM

from dicom_node import __version__
from inference import CodedConcept, Explanation, StudyPrediction, render

__all__ = [
    "NOT_FOR_DIAGNOSIS",
    "ResultSet",
    "build_results",
    "has_patient_geometry",
    "result_uid",
    "summary_lines",
    "warm_up",
]

# highdicom warns about unusual person names with the name in the message; the
# names come from the source as they are, and a name must never reach a log.
warnings.filterwarnings(
    "ignore", message=r"The string .* is unlikely to represent", category=UserWarning
)

MANUFACTURER = "dicom-node"
NOT_FOR_DIAGNOSIS = "AI: not for diagnostic use"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
PM_SERIES_NUMBER = 9903
# What the SCOORD point of a positive finding stands for (in its Tracking
# Identifier and summary).
POINT_MEANING = "where the model looked, not a boundary"


def _cache_image_iod_lookup() -> None:
    """Remember highdicom's answer to "is this SOP class an image?" per class.

    highdicom (0.28) asks it for the source of every Secondary Capture and
    Parametric Map (``ContributingEquipment.for_image_acquisition``) by scanning
    the IOD's module tables: ~1.5 ms a call, the same answer every time for a
    SOP class. The lookup is a pure function of the UID over tables that ship
    with highdicom, so caching it changes nothing but the time. Left alone if
    highdicom no longer has it where 0.28 does.
    """
    from highdicom import base_content

    lookup = getattr(base_content, "does_iod_have_pixel_data", None)
    if callable(lookup) and not hasattr(lookup, "cache_info"):
        cached = functools.lru_cache(maxsize=256)(lookup)
        base_content.does_iod_have_pixel_data = cached  # type: ignore[attr-defined]


_cache_image_iod_lookup()


def warm_up() -> None:
    """Load the IOD tables highdicom reads on first use (~0.6 s of JSON).

    Otherwise the first study after the node starts waits for them.
    """
    from highdicom import base_content

    lookup = getattr(base_content, "does_iod_have_pixel_data", None)
    if callable(lookup):
        lookup("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture Image Storage


# Codes of the SR tree (value, scheme, meaning), PS3.16.
_Code = tuple[str, str, str]
_REPORT = ("126000", "DCM", "Imaging Measurement Report")
_LANGUAGE = ("121049", "DCM", "Language of Content Item and Descendants")
_EN_US = ("en-US", "RFC5646", "English (United States)")
_OBSERVER_TYPE = ("121005", "DCM", "Observer Type")
_DEVICE = ("121007", "DCM", "Device")
_DEVICE_UID = ("121012", "DCM", "Device Observer UID")
_DEVICE_NAME = ("121013", "DCM", "Device Observer Name")
_DEVICE_MANUFACTURER = ("121014", "DCM", "Device Observer Manufacturer")
_DEVICE_MODEL = ("121015", "DCM", "Device Observer Model Name")
_PROCEDURE_REPORTED = ("121058", "DCM", "Procedure reported")
_IMAGE_LIBRARY = ("111028", "DCM", "Image Library")
_IMAGE_LIBRARY_GROUP = ("126200", "DCM", "Image Library Group")
_IMAGING_MEASUREMENTS = ("126010", "DCM", "Imaging Measurements")
_MEASUREMENT_GROUP = ("125007", "DCM", "Measurement Group")
_TRACKING_ID = ("112039", "DCM", "Tracking Identifier")
_TRACKING_UID = ("112040", "DCM", "Tracking Unique Identifier")
_FINDING = ("121071", "DCM", "Finding")
_FINDING_SITE = ("363698007", "SCT", "Finding Site")
_ALGORITHM_NAME = ("111001", "DCM", "Algorithm Name")
_ALGORITHM_VERSION = ("111003", "DCM", "Algorithm Version")
_IMAGE_REGION = ("111030", "DCM", "Image Region")
_SUMMARY = ("121111", "DCM", "Summary")
_BEST_ILLUSTRATION = ("121080", "DCM", "Best illustration of finding")
_PRESENT = ("52101004", "SCT", "Present")
_ABSENT = ("272519000", "SCT", "Absent")
_PROBABILITY = ("122157", "DCM", "Probability")
_PERCENT = ("%", "UCUM", "Percent")
_SOURCE = ("260753009", "SCT", "Source")
_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
_PM_SCALE = 65535
_HIGHDICOM_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"
_UID_NAMESPACE = uuid.UUID("5b0c5f4e-5d0e-4d55-9a0c-64c6f1c0de01")  # dicom-node results
_RADIOGRAPHY = {"DX", "CR", "RG", "MG", "IO", "PX", "XA", "RF"}


@dataclass(frozen=True, slots=True)
class ResultSet:
    """The objects written for one study, model and run.

    Parameters
    ----------
    sr
        The Structured Report.
    captures
        The Secondary Captures, one per explained image.
    run
        The run number (1 for the first result set of this study and model).
    maps
        The Parametric Maps of the raw Grad-CAM, one per explained image that
        has patient geometry (when asked for).
    """

    sr: Dataset
    captures: tuple[Dataset, ...]
    run: int
    maps: tuple[Dataset, ...] = ()

    @property
    def datasets(self) -> tuple[Dataset, ...]:
        """Return the captures, the maps, then the SR (the order they are sent in)."""
        return (*self.captures, *self.maps, self.sr)


def result_uid(study_uid: str, device_uid: str, run: int, role: str) -> str:
    """Return a UID derived from the study, the model, the run and a role.

    Parameters
    ----------
    study_uid
        The source study.
    device_uid
        The model's Device UID.
    run
        The run number.
    role
        What the UID names (``sr``, ``sr-series``, ``sc-1``, ...).

    Returns
    -------
    str
        A ``2.25.`` UID, the same for the same inputs.
    """
    # A name-based (version 5) UUID as a 2.25 UID (PS3.5 B.2): stable, unique.
    name = "\n".join((study_uid, device_uid, str(run), role))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def build_results(
    sources: Sequence[Dataset],
    prediction: StudyPrediction,
    run: int,
    *,
    station: str = "DICOMNODE",
    previous_sr: Dataset | None = None,
    jpeg: bool = False,
    parametric_map: bool = False,
) -> ResultSet:
    """Build the SR and the Secondary Captures of one scored study.

    Parameters
    ----------
    sources
        The images that were scored (pixel data loaded), one study.
    prediction
        What :meth:`inference.Classifier.predict` returned for them.
    run
        The run number; 1 for the first result set of this study and model.
    station
        The node's AE title, named in the SR's observer device.
    previous_sr
        The SR of the result set this one replaces, referenced as its
        predecessor.
    jpeg
        Store the captures as JPEG baseline (YBR_FULL_422) instead of
        uncompressed RGB.
    parametric_map
        Also write the raw Grad-CAM of each explained image as a Parametric
        Map, for images with patient geometry (CT, MR, ...: a Parametric Map
        needs a patient frame of reference, which projection radiographs lack;
        theirs is skipped).

    Returns
    -------
    ResultSet
        The objects, ready to store and send.

    Raises
    ------
    ValueError
        If there are no sources or they come from several studies.
    """
    if not sources:
        raise ValueError("no source images")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"sources from {len(studies)} studies; expected one")
    study_uid = studies.pop()
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}

    def uid(role: str) -> str:
        return result_uid(study_uid, prediction.device_uid, run, role)

    explained = [
        (
            e.label_index,
            _capture(
                by_uid[e.source.sop_instance_uid], e, prediction, i + 1, uid, jpeg
            ),
        )
        for i, e in enumerate(prediction.explanations)
        if e.source.sop_instance_uid in by_uid
    ]
    captures = tuple(capture for _, capture in explained)
    maps = (
        tuple(
            _parametric_map(
                by_uid[e.source.sop_instance_uid], e, prediction, i + 1, uid
            )
            for i, e in enumerate(prediction.explanations)
            if e.source.sop_instance_uid in by_uid
            and has_patient_geometry(by_uid[e.source.sop_instance_uid])
        )
        if parametric_map
        else ()
    )
    scored = [
        by_uid[u] for u in dict.fromkeys(f.sop_instance_uid for f in prediction.frames)
    ]
    sr = _report(
        scored or list(sources), explained, prediction, uid, station, previous_sr
    )
    return ResultSet(sr, captures, run, maps)


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


def _code(concept: CodedConcept) -> _Code:
    return (concept.value, concept.scheme, concept.meaning)


def _procedure(modality: str) -> _Code:
    if modality in _RADIOGRAPHY:
        return ("43468-8", "LN", "XR unspecified body region")
    if modality == "CT":
        return ("25045-6", "LN", "CT unspecified body region")
    return ("363679005", "SCT", "Imaging procedure")


def _tracking_text(name: str, what: str) -> str:
    """Return "AI <name>: <what>" in 64 characters, shortening the name if needed."""
    room = 64 - len(f"AI : {what}")
    return f"AI {name[: max(room, 1)]}: {what}"[:64]


def _peak_region(
    sources: Sequence[Dataset], prediction: StudyPrediction, label_index: int
) -> Dataset | None:
    """Return a SCOORD POINT at the Grad-CAM peak of the label's top explained image."""
    explanation = next(
        (e for e in prediction.explanations if e.label_index == label_index), None
    )
    if explanation is None:
        return None
    source = next(
        (
            ds
            for ds in sources
            if ds.SOPInstanceUID == explanation.source.sop_instance_uid
        ),
        None,
    )
    if source is None:
        return None
    heatmap = explanation.heatmap
    row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    frame = (
        explanation.source.frame_index + 1
        if int(source.get("NumberOfFrames", 1) or 1) > 1
        else None
    )
    region = _item("CONTAINS", "SCOORD", _IMAGE_REGION)
    region.GraphicType = "POINT"
    # Image coordinates (PS3.3 C.18.6.1.1): the centre of the pixel at row r,
    # column c is (c + 0.5, r + 0.5), column first.
    region.GraphicData = [float(column) + 0.5, float(row) + 0.5]
    region.ContentSequence = [
        _image("SELECTED FROM", _SOURCE, source, frame),
    ]
    return region


# The SR content tree (TID 1500) is built from plain data sets rather than
# highdicom's template classes: they validate every item as it is made, which
# cost ~7 ms of the ~30 ms of Python a study's results took in the node, time
# in which the results thread holds the GIL the scoring thread needs.
# tests/test_results.py checks that the tree equals what highdicom's templates
# build.


def _code_item(code: _Code) -> Dataset:
    value, scheme, meaning = code
    item = Dataset()
    if len(value) > 16:  # as highdicom's CodedConcept
        if value.startswith("urn") or "://" in value:
            item.URNCodeValue = value
        else:
            item.LongCodeValue = value
    else:
        item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _item(relationship: str | None, value_type: str, name: _Code) -> Dataset:
    item = Dataset()
    if relationship is not None:
        item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code_item(name)]
    return item


def _text(relationship: str, name: _Code, value: str) -> Dataset:
    item = _item(relationship, "TEXT", name)
    item.TextValue = value
    return item


def _coded(relationship: str, name: _Code, value: _Code) -> Dataset:
    item = _item(relationship, "CODE", name)
    item.ConceptCodeSequence = [_code_item(value)]
    return item


def _uidref(relationship: str, name: _Code, value: str) -> Dataset:
    item = _item(relationship, "UIDREF", name)
    item.UID = value
    return item


def _image(
    relationship: str, name: _Code, image: Dataset, frame: int | None = None
) -> Dataset:
    item = _item(relationship, "IMAGE", name)
    reference = _instance_reference(image)
    if frame is not None:
        reference.ReferencedFrameNumber = [frame]
    item.ReferencedSOPSequence = [reference]
    return item


def _number(relationship: str, name: _Code, value: float, unit: _Code) -> Dataset:
    item = _item(relationship, "NUM", name)
    measured = Dataset()
    measured.NumericValue = DS(value, auto_format=True)
    measured.FloatingPointValue = float(value)
    measured.MeasurementUnitsCodeSequence = [_code_item(unit)]
    item.MeasuredValueSequence = [measured]
    return item


def _container(
    relationship: str | None,
    name: _Code,
    items: Sequence[Dataset],
    template: str | None = None,
) -> Dataset:
    item = _item(relationship, "CONTAINER", name)
    item.ContinuityOfContent = "CONTINUOUS"
    if template is not None:
        identifier = Dataset()
        identifier.MappingResource = "DCMR"
        identifier.TemplateIdentifier = template
        item.ContentTemplateSequence = [identifier]
    item.ContentSequence = list(items)
    return item


def _equipment(prediction: StudyPrediction) -> hd.ContributingEquipment:
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"{prediction.model_name} {prediction.model_version}"[
            :64
        ],
        software_versions=f"dicom-node {__version__}",
    )


def _report(
    sources: Sequence[Dataset],
    explained: Sequence[tuple[int, Dataset]],
    prediction: StudyPrediction,
    uid: Callable[[str], str],
    station: str,
    previous_sr: Dataset | None,
) -> Dataset:
    make_uid = uid
    model = f"{prediction.model_name} {prediction.model_version}"
    lines = summary_lines(prediction)
    groups = []
    for index, label_prediction in enumerate(prediction.labels):
        label = label_prediction.label
        finding = _code(label.concept)
        point = (
            _peak_region(sources, prediction, index)
            if label_prediction.positive
            else None
        )
        summary = f"{lines[index]}; model {model}; unverified, not for diagnostic use"
        if point is not None:
            summary = summary.replace(
                lines[index],
                f"{lines[index]}; the point is the Grad-CAM peak: {POINT_MEANING}",
                1,
            )
        content = [
            _text(
                "HAS OBS CONTEXT",
                _TRACKING_ID,
                _tracking_text(
                    label.name, POINT_MEANING if point else "whole-study score"
                ),
            ),
            _uidref("HAS OBS CONTEXT", _TRACKING_UID, make_uid(f"tracking-{index}")),
            _coded("CONTAINS", _FINDING, finding),
        ]
        if label.finding_site:
            content.append(
                _coded("HAS CONCEPT MOD", _FINDING_SITE, _code(label.finding_site))
            )
        content += [
            _text("HAS CONCEPT MOD", _ALGORITHM_NAME, prediction.model_name[:64]),
            _text("HAS CONCEPT MOD", _ALGORITHM_VERSION, prediction.model_version[:64]),
            _number(
                "CONTAINS",
                _PROBABILITY,
                round(100 * label_prediction.probability, 2),
                _PERCENT,
            ),
            _coded(
                "CONTAINS", finding, _PRESENT if label_prediction.positive else _ABSENT
            ),
        ]
        if point is not None:
            content.append(point)
        content.append(_text("CONTAINS", _SUMMARY, summary))
        content += [
            _image("CONTAINS", _BEST_ILLUSTRATION, capture)
            for label_index, capture in explained
            if label_index == index
        ]
        # TID 1410 with a point (what OHIF can draw) where Grad-CAM is hottest
        # on the explained image, not the outline of a finding; else TID 1501,
        # a score of the whole study without geometry.
        groups.append(
            _container(
                "CONTAINS",
                _MEASUREMENT_GROUP,
                content,
                template="1410" if point is not None else "1501",
            )
        )
    modality = str(sources[0].get("Modality", ""))
    items = [
        _coded("HAS CONCEPT MOD", _LANGUAGE, _EN_US),
        _coded("HAS OBS CONTEXT", _OBSERVER_TYPE, _DEVICE),
        _uidref("HAS OBS CONTEXT", _DEVICE_UID, prediction.device_uid),
        _text("HAS OBS CONTEXT", _DEVICE_NAME, station),
        _text("HAS OBS CONTEXT", _DEVICE_MANUFACTURER, MANUFACTURER),
        _text("HAS OBS CONTEXT", _DEVICE_MODEL, model[:64]),
        _coded("HAS CONCEPT MOD", _PROCEDURE_REPORTED, _procedure(modality)),
        # The Image Library (TID 1600) holds the images scored, without the
        # ~15 acquisition-context items per image highdicom would add (and the
        # attributes it requires that real sources lack, e.g. Imager Pixel
        # Spacing on CR).
        _container(
            "CONTAINS",
            _IMAGE_LIBRARY,
            [
                _container(
                    "CONTAINS",
                    _IMAGE_LIBRARY_GROUP,
                    [_image("CONTAINS", _SOURCE, ds) for ds in sources],
                )
            ],
        ),
        _container("CONTAINS", _IMAGING_MEASUREMENTS, groups),
    ]
    captures = [capture for _, capture in explained]
    sr = _document(
        evidence=(*sources, *captures),
        root=_container(None, _REPORT, [], template="1500"),
        series_uid=make_uid("sr-series"),
        sop_uid=make_uid("sr"),
        series_description=f"AI Results: {prediction.model_name}"[:64],
        previous_sr=previous_sr,
        equipment=_equipment(prediction),
    )
    sr.ContentSequence = items
    return _with_source_identity(sr, sources[0])


def _document(
    evidence: Sequence[Dataset],
    root: Dataset,
    *,
    series_uid: str,
    sop_uid: str,
    series_description: str,
    previous_sr: Dataset | None,
    equipment: Dataset,
) -> Dataset:
    """Return the Comprehensive 3D SR document around ``root`` (no content yet).

    The data set highdicom's ``Comprehensive3DSR`` builds for these arguments
    (a test compares the files): made directly, because that constructor costs
    ~4 ms a study (deep copies, a parse of the tree, validation, IOD table
    lookups) in the thread that holds the GIL the scoring thread needs. The
    evidence is every image scored or written; those of another study than the
    first's (none, as the node builds results) would go to Pertinent Other
    Evidence, as highdicom records them.
    """
    first = evidence[0]
    study_uid = str(first.StudyInstanceUID)
    sr = _instance(
        first,
        Comprehensive3DSRStorage,
        ExplicitVRLittleEndian,
        modality="SR",
        series=(series_uid, SR_SERIES_NUMBER, series_description),
        sop_uid=sop_uid,
        number=1,
        equipment=[equipment],
    )
    sr.ReferencedPerformedProcedureStepSequence = []
    for element in root:
        sr[element.tag] = element
    sr.PerformedProcedureCodeSequence = []
    sr.CompletionFlag = "COMPLETE"
    sr.VerificationFlag = "UNVERIFIED"
    sr.PreliminaryFlag = "PRELIMINARY"
    same: dict[tuple[str, str], list[Dataset]] = {}
    other: dict[tuple[str, str], list[Dataset]] = {}
    seen: set[str] = set()
    for ds in evidence:
        if ds.SOPInstanceUID in seen:
            continue
        seen.add(ds.SOPInstanceUID)
        key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        group = same if key[0] == study_uid else other
        group.setdefault(key, []).append(_instance_reference(ds))
    if same:
        sr.CurrentRequestedProcedureEvidenceSequence = _study_references(same)
    if other:
        sr.PertinentOtherEvidenceSequence = _study_references(other)
    if previous_sr is not None:
        sr.PredecessorDocumentsSequence = _study_references(
            {
                (
                    str(previous_sr.StudyInstanceUID),
                    str(previous_sr.SeriesInstanceUID),
                ): [_instance_reference(previous_sr)]
            }
        )
    return sr


def _instance_reference(ds: Dataset) -> Dataset:
    """Return an item with the instance's SOP Class and Instance UIDs."""
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _study_references(groups: dict[tuple[str, str], list[Dataset]]) -> list[Dataset]:
    """Hierarchical references: per study, per series, the instances (in order)."""
    studies: dict[str, list[Dataset]] = {}
    for (study_uid, series_uid), instances in groups.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = instances
        studies.setdefault(study_uid, []).append(series)
    items = []
    for study_uid, series_items in studies.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = series_items
        items.append(study)
    return items


def _capture(
    source: Dataset,
    explanation: Explanation,
    prediction: StudyPrediction,
    number: int,
    uid: Callable[[str], str],
    jpeg: bool,
) -> Dataset:
    make_uid = uid
    image = render(source, explanation.source.frame_index)
    label = prediction.labels[explanation.label_index]
    pixels = overlay(
        image,
        explanation.heatmap,
        [
            NOT_FOR_DIAGNOSIS,
            f"{label.label.concept.meaning} {100 * explanation.probability:.0f} %"
            f" - {prediction.model_name}",
        ],
    )
    sc = _secondary_capture(
        source,
        pixels,
        jpeg=jpeg,
        series_uid=make_uid("sc-series"),
        sop_uid=make_uid(f"sc-{number}"),
        number=number,
        series_description=f"AI Grad-CAM: {prediction.model_name}"[:64],
        equipment=_equipment(prediction),
    )
    sc.PatientOrientation = _orientation(source)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = (
        f"Grad-CAM of {label.label.name} over the source image; {NOT_FOR_DIAGNOSIS}"
    )[:10240]
    _copy_body_part(sc, source)
    reference = _instance_reference(source)
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        reference.ReferencedFrameNumber = explanation.source.frame_index + 1
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    reference.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = "Grad-CAM heatmap blended over the rendered source"
    return _with_source_identity(sc, source)


def _secondary_capture(
    source: Dataset,
    pixels: npt.NDArray[np.uint8],
    *,
    jpeg: bool,
    series_uid: str,
    sop_uid: str,
    number: int,
    series_description: str,
    equipment: Dataset,
) -> Dataset:
    """Return an RGB Secondary Capture of ``pixels`` in the source's study.

    The data set highdicom's ``SCImage.from_ref_dataset`` builds for these
    arguments (a test compares the files), made directly: that constructor
    costs ~1.5 ms a study, and it refuses a source whose Patient's Sex is not
    M, F or O (e.g. "U"), which real sources carry; the results copy the
    source's value as it is.
    """
    syntax = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    try:  # the source's own equipment first, where it names a manufacturer
        acquisition = [hd.ContributingEquipment.for_image_acquisition(source)]
    except Exception:  # noqa: BLE001 - as highdicom: no manufacturer, no item
        acquisition = []
    sc = _instance(
        source,
        SecondaryCaptureImageStorage,
        syntax,
        modality="OT",
        series=(series_uid, SC_SERIES_NUMBER, series_description),
        sop_uid=sop_uid,
        number=number,
        equipment=[*acquisition, equipment],
    )
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    sc.ConversionType = "DI"
    sc.DateOfSecondaryCapture = sc.ContentDate
    sc.TimeOfSecondaryCapture = sc.ContentTime
    photometric = "YBR_FULL_422" if jpeg else "RGB"
    sc.SamplesPerPixel = 3
    sc.PhotometricInterpretation = photometric
    sc.PlanarConfiguration = 0
    sc.Rows, sc.Columns = pixels.shape[:2]
    sc.BitsAllocated = 8
    sc.BitsStored = 8
    sc.HighBit = 7
    sc.PixelRepresentation = 0
    frame = encode_frame(
        pixels,
        transfer_syntax_uid=syntax,
        bits_allocated=8,
        bits_stored=8,
        photometric_interpretation=photometric,
        pixel_representation=0,
        planar_configuration=0,
    )
    sc.PixelData = encapsulate([frame]) if jpeg else frame
    return sc


def _instance(
    source: Dataset,
    sop_class: str,
    syntax: str,
    *,
    modality: str,
    series: tuple[str, int, str],
    sop_uid: str,
    number: int,
    equipment: list[Dataset],
) -> Dataset:
    """Return a new instance of the source's study, as highdicom's SOPClass starts one.

    ``series`` is its UID, number and description; ``equipment`` the
    Contributing Equipment before the library's own item.
    """
    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.FileMetaInformationVersion = b"\x00\x01"
    # The File Meta and the library's own Contributing Equipment item stay
    # what highdicom writes: the objects follow its templates and constructors
    # (tested equal), and it still makes the Parametric Maps.
    ds.file_meta.ImplementationClassUID = UID(_HIGHDICOM_IMPLEMENTATION_UID)
    ds.file_meta.ImplementationVersionName = f"highdicom{hd.__version__}"
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    now = dt.datetime.now()
    ds.InstanceCreationDate = ds.ContentDate = DA(now.date())
    ds.InstanceCreationTime = ds.ContentTime = TM(now.time())
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.StudyInstanceUID = str(source.StudyInstanceUID)
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series
    ds.InstanceNumber = number
    ds.ContributingEquipmentSequence = [
        *equipment,
        hd.ContributingEquipment.for_highdicom(),
    ]
    return ds


def has_patient_geometry(source: Dataset) -> bool:
    """Return whether a single-frame image lies in a patient frame of reference.

    Parameters
    ----------
    source
        A source image.

    Returns
    -------
    bool
        True when it has a Frame of Reference, Image Position / Orientation
        (Patient) and Pixel Spacing, and one frame: what a Parametric Map of it
        needs.
    """
    return int(source.get("NumberOfFrames", 1) or 1) == 1 and all(
        source.get(keyword)
        for keyword in (
            "FrameOfReferenceUID",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
        )
    )


def _parametric_map(
    source: Dataset,
    explanation: Explanation,
    prediction: StudyPrediction,
    number: int,
    uid: Callable[[str], str],
) -> Dataset:
    make_uid = uid
    label = prediction.labels[explanation.label_index].label
    # The raw heatmap in [0, 1], stored as 16-bit integers; the Real World Value
    # Mapping gives the values back.
    stored = np.round(np.clip(explanation.heatmap, 0.0, 1.0) * _PM_SCALE)
    # highdicom copies Patient and Study from the source and requires their Type
    # 2 attributes present: a shallow copy gets the empty ones (the source is
    # not changed). It also refuses a Patient's Sex other than M, F or O (real
    # sources carry "U"): it sees an empty one, and the map gets the source's
    # own value back below.
    view = Dataset({element.tag: element for element in source})
    for keyword in _IDENTITY:
        view[keyword] = _copy_or_empty(source, keyword)
    if view.PatientSex not in ("M", "F", "O"):
        view.PatientSex = None
    pm = hd.pm.ParametricMap(
        source_images=[view],
        pixel_array=stored.astype(np.uint16),
        series_instance_uid=make_uid("pm-series"),
        series_number=PM_SERIES_NUMBER,
        sop_instance_uid=make_uid(f"pm-{number}"),
        instance_number=number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{prediction.model_name} {prediction.model_version}"[
            :64
        ],
        software_versions=f"dicom-node {__version__}",
        device_serial_number=prediction.device_uid[:64],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[
            hd.pm.RealWorldValueMapping(
                lut_label="GRADCAM",
                lut_explanation=(
                    f"Grad-CAM of {label.concept.meaning}: 0 none, 1 strongest"
                )[:64],
                unit=_NO_UNITS,
                value_range=(0, _PM_SCALE),
                slope=1 / _PM_SCALE,
                intercept=0,
            )
        ],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=_PM_SCALE / 2, window_width=_PM_SCALE + 1
            )
        ],
        content_label="GRADCAM",
        content_description=f"Grad-CAM of {label.concept.meaning}"[:64],
        series_description=f"AI Grad-CAM map: {prediction.model_name}"[:64],
        contributing_equipment=[_equipment(prediction)],
    )
    _copy_body_part(pm, source)
    return _with_source_identity(pm, source)


def _copy_body_part(ds: Dataset, source: Dataset) -> None:
    """Copy Body Part Examined / Laterality so General Series' Type 2C holds."""
    for keyword in ("BodyPartExamined", "Laterality"):
        value = source.get(keyword)
        if value:
            setattr(ds, keyword, value)
        elif keyword in ds:
            del ds[keyword]
    if "Laterality" not in ds and "BodyPartExamined" not in ds:
        # General Series: Laterality is Type 2C, required when the body part may
        # be a paired structure; unknown here, so present and empty.
        ds.Laterality = None


_IDENTITY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _with_source_identity(ds: Dataset, source: Dataset) -> Dataset:
    """Keep Patient and Study exactly as the source has them (Type 2 may be empty)."""
    for keyword in _IDENTITY:
        ds[keyword] = _copy_or_empty(source, keyword)
    now = dt.datetime.now()
    if "ContentDate" not in ds:
        ds.ContentDate = now.strftime("%Y%m%d")
        ds.ContentTime = now.strftime("%H%M%S")
    return ds


def _copy_or_empty(source: Dataset, keyword: str) -> DataElement:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    if keyword in source:
        element = source[keyword]
        return DataElement(tag, element.VR, element.value)
    return DataElement(tag, dictionary_VR(tag), None)


def _orientation(source: Dataset) -> list[str] | str:
    value = source.get("PatientOrientation")
    if value and len(value) == 2:
        return list(value)
    iop = source.get("ImageOrientationPatient")
    if iop and len(iop) == 6:
        return [_direction(iop[:3]), _direction(iop[3:])]
    return ""


def _direction(cosines: Sequence[float]) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = sorted(range(3), key=lambda i: -abs(float(cosines[i])))
    return "".join(
        letters[i][0 if float(cosines[i]) > 0 else 1]
        for i in order
        if abs(float(cosines[i])) > 0.0001
    )[:3]


def _jet(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue
    out: npt.NDArray[np.float32] = np.clip(
        1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0
    ).astype(np.float32)
    return out


# The jet colour of each of 256 heat levels, 0..255 per channel.
_JET_LUT = np.rint(255 * _jet(np.linspace(0.0, 1.0, 256, dtype=np.float32))).astype(
    np.int32
)


@functools.lru_cache(maxsize=16)
def _colour_bar(rows: int, bar_width: int, gap: int) -> npt.NDArray[np.uint8]:
    """Return a gap, then the jet scale from 1 (top) to 0 (bottom); read-only."""
    levels = np.rint(np.linspace(255.0, 0.0, rows)).astype(np.int32)
    bar = np.zeros((rows, gap + bar_width, 3), np.uint8)
    bar[:, gap:] = _JET_LUT[levels][:, None, :]
    bar.flags.writeable = False
    return bar


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except (OSError, TypeError):
        return ImageFont.load_default()


@functools.lru_cache(maxsize=512)
def _text_masks(line: str, size: int) -> tuple[Image.Image, Image.Image]:
    """Return a line of text as two masks: with its 1-px outline, and its letters.

    Drawing text with an outline costs ~1 ms a line; the lines repeat (the
    warning, a label with a whole-number percentage), so each is drawn once.
    """
    font = _font(size)
    _, _, right, bottom = font.getbbox(line, stroke_width=1)
    shape = (int(right) + 2, int(bottom) + 2)
    outlined, letters = Image.new("L", shape), Image.new("L", shape)
    ImageDraw.Draw(outlined).text(
        (1, 1), line, fill=255, font=font, stroke_width=1, stroke_fill=255
    )
    ImageDraw.Draw(letters).text((1, 1), line, fill=255, font=font)
    return outlined, letters


def overlay(
    image: npt.NDArray[np.uint8],
    heatmap: npt.NDArray[np.float32],
    text: Sequence[str],
) -> npt.NDArray[np.uint8]:
    """Blend a heatmap over a rendered image, add a colour bar and burn in text.

    The heatmap is blended at half opacity in 256 levels, in jet colours; the
    text is yellow with a black outline.

    Parameters
    ----------
    image
        uint8 [rows, columns] or [rows, columns, 3].
    heatmap
        float [rows, columns] in [0, 1].
    text
        Lines written in the top-left corner.

    Returns
    -------
    numpy.ndarray
        uint8 RGB [rows, columns + bar, 3].
    """
    rgb = image[..., None] if image.ndim == 2 else image
    # Integer blend: alpha = level / 510 (half opacity at full heat), rounded.
    level = np.rint(255 * np.clip(np.asarray(heatmap, np.float32), 0.0, 1.0))
    level = level.astype(np.int32)[..., None]
    blended = (rgb * (510 - level) + _JET_LUT[level[..., 0]] * level + 255) // 510
    rows, columns = level.shape[:2]
    bar_width = max(8, columns // 24)
    bar = _colour_bar(rows, bar_width, max(2, bar_width // 4))
    picture = Image.fromarray(
        np.concatenate([blended.astype(np.uint8), bar], axis=1), "RGB"
    )
    size = max(9, rows // 28)
    y = 2
    for line in text:
        outlined, letters = _text_masks(line, size)
        picture.paste((0, 0, 0), (2, y - 1), outlined)
        picture.paste((255, 255, 0), (2, y - 1), letters)
        y += size + 3
    return np.asarray(picture, dtype=np.uint8)
