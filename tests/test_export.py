"""Sending results: every response reaches the request that waits for it."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom.presentation import build_context

from dicom_node.dimse import VERIFICATION_SOP_CLASS
from dicom_node.errors import AssociationError, AssociationRejectedError
from dicom_node.export import Peer, associate, echo, send_files
from tests.factories import make_ct
from tests.helpers import Destination, RunningNode, wait_for
from tests.hostile_peers import (
    accept_association,
    p_data_tf,
    pdv,
    read_command,
    read_pdu,
    recv_until_closed,
    response_set,
)


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

    assert time.monotonic() - started < 8  # at the header; the peer streams 10 s
    assert str(caught.value) == (
        f"the node aborted the association with PACS@127.0.0.1:{port}: "
        "association PDU of 4294967295 bytes exceeds 262144"
    )
    wait_for(lambda: bool(streamed), 10, "the peer to stop")
    assert streamed[0] < 32 << 20  # what socket buffers hold, not what was sent


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
        # The real destination associates; then nothing more is read (into a
        # small buffer: the node's sends find no room at once).
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with socket.create_connection(("127.0.0.1", destination.port)) as up:
            up.sendall(conn.recv(65536))
            conn.sendall(up.recv(65536))
            done.wait(20)

    port = listener(relay)
    context = build_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    started = time.monotonic()
    try:
        with (
            associate(Peer("DEST", "127.0.0.1", port), [context], "TESTSCU", 3) as link,
            pytest.raises(AssociationError) as caught,
        ):
            link.send_c_store(ds)
    finally:
        done.set()

    assert time.monotonic() - started < 15  # the relay holds on for 20 s
    # Whichever comes first: a send that took nothing for the timeout, or the
    # whole message still unsent at twice the timeout and a grace.
    assert str(caught.value) in {
        "no C-STORE response: the node aborted the association with "
        f"DEST@127.0.0.1:{port}: {why}"
        for why in (
            "the peer took no data for 3 s",
            "the C-STORE was not taken 8 s after it was queued",
        )
    }


# --- destinations that answer with what a response never holds ---


def _answer(
    listener: Callable[[Callable[[socket.socket], object]], int],
    answer: Callable[[socket.socket, int, int], object],
    **accepting: Any,
) -> str:
    """Echo a peer that accepts and then answers with ``answer``(connection,
    context ID, Message ID); return the error, the peer named PACS."""

    def serve(conn: socket.socket) -> None:
        accept_association(conn, **accepting)
        if accepting:
            conn.recv(1)  # the node refuses the acceptance
            return
        context, request = read_command(conn)
        with contextlib.suppress(OSError):
            answer(conn, context, int(request.MessageID))
        recv_until_closed(conn, 10)

    port = listener(serve)
    with pytest.raises(AssociationError) as caught:
        echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=5)
    return str(caught.value).replace(f"PACS@127.0.0.1:{port}", "PACS")


@pytest.mark.parametrize("max_length", [6, 7, 1023])
def test_a_peer_taking_tiny_pdus_is_refused(
    listener: Callable[[Callable[[socket.socket], object]], int], max_length: int
) -> None:
    """At 6 pynetdicom failed with ZeroDivisionError; at 7 it sent a 2 MB file a
    byte a PDU (a minute, 700 MB)."""
    error = _answer(listener, lambda *_: None, max_length=max_length)
    assert error == (
        f"PACS accepted the association, but its Maximum Length Received is "
        f"{max_length} bytes; the node sends no PDUs under 1024"
    )


def test_a_context_accepted_without_a_transfer_syntax_is_refused(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """pynetdicom failed with IndexError when sending on it, which ended the
    outbox's step and left the deliveries held until their lease ran out."""
    error = _answer(listener, lambda *_: None, transfer_syntax=False)
    assert error == (
        "PACS accepted the association, but it accepted a presentation context "
        "without a transfer syntax"
    )


def test_a_command_set_that_never_ends_is_cut(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """pynetdicom kept the fragments of a command set until its last one: the
    process grew by 1.2 GB in 10 s."""

    def endless(conn: socket.socket, context: int, _: int) -> None:
        fragment = p_data_tf(pdv(context, 0x01, bytes(16000)))
        for _ in range(100_000):
            conn.sendall(fragment)

    assert _answer(listener, endless) == (
        "no C-ECHO response: the node aborted the association with PACS: a "
        "command set over 65536 bytes"
    )


def test_a_data_set_with_a_response_is_cut_and_not_taken_as_the_answer(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """A Success followed by a streamed data set: 680 MB held, and the file
    counted as sent."""

    def with_data(conn: socket.socket, context: int, message_id: int) -> None:
        response = response_set(
            0x8030, VERIFICATION_SOP_CLASS, message_id, has_data_set=True
        )
        conn.sendall(p_data_tf(pdv(context, 0x03, response)))
        fragment = p_data_tf(pdv(context, 0x00, bytes(16000)))
        for _ in range(100_000):
            conn.sendall(fragment)

    assert _answer(listener, with_data) == (
        "no C-ECHO response: the node aborted the association with PACS: a data "
        "set with a response (C-STORE and C-ECHO responses have none)"
    )


def test_a_response_on_a_context_never_accepted_is_not_the_answer(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    def elsewhere(conn: socket.socket, context: int, message_id: int) -> None:
        response = response_set(0x8030, VERIFICATION_SOP_CLASS, message_id)
        conn.sendall(p_data_tf(pdv(context + 98, 0x03, response)))

    assert _answer(listener, elsewhere) == (
        "no C-ECHO response: the node aborted the association with PACS: P-DATA "
        "on a presentation context that was not accepted"
    )


def test_a_response_to_another_message_id_is_not_the_answer(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """pynetdicom took the next response as the answer, whatever it named: a
    Success for another request counted an instance as stored."""

    def shifted(conn: socket.socket, context: int, message_id: int) -> None:
        response = response_set(0x8030, VERIFICATION_SOP_CLASS, message_id + 7)
        conn.sendall(p_data_tf(pdv(context, 0x03, response)))

    assert _answer(listener, shifted) == (
        "no C-ECHO response from PACS: the C-ECHO response is to Message ID 8, "
        "not 1 of the request; the association was aborted"
    )


def test_a_response_of_another_kind_is_not_the_answer(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    def other_kind(conn: socket.socket, context: int, message_id: int) -> None:
        response = response_set(0x8001, VERIFICATION_SOP_CLASS, message_id)
        conn.sendall(p_data_tf(pdv(context, 0x03, response)))

    assert _answer(listener, other_kind) == (
        "no C-ECHO response from PACS: the peer answered a C-ECHO request with a "
        "C-STORE message; the association was aborted"
    )


def test_a_response_on_another_accepted_context_is_not_the_answer(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    def serve(conn: socket.socket) -> None:
        accepted = accept_association(conn)
        context, request = read_command(conn)
        other = next(c for c in accepted if c != context)
        response = response_set(0x8030, VERIFICATION_SOP_CLASS, request.MessageID)
        with contextlib.suppress(OSError):
            conn.sendall(p_data_tf(pdv(other, 0x03, response)))
            recv_until_closed(conn, 10)

    port = listener(serve)
    contexts = [
        build_context(VERIFICATION_SOP_CLASS),
        build_context(CTImageStorage),
    ]
    with (
        associate(Peer("PACS", "127.0.0.1", port), contexts, "TESTSCU", 5) as link,
        pytest.raises(AssociationError) as caught,
    ):
        link.send_c_echo()

    assert str(caught.value) == (
        f"no C-ECHO response from PACS@127.0.0.1:{port}: the C-ECHO response came "
        "on presentation context 3, not 1 of the request; the association was "
        "aborted"
    )


def test_a_response_in_one_byte_fragments_is_taken(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    def byte_by_byte(conn: socket.socket) -> None:
        accept_association(conn)
        context, request = read_command(conn)
        response = response_set(0x8030, VERIFICATION_SOP_CLASS, request.MessageID)
        for at in range(len(response)):
            last = at == len(response) - 1
            piece = response[at : at + 1]
            conn.sendall(p_data_tf(pdv(context, 0x03 if last else 0x01, piece)))
        with contextlib.suppress(OSError, ConnectionError):
            read_pdu(conn)  # the A-RELEASE-RQ
            conn.sendall(bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RP
            conn.recv(1)

    port = listener(byte_by_byte)

    assert echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=5) == 0x0000


def test_a_release_asked_for_instead_of_an_answer_is_named(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """It read "no C-ECHO response within 2 s", as if the peer were slow."""

    def serve(conn: socket.socket) -> None:
        accept_association(conn)
        read_command(conn)
        with contextlib.suppress(OSError):
            conn.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ
        recv_until_closed(conn, 10)

    port = listener(serve)
    with pytest.raises(AssociationError) as caught:
        echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=2)

    assert str(caught.value) == (
        f"no C-ECHO response from PACS@127.0.0.1:{port}: it asked to release the "
        "association (A-RELEASE-RQ) instead of answering"
    )


def test_a_peer_reading_a_byte_at_a_time_is_given_up_past_the_timeout(
    listener: Callable[[Callable[[socket.socket], object]], int],
) -> None:
    """Each send made some progress, so no send timed out: pynetdicom gave up
    waiting for the response at the timeout, then waited for its reactor to
    finish sending 4 MB at ~5 KB/s."""
    ds = make_ct(rows=1448, columns=1448)  # 4 MB
    done = threading.Event()

    def trickle(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        accept_association(conn)
        with contextlib.suppress(OSError):
            while not done.is_set() and conn.recv(1024):
                time.sleep(0.2)

    port = listener(trickle)
    context = build_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    started = time.monotonic()
    try:
        with (
            associate(Peer("PACS", "127.0.0.1", port), [context], "TESTSCU", 2) as link,
            pytest.raises(AssociationError) as caught,
        ):
            link.send_c_store(ds)
    finally:
        done.set()

    assert time.monotonic() - started < 20  # twice 2 s, a grace of 2, the release
    assert str(caught.value) == (
        "no C-STORE response: the node aborted the association with "
        f"PACS@127.0.0.1:{port}: the C-STORE was not taken 6 s after it was queued"
    )
