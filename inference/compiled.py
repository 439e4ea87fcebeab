"""Compiled models: trunk and head in one TorchScript file, run without torchvision.

A scoring process keeps its model for as long as it runs. Built from the model
file, the model needs torchvision's ResNet classes, and importing torchvision
costs a process ~90 MB that otherwise holds PyTorch and the model alone. So a
short-lived child process (``python -m inference.compiled``) builds the model,
traces its trunk (the graph :class:`~inference.classifier.Classifier` runs on
the CPU anyway, see its ``trace``) and its head, checks the traced model against
the model itself on a probe input, and saves both in one TorchScript file in a
cache folder, named by the model file's SHA-256 and a fingerprint of the code
that built it (this package's, PyTorch's and torchvision's versions). The
scoring process loads that file, checks it gives the probe's logits, and runs
it: the same graph and weights, in a process that never imports torchvision.
Files of the cache are derived from the model files: deleting them is safe
(the next start compiles again).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import grp
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pwd
import re
import stat
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from inference.artifact import ModelArtifact
from inference.errors import ArtifactError
from inference.gradcam import from_stage, head, to_stage
from inference.model import resolve_device

__all__ = [
    "Compiled",
    "code_fingerprint",
    "compilable",
    "compile_model",
    "compiled_path",
    "load_compiled",
]

logger = logging.getLogger(__name__)

# The document saved beside the graph (torch.jit's extra files).
_DOCUMENT = "dicom-node.json"
_FORMAT = 1
# Seconds a child may take to compile (importing PyTorch and torchvision, the
# build, the trace): 8-16 s for a resnet18 on a 2-core VM.
COMPILE_TIMEOUT = 600.0
# The folder's files: compiled models, what a killed child left, the lock.
_NAME = re.compile(r"[0-9a-f]{64}-[0-9a-f]{16}\.pt")
_PARTIAL = re.compile(r"\.[0-9a-f]{64}-[0-9a-f]{16}\.pt\.[0-9a-f]{32}")
_FAILED = re.compile(r"[0-9a-f]{64}-[0-9a-f]{16}\.pt\.failed")
_LOCK = ".lock"
# Days after which a compiled file no model has loaded is removed.
UNUSED_DAYS = 30
# A model whose compile failed is not compiled again for this long (each try
# costs a child 8-16 s and ~800 MB): its marker file, `<name>.failed`, says
# why; deleting it lets the next start try again.
RETRY_FAILED_SECONDS = 86400.0
# How close the loaded graph's probe logits must be to those the model gave.
_RTOL, _ATOL = 1e-3, 1e-4


@dataclass(frozen=True, slots=True)
class Compiled:
    """A compiled model: what a Classifier runs in place of the built model.

    Attributes
    ----------
    trunk
        Input [N, C, H, W] -> layer4 activations [N, K, h, w].
    head
        Activations -> logits [N, labels] (differentiable, for Grad-CAM).
    before, after
        For Grad-CAM at the model's layer: input -> that stage's activations,
        and those -> logits (differentiable). At layer4: the trunk and the head.
    path
        The file it was loaded from.
    """

    trunk: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    before: Callable[[torch.Tensor], torch.Tensor]
    after: Callable[[torch.Tensor], torch.Tensor]
    path: Path


def compilable(artifact: ModelArtifact, device: torch.device, precision: str) -> bool:
    """Return whether a Classifier would run this model traced, so compiled.

    Parameters
    ----------
    artifact
        The model.
    device
        Where it is to run.
    precision
        The precision it is to run in.

    Returns
    -------
    bool
        True on the CPU in fp32 (an fp16 / bf16 variant runs fp32 there; an
        int8 variant's trunk is traced quantized), but for an ONNX variant.
    """
    kind = artifact.variant.get("format") if artifact.variant else None
    return device.type == "cpu" and precision == "fp32" and kind != "onnx"


def compiled_path(folder: Path, sha256: str) -> Path:
    """Return where the model file with this SHA-256 is kept compiled.

    Parameters
    ----------
    folder
        The cache folder.
    sha256
        The model file's SHA-256.

    Returns
    -------
    Path
        ``<sha256>-<code>.pt``, ``code`` naming what else the graph depends on
        (:func:`code_fingerprint`): after an upgrade of PyTorch, torchvision
        or this package the model is compiled again.
    """
    return folder / f"{sha256}-{code_fingerprint()[:16]}.pt"


@functools.cache
def code_fingerprint() -> str:
    """Return the SHA-256 of what a compiled graph depends on beside the model file.

    The source of the modules that build, trace and run it, and the versions
    of PyTorch and torchvision (read without importing torchvision).

    Returns
    -------
    str
        64 hexadecimal digits.

    Raises
    ------
    OSError
        If a module's source cannot be read.
    """
    digest = hashlib.sha256()
    for name in _BUILDERS:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        digest.update(f"{name}:".encode())
        digest.update(Path(origin).read_bytes() if origin else b"")
    for distribution in ("torch", "torchvision"):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{distribution}={version};".encode())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()


# The modules whose code goes into a compiled graph.
_BUILDERS = (
    "inference.artifact",
    "inference.classifier",
    "inference.compiled",
    "inference.gradcam",
    "inference.model",
    "inference.variants",
)


class _Methods(nn.Module):
    """What a Classifier runs, as methods of one module (traced together).

    ``forward`` the trunk (fp32, or an int8 variant's), ``head`` the head;
    ``before`` and ``after`` the fp32 network before and after the Grad-CAM
    layer (layer2 / layer3 only; at layer4 they are the trunk and the head).
    """

    def __init__(self, trunk: nn.Module, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.trunk, self.model, self.layer = trunk, model, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)  # type: ignore[no-any-return]

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return head(self.model, features)

    def before(self, x: torch.Tensor) -> torch.Tensor:
        return to_stage(self.model, x, self.layer)

    def after(self, activations: torch.Tensor) -> torch.Tensor:
        return from_stage(self.model, activations, self.layer)


def _probe(artifact: ModelArtifact) -> torch.Tensor:
    """Return a fixed input of the model's shape (a ramp: every pixel differs)."""
    spec = artifact.preprocessing
    channels, (rows, columns) = spec.channels, spec.size
    ramp = torch.linspace(-2.0, 2.0, channels * rows * columns)
    return ramp.reshape(1, channels, rows, columns).contiguous(
        memory_format=torch.channels_last
    )


def compile_model(model_path: Path, sha256: str, out: Path) -> None:
    """Build, trace, check and save a model (run in a child process).

    Parameters
    ----------
    model_path
        The model file.
    sha256
        Its SHA-256 (a file that changed meanwhile is refused).
    out
        The TorchScript file to write (written whole, then renamed into place).

    Raises
    ------
    ArtifactError
        If the file is not a valid model, is not compilable, or its traced
        graph does not give the model's logits.
    """
    from inference.classifier import Classifier

    artifact = ModelArtifact.load(model_path, expected_sha256=sha256)
    classifier = Classifier(artifact, "cpu")
    if classifier.model is None or not compilable(
        artifact, classifier.device, classifier.precision
    ):
        raise ArtifactError(f"model {artifact.name} runs uncompiled")
    layer = artifact.gradcam_layer
    methods = _Methods(classifier.trunk_module(), classifier.model, layer).eval()
    probe = _probe(artifact)
    # The model's own logits, each way it computes them (an int8 variant's
    # trunk, and the fp32 network around the Grad-CAM layer).
    expected = _probe_logits(methods, probe, layer)
    with torch.inference_mode():
        features = methods(probe)
        inputs = {"forward": probe, "head": features}
        if layer != "layer4":
            inputs |= {"before": probe, "after": methods.before(probe)}
    with warnings.catch_warnings():
        # torch marks TorchScript deprecated; where it fails, the caller runs
        # the model as built.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace_module(  # type: ignore[no-untyped-call]
                methods, inputs
            )
    if not _same(_probe_logits(traced, probe, layer), expected):
        raise ArtifactError(f"model {artifact.name}: its traced graph differs from it")
    document = {
        "format": _FORMAT,
        "model_sha256": sha256,
        "code": code_fingerprint(),
        "probe_logits": [logits.tolist() for logits in expected],
    }
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex}")
    try:
        torch.jit.save(
            traced, str(partial), _extra_files={_DOCUMENT: json.dumps(document)}
        )
        os.chmod(partial, 0o600)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    folder = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_compiled(
    artifact: ModelArtifact,
    model_path: Path,
    sha256: str,
    folder: Path,
    device: str | None = None,
) -> Compiled | None:
    """Return the model compiled (from the cache, else compiled now), or None.

    A model file is compiled once (per :func:`code_fingerprint`): processes
    that load it at the same time wait for the one that compiles it (a lock in
    the folder), then load its file. One whose compile failed is not compiled
    again for :data:`RETRY_FAILED_SECONDS` (a marker file beside where its
    compiled file would be says why). A TorchScript file is a program, so only
    one that this user alone could have written is loaded (see
    :func:`_not_private`).

    Parameters
    ----------
    artifact
        The model, as loaded from ``model_path``.
    model_path
        Its file.
    sha256
        The file's SHA-256, as ``artifact`` was checked against.
    folder
        The cache folder (made, ``0700``, when missing).
    device
        Where the model is to run (as for a Classifier).

    Returns
    -------
    Compiled or None
        None for a model that is not :func:`compilable` on ``device`` (in
        fp32), or when it cannot be compiled or loaded here (the reason is
        logged): the caller builds the model in this process.
    """
    if not compilable(artifact, resolve_device(device), "fp32"):
        return None
    if not sys.executable:
        logger.warning(
            "model %s not compiled (no Python interpreter to run): it is built "
            "in this process",
            artifact.name,
        )
        return None
    try:
        path = compiled_path(folder, sha256)  # reads this package's source
    except OSError as exc:
        logger.warning(
            "model %s not compiled (%s): it is built in this process",
            artifact.name,
            type(exc).__name__,
        )
        return None
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        unsafe = _not_private(folder)
        if unsafe:
            logger.warning(
                "model %s not compiled: %s; it is built in this process (make "
                "model_cache a folder of this user's alone)",
                artifact.name,
                unsafe,
            )
            return None
        with _locked(folder / _LOCK):
            found, why = _load(artifact, path, sha256)
            if found is None and path.exists():
                logger.warning(
                    "compiled model %s not used (%s): removed", path.name, why
                )
                path.unlink()
            failed = _failed_marker(path)
            earlier = _failed_earlier(failed) if found is None else None
            if earlier is not None:
                why = (
                    f"its compile failed {earlier}; tried again after "
                    f"{RETRY_FAILED_SECONDS / 3600:.0f} h, or at the next start "
                    f"once {failed} is deleted"
                )
            elif found is None:
                found, why, lasting = _compile(artifact, model_path, sha256, path)
                if lasting:
                    _write_failed(failed, why)
            if found is not None:
                _forget_failed(failed)
    except OSError as exc:
        found, why = None, type(exc).__name__
    if found is None:
        logger.warning(
            "model %s not compiled (%s): it is built in this process",
            artifact.name,
            why,
        )
        return None
    _used(path)
    return found


def _compile(
    artifact: ModelArtifact, model_path: Path, sha256: str, path: Path
) -> tuple[Compiled | None, str, bool]:
    """Compile in a child process and load the file; or None and why not.

    The third value says whether a failure is worth recording (it would fail
    again): not for a child ended by a signal (stopped with the node, or by
    the kernel for want of memory), nor when none could be started.
    """
    logger.info(
        "compiling model %s for the CPU into %s (once per model file)",
        artifact.name,
        path.parent,
    )
    # -P and PYTHONPATH: the child imports this package from where this process
    # did, never a module of the current folder; it refuses to compile if its
    # code is not this process's (the fingerprint).
    home = str(Path(__file__).resolve().parents[1])
    command = [sys.executable, "-P", "-m", "inference.compiled", str(model_path)]
    try:
        done = subprocess.run(
            [*command, sha256, str(path), code_fingerprint()],
            env={**os.environ, "PYTHONPATH": home},
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"took over {COMPILE_TIMEOUT:.0f} s", True
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"no child process ({type(exc).__name__})", False
    if done.returncode < 0:
        return None, f"the child ended by signal {-done.returncode}", False
    if done.returncode != 0:
        lines = (done.stderr or "").strip().splitlines()
        return (
            None,
            lines[-1][:300] if lines else f"exit status {done.returncode}",
            True,
        )
    found, why = _load(artifact, path, sha256)
    return found, why, found is None


def _failed_marker(path: Path) -> Path:
    return path.with_name(f"{path.name}.failed")


def _open_regular(path: Path) -> tuple[BinaryIO, os.stat_result] | None:
    """Open a regular file to read, never through a link; None if not one.

    Raises
    ------
    OSError
        If it cannot be opened (missing, a link, no permission).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb"), found


def _failed_earlier(marker: Path) -> str | None:
    """Say when and why the compile a marker records failed, if it is recent."""
    try:
        opened = _open_regular(marker)
    except OSError:  # none, or a link: no marker of this module
        return None
    if opened is None:
        return None
    file, found = opened
    with file:
        age = time.time() - found.st_mtime
        if not 0 <= age < RETRY_FAILED_SECONDS:
            return None
        reason = file.read(400).decode("utf-8", "replace").strip()
    minutes = age / 60
    when = f"{minutes:.0f} min ago" if minutes < 120 else f"{minutes / 60:.0f} h ago"
    return f"{when} ({reason or 'no reason recorded'})"


def _forget_failed(marker: Path) -> None:
    """Remove a failed compile's marker (the model compiled since)."""
    try:
        marker.unlink(missing_ok=True)
    except OSError as exc:  # a folder of that name, say: the compile stands
        logger.warning(
            "marker of a failed compile %s not removed (%s)",
            marker,
            type(exc).__name__,
        )


def _write_failed(marker: Path, why: str) -> None:
    """Record that a compile failed, and why (its time is the file's)."""
    try:
        fd = os.open(
            marker,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(why[:300] + "\n")
    except OSError as exc:
        logger.warning(
            "failed compile not recorded in %s (%s): tried again at the next load",
            marker,
            type(exc).__name__,
        )


def _not_private(folder: Path) -> str:
    """Return why another user could write to ``folder``; '' when none could.

    The folder must be this user's and not a link; it and each folder above it
    (owned by this user or root) writable by no other user, unless sticky as
    /tmp is. Writable by a group counts as by others unless the group is this
    user's own (its primary group, with no other members: umask 002 on Debian).
    """
    me = os.geteuid()
    found = os.lstat(folder)
    if not stat.S_ISDIR(found.st_mode):
        return f"{folder} is not a folder (a link?)"
    if found.st_uid != me or _others_may_write(found):
        return f"{folder} is not this user's alone"
    for above in folder.resolve().parents:
        found = os.stat(above)
        sticky = found.st_mode & stat.S_ISVTX
        if found.st_uid not in (0, me) or (_others_may_write(found) and not sticky):
            return f"{above} (above it) may be changed by another user"
    return ""


def _others_may_write(found: os.stat_result) -> bool:
    """Return whether a user other than this one may write to a file or folder."""
    if found.st_uid not in (0, os.geteuid()) or found.st_mode & 0o002:
        return True
    return bool(found.st_mode & 0o020) and not _own_group(found.st_gid)


def _own_group(gid: int) -> bool:
    """Return whether ``gid`` is this user's primary group with no other members."""
    if gid != os.getegid():
        return False
    try:
        members = grp.getgrgid(gid).gr_mem
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # no such group or user in the databases
        return False
    return set(members) <= {name}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (made when missing) while in the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _used(path: Path) -> None:
    """Mark a compiled file used now; remove those not used for a long time.

    Only this module's own files: compiled ones (``<sha256>-<code>.pt``) that no
    process has loaded for :data:`UNUSED_DAYS` (replaced models, upgrades; a
    node that still runs one keeps it in memory and compiles it again at its
    next start), after a day what a killed child left half-written, and the
    markers of failed compiles once they no longer hold a retry back.
    """
    now = time.time()
    try:
        os.utime(path)
        others = list(path.parent.iterdir())
    except OSError as exc:
        logger.warning("compiled models in %s not tidied (%s)", path.parent, exc)
        return
    for other in others:
        oldest: float
        if _NAME.fullmatch(other.name):
            oldest = UNUSED_DAYS * 86400
        elif _PARTIAL.fullmatch(other.name):
            oldest = 86400
        elif _FAILED.fullmatch(other.name):
            oldest = RETRY_FAILED_SECONDS
        else:
            continue
        try:
            if now - other.lstat().st_mtime > oldest:
                other.unlink()
        except OSError:  # removed meanwhile by another process, or not ours
            continue


def _load(
    artifact: ModelArtifact, path: Path, sha256: str
) -> tuple[Compiled | None, str]:
    """Load a compiled file; or None and why not (missing, not this model's...)."""
    try:
        opened = _open_regular(path)
    except FileNotFoundError:
        return None, "not compiled yet"
    except OSError as exc:
        return None, f"unreadable ({type(exc).__name__})"
    if opened is None:
        return None, "not a file"
    file, found = opened
    with file:
        if found.st_uid != os.geteuid() or _others_may_write(found):
            return None, "not this user's alone"
        extra = {_DOCUMENT: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load's deprecation
                graph = torch.jit.load(  # type: ignore[no-untyped-call]
                    file, map_location="cpu", _extra_files=extra
                )
            document = json.loads(extra[_DOCUMENT] or "{}")
            fits = (
                isinstance(document, dict)
                and document.get("format") == _FORMAT
                and document.get("model_sha256") == sha256
                and document.get("code") == code_fingerprint()
            )
            if not fits:
                return None, "another model's, or of other code"
            expected = [
                torch.tensor(logits, dtype=torch.float32)
                for logits in document["probe_logits"]
            ]
            probe, layer = _probe(artifact), artifact.gradcam_layer
            for _ in range(2):  # the first calls optimise the graph
                got = _probe_logits(graph, probe, layer)
        except Exception as exc:  # noqa: BLE001 - any failure: compiled again, or built
            return None, f"unreadable ({type(exc).__name__})"
    if not _same(got, expected):
        return None, "its graph gives other logits"
    if layer == "layer4":
        return Compiled(graph, graph.head, graph, graph.head, path), ""
    return Compiled(graph, graph.head, graph.before, graph.after, path), ""


def _probe_logits(model: Any, probe: torch.Tensor, layer: str) -> list[torch.Tensor]:
    """Return a model's logits for the probe, each way it computes them.

    Through the trunk and the head, and (Grad-CAM at layer2 / layer3) through
    the network before and after that layer. ``model`` is a :class:`_Methods`
    or its traced graph.
    """
    with torch.inference_mode():
        found = [model.head(model(probe)).flatten()]
        if layer != "layer4":
            found.append(model.after(model.before(probe)).flatten())
    return found


def _same(found: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    """Return whether two lists of logits agree, within the tolerance."""
    return len(found) == len(expected) and all(
        got.shape == want.shape and torch.allclose(got, want, rtol=_RTOL, atol=_ATOL)
        for got, want in zip(found, expected, strict=False)
    )


def main(argv: list[str] | None = None) -> int:
    """Compile a model file: ``python -m inference.compiled MODEL SHA256 OUT CODE``.

    Parameters
    ----------
    argv
        The arguments (``sys.argv[1:]`` when None); CODE is the
        :func:`code_fingerprint` of the process that asks (the child refuses
        to compile with other code).

    Returns
    -------
    int
        The exit status: 0 compiled, 1 not (the reason on stderr), 2 usage.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        print(
            "usage: python -m inference.compiled MODEL SHA256 OUT FINGERPRINT",
            file=sys.stderr,
        )
        return 2
    if args[3] != code_fingerprint():
        print(
            f"this process runs other code ({Path(__file__).resolve().parent}) "
            "than the one that asked it to compile",
            file=sys.stderr,
        )
        return 1
    try:
        compile_model(Path(args[0]), args[1], Path(args[2]))
    except (ArtifactError, RuntimeError, OSError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
