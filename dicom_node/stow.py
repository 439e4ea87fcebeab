"""Results to a DICOMweb service: STOW-RS (PS3.18 10.5), sent with dicomweb-client.

A ``[[destinations]]`` entry with ``url`` gets its result sets this way instead
of by C-STORE, through the same outbox: one request per result set, every
instance's outcome read from the response (its Failed SOP Sequence), and the
same retries, backoff and dead letter.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import ParseError

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.config import DestinationConfig, read_token
from dicom_node.dimse import is_decode_error
from dicom_node.log import describe_exception

if TYPE_CHECKING:
    import requests

__all__ = ["ReplyError", "StowOutcome", "stow"]

logger = logging.getLogger(__name__)

_TIMEOUT = 60.0  # seconds for a request
# A Store Instances Response names each instance in a few hundred bytes; a
# reply larger than this is not one (an endless body once filled the memory).
_REPLY_MAX = 4 * 1024 * 1024
# DICOM JSON media types (PS3.18 8.7.3), without their parameters.
_JSON_TYPES = ("application/dicom+json", "application/json")
# The most a whole request may take, and a second more for each mebibyte sent:
# a service that drips its reply (each byte within the timeout) held the
# outbox for hours.
_DEADLINE = 2 * _TIMEOUT
# A request cut off at its deadline.
_CUT = "no whole reply in time (the service answered too slowly)"
# What a reply dicomweb-client cannot read raises there (a JSON list, a value
# of the wrong type, no Content-Type, XML that does not parse).
_UNREADABLE = (ValueError, TypeError, KeyError, AttributeError, IndexError, ParseError)


class ReplyError(Exception):
    """The service's reply was refused unread: a redirect, or too large."""


class _Bounded:
    """A reply body as requests reads it, to at most ``_REPLY_MAX`` bytes."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._read = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def _took(self, chunk: bytes) -> bytes:
        self._read += len(chunk)
        if self._read > _REPLY_MAX:
            self._raw.close()
            raise ReplyError(f"reply body over {_REPLY_MAX} bytes")
        return chunk

    def stream(self, amt: int = 65536, decode_content: bool | None = None) -> Any:
        """Yield the body in chunks, within the bound."""
        for chunk in self._raw.stream(amt, decode_content=decode_content):
            yield self._took(chunk)

    def read(self, amt: int | None = None, *args: Any, **kwargs: Any) -> bytes:
        """Read the body, within the bound."""
        return self._took(self._raw.read(amt, *args, **kwargs))


def _adapter() -> Any:
    """Return a requests transport adapter that bounds the service's replies.

    A redirect is refused, not followed (requests would POST the results
    again, to wherever it points, over plain HTTP too); a reply body is read
    to at most ``_REPLY_MAX`` bytes. The last reply is kept as
    ``adapter.last``. Its connections (through an HTTP proxy too) are noted,
    for ``adapter.cut_off()`` to shut them down when a request runs past its
    deadline (requests' timeout bounds each read, not the whole), unless
    ``adapter.settle()`` said the request ended first.
    """
    from requests.adapters import HTTPAdapter
    from urllib3 import ProxyManager
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    sockets: list[socket.socket] = []
    settled = threading.Lock()

    class Plain(HTTPConnection):
        def connect(self) -> None:
            super().connect()
            sockets.append(self.sock)

    class Secure(HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            sockets.append(self.sock)

    class PlainPool(HTTPConnectionPool):
        ConnectionCls = Plain

    class SecurePool(HTTPSConnectionPool):
        ConnectionCls = Secure

    tracked = {"http": PlainPool, "https": SecurePool}

    class Adapter(HTTPAdapter):
        last: requests.Response | None = None
        cut = False
        done = False

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = tracked

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if isinstance(manager, ProxyManager):  # an HTTP(S) proxy, not SOCKS
                manager.pool_classes_by_scheme = tracked
            return manager

        def cut_off(self) -> None:
            with settled:
                if self.done:
                    return  # answered meanwhile
                self.cut = True
            for sock in sockets:
                # The TCP socket's own shutdown: a TLS socket's would drop its
                # TLS state first, and a send meanwhile would go out in clear.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

        def settle(self) -> bool:
            """End the deadline's hold; return whether the request was cut off."""
            with settled:
                self.done = True
                return self.cut

        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            response = super().send(request, *args, **kwargs)
            if response.is_redirect:
                response.close()
                raise ReplyError(
                    f"HTTP {response.status_code}: a redirect, not followed (give "
                    "the URL it points to as the destination's url)"
                )
            response.raw = _Bounded(response.raw)
            self.last = response
            return response

    return Adapter()


@dataclass(frozen=True, slots=True)
class StowOutcome:
    """What became of one file.

    Parameters
    ----------
    path
        The file.
    ok
        Stored by the service.
    error
        Why not, in words (no patient data).
    """

    path: Path
    ok: bool
    error: str = ""


def stow(
    paths: Sequence[Path], url: str, destination: DestinationConfig | None
) -> list[StowOutcome]:
    """Store files at a DICOMweb service in one STOW-RS request.

    Parameters
    ----------
    paths
        The result set's files.
    url
        The service's base URL (the delivery's; ``/studies`` is appended).
    destination
        Its configuration (token, CA certificates), when still configured.

    Returns
    -------
    list of StowOutcome
        One per file, in order.

    Raises
    ------
    ConfigError
        If the token file cannot be read.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    path = destination.token_file if destination else None
    token = read_token(path, "token_file") if path is not None else None
    datasets, uids, outcomes = [], [], {}
    for path in paths:
        try:
            ds = dcmread(path)
        except Exception as exc:
            if not is_decode_error(exc):
                raise
            outcomes[path] = StowOutcome(path, False, "result file unreadable")
            continue
        datasets.append(ds)
        uids.append((path, str(ds.SOPInstanceUID)))
    if not datasets:
        return [outcomes[p] for p in paths]
    session = requests.Session()
    adapter = _adapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if destination is not None and destination.ca_certificates is not None:
        session.verify = str(destination.ca_certificates)
    client = DICOMwebClient(
        url=url,
        session=session,
        headers={
            "Accept": "application/dicom+json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
        timeout=_TIMEOUT,
    )
    # One try per request: the outbox retries with its own backoff and dead
    # letter, as for DICOM peers.
    client.set_http_retry_params(retry=False)
    sent = sum(path.stat().st_size for path, _ in uids)
    deadline = threading.Timer(_DEADLINE + sent / 2**20, adapter.cut_off)
    deadline.daemon = True
    deadline.start()
    cut = False
    try:
        try:
            response = client.store_instances(datasets)
        finally:
            cut = adapter.settle()
    except requests.HTTPError as exc:
        answer = exc.response
        code = answer.status_code if answer is not None else 0
        reason = answer.reason if answer is not None else ""
        error = f"HTTP {code} {reason}".strip()
        # A 409 says why in a Store Instances Response, instance by instance.
        said = _failure_reasons(answer)
        outcomes.update(
            {
                p: StowOutcome(
                    p, False, f"{error}: {said[uid]}" if uid in said else error
                )
                for p, uid in uids
            }
        )
    except ReplyError as exc:
        outcomes.update({p: StowOutcome(p, False, str(exc)) for p, _ in uids})
    except requests.exceptions.InvalidJSONError:
        error = "reply not understood (not the JSON it says it is)"
        outcomes.update({p: StowOutcome(p, False, error) for p, _ in uids})
    except (requests.RequestException, OSError) as exc:
        if cut:
            error = _CUT
        elif _malformed(exc):
            error = "reply not understood (a malformed HTTP reply)"
        else:
            error = f"not reached ({type(exc).__name__})"
        outcomes.update({p: StowOutcome(p, False, error) for p, _ in uids})
    except _UNREADABLE as exc:
        error = _CUT if cut else f"reply not understood ({describe_exception(exc)})"
        outcomes.update({p: StowOutcome(p, False, error) for p, _ in uids})
    else:
        last = adapter.last
        if cut:  # the reply, cut off, may read as a short one
            error = _CUT
            outcomes.update({p: StowOutcome(p, False, error) for p, _ in uids})
            return [outcomes[p] for p in paths]
        if len(response) == 0 and last is not None:
            response = _json_reply(last, response)
        outcomes.update(_read_response(response, uids))
    finally:
        deadline.cancel()
        session.close()
    return [outcomes[p] for p in paths]


def _malformed(exc: BaseException) -> bool:
    """Whether an error of requests comes of a reply that is not HTTP.

    requests reports headers over http.client's limits (count, line length)
    as a ConnectionError, as if nothing had answered.
    """
    seen: set[int] = set()
    found: list[BaseException] = [exc]
    while found:
        error = found.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, http.client.HTTPException):
            return True
        found.extend(
            e
            for e in (error.__cause__, error.__context__, *error.args)
            if isinstance(e, BaseException)
        )
    return False


def _json_reply(reply: requests.Response, parsed: Dataset) -> Dataset:
    """Read a DICOM JSON reply that dicomweb-client passed over, else ``parsed``.

    dicomweb-client (0.61) reads a reply only when its Content-Type is exactly
    a DICOM JSON type, so one with a parameter ("; charset=utf-8", as services
    send) confirmed nothing, and every retry stored the results again.
    """
    content_type = reply.headers.get("Content-Type", "")
    if content_type.split(";")[0].strip().lower() not in _JSON_TYPES:
        return parsed
    try:
        body = json.loads(reply.content)  # read already (and bounded)
        return Dataset.from_json(body[0] if isinstance(body, list) else body)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return parsed  # not DICOM JSON: it confirms nothing


def _refused(reason: object) -> str:
    """Return how a failed instance of a Store Instances Response is described."""
    try:
        return f"refused (failure reason 0x{int(str(reason)):04X})"
    except ValueError:
        return "refused"


def _failure_reasons(answer: requests.Response | None) -> dict[str, str]:
    """Return what an error reply's Store Instances Response says of each instance.

    Empty when the body is not one (a proxy's page, no body).
    """
    if answer is None or "json" not in answer.headers.get("Content-Type", ""):
        return {}
    try:
        body = answer.json()
        response = Dataset.from_json(body[0] if isinstance(body, list) else body)
        return {
            str(item.get("ReferencedSOPInstanceUID", "")): _refused(
                item.get("FailureReason")
            )
            for item in response.get("FailedSOPSequence", [])
        }
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ReplyError):
        return {}  # a body that does not parse (JSON or DICOM JSON) says nothing


def _read_response(
    response: Dataset, uids: Sequence[tuple[Path, str]]
) -> dict[Path, StowOutcome]:
    """Each file's outcome from a Store Instances Response (PS3.18 10.5.3)."""
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): item.get("FailureReason")
        for item in response.get("FailedSOPSequence", [])
    }
    stored = {
        str(item.get("ReferencedSOPInstanceUID", ""))
        for item in response.get("ReferencedSOPSequence", [])
    }
    # Stored only when the response says so: a body that does not parse (a
    # proxy's login page, say) confirms nothing.
    outcomes = {}
    for path, uid in uids:
        if uid in failed:
            outcomes[path] = StowOutcome(path, False, _refused(failed[uid]))
        elif uid not in stored:
            outcomes[path] = StowOutcome(path, False, "not confirmed by the service")
        else:
            outcomes[path] = StowOutcome(path, True)
    return outcomes
