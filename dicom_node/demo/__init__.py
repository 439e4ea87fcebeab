"""`dicom-node demo`: the whole flow on this machine, with nothing to set up.

1. a small synthetic chest-radiograph dataset and a quick model, made with
   ``medtrain`` (reused when already built);
2. a receiving PACS on loopback (:mod:`dicom_node.demo.pacs`): Orthanc when
   installed, else a minimal built-in receiver;
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
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_node.config import CallerConfig, DestinationConfig, ModelConfig, NodeConfig
from dicom_node.demo.pacs import PACS_AE, BuiltinPacs, Orthanc, find_orthanc
from dicom_node.errors import DicomNodeError
from dicom_node.export import Peer, send_files
from dicom_node.index import Delivery, DeliveryState, ResultRecord, Study
from dicom_node.results.store import capture_files, report_file, results_root
from dicom_node.score import capture_png, sr_text
from dicom_node.service import open_index, running_node

__all__ = ["run_demo"]

NODE_AE = "DICOMNODE"
# The quick model: 600 images at 128 px, 12 epochs: about 2.5 minutes on two
# CPU cores, enough to learn the synthetic nodule.
TRAIN = {"n": 600, "seed": 1, "size": 128, "epochs": 12}


def _say(message: str) -> None:
    print(message, flush=True)


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
            # Quicker than fit's own choice for these images (192 px, 20
            # epochs, 11-15 minutes); the rest is fit's default for them.
            "--size",
            str(TRAIN["size"]),
            "--epochs",
            str(TRAIN["epochs"]),
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


def _progress(index: Any) -> tuple[int, int]:
    from sqlalchemy import func, select

    with index.sessions() as session:
        done = session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.state == DeliveryState.DONE)
        )
        dead = session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.state == DeliveryState.DEAD)
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
    pacs: Orthanc | BuiltinPacs = (
        Orthanc(orthanc, work / "pacs") if orthanc else BuiltinPacs(work / "pacs")
    )
    pacs.start()
    _say(f"[2/5] started the PACS: {pacs.name} as {PACS_AE} on 127.0.0.1:{pacs.port}")
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
            # Kept beside the model, which the next run reuses: compiled once.
            model_cache=model.parent / "compiled",
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
    pacs: Orthanc | BuiltinPacs,
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
        ok = ok and state == DeliveryState.DONE
        for sc in capture_files(root / folder):
            png = pngs / f"{study[-12:]}-{sc.stem}.png"
            capture_png(dcmread(sc), png)
            _say(f"      Grad-CAM image: {png}")
        if not shown_sr:
            _say("\n  The first study's SR, as a viewer lists it:")
            for line in sr_text(dcmread(report_file(root / folder))).splitlines():
                _say("    " + line)
            _say("")
            shown_sr = True
    missing = set(truth) - {row[0] for row in rows}
    if missing:
        _say(f"  {len(missing)} study(ies) got no result in time")
        ok = False
    return ok
