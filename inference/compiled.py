"""Compiled models: trunk and head in one TorchScript file, run without torchvision.

A scoring process keeps its model for as long as it runs. Built from the model
file, the model needs torchvision's ResNet classes, and importing torchvision
costs a process ~90 MB that otherwise holds PyTorch and the model alone. So a
short-lived child process (``python -m inference.compiled``) builds the model,
traces its trunk (the graph :class:`~inference.classifier.Classifier` runs on
the CPU anyway, see its ``trace``) and its head, checks the traced model against
the model itself on a probe input, and saves both in one TorchScript file in a
cache folder, named by the model file's SHA-256 and PyTorch's version. The
scoring process loads that file, checks it gives the probe's logits, and runs
it: the same graph and weights, in a process that never imports torchvision.
Files of the cache are derived from the model files: deleting them is safe
(the next start compiles again).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference.artifact import ModelArtifact
from inference.errors import ArtifactError
from inference.gradcam import from_stage, head, to_stage
from inference.model import resolve_device

__all__ = ["Compiled", "compilable", "compile_model", "compiled_path", "load_compiled"]

logger = logging.getLogger(__name__)

# The document saved beside the graph (torch.jit's extra files).
_DOCUMENT = "dicom-node.json"
_FORMAT = 1
# Seconds a child may take to compile (importing PyTorch and torchvision, the
# build, the trace): on a 2-core VM ~6 s for a resnet18.
COMPILE_TIMEOUT = 600.0
# Days after which a compiled file no model has loaded is removed.
UNUSED_DAYS = 30
# How close the loaded graph's probe logits must be to those the model gave.
_RTOL, _ATOL = 1e-3, 1e-4


@dataclass(frozen=True)
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

    On the CPU, in fp32 (an fp16 / bf16 variant runs fp32 there; an int8
    variant's trunk is traced quantized), not an ONNX variant.
    """
    kind = artifact.variant.get("format") if artifact.variant else None
    return device.type == "cpu" and precision == "fp32" and kind != "onnx"


def compiled_path(folder: Path, sha256: str) -> Path:
    """Return where the compiled file of a model file with this SHA-256 is kept."""
    version = "".join(c if c.isalnum() or c in ".-" else "_" for c in torch.__version__)
    return folder / f"{sha256}-torch{version}.pt"


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
    if not compilable(artifact, classifier.device, classifier.precision):
        raise ArtifactError(f"model {artifact.name} runs uncompiled")
    assert classifier.model is not None
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
        "torch": torch.__version__,
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


def load_compiled(
    artifact: ModelArtifact,
    model_path: Path,
    sha256: str,
    folder: Path,
    device: str | None = None,
) -> Compiled | None:
    """Return the model compiled (from the cache, else compiled now), or None.

    Compiles in a child process when the cache has no valid file for this model
    file and PyTorch.

    Parameters
    ----------
    artifact
        The model, as loaded from ``model_path``.
    model_path
        Its file.
    sha256
        The file's SHA-256.
    folder
        The cache folder (made, private to this user, when missing).
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
    path = compiled_path(folder, sha256)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A TorchScript file is a program: only one this user alone could
        # have written is loaded.
        unsafe = _writable_by_others(folder) or (
            path.exists() and _writable_by_others(path)
        )
        if unsafe:
            logger.warning(
                "model %s not compiled: %s is not this user's alone (chmod go-w, "
                "or another model_cache); it is built in this process",
                artifact.name,
                unsafe,
            )
            return None
        if path.is_file():
            found = _load(artifact, path, sha256)
            if found is not None:
                _used(path)
                return found
            path.unlink(missing_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", __name__, str(model_path), sha256, str(path)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning(
            "model %s not compiled (%s): it is built in this process",
            artifact.name,
            exc,
        )
        return None
    if done.returncode != 0:
        lines = (done.stderr or "").strip().splitlines()
        logger.warning(
            "model %s not compiled (%s): it is built in this process",
            artifact.name,
            lines[-1][:300] if lines else f"exit status {done.returncode}",
        )
        return None
    found = _load(artifact, path, sha256)
    if found is None:
        path.unlink(missing_ok=True)
    else:
        _used(path)
    return found


def _used(path: Path) -> None:
    """Mark a compiled file used now; remove those not used for a long time.

    Files of model files no longer loaded (replaced models, PyTorch upgraded)
    go after :data:`UNUSED_DAYS` (a node that still runs one keeps it in
    memory and compiles it again at its next start); so do half-written files
    of children that were killed, after a day.
    """
    now = time.time()
    try:
        os.utime(path)
        for other in path.parent.iterdir():
            age = now - other.stat().st_mtime
            stale = other.name.endswith(".pt") and age > UNUSED_DAYS * 86400
            if stale or (other.name.startswith(".") and age > 86400):
                other.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("compiled models in %s not tidied (%s)", path.parent, exc)


def _writable_by_others(path: Path) -> str:
    """Return ``path`` when another user owns it or may write it, else ''."""
    found = path.stat()
    return str(path) if found.st_uid != os.geteuid() or found.st_mode & 0o022 else ""


def _load(artifact: ModelArtifact, path: Path, sha256: str) -> Compiled | None:
    """Load a compiled file; None (said why) when it is not this model's or differs."""
    extra = {_DOCUMENT: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation
            graph = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location="cpu", _extra_files=extra
            )
        document = json.loads(extra[_DOCUMENT] or "{}")
        expected = [
            torch.tensor(logits, dtype=torch.float32)
            for logits in document.get("probe_logits", [])
        ]
        fits = (
            document.get("format") == _FORMAT
            and document.get("model_sha256") == sha256
            and document.get("torch") == torch.__version__
        )
        if fits:
            probe, layer = _probe(artifact), artifact.gradcam_layer
            for _ in range(2):  # the first calls optimise the graph
                found = _probe_logits(graph, probe, layer)
            fits = _same(found, expected)
    except (RuntimeError, OSError, ValueError) as exc:
        logger.warning(
            "compiled model %s unreadable (%s): compiled again", path.name, exc
        )
        return None
    if not fits:
        logger.warning(
            "compiled model %s is not model %s's or gives other logits: compiled again",
            path.name,
            artifact.name,
        )
        return None
    if artifact.gradcam_layer == "layer4":
        return Compiled(graph, graph.head, graph, graph.head, path)
    return Compiled(graph, graph.head, graph.before, graph.after, path)


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
    """``python -m inference.compiled MODEL SHA256 OUT``: compile one model file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m inference.compiled MODEL SHA256 OUT", file=sys.stderr)
        return 2
    try:
        compile_model(Path(args[0]), args[1], Path(args[2]))
    except (ArtifactError, RuntimeError, OSError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
