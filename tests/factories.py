"""Synthetic DICOM instances for tests and benchmarks (no downloaded data)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from inference import CodedConcept, Label, ModelArtifact, PreprocessSpec, build_model

# Values a test can look for in logs: they must never appear there.
SENTINEL_NAME = "PHI^SENTINEL"
SENTINEL_BIRTH_DATE = "SENTINEL"  # not a valid DA: pydicom warns when it reads it
SENTINEL_PATIENT_ID = "SENTINEL-ID-7731"

DCMTK_BIN = Path("/usr/bin")

LABELS = (
    Label("nodule", CodedConcept("27925004", "SCT", "Nodule"), 0.5),
    Label("effusion", CodedConcept("60046008", "SCT", "Pleural effusion"), 0.5),
)


def make_artifact(
    architecture: str = "resnet18",
    aggregation: str = "max",
    top_k: int = 1,
    size: int = 64,
) -> ModelArtifact:
    torch.manual_seed(0)
    model = build_model(architecture, len(LABELS), 1)
    # Random BatchNorm statistics make a random net's outputs less degenerate.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.running_mean, -0.1, 0.1)  # type: ignore[arg-type]
            torch.nn.init.uniform_(m.running_var, 0.5, 1.5)  # type: ignore[arg-type]
    """Return a small random-weight artifact with two labels (fixed seed)."""
    return ModelArtifact(
        name="test",
        version="0",
        device_uid="2.25.42",
        architecture=architecture,
        preprocessing=PreprocessSpec(size=(size, size)),
        labels=LABELS,
        state_dict=model.state_dict(),
        aggregation=aggregation,
        top_k=top_k,
    )


def dcmtk(tool: str) -> str:
    """Return the full path of a dcmtk tool (pynetdicom's apps shadow the names)."""
    path = DCMTK_BIN / tool
    if not path.is_file():
        raise FileNotFoundError(
            f"dcmtk's {tool} not found at {path}: run .ci/setup-system.sh"
        )
    return str(path)


def storescu_folder(
    port: int, folder: Path, called_ae_title: str = "DICOMNODE", timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Send a folder with dcmtk's storescu over one association (TCP_NODELAY=1)."""
    return subprocess.run(
        [
            dcmtk("storescu"),
            "-aec",
            called_ae_title,
            "+sd",
            "127.0.0.1",
            str(port),
            str(folder),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        timeout=timeout,
        check=False,
    )


def pydicom_corpus() -> list[Path]:
    """Return every file that ships with pydicom and pydicom-data, sorted."""
    import data_store

    roots = [
        Path(pydicom.data.__file__).parent / "test_files",
        Path(data_store.__file__).parent / "data",
    ]
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file())


def corpus_file(name: str) -> Path:
    """Return one named file of the pydicom / pydicom-data corpus.

    pydicom's own files first: a GPU host's environment may lack pydicom-data.
    """
    own = Path(pydicom.data.__file__).parent / "test_files"
    for path in sorted(own.rglob(name)):
        return path
    for path in pydicom_corpus():
        if path.name == name:
            return path
    raise FileNotFoundError(name)


def make_ct(
    study_uid: str | None = None,
    series_uid: str | None = None,
    *,
    instance_number: int = 1,
    rows: int = 64,
    columns: int = 64,
    seed: int = 0,
    patient_name: str = "TEST^PATIENT",
    patient_birth_date: str = "19700101",
    patient_id: str = "TEST-0001",
) -> Dataset:
    """Return a valid CT Image instance with 16-bit signed pixels.

    Parameters
    ----------
    study_uid, series_uid
        UIDs to file it under; new ones when None.
    instance_number
        Instance Number and slice position.
    rows, columns
        Image size.
    seed
        Seed of the pixel noise.
    patient_name, patient_birth_date, patient_id
        Patient module values (tests put sentinels here).
    """
    rng = np.random.default_rng(seed)
    pixels = rng.integers(-1024, 2000, size=(rows, columns), dtype=np.int16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "dicom-node tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelData = pixels.tobytes()
    return ds


def write_study(
    folder: Path,
    n: int,
    *,
    study_uid: str | None = None,
    rows: int = 64,
    columns: int = 64,
    **kwargs: str,
) -> list[Path]:
    """Write ``n`` CT instances of one study and series into ``folder``.

    Parameters
    ----------
    folder
        Where the files go (created).
    n
        How many instances.
    study_uid
        The study's UID; a new one when None.
    rows, columns
        Image size.
    kwargs
        Patient values passed to :func:`make_ct`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for i in range(n):
        ds = make_ct(
            study_uid,
            series_uid,
            instance_number=i + 1,
            rows=rows,
            columns=columns,
            seed=i,
            **kwargs,
        )
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def copy_n(template: Path, folder: Path, n: int) -> Iterator[Path]:
    """Copy a file ``n`` times into ``folder`` (for senders that need many files)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dst = folder / f"{i:05d}.dcm"
        shutil.copyfile(template, dst)
        yield dst


def encode_body(ds: Dataset) -> bytes:
    """Return the data set encoded in Explicit VR Little Endian, without File Meta."""
    from pynetdicom.dsutils import encode

    body = encode(ds, False, True)
    if body is None:
        raise ValueError("could not encode the data set")
    return body


def raw_file(
    path: Path,
    body: bytes,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> Path:
    """Write a Part 10 file whose File Meta says what we like and whose data set is
    ``body`` as given, so a sender streams it to the node without parsing it.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info

    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    path.write_bytes(buf.getvalue() + body)
    return path
