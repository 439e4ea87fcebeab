"""Results as DICOM, built by highdicom: a TID 1500 SR, Grad-CAM captures and maps.

One result set per study, model and run:

- a Comprehensive 3D SR holding a TID 1500 Measurement Report (``sr.py``);
- one Secondary Capture per explained image of a present finding: the source
  rendered with its own window, the heatmap blended over it, its scale, and a
  caption with "AI: not for diagnostic use" (``capture.py``, ``render.py``);
  absent findings get none unless asked, and then one in a cold hue captioned
  ABSENT;
- optionally, one Parametric Map per such image with patient geometry: the raw
  Grad-CAM (0 to 1) for software, as IHE AI Results names it for heatmaps
  (``pmap.py``).

Every object names the node (``common.py``): its Implementation Class UID,
General Equipment and Device UID, the model as Contributing Equipment; carries
the source's Patient and Study modules as they are; and is encoded in a
character set that holds its text. Every UID is derived from the study, the
model's Device UID, the run and the object's role, so writing the same run again
yields the same objects: a re-delivery after a crash replaces rather than
duplicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_node.identity import MANUFACTURER
from dicom_node.results.capture import build_capture
from dicom_node.results.common import (
    NOT_FOR_DIAGNOSIS,
    NodeIdentity,
    result_uid,
)
from dicom_node.results.pmap import build_map, has_patient_geometry
from dicom_node.results.render import overlay
from dicom_node.results.sr import POINT_MEANING, SR_CODES, build_report, summary_lines
from inference import StudyPrediction

__all__ = [
    "MANUFACTURER",
    "NOT_FOR_DIAGNOSIS",
    "POINT_MEANING",
    "RESULT_OBJECTS",
    "SR_CODES",
    "NodeIdentity",
    "ResultObject",
    "ResultSet",
    "build_results",
    "has_patient_geometry",
    "overlay",
    "report_reference",
    "result_uid",
    "summary_lines",
    "warm_up",
]


def report_reference(study_uid: str, device_uid: str, run: int, sr_uid: str) -> Dataset:
    """Return what a later run's SR cites of this run's SR (its predecessor).

    Built from what the index records of the run: the SR's series follows
    from the study, the model and the run as every result UID does.

    Parameters
    ----------
    study_uid
        The study.
    device_uid
        The model's Device UID.
    run
        The earlier run.
    sr_uid
        Its SR's SOP Instance UID.

    Returns
    -------
    Dataset
        Study, series, SOP class and SOP instance of the earlier SR.
    """
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = result_uid(study_uid, device_uid, run, "sr-series")
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = sr_uid
    return ds


@dataclass(frozen=True, slots=True)
class ResultObject:
    """A kind of object the node creates, as the conformance statement lists it.

    Parameters
    ----------
    role
        ``sr``, ``sc`` or ``pm``.
    sop_class_uid
        Its SOP class.
    syntax
        The transfer syntax it is written (and sent) in.
    jpeg_syntax
        The one with ``results_jpeg`` on, where that changes it.
    when
        When one is created.
    content
        What it holds.
    """

    role: str
    sop_class_uid: str
    syntax: str
    jpeg_syntax: str
    when: str
    content: str


# highdicom writes the SR and the map in Explicit VR Little Endian (its
# default); the captures ask for theirs (capture.py).
RESULT_OBJECTS: tuple[ResultObject, ...] = (
    ResultObject(
        "sr",
        str(Comprehensive3DSRStorage),
        str(ExplicitVRLittleEndian),
        "",
        "One per study, model and run",
        "TID 1500 Measurement Report: per label a finding Present / Absent with "
        "its probability; for an explained present finding a TID 1410 group "
        "with a SCOORD POINT at the heatmap's peak and the captures as "
        "Illustration of ROI; the scored images in the Image Library; "
        "unverified, complete",
    ),
    ResultObject(
        "sc",
        str(SecondaryCaptureImageStorage),
        str(ExplicitVRLittleEndian),
        str(JPEGBaseline8Bit),
        "One per explained image of a present finding (and, with "
        "results_explain_absent, of an absent one)",
        "RGB: the source image in its own window with the heatmap blended over "
        "it, a colour scale and a caption that says it is not for diagnostic "
        "use; Conversion Type WSD; Lossy Image Compression stated",
    ),
    ResultObject(
        "pm",
        str(ParametricMapStorage),
        str(ExplicitVRLittleEndian),
        "",
        "With results_parametric_map, one per explained image that has patient "
        "geometry (CT, MR, ...)",
        "The raw heatmap (0 to 1, float) on the source image's plane",
    ),
)


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


def build_results(
    sources: Sequence[Dataset],
    prediction: StudyPrediction,
    run: int,
    *,
    node: NodeIdentity,
    run_key: str = "",
    previous_sr: Dataset | None = None,
    jpeg: bool = False,
    parametric_map: bool = False,
    explain_absent: bool = False,
) -> ResultSet:
    """Build the SR, the Secondary Captures and the maps of one scored study.

    Parameters
    ----------
    sources
        The images that were scored (pixel data loaded), one study.
    prediction
        What :meth:`inference.Classifier.predict` returned for them.
    run
        The run number; 1 for the first result set of this study and model.
    node
        The node writing the results (its AE title and Device UID).
    run_key
        Derive the UIDs from this instead of the run number (offline scoring
        gives each invocation its own, so that its objects never take the
        UIDs of the node's runs).
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
    explain_absent
        Also picture the Grad-CAM of findings the model called absent (in a
        cold hue, captioned ABSENT); by default only present findings get
        pictures.

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
    key = run_key or run

    def uid(role: str) -> str:
        return result_uid(study_uid, prediction.device_uid, key, role)

    explained = [
        e
        for e in prediction.explanations
        if e.source.sop_instance_uid in by_uid
        and (prediction.labels[e.label_index].positive or explain_absent)
    ]
    captures: list[tuple[int, Dataset]] = []
    maps: list[tuple[int, Dataset]] = []
    for number, e in enumerate(explained, start=1):
        source = by_uid[e.source.sop_instance_uid]
        captures.append(
            (
                e.label_index,
                build_capture(source, e, prediction, number, uid, jpeg=jpeg, node=node),
            )
        )
        if parametric_map and has_patient_geometry(source):
            maps.append(
                (
                    e.label_index,
                    build_map(source, e, prediction, number, uid, node=node),
                )
            )
    scored = [
        by_uid[u]
        for u in dict.fromkeys(f.sop_instance_uid for f in prediction.frames)
        if u in by_uid
    ]
    sr = build_report(
        scored or list(sources),
        [*captures, *maps],
        [pm for _, pm in maps],
        prediction,
        uid,
        node=node,
        previous_sr=previous_sr,
    )
    return ResultSet(
        sr, tuple(sc for _, sc in captures), run, tuple(pm for _, pm in maps)
    )


def warm_up() -> None:
    """Load the IOD tables highdicom reads on first use (~0.6 s of JSON).

    Otherwise the first study after the node starts waits for them: a small
    Secondary Capture of a made-up image is built and thrown away.
    """
    import highdicom as hd

    source = Dataset()
    source.SOPClassUID = CTImageStorage
    source.SOPInstanceUID = source.StudyInstanceUID = generate_uid()
    source.Manufacturer = "warm-up"
    hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.zeros((2, 2), np.uint8),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
    )
