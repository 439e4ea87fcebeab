"""Outbound DICOM: C-ECHO and C-STORE as an SCU, every status checked."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom import __version__ as pynetdicom_version
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import code_to_category
from pynetdicom.transport import AssociationSocket

from dicom_node.config import validate_ae_title
from dicom_node.dimse import COMMAND_MAX, VERIFICATION_SOP_CLASS, is_decode_error
from dicom_node.errors import (
    AssociationError,
    AssociationRejectedError,
    ConfigError,
)
from dicom_node.gate import GuardedSocket, GuardedSSLSocket, PduLimits
from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.log import describe_exception, quiet_pynetdicom

__all__ = [
    "NOT_BEGUN",
    "OutboundAssociation",
    "Peer",
    "SendOutcome",
    "SendReport",
    "associate",
    "echo",
    "find_files",
    "parse_peer",
    "send_files",
]

logger = logging.getLogger(__name__)

# The outcome of a file send_files' ``begin`` refused.
NOT_BEGUN = "not tried: out of time (the peer answered slowly)"
# PS3.8 9.3.2: at most 128 presentation contexts in one A-ASSOCIATE-RQ.
_MAX_CONTEXTS = 128
# What pynetdicom raised while sending on answers it could not take (an
# accepted context without a transfer syntax: IndexError; a Maximum Length of
# 6: ZeroDivisionError); each fails that file, not the whole batch.
_LIBRARY_ERRORS = (IndexError, KeyError, TypeError, ZeroDivisionError, struct.error)
# Seconds past twice a request's timeout after which its connection is ended,
# if pynetdicom is still sending it (see OutboundAssociation._status).
_OVERDUE_GRACE = 2.0
# The most of a send one TLS write takes (see _TlsSocket.send): a write must
# finish within the timeout (17 KB/s at 60 s), and pynetdicom copies what is
# left of a PDU at each partial write (a PDU of 100 MB, to a peer with no
# maximum length: ~5 GB copied at 1 MiB a write, 80 GB at 64 KiB).
_TLS_PIECE = 1024 * 1024
# The smallest Maximum Length Received of a peer we send to: pynetdicom fails
# at 6 (no room for a fragment) and sends a byte a PDU at 7 (a 2 MB file took
# a minute and 700 MB); PS3.8 sets no floor, and nothing real goes this low.
_PEER_PDU_MIN = 1024
_PEER_PATTERN = re.compile(r"(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d+)")


@dataclass(frozen=True, slots=True)
class Peer:
    """A remote AE: AE title, host and port.

    Parameters
    ----------
    ae_title
        The peer's AE title (our called AE title).
    host
        Host name or IP address.
    port
        TCP port.
    """

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        """Return ``AET@HOST:PORT``."""
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_peer(text: str) -> Peer:
    """Parse ``AET@HOST:PORT``.

    Parameters
    ----------
    text
        The peer, e.g. ``PACS@10.0.0.5:104`` or ``PACS@[::1]:104``.

    Returns
    -------
    Peer
        The parsed peer.

    Raises
    ------
    ConfigError
        If the text does not have that form or a part is out of range.
    """
    match = _PEER_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"peer {text!r}: expected AET@HOST:PORT, e.g. PACS@127.0.0.1:104"
        )
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(f"peer {text!r}: port must be 1..65535")
    aet = validate_ae_title(match["aet"], f"peer {text!r}")
    return Peer(aet, match["host"].strip("[]"), port)


# PS3.8 9.3.4 (Table 9-21): the result, source and reason of an A-ASSOCIATE-RJ.
_RJ_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
_RJ_SOURCES = {
    1: "service-user",
    2: "service-provider (ACSE)",
    3: "service-provider (presentation)",
}
_RJ_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
# PS3.8 9.3.8 (Table 9-26): the source of an A-ABORT.
_ABORT_SOURCES = {0: "the peer", 2: "the peer's DICOM upper layer"}


# The pynetdicom versions whose private AE._create_socket the node extends.
_SOCKET_HOOK = pynetdicom_version.startswith("3.0.")
# The pynetdicom versions whose reactor can take a response its sender waits for
# (_ResponseGuard replaces the association's DIMSE get_msg there).
_RESPONSE_GUARD = pynetdicom_version.startswith("3.0.")


class _Stalls:
    """What a socket of ours keeps of a send that made no progress in time."""

    stalled: str | None = None

    def _note_stall(self, seconds: float) -> None:
        self.stalled = f"the peer took no data for {seconds:g} s"


class _TcpSocket(_Stalls, GuardedSocket):
    """A TCP connection of ours to a peer, every PDU it sends within limits.

    pynetdicom (3.0) reads a PDU to whatever length its header claims, for as
    long as bytes keep coming, and sends with no time limit: a destination that
    answered with a header claiming 4 GiB and streamed froze delivery (and grew
    the process by what it sent) until it closed, and one that stopped reading
    held the sending thread forever. The peer's PDUs are checked as the
    receiving side checks its callers' (:class:`~dicom_node.gate.PduLimits`:
    type and length from the header, each PDU whole within the timeout), and a
    send that makes no progress for the timeout fails (``SO_SNDTIMEO``). It also
    keeps the error of a failed connect, which pynetdicom logs and drops (the
    association is then merely "aborted", whether the peer refused the
    connection or no host answered in time).
    """

    connect_error: OSError | None = None
    _send_seconds = 0.0

    def connect(self, address: Any) -> None:
        """Connect, remembering the error if it fails."""
        try:
            super().connect(address)
        except OSError as exc:
            self.connect_error = exc
            raise

    def send(self, data: Any, flags: int = 0) -> int:
        """Send, noting a send that timed out (the peer stopped reading)."""
        try:
            return socket.socket.send(self, data, flags)
        except BlockingIOError:
            self._note_stall(self._send_seconds)
            raise

    def limit_sends(self, seconds: float) -> None:
        """Make a send that makes no progress for ``seconds`` fail."""
        # The kernel's limit: the socket stays blocking, one call per send.
        self.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_SNDTIMEO,
            struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000)),
        )
        self._send_seconds = seconds


class _TlsSocket(_Stalls, GuardedSSLSocket):
    """A TLS connection of ours to a peer: the limits of :class:`_TcpSocket`.

    pynetdicom wraps the TCP socket after connecting; the limits are set when
    the connection opens (:meth:`_Heard.on_conn_open`), before anything is read.
    """

    _guarded = False

    def guard(self, limits: PduLimits) -> None:
        """Apply the limits: from now on, reads and sends keep to them."""
        self.settimeout(limits.pdu_seconds)
        self._guard_init(limits)
        self._guarded = True

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        """Receive within the limits once they apply (see :meth:`guard`)."""
        if not self._guarded:
            # The ssl module's own look for early data, before connecting.
            return ssl.SSLSocket.recv(self, buflen, flags)
        return super().recv(buflen, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        """Send up to 1 MiB, noting a send that timed out (the peer stopped reading).

        A TLS write is whole or nothing within the socket's timeout; a piece
        at a time (pynetdicom sends the rest), the timeout bounds a stall, not
        a PDU (one is a whole file to a peer without a maximum length).
        """
        try:
            return ssl.SSLSocket.send(self, memoryview(data)[:_TLS_PIECE], flags)
        except TimeoutError:
            self._note_stall(self.gettimeout() or 0.0)
            raise


class _ScuAE(AE):
    """pynetdicom's AE for our outbound associations.

    Its sockets have TCP_NODELAY: without it, Nagle's algorithm and the peer's
    delayed ACK hold each small DIMSE message back by up to 40 ms (a two-object
    result set took ~140 ms to send on loopback, ~16 ms with TCP_NODELAY on
    both sides). And they are :class:`_TcpSocket`: limits on what the peer
    sends and on a send that makes no progress, and the error of a failed TCP
    connect (over TLS the TCP connect is the TLS socket's own, so there it is
    not known).

    Parameters
    ----------
    ae_title
        Our AE title.
    timeout
        Seconds each PDU of the peer may take to arrive once it has begun,
        and a send may make no progress. A P-DATA-TF PDU may be as long as
        our maximum PDU length (pynetdicom's default, which we propose).
    """

    def __init__(self, ae_title: str, timeout: float) -> None:
        super().__init__(ae_title=ae_title)
        self.limits = PduLimits(max_pdu=self.maximum_pdu_size, pdu_seconds=timeout)
        self._sockets: weakref.WeakKeyDictionary[Association, _TcpSocket] = (
            weakref.WeakKeyDictionary()
        )

    def _create_socket(
        self, assoc: Association, address: Any, tls_args: Any
    ) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        raw = sock.socket
        # AE._create_socket is private: relied on as pynetdicom 3.0 has it; on
        # another version the socket is left as pynetdicom made it.
        if raw is not None and _SOCKET_HOOK:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            timeout = raw.gettimeout()
            # The same bound descriptor (options kept), in a socket that
            # keeps the limits and remembers why connect failed.
            tcp = _TcpSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            tcp.settimeout(timeout)
            tcp.limit_sends(self.limits.pdu_seconds)
            tcp._guard_init(self.limits)
            sock.socket = tcp
            self._sockets[assoc] = tcp
        return sock

    def connect_error(self, assoc: Association) -> OSError | None:
        """Return what the TCP connect of ``assoc`` raised, if it failed."""
        tcp = self._sockets.get(assoc)
        return None if tcp is None else tcp.connect_error


class _ResponseGuard:
    """Keep an association's reactor thread off the responses to our requests.

    pynetdicom (3.0) pauses the reactor thread of an association before a
    request is sent and reads the response from the DIMSE queue in the sending
    thread. The pause can miss: the sender may see the reactor's "paused" flag
    just after the reactor passed its checkpoint, and the reactor's next
    non-blocking read then takes the response, drops it ("Received unexpected
    C-STORE service message") and leaves the sender waiting out the DIMSE
    timeout (then the association is aborted). It happened under CPU load, to
    about one delivery a minute with two `dicom-node worker` processes busy on
    two cores (a 60-s stall each time). While a request of ours is outstanding,
    this makes the reactor's non-blocking reads find nothing; the sender's
    blocking read is unchanged.

    Parameters
    ----------
    assoc
        An established association of ours (requestor).
    """

    def __init__(self, assoc: Association) -> None:
        self._read = assoc.dimse.get_msg
        self._send = assoc.dimse.send_msg
        self._outstanding = threading.Event()
        # The request now outstanding and the message read as its response.
        self._sent: Any = None
        self._answer: Any = None
        self._sender = 0  # the thread whose request is outstanding
        # The request's overdue timer: not started yet, and started.
        self._overdue: threading.Timer | None = None
        self._running: threading.Timer | None = None
        if _RESPONSE_GUARD:
            assoc.dimse.get_msg = self._get_msg  # type: ignore[method-assign]
            assoc.dimse.send_msg = self._send_msg  # type: ignore[method-assign]

    def _send_msg(self, primitive: Any, context_id: int) -> None:
        if self._outstanding.is_set() and threading.get_ident() == self._sender:
            self._sent = primitive, context_id
        self._send(primitive, context_id)

    def _get_msg(self, block: bool = False) -> Any:
        if not block and self._outstanding.is_set():
            return None, None  # the reactor's poll: the sender reads the response
        if block and self._outstanding.is_set() and self._overdue is not None:
            # The request is queued whole; pynetdicom waits for its response.
            self._running, self._overdue = self._overdue, None
            self._running.start()
        item = self._read(block)
        if block and self._outstanding.is_set():
            self._answer = item[1], item[0]
        return item

    @contextlib.contextmanager
    def request(
        self, overdue: float | None = None, cut: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """Mark a request outstanding until its response is read.

        Parameters
        ----------
        overdue, cut
            ``cut`` is called if the request is still outstanding ``overdue``
            seconds after pynetdicom began to wait for its response.
        """
        self._sent = self._answer = None
        self._sender = threading.get_ident()
        self._overdue = None
        if overdue is not None and cut is not None:
            self._overdue = threading.Timer(overdue, cut)
            self._overdue.daemon = True
        self._outstanding.set()
        try:
            yield
        finally:
            self._outstanding.clear()
            if self._running is not None:
                self._running.cancel()
            self._overdue = self._running = None

    def mismatch(self) -> str | None:
        """Return how the last response does not answer its request, or None.

        pynetdicom (3.0) takes the next DIMSE message as the response whatever
        it names: a response to another Message ID, or of another kind, would
        read as the answer (a Success for an instance that was not stored).
        """
        if self._sent is None or self._answer is None:
            return None  # not seen: another pynetdicom version
        (sent, context), (answer, answer_context) = self._sent, self._answer
        asked = type(sent).__name__.replace("_", "-")
        if answer_context != context:
            return (
                f"the {asked} response came on presentation context "
                f"{answer_context}, not {context} of the request"
            )
        if type(answer) is not type(sent):
            return (
                f"the peer answered a {asked} request with a "
                f"{type(answer).__name__.replace('_', '-')} message"
            )
        if answer.MessageIDBeingRespondedTo != sent.MessageID:
            return (
                f"the {asked} response is to Message ID "
                f"{answer.MessageIDBeingRespondedTo}, not {sent.MessageID} of "
                "the request"
            )
        theirs = getattr(answer, "AffectedSOPInstanceUID", None)
        ours = getattr(sent, "AffectedSOPInstanceUID", None)
        if theirs and ours and theirs != ours:
            return f"the {asked} response names another SOP instance than its request"
        return None


@dataclass(slots=True)
class _Heard:
    """What the peer did while associating: pynetdicom's events, noted.

    Parameters
    ----------
    limits
        What the peer may send (see :class:`_ScuAE`); a TLS connection gets
        them when it opens.
    """

    limits: PduLimits
    connected: bool = False
    # The A-ABORT (or A-P-ABORT: the connection was lost) that ended it.
    abort: A_ABORT | A_P_ABORT | None = None
    # The connection as pynetdicom reads it, once open.
    sock: Any = None
    # Bytes of the command set now arriving.
    command_bytes: int = 0
    # The peer asked to release the association (while a request of ours was
    # outstanding, the paused reactor does not answer it).
    release_asked: bool = False
    # Why the connection was ended when a request outlasted its time.
    overdue: str | None = None

    def on_conn_open(self, event: Event) -> None:
        self.connected = True
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        self.sock = sock
        if isinstance(sock, _TlsSocket):
            # Opened, not yet read from: pynetdicom connects (and shakes hands)
            # in the reactor thread, which reads only after this event.
            sock.guard(self.limits)

    def on_pdu_recv(self, event: Event) -> None:
        # What the peer sends us are responses to C-STORE and C-ECHO: a command
        # set each, and no data set. pynetdicom keeps a message's fragments
        # in memory until its last one comes, so a command that never ends or
        # a data set streamed with a response grew the process without bound.
        pdu = event.pdu
        if isinstance(pdu, A_RELEASE_RQ):
            self.release_asked = True
        if not isinstance(pdu, P_DATA_TF):
            return
        accepted = {cx.context_id for cx in event.assoc.accepted_contexts}
        for item in pdu.presentation_data_value_items:
            value = item.presentation_data_value or b""
            problem = None
            if item.presentation_context_id not in accepted:
                problem = "P-DATA on a presentation context that was not accepted"
            elif not value:
                problem = "P-DATA value without a message control header"
            elif not value[0] & 0x01:  # PS3.8 E.2: a data set fragment
                problem = (
                    "a data set with a response (C-STORE and C-ECHO responses "
                    "have none)"
                )
            else:
                self.command_bytes += len(value) - 1
                if self.command_bytes > COMMAND_MAX:
                    problem = f"a command set over {COMMAND_MAX} bytes"
                elif value[0] & 0x02:  # the command set's last fragment
                    self.command_bytes = 0
            if problem is not None:
                refuse = getattr(self.sock, "refuse", None)
                if refuse is not None:
                    refuse(problem)
                return

    @property
    def cut(self) -> str | None:
        """Return why we ended the connection (what the peer did), or None."""
        reason = (
            getattr(self.sock, "violation", None)
            or getattr(self.sock, "stalled", None)
            or self.overdue
        )
        return None if reason is None else str(reason)

    def cut_overdue(self, reason: str) -> None:
        """End the connection now: a request outlasted its time (see ``_status``)."""
        self.overdue = reason
        if self.sock is not None:
            # The TCP socket's own shutdown (a TLS one's would drop its state
            # while the reactor may be writing): the reactor's send fails.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def on_acse_recv(self, event: Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        if isinstance(primitive, (A_ABORT, A_P_ABORT)):
            self.abort = primitive


class OutboundAssociation:
    """An established association of ours with a peer (we are the requestor).

    Made by :func:`associate`. Each request is sent with the reactor thread
    kept off its response (see ``_ResponseGuard``), and a missing response is
    an :class:`~dicom_node.errors.AssociationError` that says why.

    Parameters
    ----------
    assoc
        The established pynetdicom association.
    peer
        Who it is with.
    timeout
        Seconds a response may take.
    heard
        What the peer did (connection, abort), noted by :func:`associate`.
    """

    def __init__(
        self, assoc: Association, peer: Peer, timeout: float, heard: _Heard
    ) -> None:
        self.assoc = assoc
        self.peer = peer
        self.timeout = timeout
        self._heard = heard
        self._guard = _ResponseGuard(assoc)
        self._message_id = 0

    @property
    def is_established(self) -> bool:
        """Return whether the association still stands."""
        return bool(self.assoc.is_established)

    def send_c_echo(self) -> int:
        """Send a C-ECHO and return its status.

        Returns
        -------
        int
            The status of the response.

        Raises
        ------
        AssociationError
            If no response came: the peer aborted or the time ran out.
        """
        msg_id = self._next_message_id()
        return self._status(lambda: self.assoc.send_c_echo(msg_id), "C-ECHO")

    def send_c_store(self, dataset: Dataset | Path) -> int:
        """Send a C-STORE of a data set, or of a file exactly as stored.

        Parameters
        ----------
        dataset
            The data set, or the path of a DICOM file (sent without decoding).

        Returns
        -------
        int
            The status of the response.

        Raises
        ------
        AssociationError
            If no response came: the peer aborted or the time ran out.
        ValueError
            If no presentation context accepted by the peer fits the data set.
        AttributeError
            If the data set lacks what a C-STORE needs (pynetdicom's check).
        """
        msg_id = self._next_message_id()
        return self._status(lambda: self.assoc.send_c_store(dataset, msg_id), "C-STORE")

    def _next_message_id(self) -> int:
        # Each request its own Message ID (1..65535, PS3.7 E.1), so that a
        # response to an earlier one is told apart.
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def _status(self, send: Callable[[], Dataset], what: str) -> int:
        started = time.monotonic()
        # pynetdicom queues a message's PDUs at once and gives up waiting for
        # the response after the timeout, then waits for its reactor to finish
        # sending them: to a peer reading a byte at a time (each send making
        # some progress), for ever. Past twice the timeout and a grace (a
        # peer that stops reading is told apart before: no send progresses for
        # the timeout), the connection is ended, and with it the sending.
        seconds = 2 * self.timeout + _OVERDUE_GRACE
        reason = f"the {what} was not taken {seconds:g} s after it was queued"
        with self._guard.request(seconds, lambda: self._heard.cut_overdue(reason)):
            rsp = send()
        # Cut off for what the peer sent (checked as each PDU is read, before
        # its messages are): a response that came with it is not believed.
        cut = self._heard.cut
        if cut is not None:
            raise AssociationError(
                f"no {what} response: the node aborted the association with "
                f"{self.peer}: {cut}"
            )
        if "Status" in rsp:
            mismatch = self._guard.mismatch()
            if mismatch is None:
                return int(rsp.Status)
            self.assoc.abort()
            raise AssociationError(
                f"no {what} response from {self.peer}: {mismatch}; the "
                "association was aborted"
            )
        # An abort while we waited is still at the head of the DUL's queue:
        # the reactor, paused for the request, has not read it yet.
        abort: object = self._heard.abort or self.assoc.dul.peek_next_pdu()
        if isinstance(abort, (A_ABORT, A_P_ABORT)):
            raise AssociationError(f"no {what} response: {_aborted(abort, self.peer)}")
        if self._heard.release_asked:
            raise AssociationError(
                f"no {what} response from {self.peer}: it asked to release the "
                "association (A-RELEASE-RQ) instead of answering"
            )
        if time.monotonic() - started < self.timeout * 0.9:
            raise AssociationError(
                f"no {what} response from {self.peer}: the association ended "
                "before it came"
            )
        raise AssociationError(
            f"no {what} response from {self.peer} within {self.timeout:g} s"
        )

    def close(self) -> None:
        """Release the association if it stands, else make sure it is closed."""
        assoc = self.assoc
        if assoc.is_established:
            assoc.release()
        elif not (assoc.is_aborted or assoc.is_released or assoc.is_rejected):
            assoc.abort()

    def __enter__(self) -> OutboundAssociation:
        """Return this association."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the association."""
        self.close()


def associate(
    peer: Peer,
    contexts: Sequence[PresentationContext],
    calling_ae_title: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> OutboundAssociation:
    """Open an association with a peer, the way the node's SCU does.

    Parameters
    ----------
    peer
        Who to associate with.
    contexts
        The presentation contexts to propose (at most 128).
    calling_ae_title
        Our AE title.
    timeout
        Seconds to wait for the TCP connection, the association and each
        response.
    tls
        When set, associate over DICOM TLS with this client context; its
        ``sslsocket_class`` is set to the node's (limits on what the peer
        sends, as over TCP), so keep it for the node's associations.

    Returns
    -------
    OutboundAssociation
        The established association; close it (or use it in ``with``).

    Raises
    ------
    AssociationRejectedError
        If the peer answered A-ASSOCIATE-RJ; the message gives its reason in
        words and codes.
    AssociationError
        If the association was not established otherwise: the connection was
        refused, nobody answered in time, the peer aborted. The message says
        which.
    """
    quiet_pynetdicom()
    ae = _ScuAE(calling_ae_title, timeout)
    # Associations name this project (PS3.7 D.3.3.2), not the library.
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    heard = _Heard(ae.limits)
    if tls is not None:
        # Our TLS sockets take the peer's PDUs within the limits (_TlsSocket).
        tls.sslsocket_class = _TlsSocket
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            contexts=list(contexts),
            ae_title=peer.ae_title,
            tls_args=_tls_args(tls, peer),
            evt_handlers=[
                (evt.EVT_CONN_OPEN, heard.on_conn_open),
                (evt.EVT_ACSE_RECV, heard.on_acse_recv),
                (evt.EVT_PDU_RECV, heard.on_pdu_recv),
            ],
        )
    except socket.gaierror as exc:  # pynetdicom resolves the name first
        raise AssociationError(
            f"cannot connect to {peer}: the host name {peer.host!r} does not "
            f"resolve ({exc.strerror})"
        ) from exc
    if not assoc.is_established:
        raise _failure(assoc, ae.connect_error(assoc), heard, peer, timeout, tls)
    problem = _acceptance_problem(assoc)
    if problem:
        assoc.abort()
        raise AssociationError(f"{peer} accepted the association, but {problem}")
    return OutboundAssociation(assoc, peer, timeout, heard)


def _acceptance_problem(assoc: Association) -> str:
    """Return why an accepted association cannot be sent over, or an empty string."""
    most = int(assoc.acceptor.maximum_length or 0)  # 0: no limit
    if 0 < most < _PEER_PDU_MIN:
        return (
            f"its Maximum Length Received is {most} bytes; the node sends no "
            f"PDUs under {_PEER_PDU_MIN}"
        )
    if any(not cx.transfer_syntax for cx in assoc.accepted_contexts):
        return "it accepted a presentation context without a transfer syntax"
    return ""


def echo(
    peer: Peer,
    calling_ae_title: str = "DICOMNODE",
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Send one C-ECHO.

    Parameters
    ----------
    peer
        Where to send it.
    calling_ae_title
        Our AE title.
    timeout
        Seconds to wait for the connection, the association and the response.
    tls
        When set, associate over DICOM TLS with this client context.

    Returns
    -------
    int
        The C-ECHO status (0x0000 is success).

    Raises
    ------
    AssociationRejectedError
        If the peer rejects the association (its reason in words and codes).
    AssociationError
        If the association fails otherwise (refused, no answer, aborted), or no
        response arrives; the message says which.
    """
    context = build_context(VERIFICATION_SOP_CLASS)
    with associate(peer, [context], calling_ae_title, timeout, tls) as link:
        return link.send_c_echo()


@dataclass(slots=True)
class SendOutcome:
    """What happened to one file.

    Parameters
    ----------
    path
        The file.
    status
        The C-STORE status, or None when nothing was sent or no answer came.
    error
        Why it failed or was skipped; empty on success.
    rejection
        The peer's A-ASSOCIATE-RJ, when it rejected the association for this file.
    """

    path: Path
    status: int | None
    error: str = ""
    rejection: AssociationRejectedError | None = None

    @property
    def ok(self) -> bool:
        """Return whether the peer answered Success or Warning."""
        return self.status is not None and code_to_category(self.status) in {
            "Success",
            "Warning",
        }


@dataclass(slots=True)
class SendReport:
    """What :func:`send_files` did.

    Parameters
    ----------
    outcomes
        One per file that was a DICOM instance.
    skipped
        Files in scanned folders that are not DICOM instances.
    """

    outcomes: list[SendOutcome] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    @property
    def sent(self) -> int:
        """Return how many files the peer accepted."""
        return sum(o.ok for o in self.outcomes)

    @property
    def failed(self) -> list[SendOutcome]:
        """Return the files that were not accepted."""
        return [o for o in self.outcomes if not o.ok]


def find_files(paths: Iterable[Path]) -> Iterator[tuple[Path, bool]]:
    """Expand files and folders (recursively, sorted) into files.

    Parameters
    ----------
    paths
        Files and folders.

    Yields
    ------
    tuple of (pathlib.Path, bool)
        Each file, and whether it was named explicitly (not found in a folder).
    """
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name, False
        else:
            yield path, True


@dataclass(frozen=True, slots=True)
class _Item:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    # A file without File Meta Information is sent from its decoded data set.
    dataset: Dataset | None


def _inspect(path: Path) -> _Item | str:
    """Return what to send for a file, or why it is not a DICOM instance."""
    try:
        meta = read_file_meta_info(path)
    except InvalidDicomError:
        meta = None
    except OSError as exc:
        return f"cannot read ({exc.strerror})"
    if meta is not None and all(
        k in meta
        for k in (
            "MediaStorageSOPClassUID",
            "MediaStorageSOPInstanceUID",
            "TransferSyntaxUID",
        )
    ):
        return _Item(
            path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID), None
        )
    # No (or incomplete) File Meta Information: a bare data set, perhaps.
    try:
        ds = dcmread(path, force=True)
        sop_class = ds.get("SOPClassUID")
        sop_instance = ds.get("SOPInstanceUID")
    except Exception as exc:
        if not is_decode_error(exc):
            raise
        return f"not a DICOM file ({type(exc).__name__})"
    if not sop_class or not sop_instance:
        return "not a DICOM instance (no SOP Class/Instance UID)"
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return "not a DICOM file (encoding unknown)"
    if implicit:
        ts = ImplicitVRLittleEndian
    else:
        ts = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta = ds.get("file_meta") or FileMetaDataset()
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    return _Item(path, str(sop_class), str(ts), ds)


def send_files(
    paths: Sequence[Path],
    peer: Peer,
    calling_ae_title: str = "DICOMNODE",
    timeout: float = 60.0,
    progress: Callable[[SendOutcome], None] | None = None,
    tls: ssl.SSLContext | None = None,
    begin: Callable[[Path], bool] | None = None,
) -> SendReport:
    """Send files and folders with C-STORE, exactly as stored (no transcoding).

    Each SOP class is proposed with the transfer syntax of its files; files are
    grouped so no association proposes more than 128 contexts. Every status is
    checked. An association lost midway is opened again for the files left.

    Parameters
    ----------
    paths
        Files and folders (searched recursively).
    peer
        The destination.
    calling_ae_title
        Our AE title.
    timeout
        Seconds to wait for an association or a response.
    progress
        Called after each file with its outcome.
    tls
        When set, associate over DICOM TLS with this client context.
    begin
        Asked before each file whether to send it; a file it refuses gets the
        outcome :data:`NOT_BEGUN` (the outbox begins no new result set once
        a batch has taken half its lease).

    Returns
    -------
    SendReport
        One outcome per DICOM file, and the non-DICOM files skipped in folders.
    """
    report = SendReport()
    items: list[_Item] = []
    for path, explicit in find_files(paths):
        found = _inspect(path)
        if isinstance(found, str):
            if explicit:
                outcome = SendOutcome(path, None, found)
                report.outcomes.append(outcome)
                if progress:
                    progress(outcome)
            else:
                report.skipped.append(path)
            continue
        items.append(found)

    for batch in _batches(items):
        _send_batch(
            batch, peer, calling_ae_title, timeout, report, progress, tls, begin
        )
    return report


def _batches(items: Sequence[_Item]) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    contexts: set[tuple[str, str]] = set()
    for item in items:
        pair = (item.sop_class_uid, item.transfer_syntax_uid)
        if pair not in contexts and len(contexts) == _MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(pair)
        batch.append(item)
    if batch:
        yield batch


def _send_batch(
    batch: list[_Item],
    peer: Peer,
    calling_ae_title: str,
    timeout: float,
    report: SendReport,
    progress: Callable[[SendOutcome], None] | None,
    tls: ssl.SSLContext | None = None,
    begin: Callable[[Path], bool] | None = None,
) -> None:
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in batch})
    contexts = [build_context(UID(c), [UID(t)]) for c, t in pairs]
    # Send file contents as they are on disk, without decoding and re-encoding.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True

    def finish(outcome: SendOutcome) -> None:
        report.outcomes.append(outcome)
        if progress:
            progress(outcome)

    link: OutboundAssociation | None = None
    reconnects = 0
    lost = ""
    try:
        for item in batch:
            if begin is not None and not begin(item.path):
                finish(SendOutcome(item.path, None, NOT_BEGUN))
                continue
            if link is None or not link.is_established:
                if link is not None:
                    link.close()
                    reconnects += 1
                if reconnects > 1:
                    finish(
                        SendOutcome(item.path, None, f"association lost twice ({lost})")
                    )
                    continue
                try:
                    link = associate(peer, contexts, calling_ae_title, timeout, tls)
                except AssociationError as exc:
                    rejection = (
                        exc if isinstance(exc, AssociationRejectedError) else None
                    )
                    for rest in batch[batch.index(item) :]:
                        finish(
                            SendOutcome(
                                rest.path, None, f"association failed: {exc}", rejection
                            )
                        )
                    return
            try:
                status = link.send_c_store(
                    item.dataset if item.dataset is not None else item.path
                )
            except (ValueError, AttributeError) as exc:
                # No accepted context for this class and syntax, or unsendable.
                finish(SendOutcome(item.path, None, f"not sent: {exc}"))
                continue
            except AssociationError as exc:
                lost = str(exc)
                finish(SendOutcome(item.path, None, lost))
                continue
            except _LIBRARY_ERRORS as exc:
                link.assoc.abort()
                lost = f"not sent: sending failed ({describe_exception(exc)})"
                logger.error("sending to %s failed: %s", peer, describe_exception(exc))
                finish(SendOutcome(item.path, None, lost))
                continue
            outcome = SendOutcome(item.path, status)
            if not outcome.ok:
                outcome.error = f"status 0x{status:04X} ({code_to_category(status)})"
            finish(outcome)
    finally:
        if link is not None:
            link.close()


def _tls_args(
    tls: ssl.SSLContext | None, peer: Peer
) -> tuple[ssl.SSLContext, str] | None:
    # The server's certificate is checked against the host we asked for.
    return None if tls is None else (tls, peer.host)


def _failure(
    assoc: Association,
    connect_error: OSError | None,
    heard: _Heard,
    peer: Peer,
    timeout: float,
    tls: ssl.SSLContext | None,
) -> AssociationError:
    """Say why an association was not established, as an operator needs it."""
    where = f"{peer.host}:{peer.port}"
    # pynetdicom (3.0.4) checks that the connection is up only after queuing
    # the request: a peer that answers and closes at once (the node's gate
    # does, with A-ASSOCIATE-RJ) can leave its answer unread in the DUL's
    # queue and the association "aborted" (about 1 rejection in 40).
    # (object: pynetdicom's annotation of peek_next_pdu reads as None to mypy.)
    queued: object = assoc.dul.peek_next_pdu()
    rj: A_ASSOCIATE | None = None
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
    elif isinstance(queued, A_ASSOCIATE) and queued.result in (1, 2):
        rj = queued
    if rj is not None:
        result, source = int(rj.result or 0), int(rj.result_source or 0)
        reason = int(rj.diagnostic or 0)
        words = _RJ_REASONS.get((source, reason), "reason not defined by DICOM")
        return AssociationRejectedError(
            f"rejected by the peer {peer}: {words} (result {result} "
            f"{_RJ_RESULTS.get(result, 'unknown')}, source {source} "
            f"{_RJ_SOURCES.get(source, 'unknown')}, reason {reason})",
            result,
            source,
            reason,
        )
    # pynetdicom aborts an association whose TCP connect failed, so "aborted"
    # alone says nothing: the connect error, and whether the peer said
    # anything, tell what happened.
    if isinstance(connect_error, ConnectionRefusedError):
        return AssociationError(
            f"connection refused by {where}: nothing listens on that port (is the "
            "peer running, and is the port right?)"
        )
    if isinstance(connect_error, TimeoutError):
        return AssociationError(
            f"no answer from {where} within {timeout:g} s: the host is down or "
            "unreachable, or a firewall drops the connection"
        )
    if connect_error is not None:
        return AssociationError(
            f"cannot connect to {where}: "
            f"{connect_error.strerror or type(connect_error).__name__}"
        )
    cut = heard.cut
    if cut is not None:
        return AssociationError(f"the node aborted the association with {peer}: {cut}")
    if not heard.connected:
        return AssociationError(
            f"cannot connect to {where}"
            + (
                " over TLS: refused, no answer, or the TLS handshake failed "
                "(certificates, or the peer does not speak TLS there)"
                if tls is not None
                else ""
            )
        )
    abort = heard.abort or queued
    if isinstance(abort, (A_ABORT, A_P_ABORT)):
        return AssociationError(_aborted(abort, peer))
    accepted = assoc.acceptor.primitive
    if accepted is not None and accepted.result == 0:
        return AssociationError(
            f"{peer} accepted the association but none of the proposed "
            "presentation contexts (SOP class and transfer syntax)"
        )
    return AssociationError(
        f"no answer from {peer} to the association request within {timeout:g} s "
        "after connecting: is it a DICOM port"
        + ("" if tls is not None else ", or does it expect TLS")
        + "?"
    )


def _aborted(abort: A_ABORT | A_P_ABORT, peer: Peer) -> str:
    if isinstance(abort, A_ABORT):
        source = int(abort.abort_source or 0)
        who = _ABORT_SOURCES.get(source, "the peer")
        return f"aborted by {who} {peer} (A-ABORT, source {source})"
    # An A-P-ABORT is what the local DICOM layer reports when the connection
    # closed unexpectedly or the peer sent what it cannot read (PS3.8 7.4).
    return (
        f"the connection to {peer} was closed without a DICOM answer "
        f"(A-P-ABORT, reason {int(abort.provider_reason or 0)}): the peer may "
        "have closed it, or it speaks something else on that port"
    )
