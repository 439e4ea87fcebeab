"""NodeConfig from one TOML file and DICOM_NODE_<SECTION>_<KEY> overrides."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dicom_node.errors import ConfigError

__all__ = [
    "CallerConfig",
    "DestinationConfig",
    "HttpConfig",
    "ModelConfig",
    "ModelMatch",
    "NodeConfig",
    "RetentionConfig",
    "TlsConfig",
    "example_config_text",
    "load_config",
    "read_token",
    "validate_ae_title",
]

ENV_PREFIX = "DICOM_NODE_"
# PS3.8 D.1: the smallest Maximum Length worth negotiating; above 16 MiB a single
# PDU held in memory costs more than it saves.
MIN_PDU = 4096
MAX_PDU = 16 * 1024**2


@dataclass(frozen=True, slots=True)
class CallerConfig:
    """A peer allowed to open associations with the node.

    Parameters
    ----------
    ae_title
        The calling AE title the peer uses.
    host
        The peer's IP address; ``None`` accepts the AE title from any address.
    results_port
        When set, results of the studies this caller sent also go back to it:
        to its AE title, at ``host`` (or the address its association came from),
        on this port.
    """

    ae_title: str
    host: str | None = None
    results_port: int | None = None


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    """A peer the node sends results to.

    Parameters
    ----------
    name
        A short name used in logs, the index and ``dicom-node status``.
    ae_title
        The destination's (called) AE title.
    host
        Host name or address.
    port
        TCP port.
    tls
        Send over DICOM TLS (PS3.15 B.1); the destination's certificate must
        name ``host`` and be signed by ``ca_certificates``.
    ca_certificates
        PEM file of the certificates trusted for this destination; when None,
        the ``[tls]`` table's, else the system's (for ``url``: those requests
        trusts by default, certifi's).
    url
        A DICOMweb service's base URL (e.g. ``https://pacs/dicom-web``): the
        results are sent with STOW-RS instead of C-STORE (``ae_title``,
        ``host`` and ``port`` are then empty).
    token_file
        For ``url``: a file holding a bearer token sent with each request.
    """

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    ca_certificates: Path | None = None
    url: str | None = None
    token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The HTTP listener: metrics, health, a status page.

    Parameters
    ----------
    host
        Address to listen on (the loopback by default: put a reverse proxy
        with TLS in front to serve further).
    port
        TCP port; 0 turns the listener off.
    show_patient
        Show patient names and IDs on the status page (off: studies are named
        by uid_ref only, and a capture whose source says its pixels identify
        the patient, Burned In Annotation or Recognizable Visual Features YES,
        is not shown).
    token_file
        A file holding a bearer token every request but ``/healthz`` must
        carry (``Authorization: Bearer ...``); None: no token.
    min_free_bytes
        ``/readyz`` fails when the storage disk has less free space.
    """

    host: str = "127.0.0.1"
    port: int = 0
    show_patient: bool = False
    token_file: Path | None = None
    min_free_bytes: int = 1024**3

    def __post_init__(self) -> None:
        """Check the port and threshold."""
        _check(
            0 <= self.port <= 65535,
            f"[http] port: expected 0 (off) or 1..65535, found {self.port}",
        )
        _check(
            self.min_free_bytes >= 0,
            f"[http] min_free_bytes: expected >= 0, found {self.min_free_bytes}",
        )


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long the node keeps what it holds; 0 keeps it forever.

    Parameters
    ----------
    studies_days
        Received instances are deleted this many days after their study
        settled: every job ended and every delivery of its results ended
        (delivered, or dead-lettered), and nothing arrived since. A study
        with a pending job or delivery is never touched.
    results_days
        Result files (SR, captures, maps) are deleted this many days after
        every delivery of them ended (or, without destinations, after they
        were written).
    audit_days
        Rows of associations (accepted and rejected) and of errors older than
        this are deleted; an association whose instances are still held is
        kept.
    """

    studies_days: float = 0.0
    results_days: float = 0.0
    audit_days: float = 0.0

    def __post_init__(self) -> None:
        """Check the periods."""
        for key in ("studies_days", "results_days", "audit_days"):
            value = getattr(self, key)
            _check(
                math.isfinite(value) and 0 <= value <= 36500,
                f"[retention] {key}: expected days in 0..36500 (0: keep "
                f"forever), found {value}",
            )


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The node's DICOM TLS identity (PS3.15 B.1, BCP 195 profile).

    With a ``[tls]`` table the node's port speaks TLS only, and destinations
    with ``tls = true`` are reached with this certificate as the client's.

    Parameters
    ----------
    certificate
        PEM file of the node's certificate (and its chain).
    private_key
        PEM file of its private key; refused when others may read it.
    ca_certificates
        PEM file of the certificates client certificates must be signed by.
    require_client_certificate
        Mutual TLS: refuse a client without a certificate signed by
        ``ca_certificates``.
    """

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False


@dataclass(frozen=True, slots=True)
class ModelMatch:
    """Which images a model is run on; an empty list does not restrict.

    Parameters
    ----------
    modalities
        Modality values, e.g. ("DX", "CR").
    body_parts
        Body Part Examined values, e.g. ("CHEST",), compared without case.
    sop_classes
        SOP Class UIDs.
    calling_ae_titles
        AE titles of the callers whose studies the model sees.
    """

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    calling_ae_titles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A model the node runs on every stable study.

    Parameters
    ----------
    path
        The model artifact (``.safetensors``); relative paths are resolved against
        the directory of the configuration file.
    sha256
        When set, a model file whose SHA-256 differs is refused.
    match
        Which images the model runs on; None: the modalities, body parts and
        SOP classes the model file itself accepts.
    """

    path: Path
    sha256: str | None = None
    match: ModelMatch | None = None

    @property
    def key(self) -> str:
        """Return the name jobs for this model are filed under: its absolute path.

        A job names the configured model it is for; the result sets it makes
        name the model itself (name, version, Device UID, SHA-256), and runs
        are counted per study and Device UID, so replacing the file or moving
        it to another path never reuses a run.
        """
        return os.path.abspath(self.path)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The node's whole configuration, checked when built.

    Parameters
    ----------
    ae_title
        The called AE title the node answers to.
    host
        The address the SCP listens on.
    port
        The TCP port the SCP listens on; 0 picks a free port.
    state_dir
        Folder holding ``storage/`` and, by default, the SQLite index.
    database_url
        SQLAlchemy URL of the index; empty means SQLite in ``state_dir``.
    stable_after
        Seconds without a new instance before a study counts as complete.
    allow_any_caller
        Accept associations from any calling AE title when true.
    scp_processes
        Number of receiving processes sharing the port (SO_REUSEPORT).
    max_associations
        Most associations one receiving process serves at once.
    max_pdu
        Largest P-DATA-TF PDU the node accepts, in bytes (4096..16 MiB); a
        larger one aborts the association before it is read.
    acse_timeout
        Seconds a new connection has to complete association (its whole
        A-ASSOCIATE-RQ); until then it holds no association slot.
    idle_timeout
        Seconds an association may stay silent, and the most a single PDU may
        take to arrive once its first byte has (a slow sender is cut off).
    max_connections_per_host
        Most connections one source address may hold open at once
        (associating or associated).
    max_instance_bytes
        Largest data set the node receives (to disk, as it arrives); one that
        grows past it gets its association aborted there, and nothing is kept
        (no status can be sent before a data set has arrived whole).
    max_data_elements
        Most data element headers the node reads when it checks a received
        data set, nested sequences included (a sequence item counts as four).
        An element costs up to ~300 bytes of memory once read, for 8 bytes on
        the wire; past the limit the data set is refused with 0xA700
        (Refused: Out of Resources) at once.
    max_inflated_bytes
        Largest size a Deflated data set may inflate to (it is inflated in
        memory to be read); a larger one is refused with 0xA700 (Refused: Out
        of Resources, PS3.4 B.2.3) and nothing is kept.
    max_in_memory_bytes
        Most bytes of a received data set's values the node reads into
        memory to check it, score it and build its results: every value in a
        sequence and every top-level value up to 1 MiB (longer top-level
        values, Pixel Data among them, stay on disk). Past it the data set is
        refused with 0xA700 (Refused: Out of Resources) as soon as it is
        passed, and nothing is kept.
    log_level
        Level of the node's own log lines (DEBUG, INFO, WARNING, ERROR).
    workers
        Worker threads scoring studies inside ``serve`` (0: none; then
        ``dicom-node worker`` processes do the work). Two by default: while one
        thread's model runs, the other reads, preprocesses and explains.
    device
        Where models run: cuda, cpu, or empty for CUDA when present.
    model_cache
        Folder of the models compiled for the CPU (inference.compiled), made
        from the model files by a short-lived process so that the scoring
        processes need not import torchvision; None: ``<state_dir>/models``.
    torch_threads
        CPU threads torch uses for each forward pass in a process that scores
        studies (``serve`` with workers, ``dicom-node worker``); 0: one less than
        the cores the process may use, shared among its worker threads (at
        least 1 each), leaving a core to receiving, writing results and
        sending, which otherwise compete with torch's threads.
    scoring_nice
        How many nice steps below the node's other threads the scoring threads
        run (Linux; 0..19, 0: the same priority): receiving, writing results
        and sending come first, the model takes the CPU time they leave.
    gradcam_top_k
        Images explained with Grad-CAM per study and label.
    batch_studies
        Most due studies a worker claims at once; small ones share forward
        passes.
    results_jpeg
        Store the Grad-CAM Secondary Captures as JPEG baseline.
    results_parametric_map
        Also write each explained image's raw Grad-CAM as a Parametric Map
        (images with patient geometry only: CT, MR, ...).
    results_explain_absent
        Also picture the Grad-CAM of findings the model called absent (in a
        cold hue, captioned ABSENT); by default only present findings get a
        Secondary Capture.
    results_processes
        Processes beside each scoring process that build and write result
        sets (highdicom's Python work, off the scoring process's GIL; each
        about 110-130 MB more in all, without PyTorch); 0: its results thread
        builds them (for a single-core host, or to save that memory).
    score_on_arrival
        ``serve`` with worker threads scores each image its receiver stores
        as it arrives, so that when the study is quiet only aggregation,
        Grad-CAM, the results and sending remain.
    device_uid
        The node's Device UID in every result object's General Equipment;
        empty: one derived from the host name and the AE title.
    job_attempts
        Tries of a failing job before it is marked failed.
    delivery_attempts
        Tries of a delivery before it is dead-lettered.
    retry_after
        Seconds before the first retry; doubled each time (with jitter).
    retry_max
        Longest wait between two tries, in seconds.
    lease_seconds
        How long a claimed job or delivery stays with its worker; a worker that
        died loses it after this time and another takes it.
    callers
        The allow-list of peers.
    destinations
        Where results go.
    models
        The models run on each stable study.
    tls
        The node's TLS identity; None: plain TCP.
    retention
        How long studies, results and audit rows are kept.
    http
        The HTTP listener (metrics, health, status page); off by default.
    source
        The file the configuration came from, for messages.
    """

    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    state_dir: Path = Path("dicom-node-data")
    database_url: str = ""
    stable_after: float = 10.0
    allow_any_caller: bool = False
    scp_processes: int = 1
    max_associations: int = 32
    max_pdu: int = 262144
    acse_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections_per_host: int = 8
    max_instance_bytes: int = 4 * 1024**3
    max_inflated_bytes: int = 64 * 1024**2
    max_data_elements: int = 1_000_000
    max_in_memory_bytes: int = 64 * 1024**2
    log_level: str = "INFO"
    workers: int = 2
    device: str = ""
    model_cache: Path | None = None
    torch_threads: int = 0
    scoring_nice: int = 10
    gradcam_top_k: int = 1
    batch_studies: int = 8
    results_jpeg: bool = False
    results_parametric_map: bool = False
    results_explain_absent: bool = False
    results_processes: int = 1
    score_on_arrival: bool = True
    device_uid: str = ""
    job_attempts: int = 3
    delivery_attempts: int = 8
    retry_after: float = 10.0
    retry_max: float = 900.0
    lease_seconds: float = 600.0
    callers: tuple[CallerConfig, ...] = ()
    destinations: tuple[DestinationConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()
    tls: TlsConfig | None = None
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    source: str = field(default="<defaults>", compare=False)

    def __post_init__(self) -> None:
        """Check every field; raise ConfigError naming the key and the source."""
        where = self.source
        # AE titles compare without their padding (PS3.5 6.2: spaces are not
        # significant), so keep the stripped form.
        stripped = validate_ae_title(self.ae_title, f"[node] ae_title in {where}")
        object.__setattr__(self, "ae_title", stripped)
        _check(bool(self.host), f"[node] host in {where}: must not be empty")
        _check(
            0 <= self.port <= 65535,
            f"[node] port in {where}: expected 0..65535, found {self.port}",
        )
        _check(
            self.stable_after > 0,
            f"[node] stable_after in {where}: expected seconds > 0, "
            f"found {self.stable_after}",
        )
        _check(
            1 <= self.scp_processes <= 64,
            f"[node] scp_processes in {where}: expected 1..64, "
            f"found {self.scp_processes}",
        )
        # pynetdicom watches each connection with select(), which cannot watch
        # a file descriptor above 1023: associations, their spool files, the
        # connections waiting in the gate and the index's must stay below it.
        _check(
            1 <= self.max_associations <= 200,
            f"[node] max_associations in {where}: expected 1..200 (more receiving "
            f"processes serve more: scp_processes), found {self.max_associations}",
        )
        _check(
            MIN_PDU <= self.max_pdu <= MAX_PDU,
            f"[node] max_pdu in {where}: expected {MIN_PDU}..{MAX_PDU} bytes, found "
            f"{self.max_pdu} (0, unlimited, is not accepted: a peer could make the "
            "node hold any PDU in memory)",
        )
        for key in ("acse_timeout", "idle_timeout"):
            value = getattr(self, key)
            _check(
                0 < value <= 3600,
                f"[node] {key} in {where}: expected seconds in (0, 3600], "
                f"found {value}",
            )
        _check(
            1 <= self.max_connections_per_host <= 1024,
            f"[node] max_connections_per_host in {where}: expected 1..1024, "
            f"found {self.max_connections_per_host}",
        )
        for key in ("max_instance_bytes", "max_inflated_bytes", "max_in_memory_bytes"):
            value = getattr(self, key)
            _check(
                value >= 1024**2,
                f"[node] {key} in {where}: expected at least 1048576 bytes, "
                f"found {value}",
            )
        _check(
            1000 <= self.max_data_elements <= 100_000_000,
            f"[node] max_data_elements in {where}: expected 1000..100000000, "
            f"found {self.max_data_elements}",
        )
        _check(
            self.log_level in {"DEBUG", "INFO", "WARNING", "ERROR"},
            f"[node] log_level in {where}: expected DEBUG, INFO, WARNING or ERROR, "
            f"found {self.log_level!r}",
        )
        _check(
            0 <= self.scoring_nice <= 19,
            f"[node] scoring_nice in {where}: expected 0..19, "
            f"found {self.scoring_nice}",
        )
        for key, low in (
            ("workers", 0),
            ("torch_threads", 0),
            ("gradcam_top_k", 0),
            ("results_processes", 0),
            ("batch_studies", 1),
            ("job_attempts", 1),
            ("delivery_attempts", 1),
        ):
            value = getattr(self, key)
            _check(
                value >= low,
                f"[node] {key} in {where}: expected >= {low}, found {value}",
            )
        _check(
            not self.device_uid
            or (
                len(self.device_uid) <= 64
                and _UID.fullmatch(self.device_uid) is not None
            ),
            f"[node] device_uid in {where}: not a DICOM UID (digits and dots, "
            f"at most 64 characters, no leading zeros), found {self.device_uid!r}",
        )
        for key in ("retry_after", "retry_max", "lease_seconds"):
            value = getattr(self, key)
            _check(
                value > 0,
                f"[node] {key} in {where}: expected seconds > 0, found {value}",
            )
        _check(
            self.device in {"", "cpu", "cuda"} or self.device.startswith("cuda:"),
            f"[node] device in {where}: expected cpu, cuda, cuda:N or empty, "
            f"found {self.device!r}",
        )
        if self.database_url:
            _check(
                "://" in self.database_url,
                f"[node] database_url in {where}: expected an SQLAlchemy URL such "
                "as postgresql+psycopg://user@host/db",
            )
        if self.tls is not None:
            _check(
                not self.tls.require_client_certificate
                or self.tls.ca_certificates is not None,
                f"[tls] in {where}: require_client_certificate needs "
                "ca_certificates (the CA that signs the callers' certificates)",
            )
        names = [d.name for d in self.destinations]
        _check(
            len(names) == len(set(names)),
            f"[[destinations]] in {where}: names must be unique, found {names}",
        )

    @property
    def storage_dir(self) -> Path:
        """Return the folder instances are stored under."""
        return self.state_dir / "storage"

    @property
    def model_cache_dir(self) -> Path:
        """Return the folder of compiled models: the configured one or in state_dir."""
        return self.model_cache or self.state_dir / "models"

    @property
    def effective_database_url(self) -> str:
        """Return the index URL: the configured one or SQLite in state_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'index.sqlite3').resolve()}"

    def caller_allowed(self, calling_ae_title: str, address: str) -> bool:
        """Return whether a peer may open an association.

        Parameters
        ----------
        calling_ae_title
            The calling AE title from the A-ASSOCIATE-RQ, stripped.
        address
            The peer's IP address.

        Returns
        -------
        bool
            True when ``allow_any_caller`` is set or a caller entry matches.
        """
        if self.allow_any_caller:
            return True
        return any(
            c.ae_title == calling_ae_title and (c.host is None or c.host == address)
            for c in self.callers
        )


def validate_ae_title(value: object, where: str) -> str:
    """Check an AE title (PS3.5 6.2, VR AE).

    Parameters
    ----------
    value
        The candidate AE title.
    where
        Names the key in the error message.

    Returns
    -------
    str
        The AE title without surrounding spaces.

    Raises
    ------
    ConfigError
        If it is not 1 to 16 characters of printable ASCII without backslash.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, found {type(value).__name__}")
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16:
        raise ConfigError(f"{where}: an AE title has 1 to 16 characters")
    if any(not (0x20 <= ord(c) < 0x7F) or c == "\\" for c in stripped):
        raise ConfigError(
            f"{where}: an AE title is printable ASCII without backslash (PS3.5 6.2)"
        )
    return stripped


# PS3.5 9.1: components of digits without leading zeros, joined by dots.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# Keys of the [node] table and the type each must have.
_NODE_KEYS: dict[str, type] = {
    "ae_title": str,
    "host": str,
    "port": int,
    "state_dir": str,
    "database_url": str,
    "stable_after": float,
    "allow_any_caller": bool,
    "scp_processes": int,
    "max_associations": int,
    "max_pdu": int,
    "acse_timeout": float,
    "idle_timeout": float,
    "max_connections_per_host": int,
    "max_instance_bytes": int,
    "max_inflated_bytes": int,
    "max_data_elements": int,
    "max_in_memory_bytes": int,
    "log_level": str,
    "workers": int,
    "device": str,
    "model_cache": str,
    "torch_threads": int,
    "scoring_nice": int,
    "gradcam_top_k": int,
    "batch_studies": int,
    "results_jpeg": bool,
    "results_parametric_map": bool,
    "results_explain_absent": bool,
    "results_processes": int,
    "score_on_arrival": bool,
    "device_uid": str,
    "job_attempts": int,
    "delivery_attempts": int,
    "retry_after": float,
    "retry_max": float,
    "lease_seconds": float,
}
_CALLER_KEYS: dict[str, type] = {"ae_title": str, "host": str, "results_port": int}
_DESTINATION_KEYS: dict[str, type] = {
    "name": str,
    "ae_title": str,
    "host": str,
    "port": int,
    "tls": bool,
    "ca_certificates": str,
    "url": str,
    "token_file": str,
}
_TLS_KEYS: dict[str, type] = {
    "certificate": str,
    "private_key": str,
    "ca_certificates": str,
    "require_client_certificate": bool,
}
_HTTP_KEYS: dict[str, type] = {
    "host": str,
    "port": int,
    "show_patient": bool,
    "token_file": str,
    "min_free_bytes": int,
}
_RETENTION_KEYS: dict[str, type] = {
    "studies_days": float,
    "results_days": float,
    "audit_days": float,
}
_MODEL_KEYS: dict[str, type] = {"path": str, "sha256": str, "match": dict}
_MATCH_KEYS = ("modalities", "body_parts", "sop_classes", "calling_ae_titles")
_LIST_SECTIONS: dict[str, dict[str, type]] = {
    "callers": _CALLER_KEYS,
    "destinations": _DESTINATION_KEYS,
    "models": _MODEL_KEYS,
}


def example_config_text() -> str:
    """Return the fully commented example configuration shipped with the package.

    Returns
    -------
    str
        The TOML text of ``dicom_node/example.toml``.
    """
    return resources.files("dicom_node").joinpath("example.toml").read_text("utf-8")


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read, override and check the node configuration.

    Relative paths in the file (``state_dir``, ``model_cache``, model ``path``) are
    resolved against the file's directory; relative paths from the environment
    against the current directory.

    Parameters
    ----------
    path
        The TOML file.
    environ
        The environment to read ``DICOM_NODE_<SECTION>_<KEY>`` overrides from;
        ``os.environ`` when None.

    Returns
    -------
    NodeConfig
        The checked configuration.

    Raises
    ------
    ConfigError
        If the file cannot be read or parsed, or a key is unknown, of the wrong
        type or out of range; the message names the key and where it came from.
    """
    env = os.environ if environ is None else environ
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read configuration file {path}: {exc.strerror}"
        ) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    # The folder's real path: a node and a worker started with the same file
    # named differently (absolute, relative, through a link) see the same paths.
    base_dir = path.parent.resolve()
    return config_from_mapping(raw, source=str(path), base_dir=base_dir, environ=env)


def config_from_mapping(
    raw: Mapping[str, Any],
    *,
    source: str,
    base_dir: Path,
    environ: Mapping[str, str],
) -> NodeConfig:
    """Build a NodeConfig from parsed TOML and environment overrides.

    Parameters
    ----------
    raw
        The parsed TOML document.
    source
        Where it came from, for messages.
    base_dir
        Directory relative paths in ``raw`` are resolved against.
    environ
        The environment holding ``DICOM_NODE_*`` overrides.

    Returns
    -------
    NodeConfig
        The checked configuration.

    Raises
    ------
    ConfigError
        If a key is unknown, mistyped or out of range.
    """
    unknown = set(raw) - {"node", "tls", "retention", "http", *_LIST_SECTIONS}
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {sorted(unknown)}; expected [node], "
            "[tls], [http], [retention], [[callers]], [[destinations]], [[models]]"
        )
    http = _typed_table(raw.get("http", {}), _HTTP_KEYS, f"[http] in {source}")
    http_sources = dict.fromkeys(http, source)
    retention = _typed_table(
        raw.get("retention", {}), _RETENTION_KEYS, f"[retention] in {source}"
    )
    tls_raw = raw.get("tls")
    tls = (
        None
        if tls_raw is None
        else _typed_table(tls_raw, _TLS_KEYS, f"[tls] in {source}")
    )
    tls_sources = dict.fromkeys(tls or {}, source)
    node_raw = raw.get("node", {})
    if not isinstance(node_raw, Mapping):
        raise ConfigError(f"{source}: [node] must be a table")
    node = _typed_table(node_raw, _NODE_KEYS, f"[node] in {source}")
    node_sources = dict.fromkeys(node, source)
    lists: dict[str, list[dict[str, Any]]] = {}
    list_sources: dict[str, str] = {}
    for section, keys in _LIST_SECTIONS.items():
        items = raw.get(section, [])
        if not isinstance(items, list):
            raise ConfigError(f"{source}: {section} must be an array of tables")
        lists[section] = [
            _typed_table(item, keys, f"[[{section}]] #{i + 1} in {source}")
            for i, item in enumerate(items)
        ]
        list_sources[section] = source

    # Environment overrides win over the file.
    from_environment: dict[str, str] = {}  # "[table] key" -> its variable
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == "DICOM_NODE_CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if rest.startswith("node_"):
            key = _env_key(name, rest, "node", _NODE_KEYS)
            node[key] = _parse_env_value(name, value, _NODE_KEYS[key])
            node_sources[key] = "environment"
            from_environment[f"[node] {key}"] = name
        elif rest.startswith("http_"):
            key = _env_key(name, rest, "http", _HTTP_KEYS)
            http[key] = _parse_env_value(name, value, _HTTP_KEYS[key])
            http_sources[key] = "environment"
            from_environment[f"[http] {key}"] = name
        elif rest.startswith("retention_"):
            key = _env_key(name, rest, "retention", _RETENTION_KEYS)
            retention[key] = _parse_env_value(name, value, _RETENTION_KEYS[key])
            from_environment[f"[retention] {key}"] = name
        elif rest.startswith("tls_"):
            key = _env_key(name, rest, "tls", _TLS_KEYS)
            tls = tls or {}
            tls[key] = _parse_env_value(name, value, _TLS_KEYS[key])
            tls_sources[key] = "environment"
            from_environment[f"[tls] {key}"] = name
        elif rest in _LIST_SECTIONS:
            lists[rest] = _parse_env_list(name, value, _LIST_SECTIONS[rest])
            list_sources[rest] = "environment"
        else:
            raise ConfigError(
                f"environment variable {name}: not a configuration key; expected "
                "DICOM_NODE_NODE_<KEY>, DICOM_NODE_TLS_<KEY>, "
                "DICOM_NODE_HTTP_<KEY>, DICOM_NODE_RETENTION_<KEY>, "
                "DICOM_NODE_CALLERS, DICOM_NODE_DESTINATIONS or DICOM_NODE_MODELS"
            )

    def resolve(value: str, origin: str) -> Path:
        p = Path(value).expanduser()
        if p.is_absolute() or origin == "environment":
            return Path(os.path.abspath(p))
        return Path(os.path.abspath(base_dir / p))

    kwargs: dict[str, Any] = {
        k: v
        for k, v in node.items()
        if k not in {"state_dir", "log_level", "model_cache"}
    }
    if node.get("model_cache"):
        kwargs["model_cache"] = resolve(
            node["model_cache"], node_sources["model_cache"]
        )
    if "state_dir" in node:
        kwargs["state_dir"] = resolve(node["state_dir"], node_sources["state_dir"])
    else:
        kwargs["state_dir"] = base_dir / "dicom-node-data"
    if "log_level" in node:
        kwargs["log_level"] = str(node["log_level"]).upper()
    try:
        callers = tuple(
            CallerConfig(
                ae_title=validate_ae_title(
                    _required(c, "ae_title", "callers", list_sources),
                    f"[[callers]] ae_title in {list_sources['callers']}",
                ),
                host=_checked_host(c.get("host"), list_sources["callers"]),
                results_port=(
                    _checked_port(c["results_port"], list_sources["callers"])
                    if "results_port" in c
                    else None
                ),
            )
            for c in lists["callers"]
        )
        for d in lists["destinations"]:
            if "token_file" in d and "url" not in d:
                raise ConfigError(
                    f"[[destinations]] {d.get('name', '?')!r} in "
                    f"{list_sources['destinations']}: token_file is for a DICOMweb "
                    "destination (url)"
                )
        destinations = tuple(
            _dicomweb_destination(d, list_sources["destinations"], resolve)
            if "url" in d
            else DestinationConfig(
                name=_required(d, "name", "destinations", list_sources),
                ae_title=validate_ae_title(
                    _required(d, "ae_title", "destinations", list_sources),
                    f"[[destinations]] ae_title in {list_sources['destinations']}",
                ),
                host=_required(d, "host", "destinations", list_sources),
                port=_checked_port(
                    _required(d, "port", "destinations", list_sources),
                    list_sources["destinations"],
                ),
                tls=bool(d.get("tls", False)),
                ca_certificates=(
                    resolve(d["ca_certificates"], list_sources["destinations"])
                    if "ca_certificates" in d
                    else None
                ),
            )
            for d in lists["destinations"]
        )
        tls_config = None
        if tls is not None:
            where = f"[tls] in {source}"
            for key in ("certificate", "private_key"):
                if key not in tls:
                    raise ConfigError(f"{where}: missing key {key!r}")
            tls_config = TlsConfig(
                certificate=resolve(tls["certificate"], tls_sources["certificate"]),
                private_key=resolve(tls["private_key"], tls_sources["private_key"]),
                ca_certificates=(
                    resolve(tls["ca_certificates"], tls_sources["ca_certificates"])
                    if "ca_certificates" in tls
                    else None
                ),
                require_client_certificate=bool(
                    tls.get("require_client_certificate", False)
                ),
            )
        models = tuple(
            ModelConfig(
                path=resolve(
                    _required(m, "path", "models", list_sources),
                    list_sources["models"],
                ),
                sha256=_checked_sha256(m.get("sha256"), list_sources["models"]),
                match=_checked_match(m.get("match"), list_sources["models"]),
            )
            for m in lists["models"]
        )
        model_keys = [m.key for m in models]
        for key in {k for k in model_keys if model_keys.count(k) > 1}:
            raise ConfigError(
                f"[[models]] in {list_sources['models']}: the model file {key} is "
                "listed twice; list each model once (give it one match)"
            )
        return NodeConfig(
            **kwargs,
            callers=callers,
            destinations=destinations,
            models=models,
            tls=tls_config,
            retention=RetentionConfig(**retention),
            http=HttpConfig(
                **{
                    **http,
                    "token_file": (
                        resolve(http["token_file"], http_sources["token_file"])
                        if "token_file" in http
                        else None
                    ),
                }
            ),
            source=source,
        )
    except ConfigError as exc:
        raise ConfigError(_naming_where(str(exc), source, from_environment)) from exc
    except TypeError as exc:  # a value of the wrong type reached a check
        raise ConfigError(f"{source}: {exc}") from exc


def _naming_where(message: str, source: str, variables: Mapping[str, str]) -> str:
    """Say where the value a check refused came from: the file or its variable.

    The checks name their key first ("[node] max_pdu ..."); a key set from the
    environment is named by its variable instead of the file.
    """
    key = re.match(r"\[(\w+)\] (\w+)", message)
    variable = variables.get(key.group(0)) if key else None
    if variable is not None:
        return f"{message.replace(f' in {source}', '', 1)} (from {variable})"
    if source not in message and "environment" not in message:
        return f"{message} (in {source})"
    return message


def _typed_table(table: object, keys: Mapping[str, type], where: str) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(
                f"{where}: unknown key {key!r}; expected one of {sorted(keys)}"
            )
        out[key] = _typed_value(value, keys[key], f"{where}, key {key!r}")
    return out


def _typed_value(value: object, expected: type, where: str) -> Any:
    # TOML ints are acceptable where floats are expected; bools are not ints here.
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, found a boolean")
    if not isinstance(value, expected):
        raise ConfigError(
            f"{where}: expected {expected.__name__}, found {type(value).__name__}"
        )
    return value


def _env_key(name: str, rest: str, table: str, keys: Mapping[str, type]) -> str:
    # DICOM_NODE_<TABLE>_<KEY>: the key, checked against the table's.
    key = rest[len(table) + 1 :]
    if key not in keys:
        raise ConfigError(
            f"environment variable {name}: unknown key [{table}] {key}; "
            f"expected one of {sorted(keys)}"
        )
    return key


def _parse_env_value(name: str, value: str, expected: type) -> Any:
    where = f"environment variable {name}"
    if expected is str:
        return value
    if expected is bool:
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{where}: expected true or false")
    try:
        return expected(value.strip())
    except ValueError as exc:
        raise ConfigError(f"{where}: expected {expected.__name__}") from exc


def _parse_env_list(
    name: str, value: str, keys: Mapping[str, type]
) -> list[dict[str, Any]]:
    where = f"environment variable {name}"
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{where}: expected a TOML array of inline tables, e.g. "
            '[{ae_title = "PACS", host = "10.0.0.5"}]'
        ) from exc
    if not isinstance(parsed, list):
        raise ConfigError(f"{where}: expected a TOML array of inline tables")
    return [
        _typed_table(item, keys, f"{where} #{i + 1}") for i, item in enumerate(parsed)
    ]


def _required(
    table: Mapping[str, Any], key: str, section: str, sources: Mapping[str, str]
) -> Any:
    if key not in table:
        raise ConfigError(f"[[{section}]] in {sources[section]}: missing key {key!r}")
    return table[key]


def read_token(path: Path, where: str) -> str:
    """Return the bearer token in ``path``, a file others may not read.

    Parameters
    ----------
    path
        The token file.
    where
        The setting that names it, for messages (``[http] token_file``).

    Raises
    ------
    ConfigError
        If the file cannot be read, is empty, or others may read it.
    """
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} {path}: cannot read it ({exc})") from exc
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            f"{where} {path}: readable by others (mode "
            f"{stat.S_IMODE(mode):04o}); run chmod 600 {path}"
        )
    if not token:
        raise ConfigError(f"{where} {path}: empty")
    return token


def _dicomweb_destination(
    d: Mapping[str, Any], source: str, resolve: Callable[[str, str], Path]
) -> DestinationConfig:
    """Return a ``[[destinations]]`` entry with ``url``: a DICOMweb STOW-RS service."""
    where = f"[[destinations]] {d.get('name', '?')!r} in {source}"
    name = d.get("name")
    if not name:
        raise ConfigError(f"{where}: missing key 'name'")
    dicom_keys = sorted({"ae_title", "host", "port", "tls"} & set(d))
    if dicom_keys:
        raise ConfigError(
            f"{where}: url (DICOMweb) and {', '.join(dicom_keys)} (DICOM) "
            "exclude each other; give one kind of destination per entry"
        )
    url = str(d["url"]).strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/@?#]+(/[^\s?#]*)?", url) or len(url) > 255:
        raise ConfigError(
            f"{where}: url must be an http:// or https:// URL of at most 255 "
            "characters, without user:password@, query or fragment (a token goes "
            f"in token_file), found {url[:80]!r}"
        )
    return DestinationConfig(
        name=str(name),
        ae_title="",
        host="",
        port=0,
        ca_certificates=(
            resolve(d["ca_certificates"], source) if "ca_certificates" in d else None
        ),
        url=url,
        token_file=resolve(d["token_file"], source) if "token_file" in d else None,
    )


def _checked_host(value: str | None, source: str) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise ConfigError(
            f"[[callers]] host in {source}: expected an IP address, found {value!r}"
        ) from exc


def _checked_port(value: int, source: str) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(f"port in {source}: expected 1..65535, found {value}")
    return value


def _checked_match(value: object, source: str) -> ModelMatch | None:
    if value is None:
        return None
    where = f"[[models]] match in {source}"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(value) - set(_MATCH_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; expected {list(_MATCH_KEYS)}"
        )
    lists: dict[str, tuple[str, ...]] = {}
    for key in _MATCH_KEYS:
        items = value.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{where}, key {key!r}: expected a list of strings")
        lists[key] = tuple(i.strip() for i in items)
    return ModelMatch(**lists)


def _checked_sha256(value: str | None, source: str) -> str | None:
    if value is None:
        return None
    lowered = value.lower()
    if len(lowered) != 64 or any(c not in "0123456789abcdef" for c in lowered):
        raise ConfigError(
            f"[[models]] sha256 in {source}: expected 64 hexadecimal digits"
        )
    return lowered
