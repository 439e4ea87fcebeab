"""Encode the node's result objects as DICOM files, byte for byte as pydicom does.

pydicom's writer spends about 17 microseconds on each data element (~4.5 ms
for a one-image report of ~260 elements), in the thread that also builds the
results, holding the GIL the scoring thread needs. This encoder writes the
same bytes for the Explicit VR Little Endian data sets the node builds, at a
fraction of the cost: strings, numbers, bytes and sequences directly; every
other element (person names, non-ASCII text, date objects, ...) through
pydicom's own element writer; and any data set it cannot be sure of (raw
elements read from a file, ambiguous VRs, another transfer syntax) through
:func:`pydicom.dcmwrite` whole. ``tests/test_encode.py`` checks the bytes
against pydicom's on every kind of result object and on pydicom's own test
files.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from copy import deepcopy
from io import BytesIO
from typing import cast

from pydicom import dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.multival import MultiValue
from pydicom.uid import UID

__all__ = ["direct_file_bytes", "file_bytes"]

# VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG = frozenset(
    ("OB", "OD", "OF", "OL", "OW", "OV", "SQ", "SV", "UC", "UR", "UT", "UN", "UV")
)
_NUMBERS = {
    "US": "H",
    "SS": "h",
    "UL": "L",
    "SL": "l",
    "FL": "f",
    "FD": "d",
    "SV": "q",
    "UV": "Q",
}
# Strings written as ASCII whatever the character set (PS3.5 6.1.2.3): the
# default repertoire, space padded ("UI" is padded with a NUL instead).
_STRINGS = frozenset(("AE", "AS", "CS", "UI", "UR", "DA", "DT", "TM"))
# Text in the data set's character set: fast only while it is ASCII, which
# every character set pydicom writes encodes alike.
_TEXT = frozenset(("LO", "LT", "SH", "ST", "UC", "UT"))
_BYTES = frozenset(("OB", "OD", "OF", "OL", "OW", "OV", "UN"))
_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = b"\xff\xff\xff\xff"
_PIXEL_DATA = 0x7FE00010


class _UnsureError(Exception):
    """The data set needs pydicom's whole writer."""


def file_bytes(ds: Dataset) -> bytes:
    """Return ``ds`` as a DICOM file (preamble, File Meta Information, data set).

    The same bytes as ``ds.save_as(f, enforce_file_format=True)``; like it,
    ``ds`` and its File Meta Information are left unchanged, except that
    Pixel Data's undefined length follows the transfer syntax and ambiguous
    VRs ("US or SS", "OB or OW") are resolved.

    Parameters
    ----------
    ds
        The data set, with ``file_meta`` naming its transfer syntax.

    Returns
    -------
    bytes
        The file's content.

    Raises
    ------
    ValueError, AttributeError
        What :func:`pydicom.dcmwrite` raises for a data set it cannot write
        (e.g. File Meta Information without a SOP Class UID).
    """
    encoded = direct_file_bytes(ds)
    if encoded is not None:
        return encoded
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def direct_file_bytes(ds: Dataset) -> bytes | None:
    """Return :func:`file_bytes` encoded here, or None where pydicom must write it.

    Parameters
    ----------
    ds
        The data set.

    Returns
    -------
    bytes or None
        None for another transfer syntax than Explicit VR Little Endian (or
        one of its encapsulated kin), elements still raw (as read from a
        file), ambiguous VRs, or what :func:`pydicom.dcmwrite` would refuse.
    """
    meta = ds.get("file_meta")
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    preamble = getattr(ds, "preamble", None) or b"\x00" * 128
    if (
        syntax is None
        or not _explicit_little(UID(syntax))
        or len(preamble) != 128
        or any(tag >> 16 in (0, 2) for tag in ds.keys())  # noqa: SIM118 - tags, not elements
    ):
        return None
    if _PIXEL_DATA in ds:
        ds[_PIXEL_DATA].is_undefined_length = UID(syntax).is_compressed
    try:
        body = _dataset(ds, "iso8859", [ds])
        head = _meta(meta, ds)
    except _UnsureError:
        return None
    return b"".join((preamble, b"DICM", head, body))


def _explicit_little(syntax: UID) -> bool:
    return bool(
        syntax.is_transfer_syntax
        and not syntax.is_private
        and not syntax.is_implicit_VR
        and syntax.is_little_endian
        and not syntax.is_deflated
    )


def _meta(meta: FileMetaDataset, ds: Dataset) -> bytes:
    # What dcmwrite(enforce_file_format=True) does to a copy of the meta.
    meta = deepcopy(meta)
    for keyword, source in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        current, value = meta.get(keyword), ds.get(source)
        if current is None or (value and value != current):
            setattr(meta, keyword, value)
    try:
        validate_file_meta(meta, enforce_standard=True)
    except (AttributeError, ValueError):
        raise _UnsureError from None  # dcmwrite raises it, with its own message
    if 0x00020000 in meta:
        del meta[0x00020000]
    body = _dataset(meta, "iso8859", [meta])
    return b"".join((b"\x02\x00\x00\x00UL\x04\x00", struct.pack("<L", len(body)), body))


def _dataset(
    ds: Dataset, parent_encoding: str | list[str], ancestors: list[Dataset]
) -> bytes:
    """Encode a data set; ``ancestors``: it, then its parents, nearest first."""
    encodings = ds.get("SpecificCharacterSet", parent_encoding)
    chunks: list[bytes] = []
    for elem in ds.elements():
        tag = elem.tag
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # retired group lengths are not written (PS3.5 7.2)
        if not isinstance(elem, DataElement):
            raise _UnsureError  # still raw: its encoding may not be this one
        if len(elem.VR) != 2:
            # "US or SS", "OB or OW": decided from the data set, as dcmwrite
            # does (which also leaves the element with the VR it chose).
            try:
                correct_ambiguous_vr_element(elem, ds, True, ancestors)
            except AttributeError:  # what decides it is missing: dcmwrite says so
                raise _UnsureError from None
            if len(elem.VR) != 2:
                raise _UnsureError
        vr = elem.VR
        value = elem.value
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if vr == "SQ":
            items = b"".join(
                _item(item, encodings, ancestors)
                for item in cast(Sequence[Dataset], value or ())
            )
            if elem.is_undefined_length:
                chunks += (head, b"SQ\x00\x00", _UNDEFINED, items, _SEQUENCE_END)
            else:
                chunks += (head, b"SQ\x00\x00", struct.pack("<L", len(items)), items)
            continue
        encoded = _value(elem, vr, value)
        if encoded is None or (len(encoded) > 0xFFFF and vr not in _LONG):
            chunks.append(_pydicom_element(elem, encodings))
            continue
        if vr in _LONG:
            if elem.is_undefined_length:  # encapsulated Pixel Data
                if tag == _PIXEL_DATA and not encoded.startswith(_ITEM):
                    raise _UnsureError  # not encapsulated: dcmwrite says so
                chunks += (head, vr.encode(), b"\x00\x00", _UNDEFINED, encoded)
                chunks.append(_SEQUENCE_END)
            else:
                length = struct.pack("<L", len(encoded))
                chunks += (head, vr.encode(), b"\x00\x00", length, encoded)
        else:
            chunks += (head, vr.encode(), struct.pack("<H", len(encoded)), encoded)
    return b"".join(chunks)


def _item(item: Dataset, encodings: str | list[str], ancestors: list[Dataset]) -> bytes:
    body = _dataset(item, encodings, [item, *ancestors])
    if getattr(item, "is_undefined_length_sequence_item", False):
        return b"".join((_ITEM, _UNDEFINED, body, _ITEM_END))
    return b"".join((_ITEM, struct.pack("<L", len(body)), body))


def _value(elem: DataElement, vr: str, value: object) -> bytes | None:
    """Return the encoded value, or None to let pydicom encode the element."""
    if value is None or (isinstance(value, str) and not value):
        return b""
    if elem.is_buffered:
        return None
    if vr in _STRINGS or vr in _TEXT:
        text = _joined(value)
        if text is None or not text.isascii():
            return None
        if len(text) % 2:
            text += "\x00" if vr == "UI" else " "
        return text.encode("ascii")
    if vr in ("DS", "IS"):
        values = value if isinstance(value, MultiValue | list | tuple) else (value,)
        text = "\\".join(
            v.original_string if hasattr(v, "original_string") else str(v)
            for v in values
        )
        if not text.isascii():
            return None
        return (text + " " if len(text) % 2 else text).encode("ascii")
    if vr in _NUMBERS:
        code = _NUMBERS[vr]
        if isinstance(value, MultiValue | list):
            if not value:
                return b""
            return struct.pack(f"<{len(value)}{code}", *value)
        if isinstance(value, int | float):
            return struct.pack(f"<{code}", value)
        return None
    if vr in _BYTES and isinstance(value, bytes):
        return value + b"\x00" if len(value) % 2 else value
    return None


def _joined(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, MultiValue | list | tuple) and all(
        isinstance(v, str) for v in value
    ):
        return "\\".join(value)
    return None


def _pydicom_element(elem: DataElement, encodings: str | list[str]) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_data_element(out, elem, encodings)
    return out.getvalue()
