"""The Grad-CAM Secondary Capture, built by highdicom: what a radiologist opens."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from pydicom.valuerep import DS

from dicom_node.identity import MANUFACTURER
from dicom_node.results.common import algorithm_equipment, finish, highdicom_view
from dicom_node.results.naming import (
    NOT_FOR_DIAGNOSIS,
    NodeIdentity,
    model_text,
    series_number,
    yes_or_no,
)
from dicom_node.results.render import overlay, pixel_aspect
from inference import Explanation, StudyPrediction, render

__all__ = ["agree_on_series", "build_capture", "copy_body_part", "lossy_history"]

# Transfer syntaxes that are lossy, and the method each names in Lossy Image
# Compression Method (PS3.3 C.7.6.1.1.5.1).
_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.100": "ISO_13818_2",  # MPEG2 MP@ML
    "1.2.840.10008.1.2.4.101": "ISO_13818_2",  # MPEG2 MP@HL
    "1.2.840.10008.1.2.4.102": "ISO_14496_10",  # MPEG-4 AVC/H.264
    "1.2.840.10008.1.2.4.103": "ISO_14496_10",
    "1.2.840.10008.1.2.4.104": "ISO_14496_10",
    "1.2.840.10008.1.2.4.105": "ISO_14496_10",
    "1.2.840.10008.1.2.4.106": "ISO_14496_10",
    "1.2.840.10008.1.2.4.107": "ISO_23008_2",  # HEVC/H.265
    "1.2.840.10008.1.2.4.108": "ISO_23008_2",
}
# Transfer syntaxes that may be lossy or lossless: the source's own Lossy Image
# Compression decides; a source that does not say is taken as lossy.
_MAYBE_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K
    "1.2.840.10008.1.2.4.112": "ISO_18181_1",  # JPEG XL
}


def build_capture(
    source: Dataset,
    explanation: Explanation,
    prediction: StudyPrediction,
    number: int,
    uid: Callable[[str], str],
    *,
    jpeg: bool,
    node: NodeIdentity,
) -> Dataset:
    """Return the Secondary Capture of one explained image.

    The source rendered with its own window, the heatmap blended over it, the
    scale beside it and a caption below: the warning, the finding with its
    verdict, probability and threshold, and the model.
    """
    label = prediction.labels[explanation.label_index]
    meaning = label.label.concept.meaning
    verdict = "PRESENT" if label.positive else "ABSENT"
    caption = [
        NOT_FOR_DIAGNOSIS,
        f"{meaning}: {verdict}, probability {100 * label.probability:.0f} %"
        f" (threshold {100 * label.label.threshold:.0f} %)",
        f"Grad-CAM: where the model looked. Model: {model_text(prediction)}",
    ]
    pixels = overlay(
        render(source, explanation.source.frame_index),
        explanation.heatmap,
        caption,
        positive=label.positive,
        aspect=pixel_aspect(source),
    )
    syntax = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    orientation = _orientation(source)
    description = f"AI Grad-CAM: {prediction.model_name}"[:64]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=highdicom_view(source),
        pixel_array=pixels,
        photometric_interpretation="YBR_FULL_422" if jpeg else "RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uid("sc-series"),
        series_number=series_number(prediction.model_name, 2),
        sop_instance_uid=uid(f"sc-{number}"),
        instance_number=number,
        manufacturer=MANUFACTURER,
        # highdicom takes one letter per direction; the source's own value
        # (e.g. "LP") is set below.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=syntax,
        contributing_equipment=[algorithm_equipment(prediction)],
        series_description=description,
    )
    sc.PatientOrientation = orientation  # type: ignore[assignment]
    # Burned In Annotation (PS3.3 C.7.6.1.1.7): the caption holds the finding,
    # the model and the warning only, but the pixels are the source's, with
    # whatever identifying text or features they carry. What the source says of
    # them is said of the capture; where it says nothing, nor does the capture
    # (both are Type 3 here): unknown is not NO.
    for keyword in ("BurnedInAnnotation", "RecognizableVisualFeatures"):
        said = yes_or_no(source, keyword)
        if said is not None:
            setattr(sc, keyword, said)
        elif keyword in sc:
            del sc[keyword]
    sc.ImageComments = (
        f"Grad-CAM of {label.label.name} ({verdict}) over the source image; "
        f"{NOT_FOR_DIAGNOSIS}"
    )[:10240]
    copy_body_part(sc, source)
    reference = source_reference(source, explanation.source.frame_index)
    reference.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = "Grad-CAM heatmap blended over the rendered source"
    lossy_history(sc, source, pixels.nbytes if jpeg else None)
    return finish(sc, source, node)


def source_reference(source: Dataset, frame_index: int) -> Dataset:
    """Return a reference to the source instance (and its frame when multi-frame)."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        item.ReferencedFrameNumber = frame_index + 1
    return item


def lossy_history(ds: Dataset, source: Dataset, jpeg_bytes: int | None) -> None:
    """Set Lossy Image Compression from the source's history and this object's.

    Once lossy compression happened to the pixels an image derives from, the
    image says so ("01" is never reset), with each step's ratio and method in
    order when they are known (PS3.3 C.7.6.1.1.5); ``jpeg_bytes`` is the
    uncompressed size of a capture stored as JPEG baseline.
    """
    lossy, ratios, methods = _source_history(source)
    if jpeg_bytes is not None:
        lossy = True
        if methods is not None:
            methods.append("ISO_10918_1")
            if ratios is not None:
                # The encapsulated frame with its item headers: a few bytes over.
                ratios.append(round(jpeg_bytes / max(1, len(ds.PixelData)), 2))
    for keyword in (
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
    ):
        if keyword in ds:
            del ds[keyword]
    ds.LossyImageCompression = "01" if lossy else "00"
    if lossy and methods:
        ds.LossyImageCompressionMethod = methods
        if ratios:
            ds.LossyImageCompressionRatio = [DS(r, auto_format=True) for r in ratios]


def _source_history(
    source: Dataset,
) -> tuple[bool, list[float] | None, list[str] | None]:
    """Return whether the source went through lossy compression, and its steps.

    The ratios and methods are None when not known (a source that says "01"
    without them); the ratios also when they do not pair with the methods.
    """
    said = str(source.get("LossyImageCompression", "") or "")
    ratios: list[float] | None = [
        float(str(r)) for r in _values(source.get("LossyImageCompressionRatio"))
    ]
    methods: list[str] | None = [
        str(m) for m in _values(source.get("LossyImageCompressionMethod"))
    ]
    syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", ""))
    method = _LOSSY_METHODS.get(syntax)
    if method is None and said != "00":
        method = _MAYBE_LOSSY_METHODS.get(syntax)
    if said != "01" and method is None:
        return False, [], []
    if said == "01" and not methods and method is None:
        methods = None  # lossy before, how is not recorded
    if methods is not None and method and not methods:
        # Stored lossy now, no method recorded: this transfer syntax is the step
        # (a single recorded ratio is its ratio).
        methods = [method]
        if ratios is not None and len(ratios) != 1:
            ratios = [_stored_ratio(source)]
    elif methods is not None and method and methods[-1] != method:
        # Stored lossy now, after the recorded steps: one more.
        methods.append(method)
        if ratios is not None:
            ratios.append(_stored_ratio(source))
    if methods is None or ratios is None or len(ratios) != len(methods):
        ratios = None
    return True, ratios, methods


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def _stored_ratio(source: Dataset) -> float:
    """Uncompressed size over the size of the source's compressed pixel data."""
    rows, columns = int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0)
    frames = int(source.get("NumberOfFrames", 1) or 1)
    samples = int(source.get("SamplesPerPixel", 1) or 1)
    bits = int(source.get("BitsAllocated", 8) or 8)
    raw = rows * columns * frames * samples * bits / 8
    data = source.get("PixelData")
    size = len(data) if isinstance(data, bytes | bytearray) else 0
    return round(raw / size, 2) if raw and size else 1.0


def copy_body_part(ds: Dataset, source: Dataset) -> None:
    """Copy Body Part Examined / (Image) Laterality so General Series' Type 2C holds.

    Laterality is the series' (all of a result set's captures share one
    series, whatever images they show); Image Laterality is the image's, and
    a paired body part needs one of them (PS3.3 C.7.3.1): a source that gives
    its side per image only (mammography, a DX of a hand) lends it to the
    derived image's Image Laterality (General Image, Type 3 here).
    """
    for keyword in ("BodyPartExamined", "Laterality", "ImageLaterality"):
        value = source.get(keyword)
        if value:
            setattr(ds, keyword, value)
        elif keyword in ds:
            del ds[keyword]
    _laterality_if_required(ds)


def _laterality_if_required(ds: Dataset) -> None:
    """Give an object that names no side and no body part an empty Laterality.

    General Series: Laterality is Type 2C, required when the body part may be a
    paired structure; unknown here, so present and empty.
    """
    if not any(
        ds.get(k) for k in ("Laterality", "ImageLaterality", "BodyPartExamined")
    ):
        ds.Laterality = None


def agree_on_series(instances: Sequence[Dataset]) -> None:
    """Make one result series say one thing of its body part and side.

    Body Part Examined and Laterality are General Series attributes (PS3.3
    C.7.3.1), one value for the series; each result instance copies its
    source's, and a result series may show images of several source series (a
    left and a right mammogram, each a series of its own). Where they differ,
    the series says none: each instance's side moves to its Image Laterality,
    which is the image's own.
    """
    if len({str(ds.get("Laterality") or "") for ds in instances}) > 1:
        for ds in instances:
            side = ds.get("Laterality")
            if side and not ds.get("ImageLaterality"):
                ds.ImageLaterality = side
            if "Laterality" in ds:
                del ds.Laterality
    if len({str(ds.get("BodyPartExamined") or "") for ds in instances}) > 1:
        for ds in instances:
            if "BodyPartExamined" in ds:
                del ds.BodyPartExamined
    for ds in instances:
        _laterality_if_required(ds)


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
