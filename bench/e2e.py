"""End-to-end benchmark: one-image DX studies through a running node to a destination.

A node (receiver, scheduler, --workers worker threads, outbox) runs in this process
(with --worker-processes N, the scoring runs in N `dicom-node worker` processes
instead, as a busy node is deployed: `serve` with workers = 0 beside worker
processes)
with a resnet18 model at 224 px; dcmtk's storescp stands in for the PACS and dcmtk's
storescu sends N one-image DX studies over one association (both in their own
processes, as they would be on other machines). For each study it measures the time from
the study becoming stable (its last instance + stable_after) to the destination
accepting its SR, and the node's studies/s over the whole run; beside them, the
inference-only studies/s of the same model (Classifier.predict with Grad-CAM of the
top image, on the same data sets in memory) measured in the same run, before and
after the node (this VM's speed drifts by up to 30 % between minutes; the ratio
is against the mean of the two).

Targets: node throughput >= 0.8 of inference-only; median latency < 0.5 s.
The node scores a burst 8 one-image studies per forward pass; the inference-only
figure with the same batching is printed too (the target is against one study per
call, the way a node scores studies that arrive one by one).
It also prints the CPU time per study of this process in the burst beside that of
inference alone: on a small CPU the node's work beyond the model (receiving, DICOM
encoding, files, the index, sending) competes with the model for the same cores;
and the CPU per study of the whole machine (every process) with the studies/s
the cores could reach at that cost, all of them busy (the ratio's upper bound).
In one process (no --worker-processes) it also prints the CPU per study of each
of the node's threads: receiving, scheduling, scoring (torch), writing results,
sending. Their Python work shares one GIL.

Latency is measured on --single studies sent one at a time (each once the previous
one's results arrived); throughput on N studies sent at once.

    python bench/e2e.py [--studies 30] [--single 8] [--workers 2] [--scoring-nice 10]
                        [--worker-processes N] [--stable-after 0.5] [--device cpu]
                        [--no-score-on-arrival] [--images 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
DCMTK = Path("/usr/bin")  # dcmtk by full path: pynetdicom installs same-named apps
sys.path.insert(0, str(REPO))

from dicom_node.config import (  # noqa: E402
    CallerConfig,
    DestinationConfig,
    ModelConfig,
    NodeConfig,
)
from dicom_node.index import Study  # noqa: E402
from dicom_node.log import quiet_pynetdicom  # noqa: E402
from dicom_node.service import open_index, running_node  # noqa: E402
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
        # Threshold 0: every study positive, so each gets its Grad-CAM capture
        # (absent findings get none), the same work per study in every run.
        labels=(Label("nodule", CodedConcept("27925004", "SCT", "Nodule"), 0.0),),
        state_dict=build_model("resnet18", 1, 1).state_dict(),
    )
    path = folder / "model.safetensors"
    artifact.save(path)
    return path


def studies(folder: Path, n: int, images: int = 1) -> list[Path]:
    """Write n DX studies of ``images`` images each (copies of a sample with new
    UIDs; one series per study); return the first image of each."""
    template = dcmread(next((REPO / "sample_dicoms" / "dx" / "dicom").rglob("*.dcm")))
    paths = []
    for i in range(n):
        ds = template.copy()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        for j in range(images):
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = j + 1
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = folder / f"{i:04d}-{j:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            if j == 0:
                paths.append(path)
    return paths


class Destination:
    """dcmtk's storescp in its own process; arrival time = the file's mtime."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self._study: dict[str, str] = {}  # SR file name -> study UID
        folder.mkdir()
        self.process = subprocess.Popen(
            [
                str(DCMTK / "storescp"),
                "-aet",
                "DEST",
                "-od",
                str(folder),
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},  # as a tuned PACS would be
        )
        time.sleep(0.5)

    def sr_count(self) -> int:
        """How many SR files there are (received or being written)."""
        return sum(1 for _ in self.folder.glob("SR*"))

    def sr_times(self) -> dict[str, datetime]:
        """Study UID -> when its SR was written, for every SR received."""
        found = {}
        for path in self.folder.glob("SR*"):
            if path.name not in self._study:  # read each file once
                try:
                    ds = dcmread(path, stop_before_pixels=True)
                except (InvalidDicomError, EOFError, OSError):
                    continue  # storescp is still writing it: next time
                self._study[path.name] = str(ds.StudyInstanceUID)
            found[self._study[path.name]] = datetime.fromtimestamp(
                path.stat().st_mtime, UTC
            )
        return found

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def send(
    folder: Path, port: int, calling: str = "BENCH", called: str = "DICOMNODE"
) -> None:
    """Send a folder with dcmtk's storescu (its own process, one association)."""
    done = subprocess.run(
        [
            str(DCMTK / "storescu"),
            "-aet",
            calling,
            "-aec",
            called,
            "+sd",
            "127.0.0.1",
            str(port),
            str(folder),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"storescu failed: {done.stderr[-500:]}")


@contextlib.contextmanager
def worker_processes(config: NodeConfig, workers: int, count: int) -> Iterator[None]:
    """Run ``count`` `dicom-node worker` processes on the node's index while the
    block runs."""
    if count == 0:
        yield
        return
    toml = config.state_dir.parent / "worker.toml"
    dest = config.destinations[0]
    toml.write_text(
        f'[node]\nstate_dir = "{config.state_dir}"\nworkers = {workers}\n'
        f"scoring_nice = {config.scoring_nice}\n"
        f"results_processes = {config.results_processes}\n"
        f'device = "{config.device}"\nlog_level = "WARNING"\n'
        f'[[destinations]]\nname = "{dest.name}"\nae_title = "{dest.ae_title}"\n'
        f'host = "{dest.host}"\nport = {dest.port}\n'
        f'[[models]]\npath = "{config.models[0].path}"\n'
    )
    command = [str(Path(sys.executable).parent / "dicom-node"), "worker"]
    processes = [
        subprocess.Popen([*command, "--config", str(toml)]) for _ in range(count)
    ]
    try:
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)


def machine_cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far, all processes (Linux
    /proc/stat; None elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds() -> dict[tuple[int, str], float]:
    """CPU seconds of each live thread of this process, by (native id, name);
    torch's own threads are named "torch and other native threads" (Linux
    /proc; empty elsewhere)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    found: dict[tuple[int, str], float] = {}
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        name = names.get(int(task.name), "torch and other native threads")
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        found[(int(task.name), name)] = ticks / os.sysconf("SC_CLK_TCK")
    return found


def thread_groups(
    before: dict[tuple[int, str], float],
    after: dict[tuple[int, str], float],
    process_seconds: float,
) -> dict[str, float]:
    """CPU seconds per kind of thread between two snapshots; threads that ended in
    between (pynetdicom's, of finished associations, and the preprocessing
    threads of finished scoring calls) are the rest of the process's CPU."""
    pynetdicom = "associations (pynetdicom), ended threads"
    groups: dict[str, float] = {}
    for (tid, name), seconds in after.items():
        kind = "other (the bench itself, serve's loop)"
        for part, label in (
            ("worker-", "scoring (torch calls, preprocessing)"),
            ("arrivals", "scoring (torch calls, preprocessing)"),
            ("preprocess", "scoring (torch calls, preprocessing)"),
            ("-results", "writing results (SR, SC, files, index)"),
            ("outbox", "sending (outbox: files, index)"),
            ("scheduler", "scheduling"),
            ("torch", "torch and other native threads"),
            ("Acceptor", pynetdicom),
            ("Requestor", pynetdicom),
            ("run_reactor", pynetdicom),
        ):
            if part in name:
                kind = label
        groups[kind] = groups.get(kind, 0.0) + seconds - before.get((tid, name), 0.0)
    groups[pynetdicom] = groups.get(pynetdicom, 0.0) + (
        process_seconds - sum(groups.values())
    )
    return groups


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far."""
    times = os.times()
    return times.user + times.system


def inference_only(
    model: Path, files: list[Path], device: str = "cpu"
) -> tuple[float, float, float]:
    """The model alone on these studies: studies/s one study per call, CPU seconds
    per study of that, and studies/s with 8 studies per call (as the node scores a
    burst)."""
    # As the node loads it (traced; alone, the same speed as eager).
    classifier = Classifier(ModelArtifact.load(model), device, trace=True)
    datasets: list[Dataset] = [dcmread(f) for f in files]
    n = len(datasets)
    classifier.predict(datasets[:1], explain_top_k=1)  # warm up
    started, cpu = time.perf_counter(), cpu_seconds()
    for ds in datasets:
        classifier.predict([ds], explain_top_k=1)
    one_by_one = n / (time.perf_counter() - started)
    cpu_per_study = (cpu_seconds() - cpu) / n
    started = time.perf_counter()
    for i in range(0, n, 8):
        classifier.predict_many([[ds] for ds in datasets[i : i + 8]], explain_top_k=1)
    return one_by_one, cpu_per_study, n / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=30)
    parser.add_argument("--stable-after", type=float, default=0.5)
    defaults = NodeConfig()
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help=f"worker threads (of each process; default {defaults.workers})",
    )
    parser.add_argument(
        "--scoring-nice",
        type=int,
        default=defaults.scoring_nice,
        metavar="STEPS",
        help="[node] scoring_nice: the scoring threads' priority below the "
        f"others' (default {defaults.scoring_nice}; 0: the same)",
    )
    parser.add_argument(
        "--worker-processes",
        type=int,
        default=0,
        metavar="N",
        help="score in N `dicom-node worker` processes (serve with workers = 0); "
        "0 (default): in the node's own threads",
    )
    parser.add_argument(
        "--results-processes",
        type=int,
        default=defaults.results_processes,
        metavar="N",
        help="[node] results_processes: processes building the result objects "
        f"beside each scoring process (default {defaults.results_processes}; 0: "
        "in the worker's results thread)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=1,
        help="images in each study sent one at a time (one series; the burst's "
        "studies have one)",
    )
    parser.add_argument(
        "--no-score-on-arrival",
        action="store_true",
        help="[node] score_on_arrival = false: each study's job scores all its "
        "images (default: scored as they arrive)",
    )
    parser.add_argument(
        "--single", type=int, default=8, help="studies sent one at a time (latency)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="[node] device of the node and of the inference-only baseline "
        "(default cpu; cuda on a GPU host: bench/gpu.sh)",
    )
    args = parser.parse_args()
    quiet_pynetdicom()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = model_file(work)
        (work / "in").mkdir()
        files = studies(work / "in", args.studies)
        before_node, baseline_cpu, batched = inference_only(model, files, args.device)
        dest = Destination(work / "dest")
        config = NodeConfig(
            port=0,
            state_dir=work / "state",
            stable_after=args.stable_after,
            callers=(CallerConfig("BENCH"),),
            destinations=(DestinationConfig("dest", "DEST", "127.0.0.1", dest.port),),
            models=(ModelConfig(model),),
            workers=0 if args.worker_processes else args.workers,
            scoring_nice=args.scoring_nice,
            results_processes=args.results_processes,
            score_on_arrival=not args.no_score_on_arrival,
            device=args.device,
            log_level="WARNING",
            source="bench",
        )
        with (
            running_node(config) as port,
            worker_processes(config, args.workers, args.worker_processes),
        ):
            # Warm the worker's model cache with one study, not counted.
            (work / "warm").mkdir()
            send(studies(work / "warm", 1)[0].parent, port)
            deadline = time.monotonic() + 120
            while not dest.sr_times():
                if time.monotonic() > deadline:
                    raise SystemExit("the warm-up study got no result in 120 s")
                time.sleep(0.1)
            # Latency: one study at a time, each sent once the previous one's
            # results arrived (no queue in front of it).
            single: list[str] = []
            for i in range(args.single):
                one = work / f"single-{i}"
                one.mkdir()
                path = studies(one, 1, args.images)[0]
                uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
                send(one, port)
                deadline = time.monotonic() + 60
                while uid not in dest.sr_times() and time.monotonic() < deadline:
                    time.sleep(0.02)
                single.append(uid)
            # Throughput: every study at once.
            before = set(dest.sr_times())
            expected = len(before) + len(files)
            uids = {
                str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files
            }
            cpu, machine = cpu_seconds(), machine_cpu_seconds()
            threads_before = thread_cpu_seconds()
            send(work / "in", port)
            # While the node works in this process, only count the SR files
            # (reading them here would take CPU and the GIL from the node).
            deadline = time.monotonic() + 600
            while dest.sr_count() < expected and time.monotonic() < deadline:
                time.sleep(0.2)
            node_cpu = (cpu_seconds() - cpu) / len(files)
            per_thread = thread_groups(
                threads_before, thread_cpu_seconds(), node_cpu * len(files)
            )
            machine_now = machine_cpu_seconds()
            busy = (
                machine_now - machine
                if machine_now is not None and machine is not None
                else None
            )
            # The last SR may still be being written: read them all now.
            every_sr = dest.sr_times()
            settle = time.monotonic() + 5
            while not uids <= set(every_sr) and time.monotonic() < settle:
                time.sleep(0.1)
                every_sr = dest.sr_times()
            arrived = {u: t for u, t in every_sr.items() if u not in before}
        dest.stop()
        index = open_index(config)
        from sqlalchemy import select

        with index.sessions() as session:
            rows = session.execute(
                select(Study.study_instance_uid, Study.last_received_at)
            ).all()
        received = {str(uid): at for uid, at in rows}
        index.close()
        after_node, _, _ = inference_only(model, files, args.device)
    baseline = (before_node + after_node) / 2

    def after_stable(uid: str) -> float:
        became_stable = received[uid] + timedelta(seconds=args.stable_after)
        return (every_sr[uid] - became_stable).total_seconds()

    one_by_one = sorted(after_stable(u) for u in single if u in every_sr)
    burst = sorted(after_stable(u) for u in uids if u in arrived)
    first_stable = min(received[u] for u in uids) + timedelta(seconds=args.stable_after)
    span = (max(arrived.values()) - first_stable).total_seconds()
    rate = len(burst) / span
    print(f"studies                {len(burst)} of {len(uids)} delivered (burst)")
    print(
        f"latency, one at a time  median {statistics.median(one_by_one):.2f} s "
        f"over {len(one_by_one)} studies of {args.images} image(s) "
        "(stable -> SR accepted; target < 0.5 s)"
    )
    print(
        f"latency in the burst    median {statistics.median(burst):.2f} s, "
        f"p90 {burst[int(0.9 * (len(burst) - 1))]:.2f} s (includes the queue)"
    )
    print(f"node throughput        {rate:.2f} studies/s")
    print(
        f"inference only         {baseline:.2f} studies/s "
        f"(predict + Grad-CAM, same model; {before_node:.2f} before the node, "
        f"{after_node:.2f} after)"
    )
    print(
        f"                       {batched:.2f} studies/s with 8 studies per forward "
        f"(ratio to that {rate / batched:.2f})"
    )
    print(f"ratio                  {rate / baseline:.2f} (target >= 0.8)")
    if busy:
        # Every process (node, worker processes, storescu, storescp): the CPU a
        # study costs bounds the studies/s these cores can reach.
        per_study = busy / len(files)
        bound = (os.cpu_count() or 1) / per_study
        print(
            f"machine CPU            {1000 * per_study:.0f} ms per study (all "
            f"processes): at most {bound:.1f} studies/s on {os.cpu_count()} "
            f"cores (ratio {bound / baseline:.2f})"
        )
    if not args.worker_processes:
        # Both use the same 2 cores: the CPU the node spends beyond the model
        # (receiving, DICOM encoding, files, index, sending) bounds the ratio.
        print(
            f"CPU per study          node {1000 * node_cpu:.0f} ms (this process, "
            f"burst), inference only {1000 * baseline_cpu:.0f} ms"
        )
        for kind, seconds in sorted(per_thread.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:45s} {1000 * seconds / len(files):5.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
