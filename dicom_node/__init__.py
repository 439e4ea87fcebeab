"""dicom-node: receives DICOM studies, scores them and returns DICOM results."""

from dicom_node.errors import ConfigError, DicomNodeError, InvalidUidError, StorageError

__all__ = [
    "ConfigError",
    "DicomNodeError",
    "InvalidUidError",
    "StorageError",
    "__version__",
]

__version__ = "0.1.0"
