"""DIMSE constants the node uses, named and cited."""

import struct
import traceback
import zlib

from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

__all__ = [
    "CANNOT_UNDERSTAND",
    "COMMAND_MAX",
    "CONFLICTING_INSTANCE",
    "DATASET_DOES_NOT_MATCH_SOP_CLASS",
    "DECODE_ERRORS",
    "INVALID_UID",
    "OUT_OF_RESOURCES",
    "READER_ERRORS",
    "SOP_CLASS_NOT_SUPPORTED",
    "STORE_STATUSES",
    "SUCCESS",
    "VERIFICATION_SOP_CLASS",
    "is_decode_error",
]

# A command set is a few hundred bytes (PS3.7 E.1); one much larger is hostile,
# whoever sends it (pynetdicom holds a message's fragments until its last one).
COMMAND_MAX = 64 * 1024

# PS3.4 A.4 Verification Service Class (pydicom.uid does not name it).
VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")

# C-STORE response statuses.
SUCCESS = 0x0000  # PS3.4 B.2.3 Success
OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3 Refused: Out of Resources (sender may retry)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # PS3.4 B.2.3 Error
SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 Annex C Refused: SOP Class not supported
CANNOT_UNDERSTAND = (
    0xC000  # PS3.4 B.2.3 Error: Cannot understand (data set unparseable)
)
# Node-specific codes inside the PS3.4 B.2.3 "Cannot understand" range (0xCxxx),
# clear of pynetdicom's own 0xC210 / 0xC211.
INVALID_UID = 0xC001  # a Study/Series/SOP Instance/Class UID that is not a valid UID
CONFLICTING_INSTANCE = 0xC002  # SOP Instance UID already stored in another series

# What each C-STORE status the node answers means, and when (the conformance
# statement's table).
STORE_STATUSES: dict[int, tuple[str, str]] = {
    SUCCESS: ("Success", "Stored on stable storage and indexed"),
    OUT_OF_RESOURCES: (
        "Refused: Out of Resources",
        "The data set is over max_instance_bytes, the storage disk is full, a "
        "write or the index failed or is locked, a Deflated data set inflates "
        "past max_inflated_bytes, or a data set "
        "holds more than max_data_elements elements or more than "
        "max_in_memory_bytes of values read into memory; the sender may retry "
        "later",
    ),
    SOP_CLASS_NOT_SUPPORTED: (
        "Refused: SOP Class not supported",
        "The request's SOP Class is not the abstract syntax of the presentation "
        "context it came on (PS3.7 9.1.1.1)",
    ),
    DATASET_DOES_NOT_MATCH_SOP_CLASS: (
        "Error: Data Set does not match SOP Class",
        "SOP Class, SOP Instance, Study or Series Instance UID missing, or "
        "different from the request's",
    ),
    CANNOT_UNDERSTAND: (
        "Error: Cannot understand",
        "The data set does not parse (nesting too deep included) or is "
        "structurally wrong",
    ),
    INVALID_UID: ("Error: Cannot understand (invalid UID)", "A UID is not valid"),
    CONFLICTING_INSTANCE: (
        "Error: Cannot understand (conflict)",
        "The SOP Instance or Series UID is already filed under another study or series",
    ),
}

# What pydicom raises on data it cannot read: a bad preamble, a short read, a value
# that does not decode, a malformed sequence ("No tag to read" is an OSError), and
# sequences nested deeper than the reader can follow (RecursionError).
DECODE_ERRORS: tuple[type[Exception], ...] = (
    InvalidDicomError,
    RecursionError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    NotImplementedError,
    struct.error,
    zlib.error,  # a Deflated data set's stream that does not inflate
)
# Raised by the readers (pydicom, pynetdicom's PDU decoding) on some malformed
# data, and by the node's own code only when it is wrong.
READER_ERRORS: tuple[type[Exception], ...] = (TypeError, AttributeError)
_READERS = ("/pydicom/", "/pynetdicom/")


def is_decode_error(exc: BaseException) -> bool:
    """Return whether ``exc`` says the data could not be read (not that we erred).

    Parameters
    ----------
    exc
        What reading raised.

    Returns
    -------
    bool
        True for :data:`DECODE_ERRORS`, and for :data:`READER_ERRORS` raised
        inside pydicom or pynetdicom; False for anything else, e.g. a TypeError
        of the node's own code, which must surface as the bug it is.
    """
    if isinstance(exc, DECODE_ERRORS):
        return True
    if isinstance(exc, READER_ERRORS):
        frames = traceback.extract_tb(exc.__traceback__)
        return bool(frames) and any(r in frames[-1].filename for r in _READERS)
    return False
