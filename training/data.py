"""Labelled images in: a manifest or a class tree, split by patient, cached."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from inference.preprocess import PreprocessSpec, preprocess

__all__ = [
    "IMAGE_SUFFIXES",
    "DataError",
    "Sample",
    "image_size",
    "load_manifest",
    "load_samples",
    "load_tree",
    "mask_frame",
    "preprocessed",
    "split_by_patient",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_SPLITS = {"train", "val", "test"}


class DataError(ValueError):
    """A manifest or folder cannot be used; the message names the row or path."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled image file.

    Parameters
    ----------
    path
        The file (DICOM, PNG or JPEG).
    label
        Its class name.
    patient_id
        Whose image it is (for the split); the file itself when unknown.
    split
        ``train``, ``val`` or ``test`` when the manifest fixes it, else empty.
    mask
        The lesion mask (PNG) for positive images, when known.
    """

    path: Path
    label: str
    patient_id: str
    split: str = ""
    mask: Path | None = None


def load_manifest(path: Path, labels: Sequence[str] | None = None) -> list[Sample]:
    """Read a CSV manifest: path, label, and optionally patient_id, split, mask.

    Relative paths are relative to the manifest's folder.

    Parameters
    ----------
    path
        The CSV file.
    labels
        The class names allowed; any when None.

    Returns
    -------
    list of Sample
        One per row.

    Raises
    ------
    DataError
        If a column is missing, a file does not exist, a label is unknown or a
        split is not train / val / test; the message names the row.
    """
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            if not {"path", "label"} <= columns:
                raise DataError(f"{path}: needs the columns path and label")
            rows = list(reader)
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror}") from exc
    samples = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        where = f"{path}, row {number}"
        file = path.parent / row["path"]
        if not row["path"] or not file.is_file():
            raise DataError(f"{where}: file {row['path']!r} not found")
        label = (row.get("label") or "").strip()
        if not label or (labels is not None and label not in labels):
            raise DataError(f"{where}: unknown label {label!r}")
        split = (row.get("split") or "").strip()
        if split and split not in _SPLITS:
            raise DataError(f"{where}: split must be train, val or test, not {split!r}")
        mask = (row.get("mask") or "").strip()
        samples.append(
            Sample(
                path=file,
                label=label,
                patient_id=(row.get("patient_id") or "").strip() or str(file),
                split=split,
                mask=path.parent / mask if mask else None,
            )
        )
    if not samples:
        raise DataError(f"{path}: no rows")
    return samples


def load_tree(root: Path) -> list[Sample]:
    """Read ``<root>/<class>/...``: every DICOM, PNG or JPEG file under a class folder.

    Parameters
    ----------
    root
        The folder.

    Returns
    -------
    list of Sample
        One per file, the patient being the file itself.

    Raises
    ------
    DataError
        If there is no class folder, or a class folder holds no image.
    """
    classes = sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not classes:
        raise DataError(f"{root}: expected one folder per class")
    samples = []
    for folder in classes:
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES | {".dcm", ""})
        )
        if not files:
            raise DataError(f"{root}: class folder {folder.name!r} holds no image")
        samples += [Sample(p, folder.name, str(p)) for p in files]
    return samples


def load_samples(data: Path) -> list[Sample]:
    """Read a manifest (a ``.csv`` file, or a folder holding ``labels.csv``) or a tree.

    Parameters
    ----------
    data
        The CSV, or the folder.

    Returns
    -------
    list of Sample
        The labelled files.

    Raises
    ------
    DataError
        If nothing usable is there.
    """
    if data.is_file():
        return load_manifest(data)
    if (data / "labels.csv").is_file():
        return load_manifest(data / "labels.csv")
    if data.is_dir():
        return load_tree(data)
    raise DataError(f"{data}: no such file or folder")


def split_by_patient(
    samples: Sequence[Sample], fractions: tuple[float, float, float], seed: int
) -> dict[str, list[Sample]]:
    """Split into train / val / test with no patient in two splits, stratified.

    Patients are grouped by their majority label, shuffled with ``seed`` and dealt
    to the splits in proportion, so every split sees every class. A split a
    manifest fixes is kept.

    Parameters
    ----------
    samples
        The labelled files.
    fractions
        (train, val, test), summing to 1.
    seed
        Seed of the shuffle: the same seed gives the same split.

    Returns
    -------
    dict
        ``train``, ``val`` and ``test`` lists.

    Raises
    ------
    DataError
        If a patient's files carry two different fixed splits.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(
            f"fractions: expected three values summing to 1, found {fractions}"
        )
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_patient[s.patient_id].append(s)
    out: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    strata: dict[str, list[str]] = defaultdict(list)
    for patient, items in sorted(by_patient.items()):
        fixed = {s.split for s in items if s.split}
        if len(fixed) > 1:
            raise DataError(
                f"patient {patient!r} is assigned to splits {sorted(fixed)}"
            )
        if fixed:
            out[fixed.pop()].extend(items)
            continue
        labels = [s.label for s in items]
        strata[max(sorted(set(labels)), key=labels.count)].append(patient)
    rng = np.random.default_rng(seed)
    for patients in strata.values():
        order = [patients[i] for i in rng.permutation(len(patients))]
        n_train = round(len(order) * fractions[0])
        n_val = round(len(order) * fractions[1])
        for name, chunk in (
            ("train", order[:n_train]),
            ("val", order[n_train : n_train + n_val]),
            ("test", order[n_train + n_val :]),
        ):
            for patient in chunk:
                out[name].extend(by_patient[patient])
    return out


def preprocessed(
    sample: Sample, spec: PreprocessSpec, cache: Path | None
) -> torch.Tensor:
    """Return a sample's frames [N, C, H, W] through ``inference.preprocess``.

    DICOM goes through the very code the node runs; PNG / JPEG are read as 8-bit
    images and scaled like a colour DICOM. With a cache folder, the result is kept
    as ``.npy`` under a key of the file's content and the spec, so later epochs
    do not decode again (no pickle: ``np.load(allow_pickle=False)``).

    Parameters
    ----------
    sample
        The file.
    spec
        The preprocessing spec that goes into the artifact.
    cache
        Folder for cached frames, or None.

    Returns
    -------
    torch.Tensor
        float32 frames.

    Raises
    ------
    DataError
        If the file is neither a readable DICOM nor an image.
    """
    key = None
    if cache is not None:
        digest = hashlib.sha256(sample.path.read_bytes())
        digest.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
        key = cache / f"{digest.hexdigest()}.npy"
        if key.is_file():
            return torch.from_numpy(np.load(key, allow_pickle=False))
    if sample.path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            frames = _image_frames(sample.path, spec)
        except (OSError, ValueError) as exc:
            raise DataError(f"{sample.path}: cannot read as an image ({exc})") from exc
    else:
        try:
            frames = preprocess(dcmread(sample.path), spec).pixels
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise DataError(f"{sample.path}: cannot read as DICOM ({exc})") from exc
    if key is not None:
        key.parent.mkdir(parents=True, exist_ok=True)
        tmp = key.with_suffix(".tmp.npy")
        np.save(tmp, frames.numpy())
        tmp.replace(key)
    return frames


def mask_frame(
    path: Path, spec: PreprocessSpec, image_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Return a lesion mask (PNG) in the model input's geometry: bool [1, 1, H, W].

    Any non-zero pixel is lesion (0/1, 0/255, 16-bit or coloured masks alike).
    The mask goes through the resize the images go through (stretch or
    letterbox), so a pixel of it lies where the same pixel of the image lies;
    an input pixel is lesion where the lesion covers more than half of it (a
    wider cut, 5 %, cost 0.10 of test AUROC on bench/train.py's realistic set).

    Parameters
    ----------
    path
        The mask: non-zero where the lesion is.
    spec
        The images' preprocessing spec (its size and resize are used).
    image_size
        The image's (rows, columns): the mask must be as large.

    Raises
    ------
    DataError
        If the mask cannot be read as an image, or its size is not its image's.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            lesion = np.asarray(image) != 0
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the mask ({exc})") from exc
    if lesion.ndim == 3:
        lesion = lesion.any(axis=2)
    if image_size is not None and lesion.shape != tuple(image_size):
        raise DataError(
            f"{path}: the mask is {lesion.shape[1]} x {lesion.shape[0]} pixels, its "
            f"image {image_size[1]} x {image_size[0]}"
        )
    plain = replace(
        spec,
        channels=1,
        window="fixed",
        window_center=127.5,
        window_width=255.0,
        mean=(0.0,),
        std=(1.0,),
    )
    return _array_frames(lesion.astype(np.uint8) * 255, plain)[:1] > 0.5


def image_size(path: Path) -> tuple[int, int]:
    """Return an image file's (rows, columns) without decoding its pixels.

    Raises
    ------
    DataError
        If the file is neither a readable DICOM nor an image.
    """
    from PIL import Image

    try:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                return image.height, image.width
        ds = dcmread(path, stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: cannot read its size ({exc})") from exc


def _image_frames(path: Path, spec: PreprocessSpec) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.mode not in ("L", "I;16", "I")
        array = np.asarray(image.convert("RGB" if rgb else "L"), dtype=np.uint8)
    return _array_frames(array, spec)


def _array_frames(array: npt.NDArray[np.uint8], spec: PreprocessSpec) -> torch.Tensor:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    # Wrap the pixels in a minimal data set so PNG / JPEG take the same path.
    rgb = array.ndim == 3
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = array.shape[:2]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = array.tobytes()
    return preprocess(ds, spec).pixels
