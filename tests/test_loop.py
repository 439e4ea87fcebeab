"""The node's long-running threads survive what their steps raise, and say so."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.index import IndexDB, Job, Study, ThreadRecord, utc_now
from dicom_node.log import EscapingFormatter
from dicom_node.scheduler import Scheduler
from dicom_node.service import open_index
from tests.helpers import make_config, wait_for


def _quiet_study(index: IndexDB, arrived: datetime | None = None) -> str:
    """A study waiting to be scheduled, its last instance arrived at ``arrived``
    (by default a minute ago)."""
    uid = generate_uid()
    past = arrived or utc_now() - timedelta(minutes=1)

    def work(session: Session) -> None:
        session.add(
            Study(
                study_instance_uid=uid,
                first_received_at=past,
                last_received_at=past,
                needs_processing=True,
            )
        )

    index.run(work)
    return uid


def _jobs(index: IndexDB) -> int:
    with index.sessions() as session:
        return len(session.scalars(select(Job)).all())


def _thread(index: IndexDB, name: str) -> ThreadRecord | None:
    with index.sessions() as session:
        return session.scalars(
            select(ThreadRecord).where(ThreadRecord.name == name)
        ).first()


def test_a_scheduler_that_meets_an_unexpected_error_logs_it_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = open_index(make_config(tmp_path))
    calls: list[float] = []
    value = "Smith^John"  # as a message quoting a data element might

    def wake_workers() -> None:  # the first call fails, as a bug would
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError(value)

    scheduler = Scheduler(index, ["model"], 0.2, on_queued=wake_workers)
    caplog.set_level(logging.WARNING, logger="dicom_node")
    try:
        scheduler.start()
        _quiet_study(index)
        wait_for(lambda: len(calls) == 1, 10, "the first round")
        wait_for(
            lambda: (
                (t := _thread(index, "scheduler")) is not None and t.state == "failing"
            ),
            10,
            "the scheduler reported failing",
        )
        record = _thread(index, "scheduler")
        assert record is not None
        assert record.last_error is not None
        assert record.last_error.startswith("RuntimeError at test_loop.py")
        assert record.failing_since is not None

        _quiet_study(index)  # a study that arrives after the failure
        wait_for(lambda: _jobs(index) == 2, 10, "both studies queued")
        wait_for(
            lambda: (
                (t := _thread(index, "scheduler")) is not None and t.state == "running"
            ),
            10,
            "the scheduler well again",
        )
        assert scheduler.is_alive()
    finally:
        scheduler.stop()
        index.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    text = caplog.text
    assert "scheduler: unexpected RuntimeError at test_loop.py" in text
    assert "trying again in" in text
    # As the node's log writes it: the traceback, never the exception's message.
    written = EscapingFormatter("%(levelname)s %(message)s").format(errors[0])
    assert "| Traceback (most recent call last):" in written
    assert "in wake_workers" in written
    assert "Smith^John" not in written
    index = open_index(make_config(tmp_path))
    try:
        record = _thread(index, "scheduler")
        assert record is not None
        assert record.state == "stopped"
    finally:
        index.close()


def test_a_study_is_queued_when_it_becomes_stable_not_at_a_later_poll(
    tmp_path: Path,
) -> None:
    # With stable_after 2 s, the scheduler looks at least every 0.5 s; a study
    # whose deadline it knows is queued at that deadline, not up to 0.5 s later.
    index = open_index(make_config(tmp_path))
    scheduler = Scheduler(index, ["model"], 2.0)
    late: list[float] = []
    try:
        scheduler.start()
        for _ in range(3):
            arrived = utc_now()
            _quiet_study(index, arrived)
            scheduler.arrived()
            before = _jobs(index)

            def queued_one(n: int = before) -> bool:
                return _jobs(index) == n + 1

            wait_for(queued_one, 10, "the study queued")
            with index.sessions() as session:
                queued = session.scalars(
                    select(Job.created_at).order_by(Job.id.desc())
                ).first()
            assert queued is not None
            late.append((queued - arrived).total_seconds() - 2.0)
    finally:
        scheduler.stop()
        index.close()
    assert all(-0.01 <= s < 0.15 for s in late), late
