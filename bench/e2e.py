"""End-to-end benchmark: one-image DX studies through a running node to a destination.

A node (receiver, scheduler, one worker thread, outbox) runs in this process with a
resnet18 model at 224 px, and a pynetdicom SCP stands in for the PACS. N one-image
DX studies are sent over one association. For each study it measures the time from
the study becoming stable (its last instance + stable_after) to the destination
accepting its SR, and the node's studies/s over the whole run; beside them, the
inference-only studies/s of the same model (Classifier.predict with Grad-CAM of the
top image, on the same data sets in memory) measured in the same run.

Targets: node throughput >= 0.8 of inference-only; median latency < 0.5 s.

    python bench/e2e.py [--studies 30] [--stable-after 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicom_node.config import (  # noqa: E402
    CallerConfig,
    DestinationConfig,
    ModelConfig,
    NodeConfig,
)
from dicom_node.export import Peer, send_files  # noqa: E402
from dicom_node.index import Study  # noqa: E402
from dicom_node.log import quiet_pynetdicom  # noqa: E402
from dicom_node.service import open_index, serve  # noqa: E402
from inference import (  # noqa: E402
    Classifier,
    CodedConcept,
    Label,
    ModelArtifact,
    PreprocessSpec,
    build_model,
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_file(folder: Path) -> Path:
    torch.manual_seed(0)
    artifact = ModelArtifact(
        name="bench-resnet18",
        version="1",
        device_uid=str(generate_uid()),
        architecture="resnet18",
        preprocessing=PreprocessSpec(size=(224, 224)),
        labels=(Label("nodule", CodedConcept("27925004", "SCT", "Nodule"), 0.5),),
        state_dict=build_model("resnet18", 1, 1).state_dict(),
    )
    path = folder / "model.safetensors"
    artifact.save(path)
    return path


def studies(folder: Path, n: int) -> list[Path]:
    """Write n one-image DX studies (copies of a sample with new UIDs)."""
    template = dcmread(next((REPO / "sample_dicoms" / "dx" / "dicom").rglob("*.dcm")))
    paths = []
    for i in range(n):
        ds = template.copy()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Destination:
    """Records when each study's SR was accepted."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sr_at: dict[str, datetime] = {}
        self.lock = threading.Lock()
        ae = AE(ae_title="DEST")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(
                str(context.abstract_syntax),
                ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
            )

        def on_store(event: Any) -> int:
            ds = event.dataset
            if str(ds.get("Modality", "")) == "SR":
                with self.lock:
                    self.sr_at[str(ds.StudyInstanceUID)] = datetime.now(UTC)
            return 0

        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )


def inference_only(model: Path, files: list[Path]) -> float:
    classifier = Classifier(ModelArtifact.load(model), "cpu")
    datasets: list[Dataset] = [dcmread(f) for f in files]
    classifier.predict(datasets[:1], explain_top_k=1)  # warm up
    started = time.perf_counter()
    for ds in datasets:
        classifier.predict([ds], explain_top_k=1)
    return len(datasets) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=30)
    parser.add_argument("--stable-after", type=float, default=0.5)
    args = parser.parse_args()
    quiet_pynetdicom()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = model_file(work)
        (work / "in").mkdir()
        files = studies(work / "in", args.studies)
        baseline = inference_only(model, files)
        dest = Destination()
        config = NodeConfig(
            port=0,
            state_dir=work / "state",
            stable_after=args.stable_after,
            callers=(CallerConfig("BENCH"),),
            destinations=(DestinationConfig("dest", "DEST", "127.0.0.1", dest.port),),
            models=(ModelConfig(model),),
            workers=1,
            device="cpu",
            log_level="WARNING",
            source="bench",
        )
        stop = threading.Event()
        ready: list[int] = []

        def children(_: int) -> Any:
            raise AssertionError("one receiving process")

        thread = threading.Thread(
            target=serve,
            args=(config, stop, children),
            kwargs={"on_ready": ready.append},
        )
        thread.start()
        while not ready:
            time.sleep(0.05)
        # Warm the worker's model cache with one study, not counted.
        warm = studies(work / "in", 1)
        warm_dir = work / "warm"
        warm_dir.mkdir()
        warm[0].rename(warm_dir / "warm.dcm")
        send_files(
            [warm_dir / "warm.dcm"], Peer("DICOMNODE", "127.0.0.1", ready[0]), "BENCH"
        )
        while not dest.sr_at:
            time.sleep(0.05)
        dest.sr_at.clear()
        sent = send_files(files, Peer("DICOMNODE", "127.0.0.1", ready[0]), "BENCH")
        assert not sent.failed, sent.failed[:1]
        uids = {
            str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files
        }
        deadline = time.monotonic() + 600
        while len(uids & set(dest.sr_at)) < len(uids) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        thread.join()
        if dest.server is not None:
            dest.server.shutdown()
        index = open_index(config)
        from sqlalchemy import select

        with index.sessions() as session:
            rows = session.execute(
                select(Study.study_instance_uid, Study.last_received_at)
            ).all()
        received = {str(uid): at for uid, at in rows}
        index.close()
    stable = {u: received[u] + timedelta(seconds=args.stable_after) for u in uids}
    latencies = sorted(
        (dest.sr_at[u] - stable[u]).total_seconds() for u in uids if u in dest.sr_at
    )
    span = (max(dest.sr_at[u] for u in uids) - min(stable.values())).total_seconds()
    rate = len(latencies) / span
    print(f"studies                {len(latencies)} of {len(uids)} delivered")
    print(
        f"latency (stable -> SR accepted)  median "
        f"{statistics.median(latencies):.2f} s, "
        f"p90 {latencies[int(0.9 * (len(latencies) - 1))]:.2f} s "
        "(target median < 0.5 s)"
    )
    print(f"node throughput        {rate:.2f} studies/s")
    print(
        f"inference only         {baseline:.2f} studies/s "
        "(predict + Grad-CAM, same model)"
    )
    print(f"ratio                  {rate / baseline:.2f} (target >= 0.8)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
