"""Progress bars for medtrain's long steps, on stderr when it is a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Never

from tqdm import tqdm

__all__ = ["Progress", "bar"]

# Advances a bar by a number of items.
Progress = Callable[[int], object]


def bar(total: int, what: str, unit: str = "image", show: bool = True) -> tqdm[Never]:
    """Return a progress bar on stderr, disabled when stderr is not a terminal.

    Output that is not a terminal (a log file, a pipe, CI) gets no bar, only
    the lines medtrain prints anyway. Functions that loop over files take a
    ``progress`` callable (a bar's ``update``); ``fit`` and ``pretrain`` draw
    their own epoch bars.

    Parameters
    ----------
    total
        Items in all.
    what
        The step, shown before the bar (e.g. ``preprocessing``).
    unit
        What an item is, for the rate (``image/s``).
    show
        False: no bar even on a terminal (e.g. the other ranks under torchrun).

    Returns
    -------
    tqdm.tqdm
        Use as a context manager; ``update(n)`` advances it. The bar is erased
        when it closes, so the lines printed after it stay readable.
    """
    return tqdm(
        total=total,
        desc=what,
        unit=unit,
        file=sys.stderr,
        disable=not (show and sys.stderr.isatty()),
        leave=False,
        dynamic_ncols=True,
    )
