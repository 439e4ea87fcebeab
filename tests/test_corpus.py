"""Every DICOM file shipped with pydicom and pydicom-data, sent to a real node."""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    StoragePresentationContexts,
)
from sqlalchemy import select

from dicom_node.dimse import (
    CANNOT_UNDERSTAND,
    CONFLICTING_INSTANCE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_UID,
    SUCCESS,
)
from dicom_node.index import Instance, Series, Study
from tests.factories import pydicom_corpus, raw_file
from tests.helpers import RunningNode, store_files

# Every storage class pynetdicom knows, the retired ones that only its requestor
# list (StoragePresentationContexts) names included: the node accepts those too.
STORAGE_CLASSES = {
    str(cx.abstract_syntax)
    for cx in (*AllStoragePresentationContexts, *StoragePresentationContexts)
}
NOT_DICOM_SUFFIXES = {".txt", ".json", ".dump", ".icc", ".gz"}
# The test's own reading of PS3.5 9.1, written apart from the node's.
UID_RE = re.compile(r"^(0|[0-9]+)(\.[0-9]+)*$")

# The transfer syntaxes the issue names; the corpus (plus one HTJ2K file the test
# makes) must exercise each, so a node that mishandles one cannot pass.
REQUIRED_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
}
HTJ2K_LOSSLESS = UID("1.2.840.10008.1.2.4.201")


@dataclass
class Sent:
    source: Path
    sent_path: Path  # what went over the wire (the file, or a wrapper around it)
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    expected: str  # "stored", or the kind of failure the test expects


def uid_ok(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(UID_RE.match(value))


def read_strict(path: Path) -> Dataset | None:
    """The data set, or None when it is truncated or does not parse at all.

    pydicom in RAISE mode turns a short read into EOFError; a VR that differs from
    the transfer syntax it forgives in either mode, and so does the node.
    """
    old = pydicom_config.settings.reading_validation_mode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
            try:
                dcmread(path, force=True)
            except EOFError:
                return None
            except Exception:  # noqa: BLE001 - any other complaint: judged leniently
                pass
            pydicom_config.settings.reading_validation_mode = old
            ds = dcmread(path, force=True)
            for elem in ds.elements():  # raw elements: check lengths, convert nothing
                length = getattr(elem, "length", None)
                value = getattr(elem, "value", None)
                defined = length not in (None, 0xFFFFFFFF)
                if isinstance(value, bytes) and defined and len(value) != length:
                    return None
            return ds
    except Exception:  # noqa: BLE001 - whatever pydicom raises: does not parse
        return None
    finally:
        pydicom_config.settings.reading_validation_mode = old


def plan(path: Path, work: Path) -> Sent:
    """Decide how a sender transmits the file, and what the node should answer."""
    try:
        meta, offset = split_dataset(path)
    except Exception:  # noqa: BLE001 - no readable File Meta: send from offset 0
        meta, offset = Dataset(), 0
    sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
    sop_instance = str(meta.get("MediaStorageSOPInstanceUID", ""))
    syntax = str(meta.get("TransferSyntaxUID", ""))
    ds = read_strict(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data_class = str(ds.get("SOPClassUID", "")) if ds is not None else ""
        data_instance = str(ds.get("SOPInstanceUID", "")) if ds is not None else ""
        study = ds.get("StudyInstanceUID") if ds is not None else None
        series = ds.get("SeriesInstanceUID") if ds is not None else None

    sendable_as_is = (
        sop_class in STORAGE_CLASSES
        and syntax in {str(t) for t in AllTransferSyntaxes}
        and uid_ok(sop_instance)
    )
    if not sendable_as_is and not syntax and ds is not None:
        # No File Meta: a sender reads the data set and sends it in the encoding
        # it was written in (dicom_node.export does this).
        sop_class, sop_instance = data_class, data_instance
        sendable_as_is = sop_class in STORAGE_CLASSES and uid_ok(sop_instance)
    if sendable_as_is:
        sent_path = path
    else:
        # What a careless sender does: propose some storage class and stream the
        # bytes anyway. The node must refuse it and keep nothing.
        sop_class = (
            sop_class
            if sop_class in STORAGE_CLASSES
            else str(SecondaryCaptureImageStorage)
        )
        sop_instance = sop_instance if uid_ok(sop_instance) else str(generate_uid())
        syntax = (
            syntax
            if syntax in {str(t) for t in AllTransferSyntaxes}
            else str(ImplicitVRLittleEndian)
        )
        sent_path = raw_file(
            work / f"{path.name}.wrapped",
            path.read_bytes()[offset:],
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax_uid=syntax,
        )

    if ds is None:
        expected = "unparseable"
    elif not (data_class and data_instance and study and series):
        expected = "missing"
    elif not all(uid_ok(str(v)) for v in (data_class, data_instance, study, series)):
        expected = "invalid uid"
    elif (data_class, data_instance) != (sop_class, sop_instance):
        expected = "mismatch"
    else:
        expected = "stored"
    return Sent(path, sent_path, sop_class, sop_instance, syntax, expected)


EXPECTED_STATUS = {
    "unparseable": {CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS},
    "missing": {DATASET_DOES_NOT_MATCH_SOP_CLASS},
    "invalid uid": {INVALID_UID},
    "mismatch": {DATASET_DOES_NOT_MATCH_SOP_CLASS},
    "conflict": {CONFLICTING_INSTANCE},
}


def made_copies(work: Path) -> list[Path]:
    """Two files made from shipped ones, so every required syntax has a valid
    instance: a JPEG 2000 lossless file relabelled HTJ2K Lossless (PS3.5 A.4.11
    admits a Part 1 codestream under the HTJ2K syntaxes), and the JPEG-LS
    near-lossless file with the Study and Series UIDs it lacks."""
    relabel = dcmread(
        next(p for p in pydicom_corpus() if p.name == "MR_small_jp2klossless.dcm")
    )
    relabel.file_meta.TransferSyntaxUID = HTJ2K_LOSSLESS
    completed = dcmread(
        next(p for p in pydicom_corpus() if p.name == "JPEGLSNearLossless_16.dcm")
    )
    out = []
    for name, ds in (("htj2k.dcm", relabel), ("jls-near-lossless.dcm", completed)):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.save_as(work / name, enforce_file_format=True)
        out.append(work / name)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_shipped_file_is_stored_as_sent_or_refused(
    node: RunningNode, tmp_path: Path
) -> None:
    work = tmp_path / "wrapped"
    work.mkdir()
    files = [p for p in pydicom_corpus() if p.suffix.lower() not in NOT_DICOM_SUFFIXES]
    files += made_copies(work)
    plans = [plan(p, work) for p in files]

    # Expected final state, in sending order: a later copy of a stored SOP Instance
    # UID replaces it when filed in the same series, and is refused otherwise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored_where: dict[str, tuple[str, str]] = {}
        last_copy: dict[str, Path] = {}
        for p in plans:
            if p.expected != "stored":
                continue
            ds = dcmread(p.source, force=True)
            where = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
            if stored_where.setdefault(p.sop_instance_uid, where) != where:
                p.expected = "conflict"
                continue
            last_copy[p.sop_instance_uid] = p.source

    statuses = store_files(node.port, [p.sent_path for p in plans])

    wrong = []
    for p in plans:
        status = statuses.get(p.sent_path)
        ok = (
            status == SUCCESS
            if p.expected == "stored"
            else status in EXPECTED_STATUS[p.expected]
        )
        if not ok:
            wrong.append(
                (
                    p.source.name,
                    p.expected,
                    None if status is None else f"0x{status:04X}",
                )
            )
    assert wrong == [], wrong

    outcomes = Counter(p.expected for p in plans)
    print("corpus outcomes:", dict(outcomes))
    assert outcomes["stored"] >= 150  # the corpus is mostly valid instances
    assert sum(outcomes[k] for k in EXPECTED_STATUS) >= 10  # and has bad ones

    # Exactly one file and one row per stored SOP Instance UID, nothing else.
    on_disk = {p.stem: p for p in node.stored_files()}
    assert set(on_disk) == set(last_copy)
    assert not list(node.config.storage_dir.rglob("*.tmp"))
    with node.index.sessions() as s:
        rows = s.execute(
            select(
                Instance.sop_instance_uid,
                Instance.transfer_syntax_uid,
                Study.study_instance_uid,
            )
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
        ).all()
    assert len(rows) == len(last_copy)
    assert {r[0] for r in rows} == set(last_copy)

    # Stored equal to what was sent: the same data set, element by element, and
    # the same transfer syntax (no transcoding).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sop_uid, source in last_copy.items():
            stored = dcmread(on_disk[sop_uid])
            sent = dcmread(source, force=True)
            if not sent.file_meta:
                # A file without File Meta went as a decoded data set, and
                # pydicom's encoder drops the retired group lengths (PS3.5 7.2).
                for elem in list(sent):
                    if elem.tag.element == 0:
                        del sent[elem.tag]
            assert stored == sent, source.name
            if "TransferSyntaxUID" in sent.file_meta:
                sent_syntax = sent.file_meta.TransferSyntaxUID
            else:  # no File Meta: the encoding it was written in
                implicit, little = sent.original_encoding
                sent_syntax = (
                    ImplicitVRLittleEndian
                    if implicit
                    else ExplicitVRLittleEndian
                    if little
                    else ExplicitVRBigEndian
                )
            assert stored.file_meta.TransferSyntaxUID == sent_syntax, source.name

    # Every syntax the node must take was received with Success at least once.
    stored_syntaxes = {
        p.transfer_syntax_uid for p in plans if statuses.get(p.sent_path) == SUCCESS
    }
    assert stored_syntaxes >= REQUIRED_SYNTAXES
