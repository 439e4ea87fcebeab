"""The operator commands echo, send and status, against a real node."""

from __future__ import annotations

import errno
import json
import socket
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.cli import DEFAULT_CALLING_AE_TITLE
from dicom_node.config import example_config_text, load_config
from dicom_node.errors import AssociationRejectedError, ConfigError, ListenError
from dicom_node.export import Peer, echo, parse_peer
from dicom_node.index import (
    Delivery,
    DeliveryState,
    IndexDB,
    Job,
    JobState,
    ResultRecord,
    Study,
    ThreadRecord,
    ThreadState,
    utc_now,
)
from dicom_node.log import uid_ref
from dicom_node.status import STALE_AFTER, node_status
from tests.factories import make_ct, write_study
from tests.helpers import RunningNode, run_cli, run_python, wait_for


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


def test_the_command_line_module_loads_no_index_network_or_pytorch() -> None:
    # A results process, spawned under the `dicom-node` console script, imports
    # this module as its main module: what the commands use (SQLAlchemy,
    # pynetdicom, PyTorch) is imported by the commands, so that it stays small.
    code = (
        "import sys, dicom_node.cli, dicom_node.results.builder\n"
        "print(sorted(m for m in ('sqlalchemy', 'pynetdicom', 'torch') "
        "if m in sys.modules))\n"
    )
    assert run_python(code).strip() == "[]"


def test_the_node_hands_results_on_without_importing_highdicom() -> None:
    # serve and worker with results processes build nothing themselves:
    # highdicom and its standard tables live only in the processes that build.
    code = (
        "import sys, dicom_node.cli, dicom_node.service, dicom_node.worker\n"
        "import dicom_node.completion, dicom_node.outbox, dicom_node.web\n"
        "print('highdicom' in sys.modules)\n"
        "import dicom_node.results.builder as b\n"
        "b.warm_up()\n"
        "print('highdicom' in sys.modules)\n"
    )
    assert run_python(code).split() == ["False", "True"]


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

    # Every study failing: each is still named, with the node's own reason,
    # and what an earlier run wrote for it is not left to read as this run's.
    earlier = out / str(bad.StudyInstanceUID)
    earlier.mkdir()
    for name in ("sr.dcm", "sc-1.dcm", "sc-1.png"):
        (earlier / name).write_bytes(b"an earlier run's")
    alone = run_cli(
        "score", "--model", str(model), str(folder / "bad.dcm"), "--out", str(out)
    )
    assert alone.returncode == 1
    assert f"study {bad.StudyInstanceUID} FAILED: cannot decode Pixel Data" in (
        alone.stdout
    ), alone.stdout + alone.stderr
    assert str(bad.PatientName) not in alone.stdout + alone.stderr
    assert list(earlier.iterdir()) == []


def test_score_names_a_model_or_an_out_it_cannot_use(tmp_path: Path) -> None:
    source = tmp_path / "ct.dcm"
    make_ct(rows=16, columns=16).save_as(source, enforce_file_format=True)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a model")
    for model, said in (
        (tmp_path / "none.safetensors", "not found"),
        (damaged, "not a safetensors model file"),
    ):
        done = run_cli(
            "score", "--model", str(model), str(source), "--out", str(tmp_path / "out")
        )
        assert done.returncode == 2, done.stderr
        assert said in done.stderr
        assert str(model) in done.stderr
        assert "unexpected" not in done.stderr
    taken = tmp_path / "a-file"
    taken.write_text("")
    done = run_cli("score", "--model", str(damaged), str(source), "--out", str(taken))
    assert done.returncode == 2
    assert f"--out {taken}: not a folder" in done.stderr


def _node_toml(tmp_path: Path, state_dir: Path, port: int = 0) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "{state_dir}"\n'
    )
    return path


def test_serve_on_a_port_in_use_says_so(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = int(taken.getsockname()[1])
        config = _node_toml(tmp_path, tmp_path / "state", port)

        result = run_cli("serve", "--config", str(config))

    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr
    assert "[node] port" in result.stderr
    assert "unexpected" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_privileged_port_is_named_with_what_to_do() -> None:
    error = ListenError.from_os_error(
        "0.0.0.0", 104, OSError(errno.EACCES, "Permission denied")
    )

    assert str(error).startswith("cannot listen on 0.0.0.0:104: permission denied")
    assert "1024" in str(error)
    assert "CAP_NET_BIND_SERVICE" in str(error)
    assert (error.host, error.port) == ("0.0.0.0", 104)


def test_echo_to_a_closed_port_says_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])  # closed again: nothing listens there

    result = run_cli("echo", f"PACS@127.0.0.1:{port}", "--timeout", "5")

    assert result.returncode == 1
    assert f"connection refused by 127.0.0.1:{port}" in result.stderr
    assert "aborted" not in result.stderr


def test_a_rejected_echo_gives_the_reason_and_what_to_do(node: RunningNode) -> None:
    result = run_cli("echo", node.peer, "--aet", "STRANGER")

    assert result.returncode == 1
    assert "rejected by the peer" in result.stderr
    assert "calling AE title not recognised" in result.stderr
    assert "(result 1 rejected-permanent, source 1 service-user, reason 3)" in (
        result.stderr
    )
    assert "hint:" in result.stderr
    assert "'STRANGER'" in result.stderr
    assert "[[callers]]" in result.stderr
    assert "--aet" in result.stderr


def test_a_rejected_send_gives_the_reason_and_what_to_do(
    node: RunningNode, tmp_path: Path
) -> None:
    files = write_study(tmp_path / "s", 1)

    result = run_cli("send", *map(str, files), "--to", node.peer, "--aet", "STRANGER")

    assert result.returncode == 1
    assert "calling AE title not recognised" in result.stderr
    assert "[[callers]]" in result.stderr


def test_the_default_calling_ae_title_is_one_the_example_allows(
    tmp_path: Path, start_node: Callable[..., RunningNode]
) -> None:
    example = tmp_path / "example.toml"
    example.write_text(example_config_text())
    callers = load_config(example).callers
    node = start_node(callers=callers)

    result = run_cli("echo", node.peer)  # no --aet

    assert result.returncode == 0, result.stderr
    assert "Success" in result.stdout
    assert DEFAULT_CALLING_AE_TITLE in run_cli("echo", "--help").stdout


def test_status_lists_what_is_failing(node: RunningNode, tmp_path: Path) -> None:
    """A dead and a retrying delivery, a failed and a skipped job, a rejected
    association, an error and two unhealthy threads, each with what an operator
    needs and never the Study Instance UID."""
    with pytest.raises(AssociationRejectedError):  # the node's own audit path
        echo(Peer("DICOMNODE", "127.0.0.1", node.port), "STRANGER", timeout=5)
    wait_for(
        lambda: node_status(node.index)["associations_by_outcome"] == {"rejected": 1},
        what="the rejection audited",
    )
    node.index.record_error("store", "disk full (OSError)", status=0xA700)
    study_uid = "1.2.826.0.1.3680043.8.498.1234567890"
    now = utc_now()
    with node.index.sessions.begin() as session:
        study = Study(
            study_instance_uid=study_uid,
            first_received_at=now,
            last_received_at=now,
            needs_processing=False,
        )
        session.add(study)
        session.flush()
        jobs = [
            Job(
                study_id=study.id,
                model=f"/models/{name}.safetensors",
                state=state,
                attempts=attempts,
                created_at=now,
                updated_at=now,
                last_error=reason,
            )
            for name, state, attempts, reason in (
                ("chest", JobState.DONE, 1, None),
                ("broken", JobState.FAILED, 3, "ModelError at artifact.py:80"),
                ("knee", JobState.SKIPPED, 1, "no image the model accepts"),
            )
        ]
        session.add_all(jobs)
        session.flush()
        result = ResultRecord(
            job_id=jobs[0].id,
            study_id=study.id,
            model="chest 1.0",
            run=1,
            device_uid="1.2.3",
            sr_sop_instance_uid="1.2.3.4",
            folder="r",
            summary="{}",
            created_at=now,
        )
        session.add(result)
        session.flush()
        for state, attempts, error, updated_at in (
            (
                DeliveryState.DEAD,
                8,
                "association failed: connection refused by X",
                now - timedelta(hours=2),
            ),
            (DeliveryState.PENDING, 2, "status 0xA700 (Failure)", now),
            (DeliveryState.DONE, 1, None, now),
        ):
            session.add(
                Delivery(
                    result_id=result.id,
                    destination="pacs",
                    ae_title="PACS",
                    host="10.0.0.5",
                    port=104,
                    state=state,
                    attempts=attempts,
                    next_attempt_at=now + timedelta(minutes=5),
                    last_error=error,
                    created_at=now,
                    updated_at=updated_at,
                )
            )
        silent_at = now - timedelta(seconds=STALE_AFTER + 30)
        for name, thread_state, beat_at, error in (
            ("scorer-1", ThreadState.FAILING, now, "IndexUnavailableError at x.py:1"),
            ("outbox", ThreadState.RUNNING, silent_at, None),
            ("scheduler", ThreadState.RUNNING, now, None),  # well
            ("scorer-2", ThreadState.STOPPED, silent_at, None),  # stopped cleanly
        ):
            session.add(
                ThreadRecord(
                    owner=f"host:1:{name}",
                    name=name,
                    state=thread_state,
                    started_at=silent_at,
                    beat_at=beat_at,
                    failing_since=now if thread_state == ThreadState.FAILING else None,
                    last_error=error,
                )
            )
    config = _node_toml(tmp_path, node.config.state_dir)

    text = run_cli("status", "--config", str(config))
    shown = run_cli("status", "--config", str(config), "--json")

    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "jobs          pending 0, running 0, done 1, failed 1, skipped 1" in out
    assert "deliveries    pending 1, sending 0, done 1, dead 1" in out
    assert (
        "dead: delivery 1 to pacs (PACS@10.0.0.5:104) after 8 tries: "
        "association failed: connection refused by X"
    ) in out
    assert "retrying: delivery 2 to pacs (PACS@10.0.0.5:104), 2 tries so far" in out
    assert "status 0xA700 (Failure)" in out
    assert "dicom-node retry --dead" in out
    ref = uid_ref(study_uid)
    assert (
        f"failed: job 2 (study {ref}, model /models/broken.safetensors, 3 tries): "
        "ModelError at artifact.py:80"
    ) in out
    assert (
        f"skipped: job 3 (study {ref}, model /models/knee.safetensors, 1 try): "
        "no image the model accepts"
    ) in out
    assert "calling AE 'STRANGER', called AE 'DICOMNODE'" in out
    assert "from 127.0.0.1:" in out
    assert "not on the allow-list" in out
    assert "store 0xA700: disk full (OSError)" in out
    assert "scorer-1 (host:1:scorer-1) failing since" in out
    assert "IndexUnavailableError at x.py:1" in out
    assert "outbox (host:1:outbox) silent since" in out
    assert "scheduler" not in out
    assert "scorer-2" not in out
    assert ": none" not in out  # every section has something
    assert study_uid not in out + shown.stdout

    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert set(status) == {
        "at",
        "associations",
        "associations_by_outcome",
        "studies",
        "studies_waiting",
        "series",
        "instances",
        "jobs",
        "results",
        "deliveries",
        "failing_deliveries",
        "failed_jobs",
        "rejected_associations",
        "last_errors",
        "unhealthy_threads",
    }
    retrying, dead = status["failing_deliveries"]  # newest first
    assert dead["state"] == "dead"
    assert dead["next_attempt_at"] is None
    assert retrying["state"] == "pending"
    assert retrying["next_attempt_at"] is not None
    assert [j["state"] for j in status["failed_jobs"]] == ["skipped", "failed"]
    assert {j["study"] for j in status["failed_jobs"]} == {ref}
    (rejected,) = status["rejected_associations"]
    assert rejected["calling_ae_title"] == "STRANGER"
    assert rejected["peer_address"] == "127.0.0.1"
    assert status["last_errors"][0]["status"] == "0xA700"
    threads = {t["name"]: t for t in status["unhealthy_threads"]}
    assert set(threads) == {"scorer-1", "outbox"}
    assert threads["scorer-1"]["state"] == "failing"
    assert threads["outbox"]["silent"] is True


def test_status_says_none_only_where_there_is_none(node: RunningNode) -> None:
    config = _node_toml(node.config.state_dir.parent, node.config.state_dir)

    result = run_cli("status", "--config", str(config))

    assert result.returncode == 0, result.stderr
    for section in (
        "failing deliveries",
        "failed and skipped jobs",
        "rejected associations",
        "last errors",
        "unhealthy threads",
    ):
        assert f"{section} (" in result.stdout or f"{section}: none" in result.stdout
    assert result.stdout.count(": none") == 5
