"""The inference package's exception hierarchy."""

__all__ = [
    "ArtifactError",
    "ImageTooLargeError",
    "InferenceError",
    "PreprocessError",
    "SourceChangedError",
]


class InferenceError(Exception):
    """Base class of the errors the inference runtime raises on purpose."""


class ArtifactError(InferenceError):
    """A model file is missing, malformed, changed or from a newer format."""


class PreprocessError(InferenceError, ValueError):
    """A data set cannot be turned into model input (no pixels, odd layout)."""


class ImageTooLargeError(PreprocessError):
    """An image exceeds the configured size limit; refused before decoding."""


class SourceChangedError(InferenceError, OSError):
    """A data set's file was replaced between reading the data set and its pixels.

    An OSError, as a file gone between the two reads: reading again may succeed.
    """
