"""Dataset -> float32 frames [N, C, H, W], the same code in training and serving."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from pydicom.dataset import Dataset

from inference.pixels import (
    FrameSource,
    PreprocessSpec,
    check_size,
    decode_frames,
    render,
    window,
)

__all__ = [
    "FrameSource",
    "Frames",
    "PreprocessSpec",
    "check_size",
    "decode_frames",
    "heatmap_to_source",
    "preprocess",
    "preprocess_many",
    "render",
]


@dataclass(slots=True)
class Frames:
    """Model input and, for each frame, its source.

    Parameters
    ----------
    pixels
        float32 tensor [N, C, H, W], normalized.
    sources
        One per frame.
    """

    pixels: torch.Tensor
    sources: list[FrameSource] = field(default_factory=list)

    def __len__(self) -> int:
        """Return the number of frames."""
        return len(self.sources)


def preprocess(ds: Dataset, spec: PreprocessSpec) -> Frames:
    """Turn one data set into normalized model-input frames.

    Decode, Modality LUT, VOI (file LUT / window, a fixed window, or min-max),
    MONOCHROME1 inverted, colour to RGB, multi-frame split, resize (antialiased,
    stretch or letterbox), [0, 1], channels matched, mean / std.

    Parameters
    ----------
    ds
        The data set.
    spec
        The preprocessing spec (from the model artifact).

    Returns
    -------
    Frames
        float32 [N, C, H, W] and one source per frame.

    Raises
    ------
    PreprocessError
        If the image is missing, too large, undecodable or of an unsupported layout.
    """
    values, color = decode_frames(ds, spec.max_pixels)
    if color:
        tensor = torch.from_numpy(values).permute(0, 3, 1, 2)  # [F, 3, H, W]
    else:
        scaled = window(values, ds, spec)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            scaled = 1.0 - scaled  # PS3.3 C.7.6.3.1.2: minimum is white
        tensor = torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))[
            :, None
        ]
    rows, columns = int(tensor.shape[-2]), int(tensor.shape[-1])
    resized, box = _resize(tensor, spec)
    if spec.channels == 3 and resized.shape[1] == 1:
        resized = resized.expand(-1, 3, -1, -1)
    elif spec.channels == 1 and resized.shape[1] == 3:
        # ITU-R BT.601 luma, as for YBR_FULL (PS3.3 C.7.6.3.1.2).
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        resized = (resized * weights).sum(dim=1, keepdim=True)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = ((resized - mean) / std).contiguous()
    uid = str(ds.get("SOPInstanceUID", ""))
    sources = [FrameSource(uid, i, rows, columns, box) for i in range(pixels.shape[0])]
    return Frames(pixels, sources)


def _resize(
    tensor: torch.Tensor, spec: PreprocessSpec
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    height, width = spec.size
    rows, columns = int(tensor.shape[-2]), int(tensor.shape[-1])
    if spec.resize == "stretch":
        box = (0, 0, height, width)
        inner = (height, width)
    else:
        scale = min(height / rows, width / columns)
        inner = (max(1, round(rows * scale)), max(1, round(columns * scale)))
        top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
        box = (top, left, inner[0], inner[1])
    if (rows, columns) == inner:
        resized = tensor
    else:
        resized = F.interpolate(
            tensor, size=inner, mode="bilinear", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
    if spec.resize == "letterbox":
        top, left, h, w = box
        padded = torch.zeros(
            (tensor.shape[0], tensor.shape[1], height, width), dtype=torch.float32
        )
        padded[:, :, top : top + h, left : left + w] = resized
        resized = padded
    return resized, box


def preprocess_many(datasets: Iterable[Dataset], spec: PreprocessSpec) -> Frames:
    """Preprocess several data sets into one batch of frames.

    Parameters
    ----------
    datasets
        The data sets.
    spec
        The preprocessing spec.

    Returns
    -------
    Frames
        All their frames, in order.
    """
    parts = [preprocess(ds, spec) for ds in datasets]
    if not parts:
        height, width = spec.size
        return Frames(torch.empty((0, spec.channels, height, width)), [])
    return Frames(
        torch.cat([p.pixels for p in parts]),
        [s for p in parts for s in p.sources],
    )


def heatmap_to_source(heatmap: torch.Tensor, source: FrameSource) -> torch.Tensor:
    """Map a heatmap over the model input back onto the source image.

    Parameters
    ----------
    heatmap
        [H, W] over the model input.
    source
        Where the frame came from.

    Returns
    -------
    torch.Tensor
        [rows, columns] over the source image, values kept in [0, 1].
    """
    top, left, h, w = source.box
    inner = heatmap[top : top + h, left : left + w][None, None]
    out = F.interpolate(
        inner, size=(source.rows, source.columns), mode="bilinear", align_corners=False
    )
    return out[0, 0].clamp(0.0, 1.0)
