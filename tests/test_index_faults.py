"""A damaged or locked index: C-STOREs refused quickly, the start names the fault."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import OperationalError

from dicom_node.dimse import OUT_OF_RESOURCES, SUCCESS, VERIFICATION_SOP_CLASS
from dicom_node.errors import IndexCorruptError, IndexUnavailableError
from dicom_node.index import IndexDB, Instance, InstanceRecordRequest, RecordOutcome
from dicom_node.log import quiet_pynetdicom
from tests.factories import make_ct
from tests.helpers import RunningNode, free_port, make_config, run_cli, write_toml


def index_path(node: RunningNode) -> Path:
    return node.config.state_dir / "index.sqlite3"


@contextmanager
def association(port: int, datasets: list[Dataset]) -> Iterator[Association]:
    """One association able to C-STORE ``datasets`` and to C-ECHO."""
    quiet_pynetdicom()
    ae = AE(ae_title="TESTSCU")
    pairs = sorted(
        {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    )
    ae.requested_contexts = [build_context(UID(c), [UID(t)]) for c, t in pairs] + [
        build_context(VERIFICATION_SOP_CLASS)
    ]
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established, "association with the node failed"
    try:
        yield assoc
    finally:
        assoc.release()


def store(assoc: Association, ds: Dataset) -> int:
    rsp = assoc.send_c_store(ds)
    assert "Status" in rsp, "no C-STORE response"
    return int(rsp.Status)


def overwrite_with_junk(path: Path) -> None:
    # Move every page into the file first (as a checkpoint does), so the node's
    # connections must read the damaged file, not the write-ahead log.
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.write(os.urandom(size))
        fh.flush()
        os.fsync(fh.fileno())


def test_junk_index_while_running_refuses_stores_and_still_echoes(
    node: RunningNode,
) -> None:
    study = make_ct().StudyInstanceUID
    datasets = [make_ct(study, instance_number=i) for i in range(1, 5)]
    with association(node.port, datasets) as assoc:
        assert store(assoc, datasets[0]) == SUCCESS
        overwrite_with_junk(index_path(node))
        statuses = [store(assoc, ds) for ds in datasets[1:]]
        # A new study too: its rows are not in any connection's cache.
        statuses.append(store(assoc, make_ct()))
        echo = assoc.send_c_echo()
        assert int(echo.Status) == SUCCESS
    assert statuses == [OUT_OF_RESOURCES] * len(statuses)


def test_open_junk_index_names_the_fault(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    path.write_bytes(os.urandom(16384))
    with pytest.raises(IndexCorruptError) as raised:
        IndexDB(f"sqlite:///{path}")
    message = str(raised.value)
    assert str(path) in message
    assert "not a valid SQLite database" in message
    assert f"mv {path} {path}.corrupt" in message


def test_serve_on_junk_index_exits_with_one_line(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.state_dir.mkdir(parents=True)
    path = config.state_dir / "index.sqlite3"
    path.write_bytes(os.urandom(16384))
    toml = write_toml(tmp_path, config)
    done = run_cli("serve", "--config", str(toml), timeout=30)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if str(path) in line]
    assert len(lines) == 1, done.stderr
    assert "not a valid SQLite database" in lines[0]
    assert "unexpected" not in done.stderr


def test_locked_index_refuses_store_quickly_then_accepts_it(
    node: RunningNode,
) -> None:
    ds = make_ct()
    with association(node.port, [ds]) as assoc:
        holder = sqlite3.connect(index_path(node), isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            started = time.monotonic()
            status = store(assoc, ds)
            elapsed = time.monotonic() - started
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert status == OUT_OF_RESOURCES
        assert elapsed < 10, f"refused after {elapsed:.1f} s"
        assert store(assoc, ds) == SUCCESS
    with node.index.sessions() as s:
        count = s.scalar(
            select(func.count())
            .select_from(Instance)
            .where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))
        )
    assert count == 1
    assert len(node.stored_files()) == 1


def test_unreachable_postgresql_is_named_without_password() -> None:
    pytest.importorskip("psycopg")
    url = f"postgresql+psycopg://node:s3cret@127.0.0.1:{free_port()}/index"
    with pytest.raises(IndexUnavailableError) as raised:
        IndexDB(url)
    message = str(raised.value)
    assert "postgresql+psycopg://node:***@127.0.0.1" in message
    assert "s3cret" not in message
    assert "\n" not in message


def test_postgresql_lock_fails_the_receiving_path_quickly(postgres_url: str) -> None:
    index = IndexDB(postgres_url, store_busy_timeout=1.0)
    holder = create_engine(postgres_url)
    try:
        with holder.begin() as conn:
            conn.exec_driver_sql("LOCK TABLE studies, errors IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(OperationalError):
                index.record_instance(request("1.2.826.0.1.3680043.8.498.1"))
            index.record_error("store", "index write failed")  # never raises
            elapsed = time.monotonic() - started
        assert elapsed < 3, f"gave up after {elapsed:.1f} s"
        ds_uid = "1.2.826.0.1.3680043.8.498.2"
        assert index.record_instance(request(ds_uid)) is RecordOutcome.NEW
        # The scheduler's and workers' transactions keep waiting as before.
        with index.sessions() as session:
            assert session.execute(text("SHOW lock_timeout")).scalar_one() == "0"
    finally:
        holder.dispose()
        index.close()


def request(study_uid: str) -> InstanceRecordRequest:
    return InstanceRecordRequest(
        study_instance_uid=study_uid,
        series_instance_uid=f"{study_uid}.1",
        sop_instance_uid=f"{study_uid}.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CT",
        path="x.dcm",
        size=1,
        sha256="0" * 64,
        association_id=None,
    )


def test_an_index_from_an_earlier_version_gets_the_indexes_it_lacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Made before these indexes existed: create_all leaves existing tables as
    # they are, so without this a second claim of a running job would succeed.
    path = tmp_path / "index.sqlite3"
    IndexDB(f"sqlite:///{path}").close()
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("DROP INDEX ux_jobs_one_running")
        db.execute("DROP INDEX ix_studies_needs_processing")

    with caplog.at_level("INFO", logger="dicom_node.index"):
        IndexDB(f"sqlite:///{path}").close()

    with closing(sqlite3.connect(path)) as db:
        made = dict(
            db.execute("SELECT name, sql FROM sqlite_master WHERE type='index'")
        )
        db.execute(
            "INSERT INTO studies VALUES (1, '1.2', '2026-01-01', '2026-01-01', 1)"
        )
        job = "INSERT INTO jobs (study_id, model, state, attempts, created_at,"
        job += " updated_at) VALUES (1, 'm', 'running', 1, '2026-01-01', '2026-01-01')"
        db.execute(job)
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            db.execute(job)  # a second claim of the same study and model
    assert "ix_studies_needs_processing" in made
    assert "made ux_jobs_one_running on jobs" in caplog.text
    # Opened again: nothing left to make.
    caplog.clear()
    with caplog.at_level("INFO", logger="dicom_node.index"):
        IndexDB(f"sqlite:///{path}").close()
    assert "made" not in caplog.text
