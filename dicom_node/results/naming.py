"""What names a result and its maker, and reads it, without building (no highdicom).

The node's processes that only hand results on (``serve`` with results
processes, the outbox, the status page) import this, not the builders:
highdicom and its standard tables (~20 MB imported, ~65 MB once read) stay in
the processes that build.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from inference import StudyPrediction

__all__ = [
    "NOT_FOR_DIAGNOSIS",
    "NodeIdentity",
    "model_text",
    "result_uid",
    "series_number",
    "yes_or_no",
]

NOT_FOR_DIAGNOSIS = "AI: not for diagnostic use"
_UID_NAMESPACE = uuid.UUID("5b0c5f4e-5d0e-4d55-9a0c-64c6f1c0de01")  # dicom-node results


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """The node that writes the results (General Equipment of each object).

    Parameters
    ----------
    station
        The node's AE title (Station Name; the SR's observer device name).
    device_uid
        The node's Device UID.
    """

    station: str
    device_uid: str


def result_uid(study_uid: str, device_uid: str, run: int | str, role: str) -> str:
    """Return a UID derived from the study, the model, the run and a role.

    Parameters
    ----------
    study_uid
        The source study.
    device_uid
        The model's Device UID.
    run
        The run: its number in the node; a key of its own for offline scoring,
        so that offline results never take the node's UIDs.
    role
        What the UID names (``sr``, ``sr-series``, ``sc-1``, ...).

    Returns
    -------
    str
        A ``2.25.`` UID, the same for the same inputs.
    """
    # A name-based (version 5) UUID as a 2.25 UID (PS3.5 B.2): stable, unique.
    name = "\n".join((study_uid, device_uid, str(run), role))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def series_number(model_name: str, role: int) -> int:
    """Return the Series Number of a model's SR (1), captures (2) or maps (3).

    9 followed by three digits of the model's name and the role, e.g. 94571:
    each model's results sit in series of their own numbers, the same for
    every study and version of that model.
    """
    key = uuid.uuid5(_UID_NAMESPACE, f"series\n{model_name}").int % 1000
    return 90000 + 10 * key + role


def model_text(prediction: StudyPrediction) -> str:
    """Return "<model name> <version>" as the objects name the model (64 characters)."""
    return f"{prediction.model_name} {prediction.model_version}"[:64]


def yes_or_no(ds: Dataset, keyword: str) -> str | None:
    """Return what a YES / NO attribute of a data set says; None: it does not say.

    Parameters
    ----------
    ds
        The data set.
    keyword
        The attribute (e.g. ``BurnedInAnnotation``).

    Returns
    -------
    str or None
        ``YES`` when it is YES (any case, padded), or one of its values is
        when a source holds several against its VM; ``NO`` when it says NO
        and nothing else; None when absent, empty or neither (unknown).
    """
    value = ds.get(keyword)
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    said = {str(v or "").strip().upper() for v in values}
    if "YES" in said:
        return "YES"
    return "NO" if said == {"NO"} else None
