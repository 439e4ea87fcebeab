"""Hostile peers against a real node on loopback: each test is one attack.

Attackers connect from 127.0.0.2 on raw sockets; the legitimate caller connects
from 127.0.0.1 with pynetdicom or dcmtk. The node runs in this process, so its
memory is this process's RSS and its CPU this process's CPU time.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import select
import socket
import struct
import subprocess
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import build_context

from dicom_node.config import CallerConfig, ModelConfig, NodeConfig
from dicom_node.dimse import (
    CANNOT_UNDERSTAND,
    INVALID_UID,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    VERIFICATION_SOP_CLASS,
)
from dicom_node.gate import ASSOCIATE_RQ_MAX, source_host
from dicom_node.log import quiet_pynetdicom
from dicom_node.storage import Storage
from tests.factories import dcmtk, encode_body, make_ct, raw_file
from tests.helpers import data_set_digest
from tests.hostile_peers import (
    ATTACKER,
    NODE_HOST,
    Node,
    RssPeak,
    associate_rq,
    close_quietly,
    command_set,
    connect,
    echo,
    is_open,
    p_data_tf,
    pdv,
    read_pdu,
    recv_until_closed,
    rss_bytes,
    send_file,
)

StartNode = Callable[..., Node]

MB = 1024 * 1024
A_ASSOCIATE_AC = 0x02
A_ABORT = 0x07
C_ECHO_RQ = 0x0030
C_STORE_RQ = 0x0001


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def timed_echo(port: int) -> tuple[int | None, float]:
    started = time.monotonic()
    status = echo(port)
    return status, time.monotonic() - started


def spool_contents(node: Node) -> list[str]:
    """Return the names of everything in the node's spool folders."""
    incoming = node.config.storage_dir / Storage.INCOMING
    return sorted(
        p.name
        for folder in incoming.iterdir()
        if folder.is_dir()
        for p in folder.iterdir()
    )


def is_abort_or_nothing(reply: bytes) -> bool:
    # What a refused peer may read: an A-ABORT (PS3.8 9.3.8: 10 bytes, type
    # 0x07), or nothing when the reset overtook it.
    return reply == b"" or (len(reply) == 10 and reply[0] == A_ABORT)


@pytest.fixture
def attackers() -> Iterator[list[socket.socket]]:
    """Raw connections a test opens; closed afterwards."""
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            close_quietly(sock)


# --- before association -------------------------------------------------------


def test_a_4_gib_association_claim_is_cut_off_at_its_header(
    start_node: StartNode,
) -> None:
    node = start_node()
    echo(node.port)  # the node's first association warms what it caches
    header = struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0)
    junk = random.Random(1).randbytes(64 * 1024)
    outcomes: list[tuple[float, bytes, bool]] = []

    def claim() -> None:
        sock = connect(node.port)
        try:
            sock.sendall(header + junk[:68])  # the fixed part is 74 bytes
            sent = time.monotonic()
            sock.setblocking(False)
            closed = False
            while not closed and time.monotonic() - sent < 5:
                readable, writable, _ = select.select([sock], [sock], [], 0.05)
                if readable:
                    break
                if writable:
                    try:
                        sock.send(junk)
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        closed = True
            seconds = time.monotonic() - sent
            sock.setblocking(True)
            reply, ended = recv_until_closed(sock, 1.0)
            outcomes.append((seconds, reply, closed or ended))
        finally:
            close_quietly(sock)

    with RssPeak() as rss:
        threads = [threading.Thread(target=claim) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=15)

    assert len(outcomes) == 4
    for seconds, reply, closed in outcomes:
        assert closed, "the node kept a 4 GiB claim open"
        assert seconds < 1.0, f"closed {seconds:.2f} s after the header"
        assert is_abort_or_nothing(reply), reply[:16].hex()
    assert rss.growth < 64 * MB, f"RSS grew by {rss.growth / MB:.0f} MB"
    assert echo(node.port) == SUCCESS


def test_idle_connections_cost_nothing_and_are_closed_after_acse_timeout(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    # acse_timeout is 4 s so that the 2 s CPU window falls while all 40 wait.
    node = start_node(max_connections_per_host=64, acse_timeout=4.0)
    gate = node.receiver.server.gate
    echo(node.port)
    opened = time.monotonic()
    attackers.extend(connect(node.port) for _ in range(40))
    wait_until(lambda: gate.pending == 40, 2, "40 connections in the gate")

    status, seconds = timed_echo(node.port)
    assert status == SUCCESS
    assert seconds < 2.0, f"C-ECHO took {seconds:.2f} s"

    cpu = time.process_time()
    time.sleep(2.0)
    cpu_used = time.process_time() - cpu
    assert gate.pending == 40, "idle connections closed before acse_timeout"
    assert all(is_open(s) for s in attackers)
    assert cpu_used < 0.2, f"{cpu_used:.2f} s of CPU over 2 s with 40 idle peers"

    for sock in attackers:
        _, closed = recv_until_closed(sock, opened + 5.0 - time.monotonic())
        assert closed, "an idle connection outlived acse_timeout + 1 s"
    wait_until(
        lambda: gate.pending == 0 and gate.connections_from(ATTACKER) == 0,
        1,
        "the gate to be empty and the attacker to hold no connection",
    )


def test_slow_loris_requests_are_closed_after_acse_timeout(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    node = start_node(max_connections_per_host=64, acse_timeout=2.0)
    echo(node.port)
    request = associate_rq()
    attackers.extend(connect(node.port) for _ in range(40))
    opened = {s.fileno(): time.monotonic() for s in attackers}
    closed_after: dict[int, float] = {}
    stop = threading.Event()

    def trickle() -> None:
        # One byte of a valid A-ASSOCIATE-RQ on each connection every 0.5 s.
        position = 0
        while not stop.is_set() and len(closed_after) < len(attackers):
            for sock in attackers:
                fd = sock.fileno()
                if fd in closed_after:
                    continue
                try:
                    if not is_open(sock):
                        raise ConnectionResetError
                    sock.send(request[position : position + 1])
                except OSError:
                    closed_after[fd] = time.monotonic() - opened[fd]
            position += 1
            stop.wait(0.5)

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        time.sleep(0.6)
        status, seconds = timed_echo(node.port)
        assert status == SUCCESS
        assert seconds < 2.0, f"C-ECHO took {seconds:.2f} s"
        wait_until(lambda: len(closed_after) == 40, 6, "the slow connections closed")
    finally:
        stop.set()
        thread.join()
    # Detected at the next 0.5 s tick at the latest.
    assert max(closed_after.values()) < 2.0 + 1.0 + 0.5
    assert min(closed_after.values()) >= 2.0 - 0.1
    assert node.receiver.server.gate.pending == 0


def test_a_host_over_its_connection_limit_is_closed_at_once(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    node = start_node(max_connections_per_host=3)
    gate = node.receiver.server.gate
    attackers.extend(connect(node.port) for _ in range(3))
    wait_until(lambda: gate.connections_from(ATTACKER) == 3, 2, "3 connections held")

    fourth = connect(node.port)
    attackers.append(fourth)
    started = time.monotonic()
    reply, closed = recv_until_closed(fourth, 2.0)
    assert closed, "the 4th connection from one host was kept"
    assert reply == b""
    assert time.monotonic() - started < 0.5

    assert all(is_open(s) for s in attackers[:3])
    assert echo(node.port) == SUCCESS
    assert all(is_open(s) for s in attackers[:3])
    assert gate.connections_from(ATTACKER) == 3


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
    ],
)
def test_an_ipv6_source_counts_as_its_64_against_the_per_host_limit(
    address: str, host: str
) -> None:
    # One IPv6 host or site holds a /64: counted by address, its 2^64
    # addresses would each have had max_connections_per_host of their own.
    assert source_host(address) == host


def test_a_request_whose_last_item_overruns_the_pdu_is_refused(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    node = start_node()
    request = bytearray(associate_rq())
    user_information = item_offsets(bytes(request))[-3]  # then its 2 sub-items
    assert request[user_information] == 0x50
    length = struct.unpack_from(">H", request, user_information + 2)[0]
    struct.pack_into(">H", request, user_information + 2, length + 64)
    sock = connect(node.port)
    attackers.append(sock)

    sock.sendall(request)
    reply, closed = recv_until_closed(sock, 2.0)

    assert closed
    assert is_abort_or_nothing(reply), reply[:16].hex()
    assert echo(node.port) == SUCCESS


def test_a_request_larger_than_the_receive_buffer_costs_no_cpu_while_it_waits(
    start_node: StartNode,
    attackers: list[socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # From an allowed caller, within ASSOCIATE_RQ_MAX, but larger than the
    # connection's receive buffer: the gate once woke at once, for ever. The
    # buffer is set small (connections take the listener's), as where the
    # kernel's default is small: with autotuning the request may fit, and the
    # case is not tried.
    node = start_node(acse_timeout=4.0)
    listener = node.receiver.server.socket
    assert listener is not None
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    syntaxes = (ImplicitVRLittleEndian,) * 250  # 23 bytes each
    request = associate_rq(
        contexts=tuple((2 * i + 1, VERIFICATION_SOP_CLASS, syntaxes) for i in range(48))
    )
    assert 240 * 1024 < len(request) < ASSOCIATE_RQ_MAX
    sock = connect(node.port, source=NODE_HOST)
    attackers.append(sock)

    def send() -> None:
        with contextlib.suppress(OSError):  # closed at acse_timeout
            sock.sendall(request)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    time.sleep(0.5)  # what fits is in; the rest waits in the sender

    cpu = time.process_time()
    time.sleep(2.0)
    cpu_used = time.process_time() - cpu
    assert cpu_used < 0.3, f"{cpu_used:.2f} s of CPU over 2 s with one request waiting"
    status, seconds = timed_echo(node.port)
    assert status == SUCCESS
    assert seconds < 2.0, f"C-ECHO took {seconds:.2f} s"
    # It rested until acse_timeout ended it.
    reply, closed = recv_until_closed(sock, 4.0)
    assert closed
    assert reply == b""
    # Logged once the connection is closed.
    said = f"of its {len(request)} bytes"
    wait_until(lambda: said in caplog.text, 5, "the refusal logged")
    # A large request within the gate's counts that fits the buffer is
    # associated as ever: 2,048 transfer syntaxes, some private ones of 64
    # characters.
    private = "1.2.826.0.1.3680043.8.498." + "1" * 38
    several = (ImplicitVRLittleEndian,) * 48 + (private,) * 80
    fits = associate_rq(
        contexts=tuple((2 * i + 1, VERIFICATION_SOP_CLASS, several) for i in range(16))
    )
    assert 96 * 1024 < len(fits) < 120 * 1024
    sock = connect(node.port, source=NODE_HOST)
    attackers.append(sock)
    sock.sendall(fits)
    assert read_pdu(sock)[0] == A_ASSOCIATE_AC


@pytest.mark.parametrize(
    ("contexts", "syntaxes", "refused"),
    [
        (129, 1, "proposes 129 presentation contexts"),
        (128, 41, "proposes 5248 transfer syntaxes"),
        (2, 3000, "holds 6008 items"),
    ],
)
def test_a_request_proposing_too_much_is_refused_before_it_is_decoded(
    start_node: StartNode,
    attackers: list[socket.socket],
    caplog: pytest.LogCaptureFixture,
    contexts: int,
    syntaxes: int,
    refused: str,
) -> None:
    # Decoding costs ~20 us a proposed item on the one thread every new
    # connection waits on: 128 contexts of 64 syntaxes took 176 ms. (129
    # contexts need an ID used twice: IDs are odd, 1..255. Short UIDs: the
    # request must fit the connection's buffer to be seen whole.)
    node = start_node()
    request = associate_rq(
        contexts=tuple(
            (
                (2 * i + 1) % 256,
                VERIFICATION_SOP_CLASS,
                ("1.2",) * syntaxes,
            )
            for i in range(contexts)
        )
    )
    sock = connect(node.port, source=NODE_HOST)
    attackers.append(sock)

    sock.sendall(request)
    reply, closed = recv_until_closed(sock, 2.0)

    assert closed
    assert reply[:1] == bytes([A_ABORT])
    wait_until(lambda: f"A-ASSOCIATE-RQ {refused}" in caplog.text, 5, "the refusal")
    assert echo(node.port) == SUCCESS


# --- after association -------------------------------------------------------


def associated(
    port: int,
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...] = (
        (1, VERIFICATION_SOP_CLASS, (ImplicitVRLittleEndian,)),
    ),
) -> socket.socket:
    """Return a raw connection from 127.0.0.1, associated with ``contexts``
    (context id, abstract syntax, transfer syntaxes; Verification by default)."""
    sock = connect(port, source=NODE_HOST)
    sock.sendall(associate_rq(contexts=contexts))
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == A_ASSOCIATE_AC
    return sock


def test_an_oversized_p_data_tf_is_aborted_unread(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    node = start_node()
    sock = associated(node.port)
    attackers.append(sock)

    # The header claims one byte more than max_pdu; no body follows.
    sock.sendall(struct.pack(">BBL", 0x04, 0, node.config.max_pdu + 1))
    reply, closed = recv_until_closed(sock, 2.0)

    assert closed, "the node waited for the body of an oversized PDU"
    assert len(reply) == 10
    assert reply[0] == A_ABORT
    assert node.stored_files() == []
    assert echo(node.port) == SUCCESS


def test_a_c_cancel_is_aborted_and_its_connection_closed(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    # No operation to cancel here; pynetdicom's association thread once failed
    # on one, and the connection was held with nothing reading it.
    node = start_node()
    sock = associated(node.port)
    attackers.append(sock)

    cancel = command_set(0x0FFF, VERIFICATION_SOP_CLASS)
    sock.sendall(p_data_tf(pdv(1, 0x03, cancel)))
    reply, closed = recv_until_closed(sock, 2.0)

    assert closed, "the connection was held after a C-CANCEL"
    assert is_abort_or_nothing(reply), reply[:16].hex()
    assert echo(node.port) == SUCCESS


def _store_command(sop_instance_uid: str = "1.2.3.4", data: bool = True) -> bytes:
    return command_set(
        C_STORE_RQ, CTImageStorage, has_data_set=data, sop_instance_uid=sop_instance_uid
    )


_ECHO = command_set(C_ECHO_RQ, VERIFICATION_SOP_CLASS)
# Messages pynetdicom would answer with another service's response, not answer,
# fail on in its own thread, or read at great cost: each is refused as it
# arrives, with the reason logged (PS3.7 9.3, 10.3; PS3.8 E.2).
_REFUSED_MESSAGES = {
    # Each "last" fragment made pynetdicom decode the command again and open
    # another spool file: 642 of them cost 4.7 s of CPU and left 641 files.
    "a second last command fragment": (
        p_data_tf(*[pdv(1, 0x03, _store_command())] * 50),
        "command fragment after the command set's last one",
    ),
    # Answered with a C-ECHO response, Success.
    "an N-GET on Verification": (
        p_data_tf(pdv(1, 0x03, command_set(0x0110, VERIFICATION_SOP_CLASS))),
        "a DIMSE message the node does not serve (0x0110)",
    ),
    # Not answered at all: the sender waited for its own timeout.
    "an N-CREATE": (
        p_data_tf(pdv(1, 0x03, command_set(0x0140, VERIFICATION_SOP_CLASS))),
        "a DIMSE message the node does not serve (0x0140)",
    ),
    # Answered 0xA700 with a traceback in the log, five per association.
    "a C-STORE without a data set": (
        p_data_tf(pdv(1, 0x03, _store_command(data=False))),
        "C-STORE request without a data set",
    ),
    # Ended pynetdicom's thread by an exception, the connection left unanswered.
    "a C-STORE with an empty SOP Instance UID": (
        p_data_tf(pdv(1, 0x03, _store_command(sop_instance_uid=""))),
        "C-STORE request without AffectedSOPInstanceUID",
    ),
    # Empty fragments never reach a byte limit: 3 MB/s of them held a core.
    "a data set of empty fragments": (
        p_data_tf(pdv(1, 0x03, _store_command()))
        + p_data_tf(*[pdv(1, 0x00, b"")] * 1000),
        "message in more fragments than one for each 512 bytes",
    ),
    # pynetdicom reads a PDU's fragments up to its message's end and drops the
    # rest unread: a second message in the same PDU would be lost.
    "two messages in one PDU": (
        p_data_tf(pdv(1, 0x03, _ECHO), pdv(1, 0x03, _ECHO)),
        "P-DATA fragments after the end of their message",
    ),
}


@pytest.mark.parametrize("case", sorted(_REFUSED_MESSAGES))
def test_a_message_the_node_cannot_serve_as_sent_is_aborted_on_arrival(
    start_node: StartNode,
    attackers: list[socket.socket],
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node")
    node = start_node()
    failures: list[str] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: failures.append(
        f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}"
    )
    try:
        sock = associated(node.port)
        attackers.append(sock)
        data, reason = _REFUSED_MESSAGES[case]
        started = time.process_time()
        with contextlib.suppress(OSError):  # the node may close it mid-send
            sock.sendall(data)
        reply, closed = recv_until_closed(sock, 5.0)
        cpu = time.process_time() - started
    finally:
        threading.excepthook = hook

    assert closed, "the connection was held"
    assert is_abort_or_nothing(reply), reply[:16].hex()
    wait_until(lambda: reason in caplog.text, 5, f"the refusal logged ({reason})")
    assert "Traceback" not in caplog.text
    assert failures == []
    assert cpu < 2.0
    assert echo(node.port) == SUCCESS
    assert node.stored_files() == []
    wait_until(lambda: spool_contents(node) == ["lock"], 10, "the spool emptied")


def test_an_echo_and_stores_in_small_fragments_are_served(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    # Within the fragment budget: a command in fragments of 16 bytes, a data
    # set in fragments of 1 KiB less a PDV header (a sender of 1 KiB PDUs, smaller
    # than dcmtk allows), several to a PDU.
    node = start_node()
    sock = associated(
        node.port,
        contexts=(
            (1, VERIFICATION_SOP_CLASS, (ImplicitVRLittleEndian,)),
            (3, CTImageStorage, (ImplicitVRLittleEndian,)),
        ),
    )
    attackers.append(sock)
    sock.sendall(p_data_tf(pdv(1, 0x03, _ECHO)))
    assert response_status(sock) == SUCCESS
    ds = make_ct(rows=256, columns=256)  # 128 KiB: 130 fragments
    command = _store_command(str(ds.SOPInstanceUID))
    data = encode(ds, True, True)
    assert data is not None
    pieces = [command[i : i + 16] for i in range(0, len(command), 16)]
    sock.sendall(
        p_data_tf(
            *(
                pdv(3, 0x03 if n == len(pieces) - 1 else 0x01, piece)
                for n, piece in enumerate(pieces)
            )
        )
    )
    chunks = [data[i : i + 1018] for i in range(0, len(data), 1018)]
    for start in range(0, len(chunks), 8):
        sock.sendall(
            p_data_tf(
                *(
                    pdv(3, 0x02 if n == len(chunks) - 1 else 0x00, chunks[n])
                    for n in range(start, min(start + 8, len(chunks)))
                )
            )
        )
    assert response_status(sock) == SUCCESS
    assert len(node.stored_files()) == 1


def response_status(sock: socket.socket) -> int:
    """Read a DIMSE response's P-DATA-TF; return its Status (one PDV, PS3.7 E.1)."""
    pdu_type, body = read_pdu(sock)
    assert pdu_type == 0x04, f"PDU type 0x{pdu_type:02X}"
    length = struct.unpack_from(">L", body)[0]
    command = decode(BytesIO(body[6 : 4 + length]), True, True)
    return int(command.Status)


def test_a_store_on_another_sop_classs_context_is_refused(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    # A CT image sent on the Verification context (the only one accepted).
    node = start_node()
    sock = associated(node.port)
    attackers.append(sock)
    ds = make_ct(rows=8, columns=8)
    command = command_set(
        C_STORE_RQ,
        CTImageStorage,
        has_data_set=True,
        sop_instance_uid=str(ds.SOPInstanceUID),
    )
    data_set = encode(ds, True, True)
    assert data_set is not None

    sock.sendall(p_data_tf(pdv(1, 0x03, command), pdv(1, 0x02, data_set)))

    assert response_status(sock) == SOP_CLASS_NOT_SUPPORTED
    assert node.stored_files() == []


def test_a_store_whose_uid_is_over_64_characters_is_answered_and_the_next_stored(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    # pynetdicom aborted the association (every instance after it lost with it).
    node = start_node()
    sock = associated(
        node.port, contexts=((1, CTImageStorage, (ImplicitVRLittleEndian,)),)
    )
    attackers.append(sock)
    sent = []
    for message_id, long_uid in ((1, True), (2, False)):
        ds = make_ct(rows=8, columns=8)
        if long_uid:
            ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498." + "1" * 50  # 76
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's on the long UID
            sock.sendall(store_pdus(message_id, ds))
        sent.append(response_status(sock))

    assert sent == [INVALID_UID, SUCCESS], [f"0x{s:04X}" for s in sent]
    assert len(node.stored_files()) == 1


def test_a_p_data_tf_stalled_mid_body_is_closed_after_idle_timeout(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    node = start_node(idle_timeout=2.0)
    sock = associated(node.port)
    attackers.append(sock)
    echo_rq = pdv(1, 0x03, command_set(C_ECHO_RQ, VERIFICATION_SOP_CLASS))
    pdu = p_data_tf(echo_rq)

    started = time.monotonic()
    sock.sendall(pdu[: len(pdu) // 2])  # and nothing more
    reply, closed = recv_until_closed(sock, 5.0)
    seconds = time.monotonic() - started

    assert closed, "a stalled PDU held its connection"
    assert 2.0 - 0.1 <= seconds < 3.0, f"closed after {seconds:.2f} s"
    assert is_abort_or_nothing(reply), reply[:16].hex()
    assert echo(node.port) == SUCCESS


def test_an_association_ended_by_a_reset_gives_its_place_back(
    start_node: StartNode,
) -> None:
    node = start_node(max_connections_per_host=2)
    gate = node.receiver.server.gate
    for _ in range(4):  # twice the limit: a leaked place would lock the host out
        sock = associated(node.port)
        sock.sendall(struct.pack(">BBLL", A_ABORT, 0, 4, 0))  # A-ABORT, then
        sock.setsockopt(  # a reset instead of an orderly close
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        sock.close()
    wait_until(
        lambda: gate.connections_from(NODE_HOST) == 0, 5, "every place given back"
    )
    assert echo(node.port) == SUCCESS


def test_a_flood_of_command_fragments_is_cut_off(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    node = start_node()
    sock = associated(node.port)
    attackers.append(sock)
    before = rss_bytes()

    # Command fragments that never end a command set, each with data: kept in
    # memory by the receiving side until the message ends, which it never does.
    fragment = p_data_tf(pdv(1, 0x01, b"\x00"), pdv(1, 0x00, b"\x00" * 200_000))
    sent = 0
    try:
        for _ in range(100):
            sock.sendall(fragment)
            sent += len(fragment)
    except OSError:
        pass  # the node ended it
    _, closed = recv_until_closed(sock, 3.0)

    assert closed, "the node kept reading an endless message"
    assert sent < 20_000_000
    assert rss_bytes() - before < 50 * MB
    assert echo(node.port) == SUCCESS


# --- large, oversized and hostile data sets ---------------------------------


def write_large_ct(path: Path, pixel_bytes: int) -> Dataset:
    """Write a CT whose Pixel Data is streamed to disk; return its header."""
    ds = make_ct(rows=8, columns=8)
    del ds.PixelData
    side = int((pixel_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.save_as(path, enforce_file_format=True)
    length = side * side * 2
    chunk = random.Random(6).randbytes(MB)
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))
        left = length
        while left:
            f.write(chunk[: min(left, MB)])
            left -= min(left, MB)
    return ds


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_300_mb_instance_is_received_in_bounded_memory(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node()
    sent = tmp_path / "large.dcm"
    header = write_large_ct(sent, 300 * 1000 * 1000)
    echo(node.port)

    with RssPeak() as rss:
        result = subprocess.run(
            [
                dcmtk("storescu"),
                "-aec",
                "DICOMNODE",
                NODE_HOST,
                str(node.port),
                str(sent),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "TCP_NODELAY": "1"},
            timeout=150,
            check=False,
        )

    assert result.returncode == 0, result.stderr
    stored = node.stored_files()
    assert [p.name for p in stored] == [f"{header.SOPInstanceUID}.dcm"]
    assert dcmread(stored[0], stop_before_pixels=True) == dcmread(
        sent, stop_before_pixels=True
    )
    assert data_set_digest(stored[0]) == data_set_digest(sent)
    assert rss.growth < 100 * MB, f"RSS grew by {rss.growth / MB:.0f} MB"


def test_an_instance_over_max_instance_bytes_is_refused_and_left_nowhere(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    # It aborted the association (and every instance after it with it); the
    # rest of the data set is now dropped unwritten and the C-STORE answered.
    node = start_node(max_instance_bytes=2 * MB)
    large = make_ct(rows=1600, columns=1600)  # 5 MB of pixels
    small = make_ct(rows=8, columns=8)
    quiet_pynetdicom()
    ae = AE(ae_title="TESTSCU")
    ae.requested_contexts = [build_context(CTImageStorage, [ExplicitVRLittleEndian])]
    assoc = ae.associate(NODE_HOST, node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        refused = assoc.send_c_store(large)
        stored = assoc.send_c_store(small)
    finally:
        assoc.release()

    assert refused.get("Status") == OUT_OF_RESOURCES
    assert stored.get("Status") == SUCCESS
    [path] = node.stored_files()
    assert dcmread(path).SOPInstanceUID == small.SOPInstanceUID
    wait_until(lambda: spool_contents(node) == ["lock"], 5, "the spool emptied")
    assert "(0xA700): data set over max_instance_bytes (2097152)" in caplog.text


def store_pdus(message_id: int, ds: Dataset, parts: list[bytes] | None = None) -> bytes:
    """Return a C-STORE-RQ's P-DATA-TFs: its command, then its data set.

    The data set is sent as ``parts`` (one PDU each), after ``ds`` encoded
    Implicit VR Little Endian (in PDUs of at most 200,000 bytes).
    """
    command = command_set(
        C_STORE_RQ,
        CTImageStorage,
        message_id=message_id,
        has_data_set=True,
        sop_instance_uid=str(ds.SOPInstanceUID),
    )
    data = encode(ds, True, True)
    assert data is not None
    chunks = [data[i : i + 200_000] for i in range(0, len(data), 200_000)]
    chunks += parts or []
    pdus = [p_data_tf(pdv(1, 0x03, command))]
    for n, chunk in enumerate(chunks):
        pdus.append(p_data_tf(pdv(1, 0x02 if n == len(chunks) - 1 else 0x00, chunk)))
    return b"".join(pdus)


def test_an_over_size_instance_is_told_apart_from_one_with_its_message_id(
    start_node: StartNode, attackers: list[socket.socket]
) -> None:
    # pynetdicom reads the next message while the one before is handled. Told
    # by Message ID, a good instance sent just before an over-size one of the
    # same ID (a sender reusing IDs) got 0xA700, and the over-size one was
    # stored cut short with Success.
    node = start_node(max_instance_bytes=MB)
    sock = connect(node.port, source=NODE_HOST, timeout=30)
    attackers.append(sock)
    sock.sendall(
        associate_rq(contexts=((1, CTImageStorage, (ImplicitVRLittleEndian,)),))
    )
    assert read_pdu(sock)[0] == A_ASSOCIATE_AC
    busy = [make_ct(rows=360, columns=360, seed=10 + i) for i in range(3)]
    good = make_ct(rows=8, columns=8, seed=1)
    large = make_ct(rows=8, columns=8, seed=2)
    # A private creator and five 250 KB values after it (7FE1,1001-1005).
    extra = [struct.pack("<HHL", 0x7FE1, 0x0010, 2) + b"X "]
    extra += [
        struct.pack("<HHL", 0x7FE1, 0x1000 + k, 250_000) + bytes(250_000)
        for k in range(1, 6)
    ]

    sock.sendall(
        b"".join(store_pdus(1 + i, ds) for i, ds in enumerate(busy))
        + store_pdus(7, good)
        + store_pdus(7, large, [extra[0] + extra[1], *extra[2:]])
    )
    statuses = [response_status(sock) for _ in range(5)]

    assert statuses == [SUCCESS] * 4 + [OUT_OF_RESOURCES], [
        f"0x{s:04X}" for s in statuses
    ]
    stored = {dcmread(path).SOPInstanceUID for path in node.stored_files()}
    assert good.SOPInstanceUID in stored
    assert large.SOPInstanceUID not in stored
    wait_until(lambda: spool_contents(node) == ["lock"], 5, "the spool emptied")


def test_a_deflate_bomb_is_refused_out_of_resources(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node(max_inflated_bytes=1 * MB)
    ds = make_ct(rows=8, columns=8)
    ds.Rows, ds.Columns = 5120, 2048
    ds.PixelData = bytes(20 * MB)  # zeros: a 20 MB data set deflates to ~20 KB
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 1 * MB  # what travels is small
    with path.open("rb") as f:
        head = f.read(144)
        f.seek(144 + int.from_bytes(head[140:144], "little"))
        inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(f.read())
    assert len(inflated) > 20 * MB  # raw deflate, PS3.5 A.5

    status, aborted = send_file(
        node.port, path, CTImageStorage, DeflatedExplicitVRLittleEndian
    )

    assert (status, aborted) == (OUT_OF_RESOURCES, False)
    assert node.stored_files() == []
    wait_until(lambda: spool_contents(node) == ["lock"], 5, "the spool emptied")


@pytest.mark.parametrize(
    ("how", "change"),
    [
        ("cut short", lambda data: data[:-20]),
        ("followed by junk", lambda data: data + b"\xab" * MB),
    ],
)
def test_a_deflated_data_set_that_is_not_one_stream_is_not_understood(
    start_node: StartNode, tmp_path: Path, how: str, change: Callable[[bytes], bytes]
) -> None:
    # Cut short it once got "retry later" (the sender tries for ever); with
    # bytes after its end it was stored with Success, after inflating costs that
    # grew with the square of the junk.
    node = start_node()
    ds = make_ct(rows=64, columns=64)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    path.write_bytes(change(path.read_bytes()))

    status, aborted = send_file(
        node.port, path, CTImageStorage, DeflatedExplicitVRLittleEndian
    )

    assert (status, aborted) == (CANNOT_UNDERSTAND, False), how
    assert node.stored_files() == []


def test_a_deflated_data_set_of_just_over_a_mebibyte_is_stored(
    start_node: StartNode, tmp_path: Path
) -> None:
    # Measured a mebibyte of output at a time: zlib may hold the last bytes
    # of a full output until asked again (this size was once refused).
    node = start_node()
    ds = make_ct(rows=8, columns=8)
    ds.Rows, ds.Columns = 1023, 512
    ds.PixelData = bytes(1023 * 512 * 2)
    ds.ImageComments = ""
    pad = MB + 100 - len(encode_body(ds))
    ds.ImageComments = "x" * (pad - pad % 2)
    assert MB + 5 < len(encode_body(ds)) < MB + 195
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)

    status, aborted = send_file(
        node.port, path, CTImageStorage, DeflatedExplicitVRLittleEndian
    )

    assert (status, aborted) == (SUCCESS, False)
    assert len(node.stored_files()) == 1


def nested_sequences(depth: int) -> bytes:
    """Return (0040,0260) as ``depth`` nested undefined-length sequences (PS3.5 7.5)."""
    sq = struct.pack("<HH2sHL", 0x0040, 0x0260, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    sq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return (sq + item) * depth + (item_end + sq_end) * depth


def test_deeply_nested_sequences_are_not_understood(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node()
    ds = make_ct()
    pixels = Dataset()
    pixels.add_new(0x7FE00010, "OW", ds.PixelData)
    del ds.PixelData
    # Elements in tag order: the CT's (groups 0008..0028), the sequence
    # (0040,0260), then Pixel Data.
    body = encode_body(ds) + nested_sequences(20_000) + encode_body(pixels)
    path = raw_file(
        tmp_path / "nested.dcm",
        body,
        sop_class_uid=CTImageStorage,
        sop_instance_uid=ds.SOPInstanceUID,
    )

    status, aborted = send_file(node.port, path, CTImageStorage, ExplicitVRLittleEndian)

    assert not aborted
    assert status == CANNOT_UNDERSTAND, f"status 0x{status or 0:04X}"
    assert node.stored_files() == []
    assert echo(node.port) == SUCCESS


def test_items_that_claim_more_than_their_sequence_cost_no_more(
    start_node: StartNode, tmp_path: Path
) -> None:
    # 100 sequences of 60 KB, each an item of undefined length never
    # delimited: read from the whole file, each item ran on over the sequences
    # after it, held at once (6 MB peaked at 388 MiB, 12 MB at 1.3 GB).
    node = start_node()
    value = struct.pack("<HH2sHL", 0x0009, 0x1002, b"OB", 0, 60_000) + bytes(60_000)
    unterminated = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + value
    extra = b"".join(
        struct.pack("<HH2sHL", 0x0009, 0x1100 + j, b"SQ", 0, len(unterminated))
        + unterminated
        for j in range(100)
    )
    path = ct_with(tmp_path, extra)

    with RssPeak() as rss:
        status, aborted = send_file(
            node.port, path, CTImageStorage, ExplicitVRLittleEndian
        )

    assert not aborted
    assert status is not None
    assert rss.growth < 100 * MB, f"{rss.growth / MB:.0f} MB"


def test_sequences_of_defined_length_nested_too_deep_are_not_understood(
    start_node: StartNode, tmp_path: Path
) -> None:
    # pydicom reads them only when a value in them is read (scoring does):
    # checked at receipt, 65 levels and more are refused.
    node = start_node()
    inner = b""
    for _ in range(65):
        item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HH2sHL", 0x0009, 0x1000, b"SQ", 0, len(item)) + item
    path = ct_with(tmp_path, inner)

    status, aborted = send_file(node.port, path, CTImageStorage, ExplicitVRLittleEndian)

    assert (status, aborted) == (CANNOT_UNDERSTAND, False)
    assert node.stored_files() == []


def unparsable_sequence(group: int, element: int) -> bytes:
    """Return a sequence of defined length: an empty item, then half a header."""
    items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) + b"\xfe\xff\x00"
    return struct.pack("<HH2sHL", group, element, b"SQ", 0, len(items)) + items


def unknown_vr_element(group: int, element: int) -> bytes:
    """Return an element of VR "ZZ" (not a VR) and a 4-byte value."""
    return struct.pack("<HH2sH", group, element, b"ZZ", 4) + b"ABCD"


@pytest.mark.parametrize(
    ("make", "tag", "expected"),
    [
        (unparsable_sequence, 0x00081140, CANNOT_UNDERSTAND),
        (unparsable_sequence, 0x00091010, SUCCESS),
        (unknown_vr_element, 0x00081030, CANNOT_UNDERSTAND),
        (unknown_vr_element, 0x00091030, SUCCESS),
    ],
    ids=["sequence-public", "sequence-private", "vr-public", "vr-private"],
)
def test_what_does_not_parse_is_not_understood_unless_private(
    start_node: StartNode,
    tmp_path: Path,
    make: Callable[[int, int], bytes],
    tag: int,
    expected: int,
) -> None:
    # pydicom reads a sequence of defined length only when a value in it is
    # read, and an element of an unknown VR fails only where its value is
    # read: both were stored with Success, and the results (which copy the
    # source's public modules) failed on them. A modality's private element
    # pydicom misreads is kept: nothing of the node reads private elements.
    node = start_node()
    path = ct_with(tmp_path, make(tag >> 16, tag & 0xFFFF), tag=tag)

    status, aborted = send_file(node.port, path, CTImageStorage, ExplicitVRLittleEndian)

    assert (status, aborted) == (expected, False), f"status 0x{status or 0:04X}"
    if expected == SUCCESS:
        (stored,) = node.stored_files()
        assert data_set_digest(stored) == data_set_digest(path)
    else:
        assert node.stored_files() == []
    assert echo(node.port) == SUCCESS


def empty_private_elements(count: int) -> bytes:
    """Return ``count`` empty private LO elements in group 0009, 8 bytes each."""
    return b"".join(
        struct.pack("<HH2sH", 0x0009, 0x1000 + i, b"LO", 0) for i in range(count)
    )


def empty_items(count: int) -> bytes:
    """Return private sequence (0009,1000): ``count`` empty items, undefined length."""
    sq = struct.pack("<HH2sHL", 0x0009, 0x1000, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    sq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return sq + item * count + sq_end


def defined_length_items(count: int, element: int = 0x1000) -> bytes:
    """Return private sequence (0009,eeee): ``count`` empty items, defined length."""
    items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) * count
    return struct.pack("<HH2sHL", 0x0009, element, b"SQ", 0, len(items)) + items


def in_an_item(count: int) -> bytes:
    """Return a sequence and an item of undefined length around a sequence of
    ``count`` empty items of defined length."""
    return (
        struct.pack("<HH2sHL", 0x0009, 0x1000, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + defined_length_items(count)
        + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )


def not_an_item_first(count: int) -> bytes:
    """Return a sequence whose one "item" has the Item Delimitation tag and holds
    a sequence of ``count`` empty items."""
    inner = defined_length_items(count)
    fake = struct.pack("<HHL", 0xFFFE, 0xE00D, len(inner)) + inner
    return struct.pack("<HH2sHL", 0x0009, 0x1000, b"SQ", 0, len(fake)) + fake


def ct_with(
    tmp_path: Path, extra: bytes, *, deflated: bool = False, tag: int = 0x00090000
) -> Path:
    """Write a CT whose data set carries ``extra`` (group 0009, or at ``tag``)."""
    ds = make_ct(rows=8, columns=8)
    tail = Dataset({elem.tag: elem for elem in ds if elem.tag > tag})
    for elem in list(tail):
        del ds[elem.tag]
    body = encode_body(ds) + extra + encode_body(tail)
    if deflated:
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = packer.compress(body) + packer.flush()
    return raw_file(
        tmp_path / "elements.dcm",
        body,
        sop_class_uid=CTImageStorage,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=(
            DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
        ),
    )


def assert_refused_out_of_resources(
    node: Node, path: Path, *, deflated: bool, what: str
) -> None:
    """Send ``path``: 0xA700, nothing kept, and the node still answers."""
    syntax = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian

    status, aborted = send_file(node.port, path, CTImageStorage, syntax)

    assert (status, aborted) == (OUT_OF_RESOURCES, False), what
    assert node.stored_files() == []
    assert echo(node.port) == SUCCESS


@pytest.mark.parametrize(
    ("what", "extra", "deflated"),
    [
        ("empty elements", empty_private_elements(3000), False),
        ("empty items of a sequence", empty_items(300), False),  # each counts 4
        ("empty elements, deflated", empty_private_elements(3000), True),
        # pydicom leaves these as bytes; scoring and the results read them.
        ("items of a sequence of defined length", defined_length_items(300), False),
        ("the same, left on disk (over 64 KiB)", defined_length_items(9000), False),
        ("the same, deflated", defined_length_items(300), True),
        ("the same, in an item of undefined length", in_an_item(300), False),
        # pydicom reads any header but the Sequence Delimiter as an item.
        ("the same, its first header not an item's", not_an_item_first(300), False),
    ],
)
def test_a_data_set_of_more_elements_than_max_data_elements_is_refused(
    start_node: StartNode, tmp_path: Path, what: str, extra: bytes, deflated: bool
) -> None:
    # Each empty element costs ~300 bytes of memory once read, an item ~700,
    # for 8 bytes on the wire: 50 MB of them once took the node up 2 GB.
    node = start_node(max_data_elements=1000)
    path = ct_with(tmp_path, extra, deflated=deflated)

    assert_refused_out_of_resources(node, path, deflated=deflated, what=what)


@pytest.mark.parametrize("deflated", [False, True])
def test_a_data_set_within_max_data_elements_is_stored_as_sent(
    start_node: StartNode, tmp_path: Path, deflated: bool
) -> None:
    node = start_node(max_data_elements=1000)
    # 600 elements, a sequence and its 50 items (each counts 4): 801 of 1000.
    extra = empty_private_elements(600) + defined_length_items(50, element=0x2000)
    path = ct_with(tmp_path, extra, deflated=deflated)
    syntax = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian

    status, aborted = send_file(node.port, path, CTImageStorage, syntax)

    assert (status, aborted) == (SUCCESS, False)
    [stored] = node.stored_files()
    stored_ds = dcmread(stored)
    assert len(stored_ds.group_dataset(0x0009)) == 601
    assert len(stored_ds[0x00092000].value) == 50


def private_values(count: int, size: int, element: int = 0x1000) -> bytes:
    """Return ``count`` private OB elements (0009,eeee) of ``size`` zero bytes."""
    return b"".join(
        struct.pack("<HH2sHL", 0x0009, element + i, b"OB", 0, size) + bytes(size)
        for i in range(count)
    )


def in_a_sequence(extra: bytes, *, defined: bool) -> bytes:
    """Return private sequence (0009,0FFF) of one item holding ``extra``."""
    if defined:
        item = struct.pack("<HHL", 0xFFFE, 0xE000, len(extra)) + extra
        return struct.pack("<HH2sHL", 0x0009, 0x0FFF, b"SQ", 0, len(item)) + item
    return (
        struct.pack("<HH2sHL", 0x0009, 0x0FFF, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + extra
        + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )


def encapsulated_value(size: int, element: int = 0x1100) -> bytes:
    """Return private OB (0009,eeee) of undefined length: one fragment of ``size``."""
    return (
        struct.pack("<HH2sHL", 0x0009, element, b"OB", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0)  # empty offset table
        + struct.pack("<HHL", 0xFFFE, 0xE000, size)
        + bytes(size)
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )


# 1.2 MB of values, over a max_in_memory_bytes of 1 MiB.
_SMALL_VALUES = private_values(20, 60_000)  # read when the data set is checked
_MIDDLE_VALUES = private_values(2, 600_000)  # left on disk then, read when scored


@pytest.mark.parametrize(
    ("what", "extra", "deflated"),
    [
        ("values of 60 KB", _SMALL_VALUES, False),
        ("the same, deflated", _SMALL_VALUES, True),
        ("values of 600 KB, read when the image is scored", _MIDDLE_VALUES, False),
        (
            "values in a sequence of undefined length (pydicom reads them all)",
            in_a_sequence(_SMALL_VALUES, defined=False),
            False,
        ),
        (
            "values of 600 KB in a sequence of defined length",
            in_a_sequence(_MIDDLE_VALUES, defined=True),
            False,
        ),
        (
            # pydicom passes over it keeping no length: measured, not guessed.
            "an encapsulated value of 3 MB in a sequence of defined length",
            in_a_sequence(encapsulated_value(3_000_000), defined=True),
            False,
        ),
    ],
)
def test_a_data_set_of_more_values_than_max_in_memory_bytes_is_refused(
    start_node: StartNode,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    what: str,
    extra: bytes,
    deflated: bool,
) -> None:
    # 300 MB of 60 KB values were once stored, taking the node up 300 MB at
    # receipt (and again when scored), once per association at a time.
    node = start_node(max_in_memory_bytes=1024**2)
    path = ct_with(tmp_path, extra, deflated=deflated)

    assert_refused_out_of_resources(node, path, deflated=deflated, what=what)
    assert "more than max_in_memory_bytes (1048576)" in caplog.text


def nested(extra: bytes, levels: int) -> bytes:
    """Return ``extra`` inside ``levels`` sequences of defined length, one item each."""
    for _ in range(levels):
        extra = in_a_sequence(extra, defined=True)
    return extra


@pytest.mark.parametrize(
    ("what", "extra"),
    [
        # 900 KB counted; a 3 MB top-level value stays on disk and is not.
        (
            "values, and one over 1 MiB",
            private_values(15, 60_000) + private_values(1, 3_000_000, element=0x2000),
        ),
        # Each level's bytes are read with it, then its items: counted once.
        ("values in sequences nested 4 deep", nested(private_values(15, 60_000), 4)),
        (
            # pydicom reads the outer one whole: the inner one's items once.
            "the same, in a sequence of undefined length",
            in_a_sequence(nested(private_values(15, 60_000), 2), defined=False),
        ),
        (
            "encapsulated values in a sequence",
            in_a_sequence(encapsulated_value(400_000), defined=True),
        ),
    ],
)
def test_values_within_max_in_memory_bytes_and_long_ones_are_stored_as_sent(
    start_node: StartNode, tmp_path: Path, what: str, extra: bytes
) -> None:
    node = start_node(max_in_memory_bytes=1024**2)
    path = ct_with(tmp_path, extra)

    status, aborted = send_file(node.port, path, CTImageStorage, ExplicitVRLittleEndian)

    assert (status, aborted) == (SUCCESS, False), what
    [stored] = node.stored_files()
    assert data_set_digest(stored) == data_set_digest(path)


# --- floods ------------------------------------------------------------------


def junk_pdus(rng: random.Random, size: int) -> bytes:
    """Return ``size`` bytes of PDUs with random types, lengths and bodies."""
    out = bytearray()
    while len(out) < size:
        body = rng.randbytes(rng.randrange(0, 2048))
        length = rng.choice([len(body), rng.getrandbits(32), rng.randrange(0, 4096)])
        out += struct.pack(">BBL", rng.randrange(256), 0, length) + body
    return bytes(out[:size])


def test_a_junk_flood_is_logged_a_bounded_number_of_times(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node()
    echo(node.port)
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    caplog.set_level(logging.DEBUG, logger="pynetdicom")
    caplog.clear()
    rng = random.Random(10)

    for _ in range(200):
        sock = connect(node.port)
        try:
            # The node may close it while it is being sent.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(junk_pdus(rng, 20 * 1024))
            _, closed = recv_until_closed(sock, 2.0)
            assert closed, "the node kept a connection that sent junk"
        finally:
            close_quietly(sock)

    about_attacker = [r for r in caplog.records if ATTACKER in r.getMessage()]
    assert 1 <= len(about_attacker) <= 10, [r.getMessage() for r in about_attacker]
    assert len(caplog.records) <= 20, [r.getMessage() for r in caplog.records[:30]]
    assert echo(node.port) == SUCCESS


def test_refusals_from_many_sources_are_logged_a_bounded_number_of_times(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    # Each source within its own allowance (5 a minute), but thousands of
    # them (an IPv6 /48 holds 65,536 /64s): 60,000 refusals once made 52,000
    # log lines in 50 s. At most 100 a minute are logged from all sources.
    node = start_node()
    caplog.set_level(logging.WARNING, logger="dicom_node")
    caplog.clear()
    refused = 0
    for n in range(160):
        source = f"127.0.{1 + n // 200}.{1 + n % 200}"
        sock = connect(node.port, source=source)
        try:
            sock.sendall(associate_rq(calling="NOBODY"))
            reply, closed = recv_until_closed(sock, 2.0)
            assert closed
            assert reply[:1] == b"\x03", reply[:16].hex()  # A-ASSOCIATE-RJ
            refused += 1
        finally:
            close_quietly(sock)

    assert refused == 160
    wait_until(
        lambda: "refused (calling AE 'NOBODY'" in caplog.text, 5, "the refusals logged"
    )
    lines = [r for r in caplog.records if "refused (calling AE" in r.getMessage()]
    assert len(lines) == 100, len(lines)
    assert echo(node.port) == SUCCESS


def item_offsets(rq: bytes) -> list[int]:
    """Return where each item and sub-item header of an A-ASSOCIATE-RQ starts."""
    offsets: list[int] = []
    position = 74
    while position + 4 <= len(rq):
        item_type, _, length = struct.unpack(">BBH", rq[position : position + 4])
        offsets.append(position)
        if item_type in (0x20, 0x50):
            inner = position + 4 + (4 if item_type == 0x20 else 0)
            while inner + 4 <= position + 4 + length:
                offsets.append(inner)
                inner += 4 + struct.unpack(">H", rq[inner + 2 : inner + 4])[0]
        position += 4 + length
    return offsets


def mutated_rq(rng: random.Random, rq: bytes) -> bytes:
    """Return one malformed variant of a valid A-ASSOCIATE-RQ."""
    data = bytearray(rq)
    kind = rng.randrange(8)
    if kind == 0:  # truncated
        return bytes(data[: rng.randrange(1, len(data))])
    if kind == 1:  # PDU length off by a little
        struct.pack_into(">L", data, 2, len(data) - 6 + rng.randint(-80, 80))
    elif kind == 2:  # PDU length huge
        struct.pack_into(">L", data, 2, rng.randrange(len(data), 1 << 32))
    elif kind == 3:  # an item of another type
        data[rng.choice(item_offsets(rq))] = rng.randrange(256)
    elif kind == 4:  # an item length wrong
        offset = rng.choice(item_offsets(rq))
        struct.pack_into(">H", data, offset + 2, rng.randrange(1 << 16))
    elif kind == 5:  # random bytes flipped past the AE titles
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(74, len(data))] = rng.randrange(256)
    elif kind == 6:  # random bytes after a plausible header
        body = rng.randbytes(rng.randrange(68, 600))
        return struct.pack(">BBL", 0x01, 0, len(body)) + body
    else:  # trailing garbage (a second, junk PDU)
        data += rng.randbytes(rng.randrange(1, 300))
    return bytes(data)


def malformed_p_data(rng: random.Random) -> bytes:
    """Return one malformed P-DATA-TF for an association on context 1."""
    echo_cmd = command_set(C_ECHO_RQ, VERIFICATION_SOP_CLASS, message_id=7)
    store_cmd = command_set(
        C_STORE_RQ,
        CTImageStorage,
        has_data_set=True,
        sop_instance_uid=generate_uid(),
    )
    kind = rng.randrange(8)
    if kind == 0:  # PDV item length wrong
        item = bytearray(pdv(1, 0x03, echo_cmd))
        struct.pack_into(">L", item, 0, rng.choice([0, 1, 2, rng.getrandbits(32)]))
        return p_data_tf(bytes(item))
    if kind == 1:  # a context that was not negotiated
        return p_data_tf(pdv(rng.choice([0, 3, 5, 255]), 0x03, echo_cmd))
    if kind == 2:  # a truncated command set
        return p_data_tf(pdv(1, 0x03, echo_cmd[: rng.randrange(len(echo_cmd))]))
    if kind == 3:  # random command bytes
        return p_data_tf(pdv(1, 0x03, rng.randbytes(rng.randrange(1, 200))))
    if kind == 4:  # a random message control header
        return p_data_tf(pdv(1, rng.randrange(256), echo_cmd))
    if kind == 5:  # a C-STORE whose data set is junk
        return p_data_tf(
            pdv(1, 0x03, store_cmd), pdv(1, 0x02, rng.randbytes(rng.randrange(300)))
        )
    if kind == 6:  # a C-STORE whose data set never ends
        return p_data_tf(pdv(1, 0x03, store_cmd), pdv(1, 0x00, rng.randbytes(1000)))
    # PDV items that overrun the PDU
    whole = pdv(1, 0x03, echo_cmd)
    return p_data_tf(whole)[: rng.randrange(7, 6 + len(whole))]


def deliver(sock: socket.socket, data: bytes) -> bool:
    """Send, close our side, and return whether the node closed within 3 s."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # reset, or not connected: the node closed it already
        return True
    _, closed = recv_until_closed(sock, 3.0)
    return closed


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_thousand_malformed_pdus_leave_the_node_as_it_was(
    start_node: StartNode,
) -> None:
    node = start_node(acse_timeout=2.0, idle_timeout=3.0)
    echo(node.port)
    threads_before = threading.active_count()
    # No thread of the node (pynetdicom's included) may end by an exception:
    # what pynetdicom would fail on is refused before it reads it.
    failures: list[str] = []
    hook = threading.excepthook

    def failed(args: threading.ExceptHookArgs) -> None:
        where = args.thread.name if args.thread is not None else "?"
        what = f"{args.exc_type.__name__}: {args.exc_value}"
        # pynetdicom's own race (3.0): its upper layer aborts for a PDU it finds
        # out of place (AA-8, state Sta13) while its association thread queues
        # the response to the message before; "P-DATA request" (Evt9) has no
        # action in Sta13 and ends the upper layer's thread. The association
        # sees that and ends; its connection closing, and the node answering,
        # are asserted below. About 1 run in 3 under load.
        if (
            what
            == "InvalidEventError: Invalid event 'Evt9' for the current state 'Sta13'"
        ):
            return
        failures.append(f"{where}: {what}")

    threading.excepthook = failed
    rng = random.Random(1000)
    rq = associate_rq(
        contexts=(
            (1, VERIFICATION_SOP_CLASS, (ImplicitVRLittleEndian,)),
            (3, CTImageStorage, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
        )
    )
    kept_open: list[str] = []
    started = time.monotonic()

    for n in range(500):  # malformed requests, each on its own connection
        data = mutated_rq(rng, rq)
        sock = connect(node.port, timeout=3.0)
        try:
            if not deliver(sock, data):
                kept_open.append(f"request {n}: {data.hex()}")
                break  # the node no longer answers: what follows would wait
        finally:
            close_quietly(sock)

    sent = 0
    while sent < 500 and not kept_open:  # malformed P-DATA-TF, a few per association
        pdus = [malformed_p_data(rng) for _ in range(rng.randint(1, 4))]
        sent += len(pdus)
        sock = associated(node.port)
        try:
            if not deliver(sock, b"".join(pdus)):
                kept_open.append(f"P-DATA-TF after {sent}: {b''.join(pdus).hex()}")
        finally:
            close_quietly(sock)
    elapsed = time.monotonic() - started

    threading.excepthook = hook
    assert kept_open == [], "the node did not close a connection it had read"
    assert failures == []
    status, seconds = timed_echo(node.port)
    assert status == SUCCESS
    assert seconds < 2.0
    assert node.stored_files() == []
    wait_until(lambda: spool_contents(node) == ["lock"], 10, "the spool emptied")
    wait_until(
        lambda: threading.active_count() <= threads_before + 5,
        10,
        "association threads to end",
    )
    assert node.receiver.server.gate.pending == 0
    assert elapsed < 90


# --- restart -----------------------------------------------------------------


def test_a_dead_process_spool_is_swept_at_start_and_a_live_one_kept(
    tmp_path: Path,
    model: Path,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    config = NodeConfig(
        port=0,
        state_dir=tmp_path / "state",
        callers=(CallerConfig("ECHOSCU", NODE_HOST),),
        models=(ModelConfig(model),),
        source="tests",
    )
    incoming = config.storage_dir / Storage.INCOMING
    live = incoming / "999998-live"

    def leave_spools() -> None:
        dead = incoming / "999999-dead"
        dead.mkdir(parents=True)
        (dead / "lock").touch()
        (dead / "0123456789abcdef.part").write_bytes(os.urandom(MB))
        live.mkdir(exist_ok=True)
        (live / "partial.part").write_bytes(b"\x00" * 1024)

    live.mkdir(parents=True)
    lock = os.open(live / "lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a running process's spool
        leave_spools()

        assert Storage(config.storage_dir).sweep_incoming() == 1
        assert sorted(p.name for p in incoming.iterdir()) == ["999998-live"]

        leave_spools()
        port = run_serve(config)

        # The workers load the model as the node starts: a longer wait.
        assert echo(port, timeout=20.0) == SUCCESS
        names = {p.name for p in incoming.iterdir()}
        assert "999999-dead" not in names
        assert "999998-live" in names
        assert sorted(p.name for p in live.iterdir()) == ["lock", "partial.part"]
    finally:
        os.close(lock)
