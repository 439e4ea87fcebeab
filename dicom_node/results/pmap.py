"""The Parametric Map: the raw Grad-CAM for software, built by highdicom (hd.pm)."""

from __future__ import annotations

from collections.abc import Callable

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.identity import MANUFACTURER, MODEL_NAME, SOFTWARE_VERSION
from dicom_node.results.capture import copy_body_part, lossy_history
from dicom_node.results.common import algorithm_equipment, finish, highdicom_view
from dicom_node.results.naming import NodeIdentity, series_number
from inference import Explanation, StudyPrediction

__all__ = ["build_map", "has_patient_geometry"]

_SCALE = 65535
_NO_UNITS = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)


def has_patient_geometry(source: Dataset) -> bool:
    """Return whether a single-frame image lies in a patient frame of reference.

    Parameters
    ----------
    source
        A source image.

    Returns
    -------
    bool
        True when it has a Frame of Reference, Image Position / Orientation
        (Patient) and Pixel Spacing, and one frame: what a Parametric Map of it
        needs.
    """
    return int(source.get("NumberOfFrames", 1) or 1) == 1 and all(
        source.get(keyword)
        for keyword in (
            "FrameOfReferenceUID",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
        )
    )


def build_map(
    source: Dataset,
    explanation: Explanation,
    prediction: StudyPrediction,
    number: int,
    uid: Callable[[str], str],
    *,
    node: NodeIdentity,
    series_role: str = "pm-series",
) -> Dataset:
    """Return the Parametric Map of one explained image's raw Grad-CAM.

    The heatmap in [0, 1] is stored as 16-bit integers on the source's grid;
    the Real World Value Mapping gives the values back. Its series is
    ``uid(series_role)``: one per frame of reference of the sources (a
    series has one, PS3.3 C.7.4.1).
    """
    label = prediction.labels[explanation.label_index].label
    stored = np.round(np.clip(explanation.heatmap, 0.0, 1.0) * _SCALE)
    pm = hd.pm.ParametricMap(
        source_images=[highdicom_view(source)],
        pixel_array=stored.astype(np.uint16),
        series_instance_uid=uid(series_role),
        series_number=series_number(prediction.model_name, 3),
        sop_instance_uid=uid(f"pm-{number}"),
        instance_number=number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=SOFTWARE_VERSION,
        device_serial_number=node.device_uid[:64],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[
            hd.pm.RealWorldValueMapping(
                lut_label="GRADCAM",
                lut_explanation=(
                    f"Grad-CAM of {label.concept.meaning}: 0 none, 1 strongest"
                )[:64],
                unit=_NO_UNITS,
                value_range=(0, _SCALE),
                slope=1 / _SCALE,
                intercept=0,
            )
        ],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=_SCALE / 2, window_width=_SCALE + 1)
        ],
        content_label="GRADCAM",
        content_description=f"Grad-CAM of {label.concept.meaning}"[:64],
        series_description=f"AI Grad-CAM map: {prediction.model_name}"[:64],
        # One 2-D frame of one source image, not part of a volume.
        image_flavor=hd.pm.ImageFlavorValues.STATIC,
        contributing_equipment=[algorithm_equipment(prediction)],
    )
    # highdicom draws the Dimension Organization UID afresh (under its own
    # root) for each map; derived like every other UID, the same run written
    # again is the same map.
    dimensions = uid(f"pm-{number}-dimensions")
    for item in (*pm.DimensionOrganizationSequence, *pm.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimensions
    copy_body_part(pm, source)
    lossy_history(pm, source, None)
    return finish(pm, source, node)
