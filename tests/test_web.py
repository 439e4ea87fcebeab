"""[http]: /metrics, /healthz, /readyz and the status page, on a real node.

The node receives a study over DICOM and delivers its results to a real SCP;
the listener is read over real HTTP on loopback (urllib), raw sockets hold its
connections, and the status page is opened in Debian's chromium (Playwright).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE

from dicom_node.config import HttpConfig, NodeConfig
from dicom_node.errors import DicomNodeError
from dicom_node.log import uid_ref
from dicom_node.web import MAX_CLIENTS, MAX_PER_HOST
from tests.helpers import (
    Destination,
    ct_study,
    free_port,
    node_config,
    status,
    store_datasets,
    wait_for,
    worker_process,
    write_toml,
)

pytestmark = pytest.mark.timeout(180)

CHROMIUM = Path("/usr/bin/chromium")


def get(port: int, path: str, token: str | None = None) -> tuple[int, str, str]:
    """GET a path; return the status, the content type and the body."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return (
                response.status,
                response.headers["Content-Type"],
                response.read().decode(),
            )
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def status_with_host(port: int, path: str, host: str, token: str = "") -> int:
    """GET a path with this Host header (as a browser sends the page's name)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": host}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def healthy(port: int) -> bool:
    try:
        return get(port, "/healthz")[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus's text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


@pytest.fixture
def served(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> Callable[..., tuple[NodeConfig, int, int]]:
    """Start a node with [http] on a free port: its config, DICOM and HTTP ports."""

    def start(**http: Any) -> tuple[NodeConfig, int, int]:
        web = free_port()
        config = node_config(tmp_path, model, destination.port)
        config = replace(config, http=HttpConfig(port=web, **http))
        return config, run_serve(config), web

    return start


def test_metrics_count_what_the_node_did(
    served: Callable[..., tuple[NodeConfig, int, int]],
) -> None:
    config, port, web = served()
    code, kind, before = get(web, "/metrics")
    assert code == 200
    assert kind.startswith("text/plain")
    received = sample(before, "dicom_node_instances_received_total")
    accepted = sample(before, "dicom_node_associations_total", outcome="accepted")
    rejected = sample(
        before,
        "dicom_node_associations_total",
        outcome="rejected",
        reason="calling AE title or address not on the allow-list",
    )
    done = sample(before, "dicom_node_deliveries_total", outcome="done")

    assert store_datasets(port, ct_study()) == [0, 0]
    # An unknown caller is rejected, and counted with the reason.
    stranger = AE("STRANGER")
    stranger.add_requested_context("1.2.840.10008.1.1")
    assoc = stranger.associate("127.0.0.1", port, ae_title="DICOMNODE")
    # Refused (the count below says with what reason). The node answers
    # A-ASSOCIATE-RJ; once in CI under load pynetdicom's requestor reported it
    # as aborted instead, a race not yet found: not asserted here.
    assert not assoc.is_established
    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "delivered")

    _, _, after = get(web, "/metrics")
    assert sample(after, "dicom_node_instances_received_total") == received + 2
    assert sample(after, "dicom_node_bytes_received_total") > 0
    assert (
        sample(after, "dicom_node_associations_total", outcome="accepted")
        == accepted + 1
    )
    assert (
        sample(
            after,
            "dicom_node_associations_total",
            outcome="rejected",
            reason="calling AE title or address not on the allow-list",
        )
        == rejected + 1
    )
    assert sample(after, "dicom_node_deliveries_total", outcome="done") == done + 1
    assert sample(after, "dicom_node_jobs", state="done") == 1
    assert sample(after, "dicom_node_outbox", state="done") == 1
    assert sample(after, "dicom_node_inference_seconds_count", model="test") >= 1
    assert sample(after, "dicom_node_gradcam_seconds_count", model="test") >= 1
    assert sample(after, "dicom_node_job_wait_seconds_count") >= 1
    assert sample(after, "dicom_node_result_latency_seconds_count") >= 1
    assert sample(after, "dicom_node_process_resident_memory_bytes") > 10e6
    assert sample(after, "dicom_node_process_cpu_seconds") > 0


def test_a_stopped_workers_own_figures_leave_the_metrics(
    tmp_path: Path, served: Callable[..., tuple[NodeConfig, int, int]]
) -> None:
    # A `dicom-node worker` joins serve's metrics; killed, it cannot clean up.
    config, _, web = served()
    worker = worker_process(write_toml(tmp_path, config))
    mine = f'pid="{worker.pid}"'
    try:
        wait_for(lambda: mine in get(web, "/metrics")[2], 60, "the worker's figures")
        worker.kill()
        worker.wait(timeout=10)
        text = get(web, "/metrics")[2]
        assert mine not in text  # its memory and CPU are no longer shown
        assert (
            sample(text, "dicom_node_process_resident_memory_bytes") > 10e6
        )  # serve's
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)


def test_health_and_readiness_say_why(
    served: Callable[..., tuple[NodeConfig, int, int]],
) -> None:
    _, _, web = served()
    code, kind, body = get(web, "/healthz")
    assert (code, kind, json.loads(body)) == (
        200,
        "application/json",
        {"status": "alive"},
    )
    # Ready once the worker threads have loaded the model.
    wait_for(lambda: get(web, "/readyz")[0] == 200, 60, "ready")
    code, _, body = get(web, "/readyz")
    assert json.loads(body) == {"ready": True, "problems": []}
    assert get(web, "/nothing")[0] == 404


def test_not_ready_when_the_disk_is_short(
    served: Callable[..., tuple[NodeConfig, int, int]],
) -> None:
    _, _, web = served(min_free_bytes=2**62)

    def problems() -> list[str]:
        code, _, body = get(web, "/readyz")
        assert code == 503
        return list(json.loads(body)["problems"])

    assert any("under min_free_bytes" in p for p in problems())
    # Once the worker threads have loaded the model, the disk is the one problem.
    wait_for(lambda: len(problems()) == 1, 60, "the model loaded")
    assert "under min_free_bytes" in problems()[0]


def test_a_bearer_token_guards_all_but_liveness(
    served: Callable[..., tuple[NodeConfig, int, int]], tmp_path: Path
) -> None:
    token_file = tmp_path / "http.token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    _, _, web = served(token_file=token_file)
    assert get(web, "/healthz")[0] == 200
    # Ready once the worker threads have loaded the model (503 until then).
    wait_for(lambda: get(web, "/readyz", "s3cret-token")[0] == 200, 60, "ready")
    for path in ("/metrics", "/readyz", "/"):
        assert get(web, path)[0] == 401
        assert get(web, path, "wrong")[0] == 401
        assert get(web, path, "s3cret-token")[0] == 200
    # With a token, the page may be reached by any name (a reverse proxy's).
    assert status_with_host(web, "/", "status.hospital.example", "s3cret-token") == 200
    assert status_with_host(web, "/", "status.hospital.example") == 401


def test_without_a_token_only_addresses_and_localhost_reach_the_pages(
    served: Callable[..., tuple[NodeConfig, int, int]],
) -> None:
    # DNS rebinding: a page in the operator's browser points a name of its own
    # at the listener; the request then carries that name as its Host.
    _, _, web = served()
    for host in ("127.0.0.1", f"127.0.0.1:{web}", f"localhost:{web}", f"[::1]:{web}"):
        assert status_with_host(web, "/", host) == 200, host
    for host in (f"rebind.attacker.example:{web}", "127.0.0.1.nip.io", "[bad"):
        for path in ("/", "/metrics", "/readyz", "/capture/1/1.png"):
            assert status_with_host(web, path, host) == 421, (host, path)
    assert status_with_host(web, "/healthz", "rebind.attacker.example") == 200


def test_a_token_file_others_can_read_is_refused(
    tmp_path: Path, model: Path, run_serve: Callable[[NodeConfig], int]
) -> None:
    token_file = tmp_path / "http.token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o644)
    config = node_config(tmp_path, model, free_port())
    config = replace(config, http=HttpConfig(port=free_port(), token_file=token_file))
    with pytest.raises(DicomNodeError, match="readable by others"):
        run_serve(config)


def test_idle_connections_hold_bounded_slots_and_time(
    served: Callable[..., tuple[NodeConfig, int, int]],
) -> None:
    _, port, web = served()

    def serving() -> int:  # the HTTP server's threads, one per connection
        names = [t.name for t in threading.enumerate()]
        return sum("process_request_thread" in name for name in names)

    assert serving() == 0
    idle = [socket.create_connection(("127.0.0.1", web)) for _ in range(40)]
    try:
        time.sleep(0.5)
        # At most 16 are served at once (one thread each); the rest are closed.
        assert 0 < serving() <= 16
        # DICOM is not affected.
        assoc = AE("ECHOSCU")
        assoc.add_requested_context("1.2.840.10008.1.1")
        link = assoc.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert link.is_established
        assert link.send_c_echo().Status == 0
        link.release()
        # A connection over the 16 is closed at once, without an answer.
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            get(web, "/healthz")
        # Each idle connection is dropped after the request timeout (5 s).
        wait_for(lambda: healthy(web), 15, "healthz served again")
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium")
@pytest.mark.parametrize("show_patient", [False, True])
def test_status_page_in_a_browser(
    served: Callable[..., tuple[NodeConfig, int, int]],
    browser_type_launch_args: dict[str, Any],
    show_patient: bool,
) -> None:
    from playwright.sync_api import sync_playwright

    config, port, web = served(show_patient=show_patient)
    study = ct_study()
    for ds in study:  # as a CT console says: nothing identifying in the pixels
        ds.BurnedInAnnotation = ds.RecognizableVisualFeatures = "NO"
    assert store_datasets(port, study) == [0, 0]
    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "delivered")

    with sync_playwright() as p:
        browser = p.chromium.launch(**browser_type_launch_args)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{web}/")
            row = page.locator("tr.study").first
            text = row.inner_text()
            assert uid_ref(str(study[0].StudyInstanceUID)) in text
            assert "done" in text
            assert "Present" in text  # the test model calls every finding present
            # The Grad-CAM captures are shown as images the browser decoded.
            images = row.locator("img")
            assert images.count() == 2
            for i in range(images.count()):
                images.nth(i).scroll_into_view_if_needed()
                width = images.nth(i).evaluate("img => img.naturalWidth")
                assert width > 0
            assert "Jobs: pending 0" in page.locator("#queues").inner_text()
            name = str(study[0].PatientName)
            body = page.inner_text("body")
            assert (name in body) is show_patient
            assert (str(study[0].PatientID) in body) is show_patient
            # The page reloads itself.
            refresh = page.locator('meta[http-equiv="refresh"]')
            assert refresh.get_attribute("content") == "10"
        finally:
            browser.close()


@pytest.mark.parametrize("show_patient", [False, True])
def test_a_capture_that_identifies_the_patient_is_shown_only_with_show_patient(
    served: Callable[..., tuple[NodeConfig, int, int]], show_patient: bool
) -> None:
    config, port, web = served(show_patient=show_patient)
    study = ct_study(1)
    study[0].BurnedInAnnotation = "YES"  # the patient's name is in the pixels
    assert store_datasets(port, study) == [0]
    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "delivered")
    captures = list((config.state_dir / "results").rglob("sc-*.dcm"))
    assert captures  # written, and each says so
    assert all(dcmread(path).BurnedInAnnotation == "YES" for path in captures)
    code, _, body = get(web, "/")
    assert code == 200
    assert ('src="/capture/1/1.png"' in body) is show_patient
    request = urllib.request.Request(f"http://127.0.0.1:{web}/capture/1/1.png")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = (response.status, response.headers["Content-Type"])
    except urllib.error.HTTPError as exc:
        answer = (exc.code, "")
    assert answer == ((200, "image/png") if show_patient else (404, ""))


def test_silent_connections_give_way_to_a_request(
    served: Callable[..., tuple[NodeConfig, int, int]],
) -> None:
    # Sixteen connections that never send their request held every slot, and
    # /healthz went unanswered for the whole deadline: a liveness probe failing
    # so gets the node restarted by its orchestrator.
    _, _, web = served()
    silent: list[socket.socket] = []
    try:
        for n in range(MAX_CLIENTS):  # one source each: within every per-host limit
            sock = socket.socket()
            sock.bind((f"127.0.3.{n + 1}", 0))
            sock.connect(("127.0.0.1", web))
            silent.append(sock)
        assert get(web, "/healthz")[0] == 200  # urllib's own timeout: 10 s
        # One source holds at most MAX_PER_HOST: the next is closed at once.
        same: list[socket.socket] = []
        for _ in range(MAX_PER_HOST + 1):
            sock = socket.socket()
            sock.bind(("127.0.4.1", 0))
            sock.connect(("127.0.0.1", web))
            same.append(sock)
        silent += same
        same[-1].settimeout(3)
        assert same[-1].recv(1) == b""
    finally:
        for sock in silent:
            sock.close()


def test_a_slow_sender_is_cut_off(
    served: Callable[..., tuple[NodeConfig, int, int]],
) -> None:
    _, _, web = served()
    sock = socket.create_connection(("127.0.0.1", web))
    sock.settimeout(1)
    started = time.monotonic()
    closed_after = None
    try:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n")
        while time.monotonic() - started < 30:
            try:
                sock.sendall(b"X")  # a byte every 2 s: within each read's timeout
                if sock.recv(1024) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                time.sleep(1)
            except OSError:
                closed_after = time.monotonic() - started
                break
    finally:
        sock.close()
    assert closed_after is not None
    assert 14 <= closed_after <= 20  # the 15 s deadline of a whole request
