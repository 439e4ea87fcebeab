"""The `dicom-node` command: argv, config, logging, then the subcommand."""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node import __version__
from dicom_node.config import NodeConfig, example_config_text, load_config
from dicom_node.errors import (
    AssociationError,
    AssociationRejectedError,
    ConfigError,
    DicomNodeError,
    InvalidUidError,
    ListenError,
    ThreadEndedError,
)
from dicom_node.log import configure_logging, describe_exception
from inference import ArtifactError  # no PyTorch: see _LAZY_IMPORTS

if TYPE_CHECKING:
    from dicom_node.export import Peer, SendOutcome
    from dicom_node.service import ChildProcess

__all__ = ["build_parser", "main"]

logger = logging.getLogger("dicom_node.cli")

# _LAZY_IMPORTS: each command imports what it needs where it runs: PyTorch
# (scoring, the demo, the worker loop), the index and the network (service,
# status, export: SQLAlchemy, pynetdicom). A results process, started fresh
# (spawn), imports this module as its main module under the console script, and
# stays smaller without them (27 MB less once started).

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Our calling AE title for echo and send unless --aet: dcmtk's storescu default,
# which the example configuration's [[callers]] allows from 127.0.0.1, so that
# `dicom-node echo DICOMNODE@127.0.0.1:11112` reaches a node started from it.
DEFAULT_CALLING_AE_TITLE = "STORESCU"

# A-ASSOCIATE-RJ result, source and reason (PS3.8 9.3.4, Table 9-21).
_RJ_TRANSIENT = 2
_RJ_SERVICE_USER = 1
_RJ_CALLED_AE = 7
_RJ_CALLING_AE = 3
_RJ_NO_REASON = 1

_DESCRIPTION = """\
dicom-node: a DICOM AI node beside your PACS. It receives studies over DICOM
(C-STORE), stores them durably (Success only once an instance is on disk and in
the index), scores each stable study with the configured models, explains the
score with Grad-CAM, and sends the results back as DICOM: a TID 1500 Structured
Report and Secondary Capture images, in new series of the same study.
"""


_AET_HELP = (
    f"our (calling) AE title (default {DEFAULT_CALLING_AE_TITLE}, which the example "
    "configuration's [[callers]] allows from 127.0.0.1); the peer must know it"
)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``dicom-node``.

    Returns
    -------
    argparse.ArgumentParser
        The parser with its subcommands.
    """
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'dicom-node COMMAND --help' for a command's options.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            type=Path,
            default=os.environ.get("DICOM_NODE_CONFIG") or None,
            help="the node's TOML configuration (default: $DICOM_NODE_CONFIG); "
            "'dicom-node config --example' prints a commented one",
        )

    p_serve = sub.add_parser(
        "serve",
        help="receive studies until SIGTERM / Ctrl-C",
        description="Listen for associations (C-ECHO, C-STORE of every storage SOP "
        "class and transfer syntax), store and index every instance, and queue one "
        "job per model for each study once it has been stable for stable_after "
        "seconds. Worker threads ([node] workers) score the jobs, write the SR and "
        "Grad-CAM Secondary Captures, and the outbox sends them to every "
        "destination, retrying with backoff. SIGTERM or Ctrl-C stops accepting "
        "associations, lets running ones finish (up to 10 s) and the current jobs "
        "end, and exits.",
    )
    add_config(p_serve)

    p_status = sub.add_parser(
        "status",
        help="what the node holds, and what is failing",
        description="Read the index and print what the node holds (associations "
        "by outcome, studies, series, instances, jobs, results and deliveries by "
        "state), then, newest first: failing deliveries (dead, or waiting to be "
        "tried again) with the destination and last error, failed and skipped "
        "jobs with the reason, rejected associations (calling AE title, address, "
        "reason), the last errors, and threads that fail or have gone silent. "
        "Studies are named by a hash of their UID, never by patient data.",
    )
    add_config(p_status)
    p_status.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (its keys: README, Operations)",
    )
    p_status.add_argument(
        "--errors",
        type=int,
        default=10,
        metavar="N",
        help="show at most N entries of each list (default 10)",
    )

    p_echo = sub.add_parser(
        "echo",
        help="C-ECHO a peer (test a link)",
        description="Open an association with a peer and send one C-ECHO. Exits 0 "
        "when the peer answers Success. Otherwise says what happened: connection "
        "refused (nothing listens there), no answer within the timeout, rejected "
        "by the peer (its reason, and what to change), or aborted.",
    )
    p_echo.add_argument("peer", metavar="AET@HOST:PORT", help="the peer to test")
    p_echo.add_argument(
        "--aet",
        default=DEFAULT_CALLING_AE_TITLE,
        help=_AET_HELP,
    )
    p_echo.add_argument(
        "--timeout", type=float, default=30.0, help="seconds (default 30)"
    )

    p_send = sub.add_parser(
        "send",
        help="C-STORE files or folders to a peer",
        description="Send DICOM files, and folders searched recursively, exactly as "
        "stored (no transcoding). Every status is checked; exits 1 if any file "
        "was not accepted. Files in folders that are not DICOM instances are "
        "skipped and listed; a named file that is not one counts as a failure.",
    )
    p_send.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p_send.add_argument(
        "--to", required=True, metavar="AET@HOST:PORT", help="the destination"
    )
    p_send.add_argument(
        "--aet",
        default=DEFAULT_CALLING_AE_TITLE,
        help=_AET_HELP,
    )
    p_send.add_argument(
        "--timeout", type=float, default=60.0, help="seconds (default 60)"
    )
    p_send.add_argument("--quiet", action="store_true", help="print only the summary")

    p_worker = sub.add_parser(
        "worker",
        help="score studies and deliver results (a separate process)",
        description="Run job and delivery threads against the index and storage "
        "of --config (the same as serve's), without receiving: for more workers "
        "on this or other hosts (PostgreSQL index and shared storage). Several may "
        "run at once; each claims jobs with a lease, so none is done twice and a "
        "dead worker's jobs are taken over. [node] workers sets the job threads "
        "(at least 1 here). SIGTERM or Ctrl-C stops after the current job.",
    )
    add_config(p_worker)

    p_retry = sub.add_parser(
        "retry",
        help="try waiting deliveries now; revive dead ones (--dead) or failed jobs",
        description="Make every delivery waiting for its next try due now. With "
        "--dead, dead-lettered deliveries (see 'dicom-node status') are queued "
        "again with their tries reset; with --failed-jobs, failed jobs too. A "
        "running serve or worker picks them up.",
    )
    add_config(p_retry)
    p_retry.add_argument(
        "--dead", action="store_true", help="queue dead-lettered deliveries again"
    )
    p_retry.add_argument(
        "--failed-jobs", action="store_true", help="queue failed jobs again"
    )

    p_score = sub.add_parser(
        "score",
        help="score DICOM files offline and write the SR and Grad-CAM images",
        description="Score the images in PATH (files and folders) with MODEL the "
        "way the node does, per study: the TID 1500 SR and the Grad-CAM Secondary "
        "Captures go to DIR/<study>/, a PNG of each Grad-CAM image beside them, "
        "and a summary (per study: label, probability, Present/Absent) to stdout. "
        "Nothing is sent anywhere. As in the node, only image storage instances "
        "are scored (never SEG, RT, SR, KO, PR, Parametric Maps, encapsulated "
        "documents or waveforms, nor the node's own results), and only those of "
        "the modalities, body parts and SOP classes the model accepts; the "
        "options below replace the model's lists. Files passed over are counted "
        "with the reason; when nothing is scored the command fails and says why.",
    )
    p_score.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="DICOM files and folders (searched recursively)",
    )
    p_score.add_argument(
        "--model", type=Path, required=True, help="a .safetensors model file"
    )
    p_score.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="each study's SR, captures (DICOM and PNG) and maps go to "
        "DIR/<Study Instance UID>/",
    )
    p_score.add_argument("--json", action="store_true", help="print one JSON object")
    p_score.add_argument("--device", default="", help="cpu or cuda (default: auto)")
    p_score.add_argument(
        "--gradcam-top-k", type=int, default=1, help="images explained per label"
    )
    p_score.add_argument(
        "--jpeg", action="store_true", help="JPEG baseline Secondary Captures"
    )
    p_score.add_argument(
        "--parametric-map",
        action="store_true",
        help="also write the raw Grad-CAM as a Parametric Map (pm-N.dcm) for "
        "images with patient geometry (CT, MR, ...; not projection radiographs)",
    )
    p_score.add_argument(
        "--explain-absent",
        action="store_true",
        help="also a Grad-CAM image for findings called absent (cold colours, "
        "captioned ABSENT); by default only present findings get one",
    )
    p_score.add_argument(
        "--modality",
        action="append",
        metavar="MODALITY",
        help="score images of this Modality (e.g. DX; repeat for more) instead of "
        "the modalities the model accepts",
    )
    p_score.add_argument(
        "--body-part",
        action="append",
        metavar="BODY_PART",
        help="score images of this Body Part Examined (e.g. CHEST; repeat for "
        "more) instead of the body parts the model accepts",
    )
    p_score.add_argument(
        "--sop-class",
        action="append",
        metavar="UID",
        help="score images of this SOP Class UID (repeat for more) instead of the "
        "SOP classes the model accepts",
    )
    p_score.add_argument(
        "--any-image",
        action="store_true",
        help="score every image storage instance, whatever modalities, body parts "
        "and SOP classes the model accepts (--modality, --body-part and "
        "--sop-class still restrict); non-images are never scored",
    )

    p_demo = sub.add_parser(
        "demo",
        help="the whole flow on this machine: data, model, PACS, node, results",
        description="Make a small synthetic chest-radiograph dataset and a quick "
        "model with medtrain (reused when already built), start a PACS on loopback "
        "(Orthanc when installed, else a built-in receiver) and the node, send the "
        "sample studies, wait for the results, and print the result per study, "
        "the SR as text and where the Grad-CAM images are. Everything stays in "
        "--work. A few minutes on a 2-core CPU.",
    )
    p_demo.add_argument(
        "--work",
        type=Path,
        default=Path("dicom-node-demo"),
        help="working folder (default ./dicom-node-demo)",
    )
    p_demo.add_argument(
        "--samples",
        type=Path,
        default=Path("sample_dicoms/dx"),
        help="studies to send, with a labels.csv (default sample_dicoms/dx; "
        "made with medtrain when missing)",
    )

    p_conformance = sub.add_parser(
        "conformance",
        help="print the node's DICOM Conformance Statement",
        description="Print a DICOM Conformance Statement (PS3.2 layout) made from "
        "the node's own tables: the SOP classes and transfer syntaxes it accepts "
        "as SCP, the result objects it creates and sends as SCU, its C-STORE "
        "statuses, association limits, TLS, character sets and the codes its SR "
        "uses. With --config, the settings of that configuration (AE title, "
        "port, limits, TLS, results options) are stated; without, the defaults.",
    )
    p_conformance.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("DICOM_NODE_CONFIG") or None,
        help="the node's TOML configuration (default: $DICOM_NODE_CONFIG, else "
        "the defaults)",
    )
    p_conformance.add_argument(
        "--format",
        choices=("md", "html"),
        default="md",
        help="Markdown (default) or a standalone HTML page",
    )
    p_conformance.add_argument(
        "--out", type=Path, help="write it to this file (default: standard output)"
    )

    p_config = sub.add_parser(
        "config",
        help="print the example configuration, or check one",
        description="With --example, print a fully commented configuration. With "
        "--config FILE, check it (and the DICOM_NODE_* environment overrides) and "
        "print the resolved settings.",
    )
    p_config.add_argument(
        "--example", action="store_true", help="print the commented example"
    )
    add_config(p_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dicom-node``.

    Parameters
    ----------
    argv
        The arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        0 on success, 1 on a failure, 2 on a usage or configuration error.
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(_config(args))
        if args.command == "status":
            return _status(_config(args), as_json=args.json, limit=args.errors)
        if args.command == "echo":
            configure_logging("WARNING")
            return _echo(args)
        if args.command == "send":
            configure_logging("WARNING")
            return _send(args)
        if args.command == "config":
            return _config_command(args)
        if args.command == "conformance":
            return _conformance(args)
        if args.command == "worker":
            return _worker(_config(args))
        if args.command == "retry":
            return _retry(_config(args), dead=args.dead, failed_jobs=args.failed_jobs)
        if args.command == "demo":
            configure_logging("WARNING")
            from dicom_node.demo import run_demo  # loads PyTorch: see _LAZY_IMPORTS

            return run_demo(args.work, args.samples)
        if args.command == "score":
            configure_logging("WARNING")
            return _score(args)
    except ConfigError as exc:
        print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ListenError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DicomNodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ArtifactError as exc:  # a --model that is missing or not a model file
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: a message, not a traceback
        print(f"dicom-node: unexpected {describe_exception(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    raise AssertionError(f"unhandled command {args.command}")  # argparse requires one


def _config(args: argparse.Namespace) -> NodeConfig:
    if args.config is None:
        raise ConfigError(
            "no configuration: give --config FILE or set DICOM_NODE_CONFIG "
            "('dicom-node config --example > node.toml' writes one)"
        )
    return load_config(Path(args.config))


def _conformance(args: argparse.Namespace) -> int:
    from dicom_node.conformance import render, statement

    config = load_config(Path(args.config)) if args.config else NodeConfig()
    text = render(statement(config), args.format)
    if args.out is None:
        sys.stdout.write(text)
    else:
        try:
            args.out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise DicomNodeError(
                f"--out {args.out}: cannot write ({exc.strerror or exc})"
            ) from exc
        print(f"wrote {args.out}")
    return EXIT_OK


def _serve(config: NodeConfig) -> int:
    from dicom_node.service import (  # see _LAZY_IMPORTS
        cap_malloc_arenas,
        keep_out_kernel_compiler,
        serve,
    )

    cap_malloc_arenas()
    keep_out_kernel_compiler()
    configure_logging(config.log_level)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    mp = multiprocessing.get_context("spawn")

    def spawn(port: int) -> ChildProcess:
        return mp.Process(
            target=_receiver_process, args=(config, port), name="dicom-node-scp"
        )

    serve(config, stop, spawn)
    return EXIT_OK


def _worker(config: NodeConfig) -> int:
    from dicom_node.service import (  # see _LAZY_IMPORTS
        cap_malloc_arenas,
        keep_out_kernel_compiler,
        run_worker,
    )

    cap_malloc_arenas()
    keep_out_kernel_compiler()
    configure_logging(config.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_worker(config, stop)
    return EXIT_OK


def _retry(config: NodeConfig, *, dead: bool, failed_jobs: bool) -> int:
    from dicom_node.jobs import requeue  # see _LAZY_IMPORTS
    from dicom_node.service import open_index

    configure_logging("WARNING")
    _require_index(config)
    index = open_index(config)
    try:
        counts = requeue(index, dead=dead, failed_jobs=failed_jobs)
    finally:
        index.close()
    print(
        f"{counts['waiting']} waiting delivery(ies) due now"
        + (f", {counts['dead']} dead delivery(ies) queued again" if dead else "")
        + (f", {counts['failed']} failed job(s) queued again" if failed_jobs else "")
    )
    return EXIT_OK


def _require_index(config: NodeConfig) -> None:
    if not config.database_url and not (config.state_dir / "index.sqlite3").is_file():
        raise DicomNodeError(
            f"no index in {config.state_dir}: the node has not run with this "
            "configuration yet"
        )


def _score(args: argparse.Namespace) -> int:
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        raise ConfigError(f"no such file or folder: {', '.join(map(str, missing))}")
    if args.gradcam_top_k < 0:
        raise ConfigError("--gradcam-top-k: expected >= 0")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: not a folder")
    from dicom_node.storage import validate_uid  # see _LAZY_IMPORTS

    for uid in args.sop_class or []:
        try:
            validate_uid(uid, "--sop-class")
        except InvalidUidError as exc:
            raise ConfigError(str(exc)) from exc
    from dicom_node.score import score_run  # loads PyTorch: see _LAZY_IMPORTS

    run = score_run(
        args.paths,
        args.model,
        args.out,
        device=args.device,
        gradcam_top_k=args.gradcam_top_k,
        jpeg=args.jpeg,
        parametric_map=args.parametric_map,
        explain_absent=args.explain_absent,
        modalities=[m.upper() for m in args.modality] if args.modality else None,
        body_parts=args.body_part,
        sop_classes=args.sop_class,
        any_image=args.any_image,
    )
    if args.json:
        print(json.dumps(run.to_dict(), indent=2))
    elif run.studies or run.passed_over or run.failed:
        print(run.text())
    if run.failed:
        print(
            f"dicom-node: {len(run.failed)} study(ies) could not be scored "
            "(see FAILED above)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if run.studies:
        return EXIT_OK
    if not run.passed_over:
        print("dicom-node: nothing to score: no file found", file=sys.stderr)
        return EXIT_FAILURE
    reasons = "; ".join(
        f"{reason}: {count} file(s)"
        for reason, count in sorted(run.passed_over.items())
    )
    print(
        f"dicom-node: nothing to score: no image the model accepts ({reasons})",
        file=sys.stderr,
    )
    if run.not_accepted:
        print(
            "dicom-node: --modality, --body-part, --sop-class or --any-image score "
            "images the model does not accept",
            file=sys.stderr,
        )
    return EXIT_FAILURE


def _receiver_process(config: NodeConfig, port: int) -> None:
    """Entry point of an extra receiving process (started by ``serve``)."""
    from dicom_node.service import cap_malloc_arenas, run_receiver  # _LAZY_IMPORTS

    _die_with_parent()
    cap_malloc_arenas()
    configure_logging(config.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        run_receiver(config, port, stop, reuse_port=True)
    except ThreadEndedError:
        sys.exit(EXIT_FAILURE)  # logged already; serve starts another


def _die_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGTERM): if serve is killed outright, its
    # receiving processes stop too instead of holding the port.
    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)


def _status(config: NodeConfig, *, as_json: bool, limit: int) -> int:
    from dicom_node.service import open_index  # see _LAZY_IMPORTS
    from dicom_node.status import node_status, status_text

    configure_logging("WARNING")
    _require_index(config)
    if limit < 0:
        raise ConfigError("--errors: expected >= 0")
    index = open_index(config)
    try:
        status = node_status(index, limit=limit)
    finally:
        index.close()
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        print(status_text(status, limit))
    return EXIT_OK


def _echo(args: argparse.Namespace) -> int:
    from dicom_node.export import echo, parse_peer  # see _LAZY_IMPORTS

    peer = parse_peer(args.peer)
    try:
        status = echo(peer, calling_ae_title=args.aet, timeout=args.timeout)
    except AssociationError as exc:
        print(f"C-ECHO {peer} failed: {exc}", file=sys.stderr)
        _print_hint(exc, args.aet, peer)
        return EXIT_FAILURE
    if status == 0:
        print(f"C-ECHO {peer}: Success")
        return EXIT_OK
    print(f"C-ECHO {peer}: status 0x{status:04X}", file=sys.stderr)
    return EXIT_FAILURE


def _print_hint(error: AssociationError | None, aet: str, peer: Peer) -> None:
    """Say what to do about a rejected association, when the reason says it."""
    if not isinstance(error, AssociationRejectedError):
        return
    if error.source == _RJ_SERVICE_USER and error.reason == _RJ_CALLED_AE:
        hint = (
            f"the peer does not answer to the AE title {peer.ae_title!r}: put its "
            "own AE title before the @"
        )
    elif error.result == _RJ_TRANSIENT:
        hint = "the peer is busy or at a limit: try again later"
    elif error.source == _RJ_SERVICE_USER and error.reason in (
        _RJ_CALLING_AE,
        _RJ_NO_REASON,
    ):
        hint = (
            ("perhaps " if error.reason == _RJ_NO_REASON else "")
            + f"the peer does not accept the calling AE title {aet!r} from this "
            "host: add this AE title (and host) to [[callers]] in the node's "
            "configuration (for a PACS: to its known DICOM nodes), or pass --aet "
            "with an AE title it allows"
        )
    else:
        return  # the reason printed says it all
    print(f"hint: {hint}", file=sys.stderr)


def _send(args: argparse.Namespace) -> int:
    from dicom_node.export import parse_peer, send_files  # see _LAZY_IMPORTS

    peer = parse_peer(args.to)
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        raise ConfigError(f"no such file or folder: {', '.join(map(str, missing))}")

    def progress(outcome: SendOutcome) -> None:
        if not outcome.ok:
            print(f"FAILED {outcome.path}: {outcome.error}", file=sys.stderr)
        elif not args.quiet:
            print(f"sent   {outcome.path}")

    report = send_files(
        args.paths,
        peer,
        calling_ae_title=args.aet,
        timeout=args.timeout,
        progress=progress,
    )
    for path in report.skipped:
        if not args.quiet:
            print(f"skipped {path}: not a DICOM instance", file=sys.stderr)
    failed = len(report.failed)
    print(
        f"{report.sent} sent, {failed} failed, {len(report.skipped)} skipped "
        f"(to {peer})"
    )
    rejected = next((o.rejection for o in report.failed if o.rejection), None)
    _print_hint(rejected, args.aet, peer)
    return EXIT_FAILURE if failed or not report.outcomes else EXIT_OK


def _config_command(args: argparse.Namespace) -> int:
    if args.example:
        sys.stdout.write(example_config_text())
        return EXIT_OK
    config = _config(args)
    from dicom_node.worker import scoring_threads  # loads PyTorch: see _LAZY_IMPORTS

    print(f"# {config.source}: valid")
    print(f"ae_title         {config.ae_title}")
    print(f"listen           {config.host}:{config.port}")
    print(f"state_dir        {config.state_dir}")
    print(f"database         {config.effective_database_url}")
    print(f"stable_after     {config.stable_after} s")
    print(f"scp_processes    {config.scp_processes}")
    print(
        f"limits           {config.max_associations} associations, "
        f"{config.max_connections_per_host} connections per address, "
        f"PDU {config.max_pdu} bytes, instance {config.max_instance_bytes} bytes "
        f"(inflated {config.max_inflated_bytes}, "
        f"{config.max_data_elements} elements, "
        f"{config.max_in_memory_bytes} bytes of values in memory), association within "
        f"{config.acse_timeout:g} s, idle {config.idle_timeout:g} s"
    )
    periods = config.retention

    def kept(days: float) -> str:
        return f"{days:g} days" if days else "forever"

    print(
        f"retention        studies {kept(periods.studies_days)} after they settle, "
        f"results {kept(periods.results_days)} after delivery, audit rows "
        f"{kept(periods.audit_days)}"
    )
    http = config.http
    print(
        "http             "
        + (
            f"{http.host}:{http.port}: /metrics, /healthz, /readyz, status page"
            + (", patient names shown" if http.show_patient else "")
            + (", bearer token required" if http.token_file else "")
            if http.port
            else "off"
        )
    )
    if config.tls is not None:
        print(
            f"tls              {config.tls.certificate}"
            + (
                ", client certificates required"
                if config.tls.require_client_certificate
                else ""
            )
        )
    print(
        f"workers          {config.workers} on {config.device or 'auto'}, "
        f"up to {config.batch_studies} studies at once, "
        f"Grad-CAM top {config.gradcam_top_k}, torch "
        + (
            f"{config.torch_threads} CPU thread(s) each"
            if config.torch_threads
            else f"{scoring_threads(0, config.workers)} CPU thread(s) each "
            "(automatic: the cores less one, shared by the workers)"
        )
        + f", scoring at nice +{config.scoring_nice}"
    )
    print(
        "results          SR, Grad-CAM Secondary Captures of "
        + ("every finding " if config.results_explain_absent else "present findings ")
        + ("(JPEG baseline)" if config.results_jpeg else "(RGB)")
        + (
            ", Parametric Maps (images with patient geometry)"
            if config.results_parametric_map
            else ""
        )
        + f"; built in {config.results_processes} process(es) beside each scorer"
    )
    print(
        f"retries          jobs {config.job_attempts}, deliveries "
        f"{config.delivery_attempts}, backoff {config.retry_after:g}..."
        f"{config.retry_max:g} s, lease {config.lease_seconds:g} s"
    )
    if config.allow_any_caller:
        print("callers          any (allow_any_caller = true)")
    else:
        for c in config.callers:
            print(
                f"caller           {c.ae_title}"
                + (f" from {c.host}" if c.host else " from any address")
                + (f", results back on port {c.results_port}" if c.results_port else "")
            )
    for d in config.destinations:
        print(
            f"destination      {d.name}: {d.ae_title}@{d.host}:{d.port}"
            + (" over TLS" if d.tls else "")
        )
    for m in config.models:
        print(
            f"model            {m.path}" + ("" if m.path.is_file() else " (not found)")
        )
        if m.match is not None:
            rules = {
                "modalities": m.match.modalities,
                "body parts": m.match.body_parts,
                "SOP classes": m.match.sop_classes,
                "callers": m.match.calling_ae_titles,
            }
            print(
                "  match          "
                + "; ".join(f"{k} {', '.join(v)}" for k, v in rules.items() if v)
            )
    return EXIT_OK
