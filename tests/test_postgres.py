"""The node on a PostgreSQL index: the scale-out path (``database_url``).

A throwaway PostgreSQL server (Debian's package, installed by
.ci/setup-system.sh) runs for the session; each test gets its own database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, inspect, select, text

from dicom_node.config import NodeConfig
from dicom_node.index import IndexDB, Job, Study, utc_now
from dicom_node.jobs import claim_jobs
from dicom_node.scheduler import schedule_stable_studies
from dicom_node.service import open_index
from tests.helpers import (
    Destination,
    ct_study,
    make_config,
    node_config,
    status,
    store_datasets,
    wait_for,
)


def test_a_study_is_scored_and_delivered_with_a_postgresql_index(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
    postgres_url: str,
) -> None:
    config = node_config(tmp_path, model, destination.port, database_url=postgres_url)
    port = run_serve(config)
    study = ct_study()

    assert store_datasets(port, study) == [0, 0]

    wait_for(lambda: len(destination.received) >= 3, 60, "SR and 2 SCs at the PACS")
    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 10, "delivery done")
    figures = status(config)
    assert figures["jobs"]["done"] == 1
    assert figures["results"] == 1
    assert not (config.state_dir / "index.sqlite3").exists()
    sr = next(ds for ds in destination.received if ds.Modality == "SR")
    assert sr.StudyInstanceUID == study[0].StudyInstanceUID


def test_workers_claiming_at_once_take_each_job_exactly_once(
    tmp_path: Path, postgres_url: str
) -> None:
    config = make_config(tmp_path, database_url=postgres_url)
    index = open_index(config)
    try:
        long_ago = utc_now() - timedelta(minutes=5)
        with index.sessions.begin() as session:
            for i in range(60):
                session.add(
                    Study(
                        study_instance_uid=f"1.2.3.{i}",
                        first_received_at=long_ago,
                        last_received_at=long_ago,
                        needs_processing=True,
                    )
                )
        # Two schedulers at once queue each study once.
        found: list[int] = []
        schedulers = [
            threading.Thread(
                target=lambda: found.append(
                    schedule_stable_studies(index, ["model"], 1.0)
                )
            )
            for _ in range(2)
        ]
        for thread in schedulers:
            thread.start()
        for thread in schedulers:
            thread.join()
        assert sum(found) == 60
        # Four workers claiming batches at once (FOR UPDATE SKIP LOCKED).
        claimed: dict[str, list[int]] = {}

        def worker(owner: str) -> None:
            mine = claimed.setdefault(owner, [])
            while batch := claim_jobs(index, owner, 600.0, 3, 4, ["model"]):
                mine.extend(job.id for job in batch)

        workers = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        every = [job_id for ids in claimed.values() for job_id in ids]
        with index.sessions() as session:
            jobs = session.execute(select(Job.id, Job.state, Job.lease_owner)).all()
        assert sorted(every) == sorted(job_id for job_id, _, _ in jobs)
        assert len(every) == len(set(every)) == 60
        assert {state for _, state, _ in jobs} == {"running"}
        owner_of = {job_id: owner for job_id, _, owner in jobs}
        for owner, ids in claimed.items():
            assert all(owner_of[job_id] == owner for job_id in ids)
    finally:
        index.close()


def test_a_postgresql_index_from_an_earlier_version_gets_its_indexes(
    postgres_url: str,
) -> None:
    # Several processes open a shared index at once after an upgrade: each
    # makes what is missing, none fails on another's index.
    IndexDB(postgres_url).close()
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("DROP INDEX ux_jobs_one_running"))
        errors: list[BaseException] = []

        def open_once() -> None:
            try:
                IndexDB(postgres_url).close()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=open_once) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        made = {i["name"]: i for i in inspect(engine).get_indexes("jobs")}
        assert made["ux_jobs_one_running"]["unique"]
    finally:
        engine.dispose()
