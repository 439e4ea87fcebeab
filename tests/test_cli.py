"""The operator commands echo, send and status, against a real node."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.errors import ConfigError
from dicom_node.export import parse_peer
from dicom_node.index import IndexDB
from tests.conftest import RunningNode, run_cli
from tests.factories import make_ct, write_study


def test_echo_success_and_failure(node: RunningNode) -> None:
    ok = run_cli("echo", node.peer, "--aet", "TESTSCU")
    refused = run_cli("echo", node.peer, "--aet", "STRANGER")

    assert ok.returncode == 0, ok.stderr
    assert "Success" in ok.stdout
    assert refused.returncode == 1
    assert "rejected" in refused.stderr


def test_echo_to_nothing_fails_clearly() -> None:
    result = run_cli("echo", "NOBODY@127.0.0.1:1", "--timeout", "5")

    assert result.returncode == 1
    assert "NOBODY@127.0.0.1:1" in result.stderr


def test_send_folder_counts_and_skips(node: RunningNode, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    files = write_study(folder, 5)
    (folder / "README.txt").write_text("not DICOM")

    result = run_cli("send", str(folder), "--to", node.peer, "--aet", "TESTSCU")

    assert result.returncode == 0, result.stderr
    assert "5 sent, 0 failed, 1 skipped" in result.stdout
    assert {p.stem for p in node.stored_files()} == {
        dcmread(f).SOPInstanceUID for f in files
    }


def test_send_exits_non_zero_when_any_instance_fails(
    node: RunningNode, tmp_path: Path
) -> None:
    good = tmp_path / "good.dcm"
    make_ct().save_as(good, enforce_file_format=True)
    bad = tmp_path / "bad.dcm"
    ds = make_ct()
    ds.SeriesInstanceUID = "1.2.3.bad"
    ds.save_as(bad, enforce_file_format=True)
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")

    result = run_cli(
        "send",
        str(good),
        str(bad),
        str(not_dicom),
        "--to",
        node.peer,
        "--aet",
        "TESTSCU",
    )

    assert result.returncode == 1
    assert "1 sent, 2 failed" in result.stdout
    assert "FAILED" in result.stderr
    assert "0xC001" in result.stderr
    assert "not a DICOM" in result.stderr


def test_send_to_a_rejecting_node_fails(node: RunningNode, tmp_path: Path) -> None:
    files = write_study(tmp_path / "s", 2)

    result = run_cli("send", *map(str, files), "--to", node.peer, "--aet", "STRANGER")

    assert result.returncode == 1
    assert "0 sent, 2 failed" in result.stdout
    assert node.stored_files() == []


def test_send_missing_path_is_named(node: RunningNode, tmp_path: Path) -> None:
    result = run_cli("send", str(tmp_path / "nope"), "--to", node.peer)

    assert result.returncode == 2
    assert "nope" in result.stderr


def test_status_before_the_node_ever_ran(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[node]\nport = 0\n")

    result = run_cli("status", "--config", str(config))

    assert result.returncode == 1
    assert "has not run" in result.stderr


def test_an_index_from_an_earlier_version_is_named_not_crashed_on(
    tmp_path: Path,
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nport = 0\nstate_dir = "{tmp_path / "state"}"\n')
    (tmp_path / "state").mkdir()
    IndexDB(f"sqlite:///{tmp_path / 'state' / 'index.sqlite3'}").close()
    with sqlite3.connect(tmp_path / "state" / "index.sqlite3") as db:
        db.execute("ALTER TABLE jobs DROP COLUMN next_attempt_at")  # as made before

    for command in ("status", "serve"):
        result = run_cli(command, "--config", str(config))

        assert result.returncode == 1, result.stderr
        assert "made by an earlier dicom-node" in result.stderr
        assert "jobs (next_attempt_at)" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "text",
    ["PACS", "PACS@host", "PACS@host:0", "@host:104", "A_VERY_LONG_AE_TITLE@h:1"],
)
def test_bad_peer_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_peer(text)


def test_peer_forms() -> None:
    assert str(parse_peer("PACS@10.0.0.5:104")) == "PACS@10.0.0.5:104"
    assert parse_peer("PACS@[::1]:104").host == "::1"


def test_help_explains_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "status", "echo", "send", "config"):
        assert command in result.stdout
    serve_help = run_cli("serve", "--help").stdout
    assert "SIGTERM" in serve_help
    assert "--config" in serve_help


def test_score_goes_on_past_a_study_it_cannot_score(
    tmp_path: Path, model: Path
) -> None:
    """One study whose pixels cannot be decoded fails alone, named, exit 1."""
    folder = tmp_path / "in"
    folder.mkdir()
    good = make_ct(rows=64, columns=64, seed=1)
    bad = make_ct(rows=64, columns=64, seed=2)
    bad.PixelData = bad.PixelData[:100]  # truncated: cannot be decoded
    for name, ds in (("good.dcm", good), ("bad.dcm", bad)):
        ds.save_as(folder / name, enforce_file_format=True)
    out = tmp_path / "out"
    done = run_cli("score", "--model", str(model), str(folder), "--out", str(out))
    assert done.returncode == 1
    assert f"study {bad.StudyInstanceUID} FAILED:" in done.stdout
    assert "1 study(ies) could not be scored" in done.stderr
    assert (out / str(good.StudyInstanceUID) / "sr.dcm").is_file()
    assert not (out / str(bad.StudyInstanceUID)).exists()
    assert str(bad.PatientName) not in done.stdout + done.stderr
