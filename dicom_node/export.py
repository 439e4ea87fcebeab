"""Outbound DICOM: C-ECHO and C-STORE as an SCU, every status checked."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

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
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.status import code_to_category
from pynetdicom.transport import AssociationSocket

from dicom_node.config import validate_ae_title
from dicom_node.dimse import DECODE_ERRORS, VERIFICATION_SOP_CLASS
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.log import quiet_pynetdicom

__all__ = [
    "Peer",
    "SendOutcome",
    "SendReport",
    "echo",
    "find_files",
    "parse_peer",
    "send_files",
]

logger = logging.getLogger(__name__)

# PS3.8 9.3.2: at most 128 presentation contexts in one A-ASSOCIATE-RQ.
_MAX_CONTEXTS = 128
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


class _NoDelayAE(AE):
    """pynetdicom's AE with TCP_NODELAY on its outbound sockets.

    Without it, Nagle's algorithm and the peer's delayed ACK hold each small
    DIMSE message back by up to 40 ms: a two-object result set took ~140 ms to
    send on loopback, ~16 ms with TCP_NODELAY on both sides.
    """

    def _create_socket(
        self, assoc: Association, address: Any, tls_args: Any
    ) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        if sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


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
        self._outstanding = threading.Event()
        assoc.dimse.get_msg = self._get_msg  # type: ignore[method-assign]

    def _get_msg(self, block: bool = False) -> Any:
        if not block and self._outstanding.is_set():
            return None, None  # the reactor's poll: the sender reads the response
        return self._read(block)

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Mark a request outstanding until its response is read."""
        self._outstanding.set()
        try:
            yield
        finally:
            self._outstanding.clear()


def _new_ae(calling_ae_title: str, timeout: float) -> AE:
    quiet_pynetdicom()
    ae = _NoDelayAE(ae_title=calling_ae_title)
    # Associations name this project (PS3.7 D.3.3.2), not the library.
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


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
        Seconds to wait for the association and the response.
    tls
        When set, associate over DICOM TLS with this client context.

    Returns
    -------
    int
        The C-ECHO status (0x0000 is success).

    Raises
    ------
    DicomNodeError
        If the association is rejected or aborted, or no response arrives.
    """
    ae = _new_ae(calling_ae_title, timeout)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, tls_args=_tls_args(tls, peer)
    )
    if not assoc.is_established:
        raise DicomNodeError(f"association with {peer} failed: {_why_not(assoc)}")
    try:
        with _ResponseGuard(assoc).request():
            rsp = assoc.send_c_echo()
    finally:
        _close(assoc)
    if "Status" not in rsp:
        raise DicomNodeError(f"no C-ECHO response from {peer} (timeout or abort)")
    return int(rsp.Status)


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
    """

    path: Path
    status: int | None
    error: str = ""

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
    except DECODE_ERRORS as exc:
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
        _send_batch(batch, peer, calling_ae_title, timeout, report, progress, tls)
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
) -> None:
    ae = _new_ae(calling_ae_title, timeout)
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in batch})
    ae.requested_contexts = [build_context(UID(c), [UID(t)]) for c, t in pairs]
    # Send file contents as they are on disk, without decoding and re-encoding.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True

    def finish(outcome: SendOutcome) -> None:
        report.outcomes.append(outcome)
        if progress:
            progress(outcome)

    assoc: Association | None = None
    guard: _ResponseGuard | None = None
    reconnects = 0
    try:
        for item in batch:
            if assoc is None or not assoc.is_established:
                if assoc is not None:
                    reconnects += 1
                if reconnects > 1:
                    finish(SendOutcome(item.path, None, "association lost twice"))
                    continue
                assoc = ae.associate(
                    peer.host,
                    peer.port,
                    ae_title=peer.ae_title,
                    tls_args=_tls_args(tls, peer),
                )
                if not assoc.is_established:
                    why = _why_not(assoc)
                    for rest in batch[batch.index(item) :]:
                        finish(
                            SendOutcome(rest.path, None, f"association failed: {why}")
                        )
                    return
                guard = _ResponseGuard(assoc)
            try:
                with cast(_ResponseGuard, guard).request():
                    rsp = assoc.send_c_store(
                        item.dataset if item.dataset is not None else item.path
                    )
            except (ValueError, AttributeError) as exc:
                # No accepted context for this class and syntax, or unsendable.
                finish(SendOutcome(item.path, None, f"not sent: {exc}"))
                continue
            if "Status" not in rsp:
                finish(SendOutcome(item.path, None, "no response (timeout or abort)"))
                continue
            status = int(rsp.Status)
            outcome = SendOutcome(item.path, status)
            if not outcome.ok:
                outcome.error = f"status 0x{status:04X} ({code_to_category(status)})"
            finish(outcome)
    finally:
        if assoc is not None:
            _close(assoc)


def _tls_args(
    tls: ssl.SSLContext | None, peer: Peer
) -> tuple[ssl.SSLContext, str] | None:
    # The server's certificate is checked against the host we asked for.
    return None if tls is None else (tls, peer.host)


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    elif not (assoc.is_aborted or assoc.is_released or assoc.is_rejected):
        assoc.abort()


def _why_not(assoc: Association) -> str:
    if assoc.is_rejected:
        return "rejected by the peer (A-ASSOCIATE-RJ)"
    if assoc.is_aborted:
        return "aborted"
    return "no answer (connection refused or timeout)"
