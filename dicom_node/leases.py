"""Leases: how a process holds a job or a delivery, and gives it back.

A worker claims a row (a job or a delivery) by setting its state, a lease owner
(``host:pid:thread``) and when the lease expires. Whoever holds the lease moves
the row on with :func:`release` (and may extend its lease with :func:`renew`
while it works); a row whose lease expired is due again, and
:func:`recover_local_leases` expires at once the leases of this host's
processes that are gone.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, select, true, update
from sqlalchemy.orm import Session

from dicom_node.index import Delivery, DeliveryState, IndexDB, Job, JobState, utc_now

__all__ = [
    "backoff",
    "owner_name",
    "process_gone",
    "recover_local_leases",
    "release",
    "renew",
]


def owner_name(name: str) -> str:
    """Return the lease owner of this process's thread ``name``: ``host:pid:name``."""
    return f"{socket.gethostname()}:{os.getpid()}:{name}"[:100]


def process_gone(owner: str | None) -> bool:
    """Return whether ``owner`` names a process of this host that has ended.

    Parameters
    ----------
    owner
        A lease owner (``host:pid:name``), or None.

    Returns
    -------
    bool
        False for other hosts' processes, which cannot be checked from here.
    """
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) < 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def backoff(attempts: int, first: float, longest: float) -> float:
    """Seconds to wait after ``attempts`` failed tries: doubling, with jitter.

    Parameters
    ----------
    attempts
        Tries so far (1 after the first failure).
    first
        The wait after the first failure.
    longest
        The cap.

    Returns
    -------
    float
        A wait between half and all of ``min(longest, first * 2**(attempts-1))``.
    """
    ceiling = min(longest, first * float(2 ** max(0, attempts - 1)))
    return float(ceiling * random.uniform(0.5, 1.0))


def release(
    session: Session,
    table: type[Job] | type[Delivery],
    row_id: int,
    owner: str | None,
    state: JobState | DeliveryState,
    *,
    only_if: ColumnElement[bool] | None = None,
    **values: Any,
) -> bool:
    """Give a held row back: set its state, clear its lease, set ``values``.

    Parameters
    ----------
    session
        The transaction.
    table
        ``Job`` or ``Delivery``.
    row_id
        The row's id.
    owner
        The lease owner that must still hold it; None: whoever holds it.
    state
        The state it moves to.
    only_if
        A further condition the row must meet.
    **values
        Other columns to set (``last_error``, ``next_attempt_at``, ...).

    Returns
    -------
    bool
        Whether the row was still held (and so was changed).
    """
    condition = (table.id == row_id) & (
        table.lease_owner == owner if owner is not None else true()
    )
    if only_if is not None:
        condition = condition & only_if
    result = session.execute(
        update(table)
        .where(condition)
        .values(
            state=state,
            updated_at=utc_now(),
            lease_owner=None,
            lease_expires_at=None,
            **values,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def renew(
    session: Session,
    table: type[Job] | type[Delivery],
    row_ids: Sequence[int],
    owner: str,
    seconds: float,
) -> int:
    """Extend the leases ``owner`` still holds: they expire ``seconds`` from now.

    Parameters
    ----------
    session
        The transaction.
    table
        ``Job`` or ``Delivery``.
    row_ids
        The rows.
    owner
        The lease owner that must still hold them.
    seconds
        The lease's length.

    Returns
    -------
    int
        How many were still held (and so extended).
    """
    result = session.execute(
        update(table)
        .where(table.id.in_(row_ids), table.lease_owner == owner)
        .values(lease_expires_at=utc_now() + timedelta(seconds=seconds))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0))


def recover_local_leases(index: IndexDB) -> int:
    """Expire the leases held by this host's processes that are gone.

    Parameters
    ----------
    index
        The index.

    Returns
    -------
    int
        How many jobs and deliveries were released.
    """

    def work(session: Session) -> int:
        released = 0
        held: tuple[tuple[type[Job] | type[Delivery], str], ...] = (
            (Job, JobState.RUNNING),
            (Delivery, DeliveryState.SENDING),
        )
        for table, state in held:
            rows = session.execute(
                select(table.id, table.lease_owner).where(table.state == state)
            ).all()
            for row_id, owner in rows:
                if process_gone(owner):
                    session.execute(
                        update(table)
                        .where(table.id == row_id, table.lease_owner == owner)
                        .values(lease_expires_at=utc_now() - timedelta(seconds=1))
                    )
                    released += 1
        return released

    return index.run(work)
