"""The node's exception hierarchy."""

__all__ = [
    "ConfigError",
    "DicomNodeError",
    "IndexCorruptError",
    "IndexSchemaError",
    "IndexUnavailableError",
    "InvalidUidError",
    "StorageError",
]


class DicomNodeError(Exception):
    """Base class of the errors the node raises on purpose."""


class ConfigError(DicomNodeError):
    """The configuration is missing, malformed or out of range."""


class InvalidUidError(DicomNodeError, ValueError):
    """A value is not a valid DICOM UID (PS3.5 9.1)."""


class StorageError(DicomNodeError):
    """An instance could not be written to the store."""


class IndexSchemaError(DicomNodeError):
    """The index database was made by another version and lacks what this one needs."""


class IndexUnavailableError(DicomNodeError):
    """The index database cannot be opened or reached (locked, unreadable, down)."""


class IndexCorruptError(IndexUnavailableError):
    """The index database file is damaged or is not an SQLite database."""
