"""The demo's PACS: Orthanc when installed, else a minimal built-in receiver."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_node.errors import DicomNodeError
from dicom_node.log import quiet_pynetdicom

__all__ = ["PACS_AE", "BuiltinPacs", "Orthanc", "find_orthanc", "receiver_ae"]

PACS_AE = "DEMOPACS"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def receiver_ae(ae_title: str) -> Any:
    """Return a pynetdicom AE that accepts every storage SOP class (and C-ECHO).

    Transfer syntaxes: explicit and implicit VR little endian and JPEG baseline,
    what the node's results use.

    Parameters
    ----------
    ae_title
        Its AE title.

    Returns
    -------
    pynetdicom.AE
        Not yet listening.
    """
    from pynetdicom import AE, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    quiet_pynetdicom()
    ae = AE(ae_title=ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(
            str(context.abstract_syntax),
            ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"],
        )
    ae.add_supported_context(Verification)
    return ae


class BuiltinPacs:
    """A minimal receiving SCP that files what it receives (where Orthanc is not).

    Parameters
    ----------
    folder
        Where each instance received is filed, as ``<SOP Instance UID>.dcm``.
    ae_title
        Its AE title.
    """

    name = "built-in receiver"

    def __init__(self, folder: Path, ae_title: str = PACS_AE) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = _free_port()
        self._server: Any = None

    def start(self) -> None:
        """Listen on the port; every instance received is filed in the folder."""
        from pynetdicom import evt

        ae = receiver_ae(self.ae_title)
        self.folder.mkdir(parents=True, exist_ok=True)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(
                self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True
            )
            return 0

        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()

    def count(self, study_uid: str) -> int:
        """Return how many instances of a study the folder holds."""
        found = 0
        for path in self.folder.glob("*.dcm"):
            ds = dcmread(
                path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
            )
            found += str(ds.StudyInstanceUID) == study_uid
        return found


class Orthanc:
    """Orthanc on loopback with a generated configuration.

    Parameters
    ----------
    binary
        The Orthanc executable.
    folder
        Its configuration, database and log (emptied at start).
    modalities
        Orthanc's DicomModalities: name -> [AE title, host, port].
    ae_title
        Orthanc's own AE title.
    plugins
        Plugin files to load (e.g. the DICOMweb plugin).
    """

    name = "Orthanc"

    def __init__(
        self,
        binary: str,
        folder: Path,
        modalities: dict[str, list[object]] | None = None,
        ae_title: str = PACS_AE,
        plugins: list[str] | None = None,
    ) -> None:
        self.plugins = plugins or []
        self.binary = binary
        self.folder = folder
        self.modalities = modalities or {}
        self.ae_title = ae_title
        self.port = _free_port()
        self.http = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, *, keep: bool = False) -> None:
        """Write the configuration, start Orthanc and wait for its REST API.

        The ports were free when chosen; another process may take one before
        Orthanc binds it. Orthanc then exits saying so, and (unless ``keep``
        asks for the same ports) it is started again on fresh ones.

        Parameters
        ----------
        keep
            Keep what an earlier start stored (a restart after :meth:`stop`, at
            the same ports); by default Orthanc starts empty.

        Raises
        ------
        DicomNodeError
            If Orthanc does not start (the message ends with its log's last
            lines).
        """
        if self.folder.exists() and not keep:
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._start_once():
                return
            if keep or not self._port_taken():
                break
            self.port, self.http = _free_port(), _free_port()
        raise DicomNodeError(
            f"Orthanc did not start; see {self._log}; its last lines:\n"
            + self._log_tail()
        )

    @property
    def _log(self) -> Path:
        return self.folder / "orthanc.log"

    def _log_tail(self, lines: int = 8) -> str:
        try:
            text = self._log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _port_taken(self) -> bool:
        return "already in use" in self._log_tail(lines=20)

    def _start_once(self) -> bool:
        """Start Orthanc on the chosen ports; True once its REST API answers."""
        config = {
            "Name": "dicom-node demo PACS",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomModalities": self.modalities,
            "HttpPort": self.http,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": self.plugins,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [self.binary, str(path)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                answer = self.get("/system")
            except (OSError, ValueError):
                if self._process.poll() is not None:
                    return False
                time.sleep(0.2)
                continue
            # Ours, not another server that holds the HTTP port meanwhile.
            if self._process.poll() is None and answer.get("DicomPort") == self.port:
                return True
            break
        self.stop()
        return False

    def get(self, route: str) -> Any:
        """GET a REST route and return its JSON."""
        return json.loads(self.request(route))

    def request(
        self, route: str, data: bytes | None = None, timeout: float = 30
    ) -> bytes:
        """GET (or POST ``data`` to) a loopback REST route and return the body."""
        url = f"http://127.0.0.1:{self.http}{route}"
        with urllib.request.urlopen(url, data=data, timeout=timeout) as response:
            return bytes(response.read())

    def stop(self) -> None:
        """Stop Orthanc."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def count(self, study_uid: str) -> int:
        """Return how many instances Orthanc holds of a study."""
        found = 0
        for study in self.get("/studies?expand"):
            if study["MainDicomTags"].get("StudyInstanceUID") == study_uid:
                found += len(self.get(f"/studies/{study['ID']}/instances"))
        return found


def find_orthanc() -> str | None:
    """Return the Orthanc executable (Debian puts it in /usr/sbin), or None."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None
