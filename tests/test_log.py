"""Logging helpers: references instead of UIDs, and the PHI filter."""

from __future__ import annotations

import logging

from dicom_node.log import PhiFilter, describe_exception, uid_ref


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
