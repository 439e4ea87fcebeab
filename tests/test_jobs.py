"""Jobs: one job per study and model at a time; only models a process can run."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.index import IndexDB, Job, JobState, Study, utc_now
from dicom_node.jobs import claim_jobs, finish_job
from dicom_node.service import open_index
from tests.helpers import make_config


def _study_with_jobs(index: IndexDB, models: list[str]) -> int:
    """A study with one due pending job per entry of ``models`` (repeats allowed)."""
    past = utc_now() - timedelta(minutes=1)

    def work(session: Session) -> int:
        study = Study(
            study_instance_uid="1.2.826.0.1.3680043.2.1125.1",
            first_received_at=past,
            last_received_at=past,
            needs_processing=False,
        )
        session.add(study)
        session.flush()
        for model in models:
            session.add(
                Job(
                    study_id=study.id,
                    model=model,
                    state=JobState.PENDING,
                    attempts=0,
                    created_at=past,
                    updated_at=past,
                )
            )
        return int(study.id)

    return index.run(work)


def _states(index: IndexDB) -> list[str]:
    with index.sessions() as session:
        return [str(s) for s in session.scalars(select(Job.state).order_by(Job.id))]


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IndexDB]:
    overrides = {}
    if request.param == "postgresql":
        overrides["database_url"] = request.getfixturevalue("postgres_url")
    opened = open_index(make_config(tmp_path, **overrides))
    try:
        yield opened
    finally:
        opened.close()


def test_two_jobs_of_one_study_and_model_never_run_at_once(index: IndexDB) -> None:
    # A job running, and new images made a second one: it waits its turn.
    _study_with_jobs(index, ["/models/a.safetensors"] * 2)

    first = claim_jobs(index, "w1", 600.0, 3, 8, ["/models/a.safetensors"])
    assert len(first) == 1
    assert claim_jobs(index, "w2", 600.0, 3, 8, ["/models/a.safetensors"]) == []
    assert _states(index) == ["running", "pending"]

    finish_job(index, first[0], JobState.SKIPPED, "done with it")
    second = claim_jobs(index, "w2", 600.0, 3, 8, ["/models/a.safetensors"])
    assert [j.id for j in second] == [first[0].id + 1]


def test_workers_claiming_at_once_run_one_job_per_study_and_model(
    index: IndexDB,
) -> None:
    _study_with_jobs(index, ["/models/a.safetensors"] * 6 + ["/models/b.safetensors"])
    claimed: list[list[int]] = []
    start = threading.Barrier(4)

    def worker(owner: str) -> None:
        start.wait()
        jobs = claim_jobs(
            index,
            owner,
            600.0,
            3,
            8,
            ["/models/a.safetensors", "/models/b.safetensors"],
        )
        claimed.append([j.id for j in jobs])

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    running = _states(index).count("running")
    assert running == 2  # one of model a, one of model b
    assert sum(len(ids) for ids in claimed) == 2


def test_only_jobs_of_models_the_process_can_run_are_claimed(index: IndexDB) -> None:
    _study_with_jobs(index, ["/models/here.safetensors", "/models/missing.safetensors"])

    jobs = claim_jobs(index, "w1", 600.0, 3, 8, ["/models/here.safetensors"])

    assert [j.model for j in jobs] == ["/models/here.safetensors"]
    assert _states(index) == ["running", "pending"]
    assert claim_jobs(index, "w1", 600.0, 3, 8, []) == []
