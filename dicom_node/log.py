"""Logging without patient data: configure_logging, PhiFilter and uid_ref."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

from pydicom.uid import UID

__all__ = [
    "OVERFLOW_KEY",
    "EscapingFormatter",
    "PhiFilter",
    "PynetdicomFilter",
    "RateLimiter",
    "configure_logging",
    "describe_exception",
    "describe_traceback",
    "escape_control",
    "quiet_pynetdicom",
    "redact_uids",
    "uid_ref",
]

# Loggers whose records below ERROR may quote data element values verbatim, e.g.
# pydicom's "Invalid value for VR DA: '<value>'".
_VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom")

OVERFLOW_KEY = "*"

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

# C0 (tab and newline included: a record is one line), DEL, C1, and the Unicode
# line/paragraph separators and bidi controls that can fake or reorder a line.
_ESCAPES: dict[int, str] = {
    code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]
}
_ESCAPES |= {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_ESCAPES |= {
    code: f"\\u{code:04x}"
    for code in [0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
}

# The first line of a record starts with its level name; every further line
# (a traceback, stack information) starts with this, so no text carried inside
# a record can pass for a record of its own.
_CONTINUATION = "| "

# At least two components so that plain numbers and short versions ("3.0.4")
# stay; UIDs shorter than this are not worth hiding.
_UID_PATTERN = re.compile(r"(?<![0-9])[0-9]+(?:\.[0-9]+)+")
_UID_MIN_LENGTH = 8

# Parts of a pynetdicom message that vary per peer or per PDU: quoted values,
# hex and decimal numbers. Removing them makes one key per message template.
_TEMPLATE_NOISE = re.compile(r"'[^']*'|\"[^\"]*\"|0x[0-9A-Fa-f]+|[0-9]+")
_TEMPLATE_LENGTH = 80
_EXCEPTION_LINE_LENGTH = 200


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


def describe_traceback(exc: BaseException) -> str:
    """Return an exception's traceback without its message (which may quote data).

    Parameters
    ----------
    exc
        The exception.

    Returns
    -------
    str
        The frames (file, line, function, source line), most recent last, then
        the exception's type; for a chained exception, its cause's type and place.
    """
    lines = ["Traceback (most recent call last):"]
    lines += [
        line.rstrip("\n")
        for line in traceback.format_list(traceback.extract_tb(exc.__traceback__))
    ]
    lines.append(f"{type(exc).__name__} (message not logged: it may quote data)")
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        lines.append(f"raised while handling {describe_exception(cause)}")
    return "\n".join(lines)


def escape_control(text: str) -> str:
    r"""Make text safe to write as (part of) one log line.

    Parameters
    ----------
    text
        Any text, possibly chosen by a peer (an AE title, a PDU's contents).

    Returns
    -------
    str
        ``text`` with every C0 control character, DEL, C1 control character,
        Unicode line or paragraph separator and bidi control written as a
        visible escape: ``\n``, ``\r``, ``\t``, ``\x1b``, ``\u2028``.
        Other characters, non-ASCII ones included, are kept. Backslashes are
        not doubled, so a literal ``\n`` typed by a peer reads the same as an
        escaped newline; neither can start a new line.
    """
    return text.translate(_ESCAPES)


def redact_uids(text: str) -> str:
    """Replace the UIDs in a text by references.

    Parameters
    ----------
    text
        Text that may quote UIDs chosen by a peer.

    Returns
    -------
    str
        ``text`` with every dotted number of at least 8 characters replaced:
        a UID of the DICOM registry (PS3.6 Annex A: SOP classes, transfer
        syntaxes) by ``uid:`` and its keyword, e.g. ``uid:CTImageStorage``,
        because it is a public constant that tells an operator what the peer
        asked for; any other by ``uid:`` and its :func:`uid_ref`. No UID is
        left in its raw form.
    """
    return _UID_PATTERN.sub(_uid_replacement, text)


def _uid_replacement(match: re.Match[str]) -> str:
    uid = match.group(0)
    if len(uid) < _UID_MIN_LENGTH:
        return uid
    keyword = UID(uid).keyword
    if keyword:
        return f"uid:{keyword}"
    return f"uid:{uid_ref(uid)}"


# pynetdicom's "Invalid '<name>' value '<value>' - <reason>" and "Non-conformant
# '<name>' value '<value>'" (maybe after an exception's type): the value is what
# a peer sent, a name in a UID's place say. One match anchored at the start
# (linear: a peer chooses the text; a pattern tried at every position took 3 s
# on 52 KB, holding the GIL).
_QUOTED_VALUE = re.compile(
    r"((?:[A-Za-z]+: )?(?:Invalid|Non-conformant) '([^']*)' value ')(.*)"
    r"('(?: - [^']*)?)\Z",
    re.S,
)
# pynetdicom's own lines are short; one quoting a peer's value may not be.
_PYNETDICOM_TEXT_MAX = 1024


def _without_quoted_value(text: str) -> str:
    """Replace the value quoted in a pynetdicom validation line by a reference.

    AE titles are kept (escaped when written): an operator needs them.
    """
    match = _QUOTED_VALUE.match(text)
    if match is None or "AE Title" in match.group(2):
        return text
    value = match.group(3)
    keyword = UID(value).keyword if _UID_PATTERN.fullmatch(value) else ""
    shown = f"uid:{keyword}" if keyword else f"uid:{uid_ref(value)}"
    return f"{match.group(1)}{shown}{match.group(4)}"


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


class RateLimiter:
    """Count events per key and allow the first few of each in a time window.

    Windows are fixed and shared by all keys: a window starts at the first
    event (or :meth:`drain`) after the previous one has ended, and ending it
    forgets every key. Memory is bounded: at most ``max_keys`` keys are
    tracked in a window; events of further keys all count under the single
    key :data:`OVERFLOW_KEY` (``"*"``), which has its own ``per_key``
    allowance. Keys are never evicted while their window runs, so a peer
    cannot reset its own count by sending under many other keys.

    The limiter is thread-safe and has no thread of its own: the caller calls
    :meth:`drain` from time to time and logs one summary line per key.

    Parameters
    ----------
    per_key
        How many events of one key are allowed in each window.
    window
        The window's length in seconds.
    max_keys
        How many keys are tracked in a window before new ones count under
        :data:`OVERFLOW_KEY`; the suppressed counts awaiting :meth:`drain`
        are bounded the same way.
    total
        How many events of all keys together are allowed in each window
        (None: ``per_key`` for each key); beyond it, every key's events are
        counted as suppressed. Many peers each within ``per_key`` (a host
        for each of thousands of addresses) are then bounded too.
    clock
        Returns the time in seconds; :func:`time.monotonic` unless a test
        injects its own.

    Raises
    ------
    TypeError
        If ``per_key``, ``max_keys`` or ``total`` is not an int.
    ValueError
        If ``per_key``, ``max_keys`` or ``total`` is below 1, or ``window``
        is not positive.
    """

    def __init__(
        self,
        per_key: int = 5,
        window: float = 60.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        total: int | None = None,
    ) -> None:
        checked = [("per_key", per_key), ("max_keys", max_keys)]
        if total is not None:
            checked.append(("total", total))
        for name, value in checked:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not window > 0:
            raise ValueError(f"window must be positive seconds, got {window}")
        self.per_key = per_key
        self.window = float(window)
        self.max_keys = max_keys
        self.total = total
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._counts: dict[str, int] = {}
        self._allowed = 0  # events allowed in this window, all keys
        self._denied: dict[str, int] = {}  # keys of _counts only: bounded
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> bool:
        """Count one event of ``key`` and say whether to act on it.

        Parameters
        ----------
        key
            What the event is counted under, e.g. the peer's address.

        Returns
        -------
        bool
            True for the first ``per_key`` events of the key in the current
            window while fewer than ``total`` events have been allowed in it,
            False after.
        """
        with self._lock:
            self._roll(self._clock())
            if key not in self._counts and len(self._counts) >= self.max_keys:
                key = OVERFLOW_KEY
            count = self._counts.get(key, 0) + 1
            self._counts[key] = count
            if count <= self.per_key and (
                self.total is None or self._allowed < self.total
            ):
                self._allowed += 1
                return True
            self._denied[key] = self._denied.get(key, 0) + 1
            return False

    def drain(self) -> list[tuple[str, int]]:
        """Return and forget the counts suppressed in finished windows.

        Returns
        -------
        list of tuple of str and int
            For each key with events refused by :meth:`allow` in a window that
            has ended, the key and how many were refused, in first-seen order.
            Events of the current window are reported once it has ended.
        """
        with self._lock:
            self._roll(self._clock())
            drained = list(self._suppressed.items())
            self._suppressed.clear()
            return drained

    def __len__(self) -> int:
        """Return how many keys the current window tracks."""
        with self._lock:
            return len(self._counts)

    def _roll(self, now: float) -> None:
        if now - self._start < self.window:
            return
        for key, denied in self._denied.items():
            if key not in self._suppressed and len(self._suppressed) >= self.max_keys:
                key = OVERFLOW_KEY
            self._suppressed[key] = self._suppressed.get(key, 0) + denied
        self._counts.clear()
        self._denied.clear()
        self._allowed = 0
        self._start = now


class PynetdicomFilter(logging.Filter):
    """Bound the volume of pynetdicom's records and keep peer values out of them.

    For records from the ``pynetdicom`` loggers, whatever their level:

    - Rate limit: at most ``per_key`` records per ``window`` for each logger
      and message template. The template is the record's format string, or,
      because pynetdicom formats most messages itself, the first 80 characters
      of the message with quoted values and numbers taken out; a logged
      exception's template is its type. Once a window has ended, the next
      library record (or :meth:`flush`) logs one line per template through
      the ``dicom_node.log`` logger: "N similar lines suppressed in the last
      60 s: TEMPLATE". pydicom's and highdicom's records, and captured Python
      warnings, are rate-limited the same way (nothing else of this filter
      applies to them: :class:`PhiFilter` withholds their text), since a
      peer's data set can make one per value.
    - Tracebacks: unless ``keep_tracebacks``, a record with exception
      information (pynetdicom's ``LOGGER.exception``) is reduced to one line:
      the exception's type and its message, cut at 200 characters (newlines
      in it are escaped, not cut at, since they may come from a peer's
      value). When the traceback passes through pydicom or highdicom, whose
      messages may quote data element values, the message is replaced by
      where it was raised.
    - UIDs: the whole text, message and traceback, goes through
      :func:`redact_uids`, so a peer-supplied UID never appears raw. Registered
      UIDs show as their keyword, others as a :func:`uid_ref`; the rest of the
      line is kept, because pynetdicom's lines otherwise carry protocol facts
      an operator needs (which PDU, which context, which AE title failed
      validation).

    Control characters are left to :class:`EscapingFormatter`.

    Parameters
    ----------
    per_key
        Records allowed per template in each window.
    window
        The window's length in seconds.
    max_templates
        Templates tracked per window; further ones share one allowance.
    keep_tracebacks
        Keep full tracebacks (for DEBUG logging), still with UIDs redacted.
    clock
        Returns the time in seconds; :func:`time.monotonic` unless a test
        injects its own.

    Raises
    ------
    TypeError
        If ``per_key`` or ``max_templates`` is not an int.
    ValueError
        If ``per_key`` or ``max_templates`` is below 1, or ``window`` is not
        positive.
    """

    def __init__(
        self,
        per_key: int = 20,
        window: float = 60.0,
        max_templates: int = 64,
        keep_tracebacks: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._limiter = RateLimiter(per_key, window, max_templates, clock)
        self._keep_tracebacks = keep_tracebacks
        self._summaries = logging.getLogger(__name__)

    def filter(self, record: logging.LogRecord) -> bool:
        """Rate-limit and rewrite a pynetdicom record; keep any other record.

        Parameters
        ----------
        record
            The record on its way to a handler.

        Returns
        -------
        bool
            False for a pynetdicom record over its template's allowance,
            otherwise True.
        """
        if not _is_library(record.name):
            return True
        self.flush()
        if not self._limiter.allow(_template(record)):
            return False
        if record.name != "pynetdicom" and not record.name.startswith("pynetdicom."):
            return True  # only rate-limited (PhiFilter withholds their text)
        if record.exc_info is not None and record.exc_info[1] is not None:
            self._reduce_exception(record, record.exc_info)
        text = _without_quoted_value(record.getMessage())
        if len(text) > _PYNETDICOM_TEXT_MAX:
            text = f"{text[:_PYNETDICOM_TEXT_MAX]}... ({len(text)} characters)"
        record.msg = redact_uids(text)
        record.args = ()
        if record.exc_text:
            record.exc_text = redact_uids(record.exc_text)
        return True

    def flush(self) -> None:
        """Log one summary line per template suppressed in a finished window."""
        for template, count in self._limiter.drain():
            self._summaries.warning(
                "%d similar lines suppressed in the last %.0f s: %s",
                count,
                self._limiter.window,
                template,
            )

    def _reduce_exception(self, record: logging.LogRecord, exc_info: _ExcInfo) -> None:
        exc = exc_info[1]
        frames = traceback.extract_tb(exc.__traceback__)
        quotes_values = any(
            f"/{name}/" in frame.filename
            for frame in frames
            for name in _VALUE_QUOTING_LOGGERS
        )
        record.exc_info = None
        if self._keep_tracebacks:
            if quotes_values:
                lines = ["Traceback (most recent call last):\n"]
                lines += traceback.format_list(frames)
                lines.append(f"{type(exc).__name__}: (message withheld)")
            else:
                lines = traceback.format_exception(exc)
            record.exc_text = "".join(lines).rstrip("\n")
            if record.msg is exc:
                # LOGGER.exception(exc): the message is the exception again.
                record.msg = type(exc).__name__
                record.args = ()
            return
        record.exc_text = None
        if quotes_values:
            summary = f"{describe_exception(exc)} (message withheld)"
        else:
            # The whole message, cut short: a newline in it may come from a
            # peer's value, and the formatter escapes it anyway.
            text = str(exc)[:_EXCEPTION_LINE_LENGTH]
            summary = f"{type(exc).__name__}: {text}"
        if record.msg is exc:
            record.msg = summary
        else:
            record.msg = f"{record.getMessage()} ({summary})"
        record.args = ()


# Loggers whose records a peer's data can multiply: pynetdicom's, and pydicom's
# and highdicom's warnings (also as captured Python warnings).
_LIBRARY_LOGGERS = ("pynetdicom", "pydicom", "highdicom", "py.warnings")


def _is_library(name: str) -> bool:
    return any(name == n or name.startswith(f"{n}.") for n in _LIBRARY_LOGGERS)


def _template(record: logging.LogRecord) -> str:
    if isinstance(record.msg, BaseException):
        return f"{record.name}: exception {type(record.msg).__name__}"
    text = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
    if not record.args:
        text = _TEMPLATE_NOISE.sub("#", text[: _TEMPLATE_LENGTH * 4])
    return f"{record.name}: {text[:_TEMPLATE_LENGTH]}"


class EscapingFormatter(logging.Formatter):
    """A formatter whose every line is safe from control characters.

    The record's first line (level, logger, message with its arguments) is
    passed through :func:`escape_control`, so a newline or escape sequence
    in a message or argument is written visibly and a record is one line.
    A traceback or stack information keeps its own line breaks, because it is
    multi-line by design; each of its lines is escaped the same way and starts
    with ``"| "``, so no line of it can pass for a record of its own. A
    traceback never shows the exception's message, which may quote data.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Format a record as escaped, framed lines.

        Parameters
        ----------
        record
            The record to format.

        Returns
        -------
        str
            The record's text, without a trailing newline.
        """
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        lines = [escape_control(self.formatMessage(record))]
        # Formatted here, not taken from the record: another handler's formatter
        # may have cached a traceback that shows the message.
        exc_text = (
            self.formatException(record.exc_info)
            if record.exc_info
            else record.exc_text
        )
        stack = self.formatStack(record.stack_info) if record.stack_info else None
        for block in (exc_text, stack):
            if block:
                lines += [
                    _CONTINUATION + escape_control(line)
                    for line in block.rstrip("\n").split("\n")
                ]
        return "\n".join(lines)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        """Format a traceback without the exception's message (it may quote data).

        Parameters
        ----------
        ei
            ``(type, value, traceback)`` as ``sys.exc_info()`` gives it.

        Returns
        -------
        str
            :func:`describe_traceback` of the exception.
        """
        value = ei[1] if isinstance(ei, tuple) else ei
        if isinstance(value, BaseException):
            return describe_traceback(value)
        return super().formatException(ei)


def quiet_pynetdicom() -> None:
    """Stop pynetdicom from logging identifiers and raw UIDs (STYLE.md section 5)."""
    # Imported here: a process that logs but never speaks DICOM (a results
    # process) does not load pynetdicom.
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


def configure_logging(
    level: str = "INFO", stream: TextIO | None = None, *, network: bool = True
) -> logging.Handler:
    """Send log records to stderr through a PhiFilter and a PynetdicomFilter.

    Only the command-line entry points and the processes they start call this.
    Every line is written by an :class:`EscapingFormatter`.

    Parameters
    ----------
    level
        The level for the node's own loggers (``dicom_node``); third-party
        loggers stay at WARNING unless ``level`` is DEBUG, which also keeps
        pynetdicom's tracebacks.
    stream
        Where to write; standard error if None.
    network
        Also quiet pynetdicom (:func:`quiet_pynetdicom`, which imports it);
        False in a process that never speaks DICOM (a results process).

    Returns
    -------
    logging.Handler
        The installed handler.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(
        EscapingFormatter("%(levelname)s %(name)s [%(process)d]: %(message)s")
    )
    handler.addFilter(PhiFilter())
    handler.addFilter(PynetdicomFilter(keep_tracebacks=level == "DEBUG"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    logging.getLogger("dicom_node").setLevel(level)
    logging.captureWarnings(True)
    # pydicom logs each warning and warns it too (warn_and_log), the value in
    # the text: Python keeps every distinct text in a registry for good, and a
    # peer's 100,000 distinct bad UIDs were 200,000 lines and +70 MB. Its log
    # record is kept (text withheld, rate-limited); the warning is not.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    # A thread (pynetdicom's included) ended by an exception is logged like any
    # record: escaped, rate-limited, by type and place (its text may quote values).
    threading.excepthook = _log_thread_exception
    if network:
        quiet_pynetdicom()
    return handler


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    what = (
        describe_exception(args.exc_value)
        if args.exc_value is not None
        else args.exc_type.__name__
    )
    frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
    theirs = (args.thread is not None and "Thread@" in args.thread.name) or any(
        "/pynetdicom/" in frame.filename for frame in frames
    )
    logging.getLogger("pynetdicom.thread" if theirs else __name__).error(
        "thread %s ended by an exception: %s",
        args.thread.name if args.thread else "?",
        what,
    )
