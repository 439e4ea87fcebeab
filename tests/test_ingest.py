"""Ingest under load, stable-study scheduling and a full disk, on a real node."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from dicom_node.config import ModelConfig
from dicom_node.dimse import OUT_OF_RESOURCES, SUCCESS
from dicom_node.index import Instance, Job, Study
from dicom_node.scheduler import schedule_stable_studies
from dicom_node.status import node_status
from tests.factories import make_ct, storescu_folder, write_study
from tests.helpers import RunningNode, store_datasets, wait_for


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eight_concurrent_associations_of_100_instances(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(max_associations=16)
    study_uid = generate_uid()  # all eight senders add to the same study
    folders = []
    for i in range(8):
        folder = tmp_path / f"sender{i}"
        write_study(folder, 100, study_uid=study_uid, rows=32, columns=32)
        folders.append(folder)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda f: storescu_folder(node.port, f), folders))

    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    sent_uids = {
        dcmread(p, stop_before_pixels=True).SOPInstanceUID
        for f in folders
        for p in f.iterdir()
    }
    assert len(sent_uids) == 800
    stored = node.stored_files()
    assert {p.stem for p in stored} == sent_uids
    with node.index.sessions() as s:
        rows = s.scalars(select(Instance.sop_instance_uid)).all()
        studies = s.scalar(select(func.count()).select_from(Study))
    assert sorted(rows) == sorted(sent_uids)  # no duplicates, none missing
    assert studies == 1
    wait_for(
        lambda: node_status(node.index)["associations_by_outcome"] == {"released": 8},
        what="eight released associations in the audit",
    )


def test_stable_study_gets_one_pending_job_per_model(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    models = (
        ModelConfig(tmp_path / "a.safetensors"),
        ModelConfig(tmp_path / "b.safetensors"),
    )
    node = start_node(stable_after=0.5, models=models)
    keys = [m.key for m in models]
    study_uid = generate_uid()
    series_uid = generate_uid()
    assert (
        store_datasets(
            node.port,
            [make_ct(study_uid, series_uid, instance_number=i) for i in range(3)],
        )
        == [SUCCESS] * 3
    )

    # The scheduler of `serve` is a loop over this call; poll it with a deadline.
    def jobs() -> list[tuple[str, str]]:
        schedule_stable_studies(node.index, keys, node.config.stable_after)
        with node.index.sessions() as s:
            return sorted((r[0], r[1]) for r in s.execute(select(Job.model, Job.state)))

    wait_for(lambda: len(jobs()) == 2, what="two jobs")
    assert jobs() == [(keys[0], "pending"), (keys[1], "pending")]

    # A new instance while the jobs still wait adds no second pending job.
    assert store_datasets(
        node.port, [make_ct(study_uid, series_uid, instance_number=9)]
    ) == [SUCCESS]
    wait_for(
        lambda: len(jobs()) == 2 and node_status(node.index)["studies_waiting"] == 0,
        what="rescheduling",
    )
    assert jobs() == [(keys[0], "pending"), (keys[1], "pending")]

    # Once the jobs have finished, a new instance queues the study again.
    with node.index.sessions.begin() as s:
        s.execute(update(Job).values(state="done"))
    assert store_datasets(
        node.port, [make_ct(study_uid, series_uid, instance_number=10)]
    ) == [SUCCESS]
    wait_for(lambda: len(jobs()) == 4, what="a second round of jobs")
    assert jobs() == [
        (keys[0], "done"),
        (keys[0], "pending"),
        (keys[1], "done"),
        (keys[1], "pending"),
    ]


def test_study_is_not_scheduled_before_it_is_stable(
    start_node: Callable[..., RunningNode],
) -> None:
    node = start_node(stable_after=3600.0)
    assert store_datasets(node.port, [make_ct()]) == [SUCCESS]

    assert schedule_stable_studies(node.index, ["m"], node.config.stable_after) == 0

    with node.index.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs: writes beyond it fail with ENOSPC."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_answers_out_of_resources_and_leaves_nothing(
    start_node: Callable[..., RunningNode], tmp_path: Path, tiny_disk: Path
) -> None:
    node = start_node(
        state_dir=tiny_disk,
        database_url=f"sqlite:///{tmp_path / 'index.sqlite3'}",
    )
    study_uid, series_uid = generate_uid(), generate_uid()
    # 256x256 16-bit: 128 KiB of pixels each, so the eighth does not fit in 1 MiB.
    datasets = [
        make_ct(study_uid, series_uid, instance_number=i, rows=256, columns=256, seed=i)
        for i in range(10)
    ]

    statuses = store_datasets(node.port, datasets)

    assert OUT_OF_RESOURCES in statuses
    stored_count = statuses.count(SUCCESS)
    assert stored_count >= 1  # refused only once the disk is (nearly) full
    assert statuses == [SUCCESS] * stored_count + [OUT_OF_RESOURCES] * (
        10 - stored_count
    )
    files = node.stored_files()
    assert len(files) == stored_count
    for f in files:  # what was acknowledged is whole
        assert (
            dcmread(f).PixelData == datasets[int(dcmread(f).InstanceNumber)].PixelData
        )
    assert not list(tiny_disk.rglob("*.tmp"))
    assert node_status(node.index)["instances"] == stored_count
