"""Result files on disk: one folder per result set, written by pydicom.

This module owns the layout. The node keeps its result sets under
``state_dir/results/<Study Instance UID>/<model Device UID>-run<N>/``; a folder
holds ``sc-N.dcm`` (Secondary Captures), ``pm-N.dcm`` (Parametric Maps) and
``sr.dcm``, and, from ``dicom-node score``, ``sc-N.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from PIL import Image
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.results import ResultSet
from dicom_node.results.naming import yes_or_no

__all__ = [
    "capture_files",
    "capture_png",
    "delivery_files",
    "discard_folder",
    "identifying_capture",
    "publish_folder",
    "remove_result_files",
    "report_file",
    "result_folder",
    "results_root",
    "staging_folder",
    "write_result_files",
]

_SR = "sr.dcm"
# What a capture says when its pixels identify the patient.
_IDENTIFYING = ("BurnedInAnnotation", "RecognizableVisualFeatures")


def results_root(state_dir: Path) -> Path:
    """Return the folder the node keeps its result sets under."""
    return state_dir / "results"


def result_folder(study_uid: str, device_uid: str, run: int) -> str:
    """Return a result set's folder, relative to :func:`results_root`.

    Parameters
    ----------
    study_uid
        The study's Study Instance UID.
    device_uid
        The model's Device UID.
    run
        The run of this model on this study (1, 2, ...).
    """
    return f"{study_uid}/{device_uid}-run{run}"


def staging_folder(folder: str, job_id: int) -> str:
    """Return where a job writes a result set before it is published.

    Parameters
    ----------
    folder
        The result set's folder (:func:`result_folder`).
    job_id
        The job writing it: each job has its own (whatever its run), so a job
        whose lease ran out never writes into the folder of the job that took
        over, and a try of the job replaces what an earlier try left.
    """
    study = folder.rsplit("/", 1)[0]
    return f"{study}/.job{job_id}"


def discard_folder(root: Path, folder: str) -> None:
    """Remove a folder under ``root`` and everything in it, if it exists."""
    shutil.rmtree(root / folder, ignore_errors=True)


def publish_folder(root: Path, staging: str, folder: str) -> None:
    """Move a written result set into its folder.

    Call only when the index holds no result set of that folder: a folder
    there is then a leftover of a try that stopped before it was recorded,
    and is replaced.

    Parameters
    ----------
    root
        The results root.
    staging
        Where it was written (:func:`staging_folder`).
    folder
        Its folder.
    """
    target = root / folder
    if target.exists():
        shutil.rmtree(target)
    os.rename(root / staging, target)
    for parent in (target.parent, target.parent.parent):  # the study's may be new
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def delivery_files(folder: Path) -> list[Path]:
    """Return a written result set's files in the order they are sent.

    The images first, the SR that references them last, so a PACS that
    receives the SR already holds what it points to.

    Parameters
    ----------
    folder
        The result set's folder.

    Returns
    -------
    list of Path
        Captures, maps, then the SR (which may be missing: check).
    """
    return [
        *capture_files(folder),
        *sorted(folder.glob("pm-*.dcm")),
        report_file(folder),
    ]


def capture_files(folder: Path) -> list[Path]:
    """Return a written result set's Secondary Captures, in order."""
    return sorted(folder.glob("sc-*.dcm"))


def identifying_capture(path: Path) -> bool:
    """Return whether a written capture may show who the patient is.

    Unless it says NO to both Burned In Annotation and Recognizable Visual
    Features: the node's own caption names no one, but a capture shows its
    source's pixels and says of them what the source did, nothing where the
    source said nothing (:mod:`dicom_node.results.capture`); an ultrasound
    frame that does not say may well carry the patient's name.

    Parameters
    ----------
    path
        The capture's file.

    Returns
    -------
    bool
        True unless it says NO to both; also when it cannot be read (gone,
        damaged): what cannot be checked is not shown.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(_IDENTIFYING))
    except (OSError, InvalidDicomError):
        return True
    return any(yes_or_no(ds, keyword) != "NO" for keyword in _IDENTIFYING)


def report_file(folder: Path) -> Path:
    """Return a result set's SR file (which may be missing: check)."""
    return folder / _SR


def write_result_files(
    folder: Path, result: ResultSet, *, png: bool = True
) -> list[Path]:
    """Write a result set as ``sc-N.dcm`` (and ``sc-N.png``), ``pm-N.dcm``, ``sr.dcm``.

    Parameters
    ----------
    folder
        Created if needed; files are replaced atomically, captures and maps of
        an earlier set beyond this one's removed, and the folder synced.
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
    written = {folder / _SR}
    for i, sc in enumerate(result.captures):
        written.add(folder / f"sc-{i + 1}.dcm")
        _save(sc, folder / f"sc-{i + 1}.dcm")
        if png:
            pngs.append(capture_png(sc, folder / f"sc-{i + 1}.png"))
    written.update(pngs)
    for i, pm in enumerate(result.maps):
        written.add(folder / f"pm-{i + 1}.dcm")
        _save(pm, folder / f"pm-{i + 1}.dcm")
    _save(result.sr, folder / _SR)
    # A folder written before (`dicom-node score` into the same --out) may hold
    # more captures or maps than this set: what the new report does not
    # reference would be sent with it.
    remove_result_files(folder, keep=written)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return pngs


def remove_result_files(
    folder: Path, keep: set[Path] | frozenset[Path] = frozenset()
) -> None:
    """Remove a folder's result files (report, captures, their PNGs, maps) but ``keep``.

    Parameters
    ----------
    folder
        A result set's folder (missing: nothing to do).
    keep
        Files to leave.
    """
    for pattern in (_SR, "sc-*.dcm", "sc-*.png", "pm-*.dcm"):
        for path in set(folder.glob(pattern)) - keep:
            path.unlink(missing_ok=True)


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
