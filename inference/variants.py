"""Deployment variants of a model: int8 and ONNX for CPU serving, fp16 / bf16 for GPUs.

An int8 variant keeps the fp32 weights and adds the activation ranges observed
on calibration images (``ModelArtifact.quantization``); the node quantizes the
trunk from them when it loads the model (PyTorch's FX graph mode, static, the
x86 backend: convolutions run on int8, the head stays fp32, so Grad-CAM at
layer4 works from the trunk's features as before). A model made again from the
same file is the same model, bit for bit. An fp16 / bf16 variant stores its
weights in that type; on CUDA the model computes in it (autocast), on the CPU in
fp32. An ONNX variant keeps the fp32 weights and adds the trunk as an ONNX
graph (:data:`ONNX_OPSET`, input [N, C, H, W] float32 to layer4's activations),
which the node runs with onnxruntime on the CPU where it is installed; the head
and Grad-CAM stay in PyTorch, as for int8.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from inference.errors import ArtifactError
from inference.gradcam import trunk

__all__ = [
    "INT8_BACKEND",
    "ONNX_OPSET",
    "VARIANTS",
    "OnnxTrunk",
    "Trunk",
    "check_onnx_export",
    "int8_trunk",
    "observer_state",
    "onnx_graph",
    "onnxruntime_version",
    "prepare_int8",
    "use_int8_engine",
]

VARIANTS = ("int8", "fp16", "bf16", "onnx")
ONNX_OPSET = 18
INT8_BACKEND = "x86"
_OBSERVER = "activation_post_process"


class Trunk(nn.Module):
    """A ResNet's layers up to layer4, as a module of its own (to trace or quantize).

    Parameters
    ----------
    model
        The ResNet.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return layer4's activations of ``x``."""
        return trunk(self.model, x)


def use_int8_engine() -> None:
    """Make PyTorch's x86 quantized engine the one this process runs int8 with.

    Raises
    ------
    ArtifactError
        If this PyTorch has no x86 quantized engine.
    """
    if INT8_BACKEND not in torch.backends.quantized.supported_engines:
        raise ArtifactError(
            f"int8 models need PyTorch's {INT8_BACKEND} quantized engine, which this "
            f"PyTorch lacks ({', '.join(torch.backends.quantized.supported_engines)})"
        )
    torch.backends.quantized.engine = INT8_BACKEND


def prepare_int8(
    model: nn.Module, channels: int, size: tuple[int, int]
) -> torch.fx.GraphModule:
    """Return the trunk of ``model`` (a copy) with observers, ready to calibrate.

    Parameters
    ----------
    model
        The fp32 ResNet.
    channels, size
        The input's channels and (rows, columns).

    Returns
    -------
    torch.fx.GraphModule
        With observers: run calibration images through it (no gradients),
        then :func:`observer_state` gives what an int8 variant stores.

    Raises
    ------
    ArtifactError
        If this PyTorch has no x86 quantized engine.
    """
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_fx
    except ImportError as exc:
        raise ArtifactError(
            f"int8 models need torch.ao.quantization, which this PyTorch "
            f"{torch.__version__} lacks: use the fp32 model"
        ) from exc
    use_int8_engine()
    example = (torch.zeros(1, channels, *size),)
    mapping = get_default_qconfig_mapping(INT8_BACKEND)
    with warnings.catch_warnings():
        # PyTorch marks this quantization API deprecated (for torchao); it
        # runs, and a PyTorch without it is refused above with a message.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return prepare_fx(Trunk(copy.deepcopy(model)).eval(), mapping, example)


def observer_state(prepared: nn.Module) -> dict[str, torch.Tensor]:
    """Return the activation ranges a calibrated :func:`prepare_int8` module saw."""
    return {
        k: v.detach().clone()
        for k, v in prepared.state_dict().items()
        if k.startswith(_OBSERVER)
    }


def int8_trunk(
    model: nn.Module,
    channels: int,
    size: tuple[int, int],
    observers: dict[str, torch.Tensor],
    made_with: str = "",
) -> nn.Module:
    """Return the int8 trunk of ``model`` quantized with the stored ranges.

    Parameters
    ----------
    model
        The fp32 ResNet (the variant's weights).
    channels, size
        The input's channels and (rows, columns).
    observers
        From :func:`observer_state` (``ModelArtifact.quantization``).
    made_with
        The PyTorch version that made them, for the message when they do not
        fit (the observers' names follow PyTorch's graph of the model).

    Returns
    -------
    torch.nn.Module
        Input [N, C, H, W] float32 to layer4's activations, float32.

    Raises
    ------
    ArtifactError
        If the ranges do not fit the model.
    """
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = prepare_int8(model, channels, size)
    expected = set(observer_state(prepared))
    if set(observers) != expected:
        raise ArtifactError(
            "int8 ranges do not fit the model: "
            f"{len(set(observers) - expected)} unknown, "
            f"{len(expected - set(observers))} missing (made with PyTorch "
            f"{made_with or 'unknown'}, this is {torch.__version__}): export the "
            "int8 variant again with this PyTorch, or run the fp32 model"
        )
    try:
        prepared.load_state_dict(observers, strict=False)
    except RuntimeError as exc:
        raise ArtifactError(f"int8 ranges do not fit the model: {exc}") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # as in prepare_int8
        warnings.simplefilter("ignore", DeprecationWarning)
        quantized: Any = convert_fx(prepared)
    quantized.eval()
    return quantized  # type: ignore[no-any-return]


def onnx_graph(model: nn.Module, channels: int, size: tuple[int, int]) -> bytes:
    """Return the trunk of ``model`` as a serialized ONNX model (:data:`ONNX_OPSET`).

    Parameters
    ----------
    model
        The fp32 ResNet.
    channels, size
        The input's channels and (rows, columns).

    Returns
    -------
    bytes
        An ONNX model: input ``pixels`` [N, C, H, W] float32 (any N), output
        ``features``, layer4's activations.

    Raises
    ------
    ArtifactError
        If the exporter's packages (onnx, onnxscript) are missing or it fails.
    """
    check_onnx_export()
    example = (torch.zeros(2, channels, *size),)
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own beta
            program = torch.onnx.export(
                Trunk(copy.deepcopy(model)).eval(),
                example,
                input_names=["pixels"],
                output_names=["features"],
                dynamic_shapes=({0: batch},),
                opset_version=ONNX_OPSET,
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:  # any exporter failure: the user's message
        raise ArtifactError(
            f"ONNX export failed ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    if program is None:
        raise ArtifactError("ONNX export returned no program")
    graph: bytes = program.model_proto.SerializeToString()
    return graph


def check_onnx_export() -> None:
    """Raise :class:`ArtifactError` unless ONNX can be exported and run here."""
    try:
        import onnx  # noqa: F401 - the exporter needs both
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ArtifactError(
            "ONNX export needs the onnx and onnxscript packages: install "
            "dicom-node[onnx]"
        ) from exc
    if onnxruntime_version() is None:
        raise ArtifactError(
            "an ONNX variant is measured in onnxruntime, which is not installed: "
            "install dicom-node[onnx]"
        )


def onnxruntime_version() -> str | None:
    """Return the installed onnxruntime's version, or None without one."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


class OnnxTrunk:
    """Runs an ONNX variant's trunk with onnxruntime on the CPU.

    Parameters
    ----------
    graph
        From :func:`onnx_graph` (``ModelArtifact.onnx_graph``).
    threads
        onnxruntime's intra-op threads (the node's torch threads).

    Raises
    ------
    ArtifactError
        If onnxruntime is not installed or cannot load the graph.
    """

    def __init__(self, graph: bytes, threads: int) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise ArtifactError(
                "ONNX variants run with onnxruntime, which is not installed: "
                "install dicom-node[onnx]"
            ) from exc
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only, never per-run lines
        # Idle threads sleep instead of spinning: the node's receiving and
        # sending threads share the cores (as with torch_threads and nice).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(
                graph, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types
            raise ArtifactError(
                f"onnxruntime {onnxruntime.__version__} cannot load the ONNX graph "
                f"({type(exc).__name__}: {str(exc)[:300]}); the file's SHA-256 "
                "matched, so an onnxruntime older than the one that measured it "
                "(the variant's record says which) is the likely cause: upgrade "
                "onnxruntime, or run the source model"
            ) from exc

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return layer4's activations of ``x`` [N, C, H, W] (float32, CPU)."""
        pixels = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (features,) = self.session.run(["features"], {"pixels": pixels})
        return torch.from_numpy(features)
