"""The receiving AE: association control, C-ECHO and C-STORE into storage and index."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import socket
import ssl
import struct
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.fileutil import read_undefined_length_value
from pydicom.hooks import hooks
from pydicom.tag import SequenceDelimiterTag
from pydicom.uid import UID, AllTransferSyntaxes
from pydicom.valuerep import VR
from pynetdicom import AE, _config, evt, register_uid
from pynetdicom import __version__ as pynetdicom_version
from pynetdicom import sop_class as pynetdicom_sop_class
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    StoragePresentationContexts,
)
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import metrics
from dicom_node.config import NodeConfig
from dicom_node.dimse import (
    CANNOT_UNDERSTAND,
    COMMAND_MAX,
    CONFLICTING_INSTANCE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_UID,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    VERIFICATION_SOP_CLASS,
    is_decode_error,
)
from dicom_node.errors import (
    DicomNodeError,
    InvalidUidError,
    ListenError,
    StorageError,
)
from dicom_node.gate import (
    RJ_CALLED_AE_NOT_RECOGNIZED,
    RJ_CALLING_AE_NOT_RECOGNIZED,
    ConnectionGate,
    GateDecision,
    GuardedSocket,
    GuardedSSLSocket,
    PduLimits,
    Receipt,
    Refusal,
)
from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.index import IndexDB, InstanceRecordRequest, RecordOutcome
from dicom_node.log import describe_exception, quiet_pynetdicom, uid_ref
from dicom_node.loop import Loop
from dicom_node.storage import (
    STORED_DEFER_SIZE,
    InstanceKey,
    Storage,
    sha256_from,
    validate_uid,
)
from dicom_node.tls import server_context

__all__ = [
    "Arrival",
    "Receiver",
    "StoreContext",
    "accepted_sop_classes",
    "audit_refusal",
    "check_caller",
    "handle_dimse_recv",
    "handle_echo",
    "handle_pdu_recv",
    "handle_store",
    "storage_sop_classes",
]

logger = logging.getLogger(__name__)

_UNDEFINED_LENGTH = 0xFFFFFFFF  # PS3.5 7.1.1

# A-ASSOCIATE-RJ reasons, PS3.8 9.3.4: result 1 = rejected-permanent, source 1 =
# DICOM UL service-user.
_RJ_PERMANENT = 0x01
_RJ_TRANSIENT = 0x02
_RJ_SOURCE_SERVICE_USER = 0x01
_RJ_NO_REASON = 0x01

# Values at most this long are read when a received data set is checked; longer
# ones (pixel data) stay on disk, so a large instance costs no memory.
_DEFER_SIZE = 64 * 1024
# Bytes a deflated data set may carry after its stream's end (see _inflate).
_DEFLATE_TRAILER = 8
# Read size when a received file is hashed or a deflated one measured.
_CHUNK = 1 << 20
# A data set that is not a C-STORE request's stays in memory (pynetdicom spools
# only those); the node serves no message that needs one this large.
_IN_MEMORY_MAX = 1024 * 1024
# Refused instances of one association logged and recorded one by one; the
# rest are counted in its last line.
_REFUSALS_NOTED = 5
_C_STORE_RQ = 0x0001  # PS3.7 E.1-1 Command Field
_C_ECHO_RQ = 0x0030  # PS3.7 E.1-1 Command Field
# Fragments (PDVs) one message may come in: a few, then one for each 512 bytes
# it carries. A sender's fragments are as large as its PDUs (4 KiB at the least
# in dcmtk; 1 KiB ones still pass) but for the last; each costs a decode and a
# write, so a message of empty or 1-byte fragments would cost a core and never
# reach a byte limit.
_FRAGMENTS_FREE = 16
_BYTES_PER_FRAGMENT = 512
# The Command Field values of PS3.7 (9.3 and 10.3): requests and responses of
# the C- and N- services, and C-CANCEL-RQ. The node serves C-ECHO and C-STORE
# requests only; any other is refused before pynetdicom reads it (a C-CANCEL
# once made its association thread fail, with the connection held unread).
_REQUESTS = (0x0001, 0x0010, 0x0020, 0x0021, 0x0030, 0x0100, 0x0110, 0x0120, 0x0130)
_DIMSE_COMMANDS = frozenset(
    (
        *_REQUESTS,
        0x0140,
        0x0150,
        0x0FFF,
        *(0x8000 | c for c in _REQUESTS),
        0x8140,
        0x8150,
    )
)
_NO_DATA_SET = 0x0101  # (0000,0800) Command Data Set Type: none


@dataclass(frozen=True, slots=True)
class Arrival:
    """An instance this process just stored and indexed.

    For the scheduler (a study's deadline moved) and for scoring on arrival.

    Parameters
    ----------
    study_instance_uid
        Its study.
    path
        Its file in storage.
    sop_class_uid
        Its SOP Class UID.
    calling_ae_title
        Who sent it.
    at
        When it was stored (``time.monotonic()``).
    """

    study_instance_uid: str
    path: Path
    sop_class_uid: str
    calling_ae_title: str
    at: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class StoreContext:
    """What the event handlers need, injected as the handler's extra argument.

    Parameters
    ----------
    config
        The node configuration.
    storage
        The file store.
    index
        The index database.
    on_stored
        Called after each instance stored and indexed, before the answer (the
        scheduler of this process: a study's deadline has moved; scoring on
        arrival). Must not block.
    """

    config: NodeConfig
    storage: Storage
    index: IndexDB
    on_stored: Callable[[Arrival], None] | None = None
    _associations: dict[int, list[Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # When to look next for what ended associations left (after a connection
    # closed), and how many more looks.
    _sweep_at: float = 0.0
    _sweeps_left: int = 0

    def sweep_soon(self) -> None:
        """Look for what ended associations left, over the next seconds.

        Called when a connection closes. pynetdicom keeps a half-received file
        open until the association's objects are collected, and an association
        whose thread failed inside pynetdicom ends without EVT_CONN_CLOSE: the
        look is repeated a few times.
        """
        with self._lock:
            self._sweep_at = time.monotonic() + 0.5
            self._sweeps_left = 3

    def sweep_if_due(self) -> None:
        """Clean up after ended associations when a look is due (cheap otherwise).

        Removes abandoned spool files, and closes the audit rows of associations
        whose threads ended without EVT_CONN_CLOSE.
        """
        with self._lock:
            if not self._sweeps_left or time.monotonic() < self._sweep_at:
                return
            self._sweeps_left -= 1
            # The last look comes when a file left open has gone stale.
            self._sweep_at = time.monotonic() + (
                2.0 if self._sweeps_left > 1 else self.config.idle_timeout + 1.0
            )
            ended = [
                key
                for key, entry in self._associations.items()
                if (thread := entry[4]()) is None or not thread.is_alive()
            ]
            stale = [self._associations.pop(key) for key in ended]
            # With no association running, what the spool holds was left by
            # ended ones (a file must be untouched a moment: one arriving on an
            # association being set up right now is new).
            all_before = None if self._associations else time.time() - 2.0
        for entry in stale:
            try:
                self.index.close_association(entry[0], "aborted", entry[2], entry[3])
            except SQLAlchemyError as exc:
                logger.warning(
                    "could not record the end of association %d: %s",
                    entry[0],
                    type(exc).__name__,
                )
        try:
            if not self.storage.has_spooled_files():
                return
            if all_before is not None:
                # Closes the files of associations no longer referenced; only
                # while none runs, as a collection holds the GIL (a busy node's
                # abandoned files go once stale).
                gc.collect()
            # A running association writes at least every two idle_timeouts
            # (one silent, one for a PDU), and its handler finishes a file soon
            # after its last write.
            removed = self.storage.sweep_orphans(
                2 * self.config.idle_timeout + 60.0, all_before=all_before
            )
        except OSError as exc:
            logger.warning("cannot sweep the spool: %s", type(exc).__name__)
            return
        if removed:
            logger.info("removed %d partly received file(s) from the spool", removed)

    def association_id(self, assoc: Association) -> int | None:
        """Return the index id of a running association."""
        with self._lock:
            entry = self._associations.get(id(assoc))
        return None if entry is None else int(entry[0])

    def remember(self, assoc: Association, association_id: int) -> None:
        """Start tracking an accepted association."""
        # [index id, outcome, instances stored, instances failed, the thread]
        with self._lock:
            self._associations[id(assoc)] = [
                association_id,
                None,
                0,
                0,
                weakref.ref(assoc),
            ]

    def set_outcome(self, assoc: Association, outcome: str) -> None:
        """Note how the association ended (the first outcome noted wins)."""
        with self._lock:
            entry = self._associations.get(id(assoc))
            if entry is not None and entry[1] is None:
                entry[1] = outcome

    def count(self, assoc: Association, success: bool) -> int:
        """Count one C-STORE answered with Success or with a failure.

        Returns the association's failures so far (0 when it is not tracked).
        """
        with self._lock:
            entry = self._associations.get(id(assoc))
            if entry is None:
                return 0
            entry[2 if success else 3] += 1
            return int(entry[3])

    def forget(self, assoc: Association) -> tuple[int, str, int, int] | None:
        """Stop tracking; return (id, outcome, stored, failed) or None."""
        with self._lock:
            entry = self._associations.pop(id(assoc), None)
        if entry is None:
            return None
        return int(entry[0]), str(entry[1] or "closed"), int(entry[2]), int(entry[3])


def handle_requested(event: Event, ctx: StoreContext) -> None:
    """Accept or reject an A-ASSOCIATE-RQ by the called AE title and allow-list.

    A rejection is sent here, before pynetdicom negotiates, as A-ASSOCIATE-RJ
    (rejected-permanent, service-user) with reason "calling AE title not
    recognized" or "called AE title not recognized" (PS3.8 9.3.4).

    Parameters
    ----------
    event
        The EVT_REQUESTED event.
    ctx
        The node's handler context.
    """
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    calling = _calling_ae_title(assoc)
    called = str(primitive.called_ae_title if primitive else "").strip()
    address = str(assoc.requestor.address)
    port = int(assoc.requestor.port)
    reason: str | None = None
    diagnostic = 0
    if called != ctx.config.ae_title:
        reason, diagnostic = (
            "called AE title not recognized",
            RJ_CALLED_AE_NOT_RECOGNIZED,
        )
    elif not ctx.config.caller_allowed(calling, address):
        reason = "calling AE title or address not on the allow-list"
        diagnostic = RJ_CALLING_AE_NOT_RECOGNIZED
    try:
        association_id = ctx.index.open_association(
            calling, called, address, port, rejected_reason=reason
        )
    except SQLAlchemyError as exc:
        # Without an audit row the node cannot account for what it receives.
        logger.error(
            "association from %s refused: index unavailable (%s)",
            address,
            type(exc).__name__,
        )
        metrics.association("rejected", "index unavailable")
        _reject(assoc, _RJ_TRANSIENT, _RJ_NO_REASON)
        return
    if reason is not None:
        metrics.association("rejected", reason)
        logger.warning(
            "association from %s:%d (calling AE %r, called AE %r) rejected: %s",
            address,
            port,
            calling,
            called,
            reason,
        )
        _reject(assoc, _RJ_PERMANENT, diagnostic)
        return
    ctx.remember(assoc, association_id)
    metrics.association("accepted")
    logger.info(
        "association %d from %s:%d (calling AE %r) requested",
        association_id,
        address,
        port,
        calling,
    )


def _calling_ae_title(assoc: Association) -> str:
    primitive = assoc.requestor.primitive
    return str(primitive.calling_ae_title if primitive else "").strip()


def _reject(assoc: Association, result: int, diagnostic: int) -> None:
    # As pynetdicom's ACSE does: queue the A-ASSOCIATE-RJ, then wait (kill) until
    # the upper layer has sent it and closed, so the peer reads the rejection.
    assoc.acse.send_reject(result, _RJ_SOURCE_SERVICE_USER, diagnostic)
    assoc.kill()


def handle_released(event: Event, ctx: StoreContext) -> None:
    """Note that the peer released the association."""
    ctx.set_outcome(event.assoc, "released")


def handle_aborted(event: Event, ctx: StoreContext) -> None:
    """Note that the association was aborted."""
    ctx.set_outcome(event.assoc, "aborted")


def handle_conn_close(event: Event, ctx: StoreContext) -> None:
    """Record how the association ended once its connection is closed."""
    ended = ctx.forget(event.assoc)
    if ended is None:
        return
    association_id, outcome, stored, failed = ended
    if outcome == "aborted":
        metrics.association("aborted")
    try:
        ctx.index.close_association(association_id, outcome, stored, failed)
    except SQLAlchemyError as exc:
        logger.warning(
            "could not record the end of association %d: %s",
            association_id,
            type(exc).__name__,
        )
    logger.info(
        "association %d %s: %d stored, %d failed%s",
        association_id,
        outcome,
        stored,
        failed,
        f" ({failed - _REFUSALS_NOTED} not logged one by one)"
        if failed > _REFUSALS_NOTED
        else "",
    )


def _guarded(event: Event) -> GuardedSocket | GuardedSSLSocket | None:
    # The connection is the node's guarded socket once the gate admitted it.
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    return sock if isinstance(sock, GuardedSocket | GuardedSSLSocket) else None


def _receipt(event: Event) -> Receipt | None:
    sock = _guarded(event)
    return None if sock is None else sock.receipt


def _refuse_connection(event: Event, reason: str) -> None:
    sock = _guarded(event)
    if sock is not None:
        sock.refuse(reason)


def handle_pdu_recv(event: Event, ctx: StoreContext) -> None:
    """Watch the DIMSE message arriving, before pynetdicom keeps any of it.

    Bounds what one message may cost: its command set (held in memory) at
    :data:`~dicom_node.dimse.COMMAND_MAX`; any data set but a C-STORE
    request's (held in memory; the node serves only C-ECHO and C-STORE) at
    :data:`_IN_MEMORY_MAX`. Over
    one of those, the association is aborted at once.

    The data set of a C-STORE request goes to the spool. Past
    ``max_instance_bytes``, or when the storage's file system has no room for
    the fragments of this PDU (keeping two PDUs' worth free), its fragments
    are dropped before they are written, and the rest of the data set with
    them: the C-STORE is then answered 0xA700 (Refused: Out of Resources), the
    association goes on, and the partial file is removed. Receiving the rest
    of an over-size data set costs the node no more than a sender sending
    instances within the limit (less: nothing is written or parsed).
    """
    pdu = event.pdu
    if not isinstance(pdu, P_DATA_TF):
        return
    receipt = _receipt(event)
    if receipt is None:
        return
    items = pdu.presentation_data_value_items
    if receipt.contexts is None:
        receipt.contexts = frozenset(
            cx.context_id
            for cx in event.assoc.accepted_contexts
            if cx.context_id is not None
        )
    data = 0
    ended = False  # the message ended at an earlier fragment of this PDU
    for item in items:
        # What pynetdicom would fail on inside its own thread, or drop unread,
        # is refused here, before it reads the PDU: the association ends with
        # an A-ABORT.
        problem = None
        value = item.presentation_data_value
        receipt.fragments += 1
        if item.presentation_context_id not in receipt.contexts:
            problem = "P-DATA on a presentation context that was not accepted"
        elif not value:
            problem = "P-DATA value without a message control header"
        elif ended:
            # pynetdicom reads a PDU's fragments up to its message's end only.
            problem = "P-DATA fragments after the end of their message"
        elif receipt.fragments > _FRAGMENTS_FREE + (
            len(receipt.command) + receipt.data_bytes
        ) // (_BYTES_PER_FRAGMENT):
            problem = (
                "message in more fragments than one for each "
                f"{_BYTES_PER_FRAGMENT} bytes"
            )
        elif value[0] & 0x01:  # a command fragment (PS3.8 E.2)
            receipt.command += value[1:]
            if receipt.spooled is not None:
                # pynetdicom decodes the command and opens a spool file again
                # for each "last" fragment: a loop of them cost seconds each.
                problem = "command fragment after the command set's last one"
            elif len(receipt.command) > COMMAND_MAX:
                problem = f"command set over {COMMAND_MAX} bytes"
            elif value[0] & 0x02:  # its last one: what the message is is known
                command, has_data_set, problem = _command(receipt.command)
                receipt.spooled = command == _C_STORE_RQ
                ended = not has_data_set
        else:
            receipt.data_bytes += len(value) - 1
            data += len(value) - 1
            ended = bool(value[0] & 0x02)
        if problem is not None:
            pdu.presentation_data_value_items = []  # nothing of it is read
            _refuse_connection(event, problem)
            return
    limit = ctx.config.max_instance_bytes if receipt.spooled else _IN_MEMORY_MAX
    if receipt.data_bytes > limit:
        if not receipt.spooled:
            _refuse_connection(
                event, f"data set of a message kept in memory over {limit} bytes"
            )
            return
        # The rest is dropped unwritten and the C-STORE answered 0xA700.
        receipt.dropped = (
            receipt.dropped or f"data set over max_instance_bytes ({limit})"
        )
    # Kept free: new spool files' headers, a study's folders, and the PDUs of
    # other associations checked at the same moment.
    if (
        data
        and receipt.spooled
        and not receipt.dropped
        and not ctx.storage.has_room(data, 2 * ctx.config.max_pdu)
    ):
        receipt.dropped = "storage full: data set not written"
    if data and receipt.dropped:
        for item in items:
            value = item.presentation_data_value or b"\x01"
            if not value[0] & 0x01:
                # The fragment's control header stays: the message still ends.
                item.presentation_data_value = value[:1]


def handle_dimse_recv(event: Event, ctx: StoreContext) -> None:
    """Note a message whose data set was dropped, and start on the next one."""
    receipt = _receipt(event)
    if receipt is None:
        return
    if receipt.dropped:
        key = _dropped_key(event.message)
        if key is not None:
            receipt.dropped_messages[key] = receipt.dropped
    receipt.next_message()


# pynetdicom 3.0 keeps a message's spool file as DIMSEMessage._data_set_path: a
# dropped data set is told by its file there, as a sender may reuse a Message ID
# (its messages are handled after the next is read); elsewhere by Message ID.
_SPOOL_PATH_OF_MESSAGE = pynetdicom_version.startswith("3.0.")


def _dropped_key(message: Any) -> str | None:
    if _SPOOL_PATH_OF_MESSAGE:
        path = getattr(message, "_data_set_path", None)
        return str(path) if isinstance(path, Path) else None
    message_id = message.command_set.get("MessageID")
    return f"message {message_id}" if isinstance(message_id, int) else None


def _uid_checked_by_the_node(value: object) -> tuple[bool, str]:
    """Accept any UI value in pynetdicom (the node checks the UIDs it uses)."""
    return True, ""


def _command(command: bytearray) -> tuple[int | None, bool, str | None]:
    """Return a command set's Command Field, if a data set follows, any refusal.

    Checks what pynetdicom reads of every command set before it decodes the
    message (PS3.7 E.1): a known Command Field, a Command Data Set Type; and
    that the message is one the node serves as it must come: a C-ECHO request
    without a data set, or a C-STORE request with one and its SOP Class and
    Instance UIDs. pynetdicom would answer any other request with the response
    of another service, or none (PS3.7 9.3, 10.3), and the node serves no
    operation that another message could be a response to.
    """
    # The command set is implicit VR little endian (PS3.7 6.3.1).
    try:
        ds = read_dataset(BytesIO(bytes(command)), True, True)
        field = ds.get("CommandField")
        data_set_type = ds.get("CommandDataSetType")
        if not isinstance(field, int) or field not in _DIMSE_COMMANDS:
            return None, False, "command set without a known Command Field"
        if not isinstance(data_set_type, int):
            return field, False, "command set without a Command Data Set Type"
        has_data_set = data_set_type != _NO_DATA_SET
        if field == _C_ECHO_RQ:
            problem = "C-ECHO request with a data set" if has_data_set else None
        elif field == _C_STORE_RQ:
            problem = None if has_data_set else "C-STORE request without a data set"
            for keyword in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
                value = ds.get(keyword)
                if problem is None and not (isinstance(value, str) and value):
                    problem = f"C-STORE request without {keyword}"
        else:
            problem = f"a DIMSE message the node does not serve (0x{field:04X})"
        return field, has_data_set, problem
    except Exception as exc:
        if not is_decode_error(exc):
            raise
        return None, False, f"command set does not decode ({type(exc).__name__})"


def handle_echo(event: Event, ctx: StoreContext) -> int:
    """Answer a C-ECHO (Verification, PS3.4 A.4)."""
    return SUCCESS


def handle_store(event: Event, ctx: StoreContext) -> int:
    """Store one instance durably and index it, then answer.

    Success goes back only once the file is on stable storage and the index
    transaction has committed. Bad input gets a failure status and leaves nothing
    behind. Never raises: pynetdicom would answer 0xC211 and log the exception.

    Parameters
    ----------
    event
        The EVT_C_STORE event.
    ctx
        The node's handler context.

    Returns
    -------
    int
        The C-STORE status.
    """
    association_id = ctx.association_id(event.assoc)
    arrival: Arrival | None = None
    unexpected: Exception | None = None
    try:
        status, message, arrival = _store(event, ctx, association_id)
    except Exception as exc:  # noqa: BLE001 - answered 0xA700; logged below
        status = OUT_OF_RESOURCES
        message = f"unexpected {describe_exception(exc)}"
        unexpected = exc
    failures = ctx.count(event.assoc, status == SUCCESS)
    if unexpected is not None and failures <= _REFUSALS_NOTED:
        logger.error("C-STORE failed: %s", message, exc_info=unexpected)
    if arrival is not None and ctx.on_stored is not None:
        try:
            ctx.on_stored(arrival)
        except Exception as exc:  # stored and indexed: Success stands
            logger.error(
                "after C-STORE: unexpected %s", describe_exception(exc), exc_info=exc
            )
    if status != SUCCESS and failures <= _REFUSALS_NOTED:
        # The rest only counted (the association's last line says how many):
        # a sender may fail thousands of instances in an association.
        logger.log(
            logging.ERROR if status == OUT_OF_RESOURCES else logging.WARNING,
            "instance %s refused (0x%04X): %s%s",
            uid_ref(str(getattr(event.request, "AffectedSOPInstanceUID", ""))),
            status,
            message,
            "; further refusals of this association are only counted"
            if failures == _REFUSALS_NOTED
            else "",
        )
        ctx.index.record_error(
            "store", message, status=status, association_id=association_id
        )
    return status


def _store(
    event: Event, ctx: StoreContext, association_id: int | None
) -> tuple[int, str, Arrival | None]:
    request = event.request
    if not isinstance(request, C_STORE):
        raise TypeError(f"expected a C-STORE request, got {type(request).__name__}")
    # Received to disk as it arrived (STORE_RECV_CHUNKED_DATASET): preamble,
    # File Meta, then the data set exactly as the sender encoded it.
    path = Path(event.dataset_path)
    receipt = _receipt(event)
    key = str(path) if _SPOOL_PATH_OF_MESSAGE else f"message {request.MessageID}"
    dropped = receipt.dropped_messages.pop(key, None) if receipt is not None else None
    if dropped is not None:
        return OUT_OF_RESOURCES, dropped, None
    try:
        validate_uid(str(request.AffectedSOPInstanceUID), "AffectedSOPInstanceUID")
    except InvalidUidError as exc:
        return INVALID_UID, f"invalid UID: {exc}", None
    if str(request.AffectedSOPClassUID) != str(event.context.abstract_syntax):
        return (
            SOP_CLASS_NOT_SUPPORTED,
            "SOP Class differs from the presentation context's abstract syntax",
            None,
        )
    deflated = bool(event.context.transfer_syntax.is_deflated)
    body: bytes | None = None  # a deflated data set, inflated
    try:
        file_size = path.stat().st_size
        data_start = _data_set_offset(path)
        if deflated:
            body = _inflate(path, data_start, ctx.config.max_inflated_bytes)
    except zlib.error as exc:
        return CANNOT_UNDERSTAND, f"deflated data set refused: {exc}", None
    except (OSError, ValueError) as exc:
        # The spool file the receiving side wrote cannot be read: the node's
        # trouble, not the data set's.
        return (
            OUT_OF_RESOURCES,
            f"received file unreadable ({type(exc).__name__})",
            None,
        )
    if deflated and body is None:
        return (
            OUT_OF_RESOURCES,
            "deflated data set inflates past max_inflated_bytes",
            None,
        )
    # The disk flushes the file and a helper thread hashes it while the data set
    # is parsed; a refused one is neither if its turn has not come.
    flushed = ctx.storage.flush_soon(path)
    digest = ctx.storage.digest_soon(path, data_start)
    try:
        return _store_received(
            event,
            ctx,
            association_id,
            path,
            file_size,
            data_start,
            body,
            flushed,
            digest,
        )
    finally:
        flushed.cancel()  # nothing once it has run
        digest.cancel()


def _store_received(
    event: Event,
    ctx: StoreContext,
    association_id: int | None,
    path: Path,
    file_size: int,
    data_start: int,
    body: bytes | None,
    flushed: Future[None],
    hashed: Future[str],
) -> tuple[int, str, Arrival | None]:
    # Check the received data set, then place it and index it (see _store).
    request = cast(C_STORE, event.request)
    limit = ctx.config.max_data_elements
    held = ctx.config.max_in_memory_bytes
    try:
        ds = _read_received(path, body, limit, held)
        # Before any element is read: reading converts raw elements.
        problem = _structure_problem(ds, file_size if body is None else len(body))
        sop_class_uid = ds.get("SOPClassUID")
        sop_instance_uid = ds.get("SOPInstanceUID")
        study_uid = ds.get("StudyInstanceUID")
        series_uid = ds.get("SeriesInstanceUID")
        modality = ds.get("Modality")
    except _TooManyElementsError:
        return (
            OUT_OF_RESOURCES,
            f"data set holds more than max_data_elements ({limit}) elements",
            None,
        )
    except _TooManyBytesError:
        return (
            OUT_OF_RESOURCES,
            "data set holds more than max_in_memory_bytes "
            f"({held}) of values read into memory",
            None,
        )
    except _NotUnderstoodError as exc:
        return CANNOT_UNDERSTAND, str(exc), None
    except Exception as exc:
        if not is_decode_error(exc):
            raise  # the node's own bug: answered 0xA700, logged with its traceback
        return (
            CANNOT_UNDERSTAND,
            f"data set does not parse ({type(exc).__name__})",
            None,
        )
    if problem:
        return CANNOT_UNDERSTAND, problem, None

    missing = [
        name
        for name, value in (
            ("SOPClassUID", sop_class_uid),
            ("SOPInstanceUID", sop_instance_uid),
            ("StudyInstanceUID", study_uid),
            ("SeriesInstanceUID", series_uid),
        )
        if not value
    ]
    if missing:
        return DATASET_DOES_NOT_MATCH_SOP_CLASS, f"missing {', '.join(missing)}", None
    try:
        key = InstanceKey(str(study_uid), str(series_uid), str(sop_instance_uid))
        validate_uid(str(sop_class_uid), "SOPClassUID")
    except InvalidUidError as exc:
        return INVALID_UID, f"invalid UID: {exc}", None
    if str(sop_class_uid) != str(
        request.AffectedSOPClassUID
    ) or key.sop_instance_uid != str(request.AffectedSOPInstanceUID):
        return (
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOP Class/Instance UID in the data set differ from the C-STORE request",
            None,
        )

    ref = uid_ref(key.sop_instance_uid)
    started = time.perf_counter()
    try:
        # Not started yet (the pool is busy flushing): hashed here instead.
        digest = sha256_from(path, data_start) if hashed.cancel() else hashed.result()
    except OSError as exc:
        return OUT_OF_RESOURCES, f"storage write failed ({exc})", None
    record = InstanceRecordRequest(
        study_instance_uid=key.study_instance_uid,
        series_instance_uid=key.series_instance_uid,
        sop_instance_uid=key.sop_instance_uid,
        sop_class_uid=str(sop_class_uid),
        transfer_syntax_uid=str(event.context.transfer_syntax),
        modality=str(modality)[:16] if modality else None,
        path=key.relative_path,
        size=file_size,
        sha256=digest,
        association_id=association_id,
    )
    try:
        # Placed and indexed as one step: two copies of the instance arriving
        # at once must not leave one's file under the other's hash.
        with ctx.storage.instance_lock(key):
            placed = _place_and_index(ctx, key, path, flushed, record, ref)
    except StorageError as exc:  # the lock (placing answers for itself)
        return OUT_OF_RESOURCES, f"storage write failed ({exc})", None
    if isinstance(placed, tuple):
        return placed
    stored, outcome = placed.path, placed.outcome
    metrics.received(file_size)
    logger.debug(
        "instance %s stored (%s) in %.1f ms",
        ref,
        outcome.value,
        1000 * (time.perf_counter() - started),
    )
    calling = _calling_ae_title(event.assoc)
    arrival = Arrival(key.study_instance_uid, stored, str(sop_class_uid), calling)
    return SUCCESS, "", arrival


@dataclass(frozen=True, slots=True)
class _Placed:
    """A received copy in its place in storage, and what indexing it did."""

    path: Path
    outcome: RecordOutcome


def _place_and_index(
    ctx: StoreContext,
    key: InstanceKey,
    path: Path,
    flushed: Future[None],
    record: InstanceRecordRequest,
    ref: str,
) -> _Placed | tuple[int, str, None]:
    """Move a received copy into storage and index it; or the refusal.

    Call with the instance's lock held. Written first, then indexed in one
    transaction that also detects conflicts (a look-up before the write would
    cost a second transaction per instance).
    """
    existed = ctx.storage.path_of(key).is_file()
    try:
        stored = ctx.storage.adopt(key, path, flushed)
    except (StorageError, OSError) as exc:
        return OUT_OF_RESOURCES, f"storage write failed ({exc})", None
    try:
        outcome = ctx.index.record_instance(record)
    except SQLAlchemyError as exc:
        _discard(ctx, key, existed, ref)
        return OUT_OF_RESOURCES, f"index write failed ({type(exc).__name__})", None
    if outcome is RecordOutcome.CONFLICT:
        _discard(ctx, key, existed, ref)
        return (
            CONFLICTING_INSTANCE,
            "SOP Instance or Series UID already filed under another study/series",
            None,
        )
    return _Placed(stored, outcome)


def _data_set_offset(path: Path) -> int:
    """Return where the data set starts in a received file.

    The receiving side wrote the preamble, "DICM" and a File Meta group that
    starts with its group length (PS3.10 7.1), explicit VR little endian.
    """
    with path.open("rb") as f:
        head = f.read(144)
    if (
        len(head) < 144
        or head[128:132] != b"DICM"
        or head[132:138] != b"\x02\x00\x00\x00UL"
    ):
        raise ValueError("received file without a File Meta group length")
    return 144 + int.from_bytes(head[140:144], "little")


def _inflate(path: Path, start: int, limit: int) -> bytes | None:
    """Return a deflated data set inflated, or None past ``limit`` bytes.

    Inflated a chunk at a time, so that a data set of a few kilobytes that
    claims gigabytes (PS3.5 A.5, raw deflate) stops at the limit. The stream
    must end where the received data does, but for a few bytes some writers add
    (a pad to an even length, a gzip-style checksum and size: pydicom's test
    file has one).

    Raises
    ------
    zlib.error
        If the stream does not inflate, ends before the data does, or the data
        ends before the stream.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    total = 0
    with path.open("rb") as f:
        f.seek(start)
        chunk = f.read(_CHUNK)
        while True:
            out = inflater.decompress(chunk, _CHUNK)
            total += len(out)
            if total > limit:
                return None
            parts.append(out)
            if inflater.eof:
                break
            # A full output may leave more inside zlib: ask again, input or not.
            chunk = inflater.unconsumed_tail or f.read(_CHUNK)
            if not chunk and len(out) < _CHUNK:
                raise zlib.error("the deflated stream is cut short")
        if len(inflater.unused_data + f.read(_DEFLATE_TRAILER + 1)) > _DEFLATE_TRAILER:
            raise zlib.error("data follows the end of the deflated stream")
    return b"".join(parts)


# The Item tag (FFFE,E000), little and big endian (PS3.5 7.5).
_ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")
_ITEM_WEIGHT = 4


class _OverBudgetError(Exception):
    """A received data set holds more than the node reads to check it."""


class _TooManyElementsError(_OverBudgetError):
    """More element headers than ``[node] max_data_elements``."""


class _TooManyBytesError(_OverBudgetError):
    """More bytes of values read into memory than ``[node] max_in_memory_bytes``."""


class _Budget:
    """What one data set's readers may still read (they share it).

    ``left``: element headers; ``bytes_left``: bytes of values held in memory.
    """

    def __init__(self, elements: int, held_bytes: int) -> None:
        self.left = elements
        self.bytes_left = held_bytes
        self.holding = True

    @contextlib.contextmanager
    def not_holding(self) -> Iterator[None]:
        """Count no held bytes for the reads within (what they read is let go)."""
        self.holding = False
        try:
            yield
        finally:
            self.holding = True

    def spend_bytes(self, count: int) -> None:
        """Count ``count`` bytes of values held; raise once past the budget."""
        self.bytes_left -= count
        if self.bytes_left < 0:
            raise _TooManyBytesError

    def error(self) -> _OverBudgetError:
        """Return the error of a spent budget (a reader failed after spending it)."""
        return _TooManyElementsError() if self.left < 0 else _TooManyBytesError()

    @property
    def spent(self) -> bool:
        """Whether either budget is spent."""
        return self.left < 0 or self.bytes_left < 0


class _Counted:
    """Counts what pydicom's reader reads: element and item headers, values.

    pydicom reads each data element's and item's header with one 8-byte read
    (a value of 8 bytes counts too). An element costs up to ~300 bytes of
    memory once read, an item (a data set of its own) ~1.2 KB: an item counts
    as :data:`_ITEM_WEIGHT` elements. A longer read is a value (or a part of
    one): its bytes count against the budget's ``bytes_left`` (values of
    sequences of undefined length are all read, however long). Once either is
    spent, the read raises, so that the reader stops.
    """

    budget: _Budget

    def read(self, size: int | None = -1, /) -> bytes:
        data: bytes = super().read(size)  # type: ignore[misc]
        if size == 8:
            self.budget.left -= _ITEM_WEIGHT if data[:4] in _ITEM_TAGS else 1
            if self.budget.left < 0:
                raise _TooManyElementsError
        elif len(data) > 8 and self.budget.holding:
            # (pydicom's scan of an undefined-length value that is not
            # encapsulated data for its end reads 8 KiB blocks it lets go of:
            # counted all the same.)
            self.budget.spend_bytes(len(data))
        return data


class _CountedFile(_Counted, io.BufferedReader):
    def __init__(self, path: Path, budget: _Budget) -> None:
        # A str name: pydicom re-opens the file by it for a deferred value.
        super().__init__(io.FileIO(str(path)))
        self.budget = budget


class _CountedBytes(_Counted, io.BytesIO):
    def __init__(self, data: bytes, budget: _Budget) -> None:
        super().__init__(data)
        self.budget = budget


def _read_received(
    path: Path, body: bytes | None, limit: int, held_bytes: int
) -> Dataset:
    """Read a received data set to check it, within its budget of headers and bytes.

    Values longer than :data:`_DEFER_SIZE` (pixel data) stay on disk. A
    deflated data set is read from ``body``, inflated already (at most
    ``max_inflated_bytes``): Deflated Explicit VR Little Endian (PS3.5 A.5).
    Its sequences of defined length, which pydicom leaves as bytes until a
    value in one is read, are counted too (:func:`_count_sequences`), and so
    are the values left on disk here that are read when the image is scored
    or its results are built.

    Raises
    ------
    _TooManyElementsError
        Past ``limit`` element headers, as soon as it is passed.
    _TooManyBytesError
        Past ``held_bytes`` of values, as soon as it is passed.
    """
    budget = _Budget(limit, held_bytes)
    source: _CountedFile | _CountedBytes
    try:
        if body is not None:
            with _CountedBytes(body, budget) as source:
                ds = read_dataset(source, False, True, defer_size=_DEFER_SIZE)
                _count_sequences(ds, source)
        else:
            with _CountedFile(path, budget) as source:
                ds = dcmread(source, defer_size=_DEFER_SIZE)
                _count_sequences(ds, source)
    except Exception as exc:
        # pydicom turns what a read raises inside a sequence item into OSError.
        if isinstance(exc, _OverBudgetError) or not budget.spent:
            raise
        raise budget.error() from None
    return ds


# Sequences nested deeper are refused as not understood (0xC000), as pydicom
# refuses those it reads itself (its reader recurses: RecursionError).
_MAX_DEPTH = 64


# The VRs pydicom converts (PS3.5 6.2); an element of another is read, and fails
# where its value is read (NotImplementedError).
_KNOWN_VRS = frozenset(vr.value for vr in VR)


class _NotUnderstoodError(ValueError):
    """A received data set that pydicom would fail on where it is read (0xC000)."""


class _NestedTooDeepError(_NotUnderstoodError):
    """A received data set nests sequences deeper than :data:`_MAX_DEPTH`."""


def _count_sequences(ds: Dataset, source: _CountedFile | _CountedBytes) -> None:
    """Read every sequence pydicom left as bytes in ``ds``, nested ones too, counting.

    pydicom reads a sequence of defined length (and one of undefined length
    whose VR it learns later, a private one's) only when a value in it is
    read, and scoring and the result objects read the source's modules: a
    20 MB sequence of empty items once took the node up 1 GB and a minute of
    CPU there. Each is read from ``source`` where it lies, within its own
    bytes, its long values left there, and dropped. A public sequence that
    does not parse is refused (pydicom would fail on it wherever it is read,
    the results' copy of the source's modules included); a private one is
    kept as it came, its bytes counted as any value's (nothing of the node
    reads private elements, and a modality's private sequence that pydicom
    misreads must not cost the image).

    The values left on disk (longer than :data:`_DEFER_SIZE`) that are read
    later count against the budget's bytes too (:func:`_read_later`).

    Raises
    ------
    _TooManyElementsError, _TooManyBytesError
        Once the budget of ``source`` is spent.
    _NestedTooDeepError
        Past :data:`_MAX_DEPTH` levels.
    _NotUnderstoodError
        For a public sequence that does not parse, or a public element of a VR
        that is not one.
    """
    # Each data set with its depth, the lengths of the values of undefined
    # length pydicom passed over in it (:func:`_read_items`), and whether its
    # values were counted already (read as the bytes of a sequence it is in).
    pending: list[tuple[Dataset, int, dict[int, int], bool]] = [(ds, 0, {}, False)]
    while pending:
        current, depth, passed_over, counted = pending.pop()
        # items(): the elements as held, raw ones not converted.
        for _, elem in list(current.items()):
            items: list[tuple[Dataset, dict[int, int]]]
            within = counted
            if (
                isinstance(elem, RawDataElement)
                and elem.VR is not None
                and elem.VR not in _KNOWN_VRS
                and not elem.tag.is_private
            ):
                # pydicom reads it and fails where its value is read.
                raise _NotUnderstoodError(f"element {elem.tag} has an unknown VR")
            if not isinstance(elem, RawDataElement):
                if elem.VR != VR.SQ:
                    continue
                items = [(item, {}) for item in elem.value]  # read (and counted)
            elif elem.length == 0:
                continue
            elif not _is_sequence(elem, current):
                if elem.value is None and not counted:
                    source.budget.spend_bytes(
                        passed_over.get(elem.tag, _read_later(elem, depth))
                    )
                continue
            else:
                # Bytes read (and counted) with its data set, or within such
                # a sequence: its items' values are not counted again.
                within = counted or elem.value is not None
                try:
                    with (
                        source.budget.not_holding()
                        if within
                        else contextlib.nullcontext()
                    ):
                        items = _read_items(source, elem)
                except RecursionError:
                    # pydicom recurses into nested sequences: not read, so not
                    # counted, and not to be read later either.
                    raise _NestedTooDeepError("sequences nested too deep") from None
                except Exception as exc:
                    if isinstance(exc, _OverBudgetError):
                        raise
                    if source.budget.spent:
                        raise source.budget.error() from None
                    if not is_decode_error(exc):
                        raise
                    if not elem.tag.is_private:
                        raise _NotUnderstoodError(
                            f"sequence {elem.tag} does not parse ({type(exc).__name__})"
                        ) from None
                    if elem.value is None and not counted:
                        source.budget.spend_bytes(
                            passed_over.get(elem.tag, _read_later(elem, depth))
                        )
                    continue
            if items and depth == _MAX_DEPTH:
                raise _NestedTooDeepError(f"sequences nested over {_MAX_DEPTH} deep")
            pending.extend((item, depth + 1, found, within) for item, found in items)


def _read_later(elem: RawDataElement, depth: int) -> int:
    """Bytes of a value left on disk at receipt that are read into memory later.

    A stored instance is read with its top-level values up to
    :data:`~dicom_node.storage.STORED_DEFER_SIZE`
    (:func:`~dicom_node.storage.read_stored`: longer Pixel Data is decoded
    from the file, its length checked first; other longer values are left
    out); a sequence is read whole when it is used. A top-level value of
    undefined length (not a sequence: encapsulated data) was passed over
    without its length being kept: it counts as that size, the most read of
    it. In an item, such a value's length is where the next element starts
    (:func:`_read_items`).
    """
    if depth == 0:
        if elem.length == _UNDEFINED_LENGTH:
            return STORED_DEFER_SIZE
        return int(elem.length) if elem.length <= STORED_DEFER_SIZE else 0
    return int(elem.length)


class _Window:
    """The bytes ``[start, end)`` of a source, at the source's own offsets.

    pydicom reads a sequence's items from its value alone: an item that
    claims more never runs on into what follows. Reads pass through to the
    source (and its count); positions are the source's, so that the items'
    values can be found in it again.
    """

    def __init__(self, source: _CountedFile | _CountedBytes, start: int, end: int):
        self._source = source
        self._end = end
        source.seek(start)

    def read(self, size: int | None = -1, /) -> bytes:
        left = max(0, self._end - self._source.tell())
        return self._source.read(left if size is None or size < 0 else min(size, left))

    def seek(self, offset: int, whence: int = 0, /) -> int:
        return self._source.seek(offset, whence)

    def tell(self) -> int:
        return self._source.tell()


def _read_items(
    source: _CountedFile | _CountedBytes, sq: RawDataElement
) -> list[tuple[Dataset, dict[int, int]]]:
    """Read the items of a sequence pydicom left as bytes, where it lies in ``source``.

    As pydicom's read_sequence does when the value is read (a header that is
    not the Sequence Delimiter is an item), but from a window on ``source``:
    read_sequence reads every value of its items into memory, and a nested
    sequence would be copied once per level. pydicom's read_dataset reads each
    item, its values longer than :data:`_DEFER_SIZE` left where they lie;
    only the 8-byte item headers (PS3.5 7.5) are read here.
    """
    little = sq.is_little_endian
    if sq.length != _UNDEFINED_LENGTH:
        end = sq.value_tell + sq.length
    elif sq.value is not None:
        end = sq.value_tell + len(sq.value)
    else:  # left in the file: its end is its delimiter's place
        source.seek(sq.value_tell)
        with source.budget.not_holding():  # a scan for the delimiter keeps nothing
            read_undefined_length_value(source, little, SequenceDelimiterTag, 1)
        end = source.tell() - 8
    window = _Window(source, sq.value_tell, end)
    header = "<HHL" if little else ">HHL"
    items = []
    while window.tell() < end:
        group, element, length = struct.unpack(header, window.read(8))
        if (group, element) == (0xFFFE, 0xE0DD):  # Sequence Delimiter: the end
            break
        if (group, element) != (0xFFFE, 0xE000):  # read as an item all the same
            source.budget.left -= _ITEM_WEIGHT - 1
        item = read_dataset(
            window,  # type: ignore[arg-type]
            sq.is_implicit_VR,
            little,
            None if length == _UNDEFINED_LENGTH else length,
            defer_size=_DEFER_SIZE,
            at_top_level=False,
        )
        items.append((item, _passed_over(item, window.tell())))
        if source.budget.spent:
            raise source.budget.error()
    return items


def _passed_over(item: Dataset, end: int) -> dict[int, int]:
    """Return the lengths of the values of undefined length pydicom passed over.

    pydicom scans such a value (encapsulated data) for its end and keeps no
    length: it reaches to where the next element starts (or the item ends at
    ``end``), a few header bytes over. By tag.
    """
    raws = sorted(
        (e for _, e in item.items() if isinstance(e, RawDataElement)),
        key=lambda e: e.value_tell,
    )
    starts = [e.value_tell for e in raws[1:]] + [end] * bool(raws)
    return {
        int(raw.tag): max(0, start - raw.value_tell)
        for raw, start in zip(raws, starts, strict=True)
        if raw.value is None and raw.length == _UNDEFINED_LENGTH
    }


def _is_sequence(raw: RawDataElement, ds: Dataset) -> bool:
    """Whether pydicom reads ``raw`` as a sequence (its VR as pydicom finds it)."""
    if raw.VR is not None and raw.VR != VR.UN:  # explicit: as it says
        return bool(raw.VR == VR.SQ)
    if raw.VR is None and not raw.tag.is_private:
        try:
            return dictionary_VR(raw.tag) == VR.SQ
        except KeyError:  # an unknown tag: pydicom keeps its bytes
            return False
    found: dict[str, Any] = {}
    hooks.raw_element_vr(raw, found, ds=ds)
    return found.get("VR") == VR.SQ


def _discard(ctx: StoreContext, key: InstanceKey, existed: bool, ref: str) -> None:
    # Not acknowledged and not indexed: leave nothing behind. A file that was
    # there before this write belongs to an earlier, acknowledged copy.
    if existed:
        return
    try:
        ctx.storage.remove(key)
    except StorageError as exc:
        logger.error("instance %s: cannot remove unindexed file (%s)", ref, exc)


def _structure_problem(ds: Dataset, data_size: int) -> str:
    """Return why a received data set is incomplete, or an empty string.

    pydicom reads a truncated data set without raising: it keeps the short value
    of the last element, or stops at a partial tag. Every top-level element of
    defined length must lie within the data (``data_size`` bytes: the file, or a
    deflated data set inflated) and hold exactly its length, and the elements
    must end where the data ends.
    """
    end = 0
    for tag in sorted(ds.keys()):
        # keep_deferred: a large value (pixel data) stays on disk.
        elem = cast(
            "DataElement | RawDataElement", ds.get_item(tag, keep_deferred=True)
        )
        if not isinstance(elem, RawDataElement):
            end = -1  # a parsed sequence: its end is not known here
            continue
        if elem.length == _UNDEFINED_LENGTH:
            if elem.value is None:
                end = -1  # deferred: found whole, its end is not kept
                continue
            size = len(elem.value) + 8  # value and its delimitation item
        else:
            if elem.value is not None and len(elem.value) != elem.length:
                return (
                    f"data set truncated: element {elem.tag} holds "
                    f"{len(elem.value)} of {elem.length} bytes"
                )
            size = elem.length
            if elem.value_tell + size > data_size:
                return (
                    f"data set truncated: element {elem.tag} ends past the "
                    "received data"
                )
        if end >= 0:
            end = max(end, elem.value_tell + size)
    if end < 0:
        return ""
    if end != data_size:
        return f"data set has {data_size - end} bytes that are not a whole element"
    return ""


class _SupportedContext(PresentationContext):
    """A supported context that deep-copies without copying its UIDs.

    pynetdicom deep-copies the server's supported contexts for every incoming
    association. The node supports every storage class with every transfer
    syntax (~6,700 UIDs), and copying a UID validates it again: ~40 ms of CPU
    and GIL per association, which a modality sending one study per
    association pays per study. UIDs are immutable strings, so the copy shares
    them and only its lists are new.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> PresentationContext:
        copy = PresentationContext()
        copy.__dict__.update(self.__dict__)
        copy._transfer_syntax = list(self._transfer_syntax)
        return copy


# _SupportedContext copies pynetdicom's private PresentationContext._transfer_syntax,
# as pynetdicom 3.0 has it; on another version the contexts are left as they are.
_CONTEXT_COPY = pynetdicom_version.startswith("3.0.")


def _supported(context: PresentationContext) -> PresentationContext:
    if not _CONTEXT_COPY:
        return context
    shared = _SupportedContext()
    shared.__dict__.update(context.__dict__)
    shared._transfer_syntax = list(context._transfer_syntax)
    return shared


class _NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server behind the node's connection gate.

    The gate (:class:`dicom_node.gate.ConnectionGate`) accepts every connection
    and hands over only those whose A-ASSOCIATE-RQ is whole and allowed; then
    pynetdicom runs the association as usual. Optionally shares its port with
    other receiving processes (SO_REUSEPORT).
    """

    # The listen backlog: a burst of connections waits here, not refused.
    request_queue_size = 128

    def __init__(
        self,
        *args: Any,
        reuse_port: bool = False,
        gate: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._reuse_port = reuse_port
        super().__init__(*args, **kwargs)
        self.contexts = [_supported(cx) for cx in self.contexts]
        if self.socket is None:
            raise TypeError("the server has no listening socket")
        self.gate = ConnectionGate(
            self.socket, admit=self.process_request, **(gate or {})
        )

    def server_bind(self) -> None:
        """Bind, letting several receiving processes share the port when asked."""
        if self._reuse_port and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept connections through the gate until :meth:`shutdown`."""
        self.gate.serve_forever()

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket."""
        # Not pynetdicom's shutdown: it expects the server in the AE's own list.
        self.gate.stop()
        self.server_close()


def check_caller(
    config: NodeConfig, calling_ae_title: str, called_ae_title: str, address: str
) -> GateDecision:
    """Decide on an association request from its AE titles and source address.

    Parameters
    ----------
    config
        The node configuration (its AE title and allow-list).
    calling_ae_title
        The calling AE title, without padding.
    called_ae_title
        The called AE title, without padding.
    address
        The peer's IP address.

    Returns
    -------
    GateDecision
        Admit, or reject with the A-ASSOCIATE-RJ reason (PS3.8 9.3.4).
    """
    if called_ae_title != config.ae_title:
        return GateDecision(
            "called AE title not recognized", RJ_CALLED_AE_NOT_RECOGNIZED
        )
    if not config.caller_allowed(calling_ae_title, address):
        return GateDecision(
            "calling AE title or address not on the allow-list",
            RJ_CALLING_AE_NOT_RECOGNIZED,
        )
    return GateDecision()


def audit_refusal(index: IndexDB, refusal: Refusal) -> None:
    """Write a refused connection to the audit table; never raises.

    Parameters
    ----------
    index
        The index database.
    refusal
        What was refused and why.
    """
    try:
        index.open_association(
            refusal.calling_ae_title[:16],
            refusal.called_ae_title[:16],
            refusal.address,
            refusal.port,
            rejected_reason=refusal.reason[:200],
        )
    except SQLAlchemyError as exc:
        logger.warning("could not audit a refused connection: %s", type(exc).__name__)


def build_ae(config: NodeConfig) -> AE:
    """Return the node's AE: Verification plus every storage SOP class, any syntax.

    Parameters
    ----------
    config
        The node configuration.

    Returns
    -------
    pynetdicom.AE
        The configured, not yet listening, application entity.
    """
    quiet_pynetdicom()
    # The receiving path relies on pynetdicom 3's: EVT_PDU_RECV before the DIMSE
    # layer keeps a PDU, data sets spooled in tempfile's folder, the connection
    # read through AssociationSocket.socket. Another major version is checked
    # first.
    if not pynetdicom_version.startswith("3."):
        raise DicomNodeError(
            f"pynetdicom {pynetdicom_version} is not supported: install pynetdicom 3"
        )
    # Data sets go to a file in the spool as they arrive, never whole in memory;
    # the handler then renames the file into storage.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom aborts the association of a request with a UID over 64
    # characters; the node checks a C-STORE's UIDs itself and answers 0xC001.
    _config.VALIDATORS["UI"] = _uid_checked_by_the_node
    ae = AE(ae_title=config.ae_title)
    # Associations name this project (PS3.7 D.3.3.2), not the library.
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu
    ae.acse_timeout = config.acse_timeout
    ae.network_timeout = config.idle_timeout
    # handle_requested checks the called AE title and the allow-list (with source
    # addresses) and audits each rejection. pynetdicom's own AE title checks run
    # after it as a second line: an error in a notification handler is only
    # logged, and the allow-list must not fail open.
    ae.require_called_aet = True
    if not config.allow_any_caller:
        ae.require_calling_aet = sorted({c.ae_title for c in config.callers})
    ae.add_supported_context(VERIFICATION_SOP_CLASS, AllTransferSyntaxes)
    for sop_class_uid in accepted_sop_classes():
        ae.add_supported_context(sop_class_uid, AllTransferSyntaxes)
    return ae


def accepted_sop_classes() -> list[str]:
    """Return the storage SOP classes the node's AE accepts (any transfer syntax).

    Those of :func:`storage_sop_classes` that pynetdicom's Storage service
    handles (a class it cannot be taught is left out, refused at negotiation).
    """
    return [uid for uid in storage_sop_classes() if _stored_by_pynetdicom(uid)]


def _stored_by_pynetdicom(sop_class_uid: str) -> bool:
    """Make pynetdicom's C-STORE service handle a storage class it does not know.

    pynetdicom aborts an association that sends an instance of a SOP class it
    maps to no service class (its retired storage classes, such as Ultrasound
    Image Storage 1.2.840.10008.5.1.4.1.1.6); its ``register_uid`` maps one to
    the Storage Service Class, under pydicom's keyword for the UID. False when
    that cannot be done: the class is then refused at negotiation, not aborted.
    """
    if uid_to_service_class(sop_class_uid) is not ServiceClass:
        return True  # pynetdicom knows it
    keyword = UID(sop_class_uid).keyword
    if not keyword or hasattr(pynetdicom_sop_class, keyword):
        return False  # a keyword pynetdicom uses for another UID stays its own
    register_uid(sop_class_uid, keyword, StorageServiceClass)
    return True


def storage_sop_classes() -> list[str]:
    """Return the storage SOP classes the node accepts, retired ones included.

    pynetdicom's AllStoragePresentationContexts leaves out storage classes
    that its StoragePresentationContexts (the 120 a requestor can propose)
    still lists: the retired Ultrasound Image Storage (1.2.840.10008.5.1.4.1.1.6)
    and Ultrasound Multi-frame Image Storage (1.2.840.10008.5.1.4.1.1.3) that
    old ultrasound archives send, the retired NM, XA Bi-Plane and VL trial
    classes, and retired print and standalone objects. dcmtk's storescp accepts
    them; so does the node. The limit of 128 presentation contexts (odd IDs
    1-255, PS3.8 9.3.2.2) binds what a requestor proposes, not what an acceptor
    supports.

    Returns
    -------
    list of str
        SOP Class UIDs, each once, in pynetdicom's order.
    """
    uids: dict[str, None] = {}
    for cx in (*AllStoragePresentationContexts, *StoragePresentationContexts):
        if cx.abstract_syntax is not None:
            uids.setdefault(str(cx.abstract_syntax), None)
    return list(uids)


class _SpoolSweeper(Loop):
    """Sweeps the spool when due, in a thread of the node's loop class."""

    def __init__(self, ctx: StoreContext) -> None:
        super().__init__("spool-sweep", ctx.index, idle=0.5)
        self.ctx = ctx

    def step(self) -> bool:
        """Sweep the spool if it is due."""
        self.ctx.sweep_if_due()
        return False


class Receiver:
    """One receiving process's SCP: an AE, its server thread and handler context.

    Parameters
    ----------
    config
        The node configuration.
    index
        The index database.
    port
        The port to listen on; ``config.port`` when None.
    reuse_port
        Share the port with other receiving processes (SO_REUSEPORT).
    ssl_context
        When set, the port speaks DICOM TLS only (PS3.15 B.1); by default,
        from the configuration's ``[tls]`` table.

    Raises
    ------
    ListenError
        If the port cannot be bound: in use, privileged, or an address that is
        not this machine's; the message names the address and port.
    """

    def __init__(
        self,
        config: NodeConfig,
        index: IndexDB,
        port: int | None = None,
        reuse_port: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        if ssl_context is None and config.tls is not None:
            ssl_context = server_context(config.tls)
        storage = Storage(config.storage_dir)
        self.ctx = StoreContext(config, storage, index)
        self.ae = build_ae(config)
        # pynetdicom spools received data sets in the temporary folder; in the
        # spool, on the storage's file system, a stored instance is a rename.
        self._tempdir = tempfile.tempdir
        tempfile.tempdir = str(storage.spool)
        handlers: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, handle_requested, [self.ctx]),
            (evt.EVT_RELEASED, handle_released, [self.ctx]),
            (evt.EVT_ABORTED, handle_aborted, [self.ctx]),
            (evt.EVT_CONN_CLOSE, handle_conn_close, [self.ctx]),
            (evt.EVT_PDU_RECV, handle_pdu_recv, [self.ctx]),
            (evt.EVT_DIMSE_RECV, handle_dimse_recv, [self.ctx]),
            (evt.EVT_C_ECHO, handle_echo, [self.ctx]),
            (evt.EVT_C_STORE, handle_store, [self.ctx]),
        ]
        address = (config.host, config.port if port is None else port)
        gate = {
            "check": lambda calling, called, host: check_caller(
                config, calling, called, host
            ),
            "limits": PduLimits(config.max_pdu, config.idle_timeout),
            "acse_timeout": config.acse_timeout,
            "max_connections_per_host": config.max_connections_per_host,
            "max_pending": min(4 * config.max_associations, 256),
            "ssl_context": ssl_context,
            "audit": lambda refusal: audit_refusal(index, refusal),
            "on_closed": self.ctx.sweep_soon,
        }
        try:
            server = self.ae.make_server(
                address,
                evt_handlers=handlers,
                server_class=_NodeServer,
                reuse_port=reuse_port,
                gate=gate,
            )
        except BaseException as exc:
            tempfile.tempdir = self._tempdir
            storage.close()
            if isinstance(exc, OSError):
                # The bind failed: the port is taken, privileged, or not ours.
                raise ListenError.from_os_error(address[0], address[1], exc) from exc
            raise
        if not isinstance(server, _NodeServer):
            raise TypeError(f"expected a _NodeServer, got {type(server).__name__}")
        self.server: _NodeServer = server
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="dicom-node-scp",
            daemon=True,
        )
        # Cleaning up after ended associations writes to the index: never on
        # the accepting thread, which must not wait for a locked index.
        self._sweeper = _SpoolSweeper(self.ctx)

    @property
    def port(self) -> int:
        """Return the port actually listened on."""
        return int(self.server.server_address[1])

    def alive(self) -> bool:
        """Return whether the SCP's server thread runs."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start accepting associations."""
        self._thread.start()
        self._sweeper.start()

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let running associations finish, then abort the rest.

        Parameters
        ----------
        grace
            Seconds to wait for running associations before aborting them. An
            aborted C-STORE was never acknowledged, so the sender sends it again.
        """
        self.server.shutdown()
        deadline = time.monotonic() + grace
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            assoc.abort()
        self._thread.join(timeout=5)
        self._sweeper.stop(timeout=5)
        if tempfile.tempdir == str(self.ctx.storage.spool):
            tempfile.tempdir = self._tempdir
        self.ctx.storage.close()
