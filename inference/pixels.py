"""Pixels without the model: decoding, windowing and the preprocessing contract.

What every side of the node shares that needs no PyTorch: the result builders
render source images with it, and :mod:`inference.preprocess` turns its output
into model input.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.processing import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
)

from inference.errors import ImageTooLargeError, PreprocessError, SourceChangedError

__all__ = [
    "FrameSource",
    "PreprocessSpec",
    "check_size",
    "decode_frames",
    "file_as_read",
    "file_identity_of",
    "render",
    "window",
]

FloatArray = npt.NDArray[np.float32]

_WINDOWS = ("auto", "minmax", "fixed")
_RESIZES = ("stretch", "letterbox")


@dataclass(frozen=True, slots=True)
class PreprocessSpec:
    """How pixels become model input; stored in the model artifact.

    Parameters
    ----------
    size
        Model input (height, width) in pixels.
    channels
        1 (grayscale) or 3; images are converted to match.
    window
        ``auto``: the file's VOI LUT or window, else min-max; ``minmax``: each
        frame's own range; ``fixed``: ``window_center`` / ``window_width`` (in
        Modality LUT units, e.g. Hounsfield units for CT).
    window_center
        Centre of the fixed window.
    window_width
        Width of the fixed window (>= 1).
    resize
        ``stretch`` to the size, or ``letterbox`` (keep the aspect ratio, pad black).
    mean
        Per-channel mean subtracted after scaling to [0, 1].
    std
        Per-channel standard deviation divided by after that.
    max_pixels
        Largest rows x columns x frames x samples accepted; checked before decoding.
    """

    size: tuple[int, int] = (224, 224)
    channels: int = 1
    window: str = "auto"
    window_center: float | None = None
    window_width: float | None = None
    resize: str = "stretch"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    max_pixels: int = 2**27

    def __post_init__(self) -> None:
        """Check every field; raise ValueError naming the bad one."""
        if min(self.size) < 8:
            raise ValueError(f"size: expected (height, width) >= 8, found {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, found {self.channels}")
        if self.window not in _WINDOWS:
            raise ValueError(
                f"window: expected one of {_WINDOWS}, found {self.window!r}"
            )
        if self.window == "fixed" and (
            self.window_center is None
            or self.window_width is None
            or self.window_width < 1
        ):
            raise ValueError(
                "window_center / window_width: a fixed window needs both, width >= 1"
            )
        if self.resize not in _RESIZES:
            raise ValueError(
                f"resize: expected one of {_RESIZES}, found {self.resize!r}"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean / std: expected one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: expected values > 0, found {self.std}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels: expected >= 1, found {self.max_pixels}")

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as plain JSON-able values."""
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """Build a spec from :meth:`to_dict` output.

        Parameters
        ----------
        data
            The mapping.

        Returns
        -------
        PreprocessSpec
            The checked spec.

        Raises
        ------
        ValueError
            If a key is unknown or a value out of range.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"preprocessing: unknown key(s) {sorted(unknown)}")
        values = dict(data)
        for key in ("size", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class FrameSource:
    """Where a model-input frame came from, and where its image lies in it.

    Parameters
    ----------
    sop_instance_uid
        The source instance.
    frame_index
        0-based frame number within the instance.
    rows
        Source image height.
    columns
        Source image width.
    box
        (top, left, height, width) of the image inside the model input; the rest
        is letterbox padding.
    """

    sop_instance_uid: str
    frame_index: int
    rows: int
    columns: int
    box: tuple[int, int, int, int]


_UNDEFINED_LENGTH = 0xFFFFFFFF  # PS3.5 7.1.1: encapsulated Pixel Data
_SLACK = 1024 * 1024


def check_size(ds: Dataset, max_pixels: int) -> None:
    """Refuse an image whose decoded size exceeds ``max_pixels`` (before decoding).

    Parameters
    ----------
    ds
        The data set.
    max_pixels
        Largest rows x columns x frames x samples accepted.

    Raises
    ------
    PreprocessError
        If the data set has no image.
    ImageTooLargeError
        If the image is too large.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PreprocessError("data set has no Pixel Data")
    try:
        rows = int(ds.Rows)
        columns = int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise PreprocessError(
            "Rows, Columns, Number of Frames or Samples per Pixel missing or invalid"
        ) from exc
    total = rows * columns * frames * samples
    if min(rows, columns, frames, samples) < 1:
        raise PreprocessError("image has a zero dimension")
    if total > max_pixels:
        raise ImageTooLargeError(
            f"image of {rows}x{columns} pixels x {frames} frames x {samples} samples "
            f"({total} values) exceeds the limit of {max_pixels}"
        )
    # A value not read yet (pydicom's defer_size) says how much reading it
    # would take: more than twice what the image can hold at 8 bytes a value
    # (Double Float Pixel Data), and a mebibyte, is not this image's.
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword not in ds:
            continue
        length = _stored_length(ds, keyword)
        if length is not None and length > 16 * total + _SLACK:
            raise ImageTooLargeError(
                f"{keyword} of {length} bytes for an image of {total} values"
            )


def _stored_length(ds: Dataset, keyword: str) -> int | None:
    """Return the bytes of a pixel value, read or not; None where it cannot be told."""
    elem = cast(
        "DataElement | RawDataElement", ds.get_item(keyword, keep_deferred=True)
    )
    if not isinstance(elem, RawDataElement):
        return len(elem.value or b"")
    if elem.length != _UNDEFINED_LENGTH:
        return int(elem.length)
    if elem.value is not None:
        return len(elem.value)
    # Encapsulated and left in the file: at most the rest of the file (the
    # one open to be read from, see file_as_read).
    buffer = getattr(ds, "buffer", None)
    try:
        if buffer is not None:
            size = os.fstat(buffer.fileno()).st_size
        elif isinstance(ds.filename, str):
            size = os.path.getsize(ds.filename)
        else:
            return None
    except (OSError, AttributeError):
        return None  # its reading says why
    return size - int(elem.value_tell)


def file_identity_of(fd: int) -> tuple[int, int, int, int]:
    """Return what tells an open file from another: device, inode, size, mtime (ns)."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def file_as_read(ds: Dataset) -> Iterator[None]:
    """Read the values a data set left in its file from that file as it was read.

    pydicom reads a value left in the file (``defer_size``) by opening the
    file's path again: a file replaced since (an instance stored again) would
    have its Pixel Data read, however long, past :func:`check_size`. pydicom 3
    reads it from the data set's ``buffer`` instead while that is open (its
    Dataset.__getitem__): the path is opened here, the file checked to be the
    one read, and read from. The one read: the data set's
    ``stored_file_identity`` where its reader set it (:func:`file_identity_of`
    of the file it read), else the modification time pydicom recorded.

    Raises
    ------
    SourceChangedError
        If the file is another one now.
    """
    filename = getattr(ds, "filename", None)
    timestamp = getattr(ds, "timestamp", None)
    expected = getattr(ds, "stored_file_identity", None)
    if (
        not isinstance(filename, str)
        or (timestamp is None and expected is None)
        or getattr(ds, "buffer", None) is not None
    ):
        yield  # read from memory, or from a buffer it holds
        return
    with open(filename, "rb") as f:
        if expected is not None:
            same = file_identity_of(f.fileno()) == expected
        else:
            same = os.fstat(f.fileno()).st_mtime == timestamp
        if not same:
            raise SourceChangedError(
                "the file was replaced between reading its data set and its values"
            )
        ds.buffer = f
        try:
            yield
        finally:
            ds.buffer = None


def decode_frames(ds: Dataset, max_pixels: int = 2**27) -> tuple[FloatArray, bool]:
    """Decode pixels into float32 frames.

    Grayscale comes back as [F, H, W] in Modality LUT units (rescale slope and
    intercept, or the Modality LUT Sequence); colour (RGB, YBR_*, PALETTE COLOR)
    as [F, H, W, 3] scaled to [0, 1].

    Parameters
    ----------
    ds
        The data set; any transfer syntax pydicom decodes with its plugins.
    max_pixels
        Size limit, checked before decoding.

    Returns
    -------
    tuple of (numpy.ndarray, bool)
        The frames and whether they are colour.

    Raises
    ------
    PreprocessError
        If there is no image, it cannot be decoded, or its layout is unsupported.
    """
    with file_as_read(ds):
        return _decode(ds, max_pixels)


def _decode(ds: Dataset, max_pixels: int) -> tuple[FloatArray, bool]:
    check_size(ds, max_pixels)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        arr = ds.pixel_array  # YBR_* comes back as RGB
    except (ValueError, NotImplementedError, RuntimeError, AttributeError) as exc:
        raise PreprocessError(
            f"cannot decode Pixel Data ({type(exc).__name__})"
        ) from exc
    if photometric == "PALETTE COLOR":
        try:
            _check_segmented_palette(ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            rgb = apply_color_lut(arr, ds).astype(np.float32) / float(2**bits - 1)
        except (ValueError, TypeError, AttributeError, IndexError) as exc:
            raise PreprocessError(
                f"cannot apply the palette ({type(exc).__name__}"
                + (f": {exc}" if isinstance(exc, PreprocessError) else "")
                + ")"
            ) from exc
        return _frames_first(rgb, frames, color=True), True
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 3:
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
        rgb = arr.astype(np.float32) / float(2**bits - 1)
        return _frames_first(rgb, frames, color=True), True
    if samples != 1:
        raise PreprocessError(f"Samples per Pixel {samples} is not supported")
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    return _frames_first(values, frames, color=False), False


# Most entries a palette colour LUT has (PS3.3 C.7.6.3.1.5: 0 means 65536).
_LUT_ENTRIES = 65536


def _check_segmented_palette(ds: Dataset) -> None:
    """Refuse a Segmented Palette Color LUT that expands past its LUT's size.

    pydicom expands each segment as it reads it (PS3.3 C.7.9.2): a linear
    segment of 6 bytes becomes up to 65,535 entries, and 10 KB of them once
    took 627 MB. Each segment's length is read here first, in pydicom's
    layout (8- or 16-bit words, as the LUT Descriptor says): discrete (0) and
    linear (1) add theirs, indirect (2) those of the segments it points at.

    Raises
    ------
    PreprocessError
        If the entries would exceed the LUT Descriptor's, or a segment is not
        understood.
    """
    # As read (pydicom keeps an OW value in its file's byte order).
    little = getattr(ds, "original_encoding", (None, True))[1] is not False
    for colour in ("Red", "Green", "Blue"):
        data = ds.get(f"Segmented{colour}PaletteColorLookupTableData")
        if data is None:
            continue
        descriptor = ds.get(f"{colour}PaletteColorLookupTableDescriptor")
        entries = int(descriptor[0]) if descriptor else 0
        limit = entries or _LUT_ENTRIES
        eight = bool(descriptor) and int(descriptor[2]) == 8
        kind = "u1" if eight else ("<u2" if little else ">u2")
        raw = bytes(data)
        words = np.frombuffer(raw[: len(raw) // 2 * 2] if not eight else raw, kind)
        found = _segments(
            words, 0, len(words), limit, eight=eight, little=little, top=True
        )
        if found > limit:
            raise PreprocessError(
                f"its segmented {colour.lower()} LUT expands to over {limit} entries"
            )


def _segments(
    words: npt.NDArray[Any],
    start: int,
    count: int,
    limit: int,
    *,
    eight: bool,
    little: bool,
    top: bool,
) -> int:
    """Sum the entries of up to ``count`` segments from word ``start``.

    Stops once past ``limit``. An indirect segment's offset indexes the words,
    as pydicom reads it; one inside the segments another copies is refused.
    """
    total, i, seen = 0, start, 0
    while i + 1 < len(words) and seen < count and total <= limit:
        op, n = int(words[i]), int(words[i + 1])
        if op == 0:  # discrete: n values follow
            total, i = total + n, i + 2 + n
        elif op == 1:  # linear: to one value, n entries
            total, i = total + n, i + 3
        elif op == 2 and top and i + (5 if eight else 3) < len(words):
            if eight:
                order = (3, 2, 1, 0) if little else (2, 3, 0, 1)
                b = [int(words[i + 2 + k]) for k in order]
                offset = (b[0] << 8 | b[1]) << 16 | (b[2] << 8 | b[3])
                step = 6
            else:
                offset = int(words[i + 3]) << 16 | int(words[i + 2])
                step = 4
            total += _segments(
                words, offset, n, limit - total, eight=eight, little=little, top=False
            )
            i += step
        else:
            raise PreprocessError(f"segment type {op} is not understood here")
        seen += 1
    return total


def _frames_first(arr: npt.NDArray[Any], frames: int, *, color: bool) -> FloatArray:
    single_ndim = 3 if color else 2
    if arr.ndim == single_ndim:
        arr = arr[None]
    if arr.ndim != single_ndim + 1 or arr.shape[0] != frames:
        raise PreprocessError(f"unexpected pixel array shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def window(values: FloatArray, ds: Dataset, spec: PreprocessSpec) -> FloatArray:
    """Grayscale [F, H, W] in Modality LUT units -> [0, 1] by the spec's VOI rule."""
    if (
        spec.window == "fixed"
        and spec.window_center is not None
        and spec.window_width is not None
    ):
        return _linear(values, spec.window_center, spec.window_width)
    if spec.window == "auto":
        if "VOILUTSequence" in ds:
            item = ds.VOILUTSequence[0]
            bits = int(item.LUTDescriptor[2])
            # A LUT is indexed by stored (integer) values: round, do not truncate.
            indices = np.rint(values).astype(np.int64)
            out = apply_voi_lut(indices, ds, index=0, prefer_lut=True)
            return np.asarray(out, dtype=np.float32) / float(2**bits - 1)
        center = _first(ds.get("WindowCenter"))
        width = _first(ds.get("WindowWidth"))
        if center is not None and width is not None and width >= 1:
            function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
            if function == "SIGMOID":
                return _f32(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)))
            if function == "LINEAR_EXACT":
                return _f32(np.clip((values - center) / width + 0.5, 0.0, 1.0))
            return _linear(values, center, width)
    low = values.min(axis=(1, 2), keepdims=True)
    high = values.max(axis=(1, 2), keepdims=True)
    span = np.where(high > low, high - low, 1.0)
    return _f32((values - low) / span)


def _linear(values: FloatArray, center: float, width: float) -> FloatArray:
    # PS3.3 C.11.2.1.2.1, LINEAR: (x - (c - 0.5)) / (w - 1) + 0.5, clipped.
    if width <= 1:
        return _f32(values > center - 0.5)
    return _f32(np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0))


def _f32(values: object) -> FloatArray:
    return np.asarray(values, dtype=np.float32)


def _first(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def render(
    ds: Dataset, frame: int = 0, max_pixels: int = 2**27
) -> npt.NDArray[np.uint8]:
    """Render one frame for display, as a viewer would show it by default.

    Modality LUT, the file's own VOI (LUT or first window; min-max without one),
    MONOCHROME1 shown inverted, colour kept.

    Parameters
    ----------
    ds
        The data set.
    frame
        Frame index (0 for single-frame images).
    max_pixels
        Size limit, checked before decoding.

    Returns
    -------
    numpy.ndarray
        uint8 [rows, columns] for grayscale, [rows, columns, 3] RGB for colour.

    Raises
    ------
    PreprocessError
        If the image cannot be decoded or has no such frame.
    """
    values, color = decode_frames(ds, max_pixels)
    if not 0 <= frame < values.shape[0]:
        raise PreprocessError(f"frame {frame} out of range 0..{values.shape[0] - 1}")
    if color:
        scaled = values[frame]
    else:
        scaled = window(values[frame : frame + 1], ds, PreprocessSpec())[0]
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            scaled = 1.0 - scaled
    return np.asarray(np.rint(np.clip(scaled, 0.0, 1.0) * 255), dtype=np.uint8)
