"""Atomic file store keyed by validated UIDs: <root>/<study>/<series>/<sop>.dcm."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import InvalidUidError, StorageError

__all__ = ["InstanceKey", "Storage", "validate_uid"]

# PS3.5 9.1: digits in components separated by ".", at most 64 characters.
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_MAX_LENGTH = 64


def validate_uid(value: object, name: str) -> str:
    """Check that a value is a valid DICOM UID before it names a file or a row.

    Parameters
    ----------
    value
        The candidate UID.
    name
        The attribute's keyword, used in the error message.

    Returns
    -------
    str
        The UID.

    Raises
    ------
    InvalidUidError
        If the value is empty, not a string, longer than 64 characters or not
        digits separated by dots (this refuses "/", ".." and the like).
    """
    if not isinstance(value, str) or not value:
        raise InvalidUidError(f"{name}: missing or empty")
    if len(value) > _UID_MAX_LENGTH:
        raise InvalidUidError(f"{name}: longer than 64 characters")
    if _UID_PATTERN.fullmatch(value) is None:
        raise InvalidUidError(f"{name}: not digits separated by dots (PS3.5 9.1)")
    return value


@dataclass(frozen=True, slots=True)
class InstanceKey:
    """The three UIDs that place an instance in the store; checked when built.

    Parameters
    ----------
    study_instance_uid
        (0020,000D) Study Instance UID.
    series_instance_uid
        (0020,000E) Series Instance UID.
    sop_instance_uid
        (0008,0018) SOP Instance UID.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        """Validate each UID; raise InvalidUidError naming the bad one."""
        validate_uid(self.study_instance_uid, "StudyInstanceUID")
        validate_uid(self.series_instance_uid, "SeriesInstanceUID")
        validate_uid(self.sop_instance_uid, "SOPInstanceUID")

    @property
    def relative_path(self) -> str:
        """Return the instance's path relative to the storage root."""
        return (
            f"{self.study_instance_uid}/{self.series_instance_uid}/"
            f"{self.sop_instance_uid}.dcm"
        )


class Storage:
    """Writes instances durably: temporary file, fsync, rename, fsync of the folder.

    Temporary files live in ``<root>/.incoming/`` (never inside a study folder), so
    what a crash leaves behind is easy to find and is swept at the next start.

    Parameters
    ----------
    root
        The storage folder; created when missing.
    """

    INCOMING = ".incoming"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / self.INCOMING
        self._ensure_dir(self.incoming)

    def sweep_incoming(self, older_than: float = 900.0) -> int:
        """Remove temporary files a crashed writer left behind.

        Only files older than ``older_than`` seconds go: another receiving process
        sharing this storage may be writing the younger ones right now.

        Parameters
        ----------
        older_than
            Minimum age in seconds of a temporary file to remove.

        Returns
        -------
        int
            How many files were removed.
        """
        cutoff = time.time() - older_than
        removed = 0
        for entry in os.scandir(self.incoming):
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue  # removed by another process meanwhile
        return removed

    def path_of(self, key: InstanceKey) -> Path:
        """Return where an instance is (or would be) stored.

        Parameters
        ----------
        key
            The instance's validated UIDs.

        Returns
        -------
        pathlib.Path
            The absolute file path.
        """
        return self.root / key.relative_path

    def write(self, key: InstanceKey, data: bytes) -> Path:
        """Store the bytes of one instance atomically, replacing an older copy.

        When this returns, the file and its directory entry are on stable storage.
        On failure nothing is left behind: no temporary file, no partial file.

        Parameters
        ----------
        key
            The instance's validated UIDs.
        data
            The complete DICOM file (preamble, file meta and data set).

        Returns
        -------
        pathlib.Path
            The final path.

        Raises
        ------
        StorageError
            If the folder, the file or the rename fails (a full disk among them);
            the message carries the OS error's name, never the path.
        """
        final = self.path_of(key)
        tmp = self.incoming / f"{secrets.token_hex(8)}.tmp"
        try:
            self._ensure_dir(final.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise StorageError(_os_error_name(exc)) from exc
        return final

    def remove(self, key: InstanceKey) -> None:
        """Remove a stored instance, if present, and make the removal durable.

        Parameters
        ----------
        key
            The instance's validated UIDs.

        Raises
        ------
        StorageError
            If the file exists but cannot be removed.
        """
        path = self.path_of(key)
        try:
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(_os_error_name(exc)) from exc

    def _ensure_dir(self, path: Path) -> None:
        # Create missing folders one level at a time and fsync each parent, so a
        # new study folder survives a power cut together with its first file.
        missing: list[Path] = []
        probe = path
        while not probe.is_dir():
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
        for folder in reversed(missing):
            try:
                folder.mkdir(mode=0o750)
            except FileExistsError:
                continue  # another association created it first
            _fsync_dir(folder.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error_name(exc: OSError) -> str:
    code = exc.errno
    name = errno.errorcode.get(code, "EUNKNOWN") if code is not None else "EUNKNOWN"
    return f"{type(exc).__name__} {name}"
