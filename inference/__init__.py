"""The ML runtime shared by the node and medtrain: pixels in, probabilities out.

Names are imported when first used (PEP 562): a process that only reads
predictions and pixels (:mod:`inference.findings`, :mod:`inference.pixels`)
never loads PyTorch. The functions named like their modules are imported from
those modules (``from inference.preprocess import preprocess``,
``from inference.gradcam import gradcam``): a lazily imported module binds its
name on the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inference.artifact import (
        FORMAT_VERSION,
        CodedConcept,
        Label,
        ModelArtifact,
        file_sha256,
        weights_sha256,
    )
    from inference.classifier import (
        Classifier,
        Explanation,
        LabelPrediction,
        StudyPrediction,
        StudyScores,
    )
    from inference.compiled import load_compiled
    from inference.errors import (
        ArtifactError,
        ImageTooLargeError,
        InferenceError,
        PreprocessError,
        SourceChangedError,
    )
    from inference.findings import text_problem
    from inference.gradcam import (
        GRADCAM_LAYERS,
        gradcam_at,
        gradcam_from_features,
        gradcam_full_backward,
    )
    from inference.model import (
        ARCHITECTURES,
        build_model,
        load_init_weights,
        set_cpu_threads,
    )
    from inference.pixels import file_as_read, file_identity_of
    from inference.preprocess import (
        Frames,
        FrameSource,
        PreprocessSpec,
        check_size,
        decode_frames,
        heatmap_to_source,
        preprocess_many,
        render,
    )

_HOMES = {
    "ARCHITECTURES": "inference.model",
    "ArtifactError": "inference.errors",
    "Classifier": "inference.classifier",
    "CodedConcept": "inference.findings",
    "Explanation": "inference.findings",
    "FORMAT_VERSION": "inference.artifact",
    "FrameSource": "inference.pixels",
    "Frames": "inference.preprocess",
    "GRADCAM_LAYERS": "inference.gradcam",
    "ImageTooLargeError": "inference.errors",
    "InferenceError": "inference.errors",
    "Label": "inference.findings",
    "LabelPrediction": "inference.findings",
    "ModelArtifact": "inference.artifact",
    "PreprocessError": "inference.errors",
    "SourceChangedError": "inference.errors",
    "PreprocessSpec": "inference.pixels",
    "StudyPrediction": "inference.findings",
    "text_problem": "inference.findings",
    "StudyScores": "inference.classifier",
    "build_model": "inference.model",
    "load_compiled": "inference.compiled",
    "check_size": "inference.pixels",
    "decode_frames": "inference.pixels",
    "file_as_read": "inference.pixels",
    "file_identity_of": "inference.pixels",
    "file_sha256": "inference.artifact",
    "gradcam_at": "inference.gradcam",
    "gradcam_from_features": "inference.gradcam",
    "gradcam_full_backward": "inference.gradcam",
    "heatmap_to_source": "inference.preprocess",
    "load_init_weights": "inference.model",
    "preprocess_many": "inference.preprocess",
    "render": "inference.pixels",
    "set_cpu_threads": "inference.model",
    "weights_sha256": "inference.artifact",
}


def __dir__() -> list[str]:
    """List the public names, imported or not yet."""
    return sorted({*globals(), *_HOMES})


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "ARCHITECTURES",
    "FORMAT_VERSION",
    "GRADCAM_LAYERS",
    "ArtifactError",
    "Classifier",
    "CodedConcept",
    "Explanation",
    "FrameSource",
    "Frames",
    "ImageTooLargeError",
    "InferenceError",
    "Label",
    "LabelPrediction",
    "ModelArtifact",
    "PreprocessError",
    "PreprocessSpec",
    "SourceChangedError",
    "StudyPrediction",
    "StudyScores",
    "build_model",
    "check_size",
    "decode_frames",
    "file_as_read",
    "file_identity_of",
    "file_sha256",
    "gradcam_at",
    "gradcam_from_features",
    "gradcam_full_backward",
    "heatmap_to_source",
    "load_compiled",
    "load_init_weights",
    "preprocess_many",
    "render",
    "set_cpu_threads",
    "text_problem",
    "weights_sha256",
]
