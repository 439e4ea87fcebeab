"""Atomic file store keyed by validated UIDs: <root>/<study>/<series>/<sop>.dcm."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import stat
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import VR

from dicom_node.errors import InvalidUidError, StorageError
from inference import file_identity_of

__all__ = [
    "PIXEL_DATA_TAGS",
    "SPLIT_VALUE_LIMIT",
    "STORED_DEFER_SIZE",
    "WHOLE_VRS",
    "InstanceKey",
    "Storage",
    "read_stored",
    "sha256_from",
    "splits_too_long",
    "validate_uid",
    "value_vr",
]

# Values longer than this, at a stored data set's top level, stay in the file
# when it is read to be scored or to build its results (Pixel Data is read only
# once the image is known to be one the model takes, and of a size it can).
# What a received data set holds in memory is counted against this at receipt
# ([node] max_in_memory_bytes).
STORED_DEFER_SIZE = 1024 * 1024

# Float Pixel Data, Double Float Pixel Data, Pixel Data (PS3.6).
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

# Per-frame Functional Groups Sequence: a multi-frame image's per-frame
# attributes, megabytes long for thousands of frames.
_PER_FRAME_GROUPS = 0x52009230

# Longest top-level value of a VR pydicom makes one Python object per value of
# (DS, IS, US, CS, ...: up to ~200 times their bytes) that a stored instance
# is read with: nothing the node reads of one is longer (a window, a ratio).
SPLIT_VALUE_LIMIT = 1024

# VRs whose value pydicom keeps as one bytes or str object.
WHOLE_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "LT", "ST", "UT", "UR", "SQ"}
)


def read_stored(path: Path) -> Dataset:
    """Read a stored instance to score it or build its results.

    Its top-level values over :data:`STORED_DEFER_SIZE` stay in the file:
    Pixel Data is read where the image is decoded (after its size is
    checked), from the file that was read, and the Per-frame Functional
    Groups Sequence where it is used. Any other such value is left out of the
    data set, and so is any value over :data:`SPLIT_VALUE_LIMIT` of a VR
    pydicom makes one object per value of: nothing the node reads of a
    source is that long (a LUT sequence, Number of Frames, a window), and
    reading one would cost its length, or up to ~200 times that.

    The data set carries the identity of the file it was read from
    (``stored_file_identity``): what is read of it later is read from that
    file or not at all (:func:`inference.file_as_read`).

    Raises
    ------
    OSError
        If the file cannot be read.
    """
    with path.open("rb") as f:
        identity = file_identity_of(f.fileno())
        ds = dcmread(f, defer_size=STORED_DEFER_SIZE)
    ds.stored_file_identity = identity
    for tag, element in list(ds.items()):
        if isinstance(element, RawDataElement) and _left_out(element):
            del ds[tag]
    return ds


def _left_out(raw: RawDataElement) -> bool:
    if raw.tag in PIXEL_DATA_TAGS or raw.tag == _PER_FRAME_GROUPS:
        return False
    if raw.value is None:
        return raw.length != 0  # over STORED_DEFER_SIZE
    return splits_too_long(raw)


def splits_too_long(raw: RawDataElement) -> bool:
    """Whether a raw value read is too long for pydicom to split into objects.

    Over :data:`SPLIT_VALUE_LIMIT` bytes of a VR pydicom makes one Python
    object per value of (not one of :data:`WHOLE_VRS`).
    """
    if raw.value is None or len(raw.value) <= SPLIT_VALUE_LIMIT:
        return False
    return value_vr(raw) not in WHOLE_VRS


def value_vr(raw: RawDataElement) -> str:
    """Return the VR pydicom gives a raw element's value once it reads it.

    Implicit VR and UN: the data dictionary's (a tag it does not know stays
    UN, its value bytes); an ambiguous one ("US or SS") is returned as such.
    """
    if raw.VR not in (None, VR.UN):
        return str(raw.VR)
    try:
        return str(dictionary_VR(raw.tag))
    except KeyError:
        return "UN"


# PS3.5 9.1: digits in components separated by ".", at most 64 characters.
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_MAX_LENGTH = 64
_CHUNK = 1 << 20  # bytes read at a time when hashing
# Locks instances share while a copy is placed and indexed (Storage.instance_lock),
# and the file in .incoming whose bytes lock them across processes.
_INSTANCE_STRIPES = 64
_INSTANCE_LOCKS = "instance-locks"
_CLOSE_WAIT = 5.0  # seconds close() waits for each instance lock to be free


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

    Temporary files live in a spool folder of this process under
    ``<root>/.incoming/`` (never inside a study folder). The process holds a
    lock on its spool while it runs; :meth:`sweep_incoming` removes the spools
    whose process has ended, whatever their age, and leaves those of running
    processes (other receiving processes may share the storage).

    Parameters
    ----------
    root
        The storage folder; created when missing.
    """

    INCOMING = ".incoming"
    _LOCK = "lock"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / self.INCOMING
        self._ensure_dir(self.incoming)
        self._spool: Path | None = None
        self._spool_lock: int | None = None
        self._stripes = [threading.Lock() for _ in range(_INSTANCE_STRIPES)]
        self._stripes_fd: int | None = None
        self._stripes_opening = threading.Lock()
        # Threads start on first use; fsyncs and hashes waiting for one are
        # done by their caller itself, so a busy pool never holds an answer back.
        self._flusher = ThreadPoolExecutor(4, thread_name_prefix="fsync")

    @property
    def spool(self) -> Path:
        """Return this process's spool folder (made and locked on first use)."""
        if self._spool is None:
            folder = self.incoming / f"{os.getpid()}-{secrets.token_hex(4)}"
            folder.mkdir(mode=0o750)
            fd = os.open(folder / self._LOCK, os.O_RDWR | os.O_CREAT, 0o640)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._spool, self._spool_lock = folder, fd
        return self._spool

    @contextlib.contextmanager
    def instance_lock(self, key: InstanceKey) -> Iterator[None]:
        """Hold one instance against every other writer of it, in any process.

        Placing a received copy and indexing it (its hash) is one step: two
        copies of one instance arriving at once on two associations must not
        leave one's file under the other's index row. Instances share 64 locks:
        a thread lock each, and a byte of ``.incoming/instance-locks`` for the
        other processes of the node, locked as an open file description's
        (``F_OFD_SETLKW``): a process-owned record lock would let the kernel
        call two processes' threads, each holding one byte and waiting for
        another, a deadlock (EDEADLK), and be dropped by any close of the file.

        Parameters
        ----------
        key
            The instance's validated UIDs.

        Raises
        ------
        StorageError
            If the lock file cannot be opened or locked.
        """
        stripe = zlib.crc32(key.sop_instance_uid.encode()) % _INSTANCE_STRIPES
        with self._stripes[stripe]:
            try:
                fd = self._stripes_file()
                _lock_byte(fd, stripe, fcntl.F_WRLCK)
            except OSError as exc:
                raise StorageError(_os_error_name(exc)) from exc
            try:
                yield
            finally:
                _lock_byte(fd, stripe, fcntl.F_UNLCK)

    def _stripes_file(self) -> int:
        with self._stripes_opening:
            if self._stripes_fd is None:
                self._stripes_fd = os.open(
                    self.incoming / _INSTANCE_LOCKS,
                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                    0o640,
                )
            return self._stripes_fd

    def close(self) -> None:
        """Remove this process's spool folder and release its lock."""
        self._flusher.shutdown(wait=True)
        # The instance locks' file is closed once no thread holds one (a thread
        # still storing, past the wait, keeps it open until the process ends).
        held = [lock for lock in self._stripes if lock.acquire(timeout=_CLOSE_WAIT)]
        try:
            with self._stripes_opening:
                if len(held) == len(self._stripes) and self._stripes_fd is not None:
                    os.close(self._stripes_fd)
                    self._stripes_fd = None
        finally:
            for lock in held:
                lock.release()
        if self._spool is None or self._spool_lock is None:
            return
        shutil.rmtree(self._spool, ignore_errors=True)
        os.close(self._spool_lock)
        self._spool = self._spool_lock = None

    def sweep_incoming(self) -> int:
        """Remove what ended processes left in ``.incoming``.

        A spool folder whose lock nobody holds belonged to a process that has
        ended (a crash, a kill -9): it goes whole. Loose files (from earlier
        versions, which wrote no spool folders) go too, but for the instance
        locks' file (:meth:`instance_lock`).

        Returns
        -------
        int
            How many files were removed.
        """
        removed = 0
        for entry in os.scandir(self.incoming):
            if entry.is_dir(follow_symlinks=False):
                removed += self._sweep_spool(Path(entry.path))
            elif entry.name != _INSTANCE_LOCKS:  # in use by every process
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def _sweep_spool(self, folder: Path) -> int:
        try:
            fd = os.open(folder / self._LOCK, os.O_RDWR)
        except FileNotFoundError:
            # Half made (its process is about to lock it) or half removed.
            with contextlib.suppress(FileNotFoundError):
                if time.time() - folder.stat().st_mtime < 60:
                    return 0
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return 0  # its process runs
            files = [p for p in folder.iterdir() if p.name != self._LOCK]
            shutil.rmtree(folder, ignore_errors=True)
            return len(files)
        finally:
            if fd is not None:
                os.close(fd)

    def has_room(self, size: int, reserve: int = 64 * 1024) -> bool:
        """Return whether ``size`` more bytes fit, keeping ``reserve`` free.

        Parameters
        ----------
        size
            Bytes about to be written under the storage folder.
        reserve
            Bytes to leave free for what always needs a little room.

        Returns
        -------
        bool
            False when the file system is (nearly) full or cannot be asked.
        """
        try:
            st = os.statvfs(self.incoming)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize >= size + reserve

    def has_spooled_files(self) -> bool:
        """Return whether this process's spool holds any file but its lock."""
        if self._spool is None:
            return False
        with os.scandir(self._spool) as entries:
            return any(e.name != self._LOCK for e in entries)

    def sweep_orphans(
        self, stale_after: float, *, all_before: float | None = None
    ) -> int:
        """Remove files of this process's spool that were abandoned.

        A file is spooled while it is open: an instance being received, one
        being written. One that is no longer open was abandoned (an association
        aborted in the middle of a data set); so was one still open but
        unchanged for ``stale_after`` seconds. Files are told apart by device
        and inode, not by name. Linux only (``/proc/self/fd``); elsewhere
        nothing is removed until the next start.

        Parameters
        ----------
        stale_after
            Seconds without a write after which an open file is abandoned.
        all_before
            When no association is running: every file last written before
            this time (:func:`time.time`) is abandoned, open or not.

        Returns
        -------
        int
            How many files were removed.
        """
        if self._spool is None or not os.path.isdir("/proc/self/fd"):
            return 0
        candidates = [p for p in self._spool.iterdir() if p.name != self._LOCK]
        if not candidates:
            return 0
        open_files = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/self/fd/{fd}")
                open_files.add((st.st_dev, st.st_ino))
        cutoff = time.time() - stale_after
        if all_before is not None:
            cutoff = max(cutoff, all_before)
        removed = 0
        for path in candidates:
            with contextlib.suppress(FileNotFoundError):
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode):
                    continue  # not a spooled file (the spool is the temp folder)
                if (st.st_dev, st.st_ino) not in open_files or st.st_mtime < cutoff:
                    path.unlink()
                    removed += 1
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
        try:
            self._ensure_dir(final.parent)
            self._place(final, [data])
            _fsync_dir(final.parent)
        except OSError as exc:
            raise StorageError(_os_error_name(exc)) from exc
        return final

    def flush_soon(self, path: Path) -> Future[None]:
        """Start making a complete file durable (fsync) in the background.

        The receiver starts this as soon as a data set is on disk and checks the
        data set meanwhile: the disk's flush overlaps the parse and the hash
        instead of following them. Pass the future to :meth:`adopt`.

        Parameters
        ----------
        path
            The complete file.

        Returns
        -------
        concurrent.futures.Future
            Done when the file's data is on stable storage; its result raises
            the OSError of the open or the fsync. Cancel it when the file is
            refused (a flush not yet started is then skipped).

        Raises
        ------
        RuntimeError
            If the storage is closed.
        """
        return self._flusher.submit(_fsync_file, path)

    def digest_soon(self, path: Path, start: int) -> Future[str]:
        """Start the SHA-256 of a complete file from ``start`` in the background.

        Beside :meth:`flush_soon`: the receiver hashes the data set while it
        parses it (reading and hashing let other threads run).

        Parameters
        ----------
        path
            The complete file.
        start
            Where the hashed bytes begin (the data set, after the File Meta).

        Returns
        -------
        concurrent.futures.Future
            Its result is the hex digest, or raises the OSError of the read.
            Cancel it when the file is refused; where cancelling succeeds
            (the pool was busy flushing), hash with :func:`sha256_from`.

        Raises
        ------
        RuntimeError
            If the storage is closed.
        """
        return self._flusher.submit(sha256_from, path, start)

    def adopt(
        self, key: InstanceKey, path: Path, flushed: Future[None] | None = None
    ) -> Path:
        """Move a complete file into the store atomically, replacing an older copy.

        The file (received into the spool) is made durable and renamed into
        place; from another file system it is copied first. When this returns,
        the file and its directory entry are on stable storage.

        Parameters
        ----------
        key
            The instance's validated UIDs.
        path
            The complete DICOM file.
        flushed
            The file's :meth:`flush_soon`, when one was started: waited for
            instead of an fsync here (or, when it has not started yet,
            cancelled and done here).

        Returns
        -------
        pathlib.Path
            The final path.

        Raises
        ------
        StorageError
            If the file cannot be made durable or moved (a full disk among
            them); the message carries the OS error's name, never the path.
        """
        final = self.path_of(key)
        try:
            self._ensure_dir(final.parent)
            # A flush still waiting for a thread is done here instead.
            synced = False
            if flushed is not None and not flushed.cancel():
                flushed.result()  # raises its OSError
                synced = True
            fd = os.open(path, os.O_RDONLY)
            try:
                if not synced:
                    os.fsync(fd)
                try:
                    os.replace(path, final)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    os.lseek(fd, 0, os.SEEK_SET)
                    self._place(final, iter(lambda: os.read(fd, 1 << 20), b""))
            finally:
                os.close(fd)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise StorageError(_os_error_name(exc)) from exc
        return final

    def _place(self, final: Path, chunks: Iterable[bytes]) -> None:
        # Write a new spool file, make it durable and rename it into place; on
        # failure nothing is left. Renamed while still open: a spooled file
        # nobody has open is abandoned (sweep_orphans).
        tmp = self.spool / f"{secrets.token_hex(8)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fsync(fd)
                os.replace(tmp, final)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

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


def sha256_from(path: Path, start: int) -> str:
    """Return the SHA-256 (hex) of a file's bytes from ``start`` to its end."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(start)
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _lock_byte(fd: int, offset: int, kind: int) -> None:
    """Lock (F_WRLCK, waiting) or unlock (F_UNLCK) one byte of a file.

    An open file description's lock (Linux 3.15+): ``struct flock`` with
    l_type, l_whence, l_start, l_len and l_pid 0, native layout.
    """
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi4x", kind, 0, offset, 1, 0))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
