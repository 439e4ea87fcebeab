"""DICOMweb destinations: results sent with STOW-RS, through the same outbox.

A real Orthanc with its DICOMweb plugin (Debian's orthanc-dicomweb) sends a
study to the node over DICOM and gets the results back over STOW-RS; a service
that cannot be reached gets the same retries and dead letter as a DICOM peer.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.config import (
    CallerConfig,
    DestinationConfig,
    HttpConfig,
    ModelConfig,
    NodeConfig,
    load_config,
)
from dicom_node.demo.pacs import Orthanc, find_orthanc
from dicom_node.errors import ConfigError
from dicom_node.stow import StowOutcome, stow
from tests.factories import make_artifact, make_ct
from tests.helpers import (
    ct_study,
    free_port,
    make_config,
    node_config,
    status,
    store_datasets,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

pytestmark = pytest.mark.timeout(180)


def web_destination(url: str) -> DestinationConfig:
    return DestinationConfig("pacs-web", "", "", 0, url=url)


@pytest.mark.skipif(
    find_orthanc() is None or not PLUGIN.is_file(),
    reason="Orthanc and orthanc-dicomweb not installed (.ci/setup-system.sh)",
)
def test_orthanc_gets_the_results_over_stow_rs(
    tmp_path: Path, run_serve: Callable[[NodeConfig], int]
) -> None:
    model = tmp_path / "model.safetensors"
    artifact = make_artifact()  # both findings present: a Grad-CAM image each
    artifact.labels = tuple(replace(label, threshold=0.0) for label in artifact.labels)
    artifact.save(model)
    node_port = free_port()
    binary = find_orthanc()
    assert binary is not None
    pacs = Orthanc(
        binary,
        tmp_path / "orthanc",
        modalities={"node": ["DICOMNODE", "127.0.0.1", node_port]},
        ae_title="ORTHANC",
        plugins=[str(PLUGIN)],
    )
    pacs.start()
    try:
        config = make_config(
            tmp_path,
            port=node_port,
            stable_after=0.5,
            callers=(CallerConfig("ORTHANC", "127.0.0.1"),),
            destinations=(web_destination(f"http://127.0.0.1:{pacs.http}/dicom-web"),),
            models=(ModelConfig(model),),
        )
        run_serve(config)
        path = next((REPO / "sample_dicoms" / "dx" / "dicom").rglob("*.dcm"))
        study_id = json.loads(pacs.request("/instances", path.read_bytes()))[
            "ParentStudy"
        ]
        sent = json.loads(
            pacs.request("/modalities/node/store", json.dumps(study_id).encode())
        )
        assert sent.get("FailedInstancesCount", 0) == 0, sent

        def modalities() -> dict[str, int]:
            found: dict[str, int] = {}
            for series in pacs.get(f"/studies/{study_id}/series"):
                modality = series["MainDicomTags"].get("Modality", "")
                found[modality] = found.get(modality, 0) + len(series["Instances"])
            return found

        wait_for(lambda: modalities().get("SR") == 1, 60, "the SR in Orthanc")
        wait_for(lambda: status(config)["deliveries"]["done"] == 1, 20, "delivered")
        assert modalities() == {"DX": 1, "SR": 1, "OT": 2}
        # What Orthanc holds is what the node wrote, byte for byte in content.
        written = {
            str(dcmread(p).SOPInstanceUID)
            for p in (config.state_dir / "results").rglob("*.dcm")
        }
        held = {
            i["MainDicomTags"]["SOPInstanceUID"]
            for i in pacs.get(f"/studies/{study_id}/instances")
            if i["MainDicomTags"]["SOPInstanceUID"] in written
        }
        assert held == written
    finally:
        pacs.stop()


def test_a_service_that_cannot_be_reached_is_retried_then_dead_lettered(
    tmp_path: Path, model: Path, run_serve: Callable[[NodeConfig], int]
) -> None:
    web = free_port()
    config = node_config(
        tmp_path,
        model,
        free_port(),
        destinations=(web_destination(f"http://127.0.0.1:{free_port()}/dicom-web"),),
        delivery_attempts=2,
        http=HttpConfig(port=web),
    )
    port = run_serve(config)
    assert store_datasets(port, ct_study()) == [0, 0]
    wait_for(lambda: status(config)["deliveries"]["dead"] == 1, 60, "dead-lettered")
    failing = status(config)["failing_deliveries"]
    assert failing[0]["attempts"] == 2
    assert "not reached (ConnectionError)" in str(failing[0]["last_error"])
    # The status page lists it with its reason.
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/", timeout=10) as r:
        page = r.read().decode()
    failing_section = page.split('<ul id="failing">', 1)[1].split("</ul>", 1)[0]
    assert "pacs-web: dead after 2 tries" in failing_section
    assert "not reached (ConnectionError)" in failing_section


def test_a_dicomweb_destination_is_checked(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        '[[destinations]]\nname = "web"\nurl = "https://pacs.example/dicom-web/"\n'
        'token_file = "pacs.token"\n'
    )
    config = load_config(toml)
    (web,) = config.destinations
    assert web.url == "https://pacs.example/dicom-web"
    assert web.token_file == tmp_path / "pacs.token"
    toml.write_text(
        '[[destinations]]\nname = "web"\nurl = "https://pacs/dicom-web"\nport = 104\n'
    )
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(toml)
    toml.write_text('[[destinations]]\nname = "web"\nurl = "ftp://pacs/"\n')
    with pytest.raises(ConfigError, match="http:// or https://"):
        load_config(toml)
    toml.write_text(
        '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\n'
        'token_file = "t"\n'
    )
    with pytest.raises(ConfigError, match="token_file is for a DICOMweb"):
        load_config(toml)


class Service(BaseHTTPRequestHandler):
    """A stand-in DICOMweb service's handler: answers, logs nothing."""

    def reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_reply_that_confirms_nothing_is_not_taken_for_stored(tmp_path: Path) -> None:
    # A proxy's login page (HTTP 200, HTML) stands between the node and the PACS.
    seen: list[dict[str, str]] = []

    class LoginPage(Service):
        def do_POST(self) -> None:
            seen.append(dict(self.headers))
            self.rfile.read(int(self.headers["Content-Length"]))
            self.reply(200, "text/html", b"<html>please log in</html>")

    server = ThreadingHTTPServer(("127.0.0.1", 0), LoginPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = tmp_path / "ct.dcm"
        ct_study(1)[0].save_as(path, enforce_file_format=True)
        token = tmp_path / "pacs.token"
        token.write_text("s3cret\n")
        token.chmod(0o600)
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        destination = DestinationConfig("w", "", "", 0, url=url, token_file=token)
        (outcome,) = stow([path], url, destination)
        assert not outcome.ok
        assert outcome.error == "not confirmed by the service"
        assert seen[0]["Authorization"] == "Bearer s3cret"
        token.chmod(0o644)
        with pytest.raises(ConfigError, match="readable by others"):
            stow([path], url, destination)
    finally:
        server.shutdown()


def study_files(folder: Path, n: int) -> tuple[list[Path], list[str]]:
    """Write a study of ``n`` images as files; return them and their SOP UIDs."""
    paths = []
    for i, ds in enumerate(ct_study(n)):
        paths.append(folder / f"ct{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths, [str(dcmread(p).SOPInstanceUID) for p in paths]


def stow_through(service: type[Service], paths: list[Path]) -> list[StowOutcome]:
    """Store files with STOW-RS at a stand-in service answering with ``service``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        return stow(paths, url, None)
    finally:
        server.shutdown()
        server.server_close()


def test_a_partial_stow_reply_marks_each_file_by_what_the_service_said(
    tmp_path: Path,
) -> None:
    # HTTP 202 (PS3.18 10.5.3): some instances stored, others failed; the body
    # names each. Only those it lists as stored count as delivered.
    paths, uids = study_files(tmp_path, 3)

    class Partial(Service):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))

            def item(uid: str, **more: object) -> dict[str, object]:
                return {"00081155": {"vr": "UI", "Value": [uid]}, **more}

            reply = {
                "00081199": {"vr": "SQ", "Value": [item(uids[0])]},
                "00081198": {
                    "vr": "SQ",
                    "Value": [
                        item(uids[1], **{"00081197": {"vr": "US", "Value": [0xA700]}})
                    ],
                },
            }  # the third is in neither: not confirmed
            self.reply(202, "application/dicom+json", json.dumps(reply).encode())

    outcomes = stow_through(Partial, paths)
    assert [(o.ok, o.error) for o in outcomes] == [
        (True, ""),
        (False, "refused (failure reason 0xA700)"),
        (False, "not confirmed by the service"),
    ]


@pytest.mark.parametrize("says_why", [True, False])
def test_a_refused_stow_request_says_why_each_file_was_refused(
    tmp_path: Path, says_why: bool
) -> None:
    # HTTP 409 (PS3.18 10.5.3): nothing stored; the body, when it is a Store
    # Instances Response, gives each instance's failure reason.
    paths, uids = study_files(tmp_path, 2)

    class Conflict(Service):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            failed = [
                {
                    "00081155": {"vr": "UI", "Value": [uid]},
                    "00081197": {"vr": "US", "Value": [reason]},
                }
                for uid, reason in zip(uids, (0xA900, 0xC122), strict=True)
            ]
            reply = {"00081198": {"vr": "SQ", "Value": failed}}
            if says_why:
                self.reply(409, "application/dicom+json", json.dumps(reply).encode())
            else:
                self.reply(409, "text/html", b"<html>conflict</html>")

    outcomes = stow_through(Conflict, paths)
    if says_why:
        assert [(o.ok, o.error) for o in outcomes] == [
            (False, "HTTP 409 Conflict: refused (failure reason 0xA900)"),
            (False, "HTTP 409 Conflict: refused (failure reason 0xC122)"),
        ]
    else:
        assert [(o.ok, o.error) for o in outcomes] == [(False, "HTTP 409 Conflict")] * 2


def _confirming(uids: list[str]) -> bytes:
    stored = [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in uids]
    return json.dumps({"00081199": {"vr": "SQ", "Value": stored}}).encode()


def test_a_reply_typed_with_a_charset_confirms_what_it_names(tmp_path: Path) -> None:
    """dicomweb-client reads only an exact "application/dicom+json": with
    "; charset=utf-8" every result set went unconfirmed and was sent again."""
    paths, uids = study_files(tmp_path, 2)

    class Charset(Service):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.reply(200, "application/dicom+json; charset=utf-8", _confirming(uids))

    assert [(o.ok, o.error) for o in stow_through(Charset, paths)] == [(True, "")] * 2


def test_an_endless_reply_is_cut_at_its_bound(tmp_path: Path) -> None:
    """The body was read whole: a service streaming one filled the memory."""
    paths, _ = study_files(tmp_path, 1)
    sent: list[int] = []

    class Endless(Service):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
            total = 0
            try:
                for _ in range(16_384):  # 1 GiB
                    self.wfile.write(chunk)
                    total += len(chunk)
            except OSError:
                pass
            sent.append(total)

    (outcome,) = stow_through(Endless, paths)
    assert (outcome.ok, outcome.error) == (False, "reply body over 4194304 bytes")
    wait_for(lambda: bool(sent), 30, "the service to stop")
    assert sent[0] < 64 << 20


def test_a_redirect_is_not_followed(tmp_path: Path) -> None:
    """requests POSTed the results again to wherever a redirect pointed (over
    plain HTTP too), and what that host confirmed counted as delivered."""
    paths, uids = study_files(tmp_path, 1)
    elsewhere: list[str] = []

    class Elsewhere(Service):
        def do_POST(self) -> None:
            elsewhere.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.reply(200, "application/dicom+json", _confirming(uids))

    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{other.server_address[1]}/dicom-web/studies"

    class Redirect(Service):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(307)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    try:
        (outcome,) = stow_through(Redirect, paths)
    finally:
        other.shutdown()
        other.server_close()
    assert not outcome.ok
    assert outcome.error == (
        "HTTP 307: a redirect, not followed (give the URL it points to as the "
        "destination's url)"
    )
    assert elsewhere == []


@pytest.mark.parametrize(
    ("content_type", "body", "error"),
    [
        ("application/dicom+json", b"[]", "reply not understood (AttributeError"),
        ("application/dicom+json", b'{"0008": 1}', "reply not understood (TypeError"),
        ("application/dicom+json", b"<html>ok</html>", "reply not understood (not"),
        ("application/dicom+xml", b"<NativeDicomModel>", "reply not understood (Parse"),
        (None, b"{}", "reply not understood (KeyError"),
    ],
)
def test_a_reply_dicomweb_client_fails_on_is_a_failed_try(
    tmp_path: Path, content_type: str | None, body: bytes, error: str
) -> None:
    """Each raised out of stow(): the outbox step ended, its deliveries held
    until the lease ran out, then dead with a false reason."""
    paths, _ = study_files(tmp_path, 1)

    class Odd(Service):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            if content_type is not None:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    (outcome,) = stow_through(Odd, paths)
    assert not outcome.ok
    assert outcome.error.startswith(error)


def test_a_reply_dripped_a_byte_at_a_time_is_cut_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests' timeout bounds each read: a service dripping its headers held
    the outbox (and every destination behind it) for hours."""
    import dicom_node.stow

    monkeypatch.setattr(dicom_node.stow, "_DEADLINE", 2.0)
    paths, _ = study_files(tmp_path, 1)

    class Drip(Service):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            reply = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 10_000
            try:
                for byte in reply:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass

    started = time.monotonic()
    (outcome,) = stow_through(Drip, paths)
    assert (outcome.ok, outcome.error) == (
        False,
        "no whole reply in time (the service answered too slowly)",
    )
    assert time.monotonic() - started < 10


def test_a_large_result_set_goes_up_chunked_through_the_bounded_transport(
    tmp_path: Path,
) -> None:
    # Over 1 MB, dicomweb-client sends the request body chunked.
    paths, uids = [], []
    for i, ds in enumerate(ct_study(3)):
        big = make_ct(rows=512, columns=512, seed=i)
        big.StudyInstanceUID = ds.StudyInstanceUID
        paths.append(tmp_path / f"big{i}.dcm")
        big.save_as(paths[-1], enforce_file_format=True)
        uids.append(str(big.SOPInstanceUID))
    received: list[int] = []

    class Chunked(Service):
        def do_POST(self) -> None:
            assert self.headers["Transfer-Encoding"] == "chunked"
            total = 0
            while size := int(self.rfile.readline().strip(), 16):
                total += len(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            received.append(total)
            self.reply(200, "application/dicom+json", _confirming(uids))

    outcomes = stow_through(Chunked, paths)
    assert [(o.ok, o.error) for o in outcomes] == [(True, "")] * 3
    assert received[0] > sum(p.stat().st_size for p in paths)


def test_a_malformed_reply_is_not_called_unreachable(tmp_path: Path) -> None:
    """More headers than http.client takes read "not reached (ConnectionError)",
    and the outbox skipped the rest of the batch as unreachable."""
    paths, _ = study_files(tmp_path, 1)

    class TooManyHeaders(Service):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            head = b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 150 + b"\r\n"
            self.wfile.write(head)

    (outcome,) = stow_through(TooManyHeaders, paths)
    assert (outcome.ok, outcome.error) == (
        False,
        "reply not understood (a malformed HTTP reply)",
    )
