"""The `medtrain` command: argv -> the training subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], found {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``medtrain``.

    Returns
    -------
    argparse.ArgumentParser
        The parser with its subcommands.
    """
    parser = argparse.ArgumentParser(
        prog="medtrain",
        description="Make, train, evaluate and explain the models dicom-node runs. "
        "Available now: synth. Being built: fit, evaluate, explain.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    synth = sub.add_parser(
        "synth",
        help="write a labelled synthetic data set as DICOM",
        description="Write N chest-radiograph-like DX images (or CT slices) as valid "
        "DICOM under OUT/dicom/<patient>/<study>/, the lesion mask of each positive "
        "image under OUT/masks/, and OUT/labels.csv (path, label, patient_id, "
        "study_uid, mask). Positive images carry a subtle nodule in a lung field. "
        "The same seed gives the same data.",
    )
    synth.add_argument("out", type=Path, metavar="OUT", help="output folder")
    synth.add_argument("--n", type=_positive, required=True, help="number of images")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument(
        "--modality", choices=("DX", "CT"), default="DX", help="DX (default) or CT"
    )
    synth.add_argument(
        "--size", type=int, default=256, help="image side in pixels (default 256)"
    )
    synth.add_argument(
        "--prevalence",
        type=_fraction,
        default=0.5,
        help="fraction of positive images (default 0.5)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medtrain``.

    Parameters
    ----------
    argv
        The arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        0 on success, 1 on a failure, 2 on a usage error.
    """
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from training.synthetic import synthesize

        if args.size < 32:
            print("medtrain: --size must be at least 32", file=sys.stderr)
            return EXIT_USAGE
        if args.out.exists() and any(args.out.iterdir()):
            print(
                f"medtrain: {args.out} is not empty; give a new folder",
                file=sys.stderr,
            )
            return EXIT_USAGE
        labels = synthesize(
            args.out, args.n, args.seed, args.modality, args.size, args.prevalence
        )
        print(f"wrote {args.n} {args.modality} images and {labels}")
        return EXIT_OK
    raise AssertionError(f"unhandled command {args.command}")  # argparse requires one
