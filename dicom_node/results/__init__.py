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

This package itself holds what the rest of the node needs to hand results on
(the names and UIDs in ``naming.py``, the files in ``store.py``, the results
processes in ``builder.py``); the builders, and highdicom with them, are
imported from ``build.py`` only by the processes that build.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
)

from dicom_node.results.naming import NOT_FOR_DIAGNOSIS, NodeIdentity, result_uid

__all__ = [
    "NOT_FOR_DIAGNOSIS",
    "RESULT_OBJECTS",
    "NodeIdentity",
    "ResultObject",
    "ResultSet",
    "report_reference",
    "result_uid",
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
        "use; Conversion Type WSD; Lossy Image Compression stated; Burned In "
        "Annotation and Recognizable Visual Features YES where the source says so",
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
