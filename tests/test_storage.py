"""The file store: UID checks before any path is built, atomic writes, the sweep."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from dicom_node.errors import InvalidUidError, StorageError
from dicom_node.storage import InstanceKey, Storage, validate_uid


@pytest.mark.parametrize(
    "uid", ["1", "1.2.840.10008.5.1.4.1.1.2", "0.0", "1." + "2" * 62]
)
def test_valid_uids(uid: str) -> None:
    assert validate_uid(uid, "X") == uid


@pytest.mark.parametrize(
    "uid",
    [
        "",
        " ",
        "..",
        "1..2",
        ".1",
        "1.",
        "1.2/3",
        "../etc",
        "1.2.3a",
        "1.2 .3",
        "1." + "2" * 63,
        None,
        12,
    ],
)
def test_invalid_uids_are_refused(uid: object) -> None:
    with pytest.raises(InvalidUidError, match="X"):
        validate_uid(uid, "X")


def test_key_names_the_bad_uid() -> None:
    with pytest.raises(InvalidUidError, match="SeriesInstanceUID"):
        InstanceKey("1.2", "../..", "1.3")


def test_write_is_atomic_and_replaces(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "storage")
    key = InstanceKey("1.2", "1.2.3", "1.2.3.4")

    path = storage.write(key, b"first")
    storage.write(key, b"second")

    assert path == tmp_path / "storage/1.2/1.2.3/1.2.3.4.dcm"
    assert path.read_bytes() == b"second"
    assert [p.name for p in storage.spool.iterdir()] == ["lock"]
    storage.remove(key)
    assert not path.exists()


def test_adopt_moves_a_received_file_into_place(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "storage")
    key = InstanceKey("1.2", "1.2.3", "1.2.3.4")
    received = storage.spool / "received.dcm"
    received.write_bytes(b"data set")

    path = storage.adopt(key, received)

    assert path.read_bytes() == b"data set"
    assert not received.exists()


def test_adopt_waits_for_the_flush_started_on_arrival(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "storage")
    key = InstanceKey("1.2", "1.2.3", "1.2.3.4")
    received = storage.spool / "received.dcm"
    received.write_bytes(b"data set")
    # A flush already running (on a slow disk): the file is placed only once it
    # has returned.
    flushing: Future[None] = Future()
    assert flushing.set_running_or_notify_cancel()
    timer = threading.Timer(0.3, flushing.set_result, (None,))
    started = time.monotonic()
    timer.start()

    path = storage.adopt(key, received, flushing)

    assert time.monotonic() - started >= 0.3
    assert path.read_bytes() == b"data set"
    # A flush that failed (an I/O error) places nothing and names the error.
    again = storage.spool / "again.dcm"
    again.write_bytes(b"data set")
    failed: Future[None] = Future()
    assert failed.set_running_or_notify_cancel()
    failed.set_exception(OSError(errno.EIO, "I/O error"))
    other = InstanceKey("1.2", "1.2.3", "1.2.3.5")
    with pytest.raises(StorageError, match="OSError EIO"):
        storage.adopt(other, again, failed)
    assert not storage.path_of(other).exists()
    # One the receiver started for real is done by the time the file is placed.
    third = storage.spool / "third.dcm"
    third.write_bytes(b"data set")
    assert storage.adopt(other, third, storage.flush_soon(third)).is_file()
    storage.close()
    with pytest.raises(RuntimeError):
        storage.flush_soon(third)


# A receiving process that ends without closing its storage (killed): it
# leaves its spool folder, and its end frees the spool's lock.
ENDED_PROCESS = """
import sys
from pathlib import Path
from dicom_node.storage import Storage

storage = Storage(Path(sys.argv[1]))
(storage.spool / "half-received.dcm").write_bytes(b"x" * 1000)
print(storage.spool)
"""


def test_sweep_removes_what_ended_processes_left(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    ended = subprocess.run(
        [sys.executable, "-c", ENDED_PROCESS, str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    folder = Path(ended.stdout.strip())
    assert (folder / "half-received.dcm").exists()
    loose = root / Storage.INCOMING / "old-layout.tmp"
    loose.write_bytes(b"x")
    # A process that runs, sharing the storage: its spool stays.
    running = Storage(root)
    (running.spool / "arriving.dcm").write_bytes(b"y")

    assert Storage(root).sweep_incoming() == 2

    assert not folder.exists()
    assert not loose.exists()
    assert (running.spool / "arriving.dcm").exists()
    spool = running.spool
    running.close()  # a clean stop removes its own spool
    assert not spool.exists()


def test_orphans_are_the_spooled_files_nothing_has_open(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "storage")
    abandoned = storage.spool / "abandoned.dcm"
    abandoned.write_bytes(b"x")
    with (storage.spool / "arriving.dcm").open("wb") as arriving:
        arriving.write(b"y")
        arriving.flush()

        assert storage.sweep_orphans(stale_after=60) == 1

        assert not abandoned.exists()
        assert (storage.spool / "arriving.dcm").exists()
        # Open but unchanged for longer than stale_after: abandoned too.
        an_hour_ago = time.time() - 3600
        os.utime(storage.spool / "arriving.dcm", (an_hour_ago, an_hour_ago))
        assert storage.sweep_orphans(stale_after=60) == 1
        assert not (storage.spool / "arriving.dcm").exists()


# Two receiving processes, two threads each: one holds an instance's lock for a
# while; the other, once the other process holds its instance, asks for it.
# Prints when each thread got and let go of its lock, and what failed.
CROSSED_LOCKS = """
import sys, threading, time
from pathlib import Path
from dicom_node.storage import InstanceKey, Storage

root, mine, theirs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
start = float(sys.argv[4])
storage = Storage(root)
key = lambda uid: InstanceKey("1.2.3", "1.2.3.4", uid)
said = []

def hold():
    time.sleep(max(0.0, start - time.time()))
    with storage.instance_lock(key(mine)):
        said.append(f"held {mine} {time.time():.3f}")
        (root / f"held-{mine}").touch()  # the other process's waiter may ask now
        time.sleep(2.0)
        said.append(f"releasing {mine} {time.time():.3f}")  # the last moment held

def wait():
    deadline = time.time() + 30
    while not (root / f"held-{theirs}").exists() and time.time() < deadline:
        time.sleep(0.01)
    try:
        with storage.instance_lock(key(theirs)):
            said.append(f"got {theirs} {time.time():.3f}")
    except Exception as exc:
        said.append(f"failed {type(exc).__name__} {exc}")

threads = [threading.Thread(target=hold), threading.Thread(target=wait)]
for t in threads:
    t.start()
for t in threads:
    t.join()
storage.close()
print("\\n".join(said))
"""


def test_instance_locks_hold_across_processes_without_a_false_deadlock(
    tmp_path: Path,
) -> None:
    # Process-owned record locks made the kernel refuse the second waiter
    # (EDEADLK): each process waits for the other, though no thread holds two.
    root = tmp_path / "storage"
    Storage(root).close()
    first, second = "1.2.3.4.5.1", "1.2.3.4.5.2"
    start = time.time() + 3  # both processes started and importing done
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CROSSED_LOCKS, str(root), mine, theirs, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mine, theirs in ((first, second), (second, first))
    ]
    said = {}
    for child, mine in zip(children, (first, second), strict=True):
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        said[mine] = dict(line.rsplit(" ", 1) for line in out.splitlines())
    for mine, theirs in ((first, second), (second, first)):
        lines = said[mine]
        assert f"got {theirs}" in lines, lines  # not "failed OSError ... deadlock"
        # It got the other process's instance only once that process let it go.
        assert float(lines[f"got {theirs}"]) >= float(
            said[theirs][f"releasing {theirs}"]
        )
