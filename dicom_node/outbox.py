"""The outbox: due deliveries claimed and sent, to one peer over one association.

A delivery is queued ``pending`` when its result set is recorded, claimed
(``sending``, with a lease) by an outbox thread of any process, and left
``done``, ``pending`` (to be tried again after a pause that doubles) or
``dead`` (out of tries) by that thread.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node import metrics
from dicom_node.config import NodeConfig
from dicom_node.errors import ConfigError
from dicom_node.export import NOT_BEGUN, Peer, send_files
from dicom_node.index import (
    Delivery,
    DeliveryState,
    IndexDB,
    ResultRecord,
    Study,
    utc_now,
)
from dicom_node.leases import backoff, owner_name, release, renew
from dicom_node.log import describe_exception
from dicom_node.loop import Loop
from dicom_node.results.store import delivery_files, results_root
from dicom_node.stow import stow
from dicom_node.tls import client_context

__all__ = [
    "DELIVERIES_AT_ONCE",
    "ClaimedDelivery",
    "Outbox",
    "claim_deliveries",
    "run_deliveries",
]

logger = logging.getLogger(__name__)
# Result sets sent to one peer over one association (an SR and its captures each).
DELIVERIES_AT_ONCE = 16


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery this worker holds the lease of."""

    id: int
    folder: str
    destination: str
    peer: Peer
    attempts: int
    owner: str


def claim_deliveries(
    index: IndexDB, owner: str, lease_seconds: float, limit: int, max_attempts: int
) -> list[ClaimedDelivery]:
    """Claim the oldest due delivery and up to ``limit - 1`` more to its peer.

    Due: pending and due, or sending with an expired lease. Deliveries to one
    peer are claimed together so they share one association. A delivery whose
    sender stopped during ``max_attempts`` tries is dead instead.

    Parameters
    ----------
    index
        The index.
    owner
        Who claims them.
    lease_seconds
        How long the claim holds.
    limit
        Most deliveries to claim.
    max_attempts
        Tries a delivery gets (``delivery_attempts``).

    Returns
    -------
    list of ClaimedDelivery
        Oldest first, all to one peer; empty when nothing is due.
    """

    def due_at(now: datetime) -> ColumnElement[bool]:
        return or_(
            and_(
                Delivery.state == DeliveryState.PENDING,
                Delivery.next_attempt_at <= now,
            ),
            and_(
                Delivery.state == DeliveryState.SENDING,
                Delivery.lease_expires_at < now,
            ),
        )

    # Most claims of an idle node find nothing: looked for first in a read
    # transaction (no write lock).
    if not index.read(
        lambda session: session.scalar(select(exists().where(due_at(utc_now()))))
    ):
        return []

    def work(session: Session) -> list[ClaimedDelivery]:
        now = utc_now()
        due = due_at(now)
        rows = session.execute(
            select(Delivery, ResultRecord.folder)
            .join(ResultRecord, Delivery.result_id == ResultRecord.id)
            .where(due)
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit + 8)
            .with_for_update(skip_locked=True)
        ).all()
        claimed: list[ClaimedDelivery] = []
        for delivery, folder in rows:
            delivery_id, state, attempts = (
                delivery.id,
                delivery.state,
                delivery.attempts,
            )
            peer = Peer(delivery.ae_title, delivery.host, delivery.port)
            if state == DeliveryState.SENDING and attempts >= max_attempts:
                release(
                    session,
                    Delivery,
                    delivery_id,
                    None,
                    DeliveryState.DEAD,
                    only_if=Delivery.state == DeliveryState.SENDING,
                    last_error=f"its sender stopped during {attempts} tries",
                )
                continue
            if len(claimed) == limit or (claimed and peer != claimed[0].peer):
                continue
            done = session.execute(
                update(Delivery)
                .where(
                    Delivery.id == delivery_id,
                    Delivery.state == state,
                    Delivery.attempts == attempts,
                )
                .values(
                    state=DeliveryState.SENDING,
                    attempts=attempts + 1,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if getattr(done, "rowcount", 0) != 1:
                continue
            claimed.append(
                ClaimedDelivery(
                    delivery_id,
                    str(folder),
                    delivery.destination,
                    peer,
                    attempts + 1,
                    owner,
                )
            )
        return claimed

    return index.run(work)


def _delivery_tls(config: NodeConfig, destination: str) -> ssl.SSLContext | None:
    # A configured destination says itself; results sent back to a caller go
    # over TLS when the node's own port speaks it.
    for d in config.destinations:
        if d.name == destination:
            return client_context(config, d) if d.tls else None
    return client_context(config) if config.tls is not None else None


def _stow_all(
    deliveries: Sequence[ClaimedDelivery],
    owner_of: dict[Path, int],
    config: NodeConfig,
    errors: dict[int, str],
    pace: _Pace,
) -> None:
    destination = next(
        (d for d in config.destinations if d.name == deliveries[0].destination), None
    )
    unreachable = ""
    for delivery in deliveries:
        files = [path for path, owner in owner_of.items() if owner == delivery.id]
        if not files:
            continue
        if unreachable:
            errors[delivery.id] = unreachable
            continue
        if not pace.may_begin(delivery.id):
            errors[delivery.id] = NOT_BEGUN
            continue
        try:
            outcomes = stow(files, delivery.peer.host, destination)
        except ConfigError as exc:
            errors[delivery.id] = str(exc)
            continue
        refused = [o for o in outcomes if not o.ok]
        if refused:
            errors[delivery.id] = (
                f"{len(refused)} of {len(outcomes)} not stored: {refused[0].error}"
            )
            if refused[0].error.startswith("not reached"):
                # The rest would wait out the same timeout each, past the
                # lease: they are tried again with this one.
                unreachable = errors[delivery.id]


class _Pace:
    """When a batch may begin a result set, and its leases kept while it sends.

    A batch begins no result set once half the lease has passed: a destination
    answering each file slowly (within the timeout) would otherwise hold the
    outbox, and every destination behind it, for files x timeout. A result set
    begun is sent whole, and, while the batch sends, a thread extends its
    leases every quarter of a lease, so that no other outbox takes its
    deliveries over and sends them again beside it (a batch once ran past its
    lease and was sent twice; so did one long file).

    Parameters
    ----------
    deliveries
        The batch's deliveries (one owner).
    owner_of
        Which delivery each file is of.
    config
        The node configuration (``lease_seconds``).
    index
        The index.
    """

    def __init__(
        self,
        deliveries: Sequence[ClaimedDelivery],
        owner_of: dict[Path, int],
        config: NodeConfig,
        index: IndexDB,
    ) -> None:
        self._ids = [d.id for d in deliveries]
        self._owner = deliveries[0].owner
        self._owner_of = owner_of
        self._lease = config.lease_seconds
        self._index = index
        self._deadline = time.monotonic() + self._lease / 2
        self._stop = threading.Event()
        self._keeper = threading.Thread(
            target=self._keep, name="outbox-leases", daemon=True
        )
        self._begun: set[int] = set()
        # Deliveries not begun for the time: not tried, so no try is spent.
        self.not_begun: set[int] = set()

    def may_begin(self, delivery_id: int) -> bool:
        """Return whether a delivery's files may be sent (yes, once begun)."""
        if delivery_id in self._begun:
            return True
        if time.monotonic() >= self._deadline:
            self.not_begun.add(delivery_id)
            return False
        self._begun.add(delivery_id)
        return True

    def may_send(self, path: Path) -> bool:
        """Return whether a file may be sent (see :meth:`may_begin`)."""
        return self.may_begin(self._owner_of[path])

    def __enter__(self) -> _Pace:
        """Start extending the batch's leases, every quarter of a lease."""
        self._keeper.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop extending them (the batch releases them next)."""
        self._stop.set()
        self._keeper.join()

    def _keep(self) -> None:
        while not self._stop.wait(self._lease / 4):
            try:
                self._index.run(
                    lambda s: renew(s, Delivery, self._ids, self._owner, self._lease)
                )
            except SQLAlchemyError as exc:
                logger.warning(
                    "cannot extend the deliveries' leases: %s", type(exc).__name__
                )


def _send(
    deliveries: Sequence[ClaimedDelivery],
    owner_of: dict[Path, int],
    config: NodeConfig,
    errors: dict[int, str],
    pace: _Pace,
) -> None:
    """Send the deliveries' files (owner_of) to their peer; note failures in errors."""
    if owner_of and deliveries[0].peer.port == 0:
        # A DICOMweb destination (its URL in the host field): STOW-RS, one
        # request per result set.
        _stow_all(deliveries, owner_of, config, errors, pace)
        return
    if not owner_of:
        return
    try:
        tls = _delivery_tls(config, deliveries[0].destination)
    except ConfigError as exc:
        for delivery in deliveries:
            errors.setdefault(delivery.id, str(exc))
        return
    report = send_files(
        list(owner_of),
        deliveries[0].peer,
        calling_ae_title=config.ae_title,
        tls=tls,
        begin=pace.may_send,
    )
    sent: dict[int, list[bool]] = {}
    for outcome in report.outcomes:
        delivery_id = owner_of[outcome.path]
        sent.setdefault(delivery_id, []).append(outcome.ok)
        if not outcome.ok and delivery_id not in errors:
            errors[delivery_id] = outcome.error or "not accepted"
    for delivery_id, oks in sent.items():
        if not all(oks):
            errors[delivery_id] = (
                f"{oks.count(False)} of {len(oks)} not accepted: {errors[delivery_id]}"
            )


def run_deliveries(
    deliveries: Sequence[ClaimedDelivery], config: NodeConfig, index: IndexDB
) -> list[DeliveryState]:
    """Send result sets to their (one) peer over one association; record each outcome.

    Parameters
    ----------
    deliveries
        Claimed deliveries, all to one peer.
    config
        The node configuration (AE title, attempts, backoff).
    index
        The index.

    Returns
    -------
    list of DeliveryState
        Each delivery's new state: done, pending (to be retried) or dead; none
        for a delivery whose lease ran out while it was sent (whoever holds
        it now records its outcome).
    """
    errors: dict[int, str] = {}
    owner_of: dict[Path, int] = {}
    root = results_root(config.state_dir)
    for delivery in deliveries:
        files = delivery_files(root / delivery.folder)
        if all(f.is_file() for f in files):
            owner_of.update(dict.fromkeys(files, delivery.id))
        else:
            errors[delivery.id] = "result files missing"
    pace = _Pace(deliveries, owner_of, config, index)
    try:
        with pace:
            _send(deliveries, owner_of, config, errors, pace)
    except Exception as exc:  # noqa: BLE001 - every delivery gets an outcome
        # What was sent before is sent again: a copy of a SOP instance
        # replaces itself; a delivery left held would wait out its lease.
        logger.error("sending results failed: %s", describe_exception(exc))
        for delivery in deliveries:
            errors.setdefault(
                delivery.id, f"sending failed ({describe_exception(exc)})"
            )
    now = utc_now()
    changes: list[tuple[ClaimedDelivery, DeliveryState, dict[str, Any]]] = []
    for delivery in deliveries:
        error = errors.get(delivery.id, "")
        values: dict[str, Any]
        if delivery.id in pace.not_begun:
            # Not tried: the claim's try given back, due again at once.
            state = DeliveryState.PENDING
            values = {"attempts": delivery.attempts - 1, "next_attempt_at": now}
        elif not error:
            state, values = (
                DeliveryState.DONE,
                {"delivered_at": now, "last_error": None},
            )
        elif delivery.attempts >= config.delivery_attempts:
            state, values = DeliveryState.DEAD, {"last_error": error[:2000]}
        else:
            wait = backoff(delivery.attempts, config.retry_after, config.retry_max)
            state = DeliveryState.PENDING
            values = {
                "last_error": error[:2000],
                "next_attempt_at": now + timedelta(seconds=wait),
            }
        changes.append((delivery, state, values))

    def work(session: Session) -> list[bool]:
        return [
            release(session, Delivery, delivery.id, delivery.owner, state, **values)
            for delivery, state, values in changes
        ]

    held = index.run(work)
    lost = [c[0] for c, kept in zip(changes, held, strict=True) if not kept]
    changes = [c for c, kept in zip(changes, held, strict=True) if kept]
    for delivery in lost:
        # Its lease ran out while it was sent: another outbox may be sending
        # it now, and records its outcome; this one's is not recorded.
        logger.warning(
            "delivery %d to %s, try %d: the lease ran out while sending; "
            "its outcome here is not recorded",
            delivery.id,
            delivery.destination,
            delivery.attempts,
        )
    tried = [c for c in changes if c[0].id not in pace.not_begun]
    _measure(index, config, tried, now)
    for delivery, state, _ in changes:
        if state == DeliveryState.DONE:
            logger.info(
                "delivered result set %s to %s",
                delivery.folder.split("/")[-1],
                delivery.destination,
            )
        elif delivery.id in pace.not_begun:
            logger.info(
                "delivery %d to %s: not begun, the batch took half its lease; "
                "due again",
                delivery.id,
                delivery.destination,
            )
        else:
            logger.warning(
                "delivery %d to %s, try %d: %s (now %s)",
                delivery.id,
                delivery.destination,
                delivery.attempts,
                errors[delivery.id],
                state,
            )
    return [state for _, state, _ in changes]


def _measure(
    index: IndexDB,
    config: NodeConfig,
    changes: Sequence[tuple[ClaimedDelivery, DeliveryState, dict[str, Any]]],
    now: datetime,
) -> None:
    """Count the tries by outcome; time each delivered study from stable to here."""
    for _, state, _ in changes:
        metrics.delivered(
            {DeliveryState.DONE: "done", DeliveryState.DEAD: "dead"}.get(state, "retry")
        )
    done = [d.id for d, state, _ in changes if state == DeliveryState.DONE]
    if not done:
        return
    try:
        arrived = index.run(
            lambda s: list(
                s.scalars(
                    select(Study.last_received_at)
                    .join(ResultRecord, ResultRecord.study_id == Study.id)
                    .join(Delivery, Delivery.result_id == ResultRecord.id)
                    .where(Delivery.id.in_(done))
                )
            )
        )
    except SQLAlchemyError:
        return  # a figure is not worth a failed step
    for last in arrived:
        stable = last + timedelta(seconds=config.stable_after)
        metrics.result_latency((now - stable).total_seconds())


class Outbox(Loop):
    """Sends due deliveries in a thread.

    Parameters
    ----------
    config
        The node configuration.
    index
        The index.
    name
        The thread's name (part of the lease owner).
    """

    def __init__(self, config: NodeConfig, index: IndexDB, name: str) -> None:
        super().__init__(name, index)
        self.config, self.index = config, index
        self.owner = owner_name(name)

    def step(self) -> bool:
        """Claim due deliveries to one peer and send them over one association."""
        deliveries = claim_deliveries(
            self.index,
            self.owner,
            self.config.lease_seconds,
            DELIVERIES_AT_ONCE,
            self.config.delivery_attempts,
        )
        if not deliveries:
            return False
        run_deliveries(deliveries, self.config, self.index)
        return True
