"""The picture of a Secondary Capture: the source, the heatmap, a scale, a caption.

Nothing is drawn over the image but the heatmap: the caption sits in a band of
its own below the picture and the scale beside it, so a small image keeps all
of its pixels visible and the text is whole. A finding the model called present
is shown in jet colours (red is hottest); one it called absent, when absent
findings are explained at all, in a single cold hue with "ABSENT" in the
caption, so it cannot be read as a positive.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

__all__ = ["overlay", "pixel_aspect"]

# Pictures narrower than this are enlarged (nearest neighbour, whole factors)
# so that the caption is legible beside them.
_MIN_COLUMNS = 384
# A picture resampled to square pixels grows no side past this (it shrinks instead).
_MAX_SIDE = 4096
_MIN_FONT = 9
# Pictures lower than this are given black rows below, for the scale's three labels.
_MIN_ROWS = 64
_CAPTION_COLOUR = {True: (255, 255, 0), False: (255, 255, 255)}


def _jet(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue
    out: npt.NDArray[np.float32] = np.clip(
        1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0
    ).astype(np.float32)
    return out


_LEVELS = np.linspace(0.0, 1.0, 256, dtype=np.float32)
# The colour of each of 256 heat levels, 0..255 per channel: jet for a present
# finding; for an absent one, black to a light cyan-blue, no red anywhere.
_LUT = {
    True: np.rint(255 * _jet(_LEVELS)).astype(np.int32),
    False: np.rint(
        255 * _LEVELS[:, None] * np.array([0.25, 0.65, 1.0], np.float32)
    ).astype(np.int32),
}


# The caption's font: DejaVu Sans (Debian's fonts-dejavu-core: Latin, Greek,
# Cyrillic) where the system has it, else Pillow's own (ASCII only).
_FONT_FILE = "DejaVuSans.ttf"
# A code point no font draws (plane 16, private use): its mask is the font's
# "missing glyph" box.
_NO_GLYPH = "\U0010fffd"


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(_FONT_FILE, size)
    except OSError:  # fonts-dejavu-core not installed: Pillow's own font
        return _pillow_font(size)


def _pillow_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except (OSError, TypeError):  # a Pillow without FreeType: its bitmap font
        return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _drawn(character: str) -> bool:
    """Whether the caption's font has a glyph for ``character`` (not its box)."""
    font = _font(16)
    mask, missing = font.getmask(character), font.getmask(_NO_GLYPH)
    return mask.size != missing.size or bytes(mask) != bytes(missing)


def _drawable(text: str) -> str:
    """Return ``text`` with what the font cannot draw replaced, not boxed.

    A character without a glyph becomes its base letter where it has one the
    font draws ("ő" -> "o"), else "?". The SR carries the text exactly; the
    caption only has to read right.
    """
    out = []
    for character in text:
        if character.isspace() or _drawn(character):
            out.append(character)
            continue
        base = "".join(
            c
            for c in unicodedata.normalize("NFKD", character)
            if not unicodedata.combining(c) and _drawn(c)
        )
        out.append(base or "?")
    return "".join(out)


def _width(text: str, size: int) -> int:
    return math.ceil(_font(size).getlength(text))


def overlay(
    image: npt.NDArray[np.uint8],
    heatmap: npt.NDArray[np.float32],
    caption: Sequence[str],
    *,
    positive: bool = True,
    aspect: float = 1.0,
) -> npt.NDArray[np.uint8]:
    """Blend a heatmap over a rendered image, add its scale and a caption band.

    Parameters
    ----------
    image
        uint8 [rows, columns] or [rows, columns, 3].
    heatmap
        float [rows, columns] in [0, 1] (clipped to it).
    caption
        Lines written in a band below the picture (shrunk to fit its width).
    positive
        Whether the heatmap explains a finding the model called present (jet
        colours) or absent (one cold hue).
    aspect
        The height of a source pixel over its width (:func:`pixel_aspect`):
        other than 1, the picture is resampled to square pixels, so that it
        shows the body in its proportions (a viewer draws the capture's
        pixels square).

    Returns
    -------
    numpy.ndarray
        uint8 RGB: the picture, in square pixels and enlarged when it is
        small, with the scale to its right and the caption below.

    Raises
    ------
    ValueError
        If the heatmap holds a value that is not finite (NaN, infinite).
    """
    heat = np.asarray(heatmap, np.float32)
    if not np.isfinite(heat).all():
        # Only a broken model gives one; drawn, it would look like no heat.
        raise ValueError("heatmap: not every value is finite")
    level = np.rint(255 * np.clip(heat, 0.0, 1.0)).astype(np.uint16)
    tables = _blend_tables(positive)
    blended = np.empty((*level.shape, 3), np.uint8)
    for channel, table in enumerate(tables):
        value = image if image.ndim == 2 else image[..., channel]
        index = (value.astype(np.uint16) << 8) | level  # always within the table
        np.take(table, index, out=blended[..., channel], mode="clip")
    if aspect != 1.0:
        blended = _square_pixels(blended, aspect)
    factor = max(1, math.ceil(_MIN_COLUMNS / max(1, blended.shape[1])))
    if factor > 1:
        blended = blended.repeat(factor, axis=0).repeat(factor, axis=1)
    if blended.shape[0] < _MIN_ROWS:  # a strip (1 x N): room for the scale's labels
        below = np.zeros((_MIN_ROWS - blended.shape[0], *blended.shape[1:]), np.uint8)
        blended = np.concatenate([blended, below], axis=0)
    rows, columns = blended.shape[:2]
    size = max(_MIN_FONT, min(rows, columns) // 32)
    scale = _scale(rows, size, positive)
    picture = np.concatenate([blended, scale], axis=1)
    band = _caption(caption, picture.shape[1], size, positive)
    return np.concatenate([picture, band], axis=0)


def pixel_aspect(ds: Dataset) -> float:
    """Return the height of an image's pixel over its width; 1 when unknown.

    From Pixel Aspect Ratio (vertical, horizontal), else Pixel Spacing or
    Imager Pixel Spacing (row spacing, column spacing: PS3.3 10.7.1.3): the
    first of them that is two positive numbers within 1:4 either way; 1 when
    none is. (An enhanced multi-frame image's Pixel Measures, in its
    functional groups, are not read.)

    Parameters
    ----------
    ds
        The source data set.

    Returns
    -------
    float
        The ratio, 1/4 to 4.
    """
    for keyword in ("PixelAspectRatio", "PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            height, width = (float(v) for v in value)
        except (TypeError, ValueError):
            continue  # not two numbers: the next attribute may say
        if not (math.isfinite(height) and math.isfinite(width)):
            continue
        if height > 0 and width > 0 and 0.25 <= height / width <= 4:
            return height / width
    return 1.0


def _square_pixels(
    picture: npt.NDArray[np.uint8], aspect: float
) -> npt.NDArray[np.uint8]:
    """Resample a picture of pixels ``aspect`` times as high as wide to square ones.

    The short side of a pixel is kept (the picture grows) unless that would
    take a side past :data:`_MAX_SIDE`; then the long side is (it shrinks).
    """
    rows, columns = picture.shape[:2]
    if aspect > 1:
        size = (columns, round(rows * aspect))
        if size[1] > _MAX_SIDE:
            size = (max(1, round(columns / aspect)), rows)
    else:
        size = (round(columns / aspect), rows)
        if size[0] > _MAX_SIDE:
            size = (columns, max(1, round(rows * aspect)))
    if size == (columns, rows):
        return picture
    resized = Image.fromarray(picture).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, np.uint8)


@functools.cache
def _blend_tables(positive: bool) -> tuple[npt.NDArray[np.uint8], ...]:
    """Per colour channel, the blend of each (pixel value, heat level) pair; read-only.

    Entry ``value << 8 | level`` of a channel's table is ``value`` blended with
    that level's colour at alpha = level / 510 (half opacity at full heat),
    rounded: one look-up per pixel instead of integer arithmetic over the
    picture.
    """
    value = np.arange(256, dtype=np.int32)[:, None]
    level = np.arange(256, dtype=np.int32)[None, :]
    tables = tuple(
        ((value * (510 - level) + colour[None, :] * level + 255) // 510)
        .astype(np.uint8)
        .reshape(-1)
        for colour in _LUT[positive].T
    )
    for table in tables:
        table.setflags(write=False)
    return tables


@functools.lru_cache(maxsize=32)
def _scale(rows: int, size: int, positive: bool) -> npt.NDArray[np.uint8]:
    """Return the colour bar, labelled in % of the image's peak heat; read-only.

    Grad-CAM is relative: each heatmap is divided by its own maximum, so the
    scale reads from 100 % (the peak, top) through 50 % to 0 % (bottom).
    """
    bar_width = max(8, size)
    gap = max(2, bar_width // 4)
    labels = ("100 %", "50 %", "0 %")
    label_width = max(_width(text, size) for text in labels) + 2 * gap
    panel = Image.new("RGB", (gap + bar_width + label_width, rows))
    levels = np.rint(np.linspace(255.0, 0.0, rows)).astype(np.int32)
    bar = np.zeros((rows, bar_width, 3), np.uint8)
    bar[:] = _LUT[positive][levels][:, None, :]
    panel.paste(Image.fromarray(bar, "RGB"), (gap, 0))
    draw = ImageDraw.Draw(panel)
    x = gap + bar_width + gap
    for label, y in zip(labels, (0, (rows - size) // 2, rows - size - 2), strict=True):
        draw.text((x, y), label, fill=(255, 255, 255), font=_font(size))
    out = np.asarray(panel, dtype=np.uint8).copy()
    out.flags.writeable = False
    return out


def _caption(
    lines: Sequence[str], width: int, size: int, positive: bool
) -> npt.NDArray[np.uint8]:
    """Return a black band holding every line whole, the font shrunk to fit."""
    lines = [_drawable(line) for line in lines]
    while size > _MIN_FONT and max(_width(line, size) for line in lines) > width - 4:
        size -= 1
    fitted = [_fit(line, size, width - 4) for line in lines]
    height = len(fitted) * (size + 4) + 4
    band = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(band)
    y = 2
    for line in fitted:
        draw.text((2, y), line, fill=_CAPTION_COLOUR[positive], font=_font(size))
        y += size + 4
    return np.asarray(band, dtype=np.uint8)


def _fit(line: str, size: int, width: int) -> str:
    """Return the line, cut with "..." if it is still wider than the band."""
    if _width(line, size) <= width:
        return line
    while line and _width(line + "...", size) > width:
        line = line[:-1]
    return line + "..."
