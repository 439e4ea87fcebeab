"""Who the node is, in every object it writes and every association it makes.

PS3.10 7.1: the File Meta names the implementation that wrote the file; PS3.7
D.3.3.2: an association names the implementation at each end. Both name this
project, never a library that helped (highdicom, pydicom, pynetdicom).
"""

from __future__ import annotations

import socket
import uuid

from dicom_node import __version__

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "MANUFACTURER",
    "MODEL_NAME",
    "SOFTWARE_VERSION",
    "node_device_uid",
]

MANUFACTURER = "dicom-node"
MODEL_NAME = "dicom-node"
SOFTWARE_VERSION = f"dicom-node {__version__}"
# A UUID-derived UID (PS3.5 B.2), made once for this project; it names the
# implementation, the version name names the release.
IMPLEMENTATION_CLASS_UID = "2.25.193152101700859011172418815631876648274"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]  # SH: 16 characters

_DEVICE_NAMESPACE = uuid.UUID("0d7c1f0e-7b1e-4b8e-9a56-3f5d2c1b7e42")


def node_device_uid(ae_title: str, configured: str = "") -> str:
    """Return the node's Device UID (General Equipment of every result).

    Parameters
    ----------
    ae_title
        The node's AE title.
    configured
        The ``[node] device_uid`` setting; used as it is when set.

    Returns
    -------
    str
        The configured UID, else one derived from this host's name and the AE
        title: the same across restarts, another for another node.
    """
    if configured:
        return configured
    name = f"{socket.gethostname()}\n{ae_title}"
    return f"2.25.{uuid.uuid5(_DEVICE_NAMESPACE, name).int}"
