"""Simulated nodules on real radiographs: a labelled DX set harder than the drawn one.

The generative model (documented in sample_dicoms/README.md):

Background. A real radiograph (DICOM; by default the chest CR that pydicom-data
ships) is decoded, its Modality LUT applied and MONOCHROME1 turned so that dense
is bright. Each image takes its own square crop of it (40-85 % of the shorter
side, anywhere in the image), flipped left-right half of the time, resized
(antialiased) to the output size and windowed between random low and high
percentiles of the crop (0.5-5 % and 95-99.5 %), so that 0 and 1 fall at
different tissue from image to image.

Nodule. A positive image carries one: a sphere's projection, lobulated (its
radius varies with the angle by up to +/-12 %, second and third harmonics) and
soft-edged (thickness ``(1 - (d / R)^2)^p`` with p 0.5-1.2), of radius 3.5-7 %
of the side and peak contrast 0.2-0.7 of the window (both log-uniform: a third
under 0.3, faint beside the ribs, vessels and the real masses of the chest). It
is added to the windowed background (radiographs store log exposure, where
attenuation adds), centred where the smoothed background lies between its 15th
and 60th percentiles (mostly lung: not air, bone or mediastinum) and away from
the border. It is drawn on a 4x finer grid and averaged down; the mask is every
pixel it changes.

Then a random gamma (0.75-1.35), Gaussian noise (sigma 0.005-0.02), a random gain
and offset into 12 bits and a stored window of its own (centre 45-55 %, width
95-120 % of the written range), and a third of the images stored MONOCHROME1.
Patients, studies, UIDs and lossless compression come from
``training.synthetic.write_set``, as for the drawn DX set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from scipy.ndimage import gaussian_filter  # type: ignore[import-untyped]

from inference import PreprocessError, decode_frames
from training.progress import Progress
from training.synthetic import dx_dataset, write_set

__all__ = [
    "PYDICOM_DATA",
    "PYDICOM_DATA_FILES",
    "Background",
    "Lesion",
    "View",
    "background_files",
    "draw_lesion",
    "draw_view",
    "lesion_profile",
    "load_backgrounds",
    "render",
    "synthesize_realistic",
]

# The name that stands for the radiographs pydicom-data installs.
PYDICOM_DATA = "pydicom-data"
# Real chest radiographs among pydicom-data's files: RG1_UNCR.dcm, a PA chest CR,
# 1955 x 1841, 15 bits, MONOCHROME1. Its other encodings (RG1_J2KR: the same
# pixels; RG1_UNCI / RG1_J2KI: a lossy copy) add no anatomy, and the only other
# large CR, RG3_*, is a lower leg; pydicom's own CR files are 16-32 px.
PYDICOM_DATA_FILES = ("RG1_UNCR.dcm",)

FloatImage = npt.NDArray[np.float64]
BoolImage = npt.NDArray[np.bool_]

_CROP = (0.4, 0.85)  # crop side, fraction of the background's shorter side
_LOW = (0.5, 5.0)  # window low end, percentile of the crop
_HIGH = (95.0, 99.5)  # window high end, percentile of the crop
_RADIUS = (0.035, 0.07)  # nodule radius, fraction of the side (log-uniform)
_CONTRAST = (0.2, 0.7)  # nodule peak, fraction of the window (log-uniform)
_EDGE = (0.5, 1.2)  # profile exponent: 0.5 a sphere's projection, higher softer
_LOBES = 0.12  # largest amplitude of each radial harmonic
_BAND = (15.0, 60.0)  # placement: percentiles of the smoothed background
_GAMMA = (0.75, 1.35)
_NOISE = (0.005, 0.02)
_SUPERSAMPLE = 4


@dataclass(frozen=True, slots=True)
class Background:
    """A real radiograph to crop from.

    Parameters
    ----------
    name
        Its file name (for the log and the manifest of sources).
    density
        Its pixels after the Modality LUT, dense bright (MONOCHROME2 sense).
    sop_class_uid, sop_instance_uid
        The source instance, referenced by the images made from it.
    """

    name: str
    density: npt.NDArray[np.float32]
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True, slots=True)
class View:
    """How one image is cut from a background and windowed.

    Parameters
    ----------
    background
        Index into the backgrounds.
    top, left, side
        The square crop, in background pixels.
    flip
        Mirrored left-right.
    low, high
        The window's ends, percentiles of the resized crop.
    gamma
        Tone curve applied after the window.
    noise
        Standard deviation of the added Gaussian noise (window units).
    noise_seed
        Seed of that noise, so an image renders the same with or without a lesion.
    """

    background: int
    top: int
    left: int
    side: int
    flip: bool
    low: float
    high: float
    gamma: float
    noise: float
    noise_seed: int


@dataclass(frozen=True, slots=True)
class Lesion:
    """A simulated nodule, in output pixels.

    Parameters
    ----------
    row, column
        Its centre.
    radius
        Its mean radius.
    contrast
        Its peak, as a fraction of the window.
    edge
        Exponent of the thickness profile (higher: softer edge).
    lobes
        (amplitude, phase) of the 2nd, 3rd ... radial harmonics.
    """

    row: float
    column: float
    radius: float
    contrast: float
    edge: float
    lobes: tuple[tuple[float, float], ...]


def background_files(source: str | Path) -> list[Path]:
    """Return the radiographs to use as backgrounds.

    Parameters
    ----------
    source
        ``pydicom-data`` for the chest radiographs pydicom-data installs
        (``PYDICOM_DATA_FILES``; nothing is downloaded), or a folder searched
        recursively for DICOM files.

    Returns
    -------
    list of pathlib.Path
        The files, sorted (their order fixes what a seed draws).

    Raises
    ------
    ValueError
        If ``source`` names no installed data or no folder, or the folder holds
        no DICOM file.
    """
    if str(source) == PYDICOM_DATA:
        from pydicom.data import get_testdata_file

        files = []
        for name in PYDICOM_DATA_FILES:
            found = get_testdata_file(name, download=False)
            if not isinstance(found, str):
                raise ValueError(
                    f"background: {name} is not installed; pip install pydicom-data"
                )
            files.append(Path(found))
        return files
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(
            f"background: expected a folder or {PYDICOM_DATA!r}, found {str(source)!r}"
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _is_dicom(p))
    if not files:
        raise ValueError(f"background: no DICOM file under {folder}")
    return files


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def load_backgrounds(files: Sequence[Path], size: int) -> list[Background]:
    """Decode the grayscale radiographs among ``files`` that are large enough.

    Parameters
    ----------
    files
        DICOM files.
    size
        The output side: a background's shorter side must be at least this.

    Returns
    -------
    list of Background
        One per usable file, in the order given (first frame of a multi-frame).

    Raises
    ------
    ValueError
        If no file is a grayscale image of at least ``size`` pixels a side.
    """
    backgrounds = []
    for path in files:
        try:
            ds = dcmread(path)
            photometric = str(ds.get("PhotometricInterpretation", "")).upper()
            if not photometric.startswith("MONOCHROME"):
                continue
            sop_class_uid, sop_instance_uid = (
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
            )
            frames, _ = decode_frames(ds)
        except (InvalidDicomError, PreprocessError, AttributeError, OSError):
            continue  # not an image instance: a folder may hold other files
        density = frames[0].astype(np.float32)
        if min(density.shape) < size:
            continue
        if photometric == "MONOCHROME1":
            density = density.max() - density
        backgrounds.append(
            Background(
                name=path.name,
                density=density,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
            )
        )
    if not backgrounds:
        raise ValueError(
            f"background: none of {len(files)} files is a grayscale image of at "
            f"least {size} x {size} pixels"
        )
    return backgrounds


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1])))


def draw_view(
    rng: np.random.Generator, backgrounds: Sequence[Background], size: int
) -> View:
    """Draw a crop, flip and window of one of ``backgrounds``.

    Parameters
    ----------
    rng
        Random generator.
    backgrounds
        The radiographs.
    size
        The output side (a crop is never smaller).

    Returns
    -------
    View
        The draw.
    """
    index = int(rng.integers(len(backgrounds)))
    height, width = backgrounds[index].density.shape
    shorter = min(height, width)
    side = max(size, round(rng.uniform(*_CROP) * shorter))
    return View(
        background=index,
        top=int(rng.integers(height - side + 1)),
        left=int(rng.integers(width - side + 1)),
        side=side,
        flip=bool(rng.random() < 0.5),
        low=float(rng.uniform(*_LOW)),
        high=float(rng.uniform(*_HIGH)),
        gamma=_log_uniform(rng, _GAMMA),
        noise=float(rng.uniform(*_NOISE)),
        noise_seed=int(rng.integers(2**31)),
    )


def _windowed(background: Background, view: View, size: int) -> FloatImage:
    crop = np.ascontiguousarray(
        background.density[
            view.top : view.top + view.side, view.left : view.left + view.side
        ]
    )
    resized = np.asarray(
        Image.fromarray(crop).resize(
            (size, size), Image.Resampling.LANCZOS, reducing_gap=3.0
        ),
        dtype=np.float64,
    )
    if view.flip:
        resized = resized[:, ::-1]
    low, high = np.percentile(resized, [view.low, view.high])
    return np.asarray((resized - low) / max(float(high - low), 1e-6))


def draw_lesion(rng: np.random.Generator, windowed: FloatImage) -> Lesion:
    """Draw a nodule and place it on the lung-like part of a windowed background.

    Parameters
    ----------
    rng
        Random generator.
    windowed
        The background as ``render`` windows it, before gamma and noise.

    Returns
    -------
    Lesion
        The draw.
    """
    size = windowed.shape[0]
    radius = _log_uniform(rng, _RADIUS) * size
    smooth = gaussian_filter(windowed, sigma=max(radius, 1.0))
    low, high = np.percentile(smooth, _BAND)
    margin = math.ceil(radius * (1 + 2 * _LOBES)) + 2
    inside = np.zeros_like(smooth, dtype=np.bool_)
    inside[margin : size - margin, margin : size - margin] = True
    candidates = np.argwhere(inside & (smooth >= low) & (smooth <= high))
    if not len(candidates):  # a flat crop: anywhere away from the border
        candidates = np.argwhere(inside)
    row, column = candidates[rng.integers(len(candidates))]
    return Lesion(
        row=float(row + rng.uniform(-0.5, 0.5)),
        column=float(column + rng.uniform(-0.5, 0.5)),
        radius=radius,
        contrast=_log_uniform(rng, _CONTRAST),
        edge=float(rng.uniform(*_EDGE)),
        lobes=tuple(
            (float(rng.uniform(0.0, _LOBES)), float(rng.uniform(0.0, 2 * np.pi)))
            for _ in range(2)
        ),
    )


def lesion_profile(lesion: Lesion, size: int) -> FloatImage:
    """Return the nodule's thickness in [0, 1] on a ``size`` x ``size`` grid.

    Drawn on a finer grid and averaged down: a pixel's value is the mean over
    it, exactly 0 where the nodule does not reach.

    Parameters
    ----------
    lesion
        The nodule.
    size
        The image side.

    Returns
    -------
    numpy.ndarray
        The profile, peaking near 1 at the centre.
    """
    k = _SUPERSAMPLE
    y, x = np.mgrid[0 : size * k, 0 : size * k].astype(np.float64)
    y = (y + 0.5) / k - 0.5 - lesion.row
    x = (x + 0.5) / k - 0.5 - lesion.column
    angle = np.arctan2(y, x)
    radius = lesion.radius * (
        1.0
        + sum(
            amplitude * np.cos((harmonic + 2) * angle + phase)
            for harmonic, (amplitude, phase) in enumerate(lesion.lobes)
        )
    )
    fine = np.clip(1.0 - (y**2 + x**2) / radius**2, 0.0, 1.0) ** lesion.edge
    return np.asarray(fine.reshape(size, k, size, k).mean(axis=(1, 3)))


def render(
    background: Background, view: View, size: int, lesion: Lesion | None
) -> tuple[FloatImage, BoolImage | None]:
    """Return the image in [0, 1] (dense bright) and the lesion's mask.

    Parameters
    ----------
    background
        The radiograph ``view`` cuts from.
    view
        Crop, flip, window, gamma and noise.
    size
        The output side.
    lesion
        The nodule, or None for a negative image.

    Returns
    -------
    tuple
        The image, and the mask (pixels the nodule changes) or None. Rendered
        with and without a lesion, the same view differs only inside the mask.
    """
    image = _windowed(background, view, size)
    mask: BoolImage | None = None
    if lesion is not None:
        profile = lesion_profile(lesion, size)
        image = image + lesion.contrast * profile
        mask = np.asarray(profile > 0.0)
    image = np.clip(image, 0.0, 1.0) ** view.gamma
    noise = np.random.default_rng(view.noise_seed).normal(0.0, view.noise, image.shape)
    return np.clip(image + noise, 0.0, 1.0), mask


def _derived(
    pixels: npt.NDArray[np.uint16],
    monochrome1: bool,
    view: View,
    background: Background,
    window: tuple[float, float],
) -> Dataset:
    ds = dx_dataset(pixels, monochrome1)
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = "crop of a real radiograph, simulated nodule"
    source = Dataset()
    source.ReferencedSOPClassUID = background.sop_class_uid
    source.ReferencedSOPInstanceUID = background.sop_instance_uid
    ds.SourceImageSequence = [source]
    # PS3.3 C.7.6.1.1.1: row direction first; a mirrored PA view runs to the right.
    ds.PatientOrientation = ["R" if view.flip else "L", "F"]
    ds.WindowCenter = round(window[0], 1)
    ds.WindowWidth = round(window[1], 1)
    return ds


def synthesize_realistic(
    out: Path,
    n: int,
    seed: int,
    background: str | Path = PYDICOM_DATA,
    size: int = 256,
    prevalence: float = 0.5,
    progress: Progress | None = None,
) -> Path:
    """Write ``n`` labelled DX images cut from real radiographs, masks and labels.csv.

    Parameters
    ----------
    out
        Output folder, laid out as ``training.synthetic.synthesize`` lays it.
    n
        Number of images.
    seed
        Seed: the same seed (and backgrounds) gives the same files.
    background
        ``pydicom-data`` or a folder of DICOM radiographs (see
        ``background_files``).
    size
        Image side in pixels (>= 32).
    prevalence
        Fraction of positive images (0 to 1).
    progress
        Called with 1 after each image written.

    Returns
    -------
    pathlib.Path
        The labels.csv written.

    Raises
    ------
    ValueError
        If an argument is out of range or no usable background is found.
    """
    if size < 32:
        raise ValueError(f"size: expected >= 32, found {size}")
    backgrounds = load_backgrounds(background_files(background), size)

    def make(
        rng: np.random.Generator, positive: bool
    ) -> tuple[Dataset, BoolImage | None]:
        view = draw_view(rng, backgrounds, size)
        source = backgrounds[view.background]
        lesion = draw_lesion(rng, _windowed(source, view, size)) if positive else None
        image, mask = render(source, view, size, lesion)
        gain = rng.uniform(2500.0, 3800.0)
        offset = rng.uniform(100.0, 4095.0 - gain - 100.0)
        stored = image * gain + offset
        centre = offset + gain * rng.uniform(0.45, 0.55)
        width = gain * rng.uniform(0.95, 1.2)
        monochrome1 = bool(rng.random() < 1 / 3)
        if monochrome1:  # the window is in stored values: it turns with them
            stored, centre = 4095.0 - stored, 4095.0 - centre
        pixels = np.round(stored).astype(np.uint16)
        return _derived(pixels, monochrome1, view, source, (centre, width)), mask

    return write_set(out, n, seed, "DX", make, prevalence, progress)
