"""The file store: UID checks before any path is built, atomic writes, the sweep."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dicom_node.errors import InvalidUidError
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
    assert list(storage.incoming.iterdir()) == []
    storage.remove(key)
    assert not path.exists()


def test_sweep_removes_only_old_temporary_files(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "storage")
    old = storage.incoming / "old.tmp"
    young = storage.incoming / "young.tmp"
    old.write_bytes(b"x")
    young.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))

    assert storage.sweep_incoming(older_than=900) == 1

    assert sorted(p.name for p in storage.incoming.iterdir()) == ["young.tmp"]
