"""Sending results: every response reaches the request that waits for it."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import build_context

from dicom_node.dimse import VERIFICATION_SOP_CLASS
from dicom_node.errors import AssociationError, AssociationRejectedError
from dicom_node.export import Peer, associate, echo, send_files
from tests.factories import make_ct
from tests.helpers import Destination, RunningNode, free_port
from tests.hostile_peers import APPLICATION_CONTEXT


def _store_while_polled(
    destination: Destination, datasets: list[Dataset], *, guarded: bool
) -> list[int | None]:
    """Send over one association while another thread polls its DIMSE queue.

    The polling thread does what pynetdicom's reactor thread does when its
    pause before a request misses: it reads the queue without blocking.
    """
    peer = Peer("DEST", "127.0.0.1", destination.port)
    context = build_context(
        datasets[0].SOPClassUID, [datasets[0].file_meta.TransferSyntaxUID]
    )
    statuses: list[int | None] = []
    for ds in datasets:  # one association per send: a lost response aborts it
        with associate(peer, [context], "TESTSCU", timeout=1.0) as link:
            stop = threading.Event()

            def poll(assoc: Any = link.assoc, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    assoc.dimse.get_msg(block=False)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            try:
                if guarded:
                    statuses.append(link.send_c_store(ds))
                else:  # past the guard: pynetdicom's own request
                    rsp = link.assoc.send_c_store(ds)
                    statuses.append(int(rsp.Status) if "Status" in rsp else None)
            except AssociationError:
                statuses.append(None)
            finally:
                stop.set()
                poller.join()
    return statuses


def test_a_response_is_not_taken_by_the_reactor(destination: Destination) -> None:
    """Without the guard this lost the response of 2 sends in 5 (each one a
    DIMSE timeout and an aborted association); with it, none in 10."""
    datasets = [make_ct() for _ in range(10)]
    assert _store_while_polled(destination, datasets, guarded=True) == [0x0000] * 10
    assert len(destination.received) == 10


@pytest.fixture
def listener() -> Iterator[Callable[[Callable[[socket.socket], object]], int]]:
    """Start a raw TCP peer on loopback that treats each connection with a function."""
    servers: list[socket.socket] = []

    def start(serve: Callable[[socket.socket], object]) -> int:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def accept() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return  # closed by the fixture
                with conn:
                    serve(conn)

        threading.Thread(target=accept, daemon=True).start()
        return int(server.getsockname()[1])

    try:
        yield start
    finally:
        for server in servers:
            server.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


def test_a_refused_connection_is_called_refused() -> None:
    port = _closed_port()

    with pytest.raises(AssociationError) as caught:
        echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=5)

    assert str(caught.value).startswith(f"connection refused by 127.0.0.1:{port}")
    assert "aborted" not in str(caught.value)


def test_a_silent_peer_is_no_answer_within_the_timeout(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    done = threading.Event()
    port = listener(lambda conn: done.wait(10))  # connects, never answers

    try:
        with pytest.raises(AssociationError) as caught:
            echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=1)
    finally:
        done.set()

    assert "no answer" in str(caught.value)
    assert "within 1 s" in str(caught.value)


def test_an_abort_is_called_an_abort_by_the_peer(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    a_abort = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # PS3.8 9.3.8, source 0

    def answer(conn: socket.socket) -> None:
        conn.recv(65536)  # the A-ASSOCIATE-RQ
        conn.sendall(a_abort)
        conn.recv(1)  # until our side closes

    port = listener(answer)

    with pytest.raises(AssociationError) as caught:
        echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=5)

    assert f"aborted by the peer PACS@127.0.0.1:{port}" in str(caught.value)


def test_every_rejection_is_read_as_one_with_its_reason(node: RunningNode) -> None:
    """The node's gate rejects and closes at once; that once read as "aborted"."""
    peer = Peer("DICOMNODE", "127.0.0.1", node.port)
    for _ in range(20):
        with pytest.raises(AssociationRejectedError) as caught:
            echo(peer, "STRANGER", timeout=5)
        rejection = caught.value
        assert (rejection.result, rejection.source, rejection.reason) == (1, 1, 3)
        assert str(rejection) == (
            f"rejected by the peer {peer}: calling AE title not recognised "
            "(result 1 rejected-permanent, source 1 service-user, reason 3)"
        )


def test_send_files_names_a_refused_connection(tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    make_ct().save_as(path, enforce_file_format=True)
    port = _closed_port()

    report = send_files([path], Peer("PACS", "127.0.0.1", port), "TESTSCU", 5)

    (outcome,) = report.outcomes
    assert outcome.status is None
    assert outcome.error.startswith(
        f"association failed: connection refused by 127.0.0.1:{port}"
    )
    assert outcome.rejection is None


def _stream_until_refused(conn: socket.socket, seconds: float) -> int:
    """Send zeros until the other side stops taking them; return bytes sent."""
    conn.settimeout(seconds)
    chunk, sent, end = bytes(1 << 16), 0, time.monotonic() + seconds
    with contextlib.suppress(OSError):
        while time.monotonic() < end:
            sent += conn.send(chunk)
    return sent


def test_a_peer_claiming_a_huge_association_pdu_is_cut_at_its_header(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """Before, the 4 GiB the header claimed were read for as long as the peer
    sent them: the sending thread stuck, the process growing by what came."""
    streamed: list[int] = []

    def answer(conn: socket.socket) -> None:
        conn.recv(65536)  # the A-ASSOCIATE-RQ
        conn.sendall(bytes([0x02, 0]) + struct.pack(">L", 0xFFFFFFFF))
        streamed.append(_stream_until_refused(conn, 10))

    port = listener(answer)
    started = time.monotonic()

    with pytest.raises(AssociationError) as caught:
        echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=5)

    assert time.monotonic() - started < 4  # at the header, not the timeout
    assert str(caught.value) == (
        f"the node aborted the association with PACS@127.0.0.1:{port}: "
        "association PDU of 4294967295 bytes exceeds 262144"
    )
    assert _wait_for(lambda: bool(streamed), 10)
    assert streamed[0] < 32 << 20  # what socket buffers hold, not what was sent


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_a_peer_dripping_its_answer_is_cut_after_the_timeout(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """An A-ASSOCIATE-AC a byte at a time: each byte used to restart the wait."""

    def answer(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(bytes([0x02, 0]) + struct.pack(">L", 200))
        with contextlib.suppress(OSError):
            for _ in range(100):
                conn.sendall(b"\0")
                time.sleep(0.1)

    port = listener(answer)
    started = time.monotonic()

    with pytest.raises(AssociationError) as caught:
        echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=1)

    assert time.monotonic() - started < 5  # the peer drips for 10 s
    assert str(caught.value) == (
        f"the node aborted the association with PACS@127.0.0.1:{port}: "
        "PDU body not received within 1 s"
    )


def test_a_peer_that_stops_reading_is_given_up_after_the_timeout(
    destination: Destination,
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """A destination that accepts the association and then takes no more bytes
    held the sending thread for ever (pynetdicom sends with no time limit)."""
    ds = make_ct(rows=4608, columns=4608)  # 42 MB: more than socket buffers hold
    done = threading.Event()

    def relay(conn: socket.socket) -> None:
        # The real destination associates; then nothing more is read.
        with socket.create_connection(("127.0.0.1", destination.port)) as up:
            up.sendall(conn.recv(65536))
            conn.sendall(up.recv(65536))
            done.wait(20)

    port = listener(relay)
    context = build_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    started = time.monotonic()
    try:
        with (
            associate(Peer("DEST", "127.0.0.1", port), [context], "TESTSCU", 1) as link,
            pytest.raises(AssociationError) as caught,
        ):
            link.send_c_store(ds)
    finally:
        done.set()

    assert time.monotonic() - started < 10  # the relay holds on for 20 s
    assert str(caught.value) == (
        "no C-STORE response: the node aborted the association with "
        f"DEST@127.0.0.1:{port}: the peer took no data for 1 s"
    )
    assert destination.received == []


def test_a_response_to_another_request_is_not_taken_as_its_answer() -> None:
    """A Success naming another Message ID was taken as the instance stored."""
    from pynetdicom import evt

    from dicom_node.demo.pacs import receiver_ae

    def on_store(event: Any) -> int:
        send = event.assoc.dimse.send_msg

        def shifted(rsp: Any, context_id: int) -> None:
            rsp.MessageIDBeingRespondedTo += 7
            send(rsp, context_id)

        event.assoc.dimse.send_msg = shifted
        return 0x0000

    port = free_port()
    server = receiver_ae("PACS").start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    ds = make_ct()
    context = build_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    try:
        with associate(
            Peer("PACS", "127.0.0.1", port), [context], "TESTSCU", 5
        ) as link:
            with pytest.raises(AssociationError) as caught:
                link.send_c_store(ds)
            assert not link.is_established
    finally:
        server.shutdown()

    assert str(caught.value) == (
        f"no C-STORE response from PACS@127.0.0.1:{port}: the C-STORE response "
        "is to Message ID 8, not 1 of the request; the association was aborted"
    )


# --- destinations that answer with what a response never holds ---


def _exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def _p_data(context_id: int, control: int, value: bytes) -> bytes:
    """One P-DATA-TF PDU of one fragment (PS3.8 9.3.5, E.2)."""
    return _pdu(4, struct.pack(">LBB", len(value) + 2, context_id, control) + value)


def _accept(
    conn: socket.socket, *, max_length: int = 16382, transfer_syntax: bool = True
) -> tuple[int, int]:
    """Read the A-ASSOCIATE-RQ, accept its first context; return it and the ID
    of the C-ECHO request that follows."""
    from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
    from pynetdicom.pdu_items import (
        ApplicationContextItem,
        MaximumLengthSubItem,
        PresentationContextItemAC,
        TransferSyntaxSubItem,
        UserInformationItem,
    )

    header = _exactly(conn, 6)
    rq_bytes = header + _exactly(conn, struct.unpack(">L", header[2:])[0])
    rq = A_ASSOCIATE_RQ()
    rq.decode(rq_bytes)
    proposed = rq.presentation_context[0]
    application = ApplicationContextItem()
    application.application_context_name = APPLICATION_CONTEXT
    context = PresentationContextItemAC()
    context.presentation_context_id = proposed.context_id
    context.result_reason = 0
    syntax = TransferSyntaxSubItem()
    syntax.transfer_syntax_name = proposed.transfer_syntax[0]
    context.transfer_syntax_sub_item = [syntax] if transfer_syntax else []
    length = MaximumLengthSubItem()
    length.maximum_length_received = max_length
    user = UserInformationItem()
    user.user_data = [length]
    ac = A_ASSOCIATE_AC()
    ac.protocol_version = 1
    ac.variable_items = [application, context, user]
    encoded = bytearray(ac.encode())
    encoded[10:42] = rq_bytes[10:42]  # the AE titles, as the request gave them
    conn.sendall(bytes(encoded))
    context_id = int(proposed.context_id or 0)
    if not transfer_syntax or max_length < 1024:
        return context_id, 0
    command = b""
    while True:  # the C-ECHO request: command fragments up to the last one
        pdu_type, length = struct.unpack(">BxL", _exactly(conn, 6))
        body = _exactly(conn, length)
        if pdu_type != 4:
            raise EOFError
        command += body[6:]
        if body[5] & 0x02:
            request = decode(BytesIO(command), True, True)
            return context_id, int(request.MessageID)


def _echo_response(message_id: int, *, data_set: bool = False) -> bytes:
    rsp = Dataset()
    rsp.CommandGroupLength = 0
    rsp.AffectedSOPClassUID = VERIFICATION_SOP_CLASS
    rsp.CommandField = 0x8030  # C-ECHO-RSP
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.CommandDataSetType = 0x0001 if data_set else 0x0101
    rsp.Status = 0x0000
    rsp.CommandGroupLength = len(encode(rsp, True, True) or b"") - 12
    return bytes(encode(rsp, True, True) or b"")


@pytest.mark.parametrize("max_length", [6, 7, 1023])
def test_a_peer_taking_tiny_pdus_is_refused(
    listener: Callable[[Callable[[socket.socket], object]], int], max_length: int
) -> None:
    """At 6 pynetdicom failed with ZeroDivisionError; at 7 it sent a 2 MB file a
    byte a PDU (a minute, 700 MB)."""
    port = listener(lambda conn: (_accept(conn, max_length=max_length), conn.recv(1)))

    with pytest.raises(AssociationError) as caught:
        echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=5)

    assert str(caught.value) == (
        f"PACS@127.0.0.1:{port} accepted the association, but its Maximum Length "
        f"Received is {max_length} bytes; the node sends no PDUs under 1024"
    )


def test_a_context_accepted_without_a_transfer_syntax_is_refused(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """pynetdicom failed with IndexError when sending on it, which ended the
    outbox's step and left the deliveries held until their lease ran out."""
    port = listener(lambda conn: (_accept(conn, transfer_syntax=False), conn.recv(1)))

    with pytest.raises(AssociationError) as caught:
        echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=5)

    assert str(caught.value) == (
        f"PACS@127.0.0.1:{port} accepted the association, but it accepted a "
        "presentation context without a transfer syntax"
    )


def _answered(
    listener: Callable[[Callable[[socket.socket], object]], int],
    answer: Callable[[socket.socket, int, int], object],
) -> tuple[str, int]:
    """Echo a peer that answers with ``answer``; return the error and the bytes
    the peer sent before the node stopped taking them."""
    streamed: list[int] = []

    def serve(conn: socket.socket) -> None:
        context, message_id = _accept(conn)
        with contextlib.suppress(OSError):
            answer(conn, context, message_id)
        streamed.append(_stream_until_refused(conn, 10))

    port = listener(serve)
    with pytest.raises(AssociationError) as caught:
        echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=5)
    assert _wait_for(lambda: bool(streamed), 15)
    return str(caught.value).replace(f"PACS@127.0.0.1:{port}", "PACS"), streamed[0]


def test_a_command_set_that_never_ends_is_cut(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """pynetdicom kept the fragments of a command set until its last one: the
    process grew by 1.2 GB in 10 s."""

    def endless(conn: socket.socket, context: int, _: int) -> None:
        fragment = _p_data(context, 0x01, bytes(16000))
        for _ in range(100_000):
            conn.sendall(fragment)

    error, _ = _answered(listener, endless)
    assert error == (
        "no C-ECHO response: the node aborted the association with PACS: a "
        "command set over 65536 bytes"
    )


def test_a_data_set_with_a_response_is_cut_and_not_taken_as_the_answer(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """A Success followed by a streamed data set: 680 MB held, and the file
    counted as sent."""

    def with_data(conn: socket.socket, context: int, message_id: int) -> None:
        conn.sendall(_p_data(context, 0x03, _echo_response(message_id, data_set=True)))
        fragment = _p_data(context, 0x00, bytes(16000))
        for _ in range(100_000):
            conn.sendall(fragment)

    error, _ = _answered(listener, with_data)
    assert error == (
        "no C-ECHO response: the node aborted the association with PACS: a data "
        "set with a response (C-STORE and C-ECHO responses have none)"
    )


def test_a_response_on_a_context_never_accepted_is_not_the_answer(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    def elsewhere(conn: socket.socket, context: int, message_id: int) -> None:
        conn.sendall(_p_data(context + 98, 0x03, _echo_response(message_id)))

    error, _ = _answered(listener, elsewhere)
    assert error == (
        "no C-ECHO response: the node aborted the association with PACS: P-DATA "
        "on a presentation context that was not accepted"
    )


def test_a_response_in_one_byte_fragments_is_taken(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    def byte_by_byte(conn: socket.socket) -> None:
        context, message_id = _accept(conn)
        command = _echo_response(message_id)
        for at in range(len(command)):
            last = at == len(command) - 1
            conn.sendall(_p_data(context, 0x03 if last else 0x01, command[at : at + 1]))
        with contextlib.suppress(OSError, EOFError):
            _exactly(conn, 10)  # the A-RELEASE-RQ
            conn.sendall(_pdu(6, bytes(4)))  # A-RELEASE-RP
            conn.recv(1)

    port = listener(byte_by_byte)

    assert echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=5) == 0x0000
