"""The `medtrain` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``medtrain``.

    Returns
    -------
    argparse.ArgumentParser
        The parser.
    """
    return argparse.ArgumentParser(
        prog="medtrain",
        description="Train, evaluate and explain the models dicom-node runs. "
        "The training commands (synth, fit, evaluate, explain) are not built yet.",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medtrain``.

    Parameters
    ----------
    argv
        The arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        2: no training command exists yet.
    """
    build_parser().parse_args(argv)
    print(
        "medtrain: no training commands yet (synth, fit, evaluate, explain are "
        "planned)",
        file=sys.stderr,
    )
    return 2
