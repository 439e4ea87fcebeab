"""Grad-CAM at layer4 of a torchvision ResNet, differentiating through the head only."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from torch import nn

__all__ = [
    "from_stage",
    "gradcam",
    "gradcam_from_features",
    "gradcam_full_backward",
    "gradcam_map",
    "gradcam_split",
    "gradcam_through",
    "head",
    "to_stage",
    "trunk",
]


def trunk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the layer4 output of a ResNet (the last convolutional stage).

    Parameters
    ----------
    model
        A torchvision ResNet (from ``inference.build_model``).
    x
        Input [N, C, H, W].

    Returns
    -------
    torch.Tensor
        Activations [N, K, h, w].
    """
    m = cast(Any, model)  # torchvision's ResNet carries no type information
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    out: torch.Tensor = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return out


def head(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Return the logits from layer4 activations: average pool, flatten, fc.

    Parameters
    ----------
    model
        The ResNet.
    features
        layer4 activations [N, K, h, w].

    Returns
    -------
    torch.Tensor
        Logits [N, labels].
    """
    m = cast(Any, model)
    out: torch.Tensor = m.fc(torch.flatten(m.avgpool(features), 1))
    return out


def gradcam_from_features(
    model: nn.Module, features: torch.Tensor, label_index: int
) -> torch.Tensor:
    """Grad-CAM from layer4 activations, differentiating through the head only.

    The trunk is not run again: its activations come from the classification
    pass. The gradient of the label's logit with respect to the activations is
    taken through pooling and the fully connected layer, which is exactly what a
    backward pass through the whole network yields at layer4.

    Parameters
    ----------
    model
        The ResNet, in eval mode.
    features
        layer4 activations [N, K, h, w].
    label_index
        Which output to explain.

    Returns
    -------
    torch.Tensor
        Heatmaps [N, h, w] in [0, 1] (each divided by its maximum; all zero when
        nothing speaks for the label).
    """
    return gradcam_through(partial(head, model), features, label_index)


def gradcam_through(
    head_of: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    label_index: int,
) -> torch.Tensor:
    """Grad-CAM from layer4 activations through a head given as a function.

    As :func:`gradcam_from_features`, with the head (pooling and the fully
    connected layer) as any differentiable function of the activations, e.g. a
    compiled model's (:mod:`inference.compiled`).

    Parameters
    ----------
    head_of
        Activations [N, K, h, w] -> logits [N, labels].
    features
        layer4 activations [N, K, h, w].
    label_index
        Which output to explain.

    Returns
    -------
    torch.Tensor
        Heatmaps [N, h, w] in [0, 1].
    """
    # clone(): activations from an inference_mode pass cannot take gradients.
    activations = features.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = head_of(activations)
        (grads,) = torch.autograd.grad(logits[:, label_index].sum(), activations)
    return gradcam_map(activations.detach(), grads)


def gradcam_map(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM from a stage's activations and the gradients of a logit at them.

    Parameters
    ----------
    activations, grads
        [N, K, h, w] each.

    Returns
    -------
    torch.Tensor
        Heatmaps [N, h, w] in [0, 1]: ReLU of the channels weighted by their
        mean gradient, each divided by its maximum (all zero when nothing speaks
        for the label).
    """
    weights = grads.mean(dim=(2, 3), keepdim=True)  # alpha_k: pooled gradients
    cam = F.relu((weights * activations).sum(dim=1))
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))


GRADCAM_LAYERS = ("layer2", "layer3", "layer4")


def gradcam_at(
    model: nn.Module, x: torch.Tensor, label_index: int, layer: str
) -> torch.Tensor:
    """Grad-CAM at an earlier ResNet stage (finer heatmaps), at that stage's grid.

    The stages before ``layer`` run without gradients; the rest of the network
    runs again with gradients to ``layer``'s activations. ``layer4`` is
    :func:`gradcam` (head-only backward).

    Parameters
    ----------
    model
        The ResNet, in eval mode.
    x
        Input [N, C, H, W].
    label_index
        Which output to explain.
    layer
        ``layer2`` (1/8 of the input side), ``layer3`` (1/16) or ``layer4`` (1/32).

    Returns
    -------
    torch.Tensor
        Heatmaps [N, h, w] in [0, 1] at ``layer``'s resolution.
    """
    return gradcam_split(
        partial(to_stage, model, layer=layer),
        partial(from_stage, model, layer=layer),
        x,
        label_index,
    )


def _stages(model: nn.Module, layer: str) -> tuple[list[Any], int]:
    """Return a ResNet's four stages and how many of them run up to ``layer``."""
    if layer not in GRADCAM_LAYERS:
        raise ValueError(f"layer: expected one of {GRADCAM_LAYERS}, found {layer!r}")
    m = cast(Any, model)
    return [m.layer1, m.layer2, m.layer3, m.layer4], GRADCAM_LAYERS.index(layer) + 2


def to_stage(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """Return the activations of stage ``layer`` of a ResNet.

    Parameters
    ----------
    model
        The ResNet.
    x
        Input [N, C, H, W].
    layer
        ``layer2``, ``layer3`` or ``layer4``.

    Returns
    -------
    torch.Tensor
        That stage's output.

    Raises
    ------
    ValueError
        For another layer name.
    """
    stages, cut = _stages(model, layer)
    m = cast(Any, model)
    a: torch.Tensor = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    for stage in stages[:cut]:
        a = stage(a)
    return a


def from_stage(model: nn.Module, activations: torch.Tensor, layer: str) -> torch.Tensor:
    """Return the logits of a ResNet from the activations of stage ``layer``.

    Parameters
    ----------
    model
        The ResNet.
    activations
        The output of stage ``layer`` (:func:`to_stage`).
    layer
        ``layer2``, ``layer3`` or ``layer4``.

    Returns
    -------
    torch.Tensor
        Logits [N, labels].

    Raises
    ------
    ValueError
        For another layer name.
    """
    stages, cut = _stages(model, layer)
    out = activations
    for stage in stages[cut:]:
        out = stage(out)
    return head(model, out)


def gradcam_split(
    before: Callable[[torch.Tensor], torch.Tensor],
    after: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    label_index: int,
) -> torch.Tensor:
    """Grad-CAM at a stage, the network given as the functions before and after it.

    Parameters
    ----------
    before
        Input -> the stage's activations (run without gradients).
    after
        The stage's activations -> logits (differentiated).
    x
        Input [N, C, H, W].
    label_index
        Which output to explain.

    Returns
    -------
    torch.Tensor
        Heatmaps [N, h, w] in [0, 1] at the stage's resolution.
    """
    with torch.no_grad():
        a = before(x.float())
    activations = a.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = after(activations)
        (grads,) = torch.autograd.grad(logits[:, label_index].sum(), activations)
    return gradcam_map(activations.detach(), grads)


def gradcam(
    model: nn.Module, x: torch.Tensor, label_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM for a batch: trunk under no_grad, gradients through the head only.

    Parameters
    ----------
    model
        The ResNet, in eval mode.
    x
        Input [N, C, H, W].
    label_index
        Which output to explain.

    Returns
    -------
    tuple of torch.Tensor
        Heatmaps [N, H, W] in [0, 1] at the input resolution, and the logits.
    """
    with torch.no_grad():
        features = trunk(model, x)
    cams = gradcam_from_features(model, features, label_index)
    with torch.no_grad():
        logits = head(model, features)
    return upsample(cams, x.shape[-2:]), logits


def upsample(
    cams: torch.Tensor,
    size: tuple[int, ...] | torch.Size,
    offset: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """Resize heatmaps [N, h, w] on a ResNet stage's grid to the input [N, H, W].

    Every stride-2 convolution and pooling of a ResNet is padded so that output
    cell ``i`` is centred on input pixel ``2 * i``; a cell of a stage with stride
    ``s`` (4 for layer1 ... 32 for layer4) is therefore centred on input pixel
    ``s * i``, not in the middle of its ``s`` x ``s`` block. Each grid node is
    placed on that pixel, values in between are bilinear and the edge value is
    kept beyond the last node. (A plain resize would put the node half a block
    further down and right: 3.5 px at layer2, 15.5 px at layer4, enough to move
    a heatmap's peak off a small lesion.) A trained model's cells may respond to
    evidence a few pixels off that centre, the same way everywhere: ``offset``
    (the artifact's ``gradcam_offset``) moves every node by that much.

    Parameters
    ----------
    cams
        Heatmaps at the stage's resolution.
    size
        The model input's (H, W).
    offset
        (rows, columns) in input pixels added to every node's position.

    Returns
    -------
    torch.Tensor
        Heatmaps at the input resolution, in [0, 1].
    """
    rows, cols = int(size[0]), int(size[1])
    axes = []
    for pixels, cells, shift in (
        (rows, cams.shape[-2], offset[0]),
        (cols, cams.shape[-1], offset[1]),
    ):
        stride = 2 ** round(math.log2(pixels / cells))  # the power of 2 it was made by
        at = torch.arange(pixels, dtype=torch.float32, device=cams.device)
        at = (at - shift) / stride
        # grid_sample's coordinates with align_corners: -1 first node, 1 last node
        axes.append(2 * at / (cells - 1) - 1 if cells > 1 else torch.zeros_like(at))
    gy, gx = torch.meshgrid(axes[0], axes[1], indexing="ij")
    grid = torch.stack((gx, gy), dim=-1).expand(len(cams), -1, -1, -1)
    out = F.grid_sample(
        cams[:, None].float(),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    return out[:, 0].clamp(0.0, 1.0)


def gradcam_full_backward(
    model: nn.Module, x: torch.Tensor, label_index: int, layer: str = "layer4"
) -> torch.Tensor:
    """Classic Grad-CAM (Selvaraju et al.): full forward and backward at one stage.

    The reference :func:`gradcam` and :func:`gradcam_at` are checked against;
    about three forwards of cost.

    Parameters
    ----------
    model
        The ResNet, in eval mode.
    x
        Input [N, C, H, W].
    label_index
        Which output to explain.
    layer
        The hooked stage (``layer4`` by default).

    Returns
    -------
    torch.Tensor
        Heatmaps [N, H, W] in [0, 1] at the input resolution.
    """
    saved: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        saved["a"] = output

    hooked: nn.Module = getattr(model, layer)
    handle = hooked.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            inp = x.detach().clone().requires_grad_(True)
            logits = model(inp)
            logits[:, label_index].sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)  # leave no gradients behind
    activations = saved["a"]
    if activations.grad is None:
        raise RuntimeError(f"no gradient reached {layer}")
    return upsample(gradcam_map(activations.detach(), activations.grad), x.shape[-2:])
