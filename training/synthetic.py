"""Synthetic labelled DX chest radiographs and CT slices, written as complete DICOM.

The generative model (documented in sample_dicoms/README.md):

DX (chest radiograph, PA). An attenuation map in [0, 1] is built from shapes: a
body ellipse of soft tissue, two lung fields (ellipses, mostly air, so dark), a
mediastinum and spine band between them, a heart bulge, diaphragm domes, rib arcs
across the lungs and two clavicles. Low-frequency "anatomy" texture (smoothed
noise), a random overall contrast (gamma) and brightness, and quantum-like noise
are added. A positive image carries one nodule: a soft-edged disc of random radius
(3-6 % of the image) and contrast (0.12-0.25 over the local lung value) at a
random position inside a lung field, away from its edge. The mask is the disc.

CT (axial chest slice). Hounsfield units: air -1000 outside, a body ellipse of soft
tissue (~40 HU), fat rim (-100), two lungs (-850 +/- texture), mediastinum and
heart (40), aorta (180, contrast), spine (700) and a table; Gaussian noise of 15-35
HU. A positive slice carries a nodule of -100..+40 HU inside a lung.

Each image is its own instance; patients have one to three studies. Some DX
images are stored MONOCHROME1 (inverted), and some instances use a lossless
compressed transfer syntax (RLE, JPEG-LS or JPEG 2000).
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from scipy.ndimage import gaussian_filter  # type: ignore[import-untyped]

from training.progress import Progress

__all__ = [
    "ImageMaker",
    "SyntheticImage",
    "dx_dataset",
    "make_ct_slice",
    "make_dx",
    "synthesize",
    "write_set",
]

# A root for the UIDs the synthesizer makes (the pydicom root: UUID-derived UIDs).
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."
_COMPRESSED = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
_SOP_CLASSES = {"DX": DigitalXRayImageStorageForPresentation, "CT": CTImageStorage}

FloatImage = npt.NDArray[np.float64]
BoolImage = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class SyntheticImage:
    """One generated image and its truth.

    Parameters
    ----------
    pixels
        Stored pixel values (uint16), as they go into Pixel Data.
    mask
        The lesion, or None for a negative image.
    """

    pixels: npt.NDArray[np.uint16]
    mask: BoolImage | None


def _uid(rng: np.random.Generator) -> UID:
    # Derived from the seeded generator: the same seed gives the same UIDs too.
    return generate_uid(prefix=_UID_PREFIX, entropy_srcs=[str(rng.integers(2**62))])


def _grid(size: int) -> tuple[FloatImage, FloatImage]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return y / size, x / size  # both in [0, 1)


def _ellipse(
    y: FloatImage, x: FloatImage, cy: float, cx: float, ry: float, rx: float
) -> BoolImage:
    return _bool((((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2) <= 1.0)


def _bool(a: npt.NDArray[np.bool_]) -> BoolImage:
    return np.asarray(a, dtype=np.bool_)


def _texture(rng: np.random.Generator, size: int, sigma: float) -> FloatImage:
    field = gaussian_filter(rng.standard_normal((size, size)), sigma=sigma * size)
    return np.asarray(field / (np.abs(field).max() + 1e-9), dtype=np.float64)


def _nodule(
    rng: np.random.Generator,
    y: FloatImage,
    x: FloatImage,
    region: BoolImage,
    size: int,
    radius: tuple[float, float],
) -> tuple[FloatImage, BoolImage]:
    """Place a soft-edged disc at a random point of ``region``, away from its edge."""
    r = rng.uniform(*radius)
    inner = gaussian_filter(region.astype(np.float64), sigma=r * size) > 0.97
    candidates = np.argwhere(inner if inner.any() else region)
    cy, cx = candidates[rng.integers(len(candidates))] / size
    distance = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    profile = np.clip(1.5 - distance / r, 0.0, 1.0)  # flat core, soft rim
    return profile, _bool(distance <= r)


def make_dx(
    rng: np.random.Generator, size: int, positive: bool
) -> tuple[FloatImage, BoolImage | None]:
    """Return a chest-radiograph-like image in [0, 1] (MONOCHROME2) and its lesion mask.

    Parameters
    ----------
    rng
        Random generator.
    size
        Image side in pixels.
    positive
        Whether to add a nodule.
    """
    y, x = _grid(size)

    def j(scale: float) -> float:  # small anatomical jitter
        return float(rng.normal(0.0, scale))

    body = _ellipse(y, x, 0.55 + j(0.01), 0.5 + j(0.01), 0.55, 0.46 + j(0.02))
    left = _ellipse(y, x, 0.47 + j(0.01), 0.3 + j(0.01), 0.3 + j(0.02), 0.15 + j(0.01))
    right = _ellipse(y, x, 0.47 + j(0.01), 0.7 + j(0.01), 0.3 + j(0.02), 0.15 + j(0.01))
    lungs = _bool(left | right)
    image = np.where(body, 0.55, 0.02)
    image = np.where(lungs, 0.22, image)
    # Mediastinum and spine between the lungs, heart bulging into the left lung.
    image = np.where(_bool(np.abs(x - 0.5) < 0.07) & body, 0.72, image)
    heart = _ellipse(y, x, 0.62 + j(0.01), 0.56 + j(0.01), 0.14, 0.13 + j(0.01))
    image = np.where(heart & body, np.maximum(image, 0.62), image)
    # Diaphragm domes close the lungs from below.
    dome = y > 0.72 + 0.06 * np.cos((x - 0.5) * 2 * np.pi) + j(0.01)
    image = np.where(dome & body, 0.7, image)
    lungs = _bool(lungs & ~dome & ~heart)
    # Ribs: arcs across the thorax; clavicles: two bars at the top.
    phase = rng.uniform(0, 2 * np.pi)
    ribs = (
        (np.sin((y + 0.25 * (x - 0.5) ** 2) * 2 * np.pi * 9 + phase) > 0.72)
        & body
        & (y < 0.75)
    )
    image = image + 0.09 * ribs
    clavicles = _bool(
        (np.abs(y - 0.2 - 0.25 * np.abs(x - 0.5)) < 0.012) & (np.abs(x - 0.5) < 0.3)
    )
    image = image + 0.12 * clavicles
    image = image + 0.06 * _texture(rng, size, 0.03) * body
    mask: BoolImage | None = None
    if positive:
        profile, mask = _nodule(rng, y, x, lungs, size, (0.03, 0.06))
        image = image + rng.uniform(0.12, 0.25) * profile
    image = gaussian_filter(image, sigma=0.6)
    gamma = rng.uniform(0.8, 1.25)
    image = np.clip(image, 0.0, 1.0) ** gamma * rng.uniform(0.85, 1.0) + rng.uniform(
        0.0, 0.05
    )
    image = image + rng.normal(0.0, rng.uniform(0.01, 0.03), image.shape)
    return np.clip(image, 0.0, 1.0), mask


def make_ct_slice(
    rng: np.random.Generator, size: int, positive: bool
) -> tuple[FloatImage, BoolImage | None]:
    """Return an axial chest CT slice in Hounsfield units and its lesion mask.

    Parameters
    ----------
    rng
        Random generator.
    size
        Image side in pixels.
    positive
        Whether to add a nodule.
    """
    y, x = _grid(size)

    def j(scale: float) -> float:
        return float(rng.normal(0.0, scale))

    body = _ellipse(y, x, 0.5 + j(0.01), 0.5, 0.33 + j(0.01), 0.45 + j(0.01))
    inner = _ellipse(y, x, 0.5, 0.5, 0.3, 0.42)
    hu = np.full((size, size), -1000.0)
    hu = np.where(body, -100.0, hu)  # fat rim
    hu = np.where(inner, 40.0, hu)  # muscle / soft tissue
    left = _ellipse(y, x, 0.47 + j(0.01), 0.3 + j(0.01), 0.2 + j(0.01), 0.15)
    right = _ellipse(y, x, 0.47 + j(0.01), 0.7 + j(0.01), 0.2 + j(0.01), 0.15)
    lungs = _bool(left | right)
    hu = np.where(lungs, -850.0 + 60.0 * _texture(rng, size, 0.02), hu)
    heart = _ellipse(y, x, 0.52, 0.53, 0.12, 0.1)
    hu = np.where(heart, 40.0, hu)
    aorta = _ellipse(y, x, 0.4, 0.55, 0.04, 0.04)
    hu = np.where(aorta, 180.0, hu)
    spine = _ellipse(y, x, 0.72, 0.5, 0.06, 0.05)
    hu = np.where(spine, 700.0, hu)
    table = _bool((y > 0.88) & (y < 0.9))
    hu = np.where(table, 200.0, hu)
    lungs = _bool(lungs & ~heart)
    mask: BoolImage | None = None
    if positive:
        profile, mask = _nodule(rng, y, x, lungs, size, (0.015, 0.04))
        target = rng.uniform(-100.0, 40.0)
        hu = hu + profile * (target - hu)
    hu = gaussian_filter(hu, sigma=0.7) + rng.normal(
        0.0, rng.uniform(15.0, 35.0), hu.shape
    )
    return np.clip(hu, -1024.0, 3071.0), mask


def _common(
    ds: Dataset,
    rng: np.random.Generator,
    *,
    patient: int,
    study_uid: str,
    study_date: dt.date,
    study_index: int,
    modality: str,
    sop_class: UID,
) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _uid(rng)
    ds.PatientName = f"SYNTH^PATIENT{patient:04d}"
    ds.PatientID = f"SYNTH{patient:04d}"
    ds.PatientBirthDate = f"{1940 + patient % 50}0{1 + patient % 9}15"
    ds.PatientSex = "FM"[patient % 2]
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = "093000"
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = "093100"
    ds.ReferringPhysicianName = ""
    ds.StudyID = str(study_index + 1)
    ds.AccessionNumber = f"A{patient:04d}{study_index:02d}"
    ds.StudyDescription = "CHEST PA" if modality == "DX" else "CT CHEST"
    ds.Modality = modality
    ds.SeriesInstanceUID = _uid(rng)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "dicom-node synthetic"
    ds.ManufacturerModelName = "medtrain synth"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "Synthetic Hospital"
    ds.SamplesPerPixel = 1
    ds.BurnedInAnnotation = "NO"


def dx_dataset(pixels: npt.NDArray[np.uint16], monochrome1: bool) -> Dataset:
    """Return the image part of a DX For Presentation instance: chest PA, 12 bits.

    Parameters
    ----------
    pixels
        Stored values (0..4095), rows x columns.
    monochrome1
        Whether ``pixels`` are stored inverted (MONOCHROME1, Presentation LUT
        Shape INVERSE).

    Returns
    -------
    pydicom.dataset.Dataset
        The DX image, DX detector and presentation attributes and Pixel Data;
        the patient, study and series attributes are added by ``write_set``.
    """
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]
    ds.ViewPosition = "PA"
    ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior")]  # CID 4010
    ds.PositionerType = "COLUMN"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Chest")]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if monochrome1 else 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.AcquisitionContextSequence = []
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    # PS3.3 C.8.11.3.1.2: INVERSE for MONOCHROME1, IDENTITY for MONOCHROME2.
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    return ds


def _ct_dataset(
    pixels: npt.NDArray[np.uint16], rows: int, rng: np.random.Generator
) -> Dataset:
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = _uid(rng)
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [-175.0, -175.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [round(350.0 / rows, 6)] * 2  # DS: at most 16 characters
    ds.SliceThickness = 1.25
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def synthesize(
    out: Path,
    n: int,
    seed: int,
    modality: str = "DX",
    size: int = 256,
    prevalence: float = 0.5,
    progress: Progress | None = None,
) -> Path:
    """Write ``n`` labelled synthetic images as DICOM, their masks and labels.csv.

    Parameters
    ----------
    out
        Output folder: ``dicom/<patient>/<study>/<sop>.dcm``, ``masks/<sop>.png``
        and ``labels.csv`` (path, label, patient_id, study_uid, mask).
    n
        Number of images.
    seed
        Seed: the same seed gives the same pixels and labels.
    modality
        ``DX`` or ``CT``.
    size
        Image side in pixels (>= 32).
    prevalence
        Fraction of positive images (0 to 1).
    progress
        Called with 1 after each image written.

    Returns
    -------
    pathlib.Path
        The labels.csv written.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    if modality not in ("DX", "CT"):
        raise ValueError(f"modality: expected DX or CT, found {modality!r}")
    if size < 32:
        raise ValueError(f"size: expected >= 32, found {size}")

    def make(
        rng: np.random.Generator, positive: bool
    ) -> tuple[Dataset, BoolImage | None]:
        if modality == "DX":
            image, mask = make_dx(rng, size, positive)
            monochrome1 = bool(rng.random() < 0.25)
            stored = image * 4095.0
            if monochrome1:
                stored = 4095.0 - stored
            return dx_dataset(np.round(stored).astype(np.uint16), monochrome1), mask
        hu, mask = make_ct_slice(rng, size, positive)
        pixels = np.round(hu + 1024.0).clip(0, 4095).astype(np.uint16)
        return _ct_dataset(pixels, size, rng), mask

    return write_set(out, n, seed, modality, make, prevalence, progress)


# Makes one image: (rng, positive) -> the modality's image data set, pixels set,
# and the lesion mask (None for a negative image).
ImageMaker = Callable[[np.random.Generator, bool], tuple[Dataset, BoolImage | None]]


def write_set(
    out: Path,
    n: int,
    seed: int,
    modality: str,
    make: ImageMaker,
    prevalence: float = 0.5,
    progress: Progress | None = None,
) -> Path:
    """Write ``n`` images from ``make`` as DICOM studies, their masks and labels.csv.

    Patients get one to three studies of one image each; about 30 % of the
    instances are compressed losslessly. ``make`` draws from the same seeded
    generator, so the same seed gives the same files.

    Parameters
    ----------
    out
        Output folder: ``dicom/<patient>/<study>/<sop>.dcm``, ``masks/<sop>.png``
        and ``labels.csv`` (path, label, patient_id, study_uid, mask).
    n
        Number of images.
    seed
        Seed of the generator passed to ``make``.
    modality
        ``DX`` or ``CT``: the SOP class and the study description.
    make
        Returns an image's data set (image module and pixels) and its mask.
    prevalence
        Fraction of positive images (0 to 1).
    progress
        Called with 1 after each image written.

    Returns
    -------
    pathlib.Path
        The labels.csv written.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    if modality not in _SOP_CLASSES:
        raise ValueError(f"modality: expected DX or CT, found {modality!r}")
    if n < 1:
        raise ValueError(f"n: expected >= 1, found {n}")
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"prevalence: expected 0..1, found {prevalence}")
    from PIL import Image

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    labels_path = out / "labels.csv"
    positives = set(rng.permutation(n)[: round(n * prevalence)].tolist())
    rows: list[dict[str, str]] = []
    patient = 0
    index = 0
    while index < n:
        patient += 1
        for study_index in range(int(rng.integers(1, 4))):
            if index >= n:
                break
            positive = index in positives
            body, mask = make(rng, positive)
            study_uid = _uid(rng)
            study_date = dt.date(2020, 1, 1) + dt.timedelta(
                days=int(rng.integers(0, 1500))
            )
            _common(
                body,
                rng,
                patient=patient,
                study_uid=study_uid,
                study_date=study_date,
                study_index=study_index,
                modality=modality,
                sop_class=_SOP_CLASSES[modality],
            )
            body.file_meta = FileMetaDataset()
            body.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            syntax = (
                _COMPRESSED[int(rng.integers(len(_COMPRESSED)))]
                if rng.random() < 0.3
                else None
            )
            if syntax is not None:
                body.compress(
                    syntax,
                    encoding_plugin="pylibjpeg" if syntax == RLELossless else "",
                    generate_instance_uid=False,  # the same image, stored losslessly
                )
            relative = (
                Path("dicom")
                / body.PatientID
                / study_uid
                / f"{body.SOPInstanceUID}.dcm"
            )
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            body.save_as(out / relative, enforce_file_format=True)
            mask_relative = ""
            if mask is not None:
                mask_relative = f"masks/{body.SOPInstanceUID}.png"
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / mask_relative)
            rows.append(
                {
                    "path": relative.as_posix(),
                    "label": "nodule" if positive else "normal",
                    "patient_id": str(body.PatientID),
                    "study_uid": study_uid,
                    "mask": mask_relative,
                }
            )
            index += 1
            if progress is not None:
                progress(1)
    with labels_path.open("w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["path", "label", "patient_id", "study_uid", "mask"]
        )
        writer.writeheader()
        writer.writerows(rows)
    return labels_path
