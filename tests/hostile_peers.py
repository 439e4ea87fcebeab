"""Hostile DICOM peers on raw sockets: hand-encoded PDUs (PS3.8 9.3), no SCU library.

The node listens on 127.0.0.1; an attacker connects from another loopback
address (:data:`ATTACKER`), so that the legitimate caller at 127.0.0.1 is a
different host to the node's per-address limits.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import build_context

from dicom_node.config import NodeConfig
from dicom_node.dimse import VERIFICATION_SOP_CLASS
from dicom_node.log import quiet_pynetdicom
from dicom_node.scp import Receiver

ATTACKER = "127.0.0.2"
NODE_HOST = "127.0.0.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"


class Node(Protocol):
    """What the tests use of a running node (the start_node fixture's nodes)."""

    @property
    def config(self) -> NodeConfig: ...

    @property
    def receiver(self) -> Receiver: ...

    @property
    def port(self) -> int: ...

    def stored_files(self) -> list[Path]: ...


def connect(port: int, source: str = ATTACKER, timeout: float = 5.0) -> socket.socket:
    """Open a TCP connection to the node from ``source``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect((NODE_HOST, port))
    return sock


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)


def associate_rq(
    called: str = "DICOMNODE",
    calling: str = "ECHOSCU",
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...] = (
        (1, VERIFICATION_SOP_CLASS, (ImplicitVRLittleEndian,)),
    ),
    max_pdu: int = 16384,
) -> bytes:
    """Return an A-ASSOCIATE-RQ PDU (PS3.8 9.3.2).

    ``contexts`` are (context id, abstract syntax, transfer syntaxes).
    """
    items = _item(0x10, _uid(APPLICATION_CONTEXT))
    for context_id, abstract, syntaxes in contexts:
        body = struct.pack(">BBBB", context_id, 0, 0, 0) + _item(0x30, _uid(abstract))
        for syntax in syntaxes:
            body += _item(0x40, _uid(syntax))
        items += _item(0x20, body)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(
        0x52, _uid(IMPLEMENTATION_CLASS_UID)
    )
    items += _item(0x50, user)
    fixed = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
    body = fixed + items
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """Return one presentation data value item (PS3.8 9.3.5.1, E.2).

    ``control``: bit 0 set for a command fragment, bit 1 set for the last one.
    """
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data_tf(*items: bytes) -> bytes:
    """Return a P-DATA-TF PDU (PS3.8 9.3.5) holding the given PDV items."""
    body = b"".join(items)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def command_set(
    command_field: int,
    sop_class_uid: str,
    *,
    message_id: int = 1,
    has_data_set: bool = False,
    sop_instance_uid: str | None = None,
) -> bytes:
    """Return a DIMSE command set, Implicit VR Little Endian (PS3.7 E.1, 9.3)."""
    ds = Dataset()
    ds.CommandGroupLength = 0
    ds.AffectedSOPClassUID = UID(sop_class_uid)
    ds.CommandField = command_field
    ds.MessageID = message_id
    if command_field == 0x0001:  # C-STORE-RQ
        ds.Priority = 0
    ds.CommandDataSetType = 0x0000 if has_data_set else 0x0101
    if sop_instance_uid is not None:
        ds.AffectedSOPInstanceUID = UID(sop_instance_uid)
    return _encoded_command(ds)


def _encoded_command(ds: Dataset) -> bytes:
    """Encode a command set (Implicit VR Little Endian) with its group length."""
    body = encode(ds, True, True)
    assert body is not None
    # The group length is the length of what follows it (12 bytes of its own).
    return body[:8] + struct.pack("<L", len(body) - 12) + body[12:]


def recv_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Read until the node closes the connection or ``timeout`` passes.

    Returns what was read and whether the connection was closed (end of stream
    or reset) in time.
    """
    received = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(received), False
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return bytes(received), False
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(received), True
        if not chunk:
            return bytes(received), True
        received += chunk


def read_pdu(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes]:
    """Read one whole PDU; return its type and body."""
    sock.settimeout(timeout)
    header = _read_exactly(sock, 6)
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def is_open(sock: socket.socket) -> bool:
    """Return whether the node has neither closed nor written to a connection."""
    ready, _, _ = select.select([sock], [], [], 0)
    return not ready


def close_quietly(sock: socket.socket) -> None:
    """Close a connection, whatever state the node left it in."""
    with contextlib.suppress(OSError):
        sock.close()


def rss_bytes() -> int:
    """Return this process's resident set size (the node runs in-process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def echo(port: int, timeout: float = 2.0) -> int | None:
    """Send a C-ECHO as ECHOSCU from 127.0.0.1; return its status, None on failure."""
    quiet_pynetdicom()
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = ae.associate(
        NODE_HOST, port, ae_title="DICOMNODE", bind_address=(NODE_HOST, 0)
    )
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


def send_file(
    port: int,
    path: Path,
    sop_class_uid: str,
    transfer_syntax_uid: str,
    *,
    calling: str = "TESTSCU",
    timeout: float = 30.0,
) -> tuple[int | None, bool]:
    """Send a Part 10 file's data set as stored (pynetdicom streams its bytes).

    Returns the C-STORE status (None when no response came) and whether the
    association was aborted.
    """
    quiet_pynetdicom()
    ae = AE(ae_title=calling)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.requested_contexts = [
        build_context(UID(sop_class_uid), [UID(transfer_syntax_uid)])
    ]
    assoc = ae.associate(NODE_HOST, port, ae_title="DICOMNODE")
    assert assoc.is_established, "association with the node failed"
    # Sent from the file as it is, without parsing the data set.
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(path)
        status = int(rsp.Status) if "Status" in rsp else None
        aborted = bool(assoc.is_aborted)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    return status, aborted


class RssPeak:
    """Sample this process's RSS every 20 ms in a thread; keep the peak."""

    def __init__(self) -> None:
        import threading

        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        """Return the peak less the RSS when sampling began, in bytes."""
        return self.peak - self.start


# --- the node as the requestor: hostile destinations ---


def accept_association(
    sock: socket.socket, *, max_length: int = 16382, transfer_syntax: bool = True
) -> list[int]:
    """Read an A-ASSOCIATE-RQ and accept every context it proposes (PS3.8 9.3.3).

    Returns the accepted context IDs. ``max_length``: the Maximum Length
    Received we announce; ``transfer_syntax=False`` leaves each accepted
    context without its transfer syntax item.
    """
    from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
    from pynetdicom.pdu_items import (
        ApplicationContextItem,
        MaximumLengthSubItem,
        PresentationContextItemAC,
        TransferSyntaxSubItem,
        UserInformationItem,
    )

    pdu_type, body = read_pdu(sock)
    if pdu_type != 0x01:
        raise ConnectionError(f"PDU type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ")
    request_bytes = struct.pack(">BBL", 0x01, 0, len(body)) + body
    request = A_ASSOCIATE_RQ()
    request.decode(request_bytes)
    application = ApplicationContextItem()
    application.application_context_name = APPLICATION_CONTEXT
    items: list[Any] = [application]
    accepted = []
    for proposed in request.presentation_context:
        context = PresentationContextItemAC()
        context.presentation_context_id = proposed.context_id
        context.result_reason = 0
        syntax = TransferSyntaxSubItem()
        syntax.transfer_syntax_name = proposed.transfer_syntax[0]
        context.transfer_syntax_sub_item = [syntax] if transfer_syntax else []
        items.append(context)
        accepted.append(int(proposed.context_id or 0))
    length = MaximumLengthSubItem()
    length.maximum_length_received = max_length
    user = UserInformationItem()
    user.user_data = [length]
    items.append(user)
    answer = A_ASSOCIATE_AC()
    answer.protocol_version = 1
    answer.variable_items = items
    encoded = bytearray(answer.encode())
    encoded[10:42] = request_bytes[10:42]  # the AE titles, as the request gave them
    sock.sendall(bytes(encoded))
    return accepted


def read_command(sock: socket.socket) -> tuple[int, Dataset]:
    """Read a command set's fragments up to its last; return its context and it."""
    command = b""
    while True:
        pdu_type, body = read_pdu(sock)
        if pdu_type != 0x04:
            raise ConnectionError(f"PDU type 0x{pdu_type:02X}, not a P-DATA-TF")
        command += body[6:]  # one PDV per PDU, as pynetdicom sends a command
        if body[5] & 0x02:
            return body[4], decode(BytesIO(command), True, True)


def response_set(
    command_field: int,
    sop_class_uid: str,
    message_id: int,
    *,
    has_data_set: bool = False,
) -> bytes:
    """Return a DIMSE response's command set with Status Success (PS3.7 9.3)."""
    ds = Dataset()
    ds.CommandGroupLength = 0
    ds.AffectedSOPClassUID = UID(sop_class_uid)
    ds.CommandField = command_field
    ds.MessageIDBeingRespondedTo = message_id
    ds.CommandDataSetType = 0x0001 if has_data_set else 0x0101
    ds.Status = 0x0000
    return _encoded_command(ds)
