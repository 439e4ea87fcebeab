"""`dicom-node demo`: the whole flow on this machine, with nothing to set up.

1. a small synthetic chest-radiograph dataset and a quick model, made with
   ``medtrain`` (reused when already built);
2. a receiving PACS on loopback: Orthanc when installed, else a minimal
   built-in receiver;
3. the node (receiver, scheduler, worker, outbox) on loopback, embedded
   defaults (SQLite, local storage);
4. the sample studies sent to the node; the node scores them and sends the SR
   and Grad-CAM images to the PACS;
5. the result per study, the SR rendered as text, and where the Grad-CAM PNGs are.
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_node.config import CallerConfig, DestinationConfig, ModelConfig, NodeConfig
from dicom_node.errors import DicomNodeError
from dicom_node.export import Peer, send_files
from dicom_node.index import Delivery, ResultRecord, Study
from dicom_node.log import quiet_pynetdicom
from dicom_node.results.store import results_root
from dicom_node.score import capture_png, sr_text
from dicom_node.service import open_index, running_node

__all__ = ["Orthanc", "find_orthanc", "receiver_ae", "run_demo"]

PACS_AE = "DEMOPACS"
NODE_AE = "DICOMNODE"
# The quick model: 600 images at 128 px, 12 epochs: about 2.5 minutes on two
# CPU cores, enough to learn the synthetic nodule.
TRAIN = {"n": 600, "seed": 1, "size": 128, "epochs": 12}


def _say(message: str) -> None:
    print(message, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _medtrain() -> str:
    found = Path(sys.executable).with_name("medtrain")
    if found.is_file():
        return str(found)
    on_path = shutil.which("medtrain")
    if on_path:
        return on_path
    raise DicomNodeError(
        "the demo trains its model with medtrain, which is not installed: "
        "pip install 'dicom-node[train]'"
    )


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DicomNodeError(
            f"{what} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )


def _model(work: Path) -> Path:
    data = work / "train"
    model = work / "model" / "chest.safetensors"
    if model.is_file():
        _say(f"[1/5] model: reusing {model}")
        return model
    medtrain = _medtrain()
    started = time.monotonic()
    if not (data / "labels.csv").is_file():
        if data.exists():
            shutil.rmtree(data)
        _say(f"[1/5] making {TRAIN['n']} synthetic chest radiographs ({data})")
        _run(
            [
                medtrain,
                "synth",
                str(data),
                "--n",
                str(TRAIN["n"]),
                "--seed",
                str(TRAIN["seed"]),
                "--size",
                str(TRAIN["size"]),
            ],
            "medtrain synth",
        )
    _say(
        f"[1/5] training a quick resnet18 ({TRAIN['epochs']} epochs at "
        f"{TRAIN['size']} px; about 2-3 minutes on a 2-core CPU)"
    )
    process = subprocess.Popen(
        [
            medtrain,
            "fit",
            str(data),
            "--out",
            str(model),
            "--size",
            str(TRAIN["size"]),
            "--epochs",
            str(TRAIN["epochs"]),
            "--freeze-epochs",
            "0",
            "--unfreeze-from",
            "conv1",
            # Heatmaps that point at the nodule (see "Training a model").
            "--cell-loss",
            "1.0",
            "--gradcam-layer",
            "layer2",
            "--name",
            "demo-chest-nodule",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(("epoch", "wrote")):
            _say("      " + line.rstrip())
    if process.wait() != 0:
        raise DicomNodeError("medtrain fit failed:\n" + "".join(lines[-20:]))
    _say(f"      done in {time.monotonic() - started:.0f} s")
    return model


def _samples(repo_samples: Path, work: Path) -> tuple[Path, dict[str, str]]:
    """Return the folder of studies to send and the truth per study, if known."""
    folder = repo_samples if (repo_samples / "labels.csv").is_file() else None
    if folder is None:
        folder = work / "samples"
        if not (folder / "labels.csv").is_file():
            if folder.exists():
                shutil.rmtree(folder)
            _run(
                [
                    _medtrain(),
                    "synth",
                    str(folder),
                    "--n",
                    "6",
                    "--seed",
                    "2026",
                    "--size",
                    "256",
                ],
                "medtrain synth",
            )
    truth: dict[str, str] = {}
    with (folder / "labels.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            study = row.get("study_uid", "")
            if study:
                label = row.get("label", "")
                if truth.get(study) != "nodule":
                    truth[study] = label
    return folder, truth


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


class _BuiltinPacs:
    """A minimal receiving SCP that files what it receives (no Orthanc here)."""

    name = "built-in receiver"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self._server: Any = None

    def start(self) -> None:
        """Listen on the port; every instance received is filed in the folder."""
        from pynetdicom import evt

        ae = receiver_ae(PACS_AE)
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
        if self._server is not None:
            self._server.shutdown()

    def count(self, study_uid: str) -> int:
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
    """

    name = "Orthanc"

    def __init__(
        self,
        binary: str,
        folder: Path,
        modalities: dict[str, list[object]] | None = None,
        ae_title: str = PACS_AE,
    ) -> None:
        self.binary = binary
        self.folder = folder
        self.modalities = modalities or {}
        self.ae_title = ae_title
        self.port = _free_port()
        self.http = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, *, keep: bool = False) -> None:
        """Write the configuration, start Orthanc and wait for its REST API.

        Parameters
        ----------
        keep
            Keep what an earlier start stored (a restart after :meth:`stop`, at
            the same ports); by default Orthanc starts empty.
        """
        if self.folder.exists() and not keep:
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
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
            "Plugins": [],
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        log = (self.folder / "orthanc.log").open("ab")
        self._process = subprocess.Popen(
            [self.binary, str(path)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except OSError:
                if self._process.poll() is not None:
                    break
                time.sleep(0.2)
        raise DicomNodeError(
            f"Orthanc did not start; see {self.folder / 'orthanc.log'}"
        )

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


def _progress(index: Any) -> tuple[int, int]:
    from sqlalchemy import func, select

    with index.sessions() as session:
        done = session.scalar(
            select(func.count()).select_from(Delivery).where(Delivery.state == "done")
        )
        dead = session.scalar(
            select(func.count()).select_from(Delivery).where(Delivery.state == "dead")
        )
    return int(done or 0), int(dead or 0)


def run_demo(work: Path, samples: Path, timeout: float = 240.0) -> int:
    """Run the demo in ``work`` and print what happened.

    Parameters
    ----------
    work
        Folder for the dataset, model, PACS and node state (kept for a look).
    samples
        Folder of sample studies with a labels.csv (the repository's
        sample_dicoms/dx); made with medtrain when it does not exist.
    timeout
        Seconds to wait for every study's results to reach the PACS.

    Returns
    -------
    int
        0 when every study's results reached the PACS.
    """
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    model = _model(work)
    folder, truth = _samples(samples, work)
    orthanc = find_orthanc()
    pacs: Orthanc | _BuiltinPacs = (
        Orthanc(orthanc, work / "pacs") if orthanc else _BuiltinPacs(work / "pacs")
    )
    _say(f"[2/5] starting the PACS: {pacs.name} as {PACS_AE} on 127.0.0.1:{pacs.port}")
    pacs.start()
    try:
        state = work / "node"
        if state.exists():
            shutil.rmtree(state)  # a fresh node each run, so every study is new to it
        config = NodeConfig(
            ae_title=NODE_AE,
            port=0,
            state_dir=state,
            stable_after=1.0,
            callers=(CallerConfig(PACS_AE, "127.0.0.1"),),
            destinations=(DestinationConfig("pacs", PACS_AE, "127.0.0.1", pacs.port),),
            models=(ModelConfig(model),),
            workers=1,
            device="cpu",
            # The demo shows a Grad-CAM picture of every finding, absent ones
            # in their cold hue; a node pictures present findings only.
            results_explain_absent=True,
            source="demo",
        )
        config = replace(config, log_level="WARNING")
        with running_node(config) as port:
            _say(
                f"[3/5] node {NODE_AE} listening on 127.0.0.1:{port} (state in {state})"
            )
            report = send_files(
                [folder / "dicom"], Peer(NODE_AE, "127.0.0.1", port), PACS_AE
            )
            studies = len(truth) or 1
            _say(
                f"[4/5] sent {report.sent} image(s) in {studies} studies to the node; "
                "waiting for results at the PACS"
            )
            if report.failed:
                raise DicomNodeError(
                    f"{len(report.failed)} image(s) not accepted by the node"
                )
            index = open_index(config)
            try:
                deadline = time.monotonic() + timeout
                last = -1
                while time.monotonic() < deadline:
                    done, dead = _progress(index)
                    if done != last:
                        _say(f"      {done}/{studies} result sets delivered")
                        last = done
                    if done + dead >= studies:
                        break
                    time.sleep(0.3)
                rows = _results(index)
            finally:
                index.close()
        _say("[5/5] results")
        ok = _report(rows, truth, pacs, config)
    finally:
        pacs.stop()
    _say(
        f"demo finished in {time.monotonic() - started:.0f} s; everything is in {work}"
    )
    return 0 if ok else 1


def _results(index: Any) -> list[tuple[str, str, str, str]]:
    from sqlalchemy import select

    with index.sessions() as session:
        rows = session.execute(
            select(
                Study.study_instance_uid,
                ResultRecord.folder,
                ResultRecord.summary,
                Delivery.state,
            )
            .join(ResultRecord, ResultRecord.study_id == Study.id)
            .join(Delivery, Delivery.result_id == ResultRecord.id)
            .order_by(Study.id)
        ).all()
    return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]


def _report(
    rows: list[tuple[str, str, str, str]],
    truth: dict[str, str],
    pacs: Orthanc | _BuiltinPacs,
    config: NodeConfig,
) -> bool:
    ok = bool(rows) and len(rows) >= len(truth)
    root = results_root(config.state_dir)
    pngs = config.state_dir.parent / "gradcam"
    pngs.mkdir(exist_ok=True)
    shown_sr = False
    for study, folder, summary, state in rows:
        labels = json.loads(summary)
        verdict = ", ".join(
            f"{name}: {'Present' if v['positive'] else 'Absent'} "
            f"({100 * v['probability']:.1f} %)"
            for name, v in labels.items()
        )
        known = f"truth {truth[study]}; " if study in truth else ""
        stored = pacs.count(study)
        _say(
            f"  study ...{study[-12:]}: {verdict}  [{known}delivery {state}; "
            f"{stored} object(s) in the PACS]"
        )
        ok = ok and state == "done"
        for sc in sorted((root / folder).glob("sc-*.dcm")):
            png = pngs / f"{study[-12:]}-{sc.stem}.png"
            capture_png(dcmread(sc), png)
            _say(f"      Grad-CAM image: {png}")
        if not shown_sr:
            _say("\n  The first study's SR, as a viewer lists it:")
            for line in sr_text(dcmread(root / folder / "sr.dcm")).splitlines():
                _say("    " + line)
            _say("")
            shown_sr = True
    missing = set(truth) - {row[0] for row in rows}
    if missing:
        _say(f"  {len(missing)} study(ies) got no result in time")
        ok = False
    return ok
