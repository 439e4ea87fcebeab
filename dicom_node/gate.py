"""The connection gate: bounded cost before association, per-PDU limits after it."""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ

from dicom_node import metrics
from dicom_node.dimse import DECODE_ERRORS, READER_ERRORS
from dicom_node.log import RateLimiter, describe_exception

__all__ = [
    "ASSOCIATE_RQ_MAX",
    "RJ_CALLED_AE_NOT_RECOGNIZED",
    "RJ_CALLING_AE_NOT_RECOGNIZED",
    "ConnectionGate",
    "GateDecision",
    "GuardedSSLSocket",
    "GuardedSocket",
    "HostSlots",
    "PduLimits",
    "Receipt",
    "Refusal",
]

logger = logging.getLogger(__name__)

# PDU types, PS3.8 9.3.1.
_ASSOCIATE_RQ = 0x01
_ASSOCIATE_AC = 0x02
_ASSOCIATE_RJ = 0x03
_P_DATA_TF = 0x04
_ABORT = 0x07

# An A-ASSOCIATE-RQ of 128 presentation contexts, each proposing a dozen
# transfer syntaxes, is about 45 KB; nothing legitimate comes near this cap.
ASSOCIATE_RQ_MAX = 256 * 1024
# How long a plain connection whose request stopped growing rests before the
# gate looks at it again.
_REST = 0.05
# PDU header (6) + protocol version (2) + reserved (2) + called and calling AE
# titles (16 each) + reserved (32): what identifies the caller (PS3.8 9.3.2).
_RQ_FIXED = 74
# Presentation context IDs are odd numbers 1..255 (PS3.8 9.3.2.2): 128 at most.
_MAX_CONTEXTS = 128
# Transfer syntaxes proposed in all, over every context: 40 each for 128, every
# transfer syntax pydicom knows (39) for every context, as some senders do.
_MAX_TRANSFER_SYNTAXES = 5120
# Items and sub-items of any kind (each decodes at the same cost): the contexts
# above with their abstract syntaxes, and a few hundred more (User Information:
# role selections, extended negotiation...).
_MAX_RQ_ITEMS = 6000
# Refused connections logged (and audited) one by one: 5 a minute from each
# source, at most this many a minute from all; the rest counted, and summarised
# once a minute for this many sources with the most, the others in one line.
_NOTED_A_MINUTE = 100
_SUMMARISED_SOURCES = 10
# A-ASSOCIATE-RJ, A-RELEASE-RQ/-RP and A-ABORT carry 4 bytes (PS3.8 9.3.4-9.3.8).
_SMALL_PDU_MAX = 64

# A-ASSOCIATE-RJ and A-ABORT fields, PS3.8 9.3.4 and 9.3.8.
_RJ_PERMANENT = 0x01
_RJ_SOURCE_SERVICE_USER = 0x01
RJ_CALLING_AE_NOT_RECOGNIZED = 0x03
RJ_CALLED_AE_NOT_RECOGNIZED = 0x07
_ABORT_SOURCE_PROVIDER = 0x02
_ABORT_UNRECOGNIZED_PDU = 0x01
_ABORT_INVALID_PARAMETER = 0x06

# Failures of the TLS handshake or of reading a hostile stream.
_CONNECTION_ERRORS = (OSError, ssl.SSLError, ValueError)
# What pynetdicom's PDU decoder raises on a malformed request: what a decoder
# raises on bad data, and AssertionError (it checks item lengths with assert).
# pynetdicom's PDU decoding raises these too on malformed bytes; the gate
# refuses such a request rather than let it end the gate's thread.
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    AssertionError,
    *DECODE_ERRORS,
    *READER_ERRORS,
)


@dataclass(frozen=True, slots=True)
class PduLimits:
    """What a connection may send once it is past the gate.

    Parameters
    ----------
    max_pdu
        Largest P-DATA-TF PDU length accepted.
    pdu_seconds
        Most seconds one PDU may take to arrive once its first byte has.
    """

    max_pdu: int
    pdu_seconds: float

    def problem(self, pdu_type: int, length: int) -> tuple[str, int] | None:
        """Return why a PDU header is refused, with the A-ABORT reason, or None."""
        if pdu_type == _P_DATA_TF:
            if length > self.max_pdu:
                return (
                    f"P-DATA-TF PDU of {length} bytes exceeds max_pdu {self.max_pdu}",
                    _ABORT_INVALID_PARAMETER,
                )
            return None
        if pdu_type in (_ASSOCIATE_RQ, _ASSOCIATE_AC):
            if length > ASSOCIATE_RQ_MAX:
                return (
                    f"association PDU of {length} bytes exceeds {ASSOCIATE_RQ_MAX}",
                    _ABORT_INVALID_PARAMETER,
                )
            return None
        if _ASSOCIATE_RJ <= pdu_type <= _ABORT:
            if length > _SMALL_PDU_MAX:
                return (
                    f"PDU type 0x{pdu_type:02X} of {length} bytes",
                    _ABORT_INVALID_PARAMETER,
                )
            return None
        return f"unknown PDU type 0x{pdu_type:02X}", _ABORT_UNRECOGNIZED_PDU


def _abort_bytes(reason: int) -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = _ABORT_SOURCE_PROVIDER
    pdu.reason_diagnostic = reason
    return pdu.encode()


def _reject_bytes(diagnostic: int) -> bytes:
    pdu = A_ASSOCIATE_RJ()
    pdu.result = _RJ_PERMANENT
    pdu.source = _RJ_SOURCE_SERVICE_USER
    pdu.reason_diagnostic = diagnostic
    return pdu.encode()


@dataclass(slots=True)
class Receipt:
    """What the receiving side keeps of the DIMSE message now arriving.

    Parameters
    ----------
    command
        The command set's fragments so far (small: it is capped).
    data_bytes
        Data set bytes so far.
    spooled
        Whether its data set goes to a file (a C-STORE request), once the
        command set is whole; None before.
    dropped
        Why the data set's fragments are being dropped (no room to write them,
        or it is over ``max_instance_bytes``); empty while none are.
    dropped_messages
        Why, for the completed messages whose data sets were dropped, by their
        spool file (or Message ID; see ``dicom_node.scp``).
    contexts
        The IDs of the association's accepted presentation contexts, once known.
    fragments
        Command and data set fragments (PDVs) so far.
    """

    command: bytearray = field(default_factory=bytearray)
    data_bytes: int = 0
    fragments: int = 0
    spooled: bool | None = None
    dropped: str = ""
    dropped_messages: dict[str, str] = field(default_factory=dict)
    contexts: frozenset[int] | None = None

    def next_message(self) -> None:
        """Start over for the next message (the dropped IDs stay)."""
        self.command = bytearray()
        self.data_bytes = 0
        self.fragments = 0
        self.spooled = None
        self.dropped = ""


class _PduGuard:
    """Per-PDU limits on what a reader of the connection receives.

    pynetdicom reads each PDU as a 6-byte header, then its body. This layer sits
    under those reads: it checks each header before handing it on (type and
    length against :class:`PduLimits`), gives each PDU ``pdu_seconds`` to arrive
    once its first byte has (a sender trickling bytes is cut off, however
    steadily it trickles), and ends the connection with an A-ABORT on the first
    violation. After that, reads return end-of-stream, which is how a closed
    connection looks to the reader.
    """

    _limits: PduLimits
    _release: weakref.finalize[Any, Any] | None
    _on_violation: Callable[[str], None] | None
    _prefix: bytes
    _header: bytearray
    _out: bytes
    _body_left: int
    _deadline: float
    _violation: str | None
    _poller: Any
    # The DIMSE message now arriving, as the receiving side watches it.
    receipt: Receipt

    def _guard_init(
        self,
        limits: PduLimits,
        *,
        prefix: bytes = b"",
        on_close: Callable[[], None] | None = None,
        on_violation: Callable[[str], None] | None = None,
    ) -> None:
        self._limits = limits
        # Runs once: at close, or when the socket is collected unclosed
        # (pynetdicom skips close() when shutdown() fails on a reset peer).
        self._release = None if on_close is None else weakref.finalize(self, on_close)
        self._on_violation = on_violation
        self._prefix = prefix
        self._header = bytearray()
        self._out = b""
        self._body_left = 0
        self._deadline = 0.0
        self._violation = None
        self.receipt = Receipt()
        self._poller = select.poll()
        self._poller.register(self._fd(), select.POLLIN)

    # What the subclasses provide.
    def _fd(self) -> int:
        raise NotImplementedError

    def _try_recv(self, size: int, *, waited: bool) -> bytes | None:
        # Up to size bytes, or None when none is there yet (after a wait that
        # found the socket readable, read even if it means blocking briefly).
        raise NotImplementedError

    def _raw_abort(self, data: bytes) -> None:
        raise NotImplementedError

    def refuse(self, reason: str) -> None:
        """End the connection: send an A-ABORT now; reads return end-of-stream.

        Parameters
        ----------
        reason
            Why, for the log (no patient data).
        """
        if self._violation is None:
            self._violation = reason
            self._abort(reason, _ABORT_INVALID_PARAMETER)

    @property
    def violation(self) -> str | None:
        """Return why the connection was ended, or None."""
        return self._violation

    def _abort(self, reason: str, diagnostic: int) -> None:
        self._violation = reason
        with contextlib.suppress(*_CONNECTION_ERRORS):
            self._raw_abort(_abort_bytes(diagnostic))
        if self._on_violation is not None:
            self._on_violation(reason)

    def _wait(self) -> bool:
        # Wait for data until the current PDU's deadline; False when it passed.
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            return False
        return bool(self._poller.poll(max(1, int(remaining * 1000) + 1)))

    def _take(self, size: int) -> bytes:
        if self._prefix:
            head, self._prefix = self._prefix[:size], self._prefix[size:]
            return head
        # Read first, wait only when nothing is there: one system call per
        # chunk while a data set streams in.
        chunk = self._try_recv(size, waited=False)
        while chunk is None:
            if not self._wait():
                return b""
            chunk = self._try_recv(size, waited=True)
        return chunk

    def guarded_recv(self, size: int) -> bytes:
        """Return up to ``size`` bytes of the current PDU, or b"" once ended."""
        if self._violation is not None or size <= 0:
            return b""
        if self._out:
            chunk, self._out = self._out[:size], self._out[size:]
            return chunk
        if self._body_left == 0:
            # A new PDU: its first byte is here (the reader polled for it).
            if not self._header:
                self._deadline = time.monotonic() + self._limits.pdu_seconds
            while len(self._header) < 6:
                chunk = self._take(6 - len(self._header))
                if not chunk:
                    return self._ended("PDU header")
                self._header += chunk
            pdu_type, _, length = struct.unpack(">BBL", self._header)
            problem = self._limits.problem(pdu_type, length)
            if problem is not None:
                self._abort(*problem)
                return b""
            self._out, self._header = bytes(self._header), bytearray()
            self._body_left = length
            chunk, self._out = self._out[:size], self._out[size:]
            return chunk
        chunk = self._take(min(size, self._body_left))
        if not chunk:
            return self._ended("PDU body")
        self._body_left -= len(chunk)
        return chunk

    def _ended(self, where: str) -> bytes:
        if time.monotonic() >= self._deadline and self._violation is None:
            self._abort(
                f"{where} not received within {self._limits.pdu_seconds:g} s",
                _ABORT_INVALID_PARAMETER,
            )
        return b""

    def _closing(self) -> None:
        # A TLS connection closed in the gate was never handed over.
        release = getattr(self, "_release", None)
        if release is not None:
            release()


class GuardedSocket(_PduGuard, socket.socket):
    """A plain TCP connection handed to pynetdicom, with per-PDU limits."""

    def _fd(self) -> int:
        return self.fileno()

    def _try_recv(self, size: int, *, waited: bool) -> bytes | None:
        try:
            return socket.socket.recv(self, size, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None

    def _raw_abort(self, data: bytes) -> None:
        socket.socket.send(self, data, socket.MSG_DONTWAIT)
        socket.socket.shutdown(self, socket.SHUT_RDWR)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Receive within the node's per-PDU limits (see :class:`_PduGuard`)."""
        if flags:
            return socket.socket.recv(self, bufsize, flags)
        left = self._body_left
        if left and not self._out and self._violation is None:
            # Inside a PDU whose header passed, with bytes at hand: one call (a
            # data set streams in 4 KB reads). With none at hand, the guarded
            # path waits, and cuts off a PDU that overruns its time.
            try:
                chunk = socket.socket.recv(
                    self, min(bufsize, left), socket.MSG_DONTWAIT
                )
            except (BlockingIOError, InterruptedError):
                return self.guarded_recv(bufsize)
            self._body_left = left - len(chunk)
            return chunk
        return self.guarded_recv(bufsize)

    def shutdown(self, how: int) -> None:
        """Shut down, ignoring a connection the peer has already reset."""
        # pynetdicom calls shutdown() then close() in one try: a reset peer
        # would otherwise leave the socket unclosed.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self, how)

    def close(self) -> None:
        """Close the connection and release its place in the per-host count."""
        try:
            socket.socket.close(self)
        finally:
            self._closing()


class GuardedSSLSocket(_PduGuard, ssl.SSLSocket):
    """A TLS connection handed to pynetdicom, with per-PDU limits.

    The gate has already read (decrypted) the A-ASSOCIATE-RQ to check it; those
    bytes are given back first, and counted in :meth:`pending` so that a reader
    that polls the socket sees them.
    """

    def _fd(self) -> int:
        return self.fileno()

    def _try_recv(self, size: int, *, waited: bool) -> bytes | None:
        # Decrypted bytes at hand, or a readable socket: a record may still be
        # partial, so this read can block, for at most the socket's timeout.
        if waited or ssl.SSLSocket.pending(self):
            return ssl.SSLSocket.recv(self, size)
        return None

    def _raw_abort(self, data: bytes) -> None:
        ssl.SSLSocket.send(self, data)
        socket.socket.shutdown(self, socket.SHUT_RDWR)

    def pending(self) -> int:
        """Return the decrypted bytes readable without waiting."""
        return len(self._prefix) + len(self._out) + ssl.SSLSocket.pending(self)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        """Receive within the node's per-PDU limits (see :class:`_PduGuard`)."""
        return self.guarded_recv(buflen)

    def shutdown(self, how: int) -> None:
        """Shut down, ignoring a connection the peer has already reset."""
        with contextlib.suppress(OSError):
            ssl.SSLSocket.shutdown(self, how)

    def close(self) -> None:
        """Close the connection and release its place in the per-host count."""
        try:
            ssl.SSLSocket.close(self)
        finally:
            self._closing()


@dataclass(frozen=True, slots=True)
class Refusal:
    """A connection the gate turned away, for the audit trail.

    Parameters
    ----------
    address
        The peer's IP address.
    port
        The peer's TCP port.
    reason
        Why (no patient data; AE titles are escaped by the log).
    calling_ae_title
        The calling AE title, when the request got that far.
    called_ae_title
        The called AE title, when the request got that far.
    """

    address: str
    port: int
    reason: str
    calling_ae_title: str = ""
    called_ae_title: str = ""


@dataclass(frozen=True, slots=True)
class GateDecision:
    """What the gate's check of an A-ASSOCIATE-RQ's fixed part concluded.

    Parameters
    ----------
    reason
        None to admit; else why the request is rejected.
    diagnostic
        The A-ASSOCIATE-RJ reason (PS3.8 9.3.4) when rejected.
    """

    reason: str | None = None
    diagnostic: int = 0


def _count_problem(data: bytes) -> str:
    """Return why an A-ASSOCIATE-RQ proposes too much to decode, or "".

    Decoding costs ~20 us a sub-item (a 176 KB request of 128 contexts of 64
    transfer syntaxes: 176 ms of the gate thread, which every new connection
    waits on). Counted from the items' headers (PS3.8 9.3.2); a length that
    does not add up is left to the decoder to refuse.
    """
    contexts = syntaxes = items = 0
    at = _RQ_FIXED
    while at + 4 <= len(data):
        kind, length = data[at], int.from_bytes(data[at + 2 : at + 4], "big")
        end = at + 4 + length
        items += 1
        # A Presentation Context (an ID, then sub-items) or User Information.
        if kind in (0x20, 0x50):
            contexts += kind == 0x20
            sub = at + (8 if kind == 0x20 else 4)
            while sub + 4 <= min(end, len(data)):
                syntaxes += data[sub] == 0x40
                items += 1
                sub += 4 + int.from_bytes(data[sub + 2 : sub + 4], "big")
        at = end
    if items > _MAX_RQ_ITEMS:
        return f"holds {items} items (at most {_MAX_RQ_ITEMS})"
    if contexts > _MAX_CONTEXTS:
        return f"proposes {contexts} presentation contexts (at most {_MAX_CONTEXTS})"
    if syntaxes > _MAX_TRANSFER_SYNTAXES:
        return (
            f"proposes {syntaxes} transfer syntaxes "
            f"(at most {_MAX_TRANSFER_SYNTAXES} in all)"
        )
    return ""


def _request_problem(request: A_ASSOCIATE_RQ) -> str:
    """Return what a decoded A-ASSOCIATE-RQ lacks (PS3.8 9.3.2), or ""."""
    if not request.application_context_name:
        return "without an Application Context"
    contexts = request.presentation_context
    if not contexts:
        return "without a Presentation Context"
    for context in contexts:
        if context.context_id is None or not context.abstract_syntax:
            return "with a Presentation Context without an abstract syntax"
        if not context.transfer_syntax:
            return "with a Presentation Context without a transfer syntax"
    if request.user_information is None:
        return "without User Information"
    return ""


def source_host(address: str) -> str:
    """Return what a connection's source address counts under, as one host.

    An IPv4 address is itself; an IPv6 one is its /64 (the prefix one host or
    site is given: its 2^64 addresses would otherwise each be a host of their
    own, and the per-host limits nothing).

    Parameters
    ----------
    address
        The peer's IP address, as the socket gives it.

    Returns
    -------
    str
        The address, or ``"<prefix>/64"`` for IPv6.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


class HostSlots:
    """Connections held per source host (:func:`source_host`), at most ``most`` each.

    Thread-safe.

    Parameters
    ----------
    most
        Connections one host may hold at once.
    """

    def __init__(self, most: int) -> None:
        self.most = most
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, address: str) -> bool:
        """Count one more connection from ``address``; False (not counted) when full."""
        host = source_host(address)
        with self._lock:
            held = self._held.get(host, 0)
            if held >= self.most:
                return False
            self._held[host] = held + 1
            return True

    def release(self, address: str) -> None:
        """Count one connection from ``address`` fewer."""
        host = source_host(address)
        with self._lock:
            held = self._held.get(host, 0) - 1
            if held > 0:
                self._held[host] = held
            else:
                self._held.pop(host, None)

    def held(self, key: str) -> int:
        """Return how many connections a host holds (a :func:`source_host` name)."""
        with self._lock:
            return self._held.get(key, 0)


@dataclass(eq=False)
class _Pending:
    sock: socket.socket
    address: str
    port: int
    deadline: float
    tls: bool
    phase: str = "header"  # handshake, header, body
    need: int = _RQ_FIXED
    buffer: bytearray = field(default_factory=bytearray)
    calling: str = ""
    called: str = ""
    done: bool = False
    peeked: int = 0  # bytes of the request seen at the last look (plain)
    resting_until: float = 0.0  # when a resting connection is looked at again


class ConnectionGate:
    """Accepts connections and holds each one until its A-ASSOCIATE-RQ is whole.

    One thread and one epoll set serve every connection that has not associated:
    it costs no CPU while they are silent, holds no association slot, reads no
    more than :data:`ASSOCIATE_RQ_MAX` bytes (on a plain connection it only
    peeks: the bytes stay in the kernel until pynetdicom reads them), and closes
    a connection that has not sent its whole request within ``acse_timeout``.
    A request whose called AE title, calling AE title or source address is not
    allowed is rejected (A-ASSOCIATE-RJ) here, before pynetdicom sees it. Each
    source address may hold ``max_connections_per_host`` connections, pending or
    associated; beyond ``max_pending`` waiting connections the oldest is closed.

    Parameters
    ----------
    listener
        The bound, listening socket.
    check
        Decides on (calling AE title, called AE title, address).
    admit
        Takes an admitted connection (a :class:`GuardedSocket` or
        :class:`GuardedSSLSocket`) and the peer's address tuple.
    limits
        Per-PDU limits for admitted connections.
    acse_timeout
        Seconds a connection has to send its whole A-ASSOCIATE-RQ.
    max_connections_per_host
        Connections one address may hold open at once.
    max_pending
        Connections that may wait in the gate at once.
    ssl_context
        When set, every connection must complete a TLS handshake first.
    audit
        Called (from a background thread) with each refusal that is not
        rate-limited, and with summaries of those that were.
    on_closed
        Called (from the connection's thread) when an admitted connection is
        closed, however its association ended.
    """

    def __init__(
        self,
        listener: socket.socket,
        *,
        check: Callable[[str, str, str], GateDecision],
        admit: Callable[[socket.socket, Any], None],
        limits: PduLimits,
        acse_timeout: float,
        max_connections_per_host: int,
        max_pending: int = 128,
        ssl_context: ssl.SSLContext | None = None,
        audit: Callable[[Refusal], None] | None = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self._listener = listener
        self._on_closed = on_closed
        self._check = check
        self._admit = admit
        self._limits = limits
        self._acse_timeout = acse_timeout
        self._max_pending = max_pending
        self._ssl_context = ssl_context
        if ssl_context is not None:
            # Documented hook: wrap_socket makes this class, so the admitted
            # connection is already guarded (no second wrapping).
            ssl_context.sslsocket_class = GuardedSSLSocket
        self._audit = audit
        self._accept_paused_until = 0.0
        self._hosts = HostSlots(max_connections_per_host)
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[float, int, int]] = []
        # Plain connections resting (see _advance_plain): when to look again.
        self._rests: list[tuple[float, int, int]] = []
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._limiter = RateLimiter(per_key=5, window=60.0, total=_NOTED_A_MINUTE)
        self._audit_queue: queue.Queue[Refusal] = queue.Queue(maxsize=1000)
        self._audit_dropped = 0
        self._audit_thread = threading.Thread(
            target=self._audit_loop, name="dicom-node-audit", daemon=True
        )

    # --- counts -------------------------------------------------------------

    def connections_from(self, address: str) -> int:
        """Return how many connections an address holds (pending or associated)."""
        return self._hosts.held(address)

    @property
    def pending(self) -> int:
        """Return how many connections wait in the gate."""
        return len(self._pending)

    # --- the loop -----------------------------------------------------------

    def serve_forever(self) -> None:
        """Run the gate until :meth:`stop`."""
        self._listener.setblocking(False)
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._audit_thread.start()
        next_drain = time.monotonic() + 60.0
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                timeout = min(next_drain, self._next_deadline(now + 1.0)) - now
                for fd, events in self._epoll.poll(max(0.0, timeout)):
                    if fd == self._listener.fileno():
                        self._accept()
                    elif fd == self._wake_r.fileno():
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    else:
                        entry = self._pending.get(fd)
                        if entry is not None:
                            self._advance_safely(entry, events)
                now = time.monotonic()
                self._wake_rested(now)
                self._expire(now)
                if self._accept_paused_until and now >= self._accept_paused_until:
                    self._accept_paused_until = 0.0
                    self._epoll.register(self._listener.fileno(), select.EPOLLIN)
                if now >= next_drain:
                    self._summarise()
                    next_drain = now + 60.0
        finally:
            for entry in list(self._pending.values()):
                self._close(entry)
            self._epoll.close()
            self._stopped.set()

    def stop(self) -> None:
        """Stop accepting and close every connection still waiting in the gate."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._stopped.wait(timeout=5)
        self._wake_r.close()
        self._wake_w.close()

    def _next_deadline(self, default: float) -> float:
        while self._deadlines and self._deadlines[0][2] not in self._pending:
            heapq.heappop(self._deadlines)
        while self._rests and self._rests[0][2] not in self._pending:
            heapq.heappop(self._rests)
        found = [heap[0][0] for heap in (self._deadlines, self._rests) if heap]
        return min([default, *found])

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, fd = heapq.heappop(self._deadlines)
            entry = self._pending.get(fd)
            if entry is not None and entry.deadline <= now:
                seen = (
                    f" ({entry.peeked} of its {entry.need} bytes)"
                    if entry.phase == "body" and entry.peeked
                    else ""
                )
                self._refuse(
                    entry,
                    f"no complete A-ASSOCIATE-RQ within {self._acse_timeout:g} s"
                    + seen,
                )

    def _accept(self) -> None:
        for _ in range(64):  # then let the waiting connections have a turn
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and the like: the connection stays in the backlog, and
                # the listener is not watched for a second (it would wake the
                # loop at once, again and again).
                if self._limiter.allow("accept"):
                    logger.error("cannot accept a connection: %s", type(exc).__name__)
                self._epoll.unregister(self._listener.fileno())
                self._accept_paused_until = time.monotonic() + 1.0
                return
            address, port = str(peer[0]), int(peer[1])
            if not self._hosts.take(address):
                sock.close()
                self._note(
                    Refusal(
                        address,
                        port,
                        f"more than {self._hosts.most} connections from one address",
                    )
                )
                continue
            if len(self._pending) >= self._max_pending:
                oldest = min(self._pending.values(), key=lambda e: e.deadline)
                self._refuse(oldest, "closed to make room: too many waiting")
            try:
                self._register(sock, address, port)
            except _CONNECTION_ERRORS:
                with contextlib.suppress(OSError):
                    sock.close()
                self._hosts.release(address)

    def _register(self, sock: socket.socket, address: str, port: int) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self._ssl_context is not None
        if self._ssl_context is not None:
            sock = self._ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        else:
            # Be woken only once the whole fixed part is here.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _RQ_FIXED)
        deadline = time.monotonic() + self._acse_timeout
        entry = _Pending(
            sock,
            address,
            port,
            deadline,
            tls,
            phase="handshake" if tls else "header",
        )
        fd = sock.fileno()
        try:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        except OSError:
            sock.close()  # the TLS wrapper, when there is one
            raise
        self._pending[fd] = entry
        heapq.heappush(self._deadlines, (deadline, id(entry), fd))
        if tls:
            self._advance_safely(entry, 0)

    # --- one connection's progress -----------------------------------------

    def _advance_safely(self, entry: _Pending, events: int) -> None:
        try:
            self._advance(entry, events)
        except Exception as exc:  # noqa: BLE001 - one connection must not end the gate
            logger.error(
                "connection from %s refused: unexpected %s",
                entry.address,
                describe_exception(exc),
            )
            self._refuse(entry, f"unexpected {type(exc).__name__}")

    def _advance(self, entry: _Pending, events: int) -> None:
        try:
            if entry.tls:
                self._advance_tls(entry)
            else:
                self._advance_plain(entry, events)
        except _CONNECTION_ERRORS as exc:
            self._refuse(entry, f"connection failed ({type(exc).__name__})")

    def _advance_plain(self, entry: _Pending, events: int) -> None:
        data = entry.sock.recv(entry.need, socket.MSG_PEEK)
        if len(data) < entry.need:
            if not data or events & (select.EPOLLRDHUP | select.EPOLLHUP):
                self._refuse(entry, "closed before a complete A-ASSOCIATE-RQ")
                return
            if len(data) <= entry.peeked:
                # Woken with nothing new: the kernel wakes a reader at half its
                # receive buffer however much is asked for, and a request larger
                # than the buffer would wake this thread at once, for ever.
                # Look again shortly rather than at the next byte's arrival (a
                # full buffer gets none), until acse_timeout ends the connection.
                self._rest(entry)
            entry.peeked = len(data)
            return
        self._progress(entry, data)

    def _rest(self, entry: _Pending) -> None:
        fd = entry.sock.fileno()
        self._epoll.modify(fd, select.EPOLLRDHUP)
        entry.resting_until = time.monotonic() + _REST
        heapq.heappush(self._rests, (entry.resting_until, id(entry), fd))

    def _wake_rested(self, now: float) -> None:
        while self._rests and self._rests[0][0] <= now:
            until, _, fd = heapq.heappop(self._rests)
            entry = self._pending.get(fd)
            # Only the connection that rests (a new one may have its number).
            if entry is None or entry.resting_until != until:
                continue
            entry.resting_until = 0.0
            self._epoll.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
            self._advance_safely(entry, 0)

    def _advance_tls(self, entry: _Pending) -> None:
        sock = entry.sock
        if not isinstance(sock, ssl.SSLSocket):
            raise TypeError("a TLS connection without its TLS socket")
        if entry.phase == "handshake":
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                self._epoll.modify(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
                return
            except ssl.SSLWantWriteError:
                self._epoll.modify(sock.fileno(), select.EPOLLOUT)
                return
            entry.phase = "header"
            self._epoll.modify(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        while len(entry.buffer) < entry.need:
            try:
                # The socket's own recv: the guard starts at the hand-over.
                chunk = ssl.SSLSocket.recv(sock, entry.need - len(entry.buffer))
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            if not chunk:
                self._refuse(entry, "closed before a complete A-ASSOCIATE-RQ")
                return
            entry.buffer += chunk
            if len(entry.buffer) == entry.need:
                self._progress(entry, bytes(entry.buffer))
                if entry.done:
                    return

    def _progress(self, entry: _Pending, data: bytes) -> None:
        if entry.phase == "header":
            pdu_type, _, length = struct.unpack(">BBL", data[:6])
            if pdu_type != _ASSOCIATE_RQ:
                self._refuse(
                    entry,
                    f"first PDU is type 0x{pdu_type:02X}, not A-ASSOCIATE-RQ",
                    abort=_ABORT_UNRECOGNIZED_PDU,
                )
                return
            if not _RQ_FIXED - 6 <= length <= ASSOCIATE_RQ_MAX:
                self._refuse(
                    entry,
                    f"A-ASSOCIATE-RQ claims {length} bytes "
                    f"(accepted: {_RQ_FIXED - 6}..{ASSOCIATE_RQ_MAX})",
                    abort=_ABORT_INVALID_PARAMETER,
                )
                return
            entry.called = data[10:26].decode("latin-1").strip()
            entry.calling = data[26:42].decode("latin-1").strip()
            decision = self._check(entry.calling, entry.called, entry.address)
            if decision.reason is not None:
                self._refuse(entry, decision.reason, reject=decision.diagnostic)
                return
            entry.phase = "body"
            entry.need = 6 + length
            if not entry.tls:
                entry.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_RCVLOWAT, min(entry.need, 1 << 20)
                )
                self._advance_plain(entry, 0)
            return
        # The whole request is here: it must decode before pynetdicom gets it.
        counted = _count_problem(data)
        if counted:
            self._refuse(
                entry, f"A-ASSOCIATE-RQ {counted}", abort=_ABORT_INVALID_PARAMETER
            )
            return
        request = A_ASSOCIATE_RQ()
        try:
            request.decode(data)
            # As pynetdicom reads it once it has the connection (its
            # presentation context IDs, for one, must be odd).
            request.to_primitive()
            problem = _request_problem(request)
        except _DECODE_ERRORS as exc:
            problem = f"does not decode ({type(exc).__name__})"
        if problem:
            self._refuse(
                entry,
                f"A-ASSOCIATE-RQ {problem}",
                abort=_ABORT_INVALID_PARAMETER,
            )
            return
        self._hand_over(entry, data)

    def _hand_over(self, entry: _Pending, data: bytes) -> None:
        entry.done = True
        fd = entry.sock.fileno()
        self._epoll.unregister(fd)
        del self._pending[fd]
        address, port = entry.address, entry.port

        def released() -> None:
            self._hosts.release(address)
            if self._on_closed is not None:
                self._on_closed()

        def violated(reason: str) -> None:
            # The association's own audit row says it was aborted.
            self._note(
                Refusal(address, port, f"association aborted: {reason}"), audit=False
            )

        try:
            guarded = self._guard(entry.sock, data, released, violated)
        except OSError as exc:
            logger.error("cannot hand a connection over: %s", type(exc).__name__)
            with contextlib.suppress(OSError):
                entry.sock.close()
            self._hosts.release(address)
            return
        try:
            self._admit(guarded, (address, port))
        except (OSError, RuntimeError) as exc:
            logger.error("cannot start an association thread: %s", type(exc).__name__)
            guarded.close()  # gives the place back

    def _guard(
        self,
        sock: socket.socket,
        data: bytes,
        released: Callable[[], None],
        violated: Callable[[str], None],
    ) -> socket.socket:
        # The connection as pynetdicom will read it, its place given back when
        # it closes. Blocking, but never forever: a peer that stops reading or
        # sending is given up on after pdu_seconds. A plain socket bounds its
        # sends in the kernel (SO_SNDTIMEO) and stays blocking, so that a read
        # is one system call; TLS reads whole records and needs the socket's
        # own timeout.
        seconds = self._limits.pdu_seconds
        if isinstance(sock, GuardedSSLSocket):
            sock.settimeout(seconds)
            sock._guard_init(
                self._limits, prefix=data, on_close=released, on_violation=violated
            )
            return sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        fd = sock.detach()
        try:
            plain = GuardedSocket(sock.family, sock.type, sock.proto, fileno=fd)
        except OSError:
            os.close(fd)
            raise
        try:
            plain.setblocking(True)
            plain.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_SNDTIMEO,
                struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000)),
            )
        except OSError:
            plain.close()
            raise
        plain._guard_init(self._limits, on_close=released, on_violation=violated)
        return plain

    def _refuse(
        self,
        entry: _Pending,
        reason: str,
        *,
        reject: int = 0,
        abort: int = 0,
    ) -> None:
        if not entry.tls:
            # Read what was only peeked: closing with unread bytes would reset
            # the connection, and the peer might never read the answer.
            with contextlib.suppress(*_CONNECTION_ERRORS):
                entry.sock.recv(ASSOCIATE_RQ_MAX + 6, socket.MSG_DONTWAIT)
        if reject:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                entry.sock.send(_reject_bytes(reject))
        elif abort:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                entry.sock.send(_abort_bytes(abort))
        self._close(entry)
        self._note(
            Refusal(
                entry.address,
                entry.port,
                reason,
                calling_ae_title=entry.calling,
                called_ae_title=entry.called,
            )
        )

    def _close(self, entry: _Pending) -> None:
        if entry.done:
            return
        entry.done = True
        fd = entry.sock.fileno()
        self._pending.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        with contextlib.suppress(OSError):
            entry.sock.close()
        self._hosts.release(entry.address)

    # --- log and audit, rate-limited per peer --------------------------------

    def _note(self, refusal: Refusal, *, audit: bool = True) -> None:
        metrics.association("rejected" if audit else "aborted", refusal.reason)
        if not self._limiter.allow(source_host(refusal.address)):
            return
        if refusal.calling_ae_title or refusal.called_ae_title:
            logger.warning(
                "connection from %s:%d refused (calling AE %r, called AE %r): %s",
                refusal.address,
                refusal.port,
                refusal.calling_ae_title,
                refusal.called_ae_title,
                refusal.reason,
            )
        else:
            logger.warning(
                "connection from %s:%d %s: %s",
                refusal.address,
                refusal.port,
                "refused" if audit else "ended",
                refusal.reason,
            )
        if audit:
            self._queue_audit(refusal)

    def _summarise(self) -> None:
        drained = self._limiter.drain()
        # The sources with the most, one line (and audit row) each; the rest
        # in one: thousands of addresses would otherwise make thousands.
        drained.sort(key=lambda item: -item[1])
        for address, suppressed in drained[:_SUMMARISED_SOURCES]:
            logger.warning(
                "%d more refused connections from %s in the last minute "
                "(not logged one by one)",
                suppressed,
                address,
            )
            self._queue_audit(
                Refusal(address, 0, f"{suppressed} more refused in the last minute")
            )
        rest = drained[_SUMMARISED_SOURCES:]
        if rest:
            count = sum(suppressed for _, suppressed in rest)
            logger.warning(
                "%d more refused connections from %d other sources in the last "
                "minute (not logged one by one)",
                count,
                len(rest),
            )
            self._queue_audit(
                Refusal(
                    "*",
                    0,
                    f"{count} more refused from {len(rest)} other sources "
                    "in the last minute",
                )
            )
        if self._audit_dropped:
            logger.warning(
                "%d refusals not written to the audit table (its queue was full)",
                self._audit_dropped,
            )
            self._audit_dropped = 0

    def _queue_audit(self, refusal: Refusal) -> None:
        if self._audit is None:
            return
        try:
            self._audit_queue.put_nowait(refusal)
        except queue.Full:
            self._audit_dropped += 1

    def _audit_loop(self) -> None:
        while True:
            refusal = self._audit_queue.get()
            if self._audit is None:
                continue
            try:
                self._audit(refusal)
            except Exception as exc:
                logger.error(
                    "audit of a refused connection failed: %s",
                    describe_exception(exc),
                    exc_info=exc,
                )
