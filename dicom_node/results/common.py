"""What every result object shares: who made it, whose it is, how its text is encoded.

highdicom builds each object; what is done here happens at the boundary, on the
way in (a view of the source that highdicom accepts) and on the way out (the
node's identity and the source's Patient and Study, as they are).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator, Sequence

import highdicom as hd
from highdicom.enum import SpecificCharacterSetValues
from pydicom import charset as dicom_charset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import UID, SecondaryCaptureImageStorage
from pydicom.valuerep import DA, TM

from dicom_node.identity import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MANUFACTURER,
    MODEL_NAME,
    SOFTWARE_VERSION,
)
from dicom_node.results.naming import NodeIdentity
from dicom_node.storage import splits_too_long, value_vr
from inference import StudyPrediction, file_as_read

__all__ = ["algorithm_equipment", "finish", "highdicom_view"]

UTF8 = "ISO_IR 192"
_HIGHDICOM = hd.ContributingEquipment.for_highdicom().Manufacturer
# Patient's Sex values highdicom's constructors accept; real sources carry "U".
_SEXES = ("M", "F", "O")
_SEX = 0x00100040  # Patient's Sex
_SOP_CLASS = 0x00080016  # SOP Class UID
_CHARSET = 0x00080005  # Specific Character Set
_STUDY_DATE = 0x00080020
_STUDY_TIME = 0x00080030
_BIRTH_DATE = 0x00100030
# Type 2 attributes of Patient and Study that highdicom's constructors read.
_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)

# highdicom warns about unusual person names with the name in the message; the
# names come from the source as they are, and a name must never reach a log.
warnings.filterwarnings(
    "ignore", message=r"The string .* is unlikely to represent", category=UserWarning
)


def algorithm_equipment(prediction: StudyPrediction) -> hd.ContributingEquipment:
    """Return the Contributing Equipment item of the model that made the result.

    IHE AI Results: the algorithm as equipment, named by its Device UID.
    """
    # Device UID is not an attribute of a Contributing Equipment item (PS3.3
    # C.12.1); the model's Device UID (at most 64 characters) is its serial
    # number here, as in the SR's observer context.
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=prediction.model_name[:64],
        software_versions=[prediction.model_version[:64], SOFTWARE_VERSION],
        device_serial_number=prediction.device_uid[:64],
    )


def highdicom_view(source: Dataset) -> Dataset:
    """Return a shallow view of the source that highdicom's constructors accept.

    Its Patient's Sex is emptied when it is not M, F or O (real sources carry
    "U", which highdicom refuses), so is a Study Date, Study Time or Patient's
    Birth Date it cannot parse,
    a Specific Character Set highdicom refuses reads as ISO_IR 192, and a
    retired SOP class reads as the class
    that replaced it (highdicom has no IOD table for the retired ultrasound
    classes; the modules are the same). :func:`finish` puts the source's own
    values back.
    """
    view = _identity_view(source)
    for keyword in _TYPE_2:  # highdicom reads them; a source may lack them
        if keyword not in view:
            tag = tag_for_keyword(keyword)
            assert tag is not None
            view[tag] = DataElement(tag, dictionary_VR(tag), None)
    # New elements, not assignments: the view shares the source's elements,
    # and the source must not change.
    if str(view.get("PatientSex", "") or "") not in _SEXES:
        view[_SEX] = DataElement(_SEX, "CS", None)
    for tag, kind in ((_STUDY_DATE, DA), (_STUDY_TIME, TM), (_BIRTH_DATE, DA)):
        value = view[tag].value if tag in view else None
        try:
            kind(value or "")
        except ValueError:
            # Old sources write "11:20:00" (ACR-NEMA), others "19700000";
            # highdicom parses the value and refuses it. finish() copies the
            # source's as it is.
            view[tag] = DataElement(tag, "DA" if kind is DA else "TM", None)
    if not _highdicom_takes(_declared(source)):
        # highdicom 0.28 refuses valid sets: an empty first value (the default
        # repertoire, PS3.3 C.12.1.1.2) and ISO 2022 IR 149 (its enum misspells
        # it IR 159). The view's set only labels highdicom's object (the values
        # are decoded already); finish() writes the right one.
        view[_CHARSET] = DataElement(_CHARSET, "CS", UTF8)
    return view


def _identity_view(source: Dataset) -> Dataset:
    """Return a shallow view of the source (a retired SOP class: its successor).

    Only what highdicom may read of a source is in it, read from the source
    now (decoded in its character set): not values still in the source's
    file but sequences (not Pixel Data), not private elements, not values
    over :data:`~dicom_node.storage.SPLIT_VALUE_LIMIT` bytes that pydicom
    makes one Python object each of (1 MB of DS values is ~200 MB so; no
    attribute of the Patient, Study or image modules is that long).
    """
    with file_as_read(source):  # a long sequence is read from the file read
        view = Dataset(
            {tag: source[tag] for tag, element in source.items() if _viewed(element)}
        )
    sop_class = str(view.get("SOPClassUID", ""))
    if sop_class in _RETIRED:
        view[_SOP_CLASS] = DataElement(_SOP_CLASS, "UI", _RETIRED[sop_class])
    return view


def _viewed(element: DataElement | RawDataElement) -> bool:
    """Whether a source's element goes into its view (see :func:`_identity_view`)."""
    if element.tag.is_private:
        return False
    if not isinstance(element, RawDataElement):
        return True  # read already
    if element.value is None:  # left in the file: a sequence is read now
        return element.length == 0 or value_vr(element) == "SQ"
    return not splits_too_long(element)


# Retired SOP classes old archives still send, and the class that replaced each.
_RETIRED = {
    "1.2.840.10008.5.1.4.1.1.6": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.3": "1.2.840.10008.5.1.4.1.1.3.1",  # US Multi-frame
}


def finish(ds: hd.SOPClass, source: Dataset, node: NodeIdentity) -> hd.SOPClass:
    """Make a built object name the node, carry the source's identity, encode its text.

    - File Meta: the node's Implementation Class UID and version name (the node
      writes the file, PS3.10 7.1); highdicom's own Contributing Equipment item
      is dropped (it did not contribute to the acquisition or the content).
    - General Equipment: the node's Manufacturer, Model Name, Software
      Versions, Device UID and Station Name.
    - Patient and Study modules (Patient, General Study, Patient Study,
      clinical trial): the source's, copied whole as they are.
    - Specific Character Set: the source's when it can hold every text value
      of the object (the node's own: model, findings, captions), else ISO_IR
      192 (PS3.5 6.1); the copied values are re-encoded when written.
    """
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.ContributingEquipmentSequence = [
        item
        for item in ds.ContributingEquipmentSequence
        if item.get("Manufacturer") != _HIGHDICOM
    ]
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.DeviceUID = node.device_uid
    ds.StationName = node.station[:16]
    # The source's values as they are ("U", "11:20:00" included): the copy
    # does not check them, only highdicom's constructors do.
    view = _identity_view(source)
    try:
        ds.copy_patient_and_study_information(view)
    except KeyError:  # a SOP class highdicom has no IOD table for
        # Secondary Capture: the same Patient and Study modules.
        view[_SOP_CLASS] = DataElement(_SOP_CLASS, "UI", SecondaryCaptureImageStorage)
        ds.copy_patient_and_study_information(view)
    # The copy shares the source's element objects: give the object its own,
    # so that nothing done to one changes the other.
    for tag in list(ds.keys()):
        if tag in source and ds.get_item(tag) is source.get_item(tag):
            ds[tag] = copy.deepcopy(source[tag])
    declared = _declared(source)
    charset = _charset(declared, _text_values(ds))
    if charset != declared:
        # Every copied value, nested ones included, decoded from the source's
        # character set now, so that it is written in the new one.
        if declared is not None:
            ds.SpecificCharacterSet = declared
        ds.decode()
    if charset is None:
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = charset
    return ds


def _highdicom_takes(declared: str | list[str] | None) -> bool:
    """Whether highdicom's constructors accept this Specific Character Set."""
    terms = [declared] if isinstance(declared, str) or declared is None else declared
    for term in terms:
        if term is None:
            continue
        try:
            SpecificCharacterSetValues(term)
        except ValueError:
            return False
    return True


def _declared(source: Dataset) -> str | list[str] | None:
    """Return the source's Specific Character Set (None: the default repertoire)."""
    value = source.get("SpecificCharacterSet")
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [str(v) for v in value] if len(value) > 1 else str(value[0])
    return str(value) if value else None


def _charset(
    declared: str | list[str] | None, own_text: Iterable[str]
) -> str | list[str] | None:
    """Return the Specific Character Set that holds every text value given."""
    terms = [declared] if isinstance(declared, str) or declared is None else declared
    # The default repertoire is ASCII (PS3.5 6.1.2.2); pydicom reads it as
    # Latin-1, which would let a byte outside the repertoire through.
    encodings = [
        "ascii"
        if term in (None, "", "ISO_IR 6", "ISO 2022 IR 6")
        else dicom_charset.python_encoding.get(str(term), "")
        for term in terms
    ]
    if not all(encodings):  # a term pydicom does not know: say it in UTF-8
        return UTF8
    codecs = dicom_charset.convert_encodings(declared)  # as pydicom writes
    if all(_fits(text, encodings, codecs) for text in own_text):
        return declared
    return UTF8


def _fits(text: str, encodings: list[str], codecs: list[str]) -> bool:
    """Whether ``text`` survives being written with pydicom's ``codecs`` unchanged.

    Each character must be in the repertoire of one of ``encodings`` (checked
    strictly, without pydicom's fallback, which warns and writes replacement
    characters; the warnings machinery is not safe to switch beside other
    threads); then the whole text must come back as it was.
    """
    if text.isascii():
        return True
    for character in set(text):
        if not any(_encodes(character, encoding) for encoding in encodings):
            return False
    try:
        encoded = dicom_charset.encode_string(text, codecs)
        decoded = dicom_charset.decode_bytes(encoded, codecs, set())
    except (UnicodeError, LookupError, ValueError):
        return False
    return decoded == text


def _encodes(character: str, encoding: str) -> bool:
    try:
        character.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


def _text_values(ds: Dataset) -> Iterator[str]:
    """Yield every text value of a data set, nested ones included.

    Only text elements and sequences are read: a copied sequence may hold
    values pydicom would make one object each of (DS, US, ...).
    """
    for tag, held in ds.items():
        vr = value_vr(held) if isinstance(held, RawDataElement) else held.VR
        if vr not in _TEXT_VRS and vr != "SQ":
            continue
        element = ds[tag]
        if element.VR == "SQ":
            for item in element.value or ():
                yield from _text_values(item)
        elif element.VR in _TEXT_VRS and element.value is not None:
            value = element.value
            values = value if isinstance(value, MultiValue) else [value]
            yield from (str(v) for v in values if not isinstance(v, bytes))
