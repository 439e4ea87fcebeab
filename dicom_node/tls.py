"""DICOM TLS contexts (PS3.15 B.1, non-downgrading BCP 195 profile)."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from dicom_node.config import DestinationConfig, NodeConfig, TlsConfig
from dicom_node.errors import ConfigError

__all__ = ["TLS12_CIPHERS", "check_private_key", "client_context", "server_context"]

# BCP 195 (RFC 9325): TLS 1.2 or later; for TLS 1.2 only AEAD suites with
# forward secrecy. TLS 1.3's suites all qualify and are set apart by OpenSSL.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL"


def check_private_key(path: Path) -> None:
    """Refuse a private key file that others than its owner and group may read.

    Parameters
    ----------
    path
        The PEM file.

    Raises
    ------
    ConfigError
        If it is missing, or readable or writable by others.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(
            f"[tls] private_key {path}: cannot read it ({exc.strerror})"
        ) from exc
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            f"[tls] private_key {path}: readable by others (mode "
            f"{stat.S_IMODE(mode):04o}); run chmod 600 {path}"
        )


def _base(purpose: ssl.Purpose) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    return context


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """Return the context the node's port speaks TLS with.

    Parameters
    ----------
    tls
        The node's TLS identity.

    Returns
    -------
    ssl.SSLContext
        Server side; with ``require_client_certificate``, clients must present
        a certificate signed by ``ca_certificates``.

    Raises
    ------
    ConfigError
        If the key is readable by others, or a file cannot be loaded.
    """
    check_private_key(tls.private_key)
    context = _base(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
        if tls.ca_certificates is not None:
            context.load_verify_locations(cafile=tls.ca_certificates)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"[tls]: cannot load the certificate, key or CA file ({exc})"
        ) from exc
    context.verify_mode = (
        ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    )
    return context


def client_context(
    config: NodeConfig, destination: DestinationConfig | None = None
) -> ssl.SSLContext:
    """Return the context the node reaches a TLS destination with.

    The destination's certificate must be valid for its host name or address
    and signed by the destination's ``ca_certificates`` (else the ``[tls]``
    table's, else the system's). With a ``[tls]`` table, the node presents its
    own certificate (for destinations that require one).

    Parameters
    ----------
    config
        The node configuration.
    destination
        The destination, for its own CA file.

    Returns
    -------
    ssl.SSLContext
        Client side, verifying the server.

    Raises
    ------
    ConfigError
        If a file cannot be loaded.
    """
    cafile = destination.ca_certificates if destination is not None else None
    if cafile is None and config.tls is not None:
        cafile = config.tls.ca_certificates
    try:
        # With a CA file, only its CAs are trusted; without, the system's.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(TLS12_CIPHERS)
        if config.tls is not None:
            check_private_key(config.tls.private_key)
            context.load_cert_chain(config.tls.certificate, config.tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS for a destination: cannot load a file ({exc})") from exc
    return context
