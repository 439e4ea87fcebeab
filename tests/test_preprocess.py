"""Preprocessing on the real files that pydicom and pydicom-data ship."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID, RLELossless

from dicom_node.storage import read_stored
from inference import (
    ImageTooLargeError,
    PreprocessError,
    PreprocessSpec,
    SourceChangedError,
    check_size,
    decode_frames,
    heatmap_to_source,
)
from inference.preprocess import preprocess
from tests.factories import corpus_file, make_ct

# mean 0 / std 1: the output is the [0, 1] image itself, easy to reason about.
UNIT = PreprocessSpec(size=(64, 64), channels=1, mean=(0.0,), std=(1.0,))
UNIT_RGB = PreprocessSpec(size=(64, 64), channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)


def load(name: str) -> Dataset:
    return dcmread(corpus_file(name))


def test_ct_small_modality_lut_matches_pydicom() -> None:
    ds = load("CT_small.dcm")

    values, color = decode_frames(ds)

    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    assert not color
    assert values.shape == (1, 128, 128)
    np.testing.assert_array_equal(values[0], expected)
    assert ds.RescaleIntercept != 0 or ds.RescaleSlope != 1  # the LUT did something


def test_modality_lut_sequence_is_applied() -> None:
    ds = load("mlut_18.dcm")

    values, _ = decode_frames(ds)

    np.testing.assert_array_equal(values[0], apply_modality_lut(ds.pixel_array, ds))


def test_monochrome1_chest_comes_out_with_air_dark() -> None:
    ds = load("RG1_UNCI.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"

    image = preprocess(
        ds, PreprocessSpec(size=(128, 128), mean=(0.0,), std=(1.0,))
    ).pixels[0, 0]

    # The air in the lungs is dark, the mediastinum and spine between them bright
    # (inverting MONOCHROME1 wrongly swaps the two).
    lungs = torch.cat([image[32:56, 28:44].flatten(), image[32:56, 84:100].flatten()])
    mediastinum = image[32:56, 58:70]
    assert mediastinum.mean() > lungs.mean() + 0.15


def test_lossless_syntaxes_give_identical_tensors() -> None:
    reference = preprocess(load("MR_small.dcm"), UNIT).pixels
    for name in (
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
    ):
        torch.testing.assert_close(
            preprocess(load(name), UNIT).pixels, reference, msg=name
        )


def test_htj2k_decodes_like_the_uncompressed_image() -> None:
    # A Part 1 codestream under the HTJ2K Lossless syntax (PS3.5 A.4.11 admits it).
    ds = load("MR_small_jp2klossless.dcm")
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.201")

    torch.testing.assert_close(
        preprocess(ds, UNIT).pixels, preprocess(load("MR_small.dcm"), UNIT).pixels
    )


def test_voi_lut_sequence_is_applied() -> None:
    ds = load("vlut_04.dcm")
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])

    image = preprocess(
        ds, PreprocessSpec(size=(512, 512), mean=(0.0,), std=(1.0,))
    ).pixels[0, 0]

    expected = apply_voi_lut(
        apply_modality_lut(ds.pixel_array, ds), ds, prefer_lut=True
    ) / (2**bits - 1)
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-6)
    assert image.max() > 0.5  # the LUT spreads the 8-bit input


def test_lossy_syntaxes_give_nearly_the_same_tensor() -> None:
    rgb = preprocess(load("SC_rgb.dcm"), UNIT_RGB).pixels
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jls_lossy_line.dcm"):  # JPEG, JPEG-LS
        other = preprocess(load(name), UNIT_RGB).pixels
        assert (other - rgb).abs().mean() < 0.01, name
    gray = preprocess(load("693_UNCI.dcm"), UNIT).pixels
    j2k = preprocess(load("693_J2KI.dcm"), UNIT).pixels  # JPEG 2000 lossy
    assert (j2k - gray).abs().mean() < 0.02


def test_multiframe_is_split_into_frames() -> None:
    ds = load("emri_small.dcm")

    frames = preprocess(ds, UNIT)

    assert frames.pixels.shape == (10, 1, 64, 64)
    assert [s.frame_index for s in frames.sources] == list(range(10))
    assert {s.sop_instance_uid for s in frames.sources} == {ds.SOPInstanceUID}
    assert frames.pixels.min() >= 0.0
    assert frames.pixels.max() <= 1.0


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb.dcm",
        "SC_ybr_full_uncompressed.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
        "OBXXXX1A.dcm",
    ],
)
def test_colour_files_become_rgb_in_range(name: str) -> None:
    ds = load(name)

    frames = preprocess(ds, UNIT_RGB)

    assert frames.pixels.shape == (1, 3, 64, 64)
    assert frames.pixels.min() >= 0.0
    assert frames.pixels.max() <= 1.0
    assert frames.pixels.std() > 0.05  # an image, not a constant


def test_ybr_matches_rgb() -> None:
    rgb = preprocess(load("SC_rgb.dcm"), UNIT_RGB).pixels
    ybr = preprocess(load("SC_ybr_full_uncompressed.dcm"), UNIT_RGB).pixels

    assert (rgb - ybr).abs().max() < 0.02


def test_palette_colour_is_looked_up() -> None:
    ds = load("OBXXXX1A.dcm")
    assert ds.PhotometricInterpretation == "PALETTE COLOR"

    values, color = decode_frames(ds)

    assert color
    assert values.shape == (1, 600, 800, 3)
    assert not np.array_equal(values[..., 0], values[..., 1])  # real colour


def test_colour_to_one_channel_and_gray_to_three() -> None:
    assert preprocess(load("SC_rgb.dcm"), UNIT).pixels.shape == (1, 1, 64, 64)
    gray3 = preprocess(load("CT_small.dcm"), UNIT_RGB).pixels
    assert gray3.shape == (1, 3, 64, 64)
    torch.testing.assert_close(gray3[:, 0], gray3[:, 2])


def test_fixed_window_in_hounsfield_units() -> None:
    ds = make_ct(rows=32, columns=32)
    ds.PixelData = (
        np.array([[-1000, 40, 500, 2000]] * 4, dtype=np.int16)
        .repeat(8, axis=1)
        .repeat(8, axis=0)
        .tobytes()
    )
    spec = PreprocessSpec(
        size=(32, 32),
        window="fixed",
        window_center=40,
        window_width=400,
        mean=(0.0,),
        std=(1.0,),
    )

    image = preprocess(ds, spec).pixels[0, 0]

    # Air below the window is black, 40 HU mid-grey, 500 and 2000 HU white.
    assert image[0, 0].item() == 0.0
    assert abs(image[0, 12].item() - 0.5) < 0.01
    assert image[0, 20].item() == 1.0
    assert image[0, 28].item() == 1.0


def test_letterbox_keeps_the_aspect_ratio() -> None:
    ds = load("JPEG2000.dcm")  # 1024 x 256
    spec = PreprocessSpec(size=(64, 64), resize="letterbox", mean=(0.0,), std=(1.0,))

    frames = preprocess(ds, spec)

    top, left, height, width = frames.sources[0].box
    assert (top, height) == (0, 64)
    assert width == 16
    assert left == 24
    assert frames.pixels[0, 0, :, :left].abs().max() == 0  # padding is black
    heatmap = torch.zeros(64, 64)
    heatmap[:, left : left + width] = 1.0
    back = heatmap_to_source(heatmap, frames.sources[0])
    assert back.shape == (1024, 256)
    assert back.min() == 1.0  # the image's own region maps onto the whole source


def test_normalisation_uses_mean_and_std() -> None:
    spec = PreprocessSpec(size=(64, 64), mean=(0.5,), std=(0.25,))
    unit = preprocess(load("CT_small.dcm"), UNIT).pixels

    normalised = preprocess(load("CT_small.dcm"), spec).pixels

    torch.testing.assert_close(normalised, (unit - 0.5) / 0.25)


def test_oversized_image_is_refused_before_decoding() -> None:
    ds = make_ct(rows=16, columns=16)
    ds.Rows = 60000
    ds.Columns = 60000
    ds.NumberOfFrames = 1000  # ~3.6e12 values; the Pixel Data is tiny and wrong

    with pytest.raises(ImageTooLargeError, match="exceeds the limit"):
        preprocess(ds, UNIT)


@pytest.mark.parametrize("encapsulated", [False, True])
@pytest.mark.parametrize("deferred", [True, False])
def test_pixel_data_far_larger_than_its_image_is_refused_before_it_is_read(
    tmp_path: Path, deferred: bool, encapsulated: bool
) -> None:
    # 16x16 pixels claim 256 values; 8 MB of Pixel Data is not theirs (read
    # whole, a few gigabytes would have been). Left in the file, it stays there.
    ds = make_ct(rows=16, columns=16)
    if encapsulated:
        ds.PixelData = encapsulate([bytes(8 * 1024 * 1024)])
        ds.file_meta.TransferSyntaxUID = RLELossless
    else:
        ds.PixelData = bytes(8 * 1024 * 1024)
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    read = dcmread(path, defer_size=1024 * 1024 if deferred else None)

    with pytest.raises(ImageTooLargeError, match=r"PixelData of 83886\d\d bytes"):
        check_size(read, 10**9)
    assert (read.get_item("PixelData", keep_deferred=True).value is None) is deferred


def test_pixels_are_read_from_the_file_read_never_from_one_that_replaced_it(
    tmp_path: Path,
) -> None:
    # The node stores an instance sent again by replacing its file. A job that
    # read the first data set must not decode the copy's Pixel Data (read
    # past check_size, whatever its length): it is told to read again.
    first = make_ct(rows=1024, columns=1024, seed=1)  # 2 MiB: left in the file
    path = tmp_path / "ct.dcm"
    first.save_as(path, enforce_file_format=True)
    read = dcmread(path, defer_size=1024 * 1024)
    copy = make_ct(rows=4096, columns=2048, seed=2)  # 16 MiB, the same layout
    copy.SOPInstanceUID = first.SOPInstanceUID
    copy.save_as(tmp_path / "copy.dcm", enforce_file_format=True)
    stat = path.stat()
    os.utime(tmp_path / "copy.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**6))
    os.replace(tmp_path / "copy.dcm", path)

    with pytest.raises(SourceChangedError, match="replaced between reading"):
        decode_frames(read, 10**9)
    assert read.get_item("PixelData", keep_deferred=True).value is None

    again = dcmread(path, defer_size=1024 * 1024)
    frames, _ = decode_frames(again, 10**9)
    assert frames.shape == (1, 4096, 2048)


def test_a_replacing_copy_with_the_same_modification_time_is_told_apart(
    tmp_path: Path,
) -> None:
    # The node reads a stored instance with the identity of the file it read
    # (device, inode, size, time): a copy that keeps the first's time (a
    # coarse clock, a copy that keeps its times) is another file all the same.
    first = make_ct(rows=1024, columns=1024, seed=1)
    path = tmp_path / "ct.dcm"
    first.save_as(path, enforce_file_format=True)
    read = read_stored(path)
    copy = make_ct(rows=4096, columns=2048, seed=2)
    copy.save_as(tmp_path / "copy.dcm", enforce_file_format=True)
    stat = path.stat()
    os.utime(tmp_path / "copy.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(tmp_path / "copy.dcm", path)

    with pytest.raises(SourceChangedError, match="replaced between reading"):
        decode_frames(read, 10**9)
    assert read.get_item("PixelData", keep_deferred=True).value is None


def test_a_palette_image_without_its_palette_is_a_clear_error() -> None:
    # A stored instance is read without its values over 1 MiB (a palette that
    # long is none a real image has): the image says what is missing.
    ds = dcmread(corpus_file("examples_palette.dcm"))
    del ds.RedPaletteColorLookupTableData

    with pytest.raises(PreprocessError, match="cannot apply the palette"):
        decode_frames(ds, 10**9)


def test_a_segmented_palette_that_expands_past_its_lut_is_refused_unexpanded() -> None:
    # 6 bytes of a linear segment expand to 65,535 entries: 10 KB of them
    # once took 627 MB. The palette says 256 entries.
    ds = dcmread(corpus_file("examples_palette.dcm"))
    words = np.array([0, 1, 0] + [1, 65535, 65535] * 1000, "<u2").tobytes()
    for colour in ("Red", "Green", "Blue"):
        delattr(ds, f"{colour}PaletteColorLookupTableData")
        ds.add_new(f"Segmented{colour}PaletteColorLookupTableData", "OW", words)

    with pytest.raises(PreprocessError, match="expands to over 256 entries"):
        decode_frames(ds, 10**9)


def test_a_segmented_palette_is_applied() -> None:
    ds = dcmread(corpus_file("examples_palette.dcm"))
    expected, _ = decode_frames(ds, 10**9)
    for colour in ("Red", "Green", "Blue"):
        lut = np.frombuffer(ds[f"{colour}PaletteColorLookupTableData"].value, "<u2")
        words = [0, 256, *(int(v) for v in lut)]  # one discrete segment
        delattr(ds, f"{colour}PaletteColorLookupTableData")
        ds.add_new(
            f"Segmented{colour}PaletteColorLookupTableData",
            "OW",
            np.array(words, "<u2").tobytes(),
        )

    frames, color = decode_frames(ds, 10**9)

    assert color
    np.testing.assert_array_equal(frames, expected)


def test_pixel_data_a_little_longer_than_its_image_is_not_refused_for_it() -> None:
    ds = make_ct(rows=16, columns=16)
    ds.PixelData = bytes(16 * 16 * 2 + 1000)  # a vendor's padding
    check_size(ds, 10**9)


def test_no_pixel_data_is_a_clear_error() -> None:
    ds = make_ct()
    del ds.PixelData

    with pytest.raises(PreprocessError, match="no Pixel Data"):
        check_size(ds, 10**9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 2}, "channels"),
        ({"window": "bright"}, "window"),
        ({"window": "fixed"}, "fixed window"),
        ({"resize": "crop"}, "resize"),
        ({"mean": (0.1, 0.2)}, "mean / std"),
        ({"size": (4, 4)}, "size"),
    ],
)
def test_bad_spec_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreprocessSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_round_trips_through_a_dict() -> None:
    spec = PreprocessSpec(
        size=(96, 128),
        channels=3,
        window="fixed",
        window_center=-600,
        window_width=1500,
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.2, 0.3),
        resize="letterbox",
    )

    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown key"):
        PreprocessSpec.from_dict({**spec.to_dict(), "gamma": 2})
