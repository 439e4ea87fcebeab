"""Result files on disk: one folder per result set, written by pydicom."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from dicom_node.results import ResultSet

__all__ = ["capture_png", "write_result_files"]


def write_result_files(
    folder: Path, result: ResultSet, *, png: bool = True
) -> list[Path]:
    """Write a result set as ``sc-N.dcm`` (and ``sc-N.png``), ``pm-N.dcm``, ``sr.dcm``.

    Parameters
    ----------
    folder
        Created if needed; files are replaced atomically and the folder synced.
    result
        The result set.
    png
        Also write each Secondary Capture as PNG.

    Returns
    -------
    list of Path
        The PNG files written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    pngs = []
    for i, sc in enumerate(result.captures):
        _save(sc, folder / f"sc-{i + 1}.dcm")
        if png:
            pngs.append(capture_png(sc, folder / f"sc-{i + 1}.png"))
    for i, pm in enumerate(result.maps):
        _save(pm, folder / f"pm-{i + 1}.dcm")
    _save(result.sr, folder / "sr.dcm")
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return pngs


def capture_png(sc: Dataset, target: Path) -> Path:
    """Save a Secondary Capture's image as PNG and return the path."""
    Image.fromarray(sc.pixel_array).save(target)  # JPEG baseline decodes to RGB
    return target


def _save(ds: Dataset, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("wb") as f:
        dcmwrite(f, ds, enforce_file_format=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(target)
