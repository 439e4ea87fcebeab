"""[retention]: what a real node deletes after a short period, and what it never does.

A real node (receiver, scheduler, workers, outbox) receives a study over DICOM and
delivers its results to a real SCP; the periods are a fraction of a second, and
the sweep is the one ``serve`` runs hourly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from dicom_node.config import NodeConfig, RetentionConfig, load_config
from dicom_node.errors import ConfigError
from dicom_node.index import (
    AssociationRecord,
    IndexDB,
    Instance,
    InstanceRecordRequest,
    RecordOutcome,
    RetentionRecord,
)
from dicom_node.retention import HOLDING, SweepReport, sweep
from dicom_node.service import open_index, running_node
from tests.helpers import (
    Destination,
    ct_study,
    free_port,
    node_config,
    status,
    store_datasets,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

SECOND = 1 / 86400  # a day's fraction


def stored(config: NodeConfig) -> list[Path]:
    return sorted(
        p
        for p in config.storage_dir.rglob("*.dcm")
        if ".incoming" not in p.parts and HOLDING not in p.parts
    )


def idle(config: NodeConfig) -> bool:
    """Whether the node's index holds no study, job or delivery still to do."""
    figures = status(config)
    jobs, deliveries = figures["jobs"], figures["deliveries"]
    return (
        figures["studies_waiting"] == 0
        and jobs["pending"] + jobs["running"] == 0
        and deliveries["pending"] + deliveries["sending"] == 0
    )


def retention_rows(config: NodeConfig) -> list[tuple[str, int]]:
    index = open_index(config)
    try:
        return index.run(
            lambda s: [
                (r.kind, r.count)
                for r in s.scalars(select(RetentionRecord).order_by(RetentionRecord.id))
            ]
        )
    finally:
        index.close()


def count(config: NodeConfig, table: type) -> int:
    index = open_index(config)
    try:
        return int(
            index.run(lambda s: s.scalar(select(func.count()).select_from(table))) or 0
        )
    finally:
        index.close()


def test_a_delivered_study_and_its_results_go_after_their_periods(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    config = node_config(tmp_path, model, destination.port)
    port = run_serve(config)
    assert store_datasets(port, ct_study()) == [0, 0]
    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "delivered")
    assert len(stored(config)) == 2
    results = config.state_dir / "results"
    assert len(list(results.glob("*/*/sr.dcm"))) == 1  # <study>/<run>, not .early

    # Within the periods: nothing goes.
    long = replace(config, retention=RetentionConfig(1, 1, 1))
    index = open_index(config)
    try:
        report = sweep(index, long, settle_seconds=0)
        assert (report.studies, report.result_sets, report.audit_rows) == (0, 0, 0)
        assert len(stored(config)) == 2

        # Two seconds later, with periods of one second: the study's instances,
        # the result files, and the audit rows of its finished associations.
        time.sleep(2)
        short = replace(config, retention=RetentionConfig(SECOND, SECOND, SECOND))
        report = sweep(index, short, settle_seconds=0)
    finally:
        index.close()
    assert report.studies == 1
    assert report.study_files == 2
    assert report.study_bytes > 0
    assert report.result_sets == 1
    assert report.audit_rows >= 1  # the association that stored the study
    assert stored(config) == []
    assert list(results.rglob("*.dcm")) == []
    assert not (config.storage_dir / HOLDING).exists() or not any(
        (config.storage_dir / HOLDING).iterdir()
    )
    # The index says what went, and keeps the study and result rows (so a study
    # sent again gets new runs, never the UIDs of objects already delivered).
    kinds = [kind for kind, _ in retention_rows(config)]
    assert kinds.count("study") == 1
    assert kinds.count("results") == 1
    assert kinds.count("audit") == 1
    assert ("study", 2) in retention_rows(config)
    figures = status(config)
    assert figures["studies"] == 1
    assert figures["instances"] == 0
    assert figures["results"] == 1
    assert count(config, AssociationRecord) == 0  # the one that stored the study


def test_a_study_with_a_pending_delivery_or_a_new_instance_is_kept(
    tmp_path: Path, model: Path, run_serve: Callable[[NodeConfig], int]
) -> None:
    # A destination that is down: the delivery stays pending.
    config = node_config(tmp_path, model, free_port(), retry_after=30.0, retry_max=60.0)
    port = run_serve(config)
    assert store_datasets(port, ct_study()) == [0, 0]
    wait_for(lambda: status(config)["results"] == 1, 60, "results written")
    time.sleep(1.5)
    short = replace(config, retention=RetentionConfig(SECOND, SECOND, SECOND))
    index = open_index(config)
    try:
        report = sweep(index, short, settle_seconds=0)
        assert (report.studies, report.result_sets) == (0, 0)
        assert len(stored(config)) == 2
        assert len(list((config.state_dir / "results").glob("*/*/sr.dcm"))) == 1

        # A study whose last instance has just arrived is not yet settled.
        fresh = ct_study(1)
        assert store_datasets(port, fresh) == [0]
        report = sweep(index, short, settle_seconds=0)
        assert report.studies == 0
        assert len(stored(config)) == 3
    finally:
        index.close()


def delivered_and_settled(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> tuple[NodeConfig, int, list[Dataset]]:
    """A node that received a study of two images and delivered its results,
    settled for longer than a one-second retention period."""
    config = node_config(tmp_path, model, destination.port)
    port = run_serve(config)
    study = ct_study()
    assert store_datasets(port, study) == [0, 0]
    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "delivered")
    time.sleep(1.5)
    return config, port, study


@contextmanager
def swept_aside(config: NodeConfig, index: IndexDB) -> Iterator[list[SweepReport]]:
    """Sweep with a one-second studies period in a thread; yield once the study's
    files are moved aside (they wait 6 s there before their check). The sweep
    has ended, its report in the list, when the block does."""
    short = replace(config, retention=RetentionConfig(SECOND, 0, 0))
    done: list[SweepReport] = []
    worker = threading.Thread(
        target=lambda: done.append(sweep(index, short, settle_seconds=6))
    )
    holding = config.storage_dir / HOLDING
    worker.start()
    try:
        wait_for(
            lambda: holding.is_dir() and any(p.is_file() for p in holding.rglob("*")),
            20,
            "the study's files moved aside",
        )
        assert stored(config) == []
        yield done
    finally:
        worker.join(60)


def test_an_instance_sent_again_while_its_study_is_swept_is_kept(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    config, port, study = delivered_and_settled(tmp_path, model, destination, run_serve)
    index = open_index(config)
    try:
        with swept_aside(config, index) as done:
            # The PACS sends the first image again, acknowledged: it must stay.
            assert store_datasets(port, study[:1]) == [0]
    finally:
        index.close()
    assert done
    assert done[0].studies == 1
    # The check ran: nothing is left aside.
    assert not any(p.is_file() for p in (config.storage_dir / HOLDING).rglob("*"))
    files = stored(config)
    assert len(files) == 1
    assert files[0].stem == str(study[0].SOPInstanceUID)
    assert count(config, Instance) == 1


def test_a_file_moved_aside_is_put_back_for_an_instance_indexed_meanwhile(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    # The race the holding folder exists for: a C-STORE placed its file and the
    # sweep moved that file aside before the C-STORE indexed it. The instance's
    # row is then back while its file is aside (its study's job cannot read it):
    # the check puts the file back and the study is processed again.
    config, _, study = delivered_and_settled(tmp_path, model, destination, run_serve)
    index = open_index(config)
    try:
        fields = ("sop_class_uid", "transfer_syntax_uid", "path", "size", "sha256")
        rows = index.run(
            lambda s: {
                r.sop_instance_uid: {name: getattr(r, name) for name in fields}
                for r in s.scalars(select(Instance))
            }
        )
        uid = str(study[0].SOPInstanceUID)
        path = rows[uid]["path"]
        first = (config.storage_dir / path).read_bytes()
        with swept_aside(config, index) as done:
            outcome = index.record_instance(
                InstanceRecordRequest(
                    study_instance_uid=str(study[0].StudyInstanceUID),
                    series_instance_uid=str(study[0].SeriesInstanceUID),
                    sop_instance_uid=uid,
                    modality="CT",
                    association_id=None,
                    **rows[uid],
                )
            )
            assert outcome is RecordOutcome.NEW
    finally:
        index.close()
    assert done
    assert done[0].studies == 1
    assert done[0].restored == 1
    assert not any(p.is_file() for p in (config.storage_dir / HOLDING).rglob("*"))
    files = stored(config)
    assert [f.relative_to(config.storage_dir).as_posix() for f in files] == [path]
    assert files[0].read_bytes() == first
    assert count(config, Instance) == 1
    # Its study is processed again with the file back: results delivered.
    wait_for(lambda: status(config)["deliveries"]["done"] >= 2, 60, "results sent")


def test_retention_periods_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[retention\] studies_days"):
        RetentionConfig(studies_days=-1)
    toml = tmp_path / "node.toml"
    toml.write_text("[retention]\nstudies_days = 7\nkeep = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'keep'"):
        load_config(toml)
    toml.write_text("[retention]\nstudies_days = 7\naudit_days = 30\n")
    config = load_config(toml, environ={"DICOM_NODE_RETENTION_RESULTS_DAYS": "14"})
    assert config.retention == RetentionConfig(7, 14, 30)


def test_serve_sweeps_when_it_starts(
    tmp_path: Path, model: Path, destination: Destination
) -> None:
    config = node_config(tmp_path, model, destination.port)
    with running_node(config) as port:
        assert store_datasets(port, ct_study()) == [0, 0]
        wait_for(lambda: status(config)["deliveries"]["done"] >= 1, 60, "delivered")
        # Stopped only with nothing left to do: a job queued again (an
        # instance that came after the study's timer, on a loaded machine)
        # would be run by the next start, and its study is then not settled
        # when that start sweeps.
        wait_for(lambda: idle(config), 30, "no job or delivery left")
    time.sleep(1.5)
    assert len(stored(config)) == 2
    short = replace(config, retention=RetentionConfig(SECOND, SECOND, SECOND))
    with running_node(short):
        try:
            wait_for(
                lambda: stored(config) == [], 40, "the settled study swept at start"
            )
        except AssertionError as exc:
            figures = status(config)
            raise AssertionError(
                f"{exc}; jobs {figures['jobs']}, deliveries {figures['deliveries']}, "
                f"retention rows {retention_rows(config)}"
            ) from None
        wait_for(
            lambda: not list((config.state_dir / "results").rglob("*.dcm")),
            20,
            "its result files swept",
        )
    assert ("study", 2) in retention_rows(config)
