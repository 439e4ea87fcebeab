"""build_model: torchvision ResNets with any class count and 1 or 3 input channels."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from inference.errors import ArtifactError

if TYPE_CHECKING:
    from torchvision.models import ResNet

__all__ = [
    "ARCHITECTURES",
    "build_model",
    "load_init_weights",
    "resolve_device",
    "set_cpu_threads",
]

# torchvision's constructors of these names build them. torchvision is imported
# only where a model is built: a process that runs a compiled model
# (inference.compiled) never loads it (~90 MB).
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def build_model(
    architecture: str,
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    init_weights: Path | None = None,
) -> ResNet:
    """Return a torchvision ResNet, randomly initialised or from a local file.

    Parameters
    ----------
    architecture
        One of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``.
    num_classes
        Outputs of the head (one logit per label).
    in_channels
        1 (grayscale) or 3 (RGB).
    dropout
        Probability of the dropout before the head; 0 for none.
    init_weights
        A torchvision state-dict file (``.pth``, read with ``weights_only=True``,
        or ``.safetensors``) to start from, e.g. ImageNet weights. The head is
        left random; for 1 channel the RGB ``conv1`` filters are summed.

    Returns
    -------
    torchvision.models.ResNet
        The model, in training mode.

    Raises
    ------
    ValueError
        If an argument is out of range or the architecture is unknown.
    ArtifactError
        If the weights file cannot be read or does not fit the architecture.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture: expected one of {sorted(ARCHITECTURES)}, "
            f"found {architecture!r}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, found {num_classes}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels: expected 1 or 3, found {in_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected 0 <= p < 1, found {dropout}")
    from torchvision import models

    model: ResNet = getattr(models, architecture)(weights=None, num_classes=num_classes)
    if in_channels == 1:
        model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if dropout > 0:
        model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)
    if init_weights is not None:
        load_init_weights(model, init_weights)
    return model


def load_init_weights(model: ResNet, path: Path) -> None:
    """Load starting weights into every layer but the head.

    Parameters
    ----------
    model
        A model from :func:`build_model`.
    path
        A torchvision ResNet state dict (``.pth`` / ``.pt``, no pickled code is
        run: ``weights_only=True``) or a ``.safetensors`` file.

    Raises
    ------
    ArtifactError
        If the file cannot be read or its tensors do not fit the model.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ArtifactError(f"init weights {path}: cannot read ({exc})") from exc
    if not isinstance(state, dict):
        raise ArtifactError(f"init weights {path}: expected a state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1 = state.get("conv1.weight")
    if (
        isinstance(conv1, torch.Tensor)
        and model.conv1.in_channels == 1
        and conv1.shape[1] == 3
    ):
        state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise ArtifactError(f"init weights {path} do not fit the model: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise ArtifactError(
            f"init weights {path} do not fit the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def resolve_device(device: str | None) -> torch.device:
    """Return the device named, or CUDA when present and none is.

    Parameters
    ----------
    device
        ``cuda``, ``cpu``, ``cuda:1``...; None or empty: CUDA when present,
        else the CPU.

    Returns
    -------
    torch.device
        The device.
    """
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def set_cpu_threads(threads: int) -> int:
    """Set how many CPU threads torch uses for each operation in this process.

    Parameters
    ----------
    threads
        At least 1.

    Returns
    -------
    int
        The number it used before.
    """
    if threads < 1:
        raise ValueError(f"threads: expected >= 1, found {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous
