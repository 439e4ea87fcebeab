"""ModelArtifact: one .safetensors file, weights plus a JSON document; no pickle."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from inference.errors import ArtifactError
from inference.findings import CodedConcept, Label, text_problem
from inference.gradcam import GRADCAM_LAYERS
from inference.model import ARCHITECTURES, build_model
from inference.preprocess import PreprocessSpec
from inference.variants import VARIANTS

__all__ = [
    "AGGREGATIONS",
    "FORMAT_VERSION",
    "CodedConcept",
    "Label",
    "ModelArtifact",
    "file_sha256",
    "weights_sha256",
]

FORMAT_VERSION = 2  # the newest this reads; a plain model is written as 1
QUANTIZATION_PREFIX = "int8."  # tensors of ModelArtifact.quantization in the file
ONNX_GRAPH_KEY = "onnx.graph"  # ModelArtifact.onnx_graph in the file, as uint8
METADATA_KEY = "dicom_node_model"
AGGREGATIONS = ("max", "mean", "topk_mean")


@dataclass(slots=True)
class ModelArtifact:
    """A trained model and everything needed to run and report it.

    Parameters
    ----------
    name
        Model name, e.g. ``chest-nodule``.
    version
        Model version string.
    device_uid
        A UID new for each training run (IHE AIR Device UID).
    architecture
        torchvision architecture name.
    preprocessing
        How pixels become input; its ``channels`` and ``size`` are the input's.
    labels
        One per model output.
    state_dict
        The weights.
    aggregation
        Study-level rule over frames: ``max``, ``mean`` or ``topk_mean``.
    top_k
        k for ``topk_mean``.
    dropout
        Dropout before the head (part of the architecture).
    gradcam_layer
        The stage Grad-CAM explains at: ``layer4`` (default; 1/32 of the input
        side), or ``layer3`` / ``layer2`` for finer heatmaps (1/16, 1/8).
    gradcam_offset
        (rows, columns) in input pixels by which heatmaps are drawn displaced
        from the grid cells' receptive-field centres: where the model's evidence
        lies relative to them, measured on validation lesions by ``medtrain
        fit``; (0, 0) when unknown.
    accepts
        Accepted inputs: ``modalities``, ``body_parts``, ``sop_classes`` lists.
    training
        Training data summary and metrics (free-form JSON).
    variant
        Empty for a model as trained; for a deployment variant
        (``medtrain export``), its ``format`` (int8, fp16, bf16, onnx), the ``source``
        model it was made from and what was ``measured`` against it (format
        version 2).
    quantization
        An int8 variant's activation ranges (see :mod:`inference.variants`),
        stored beside the weights and covered by their SHA-256.
    onnx_graph
        An ONNX variant's graph of the trunk (a serialized ONNX model, see
        :mod:`inference.variants`), stored beside the weights as bytes and
        covered by their SHA-256.
    """

    name: str
    version: str
    device_uid: str
    architecture: str
    preprocessing: PreprocessSpec
    labels: tuple[Label, ...]
    state_dict: dict[str, torch.Tensor]
    aggregation: str = "max"
    top_k: int = 1
    dropout: float = 0.0
    gradcam_layer: str = "layer4"
    gradcam_offset: tuple[float, float] = (0.0, 0.0)
    accepts: dict[str, list[str]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    variant: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, torch.Tensor] = field(default_factory=dict)
    onnx_graph: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        """Check the fields that the runtime depends on."""
        if not self.name or not self.version:
            raise ValueError("name and version are required")
        for what, text in (("name", self.name), ("version", self.version)):
            problem = text_problem(text)
            if problem is not None:
                raise ValueError(f"model {what} {text!r} has {problem}")
        if not self.device_uid or len(self.device_uid) > 64:
            raise ValueError("device_uid: expected a UID of at most 64 characters")
        if self.architecture not in ARCHITECTURES:
            raise ArtifactError(
                f"unknown architecture {self.architecture!r}: this dicom-node runs "
                f"{', '.join(sorted(ARCHITECTURES))}; export the model with one of them"
            )
        if not self.labels:
            raise ValueError("labels: at least one is required")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation: expected one of {AGGREGATIONS}, "
                f"found {self.aggregation!r}"
            )
        if self.top_k < 1:
            raise ValueError(f"top_k: expected >= 1, found {self.top_k}")
        if self.gradcam_layer not in GRADCAM_LAYERS:
            raise ArtifactError(
                f"gradcam_layer: expected one of {', '.join(GRADCAM_LAYERS)}, "
                f"found {self.gradcam_layer!r}"
            )
        offset = self.gradcam_offset
        limit = min(self.preprocessing.size) / 2
        if not all(math.isfinite(v) and abs(v) < limit for v in offset):
            raise ArtifactError(
                "gradcam_offset: expected [rows, columns] of input pixels within "
                f"half the input side, found {list(offset)}"
            )
        unknown = set(self.accepts) - {"modalities", "body_parts", "sop_classes"}
        if unknown:
            raise ValueError(f"accepts: unknown key(s) {sorted(unknown)}")
        kind = self.variant.get("format") if self.variant else None
        if self.variant and kind not in VARIANTS:
            raise ArtifactError(
                f"variant: unknown format {kind!r}; this dicom-node runs "
                f"{', '.join(VARIANTS)}"
            )
        if bool(self.quantization) != (kind == "int8"):
            raise ArtifactError(
                "an int8 variant needs its activation ranges, and only it has them"
            )
        if bool(self.onnx_graph) != (kind == "onnx"):
            raise ArtifactError("an ONNX variant needs its graph, and only it has one")

    def release_weights(self) -> None:
        """Let go of the weight tensors once a model has been built from them.

        The tensors :meth:`load` reads are views of the file mapped into memory,
        and a built model holds its own copy: a process that keeps only the model
        frees the file's pages (42 MiB for a resnet18).
        Afterwards :meth:`build`, :meth:`save` and :attr:`weights_sha256` raise
        ArtifactError; the rest of the artifact (labels, preprocessing, accepts,
        an int8 variant's ranges, copied at load; an ONNX variant's graph, bytes
        of its own) stays.
        """
        self.state_dict = {}

    @property
    def weights_sha256(self) -> str:
        """Return the SHA-256 of the weights (names, dtypes, shapes and bytes)."""
        return weights_sha256(self._tensors())

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the file holds, by its name there."""
        self._check_weights()
        tensors = {
            **self.state_dict,
            **{QUANTIZATION_PREFIX + k: v for k, v in self.quantization.items()},
        }
        if self.onnx_graph:
            tensors[ONNX_GRAPH_KEY] = torch.frombuffer(
                bytearray(self.onnx_graph), dtype=torch.uint8
            )
        return tensors

    def build(self) -> torch.nn.Module:
        """Return the model with these weights, in eval mode.

        Raises
        ------
        ArtifactError
            If the weights do not fit the architecture.
        """
        self._check_weights()
        model: torch.nn.Module = build_model(
            self.architecture,
            num_classes=len(self.labels),
            in_channels=self.preprocessing.channels,
            dropout=self.dropout,
        )
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            raise ArtifactError(
                f"weights do not fit {self.architecture} with "
                f"{len(self.labels)} label(s): {str(exc)[:300]}"
            ) from exc
        model.eval()
        return model

    def _check_weights(self) -> None:
        # No weights: released (a copy of a released artifact included).
        if not self.state_dict:
            raise ArtifactError(
                f"model {self.name} {self.version}: no weights (they were released "
                "once the model was built); load the file again"
            )

    def metadata(self) -> dict[str, Any]:
        """Return the JSON document stored in the file header."""
        document: dict[str, Any] = {
            "format_version": 2 if self.variant else 1,
            "model": {
                "name": self.name,
                "version": self.version,
                "device_uid": self.device_uid,
            },
            "architecture": self.architecture,
            "dropout": self.dropout,
            "gradcam_layer": self.gradcam_layer,
            "gradcam_offset": list(self.gradcam_offset),
            "input": {
                "channels": self.preprocessing.channels,
                "size": list(self.preprocessing.size),
            },
            "preprocessing": self.preprocessing.to_dict(),
            "labels": [_label_to_dict(label) for label in self.labels],
            "aggregation": {"rule": self.aggregation, "k": self.top_k},
            "accepts": self.accepts,
            "training": self.training,
            "weights_sha256": self.weights_sha256,
        }
        if self.variant:
            document["variant"] = self.variant
        return document

    def save(self, path: Path) -> str:
        """Write the artifact; return the file's SHA-256 (for a config pin).

        Parameters
        ----------
        path
            Destination ``.safetensors`` file.

        Returns
        -------
        str
            SHA-256 of the written file.
        """
        tensors = {
            k: v.detach().to("cpu").contiguous() for k, v in self._tensors().items()
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            tensors, str(path), metadata={METADATA_KEY: json.dumps(self.metadata())}
        )
        return file_sha256(path)

    @staticmethod
    def check_pin(path: Path, actual: str, expected: str) -> None:
        """Refuse a model file whose SHA-256 is not the one expected.

        Parameters
        ----------
        path
            The file.
        actual
            Its SHA-256.
        expected
            The one it must have (the configuration's pin, or the one taken
            when it was first read).

        Raises
        ------
        ArtifactError
            If they differ.
        """
        if actual != expected.lower():
            raise ArtifactError(
                f"model file {path} has SHA-256 {actual}, not the {expected.lower()} "
                "expected: the file changed (if the configuration pins it: check "
                "the file and update the pin)"
            )

    @classmethod
    def load(cls, path: Path, expected_sha256: str | None = None) -> ModelArtifact:
        """Read an artifact; nothing is unpickled, nothing runs.

        Parameters
        ----------
        path
            The ``.safetensors`` file.
        expected_sha256
            When given, a file with another SHA-256 is refused.

        Returns
        -------
        ModelArtifact
            The artifact, its weights checked against their recorded hash.

        Raises
        ------
        ArtifactError
            If the file is missing, not a dicom-node model, changed, of a newer
            format, or misses a key; the message says which and what to do.
        """
        if not path.is_file():
            raise ArtifactError(f"model file {path} not found")
        if expected_sha256 is not None:
            cls.check_pin(path, file_sha256(path), expected_sha256)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(
                f"{path} is not a safetensors model file ({exc}); models come from "
                "`medtrain fit`"
            ) from exc
        if METADATA_KEY not in header:
            raise ArtifactError(
                f"{path} is a safetensors file without a dicom-node model document; "
                "export the model with `medtrain fit`"
            )
        try:
            meta = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path}: the model document is not JSON") from exc
        # Copies (a few numbers): a view would keep the whole mapped file alive
        # after release_weights.
        quantization = {
            k[len(QUANTIZATION_PREFIX) :]: state_dict.pop(k).clone()
            for k in [k for k in state_dict if k.startswith(QUANTIZATION_PREFIX)]
        }
        graph = state_dict.pop(ONNX_GRAPH_KEY, None)
        onnx_graph = b"" if graph is None else graph.numpy().tobytes()
        artifact = _from_metadata(meta, state_dict, quantization, onnx_graph, str(path))
        recorded = _get(meta, "weights_sha256", str(path))
        if artifact.weights_sha256 != recorded:
            raise ArtifactError(
                f"{path}: the weights do not match their recorded SHA-256 (the file "
                "was modified or damaged); export the model again"
            )
        return artifact


def _label_to_dict(label: Label) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": label.name,
        "code": {
            "value": label.concept.value,
            "scheme": label.concept.scheme,
            "meaning": label.concept.meaning,
        },
        "threshold": label.threshold,
    }
    if label.finding_site is not None:
        site = label.finding_site
        out["finding_site"] = {
            "value": site.value,
            "scheme": site.scheme,
            "meaning": site.meaning,
        }
    return out


def _get(meta: Mapping[str, Any], dotted: str, where: str) -> Any:
    node: Any = meta
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ArtifactError(
                f"{where}: the model document lacks {dotted!r}; export the model "
                "again with `medtrain fit`"
            )
        node = node[part]
    return node


def _concept(data: Any, where: str) -> CodedConcept:
    if not isinstance(data, Mapping):
        raise ArtifactError(f"{where}: a coded concept must be an object")
    try:
        return CodedConcept(
            str(data["value"]), str(data["scheme"]), str(data["meaning"])
        )
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{where}: coded concept incomplete ({exc})") from exc


def _from_metadata(
    meta: Mapping[str, Any],
    state_dict: dict[str, torch.Tensor],
    quantization: dict[str, torch.Tensor],
    onnx_graph: bytes,
    where: str,
) -> ModelArtifact:
    version = _get(meta, "format_version", where)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: model format version {version} is newer than this dicom-node "
            f"reads ({FORMAT_VERSION}); upgrade dicom-node"
        )
    labels: Sequence[Any] = _get(meta, "labels", where)
    try:
        parsed_labels = tuple(
            Label(
                name=str(item["name"]),
                concept=_concept(item["code"], where),
                threshold=float(item["threshold"]),
                finding_site=(
                    _concept(item["finding_site"], where)
                    if item.get("finding_site")
                    else None
                ),
            )
            for item in labels
        )
        return ModelArtifact(
            name=str(_get(meta, "model.name", where)),
            version=str(_get(meta, "model.version", where)),
            device_uid=str(_get(meta, "model.device_uid", where)),
            architecture=str(_get(meta, "architecture", where)),
            preprocessing=PreprocessSpec.from_dict(_get(meta, "preprocessing", where)),
            labels=parsed_labels,
            state_dict=state_dict,
            aggregation=str(_get(meta, "aggregation.rule", where)),
            top_k=int(_get(meta, "aggregation.k", where)),
            dropout=float(meta.get("dropout", 0.0)),
            gradcam_layer=str(meta.get("gradcam_layer", "layer4")),
            gradcam_offset=_offset(meta.get("gradcam_offset", [0.0, 0.0])),
            accepts=dict(meta.get("accepts", {})),
            training=dict(meta.get("training", {})),
            variant=dict(meta.get("variant", {})),
            quantization=quantization,
            onnx_graph=onnx_graph,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: invalid model document ({exc})") from exc


def _offset(value: Any) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"gradcam_offset: expected [rows, columns], found {value!r}")
    return float(value[0]), float(value[1])


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Return a SHA-256 over tensor names, dtypes, shapes and bytes, in name order.

    Parameters
    ----------
    state_dict
        The weights.

    Returns
    -------
    str
        Hex digest.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Return the SHA-256 of a file.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    str
        Hex digest.
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
