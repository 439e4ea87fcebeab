"""The outbox against a destination that answers slowly: nothing sent twice."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.config import DestinationConfig, NodeConfig
from dicom_node.demo.pacs import receiver_ae
from dicom_node.index import (
    Delivery,
    DeliveryState,
    IndexDB,
    Job,
    JobState,
    ResultRecord,
    Study,
    utc_now,
)
from dicom_node.outbox import Outbox
from dicom_node.results.store import results_root
from dicom_node.service import open_index
from tests.factories import make_ct
from tests.helpers import free_port, make_config, wait_for

# Each C-STORE is answered after this long: within the timeout, but four of
# them take longer than the lease below.
ANSWER_AFTER = 2.0
LEASE = 6.0


class SlowDestination:
    """A real SCP that answers each C-STORE after ANSWER_AFTER seconds."""

    def __init__(self, answer_after: float = ANSWER_AFTER) -> None:
        from pynetdicom import evt

        self.port = free_port()
        self.received: list[str] = []

        def on_store(event: Any) -> int:
            time.sleep(answer_after)
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        self._server = receiver_ae("DEST").start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture
def slow() -> Iterator[SlowDestination]:
    destination = SlowDestination()
    try:
        yield destination
    finally:
        destination.stop()


def queue_deliveries(
    config: NodeConfig, index: IndexDB, sets: int, files: int = 2
) -> list[str]:
    """Record ``sets`` result sets of ``files`` files each, due to the destination.

    Returns the SOP Instance UIDs of their files.
    """
    now = utc_now()
    uids = []
    with index.sessions.begin() as session:
        study = Study(
            study_instance_uid="1.2.826.0.1.3680043.8.498.1",
            first_received_at=now,
            last_received_at=now,
            needs_processing=False,
        )
        session.add(study)
        session.flush()
        job = Job(
            study_id=study.id,
            model="/m.safetensors",
            state=JobState.DONE,
            attempts=1,
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()
        for run in range(1, sets + 1):
            folder = results_root(config.state_dir) / f"r{run}"
            folder.mkdir(parents=True)
            names = [f"sc-{n}.dcm" for n in range(1, files)] + ["sr.dcm"]
            for name in names:
                ds = make_ct(seed=run)
                ds.save_as(folder / name, enforce_file_format=True)
                uids.append(str(ds.SOPInstanceUID))
            result = ResultRecord(
                job_id=job.id,
                study_id=study.id,
                model="m",
                run=run,
                device_uid="1.2.3",
                sr_sop_instance_uid=f"1.2.3.{run}",
                folder=f"r{run}",
                summary="{}",
                created_at=now,
            )
            session.add(result)
            session.flush()
            session.add(
                Delivery(
                    result_id=result.id,
                    destination="pacs",
                    ae_title="DEST",
                    host="127.0.0.1",
                    port=config.destinations[0].port,
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
    return uids


def deliveries(index: IndexDB) -> list[Delivery]:
    with index.sessions.begin() as session:
        rows = list(session.scalars(select(Delivery).order_by(Delivery.id)))
        session.expunge_all()
        return rows


def slow_node(tmp_path: Path, slow: SlowDestination, **settings: Any) -> NodeConfig:
    """A node delivering to the slow destination under a short lease."""
    return make_config(
        tmp_path,
        destinations=(DestinationConfig("pacs", "DEST", "127.0.0.1", slow.port),),
        lease_seconds=LEASE,
        **{"retry_after": 0.1, "retry_max": 0.1, **settings},
    )


def step_past_the_lease(first: Outbox) -> threading.Thread:
    """Step ``first`` in a thread; return once it is done or its lease is out."""
    started = time.monotonic()
    sending = threading.Thread(target=first.step)
    sending.start()
    wait_for(
        lambda: not sending.is_alive() or time.monotonic() - started > LEASE + 0.5,
        LEASE + 30,
        "the first outbox done or past its first lease",
    )
    return sending


def test_a_slow_destination_gets_each_result_once_though_the_lease_runs_short(
    tmp_path: Path, slow: SlowDestination
) -> None:
    """Before, a batch took files x answer time, past its lease: another outbox
    claimed the same deliveries and sent them again beside the first."""
    config = slow_node(tmp_path, slow)
    index = open_index(config)
    uids = queue_deliveries(config, index, sets=2)
    first, second = Outbox(config, index, "outbox-1"), Outbox(config, index, "outbox-2")
    sending = step_past_the_lease(first)

    def all_done() -> bool:
        second.step()
        return all(r.state == DeliveryState.DONE for r in deliveries(index))

    wait_for(all_done, 60, "both deliveries done")
    sending.join(60)

    # Sets begun by half the lease: the first; the second was not tried then
    # (no try spent), and went on the next step.
    assert [r.attempts for r in deliveries(index)] == [1, 1]
    wait_for(lambda: len(slow.received) >= len(uids), 30, "every file")
    assert Counter(slow.received) == Counter(uids)  # each once


def test_a_result_set_not_begun_in_time_spends_no_try(
    tmp_path: Path, slow: SlowDestination
) -> None:
    config = slow_node(
        tmp_path, slow, retry_after=60.0, retry_max=60.0, delivery_attempts=1
    )
    index = open_index(config)
    queue_deliveries(config, index, sets=2)

    Outbox(config, index, "outbox").step()

    # Not tried: due again at once, no try spent (with one try allowed, it
    # was dead-lettered without a C-STORE sent).
    rows = deliveries(index)
    assert [(r.state, r.attempts) for r in rows] == [
        (DeliveryState.DONE, 1),
        (DeliveryState.PENDING, 0),
    ]
    assert rows[1].next_attempt_at <= utc_now()
    assert rows[1].last_error is None


def test_a_result_set_begun_is_sent_whole_past_half_the_lease_and_only_once(
    tmp_path: Path, slow: SlowDestination
) -> None:
    """Four files answered in 2 s each outlast the 6-s lease: the lease is
    extended as they go, so a second outbox does not take the delivery over."""
    config = slow_node(tmp_path, slow)
    index = open_index(config)
    uids = queue_deliveries(config, index, sets=1, files=4)
    first, second = Outbox(config, index, "outbox-1"), Outbox(config, index, "outbox-2")
    sending = step_past_the_lease(first)
    taken = second.step()
    sending.join(60)

    assert not taken
    rows = deliveries(index)
    assert [(r.state, r.attempts) for r in rows] == [(DeliveryState.DONE, 1)]
    assert Counter(slow.received) == Counter(uids)


def test_the_lease_is_kept_through_one_file_longer_than_it(tmp_path: Path) -> None:
    """Leases were extended only between files: one file answered after more
    than a lease was taken over by a second outbox and sent again."""
    slow = SlowDestination(answer_after=LEASE + 2)
    try:
        config = slow_node(tmp_path, slow)
        index = open_index(config)
        uids = queue_deliveries(config, index, sets=1, files=1)
        first = Outbox(config, index, "outbox-1")
        second = Outbox(config, index, "outbox-2")
        sending = step_past_the_lease(first)
        taken = second.step()
        sending.join(60)
    finally:
        slow.stop()

    assert not taken
    assert [(r.state, r.attempts) for r in deliveries(index)] == [
        (DeliveryState.DONE, 1)
    ]
    assert Counter(slow.received) == Counter(uids)
