"""The ML runtime shared by the node and medtrain: pixels in, probabilities out."""

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
from inference.errors import (
    ArtifactError,
    ImageTooLargeError,
    InferenceError,
    PreprocessError,
)
from inference.gradcam import (
    GRADCAM_LAYERS,
    gradcam,
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
from inference.preprocess import (
    Frames,
    FrameSource,
    PreprocessSpec,
    check_size,
    decode_frames,
    heatmap_to_source,
    preprocess,
    preprocess_many,
    render,
)

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
    "StudyPrediction",
    "StudyScores",
    "build_model",
    "check_size",
    "decode_frames",
    "file_sha256",
    "gradcam",
    "gradcam_at",
    "gradcam_from_features",
    "gradcam_full_backward",
    "heatmap_to_source",
    "load_init_weights",
    "preprocess",
    "preprocess_many",
    "render",
    "set_cpu_threads",
    "weights_sha256",
]
