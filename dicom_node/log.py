"""Logging without patient data: configure_logging, PhiFilter and uid_ref."""

from __future__ import annotations

import hashlib
import logging
import sys
import traceback

from pynetdicom import _config as pynetdicom_config

__all__ = [
    "PhiFilter",
    "configure_logging",
    "describe_exception",
    "quiet_pynetdicom",
    "uid_ref",
]

# Loggers whose records below ERROR may quote data element values verbatim, e.g.
# pydicom's "Invalid value for VR DA: '<value>'".
_VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom")


def uid_ref(uid: object) -> str:
    """Return a short, stable reference to a UID that is safe to log.

    Parameters
    ----------
    uid
        A UID (or any value that identifies an object).

    Returns
    -------
    str
        The first 12 hex digits of the SHA-256 of ``str(uid)``.
    """
    return hashlib.sha256(str(uid).encode("utf-8", "replace")).hexdigest()[:12]


def describe_exception(exc: BaseException) -> str:
    """Describe an exception by type and where it was raised, never by its message.

    Exception messages from DICOM libraries may quote data element values.

    Parameters
    ----------
    exc
        The exception.

    Returns
    -------
    str
        ``TypeName at file.py:123 in function``.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    filename = last.filename.rsplit("/", 1)[-1]
    return f"{type(exc).__name__} at {filename}:{last.lineno} in {last.name}"


class PhiFilter(logging.Filter):
    """Withhold the text of records that may carry data element values.

    Records from pydicom and highdicom below ERROR, and warnings captured from
    them, keep their logger name and level but lose their message text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a record that may quote values; always keep the record.

        Parameters
        ----------
        record
            The record on its way to a handler.

        Returns
        -------
        bool
            Always True: records are rewritten, never dropped.
        """
        if record.levelno < logging.ERROR and (
            record.name.startswith(_VALUE_QUOTING_LOGGERS)
            or (record.name == "py.warnings" and _mentions_value_quoter(record))
        ):
            record.msg = "%s %s record (text withheld: it may quote data values)"
            record.args = (record.name, record.levelname)
            record.exc_info = None
            record.exc_text = None
        return True


def _mentions_value_quoter(record: logging.LogRecord) -> bool:
    text = str(record.msg) + " ".join(str(a) for a in (record.args or ()))
    return any(f"/{name}/" in text for name in _VALUE_QUOTING_LOGGERS)


def quiet_pynetdicom() -> None:
    """Stop pynetdicom from logging identifiers and raw UIDs (STYLE.md section 5)."""
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


def configure_logging(level: str = "INFO") -> logging.Handler:
    """Send log records to stderr through a PhiFilter.

    Only the command-line entry points call this.

    Parameters
    ----------
    level
        The level for the node's own loggers (``dicom_node``); third-party
        loggers stay at WARNING unless ``level`` is DEBUG.

    Returns
    -------
    logging.Handler
        The installed handler.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s [%(process)d]: %(message)s")
    )
    handler.addFilter(PhiFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    logging.getLogger("dicom_node").setLevel(level)
    logging.captureWarnings(True)
    quiet_pynetdicom()
    return handler
