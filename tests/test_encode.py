"""The node's DICOM file encoder writes exactly what pydicom writes."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from copy import deepcopy
from io import BytesIO
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit

from dicom_node.encode import direct_file_bytes, file_bytes
from tests.factories import pydicom_corpus
from tests.test_results import results


def pydicom_bytes(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def decoded(ds: Dataset) -> Dataset:
    """Decode every element (recursively), as a data set built in memory is."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                decoded(item)
    return ds


@pytest.mark.parametrize("kind", ["CT", "DX", "CR MONOCHROME1", "MR", "sparse"])
def test_every_result_object_is_encoded_as_pydicom_encodes_it(kind: str) -> None:
    result, _ = results(kind, jpeg=kind == "DX", parametric_map=True)
    rerun, _ = results(kind, run=2, previous_sr=result.sr)
    objects = (*result.datasets, *rerun.datasets)
    assert {str(ds.SOPClassUID.name) for ds in objects} >= {
        "Comprehensive 3D SR Storage",
        "Secondary Capture Image Storage",
    }
    for ds in objects:
        meta = deepcopy(ds.file_meta)
        ours = direct_file_bytes(ds)  # not handed to pydicom's writer
        assert ours is not None, ds.SOPClassUID.name
        assert ours == pydicom_bytes(ds), ds.SOPClassUID.name
        assert file_bytes(ds) == ours
        assert ds.file_meta == meta  # the data set's own meta is left as it was
        assert dcmread(BytesIO(ours)).SOPInstanceUID == ds.SOPInstanceUID


def _corpus() -> list[Path]:
    charsets = Path(pydicom.data.__file__).parent / "charset_files"
    files = []
    for path in [*pydicom_corpus(), *sorted(charsets.glob("*.dcm"))]:
        if path.suffix.lower() not in (".dcm", "") or path.stat().st_size > 4_000_000:
            continue
        files.append(path)
    return files


def test_pydicoms_own_files_are_encoded_as_pydicom_encodes_them() -> None:
    """Every VR, character sets (the non-ASCII text goes through pydicom's
    element writer), private and undefined-length sequences, encapsulated
    pixel data: decoded, then written as Explicit VR Little Endian."""
    compared, charsets = 0, set()
    for path in _corpus():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = dcmread(path)
                syntax = UID(ds.file_meta.TransferSyntaxUID)
                if not syntax.is_little_endian or syntax.is_deflated:
                    continue
                if syntax.is_implicit_VR:
                    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                decoded(ds)
                decoded(ds.file_meta)
                expected = pydicom_bytes(ds)
            except (InvalidDicomError, AttributeError, ValueError, KeyError, OSError):
                continue  # not a file pydicom itself writes back
        ours = direct_file_bytes(ds)
        if ours is None:  # e.g. an ambiguous VR
            assert file_bytes(ds) == expected, path.name
            continue
        assert ours == expected, path.name
        compared += 1
        charsets.add(str(ds.get("SpecificCharacterSet", "")))
    print(compared, len(charsets))
    assert compared >= 150
    assert len(charsets) >= 10  # Latin, Greek, Arabic, Hebrew, ISO 2022 Japanese, ...


def test_a_data_set_read_from_a_file_is_written_by_pydicom_whole(
    tmp_path: Path,
) -> None:
    """Raw elements keep the encoding they were read in; pydicom converts them."""
    source = next(p for p in _corpus() if p.name == "CT_small.dcm")
    ds = dcmread(source)  # elements still raw
    assert direct_file_bytes(ds) is None
    assert file_bytes(ds) == pydicom_bytes(dcmread(source))


def test_what_dcmwrite_refuses_is_refused_with_its_message() -> None:
    result, _ = results("CT")
    capture = result.captures[0]
    for change in ("pixels not encapsulated", "no SOP Class UID"):
        if change == "pixels not encapsulated":
            capture.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        else:
            capture.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            del capture.file_meta.MediaStorageSOPClassUID
            del capture.SOPClassUID
        theirs = _refusal(pydicom_bytes, capture)
        assert theirs != "written", change
        assert _refusal(file_bytes, capture) == theirs, change


def _refusal(write: Callable[[Dataset], bytes], ds: Dataset) -> str:
    try:
        write(ds)
    except (ValueError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "written"
