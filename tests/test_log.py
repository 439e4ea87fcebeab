"""Logging helpers: references instead of UIDs, the PHI filter, flood limits."""

from __future__ import annotations

import io
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pydicom.valuerep
import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.fsm import StateMachine

from dicom_node.log import (
    OVERFLOW_KEY,
    EscapingFormatter,
    PhiFilter,
    PynetdicomFilter,
    RateLimiter,
    configure_logging,
    describe_exception,
    uid_ref,
)

# Every character a log line must never carry raw: C0 but the line's own
# newline, DEL, C1.
FORBIDDEN = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)] if c != 0x0A]
HOSTILE = "EV\n\x1b[2J\x1b]0;owned\x07\r\x00\x85\x9bIL"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Install configure_logging on a stream, then put the logging state back."""
    root = logging.getLogger()
    node = logging.getLogger("dicom_node")
    saved = (list(root.handlers), root.level, node.level)
    saved_config = (
        pynetdicom_config.LOG_HANDLER_LEVEL,
        pynetdicom_config.LOG_REQUEST_IDENTIFIERS,
        pynetdicom_config.LOG_RESPONSE_IDENTIFIERS,
    )
    stream = io.StringIO()
    saved_hook = threading.excepthook
    configure_logging("INFO", stream=stream)
    try:
        yield stream
    finally:
        threading.excepthook = saved_hook
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        node.setLevel(saved[2])
        logging.captureWarnings(False)
        (
            pynetdicom_config.LOG_HANDLER_LEVEL,
            pynetdicom_config.LOG_REQUEST_IDENTIFIERS,
            pynetdicom_config.LOG_RESPONSE_IDENTIFIERS,
        ) = saved_config


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def assert_no_raw_controls(text: str) -> None:
    for char in FORBIDDEN:
        assert char not in text, f"raw {char!r} in the log"


def test_uid_ref_is_short_stable_and_not_the_uid() -> None:
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"

    assert uid_ref(uid) == uid_ref(uid)
    assert len(uid_ref(uid)) == 12
    assert uid not in uid_ref(uid)
    assert uid_ref(uid) != uid_ref(uid + "1")


def test_filter_withholds_pydicom_value_messages() -> None:
    record = logging.LogRecord(
        "pydicom",
        logging.WARNING,
        __file__,
        1,
        "Invalid value for VR DA: '%s'",
        ("SENTINEL",),
        None,
    )

    assert PhiFilter().filter(record)

    assert "SENTINEL" not in record.getMessage()
    assert "pydicom" in record.getMessage()


def test_filter_withholds_captured_pydicom_warnings() -> None:
    text = (
        "/x/site-packages/pydicom/valuerep.py:440: UserWarning: "
        "Invalid value for VR PN: 'PHI^SENTINEL'"
    )
    record = logging.LogRecord(
        "py.warnings", logging.WARNING, __file__, 1, "%s", (text,), None
    )

    PhiFilter().filter(record)

    assert "SENTINEL" not in record.getMessage()


def test_filter_keeps_node_messages_and_pydicom_errors() -> None:
    node = logging.LogRecord(
        "dicom_node.scp", logging.INFO, __file__, 1, "stored %s", ("abc",), None
    )
    error = logging.LogRecord(
        "pydicom", logging.ERROR, __file__, 1, "failed: %s", ("why",), None
    )

    PhiFilter().filter(node)
    PhiFilter().filter(error)

    assert node.getMessage() == "stored abc"
    assert error.getMessage() == "failed: why"


def test_describe_exception_omits_the_message() -> None:
    try:
        raise ValueError("PHI^SENTINEL")
    except ValueError as exc:
        described = describe_exception(exc)

    assert described.startswith("ValueError at test_log.py:")
    assert "SENTINEL" not in described


def test_control_characters_in_arguments_are_escaped(
    log_stream: io.StringIO,
) -> None:
    logging.getLogger("dicom_node.gate").warning("refused caller %s", HOSTILE)

    text = log_stream.getvalue()
    assert_no_raw_controls(text)
    assert lines_of(log_stream) == [
        f"WARNING dicom_node.gate [{os.getpid()}]: refused caller "
        "EV\\n\\x1b[2J\\x1b]0;owned\\x07\\r\\x00\\x85\\x9bIL"
    ]


def test_non_ascii_text_is_kept(log_stream: io.StringIO) -> None:
    logging.getLogger("dicom_node.gate").warning("station %s", "Zürich Süd ☢")

    assert "station Zürich Süd ☢" in log_stream.getvalue()


def test_pynetdicom_lines_are_escaped(log_stream: io.StringIO) -> None:
    # pynetdicom formats its messages itself, before logging them.
    message = f"Invalid 'Calling AE Title' value '{HOSTILE}' - must not contain"
    logging.getLogger("pynetdicom.utils").error(message)

    assert_no_raw_controls(log_stream.getvalue())
    assert len(lines_of(log_stream)) == 1
    assert "'EV\\n\\x1b[2J" in log_stream.getvalue()


def test_traceback_keeps_its_lines_each_marked_and_never_the_message(
    log_stream: io.StringIO,
) -> None:
    message = f"bad {HOSTILE}\nERROR dicom_node.fake [1]: forged Smith^John"
    try:
        raise ValueError(message)
    except ValueError:
        logging.getLogger("dicom_node.worker").exception("job failed")

    lines = lines_of(log_stream)
    assert lines[0].endswith("job failed")
    assert lines[1] == "| Traceback (most recent call last):"
    assert all(line.startswith("| ") for line in lines[1:])
    assert "raise ValueError(message)" in lines[-2]
    assert lines[-1] == "| ValueError (message not logged: it may quote data)"
    assert "Smith^John" not in log_stream.getvalue()
    assert_no_raw_controls(log_stream.getvalue())


def test_pynetdicom_traceback_is_reduced_to_one_line(
    log_stream: io.StringIO,
) -> None:
    try:
        raise ValueError("Invalid 'Calling AE Title' value 'A\nB' - bad")
    except ValueError as exc:
        logging.getLogger("pynetdicom.dul").exception(exc)

    assert lines_of(log_stream) == [
        f"ERROR pynetdicom.dul [{os.getpid()}]: ValueError: "
        "Invalid 'Calling AE Title' value 'A\\nB' - bad"
    ]


def test_pynetdicom_warning_does_not_quote_a_raw_uid(
    log_stream: io.StringIO,
) -> None:
    peer_uid = "1.2.826.0.1.3680043.9999.20240101.123456"
    message = f"Non-conformant 'Affected SOP Instance UID' value '{peer_uid}'"
    logging.getLogger("pynetdicom.utils").warning(message)
    logging.getLogger("pynetdicom.association").error(
        "No supported service class available for the SOP Class UID '%s'",
        CTImageStorage,
    )

    text = log_stream.getvalue()
    assert peer_uid not in text
    assert CTImageStorage not in text
    assert f"value 'uid:{uid_ref(peer_uid)}'" in text
    assert "SOP Class UID 'uid:CTImageStorage'" in text


def test_pynetdicom_lines_do_not_quote_what_a_peer_sent_as_a_uid(
    log_stream: io.StringIO,
) -> None:
    # Digits-and-dots runs were replaced; a name in a UID's place was not.
    logging.getLogger("pynetdicom.utils").warning(
        "Non-conformant 'Affected SOP Instance UID' value 'DOE^JOHN.1.2.3'"
    )
    try:
        raise ValueError(
            "Invalid 'Affected SOP Class UID' value 'SMITH^JANE' - must not exceed"
        )
    except ValueError as exc:
        logging.getLogger("pynetdicom.dimse").exception(exc)

    text = log_stream.getvalue()
    assert "DOE" not in text
    assert "SMITH" not in text
    assert f"value 'uid:{uid_ref('DOE^JOHN.1.2.3')}'" in text
    assert f"value 'uid:{uid_ref('SMITH^JANE')}' - must not exceed" in text


def test_a_peers_long_value_in_a_pynetdicom_line_costs_little_and_is_cut(
    log_stream: io.StringIO,
) -> None:
    # 64 KB a peer chose, as an abstract syntax in its A-ASSOCIATE-RQ: a
    # pattern tried at every position of it took seconds, holding the GIL.
    value = "'UID' value '" * 4900 + "\nDOE^JOHN"
    # Formatted first, as pynetdicom formats its own messages.
    validation = f"Non-conformant 'Abstract Syntax Name' value '{value}'"
    other = f"Unexpected text {value}"
    started = time.process_time()
    logging.getLogger("pynetdicom.pdu_items").warning(validation)
    logging.getLogger("pynetdicom.utils").error(other)
    spent = time.process_time() - started

    lines = lines_of(log_stream)
    assert spent < 0.5, f"{spent:.2f} s of CPU for two lines"
    assert "DOE" not in lines[0]
    assert f"value 'uid:{uid_ref(value)}'" in lines[0]
    assert len(lines[1]) < 1200
    assert lines[1].endswith(f"({len(value) + 16} characters)")


def test_node_lines_keep_their_numbers(log_stream: io.StringIO) -> None:
    logging.getLogger("dicom_node.scp").warning("listening on %s", "127.0.0.1:11112")

    assert "listening on 127.0.0.1:11112" in log_stream.getvalue()


def test_pydicom_values_stay_withheld(log_stream: io.StringIO) -> None:
    logging.getLogger("pydicom").warning("Invalid value for VR DA: '%s'", "SENTINEL")

    assert "SENTINEL" not in log_stream.getvalue()
    assert "text withheld" in log_stream.getvalue()


def test_distinct_bad_values_cost_a_bounded_number_of_lines_and_no_registry(
    log_stream: io.StringIO,
) -> None:
    # A peer's C-STORE command sets (or data sets) can carry a new bad UID each:
    # pydicom logged and warned each (the warning's text kept by Python for
    # good): 100,000 took 200,000 lines and +70 MB.
    registry = vars(pydicom.valuerep).setdefault("__warningregistry__", {})
    before = len(registry)
    for n in range(1000):
        raw = struct.pack("<HHL", 0x0008, 0x0018, 10) + f"1.2.x{n:05d}".encode()
        read_dataset(io.BytesIO(raw), True, True).get("SOPInstanceUID")

    lines = lines_of(log_stream)
    assert any("pydicom WARNING record (text withheld" in line for line in lines)
    assert len(lines) <= 25, lines[-5:]
    assert len(registry) - before < 10


def test_a_flood_of_pynetdicom_errors_is_bounded(log_stream: io.StringIO) -> None:
    dul = logging.getLogger("pynetdicom.dul")
    for n in range(10_000):
        message = f"Unknown PDU type received '0x{n % 256:02X}'"
        dul.error(message)
        dul.error("Connection closed before the entire PDU was received")

    lines = lines_of(log_stream)
    assert len(lines) == 40
    assert sum("Unknown PDU type" in line for line in lines) == 20


def test_a_flood_ends_with_one_summary_per_template() -> None:
    clock = FakeClock()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(name)s: %(message)s"))
    pynetdicom_filter = PynetdicomFilter(per_key=20, window=60.0, clock=clock)
    handler.addFilter(pynetdicom_filter)
    dul = logging.getLogger("pynetdicom.dul")
    summaries = logging.getLogger("dicom_node.log")
    for logger in (dul, summaries):
        logger.addHandler(handler)
        logger.propagate = False
    try:
        for _ in range(10_000):
            dul.error("The received PDU is shorter than expected (6 of 9 bytes)")
        clock.now += 61
        dul.error("The received PDU is shorter than expected (6 of 9 bytes)")
    finally:
        for logger in (dul, summaries):
            logger.removeHandler(handler)
            logger.propagate = True

    lines = lines_of(stream)
    assert len(lines) == 22
    assert lines[20] == (
        "WARNING dicom_node.log: 9980 similar lines suppressed "
        "in the last 60 s: pynetdicom.dul: The received PDU is shorter than "
        "expected (# of # bytes)"
    )
    assert lines[21].startswith("ERROR pynetdicom.dul: The received PDU")


def test_node_lines_are_not_rate_limited(log_stream: io.StringIO) -> None:
    for n in range(100):
        logging.getLogger("dicom_node.worker").warning("job %d failed", n)

    assert len(lines_of(log_stream)) == 100


def test_rate_limiter_allows_the_first_per_key_then_counts() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_key=5, window=60.0, clock=clock)

    allowed = [limiter.allow("10.0.0.9") for _ in range(12)]
    other = limiter.allow("10.0.0.8")

    assert allowed == [True] * 5 + [False] * 7
    assert other
    assert limiter.drain() == []  # the window has not ended


def test_rate_limiter_drains_once_per_finished_window() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_key=5, window=60.0, clock=clock)
    for _ in range(12):
        limiter.allow("10.0.0.9")
    for _ in range(3):
        limiter.allow("10.0.0.8")

    clock.now += 60

    assert limiter.drain() == [("10.0.0.9", 7)]
    assert limiter.drain() == []
    assert limiter.allow("10.0.0.9")  # a new window, a new allowance


def test_rate_limiter_bounds_all_keys_together_with_total() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_key=5, window=60.0, total=100, clock=clock)

    allowed = [limiter.allow(f"10.0.0.{n % 50}") for n in range(150)]  # 3 each

    assert allowed == [True] * 100 + [False] * 50
    clock.now += 60
    assert dict(limiter.drain()) == {f"10.0.0.{n}": 1 for n in range(50)}
    assert limiter.allow("10.0.0.1")  # a new window, a new allowance


def test_rate_limiter_memory_is_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_key=1, window=60.0, max_keys=100, clock=clock)

    allowed = [limiter.allow(f"10.0.{n // 256}.{n % 256}") for n in range(5_000)]
    assert limiter.allow("10.0.0.0") is False  # a tracked key keeps its count

    assert len(limiter) == 101  # 100 keys and the overflow key
    assert sum(allowed) == 101
    clock.now += 60
    drained = dict(limiter.drain())
    assert drained == {"10.0.0.0": 1, OVERFLOW_KEY: 4_899}
    assert len(limiter) == 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"per_key": 0}, ValueError),
        ({"max_keys": 0}, ValueError),
        ({"window": 0.0}, ValueError),
        ({"per_key": 2.5}, TypeError),
    ],
)
def test_rate_limiter_refuses_bad_settings(
    kwargs: dict[str, float], error: type[Exception]
) -> None:
    with pytest.raises(error):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


def test_hostile_calling_ae_title_is_logged_escaped(log_stream: io.StringIO) -> None:
    ae = AE("NODE")
    ae.add_supported_context(CTImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.server_address[1]  # type: ignore[union-attr]
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(_associate_rq(calling=b"EV\x1b[2J\nIL\x00"))
            sock.settimeout(5)
            assert sock.recv(1)[:1] == b"\x07"  # A-ABORT
        deadline = time.monotonic() + 5
        while "Calling AE Title" not in log_stream.getvalue():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        ae.shutdown()

    text = log_stream.getvalue()
    assert "value 'EV\\x1b[2J\\nIL\\x00' - must not contain" in text
    assert_no_raw_controls(text)
    assert "Traceback" not in text


def _associate_rq(calling: bytes) -> bytes:
    # PS3.8 9.3.2: A-ASSOCIATE-RQ with only its Application Context Item.
    context = b"1.2.840.10008.3.1.1.1"
    item = struct.pack(">BBH", 0x10, 0, len(context)) + context
    body = (
        struct.pack(">HH", 1, 0)
        + b"NODE".ljust(16)
        + calling.ljust(16)
        + bytes(32)
        + item
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def test_pynetdicom_threads_ended_by_its_exceptions_are_rate_limited(
    log_stream: io.StringIO,
) -> None:
    # pynetdicom's upper-layer threads ("Thread-N (run_reactor)") can die of
    # its own state-machine errors, once per connection a peer can provoke.
    def fail() -> None:
        StateMachine(cast(Any, None)).do_action("Evt9")  # no action in Sta1

    for n in range(60):
        thread = threading.Thread(target=fail, name=f"Thread-{n} (run_reactor)")
        thread.start()
        thread.join()

    ended = [line for line in lines_of(log_stream) if "ended by an exception" in line]
    assert ended, "not logged at all"
    assert len(ended) <= 20
    assert all(line.startswith("ERROR pynetdicom.thread ") for line in ended)


def test_a_thread_ended_by_an_exception_is_logged_without_its_text(
    log_stream: io.StringIO,
) -> None:
    def fail() -> None:
        raise ValueError("PHI^SENTINEL\nERROR forged line")

    thread = threading.Thread(target=fail, name="AcceptorThread@1")
    thread.start()
    thread.join()

    text = log_stream.getvalue()
    assert "thread AcceptorThread@1 ended by an exception: ValueError at" in text
    assert "SENTINEL" not in text
    assert len(text.splitlines()) == 1
