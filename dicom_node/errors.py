"""The node's exception hierarchy."""

import errno
import socket

__all__ = [
    "AssociationError",
    "AssociationRejectedError",
    "ConfigError",
    "DicomNodeError",
    "IndexCorruptError",
    "IndexSchemaError",
    "IndexUnavailableError",
    "InvalidUidError",
    "ListenError",
    "ModelMissingError",
    "StorageError",
]


class DicomNodeError(Exception):
    """Base class of the errors the node raises on purpose."""


class ConfigError(DicomNodeError):
    """The configuration is missing, malformed or out of range."""


class InvalidUidError(DicomNodeError, ValueError):
    """A value is not a valid DICOM UID (PS3.5 9.1)."""


class AssociationError(DicomNodeError):
    """An association with a peer was not established, or was lost before an answer."""


class AssociationRejectedError(AssociationError):
    """The peer answered the association request with A-ASSOCIATE-RJ (PS3.8 9.3.4).

    Parameters
    ----------
    message
        What happened, in words, with the codes.
    result
        1 rejected-permanent, 2 rejected-transient.
    source
        1 service-user, 2 service-provider (ACSE), 3 service-provider (presentation).
    reason
        The reason (diagnostic) code; its meaning depends on ``source``.
    """

    def __init__(self, message: str, result: int, source: int, reason: int) -> None:
        super().__init__(message)
        self.result = result
        self.source = source
        self.reason = reason


class StorageError(DicomNodeError):
    """An instance could not be written to the store."""


class IndexSchemaError(DicomNodeError):
    """The index database was made by another version and lacks what this one needs."""


class IndexUnavailableError(DicomNodeError):
    """The index database cannot be opened or reached (locked, unreadable, down)."""


class IndexCorruptError(IndexUnavailableError):
    """The index database file is damaged or is not an SQLite database."""


class ThreadEndedError(DicomNodeError):
    """A thread the node cannot run without ended while the node ran.

    The process then stops (exit status 1), so that its service manager starts
    it again, rather than run on without receiving or scoring.
    """


class ListenError(DicomNodeError):
    """The node cannot listen on its address and port (in use, not permitted, ...).

    Parameters
    ----------
    host
        The address the node tried to listen on.
    port
        The TCP port it tried to listen on.
    reason
        What went wrong and what to do, in words.
    """

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port}: {reason}")
        self.host = host
        self.port = port

    @classmethod
    def from_os_error(cls, host: str, port: int, exc: OSError) -> "ListenError":
        """Say why binding ``host``:``port`` failed, and what the operator can do.

        Parameters
        ----------
        host
            The address the node tried to listen on.
        port
            The TCP port it tried to listen on.
        exc
            What ``bind`` raised.

        Returns
        -------
        ListenError
            The error, its message naming the address, the port and the cause.
        """
        if isinstance(exc, socket.gaierror):
            reason = (
                f"the host name does not resolve ({exc.strerror}): set [node] host "
                "to one of this machine's addresses, or 0.0.0.0 for every interface"
            )
        elif exc.errno == errno.EADDRINUSE:
            reason = (
                "the port is already in use by another program (another dicom-node "
                "serve, or another DICOM server): stop that program or set another "
                "[node] port ('ss -ltnp' lists the listening programs and ports)"
            )
        elif exc.errno in (errno.EACCES, errno.EPERM):
            reason = (
                "permission denied: ports below 1024 need privilege; set a [node] "
                "port of 1024 or more, or give the service CAP_NET_BIND_SERVICE "
                "(README, Operations: Port 104)"
            )
        elif exc.errno == errno.EADDRNOTAVAIL:
            reason = (
                "the address is not one of this machine's: set [node] host to one "
                "of its addresses, or 0.0.0.0 for every interface"
            )
        else:
            reason = f"{exc.strerror or type(exc).__name__}: check [node] host and port"
        return cls(host, port, reason)


class ModelMissingError(DicomNodeError):
    """A configured model's file does not exist (yet): its jobs wait for it."""
