"""DICOM TLS on the node's port and to destinations: dcmtk and the node's own SCU."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.config import DestinationConfig, NodeConfig, TlsConfig
from dicom_node.dimse import SUCCESS
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.export import Peer, echo, send_files
from dicom_node.index import AssociationRecord
from dicom_node.scp import Receiver
from dicom_node.service import open_index
from dicom_node.tls import client_context
from tests.factories import dcmtk, make_ct
from tests.helpers import RunningNode, make_config, wait_for
from tests.tls_certificates import Certificates, make_certificates


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def tls_config(certificates: Certificates, *, mutual: bool) -> TlsConfig:
    return TlsConfig(
        certificate=certificates.server_certificate,
        private_key=certificates.server_key,
        ca_certificates=certificates.ca,
        require_client_certificate=mutual,
    )


def dcmtk_echo(port: int, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            dcmtk("echoscu"),
            *tls,
            "-to",
            "5",
            "-ta",
            "5",
            "-aet",
            "ECHOSCU",
            "-aec",
            "DICOMNODE",
            "127.0.0.1",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def dcmtk_client(certificates: Certificates) -> list[str]:
    return [
        "+tls",
        str(certificates.client_key),
        str(certificates.client_certificate),
        "+cf",
        str(certificates.ca),
    ]


def node_client(
    node: RunningNode, certificates: Certificates, *, with_certificate: bool
) -> Callable[[], int]:
    """Return a C-ECHO through the node's own SCU over TLS."""
    own = (
        TlsConfig(certificates.client_certificate, certificates.client_key)
        if with_certificate
        else None
    )
    config = replace(node.config, tls=own)
    destination = DestinationConfig(
        "node", "DICOMNODE", "127.0.0.1", node.port, tls=True, ca_certificates=None
    )
    context = client_context(config, destination)
    context.load_verify_locations(cafile=certificates.ca)
    peer = Peer("DICOMNODE", "127.0.0.1", node.port)
    return lambda: echo(peer, calling_ae_title="ECHOSCU", timeout=10, tls=context)


def test_mutual_tls_with_dcmtk_and_the_node_scu(
    start_node: Callable[..., RunningNode], certificates: Certificates, tmp_path: Path
) -> None:
    node = start_node(tls=tls_config(certificates, mutual=True))

    result = dcmtk_echo(node.port, *dcmtk_client(certificates))
    assert result.returncode == 0, result.stderr

    assert node_client(node, certificates, with_certificate=True)() == SUCCESS

    ct = make_ct()
    sent = tmp_path / "ct.dcm"
    ct.save_as(sent, enforce_file_format=True)
    stored = subprocess.run(
        [
            dcmtk("storescu"),
            *dcmtk_client(certificates),
            "-aec",
            "DICOMNODE",
            "127.0.0.1",
            str(node.port),
            str(sent),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert stored.returncode == 0, stored.stderr
    assert [dcmread(p).SOPInstanceUID for p in node.stored_files()] == [
        ct.SOPInstanceUID
    ]


def test_mutual_tls_refuses_a_client_without_certificate(
    start_node: Callable[..., RunningNode], certificates: Certificates
) -> None:
    node = start_node(tls=tls_config(certificates, mutual=True))

    anonymous = dcmtk_echo(node.port, "+tla", "+cf", str(certificates.ca))
    assert anonymous.returncode != 0

    with pytest.raises(DicomNodeError):
        node_client(node, certificates, with_certificate=False)()
    # The refusal happened during the handshake: no association was opened.
    with node.index.sessions() as session:
        outcomes = [r.outcome for r in session.query(AssociationRecord)]
    assert "open" not in outcomes
    assert "released" not in outcomes
    assert dcmtk_echo(node.port, *dcmtk_client(certificates)).returncode == 0


def test_one_way_tls_and_a_plain_client_refused(
    start_node: Callable[..., RunningNode], certificates: Certificates
) -> None:
    node = start_node(tls=tls_config(certificates, mutual=False))

    one_way = dcmtk_echo(node.port, "+tla", "+cf", str(certificates.ca))
    assert one_way.returncode == 0, one_way.stderr
    assert node_client(node, certificates, with_certificate=False)() == SUCCESS

    plain = dcmtk_echo(node.port)
    assert plain.returncode != 0
    with pytest.raises(DicomNodeError):
        echo(Peer("DICOMNODE", "127.0.0.1", node.port), "ECHOSCU", timeout=5)
    # The port still serves TLS callers after the plain attempts.
    assert dcmtk_echo(node.port, "+tla", "+cf", str(certificates.ca)).returncode == 0


def test_the_node_checks_the_destination_certificate(
    start_node: Callable[..., RunningNode], certificates: Certificates, tmp_path: Path
) -> None:
    node = start_node(tls=tls_config(certificates, mutual=False))
    ct = make_ct()
    sent = tmp_path / "ct.dcm"
    ct.save_as(sent, enforce_file_format=True)
    peer = Peer("DICOMNODE", "127.0.0.1", node.port)
    # The system's CAs do not know the test CA: the send fails, nothing stored.
    untrusted = client_context(
        replace(node.config, tls=None),
        DestinationConfig("x", "DICOMNODE", "127.0.0.1", 1, tls=True),
    )
    report = send_files([sent], peer, "STORESCU", timeout=10, tls=untrusted)
    assert not report.outcomes[0].ok
    trusted = client_context(
        replace(node.config, tls=None),
        DestinationConfig(
            "x", "DICOMNODE", "127.0.0.1", 1, tls=True, ca_certificates=certificates.ca
        ),
    )
    report = send_files([sent], peer, "STORESCU", timeout=10, tls=trusted)
    assert report.outcomes[0].ok, report.outcomes[0].error
    assert len(node.stored_files()) == 1


def test_a_private_key_readable_by_others_is_refused_at_start(
    tmp_path: Path, certificates: Certificates
) -> None:
    key = tmp_path / "open.key"
    key.write_bytes(certificates.server_key.read_bytes())
    os.chmod(key, 0o644)
    config: NodeConfig = make_config(
        tmp_path,
        tls=TlsConfig(certificates.server_certificate, key, certificates.ca),
    )
    index = open_index(config)
    try:
        with pytest.raises(ConfigError, match="readable by others"):
            Receiver(config, index)
    finally:
        index.close()


def test_a_tls_destination_is_held_to_the_same_limits(
    certificates: Certificates, tmp_path: Path
) -> None:
    """Over TLS too, a destination's A-ASSOCIATE-AC claiming 4 GiB is refused at
    its header, not read for as long as the destination streams."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(certificates.server_certificate, certificates.server_key)
    listening = socket.create_server(("127.0.0.1", 0))
    streamed: list[int] = []

    def serve() -> None:
        raw, _ = listening.accept()
        with server.wrap_socket(raw, server_side=True) as conn:
            conn.recv(65536)  # the A-ASSOCIATE-RQ
            conn.sendall(bytes([0x02, 0]) + struct.pack(">L", 0xFFFFFFFF))
            sent, chunk = 0, bytes(1 << 16)
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                for _ in range(16_384):  # 1 GiB
                    sent += conn.send(chunk)
            streamed.append(sent)

    threading.Thread(target=serve, daemon=True).start()
    port = listening.getsockname()[1]
    context = client_context(
        make_config(tmp_path),
        DestinationConfig(
            "x", "PACS", "127.0.0.1", port, tls=True, ca_certificates=certificates.ca
        ),
    )
    try:
        with pytest.raises(DicomNodeError) as caught:
            echo(Peer("PACS", "127.0.0.1", port), "TESTSCU", timeout=5, tls=context)
        wait_for(lambda: bool(streamed), 20, "the destination to stop")
    finally:
        listening.close()

    assert str(caught.value) == (
        f"the node aborted the association with PACS@127.0.0.1:{port}: "
        "association PDU of 4294967295 bytes exceeds 262144"
    )
    assert streamed[0] < 64 << 20
