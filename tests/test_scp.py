"""The receiving SCP over real loopback associations: dcmtk and pynetdicom as peers."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    StoragePresentationContexts,
)
from sqlalchemy import select

from dicom_node.config import CallerConfig
from dicom_node.dimse import (
    CANNOT_UNDERSTAND,
    CONFLICTING_INSTANCE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_UID,
    SUCCESS,
)
from dicom_node.index import AssociationRecord, ErrorRecord, Instance
from dicom_node.status import node_status
from tests.factories import corpus_file, dcmtk, encode_body, make_ct, raw_file
from tests.helpers import (
    RunningNode,
    data_set_digest,
    store_datasets,
    store_files,
    wait_for,
)

# PS3.4 C.6.1.3.1 Patient Root Query/Retrieve - FIND (pydicom.uid does not name it).
PATIENT_ROOT_FIND = UID("1.2.840.10008.5.1.4.1.2.1.1")

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
RETIRED_US_IMAGE = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
RETIRED_US_MULTI_FRAME = "1.2.840.10008.5.1.4.1.1.3"  # its multi-frame class


def run_dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk(args[0]), *args[1:]],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=60,
        check=False,
    )


def instance_rows(node: RunningNode) -> list[Instance]:
    with node.index.sessions() as s:
        return list(s.scalars(select(Instance)).all())


def test_dcmtk_echoscu_gets_success(node: RunningNode) -> None:
    result = run_dcmtk(
        "echoscu", "-aet", "ECHOSCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)
    )
    assert result.returncode == 0, result.stderr


def test_dcmtk_storescu_instance_is_stored_as_sent_and_indexed(
    node: RunningNode, tmp_path: Path
) -> None:
    ds = make_ct(patient_name="DOE^JANE")
    sent = tmp_path / "ct.dcm"
    ds.save_as(sent, enforce_file_format=True)

    result = run_dcmtk(
        "storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(sent)
    )

    assert result.returncode == 0, result.stderr
    stored_path = (
        node.config.storage_dir
        / ds.StudyInstanceUID
        / ds.SeriesInstanceUID
        / f"{ds.SOPInstanceUID}.dcm"
    )
    assert node.stored_files() == [stored_path]
    stored = dcmread(stored_path)
    original = dcmread(sent)
    assert stored == original  # the same data set, element by element
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    rows = instance_rows(node)
    assert [(r.sop_instance_uid, r.sop_class_uid, r.path) for r in rows] == [
        (
            ds.SOPInstanceUID,
            CTImageStorage,
            stored_path.relative_to(node.config.storage_dir).as_posix(),
        )
    ]
    status = node_status(node.index)
    assert (status["studies"], status["series"], status["instances"]) == (1, 1, 1)

    def association() -> AssociationRecord:
        with node.index.sessions() as s:
            return s.scalars(select(AssociationRecord)).one()

    # The audit row is completed when the connection closes, just after release.
    wait_for(lambda: association().outcome != "open", what="the association to end")
    assoc = association()
    assert (assoc.calling_ae_title, assoc.outcome, assoc.instances_stored) == (
        "STORESCU",
        "released",
        1,
    )
    assert rows[0].association_id == assoc.id


def test_unknown_caller_is_rejected_at_association(
    node: RunningNode, tmp_path: Path
) -> None:
    sent = tmp_path / "ct.dcm"
    make_ct().save_as(sent, enforce_file_format=True)

    result = run_dcmtk(
        "storescu",
        "-aet",
        "INTRUDER",
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(node.port),
        str(sent),
    )

    assert result.returncode != 0
    assert "Association Rejected" in result.stderr
    assert "Calling AE Title Not Recognized" in result.stderr
    assert node.stored_files() == []

    def audited() -> list[AssociationRecord]:
        with node.index.sessions() as s:
            return list(s.scalars(select(AssociationRecord)))

    # The refusal is written to the audit table off the accepting thread.
    wait_for(lambda: bool(audited()), timeout=5, what="the audit row")
    [assoc] = audited()
    assert (assoc.calling_ae_title, assoc.outcome) == ("INTRUDER", "rejected")


def test_wrong_called_ae_title_is_rejected(node: RunningNode) -> None:
    result = run_dcmtk(
        "echoscu", "-aet", "ECHOSCU", "-aec", "NOTTHENODE", "127.0.0.1", str(node.port)
    )

    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr


def test_caller_host_restriction(start_node: Callable[..., RunningNode]) -> None:
    node = start_node(
        callers=(
            CallerConfig("STORESCU", "10.1.2.3"),
            CallerConfig("ECHOSCU", "127.0.0.1"),
        )
    )

    from_wrong_host = run_dcmtk(
        "echoscu", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)
    )
    from_right_host = run_dcmtk(
        "echoscu", "-aet", "ECHOSCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)
    )

    assert from_wrong_host.returncode != 0
    assert "Calling AE Title Not Recognized" in from_wrong_host.stderr
    assert from_right_host.returncode == 0, from_right_host.stderr


def test_allow_any_caller_accepts_unknown_ae(
    start_node: Callable[..., RunningNode],
) -> None:
    node = start_node(callers=(), allow_any_caller=True)

    result = run_dcmtk(
        "echoscu", "-aet", "WHOEVER", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)
    )

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("StudyInstanceUID", "../../../../tmp/escape"),
        ("StudyInstanceUID", "1.2.3/../../4"),
        ("SeriesInstanceUID", ".."),
        ("SeriesInstanceUID", "1.2." + "3" * 70),
        ("StudyInstanceUID", "1.2.abc"),
        ("SOPInstanceUID", "1.2.3/4"),
        ("SOPInstanceUID", "1..2"),
    ],
)
def test_malformed_uid_is_refused_and_nothing_written(
    node: RunningNode, tmp_path: Path, field: str, value: str
) -> None:
    ds = make_ct()
    setattr(ds, field, value)
    if field == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = UID(value)
    path = raw_file(
        tmp_path / "bad.dcm",
        encode_body(ds),
        sop_class_uid=CTImageStorage,
        sop_instance_uid=ds.SOPInstanceUID,
    )

    statuses = store_files(node.port, [path])

    assert statuses[path] == INVALID_UID
    assert node.stored_files() == []
    assert not list(tmp_path.rglob("escape*"))
    assert not list(Path("/tmp").glob("escape*"))
    assert instance_rows(node) == []
    with node.index.sessions() as s:
        errors = s.scalars(select(ErrorRecord)).all()
    assert [(e.source, e.status) for e in errors] == [("store", INVALID_UID)]
    assert value not in errors[0].message


@pytest.mark.parametrize(
    "missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"]
)
def test_missing_uid_is_refused(
    node: RunningNode, tmp_path: Path, missing: str
) -> None:
    ds = make_ct()
    delattr(ds, missing)
    path = raw_file(
        tmp_path / "bad.dcm",
        encode_body(ds),
        sop_class_uid=CTImageStorage,
        sop_instance_uid=ds.SOPInstanceUID,
    )

    assert store_files(node.port, [path])[path] == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert node.stored_files() == []


def test_a_sender_refused_again_and_again_is_logged_five_times(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    # One line and one error row per refused instance let a sender write
    # thousands a minute; the association's last line counts the rest.
    caplog.set_level(logging.INFO, logger="dicom_node")
    datasets = [make_ct(instance_number=n) for n in range(12)]
    for ds in datasets:
        del ds.SeriesInstanceUID

    statuses = store_datasets(node.port, datasets)

    assert statuses == [DATASET_DOES_NOT_MATCH_SOP_CLASS] * 12
    refused = [
        r.getMessage() for r in caplog.records if "refused (0x" in r.getMessage()
    ]
    assert len(refused) == 5
    assert all("missing SeriesInstanceUID" in line for line in refused)
    assert "further refusals of this association are only counted" in refused[-1]
    wait_for(
        lambda: "12 failed (7 not logged one by one)" in caplog.text,
        what="the association's last line",
    )
    with node.index.sessions() as s:
        errors = s.scalars(select(ErrorRecord)).all()
    assert len(errors) == 5


@pytest.mark.parametrize(
    "damage",
    [
        "pixel data cut short",
        "element longer than the data",
        "broken sequence",
        "stray bytes",
    ],
)
def test_data_set_that_does_not_parse_is_refused(
    node: RunningNode, tmp_path: Path, damage: str
) -> None:
    ds = make_ct()
    good = encode_body(ds)
    body = {
        "pixel data cut short": good[:-3],
        "element longer than the data": good
        + b"\xe0\x7f\x11\x00OB\x00\x00\xff\x00\x00\x00",
        "broken sequence": b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\x00" * 20,
        "stray bytes": good + b"\x01\x02\x03",
    }[damage]
    path = raw_file(
        tmp_path / "bad.dcm",
        body,
        sop_class_uid=CTImageStorage,
        sop_instance_uid=ds.SOPInstanceUID,
    )

    assert store_files(node.port, [path])[path] == CANNOT_UNDERSTAND
    assert node.stored_files() == []


def test_data_set_not_matching_the_request_is_refused(
    node: RunningNode, tmp_path: Path
) -> None:
    ds = make_ct()
    path = raw_file(
        tmp_path / "bad.dcm",
        encode_body(ds),
        sop_class_uid=CTImageStorage,
        sop_instance_uid=generate_uid(),
    )

    assert store_files(node.port, [path])[path] == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert node.stored_files() == []


def test_resent_instance_is_idempotent(node: RunningNode) -> None:
    ds = make_ct()

    assert store_datasets(node.port, [ds, ds]) == [SUCCESS, SUCCESS]
    assert store_datasets(node.port, [ds]) == [SUCCESS]

    assert len(node.stored_files()) == 1
    assert len(instance_rows(node)) == 1


def test_changed_instance_replaces_the_stored_copy(node: RunningNode) -> None:
    ds = make_ct()
    assert store_datasets(node.port, [ds]) == [SUCCESS]
    ds.WindowCenter = 400

    assert store_datasets(node.port, [ds]) == [SUCCESS]

    [stored] = node.stored_files()
    assert dcmread(stored).WindowCenter == 400
    assert len(instance_rows(node)) == 1
    assert not list(node.config.storage_dir.rglob("*.tmp"))


def test_same_sop_instance_in_another_study_is_refused(node: RunningNode) -> None:
    ds = make_ct()
    assert store_datasets(node.port, [ds]) == [SUCCESS]
    clash = make_ct()
    clash.SOPInstanceUID = ds.SOPInstanceUID

    assert store_datasets(node.port, [clash]) == [CONFLICTING_INSTANCE]

    [stored] = node.stored_files()
    assert dcmread(stored).StudyInstanceUID == ds.StudyInstanceUID


def test_non_storage_sop_class_is_rejected_at_negotiation(node: RunningNode) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(PATIENT_ROOT_FIND)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    try:
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == {CTImageStorage}
    assert rejected == {PATIENT_ROOT_FIND}


def test_each_association_gets_its_own_copy_of_the_supported_contexts(
    node: RunningNode,
) -> None:
    """pynetdicom deep-copies the server's contexts per association; the node's
    copies share the (immutable) UIDs but nothing an association could change."""
    server_contexts = node.receiver.server.contexts
    copies = deepcopy(server_contexts)

    def described(contexts: list[PresentationContext]) -> list[tuple[Any, ...]]:
        return [
            (c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role, c.result)
            for c in contexts
        ]

    assert described(copies) == described(node.receiver.ae.supported_contexts)
    assert len(copies) > 100  # every storage class and Verification
    copies[1].add_transfer_syntax("1.2.826.0.1.3680043.8.498.99")
    copies[1].context_id = 7
    assert "1.2.826.0.1.3680043.8.498.99" not in server_contexts[1].transfer_syntax
    assert server_contexts[1].context_id is None
    # and associations still negotiate against every one of them
    test_non_storage_sop_class_is_rejected_at_negotiation(node)


def test_retired_storage_classes_are_accepted_at_negotiation(node: RunningNode) -> None:
    # pynetdicom's AllStoragePresentationContexts leaves out these retired storage
    # classes (Ultrasound 1.2.840.10008.5.1.4.1.1.6 and ...1.1.3 among them) that
    # old archives still send; dcmtk's storescp accepts them.
    retired = sorted(
        {str(cx.abstract_syntax) for cx in StoragePresentationContexts}
        - {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    )
    assert {RETIRED_US_IMAGE, RETIRED_US_MULTI_FRAME} <= set(retired)
    ae = AE(ae_title="TESTSCU")
    for uid in retired:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    try:
        assert assoc.is_established
        accepted = sorted(str(cx.abstract_syntax) for cx in assoc.accepted_contexts)
    finally:
        assoc.release()
    assert accepted == retired


def test_dcmtk_storescu_stores_a_real_retired_ultrasound_instance(
    node: RunningNode,
) -> None:
    # pydicom-data's color-px.dcm: a real Ultrasound Image Storage (Retired)
    # instance. -R: storescu proposes the file's own class (its default list
    # has no retired class), as an old archive does.
    source = corpus_file("color-px.dcm")
    ds = dcmread(source)
    assert ds.SOPClassUID == RETIRED_US_IMAGE

    result = run_dcmtk(
        "storescu",
        *("-v", "-R", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)),
        str(source),
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    rows = instance_rows(node)
    assert [(r.sop_instance_uid, r.sop_class_uid) for r in rows] == [
        (ds.SOPInstanceUID, RETIRED_US_IMAGE)
    ]
    stored = node.config.storage_dir / rows[0].path
    assert dcmread(stored) == ds  # stored as sent


def test_two_copies_of_one_instance_at_once_leave_its_file_and_index_alike(
    node: RunningNode,
) -> None:
    # Two senders, one instance, different content, at the same moment: the
    # file kept and the hash indexed must be the same copy's (a duplicate is
    # told by its hash). Placed and indexed apart, 4 rounds in 60 disagreed.
    rounds = 15
    for n in range(rounds):
        first = make_ct(rows=32, columns=32, seed=n)
        second = deepcopy(first)
        second.ImageComments = "the other copy"
        barrier = threading.Barrier(2)
        statuses: list[list[int | None]] = []

        def send(
            ds: Any,
            into: list[list[int | None]] = statuses,
            together: threading.Barrier = barrier,
        ) -> None:
            together.wait(10)
            into.append(store_datasets(node.port, [ds]))

        senders = [threading.Thread(target=send, args=(ds,)) for ds in (first, second)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(30)
        assert statuses == [[SUCCESS], [SUCCESS]], statuses

    rows = node.index.read(
        lambda s: s.execute(select(Instance.path, Instance.sha256)).all()
    )
    assert len(rows) == rounds
    storage = node.config.storage_dir
    differing = [path for path, sha in rows if data_set_digest(storage / path) != sha]
    assert differing == []
