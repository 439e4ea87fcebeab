"""SR, Secondary Captures and Parametric Maps: valid, honest, readable."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
)

from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.results import NOT_FOR_DIAGNOSIS, NodeIdentity, ResultSet
from dicom_node.results.build import build_results
from dicom_node.results.builder import BuildRequest, ResultBuilder
from dicom_node.results.naming import yes_or_no
from dicom_node.results.render import overlay, pixel_aspect
from dicom_node.results.sr import POINT_MEANING
from dicom_node.results.store import identifying_capture, write_result_files
from dicom_node.score import sr_text
from dicom_node.storage import read_stored
from inference import Classifier, ModelArtifact, StudyPrediction
from tests.factories import corpus_file, dcmtk, make_artifact, make_ct

REPO = Path(__file__).resolve().parent.parent
NODE = NodeIdentity("DICOMNODE", "2.25.777")
HIGHDICOM_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"

# dciodvfy warnings that describe the source's own values, which results copy
# verbatim so that Patient and Study match, or an honest "unknown".
ALLOWED_WARNINGS = (
    "Retired Person Name form",  # e.g. Referring Physician "ward" in a real CR
    "Laterality(0020,0060)> - is only permitted to be empty when actually unknown",
    # A Parametric Map's Derived Pixel Contrast (README, Results: no standard
    # Defined Term describes a Grad-CAM map).
    "(0008,0008)[4]> - Unrecognized defined term = <QUANTITY>",
    "(0008,9007)[4]> - Unrecognized defined term = <QUANTITY>",
)


def sources(kind: str) -> list[Dataset]:
    if kind == "CT":
        first = make_ct(rows=96, columns=80, seed=1)
        second = make_ct(rows=96, columns=80, seed=2)
        second.StudyInstanceUID = first.StudyInstanceUID
        return [first, second]
    if kind == "DX":
        return [dcmread(next((REPO / "sample_dicoms" / "dx").rglob("*.dcm")))]
    if kind == "CR MONOCHROME1":
        cr = dcmread(corpus_file("RG1_UNCI.dcm"))
        assert cr.PhotometricInterpretation == "MONOCHROME1"
        return [cr]
    if kind == "MR":
        return [dcmread(corpus_file("MR_small.dcm"))]
    if kind == "MR multi-frame":
        return [dcmread(corpus_file("emri_small.dcm"))]
    # A source missing what real sources often miss.
    ds = make_ct(rows=64, columns=64, seed=3)
    for keyword in ("PatientBirthDate", "AccessionNumber", "BodyPartExamined"):
        if keyword in ds:
            del ds[keyword]
    return [ds]


def artifact(nodule: bool = True, effusion: bool = True) -> ModelArtifact:
    """The test model, each label forced present (threshold 0.001) or absent."""
    model = make_artifact()
    first, second = model.labels
    model.labels = (
        replace(first, threshold=0.001 if nodule else 0.999),
        replace(second, threshold=0.001 if effusion else 0.999),
    )
    return model


def predict(
    datasets: list[Dataset], model: ModelArtifact | None = None, top_k: int = 1
) -> StudyPrediction:
    return Classifier(model or artifact(), "cpu").predict(datasets, explain_top_k=top_k)


def results(
    kind: str,
    run: int = 1,
    model: ModelArtifact | None = None,
    *,
    jpeg: bool = False,
    parametric_map: bool = False,
    explain_absent: bool = False,
) -> tuple[ResultSet, Dataset]:
    datasets = sources(kind)
    prediction = predict(datasets, model)
    result = build_results(
        datasets,
        prediction,
        run,
        node=NODE,
        jpeg=jpeg,
        parametric_map=parametric_map,
        explain_absent=explain_absent,
    )
    return result, datasets[0]


def dciodvfy_problems(path: Path) -> list[str]:
    done = subprocess.run(
        ["/usr/bin/dciodvfy", "-new", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.startswith(("Error", "Warning"))
        and not any(allowed in line for allowed in ALLOWED_WARNINGS)
    ]


def written(result: ResultSet, folder: Path) -> list[Path]:
    """Write the result set as the node does; return its files, SR last."""
    write_result_files(folder, result, png=False)
    return [
        *sorted(folder.glob("sc-*.dcm")),
        *sorted(folder.glob("pm-*.dcm")),
        folder / "sr.dcm",
    ]


def _find(ds: Dataset, code: str, value_type: str | None = None) -> Dataset:
    for item in ds.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if (
            name
            and name[0].CodeValue == code
            and (value_type is None or item.ValueType == value_type)
        ):
            return item  # type: ignore[no-any-return]
        try:
            return _find(item, code, value_type)
        except LookupError:
            continue
    raise LookupError(code)


@pytest.mark.parametrize("kind", ["CT", "DX", "CR MONOCHROME1", "MR", "sparse"])
def test_every_object_is_valid_and_the_sr_reads_as_a_report(
    kind: str, tmp_path: Path
) -> None:
    result, source = results(kind, jpeg=kind == "DX")
    assert len(result.captures) == 2  # the top image of each of the two labels
    paths = written(result, tmp_path)
    for path in paths:
        assert dciodvfy_problems(path) == [], path.name
        ds = dcmread(path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID

    html = subprocess.run(
        [dcmtk("dsr2html"), str(paths[-1])], capture_output=True, text=True, check=True
    ).stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    for expected in (
        "Imaging Measurement Report",
        "UNVERIFIED",
        "AI Results: test",
        "Nodule: Present (probability",
        "Pleural effusion:",
        "operating threshold 0.1 %",
        "model test 0",
        "Image Library",
    ):
        assert expected in text, expected

    report = dcmread(paths[-1])
    parsed = hd.sr.Comprehensive3DSR.from_dataset(report, copy=True)
    assert parsed.VerificationFlag == "UNVERIFIED"
    measurement = _find(report, "122157")
    probability = float(measurement.MeasuredValueSequence[0].NumericValue)
    assert 0.0 <= probability <= 100.0
    evaluation = _find(report, "27925004", value_type="CODE")
    assert evaluation.ConceptCodeSequence[0].CodeMeaning == "Present"


@pytest.mark.parametrize("kind", ["CT", "DX"])
def test_every_object_names_this_node_and_the_model_never_the_library(
    kind: str, tmp_path: Path
) -> None:
    result, source = results(kind, parametric_map=True)
    assert len(result.datasets) >= 3
    for path in written(result, tmp_path):
        ds = dcmread(path)
        meta = ds.file_meta
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID, path.name
        assert meta.ImplementationClassUID not in (
            HIGHDICOM_IMPLEMENTATION_UID,
            PYDICOM_IMPLEMENTATION_UID,
        )
        assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
        # General Equipment: the node.
        assert ds.Manufacturer == "dicom-node"
        assert ds.ManufacturerModelName == "dicom-node"
        assert str(ds.SoftwareVersions).startswith("dicom-node ")
        assert ds.DeviceUID == NODE.device_uid
        assert ds.StationName == NODE.station
        # Contributing Equipment: the source's acquisition (where it names a
        # manufacturer) and the model, with its own Device UID; no library.
        items = ds.ContributingEquipmentSequence
        assert not any("ighdicom" in str(i.get("Manufacturer")) for i in items)
        model = items[-1]
        assert model.ManufacturerModelName == "test"
        assert model.DeviceSerialNumber == "2.25.42"  # its Device UID
        assert model.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        if "Manufacturer" in source and ds.Modality != "SR":
            assert items[0].Manufacturer == source.Manufacturer
            assert items[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109101"


def test_patient_and_study_are_carried_whole_into_every_object(tmp_path: Path) -> None:
    (source,) = sources("MR")
    source.IssuerOfPatientID = "HOSPITAL-A"
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = "1.2.3.4.5"
    qualifiers.UniversalEntityIDType = "ISO"
    qualifiers.IdentifierTypeCode = "MR"
    source.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    other = Dataset()
    other.PatientID = "778899"
    other.IssuerOfPatientID = "HOSPITAL-B"
    other.TypeOfPatientID = "TEXT"
    source.OtherPatientIDsSequence = [other]
    source.PatientAge = "042Y"
    source.StudyDescription = "Brain MR"
    prediction = predict([source])
    result = build_results([source], prediction, 1, node=NODE, parametric_map=True)
    assert result.maps
    assert result.captures
    for path in written(result, tmp_path):
        ds = dcmread(path)
        for keyword in (
            "PatientName",
            "PatientID",
            "IssuerOfPatientID",
            "PatientBirthDate",
            "PatientSex",
            "PatientAge",
            "StudyInstanceUID",
            "StudyDate",
            "StudyTime",
            "StudyID",
            "AccessionNumber",
            "StudyDescription",
            "ReferringPhysicianName",
        ):
            assert ds.get(keyword) == source.get(keyword), (path.name, keyword)
        assert ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == (
            "1.2.3.4.5"
        )
        assert ds.OtherPatientIDsSequence[0].PatientID == "778899"
        assert ds.OtherPatientIDsSequence[0].IssuerOfPatientID == "HOSPITAL-B"
        assert dciodvfy_problems(path) == [], path.name


def test_a_results_process_keeps_data_values_out_of_the_log(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # pydicom warns about an invalid value it reads by quoting it. In a results
    # process as in the node, its record goes through the node's filters: the
    # text is withheld.
    source = make_ct(rows=64, columns=64, seed=4)
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        source.FrameOfReferenceUID = "1.2.bad-value"
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    prediction = predict([dcmread(path)])
    capfd.readouterr()
    builder = ResultBuilder(1, log_level="INFO")
    try:
        builder.build(BuildRequest((path,), prediction, 1, NODE, tmp_path / "out"))
    finally:
        builder.close()
    err = capfd.readouterr().err
    assert (tmp_path / "out" / "sr.dcm").is_file()
    assert "bad-value" not in err
    assert "pydicom WARNING record (text withheld" in err


def test_a_results_process_that_died_is_replaced(tmp_path: Path) -> None:
    source = make_ct(rows=64, columns=64, seed=5)
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    prediction = predict([dcmread(path)])
    builder = ResultBuilder(1, log_level="INFO")

    def request(n: int) -> BuildRequest:
        return BuildRequest((path,), prediction, n, NODE, tmp_path / f"out{n}")

    try:
        builder.build(request(1))
        (child,) = [
            int(stat.parent.name)
            for stat in Path("/proc").glob("[0-9]*/stat")
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(os.getpid())
            and b"spawn_main" in (stat.parent / "cmdline").read_bytes()
        ]
        os.kill(child, signal.SIGKILL)
        time.sleep(1.0)  # the pool notices: it takes no more work
        with pytest.raises(BrokenProcessPool):  # this try fails...
            builder.build(request(2))
        built = builder.build(request(3))  # ...the next builds in a new process
        assert (tmp_path / "out3" / "sr.dcm").is_file()
        assert built.run == 3
    finally:
        builder.close()


def test_a_results_process_writes_what_building_here_writes(tmp_path: Path) -> None:
    # The node's results process reads the stored files and builds what the
    # node would build from the data sets it scored.
    datasets = sources("CT")
    path = tmp_path / "source.dcm"
    datasets[0].save_as(path, enforce_file_format=True)
    stored: list[Dataset] = [dcmread(path)]
    prediction = predict(stored)
    here = tmp_path / "here"
    written(
        build_results(
            stored, prediction, 1, node=NODE, parametric_map=True, explain_absent=True
        ),
        here,
    )
    builder = ResultBuilder(1, log_level="INFO")
    try:
        request = BuildRequest(
            (path,),
            prediction,
            1,
            NODE,
            tmp_path / "there",
            parametric_map=True,
            explain_absent=True,
        )
        built = builder.build(request, stored)
    finally:
        builder.close()
    names = sorted(p.name for p in here.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "there").iterdir())
    assert {"sc-1.dcm", "pm-1.dcm", "sr.dcm"} <= set(names)
    for name in names:
        a, b = dcmread(here / name), dcmread(tmp_path / "there" / name)
        for ds in (a, b):  # when each was written
            for keyword in (
                "ContentDate",
                "ContentTime",
                "InstanceCreationTime",
                "DateOfSecondaryCapture",
                "TimeOfSecondaryCapture",
            ):
                ds.pop(keyword, None)
            for item in ds.get("ContributingEquipmentSequence", []):
                item.pop("ContributionDateTime", None)
        assert a == b, name
    assert built.sr_uid == dcmread(here / "sr.dcm").SOPInstanceUID


def test_results_are_built_without_reading_a_sources_long_values(
    tmp_path: Path,
) -> None:
    # A stored source is read without its top-level values over 1 MiB (Pixel
    # Data left in the file) and over 1 KiB of VRs pydicom makes an object per
    # value of (1.2 MB of DS values: ~245 MB), when scored and when its
    # results are built; a sequence the results copy is copied, its values
    # not made into objects (900 KB of DS values nested: results took 897 MB).
    [ds] = sources("CT")[:1]
    private = 0x00091010
    ds.add_new(private, "OB", bytes(3 * 1024**2))
    numbers = 0x00181310  # Acquisition Matrix, a US: as long as any other
    ds.add_new(numbers, "US", [1] * 300_000)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "1", "99L", "A"
    code.add_new(0x00200032, "DS", ["1"] * 100_000)  # Image Position, nested
    ds.ProcedureCodeSequence = [code]
    path = tmp_path / "source.dcm"
    ds.save_as(path, enforce_file_format=True)
    stored = read_stored(path)
    prediction = predict([stored])

    files = written(build_results([stored], prediction, 1, node=NODE), tmp_path / "r")

    assert private not in stored
    assert numbers not in stored
    nested = stored.ProcedureCodeSequence[0].get_item(0x00200032)
    assert isinstance(nested, RawDataElement)
    assert files[-1].name == "sr.dcm"
    for path in files:
        written_ds = dcmread(path)
        assert written_ds.PatientID == ds.PatientID
        assert written_ds.ProcedureCodeSequence[0].CodeMeaning == "A"


def test_a_source_with_a_non_standard_patients_sex_still_gets_results(
    tmp_path: Path,
) -> None:
    """Real sources carry "U"; highdicom's constructors refuse it."""
    datasets = sources("CT")
    for ds in datasets:
        ds.PatientSex = "U"
    prediction = predict(datasets)
    result = build_results(datasets, prediction, 1, node=NODE, parametric_map=True)
    assert result.maps  # CT: a Parametric Map too
    for path in written(result, tmp_path):
        assert dcmread(path).PatientSex == "U"  # the source's, as it is
    assert all(ds.PatientSex == "U" for ds in datasets)  # the source unchanged


def test_an_absent_finding_gets_no_picture_unless_asked(tmp_path: Path) -> None:
    model = artifact(nodule=True, effusion=False)
    result, _ = results("DX", model=model)
    # Only the present finding is pictured; the absent one is a score alone.
    assert len(result.captures) == 1
    groups = _find(result.sr, "126010").ContentSequence
    effusion = next(
        g
        for g in groups
        if _find(g, "121071").ConceptCodeSequence[0].CodeValue == "60046008"
    )
    assert not [i for i in effusion.ContentSequence if i.ValueType == "IMAGE"]

    asked, source = results("DX", model=model, explain_absent=True)
    assert len(asked.captures) == 2
    present, absent = asked.captures
    assert "(PRESENT)" in present.ImageComments
    assert "(ABSENT)" in absent.ImageComments
    # The absent finding's heatmap is drawn without any warm colour: no pixel
    # of its picture is red- or yellow-dominated (the source is grey).
    pixels = absent.pixel_array[: source.Rows].astype(int)
    red, blue = pixels[..., 0], pixels[..., 2]
    assert not np.any((red > blue + 30) & (red > 60))
    assert np.any(blue > red + 30)  # but the heat is there, in a cold hue
    positive = present.pixel_array[: source.Rows].astype(int)
    assert np.any(positive[..., 0] > positive[..., 2] + 60)  # jet's red
    for path in written(asked, tmp_path):
        assert dciodvfy_problems(path) == [], path.name


def test_a_capture_keeps_every_pixel_and_says_what_it_shows() -> None:
    result, source = results("DX")
    sc = result.captures[0]
    # The caption names no one; the pixels are said to be as the source says.
    assert sc.BurnedInAnnotation == source.BurnedInAnnotation == "NO"
    assert NOT_FOR_DIAGNOSIS in sc.ImageComments
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.BodyPartExamined == source.BodyPartExamined
    factor = max(1, -(-384 // int(source.Columns)))
    # The picture whole (enlarged when small), the scale beside it and the
    # caption below it: nothing of the image is covered by text.
    assert sc.Rows > factor * source.Rows
    assert sc.Columns > factor * source.Columns
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    assert sc.LossyImageCompression == "00"


@pytest.mark.parametrize(
    "keyword", ["BurnedInAnnotation", "RecognizableVisualFeatures"]
)
def test_a_capture_says_its_pixels_identify_the_patient_where_its_source_does(
    keyword: str, tmp_path: Path
) -> None:
    # An ultrasound frame with the patient's name burned in: the capture shows
    # the same pixels, so it cannot say NO.
    datasets = sources("DX")
    datasets[0].BurnedInAnnotation = "NO"
    datasets[0].RecognizableVisualFeatures = "NO"
    setattr(datasets[0], keyword, "YES")
    result = build_results(datasets, predict(datasets), 1, node=NODE)
    others = {"BurnedInAnnotation", "RecognizableVisualFeatures"} - {keyword}
    assert result.captures
    for sc in result.captures:
        assert getattr(sc, keyword) == "YES"
        assert [getattr(sc, other) for other in others] == ["NO"]
    for path in written(result, tmp_path):
        assert dciodvfy_problems(path) == [], path.name


@pytest.mark.parametrize(
    ("said", "identifying"),
    [
        ({"BurnedInAnnotation": "NO", "RecognizableVisualFeatures": "NO"}, False),
        ({"BurnedInAnnotation": "NO"}, True),  # features unknown
        ({}, True),  # an ultrasound frame that says nothing may carry a name
        ({"BurnedInAnnotation": "YES", "RecognizableVisualFeatures": "NO"}, True),
    ],
)
def test_a_capture_is_shown_without_show_patient_only_when_its_source_says_no(
    said: dict[str, str], identifying: bool, tmp_path: Path
) -> None:
    datasets = sources("DX")
    for keyword in ("BurnedInAnnotation", "RecognizableVisualFeatures"):
        datasets[0].pop(keyword, None)
    for keyword, value in said.items():
        setattr(datasets[0], keyword, value)
    result = build_results(datasets, predict(datasets), 1, node=NODE)
    captures = [p for p in written(result, tmp_path) if p.name.startswith("sc-")]
    assert captures
    for path in captures:
        written_said = {
            k: v
            for k in ("BurnedInAnnotation", "RecognizableVisualFeatures")
            if (v := dcmread(path).get(k)) is not None
        }
        assert written_said == said
        assert identifying_capture(path) is identifying


@pytest.mark.parametrize(("body_part", "side"), [("HAND", "R"), ("BREAST", "L")])
def test_a_paired_body_part_keeps_its_side_from_image_laterality(
    body_part: str, side: str, tmp_path: Path
) -> None:
    # A DX of a hand, a mammogram: the side is given per image only, and so it
    # is given on each capture (one series may show both sides: not Laterality).
    datasets = sources("DX")
    datasets[0].BodyPartExamined = body_part
    datasets[0].ImageLaterality = side
    datasets[0].pop("Laterality", None)
    result = build_results(datasets, predict(datasets), 1, node=NODE)
    derived = [*result.captures, *result.maps]
    assert derived
    assert [ds.ImageLaterality for ds in derived] == [side] * len(derived)
    assert all("Laterality" not in ds for ds in derived)
    for path in written(result, tmp_path)[:-1]:
        assert dciodvfy_problems(path) == [], path.name


def test_result_series_say_one_thing_of_side_and_body_part_and_frame(
    tmp_path: Path,
) -> None:
    # The explained images come from two series (a left and a right side, two
    # frames of reference): each capture copied its source's series-level side
    # and body part into the one capture series, and both maps' frames of
    # reference went into one map series.
    datasets = sources("CT")
    for ds, side, part in zip(datasets, "LR", ("BREAST", "HAND"), strict=True):
        ds.Laterality = side
        ds.BodyPartExamined = part
    assert datasets[0].FrameOfReferenceUID != datasets[1].FrameOfReferenceUID
    result = build_results(
        datasets, predict(datasets, top_k=2), 1, node=NODE, parametric_map=True
    )
    source_of = {str(ds.SOPInstanceUID): ds for ds in datasets}
    assert len(result.captures) == len(result.maps) >= 2

    # One capture series, showing both: the side is each image's.
    assert len({ds.SeriesInstanceUID for ds in result.captures}) == 1
    for sc in result.captures:
        assert "Laterality" not in sc
        assert "BodyPartExamined" not in sc
        source = source_of[sc.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert sc.ImageLaterality == source.Laterality
    # A map series per frame of reference, each saying its source series' own.
    series: dict[str, set[tuple[str, str, str]]] = {}
    for pm in result.maps:
        source = source_of[pm.SourceImageSequence[0].ReferencedSOPInstanceUID]
        said = (pm.FrameOfReferenceUID, pm.Laterality, pm.BodyPartExamined)
        assert said == (
            source.FrameOfReferenceUID,
            source.Laterality,
            source.BodyPartExamined,
        )
        series.setdefault(pm.SeriesInstanceUID, set()).add(said)
    assert sorted(map(len, series.values())) == [1, 1]
    for path in written(result, tmp_path):
        assert dciodvfy_problems(path) == [], path.name


def test_one_source_series_keeps_its_side_and_body_part_on_the_series(
    tmp_path: Path,
) -> None:
    datasets = sources("CT")
    datasets[1].SeriesInstanceUID = datasets[0].SeriesInstanceUID
    datasets[1].FrameOfReferenceUID = datasets[0].FrameOfReferenceUID
    for ds in datasets:
        ds.Laterality, ds.BodyPartExamined = "R", "BREAST"
    result = build_results(
        datasets, predict(datasets, top_k=2), 1, node=NODE, parametric_map=True
    )
    derived = [*result.captures, *result.maps]
    assert len(derived) >= 4
    assert {(ds.Laterality, ds.BodyPartExamined) for ds in derived} == {("R", "BREAST")}
    assert all("ImageLaterality" not in ds for ds in derived)
    assert len({pm.SeriesInstanceUID for pm in result.maps}) == 1


def test_a_result_set_written_over_a_larger_one_leaves_none_of_it(
    tmp_path: Path,
) -> None:
    # `dicom-node score` into the same --out again, with fewer images explained:
    # what the new report does not reference is not left to be sent with it.
    datasets = sources("CT")
    larger = build_results(
        datasets, predict(datasets, top_k=2), 1, node=NODE, parametric_map=True
    )
    smaller = build_results(datasets, predict(datasets), 2, node=NODE)
    kept = len(smaller.captures)
    assert len(larger.captures) == len(larger.maps) > kept > 0
    assert not smaller.maps
    write_result_files(tmp_path, larger)
    write_result_files(tmp_path, smaller)
    names = [f"sc-{n}.{kind}" for n in range(1, kept + 1) for kind in ("dcm", "png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "sr.dcm"])
    assert [
        dcmread(tmp_path / f"sc-{n + 1}.dcm").SOPInstanceUID for n in range(kept)
    ] == [sc.SOPInstanceUID for sc in smaller.captures]


def test_a_capture_shows_non_square_pixels_in_their_proportions() -> None:
    # A disk 24 mm across on pixels 1.5 mm high and 0.5 mm wide is 16 pixels
    # high and 48 wide: drawn as stored, a flat ellipse (an ultrasound of
    # Pixel Aspect Ratio 4:3 looked squashed). The capture's pixels are square.
    ds = make_ct(rows=32, columns=96)
    ds.PixelSpacing = [1.5, 0.5]
    assert pixel_aspect(ds) == 3.0
    yy, xx = np.mgrid[0:32, 0:96]
    disk = ((yy - 16) * 1.5) ** 2 + ((xx - 48) * 0.5) ** 2 <= 12**2
    image = np.where(disk, 250, 20).astype(np.uint8)
    picture = overlay(image, np.zeros((32, 96), np.float32), ["caption"], aspect=3.0)
    red, green, blue = (picture[..., c].astype(int) for c in range(3))
    grey = (red == green) & (green == blue)
    # The image (grey): left of the coloured scale, above the yellow caption.
    scale_starts = int(np.nonzero(~grey[0])[0].min())
    caption_starts = int(np.nonzero(~grey[:, :scale_starts].all(axis=1))[0].min())
    image_part = (grey & (red > 200))[:caption_starts, :scale_starts]
    rows, columns = np.nonzero(image_part)
    height = rows.max() - rows.min() + 1
    width = columns.max() - columns.min() + 1
    assert abs(height / width - 1) < 0.1, (height, width)


@pytest.mark.parametrize(
    ("keyword", "value", "aspect"),
    [
        ("PixelAspectRatio", [4, 3], 4 / 3),
        ("ImagerPixelSpacing", [0.2, 0.4], 0.5),
        ("PixelSpacing", [0.7, 0.7], 1.0),
        ("PixelSpacing", [0.0, 0.7], 1.0),  # not believed: 1
        ("PixelSpacing", [70, 0.7], 1.0),  # 100:1
        ("PixelAspectRatio", [1], 0.7 / 0.35),  # one value: the spacing says
    ],
)
def test_a_pixels_aspect_is_read_from_the_source_and_believed_within_reason(
    keyword: str, value: list[float], aspect: float
) -> None:
    ds = make_ct(rows=8, columns=8)
    del ds.PixelSpacing
    if keyword == "PixelAspectRatio" and len(value) == 1:
        ds.PixelSpacing = [0.7, 0.35]  # read when the ratio cannot be
    setattr(ds, keyword, value)
    assert pixel_aspect(ds) == pytest.approx(aspect)


def test_the_scale_of_a_one_row_image_has_its_three_labels_apart() -> None:
    # A 1 x 128 image was drawn 3 pixels high, its scale's labels on each other.
    picture = overlay(
        np.full((1, 128), 200, np.uint8), np.ones((1, 128), np.float32), ["caption"]
    )
    red, green, blue = (picture[..., c].astype(int) for c in range(3))
    white: npt.NDArray[np.bool_] = (red > 200) & (green > 200) & (blue > 200)
    yellow: npt.NDArray[np.bool_] = (red > 200) & (green > 200) & (blue < 50)
    # The image enlarged to 384 columns; the scale right of it, the caption below.
    caption_starts = int(np.nonzero(yellow[:, :384].any(axis=1))[0].min())
    scale_labels: list[bool] = np.asarray(
        white[:caption_starts, 384:].any(axis=1)
    ).tolist()
    starts = [
        n
        for n, v in enumerate(scale_labels)
        if v and (n == 0 or not scale_labels[n - 1])
    ]
    assert len(starts) == 3  # "100 %", "50 %", "0 %", apart


def test_the_caption_is_whole_on_a_small_image() -> None:
    grey = np.full((64, 48), 100, np.uint8)
    heat = np.zeros((64, 48), np.float32)
    heat[40:50, 30:40] = 1.0
    lines = [NOT_FOR_DIAGNOSIS, "Nodule: PRESENT, probability 87 % (threshold 50 %)"]

    out = overlay(grey, heat, lines)

    factor = -(-384 // 48)  # enlarged to at least 384 columns
    rows, columns = 64 * factor, 48 * factor
    assert out.shape[0] > rows
    assert out.shape[1] > columns
    picture = out[:rows, :columns]
    # No heat: the source as it was (no text over it); full heat: half the
    # source, half jet's top colour (dark red).
    assert picture[5, 5].tolist() == [100, 100, 100]
    assert picture[45 * factor, 35 * factor].tolist() == [114, 50, 50]
    assert np.all(picture[: 30 * factor, : 25 * factor] == 100)
    # The scale: dark red at the top, dark blue at the bottom, then labels.
    scale = out[:rows, columns:]
    assert any(p == [128, 0, 0] for p in scale[0].tolist())
    assert any(p == [0, 0, 128] for p in scale[-1].tolist())
    # The caption below the picture: yellow text on black, and its last
    # characters are drawn (the band is as wide as the picture and scale).
    band = out[rows:].astype(int)
    yellow = (band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 60)
    assert yellow.sum() > 100
    assert yellow[:, : out.shape[1] // 2].any()
    assert yellow[:, out.shape[1] // 2 :].any()
    assert np.array_equal(out, overlay(grey, heat, lines))


def test_the_scale_is_labelled_at_its_top_middle_and_bottom() -> None:
    # Grad-CAM is relative to the image's peak: 100 %, 50 %, 0 % of it (the
    # bar had only "high" and "low").
    grey = np.full((512, 512), 100, np.uint8)
    heat = np.zeros((512, 512), np.float32)

    scale = overlay(grey, heat, ["x"])[:512, 512:]
    white = (scale.min(axis=2) > 200).any(axis=1)  # rows with label text

    for labelled in (white[:20], white[246:266], white[-24:]):
        assert labelled.any()
    for unlabelled in (white[60:230], white[290:470]):
        assert not unlabelled.any()


def test_the_caption_draws_accented_letters_and_no_missing_glyph_boxes() -> None:
    # Pillow's own font has ASCII only: "ö" and kanji came out as boxes. The
    # caption is drawn in DejaVu Sans (fonts-dejavu-core); what it lacks is
    # "?", not a box.
    grey = np.full((64, 64), 100, np.uint8)
    heat = np.zeros((64, 64), np.float32)

    def band(text: str) -> npt.NDArray[np.uint8]:
        return overlay(grey, heat, [text])[384:]

    assert not np.array_equal(band("Lungenknötchen"), band("Lungenknotchen"))
    assert not np.array_equal(band("Узелок"), band("??????"))
    assert np.array_equal(band("結節 nodule"), band("?? nodule"))


def test_a_heatmap_that_is_not_finite_is_refused_not_drawn_as_no_heat() -> None:
    grey = np.zeros((32, 32), np.uint8)
    heat = np.full((32, 32), 0.5, np.float32)
    heat[3, 4] = np.nan
    with pytest.raises(ValueError, match="not every value is finite"):
        overlay(grey, heat, ["x"])


def every_uid(ds: Dataset, where: str = "") -> list[tuple[str, str]]:
    """Every UID a data set holds (nested ones too), with where it sits."""
    found = []
    for element in ds:
        if element.VR == "UI":
            found.append((f"{where}{element.keyword}", str(element.value)))
        elif element.VR == "SQ":
            for i, item in enumerate(element.value):
                found += every_uid(item, f"{where}{element.keyword}[{i}].")
    return found


def test_uids_are_derived_so_a_rerun_replaces_instead_of_duplicating() -> None:
    datasets = sources("CT")
    prediction = predict(datasets)
    first = build_results(datasets, prediction, 1, node=NODE, parametric_map=True)
    again = build_results(datasets, prediction, 1, node=NODE, parametric_map=True)
    assert first.maps
    # Every UID, not only the instances' and series': the same run written
    # again is the same objects (a PACS that has them keeps them as they are).
    for a, b in zip(first.datasets, again.datasets, strict=True):
        assert every_uid(a) == every_uid(b)
    second = build_results(datasets, prediction, 2, node=NODE, previous_sr=first.sr)
    assert second.sr.SOPInstanceUID != first.sr.SOPInstanceUID
    assert second.sr.SeriesInstanceUID != first.sr.SeriesInstanceUID
    predecessor = second.sr.PredecessorDocumentsSequence[0]
    assert (
        predecessor.ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == first.sr.SOPInstanceUID
    )
    # Offline scoring keys its runs apart: never the node's run 1 UIDs.
    offline = build_results(datasets, prediction, 1, node=NODE, run_key="offline-x")
    assert not {d.SOPInstanceUID for d in offline.datasets} & {
        d.SOPInstanceUID for d in first.datasets
    }


def test_each_model_has_series_numbers_of_its_own() -> None:
    datasets = sources("CT")
    one = build_results(datasets, predict(datasets), 1, node=NODE)
    other_model = artifact()
    other_model.name = "lung-screen"
    two = build_results(datasets, predict(datasets, other_model), 1, node=NODE)
    numbers = {int(one.sr.SeriesNumber), int(one.captures[0].SeriesNumber)}
    assert len(numbers) == 2
    assert not numbers & {int(two.sr.SeriesNumber), int(two.captures[0].SeriesNumber)}
    # The same for every study: a radiologist finds a model's results in one place.
    again = build_results(sources("sparse"), predict(sources("sparse")), 1, node=NODE)
    assert again.sr.SeriesNumber == one.sr.SeriesNumber


def test_each_label_is_illustrated_by_its_own_gradcam_images() -> None:
    datasets = sources("CT")
    prediction = predict(datasets, top_k=2)
    result = build_results(datasets, prediction, 1, node=NODE)
    assert len(result.captures) == 4  # two images for each of the two labels
    by_label: dict[str, set[str]] = {}
    for e, sc in zip(prediction.explanations, result.captures, strict=True):
        name = "effusion" if e.label_index == 1 else "nodule"
        by_label.setdefault(name, set()).add(str(sc.SOPInstanceUID))
    imaging = _find(result.sr, "126010")
    for group in imaging.ContentSequence:
        finding = _find(group, "121071").ConceptCodeSequence[0].CodeMeaning
        label = "nodule" if finding == "Nodule" else "effusion"
        illustrations = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
        # TID 1410: "Illustration of ROI", not TID 1500's "Best illustration".
        assert {i.ConceptNameCodeSequence[0].CodeValue for i in illustrations} == {
            "121200"
        }
        referenced = {
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in illustrations
        }
        assert referenced == by_label[label], finding


def test_a_positive_finding_is_a_point_at_the_gradcam_peak_a_negative_has_none(
    tmp_path: Path,
) -> None:
    datasets = sources("CT")
    prediction = predict(datasets, artifact(nodule=True, effusion=False))
    assert [p.positive for p in prediction.labels] == [True, False]
    explained = next(e for e in prediction.explanations if e.label_index == 0)
    row, column = np.unravel_index(
        np.argmax(explained.heatmap), explained.heatmap.shape
    )
    path = written(build_results(datasets, prediction, 1, node=NODE), tmp_path)[-1]
    assert dciodvfy_problems(path) == []

    report = hd.sr.Comprehensive3DSR.from_dataset(dcmread(path))
    content = report.content
    assert isinstance(content, hd.sr.MeasurementReport)
    (positive,) = content.get_planar_roi_measurement_groups()  # TID 1410
    assert positive.finding_type is not None
    assert positive.finding_type.meaning == "Nodule"
    assert POINT_MEANING in str(positive.tracking_identifier)
    region = positive.roi
    assert region is not None
    assert region.graphic_type == hd.sr.GraphicTypeValues.POINT
    # Column first, at the centre of the hottest pixel of the explained image.
    assert region.value.tolist() == [[column + 0.5, row + 0.5]]
    assert (
        region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == explained.source.sop_instance_uid
    )
    (negative,) = content.get_image_measurement_groups()  # TID 1501: no geometry
    assert negative.finding_type is not None
    assert negative.finding_type.meaning == "Pleural effusion"
    evaluation = negative.get_qualitative_evaluations()[0]
    assert evaluation[0].ConceptCodeSequence[0].CodeMeaning == "Absent"
    assert f"POINT ({column + 0.5:g}, {row + 0.5:g})" in sr_text(report)


@pytest.mark.parametrize("kind", ["CT", "MR", "sparse"])
def test_a_parametric_map_holds_the_raw_gradcam_on_the_source_grid(
    kind: str, tmp_path: Path
) -> None:
    datasets = sources(kind)
    prediction = predict(datasets)
    result = build_results(datasets, prediction, 1, node=NODE, parametric_map=True)
    assert len(result.maps) == len(prediction.explanations) == 2
    assert all(any(pm is ds for ds in result.datasets) for pm in result.maps)
    paths = written(result, tmp_path)
    maps = [dcmread(p) for p in paths if p.name.startswith("pm-")]
    for explanation, back in zip(prediction.explanations, maps, strict=True):
        assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map
        assert back.ImageType[2] != "VOLUME"  # one 2-D frame, not a volume
        assert back.StudyInstanceUID == datasets[0].StudyInstanceUID
        assert back.PatientID == datasets[0].PatientID
        assert back.SeriesInstanceUID not in {d.SeriesInstanceUID for d in datasets}
        mapping = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
        values = back.pixel_array * float(mapping[0].RealWorldValueSlope) + float(
            mapping[0].RealWorldValueIntercept
        )
        assert values.shape == explanation.heatmap.shape
        assert np.abs(values - explanation.heatmap).max() <= 1 / 65535
        derived = back.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence
        assert (
            derived[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            == explanation.source.sop_instance_uid
        )
    for path in paths:
        assert dciodvfy_problems(path) == [], path.name
    # The SR references each map: in its evidence and as an illustration.
    report = dcmread(paths[-1])
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    illustrated = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for group in _find(report, "126010").ContentSequence
        for item in group.ContentSequence
        if item.ValueType == "IMAGE"
    }
    for pm in maps:
        assert pm.SOPInstanceUID in evidence
        assert pm.SOPInstanceUID in illustrated


@pytest.mark.parametrize("kind", ["DX", "CR MONOCHROME1"])
def test_a_projection_radiograph_gets_no_parametric_map(kind: str) -> None:
    result, _ = results(kind, parametric_map=True)
    assert result.maps == ()  # no patient frame of reference to put it in
    assert len(result.captures) == 2


def test_a_retired_ultrasound_source_gets_valid_results(tmp_path: Path) -> None:
    source = dcmread(corpus_file("US1_UNCR.dcm"))
    retired = UID("1.2.840.10008.5.1.4.1.1.6")  # Ultrasound Image Storage (Retired)
    source.SOPClassUID = retired
    source.file_meta.MediaStorageSOPClassUID = retired
    result = build_results([source], predict([source]), 1, node=NODE)
    for path in written(result, tmp_path):
        ds = dcmread(path)
        assert ds.PatientID == source.PatientID
        assert not [p for p in dciodvfy_problems(path) if p.startswith("Error")]
    # The SR references the source under its own (retired) SOP class.
    (study,) = result.sr.CurrentRequestedProcedureEvidenceSequence
    classes = {
        ref.ReferencedSOPClassUID
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert retired in classes


@pytest.mark.parametrize("birth_date", ["19700000", "SENTINEL", "1970"])
def test_a_source_with_an_unparsable_date_still_gets_results(
    birth_date: str, tmp_path: Path
) -> None:
    """highdicom parses Patient's Birth Date; real archives hold values it refuses."""
    datasets = sources("CT")
    for ds in datasets:
        ds.PatientBirthDate = birth_date
        ds.StudyTime = "11:20:00"  # ACR-NEMA style, as old ultrasound files have
    result = build_results(datasets, predict(datasets), 1, node=NODE)
    for path in written(result, tmp_path):
        back = dcmread(path)
        assert back.PatientBirthDate == birth_date  # the source's, as it is
        assert back.StudyTime == "11:20:00"


def test_a_non_ascii_label_switches_the_capture_to_utf8(tmp_path: Path) -> None:
    model = artifact(nodule=True, effusion=False)
    first, second = model.labels
    model.labels = (replace(first, name="knötchen"), second)
    (source,) = sources("sparse")
    assert "SpecificCharacterSet" not in source
    result = build_results([source], predict([source], model), 1, node=NODE)
    for path in written(result, tmp_path):
        back = dcmread(path)
        assert back.SpecificCharacterSet == "ISO_IR 192", path.name
        assert dciodvfy_problems(path) == [], path.name
    (capture,) = result.captures
    assert "knötchen" in dcmread(tmp_path / "sc-1.dcm").ImageComments
    assert "knötchen" in capture.ImageComments


def _lossy_source(said: str | None, syntax: str | None = None) -> Dataset:
    (source,) = sources("sparse")
    if said is not None:
        source.LossyImageCompression = said
    if syntax is not None:
        source.file_meta.TransferSyntaxUID = UID(syntax)
    return source


@pytest.mark.parametrize(
    ("said", "syntax", "expected"),
    [
        (None, None, ("00", None)),  # never compressed
        ("01", None, ("01", None)),  # lossy before, how not recorded: never reset
        ("00", "1.2.840.10008.1.2.4.91", ("00", None)),  # JPEG 2000, said lossless
        (None, "1.2.840.10008.1.2.4.91", ("01", ["ISO_15444_1"])),  # not said
        (None, "1.2.840.10008.1.2.4.50", ("01", ["ISO_10918_1"])),  # JPEG baseline
    ],
)
def test_lossy_image_compression_follows_the_source(
    said: str | None, syntax: str | None, expected: tuple[str, list[str] | None]
) -> None:
    from dicom_node.results.capture import lossy_history

    capture = Dataset()
    lossy_history(capture, _lossy_source(said, syntax), None)
    flag, methods = expected
    assert capture.LossyImageCompression == flag
    if methods is None:
        assert "LossyImageCompressionMethod" not in capture
    else:
        value = capture.LossyImageCompressionMethod
        assert ([value] if isinstance(value, str) else list(value)) == methods


def test_yes_and_no_are_read_in_the_forms_sources_write_them() -> None:
    ds = Dataset()
    assert yes_or_no(ds, "BurnedInAnnotation") is None  # absent: unknown
    for value, expected in (
        ("YES", "YES"),
        ("yes ", "YES"),
        ("NO", "NO"),
        (" no", "NO"),
        ("", None),
        ("MAYBE", None),
    ):
        ds.BurnedInAnnotation = value
        assert yes_or_no(ds, "BurnedInAnnotation") == expected, value
    ds.BurnedInAnnotation = ["NO", "YES"]  # several values, against its VM
    assert yes_or_no(ds, "BurnedInAnnotation") == "YES"
