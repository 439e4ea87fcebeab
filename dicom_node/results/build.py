"""Building a result set: the SR, the captures and the maps of one scored study.

Only the processes that build results import this (and with it highdicom):
the results processes, ``score``, and ``serve`` or ``worker`` when
``results_processes = 0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from dicom_node.identity import MANUFACTURER
from dicom_node.results import ResultSet
from dicom_node.results.capture import agree_on_series, build_capture
from dicom_node.results.naming import NodeIdentity, result_uid
from dicom_node.results.pmap import build_map, has_patient_geometry
from dicom_node.results.sr import build_report
from inference import StudyPrediction

__all__ = ["build_results", "warm_up"]


def build_results(
    sources: Sequence[Dataset],
    prediction: StudyPrediction,
    run: int,
    *,
    node: NodeIdentity,
    run_key: str = "",
    previous_sr: Dataset | None = None,
    jpeg: bool = False,
    parametric_map: bool = False,
    explain_absent: bool = False,
) -> ResultSet:
    """Build the SR, the Secondary Captures and the maps of one scored study.

    Parameters
    ----------
    sources
        The images that were scored (pixel data loaded), one study.
    prediction
        What :meth:`inference.Classifier.predict` returned for them.
    run
        The run number; 1 for the first result set of this study and model.
    node
        The node writing the results (its AE title and Device UID).
    run_key
        Derive the UIDs from this instead of the run number (offline scoring
        gives each invocation its own, so that its objects never take the
        UIDs of the node's runs).
    previous_sr
        The SR of the result set this one replaces, referenced as its
        predecessor.
    jpeg
        Store the captures as JPEG baseline (YBR_FULL_422) instead of
        uncompressed RGB.
    parametric_map
        Also write the raw Grad-CAM of each explained image as a Parametric
        Map, for images with patient geometry (CT, MR, ...: a Parametric Map
        needs a patient frame of reference, which projection radiographs lack;
        theirs is skipped).
    explain_absent
        Also picture the Grad-CAM of findings the model called absent (in a
        cold hue, captioned ABSENT); by default only present findings get
        pictures.

    Returns
    -------
    ResultSet
        The objects, ready to store and send.

    Raises
    ------
    ValueError
        If there are no sources or they come from several studies.
    """
    if not sources:
        raise ValueError("no source images")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"sources from {len(studies)} studies; expected one")
    study_uid = studies.pop()
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    key = run_key or run

    def uid(role: str) -> str:
        return result_uid(study_uid, prediction.device_uid, key, role)

    explained = [
        e
        for e in prediction.explanations
        if e.source.sop_instance_uid in by_uid
        and (prediction.labels[e.label_index].positive or explain_absent)
    ]
    captures: list[tuple[int, Dataset]] = []
    maps: list[tuple[int, Dataset]] = []
    # A map series per frame of reference of the sources, in order of first use
    # (a study's one frame of reference: the series a run has always had).
    map_roles: dict[str, str] = {}
    for number, e in enumerate(explained, start=1):
        source = by_uid[e.source.sop_instance_uid]
        captures.append(
            (
                e.label_index,
                build_capture(source, e, prediction, number, uid, jpeg=jpeg, node=node),
            )
        )
        if parametric_map and has_patient_geometry(source):
            frame = str(source.FrameOfReferenceUID)
            if frame not in map_roles:
                later = f"-{len(map_roles) + 1}" if map_roles else ""
                map_roles[frame] = f"pm-series{later}"
            pm = build_map(
                source,
                e,
                prediction,
                number,
                uid,
                node=node,
                series_role=map_roles[frame],
            )
            maps.append((e.label_index, pm))
    agree_on_series([sc for _, sc in captures])
    for role in map_roles.values():
        series = uid(role)
        agree_on_series([pm for _, pm in maps if pm.SeriesInstanceUID == series])
    scored = [
        by_uid[u]
        for u in dict.fromkeys(f.sop_instance_uid for f in prediction.frames)
        if u in by_uid
    ]
    sr = build_report(
        scored or list(sources),
        [*captures, *maps],
        [pm for _, pm in maps],
        prediction,
        uid,
        node=node,
        previous_sr=previous_sr,
    )
    return ResultSet(
        sr, tuple(sc for _, sc in captures), run, tuple(pm for _, pm in maps)
    )


def warm_up() -> None:
    """Load the IOD tables highdicom reads on first use (~0.6 s of JSON).

    Otherwise the first study after the node starts waits for them: a small
    Secondary Capture of a made-up image is built and thrown away.
    """
    import highdicom as hd

    source = Dataset()
    source.SOPClassUID = CTImageStorage
    source.SOPInstanceUID = source.StudyInstanceUID = generate_uid()
    source.Manufacturer = "warm-up"
    hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.zeros((2, 2), np.uint8),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
    )
