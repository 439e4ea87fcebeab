"""Ingest benchmark: dcmtk storescu into storescp, a bare pynetdicom SCP and the node.

Sends the same N generated 512x512 16-bit CT instances (0.5 MB each) with dcmtk
``storescu`` (TCP_NODELAY=1) to

  (a) dcmtk ``storescp`` writing to disk (``--fork`` when several associations),
  (b) a minimal pynetdicom SCP that only writes each file,
  (c) ``dicom-node serve`` (fsync, index, scheduler),

over one association and over several at once, and prints instances/s for each,
the ratios c/b and c/a, and the server's CPU time per instance.

    python bench/ingest.py [--n 400] [--associations 4] [--scp-processes 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.factories import dcmtk, storescu_folder, write_study  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}

BARE_SCP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, evt, _config
    from pynetdicom.presentation import AllStoragePresentationContexts

    _config.LOG_HANDLER_LEVEL = "none"
    out = Path(sys.argv[2])

    def handle_store(event):
        sop = event.request.AffectedSOPInstanceUID
        with open(out / f"{sop}.dcm", "wb") as f:
            f.write(event.encoded_dataset())
        return 0x0000

    ae = AE("BARESCP")
    ae.maximum_associations = 64
    ae.add_supported_context("1.2.840.10008.1.1")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                    evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    """
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, called: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            [
                dcmtk("echoscu"),
                "-aet",
                "STORESCU",
                "-aec",
                called,
                "127.0.0.1",
                str(port),
            ],
            capture_output=True,
            env=ENV,
            check=False,
        )
        if result.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"SCP on port {port} did not answer C-ECHO")


def send(port: int, called: str, folders: Sequence[Path]) -> float:
    """Send each folder over its own association, all at once; return seconds."""

    def one(folder: Path) -> None:
        result = storescu_folder(port, folder, called, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"storescu failed: {result.stderr[-500:]}")

    started = time.perf_counter()
    with ThreadPoolExecutor(len(folders)) as pool:
        list(pool.map(one, folders))
    return time.perf_counter() - started


def split(files: Sequence[Path], parts: int, root: Path) -> list[Path]:
    folders = [root / f"part{i}" for i in range(parts)]
    for folder in folders:
        folder.mkdir(parents=True)
    for i, f in enumerate(files):
        os.link(f, folders[i % parts] / f.name)
    return folders


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, its live descendants and the
    children they have reaped (storescp --fork), from /proc."""
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            # Fields after the ")" of the command name start at field 3 (state).
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def timed_send(
    pid: int, port: int, called: str, folders: Sequence[Path]
) -> tuple[float, float]:
    """Send; return wall seconds and the server's CPU seconds meanwhile."""
    cpu_before = tree_cpu(pid)
    seconds = send(port, called, folders)
    time.sleep(0.2)  # let the last association's processes end and be reaped
    return seconds, tree_cpu(pid) - cpu_before


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def count_files(folder: Path) -> int:
    return sum(
        1 for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp")
    )


def run_reference(
    command: list[str],
    called: str,
    port: int,
    out: Path,
    folders: Sequence[Path],
    n: int,
) -> tuple[float, float]:
    """Start a reference SCP, send to it, stop it, check it stored all n files."""
    proc = subprocess.Popen(command, env=ENV, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, called)
        seconds, cpu = timed_send(proc.pid, port, called, folders)
    finally:
        proc.terminate()
        proc.wait(10)
    if count_files(out) != n:
        raise RuntimeError(f"{called} stored {count_files(out)} of {n}")
    return seconds, cpu


def run_storescp(work: Path, folders: Sequence[Path], n: int) -> tuple[float, float]:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    command = [dcmtk("storescp"), "-od", str(out), "--aetitle", "STORESCP"]
    if len(folders) > 1:
        command.append("--fork")
    return run_reference([*command, str(port)], "STORESCP", port, out, folders, n)


def run_bare(work: Path, folders: Sequence[Path], n: int) -> tuple[float, float]:
    out = work / "bare"
    out.mkdir()
    script = work / "bare_scp.py"
    script.write_text(BARE_SCP)
    port = free_port()
    command = [sys.executable, str(script), str(port), str(out)]
    return run_reference(command, "BARESCP", port, out, folders, n)


def run_node(
    work: Path, folders: Sequence[Path], n: int, scp_processes: int
) -> tuple[float, float]:
    state = work / "node"
    port = free_port()
    config = work / "node.toml"
    config.write_text(
        f'[node]\nport = {port}\nstate_dir = "{state}"\nallow_any_caller = true\n'
        f'stable_after = 5.0\nscp_processes = {scp_processes}\nlog_level = "WARNING"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)], env=ENV
    )
    try:
        wait_ready(port, "DICOMNODE")
        if scp_processes > 1:  # the extra receivers start after the first
            time.sleep(3)
        seconds, cpu = timed_send(proc.pid, port, "DICOMNODE", folders)
    finally:
        proc.terminate()
        proc.wait(30)
    stored = sum(1 for _ in (state / "storage").rglob("*.dcm"))
    if stored != n:
        raise RuntimeError(f"node stored {stored} of {n}")
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "status",
            "--config",
            str(config),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    indexed = json.loads(status.stdout)["instances"]
    if indexed != n:
        raise RuntimeError(f"node indexed {indexed} of {n}")
    return seconds, cpu


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="instances per run")
    parser.add_argument(
        "--associations", type=int, default=4, help="concurrent senders"
    )
    parser.add_argument("--scp-processes", type=int, default=2, help="node receivers")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="ingest-", dir=args.workdir))
    try:
        print(
            f"generating {args.n} CT instances 512x512 16-bit in {base} ...", flush=True
        )
        files = write_study(base / "src", args.n, rows=512, columns=512)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{mb:.0f} MB to send per run; machine has {os.cpu_count()} CPUs\n")
        print(
            f"{'scenario':<32}{'(a) storescp':>13}{'(b) bare':>10}{'(c) node':>10}"
            f"{'c/b':>6}{'c/a':>6}{'CPU ms/inst: a':>16}{'b':>6}{'c':>6}"
        )
        for label, k, procs in (
            ("1 association, 1 receiver", 1, 1),
            (f"{args.associations} associations, 1 receiver", args.associations, 1),
            (
                f"{args.associations} associations, {args.scp_processes} receivers",
                args.associations,
                args.scp_processes,
            ),
        ):
            rates: dict[str, list[float]] = {"a": [], "b": [], "c": []}
            cpu: dict[str, list[float]] = {"a": [], "b": [], "c": []}
            for _ in range(args.repeat):  # interleaved: machine drift hits all three
                for name in ("a", "b", "c"):
                    work = base / f"{name}-{k}-{procs}"
                    folders = split(files, k, work / "send")
                    if name == "a":
                        seconds, used = run_storescp(work, folders, args.n)
                    elif name == "b":
                        seconds, used = run_bare(work, folders, args.n)
                    else:
                        seconds, used = run_node(work, folders, args.n, procs)
                    rates[name].append(args.n / seconds)
                    cpu[name].append(1000 * used / args.n)
                    shutil.rmtree(work)
            a, b, c = (median(rates[x]) for x in "abc")
            ca, cb, cc = (median(cpu[x]) for x in "abc")
            print(
                f"{label:<32}{a:>11.0f}/s{b:>8.0f}/s{c:>8.0f}/s{c / b:>6.2f}"
                f"{c / a:>6.2f}{ca:>16.1f}{cb:>6.1f}{cc:>6.1f}",
                flush=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        "\nmedians of interleaved runs; (a) and (b) run one process (storescp forks"
        "\nper association when there are several); CPU is the server's, senders"
        "\nexcluded. Targets: c/b >= 0.9, c/a >= 0.5"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
