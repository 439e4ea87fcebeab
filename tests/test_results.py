"""SR and Secondary Capture results: valid under dciodvfy, readable in dsr2html."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from dicom_node.encode import file_bytes
from dicom_node.results import (
    _IDENTITY,
    MANUFACTURER,
    NOT_FOR_DIAGNOSIS,
    POINT_MEANING,
    SC_SERIES_NUMBER,
    ResultSet,
    _secondary_capture,
    _with_source_identity,
    build_results,
    overlay,
    summary_lines,
)
from dicom_node.score import sr_text
from inference import Classifier, CodedConcept, StudyPrediction
from tests.factories import corpus_file, dcmtk, make_artifact, make_ct

REPO = Path(__file__).resolve().parent.parent

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
    # A source missing what real sources often miss.
    ds = make_ct(rows=64, columns=64, seed=3)
    for keyword in ("PatientBirthDate", "AccessionNumber", "BodyPartExamined"):
        if keyword in ds:
            del ds[keyword]
    return [ds]


def results(kind: str, run: int = 1, **options: object) -> tuple[ResultSet, Dataset]:
    datasets = sources(kind)
    prediction = Classifier(make_artifact(), "cpu").predict(datasets, explain_top_k=1)
    return build_results(datasets, prediction, run, **options), datasets[0]  # type: ignore[arg-type]


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


@pytest.mark.parametrize("kind", ["CT", "DX", "CR MONOCHROME1", "MR", "sparse"])
def test_every_object_is_valid_and_the_sr_reads_as_a_report(
    kind: str, tmp_path: Path
) -> None:
    result, source = results(kind, jpeg=kind == "DX")
    assert len(result.captures) == 2  # the top image of each of the two labels
    for i, ds in enumerate(result.datasets):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(file_bytes(ds))  # as the node writes it
        assert dciodvfy_problems(path) == [], ds.SOPClassUID.name
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID

    sr_path = tmp_path / f"{len(result.datasets) - 1}.dcm"
    html = subprocess.run(
        [dcmtk("dsr2html"), str(sr_path)], capture_output=True, text=True, check=True
    ).stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    for expected in (
        "Imaging Measurement Report",
        "UNVERIFIED",
        "AI Results: test",
        "Nodule: Present (probability",
        "Pleural effusion:",
        "operating threshold 50.0 %",
        "model test 0",
        "Image Library",
    ):
        assert expected in text, expected

    report = dcmread(sr_path)
    parsed = hd.sr.Comprehensive3DSR.from_dataset(report, copy=True)
    assert parsed.VerificationFlag == "UNVERIFIED"
    measurement = _find(report, "122157")
    probability = float(measurement.MeasuredValueSequence[0].NumericValue)
    assert 0.0 <= probability <= 100.0
    evaluation = _find(report, "27925004", value_type="CODE")
    assert evaluation.ConceptCodeSequence[0].CodeMeaning in ("Present", "Absent")


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


def test_captures_show_the_source_with_the_warning_burned_in(tmp_path: Path) -> None:
    result, source = results("DX")
    sc = result.captures[0]
    assert sc.BurnedInAnnotation == "YES"
    assert NOT_FOR_DIAGNOSIS in sc.ImageComments
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.BodyPartExamined == source.BodyPartExamined
    assert sc.Rows == source.Rows
    assert sc.Columns > source.Columns  # the colour bar
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)


def test_uids_are_derived_so_a_rerun_replaces_instead_of_duplicating() -> None:
    datasets = sources("CT")
    prediction = Classifier(make_artifact(), "cpu").predict(datasets, explain_top_k=1)
    first = build_results(datasets, prediction, 1)
    again = build_results(datasets, prediction, 1)
    assert [d.SOPInstanceUID for d in first.datasets] == [
        d.SOPInstanceUID for d in again.datasets
    ]
    assert [d.SeriesInstanceUID for d in first.datasets] == [
        d.SeriesInstanceUID for d in again.datasets
    ]
    second = build_results(datasets, prediction, 2, previous_sr=first.sr)
    assert second.sr.SOPInstanceUID != first.sr.SOPInstanceUID
    assert second.sr.SeriesInstanceUID != first.sr.SeriesInstanceUID
    predecessor = second.sr.PredecessorDocumentsSequence[0]
    assert (
        predecessor.ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == first.sr.SOPInstanceUID
    )


def test_each_label_references_its_own_gradcam_images() -> None:
    datasets = sources("CT")
    prediction = Classifier(make_artifact(), "cpu").predict(datasets, explain_top_k=2)
    result = build_results(datasets, prediction, 1)
    assert len(result.captures) == 4  # two images for each of the two labels
    by_label: dict[str, set[str]] = {}
    for e, sc in zip(prediction.explanations, result.captures, strict=True):
        name = "effusion" if e.label_index == 1 else "nodule"
        by_label.setdefault(name, set()).add(str(sc.SOPInstanceUID))
    imaging = _find(result.sr, "126010")
    for group in imaging.ContentSequence:
        finding = _find(group, "121071").ConceptCodeSequence[0].CodeMeaning
        label = "nodule" if finding == "Nodule" else "effusion"
        referenced = {
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in group.ContentSequence
            if item.ValueType == "IMAGE"
        }
        assert referenced == by_label[label], finding


def test_a_positive_finding_is_a_point_at_the_gradcam_peak_a_negative_has_none(
    tmp_path: Path,
) -> None:
    artifact = make_artifact()
    nodule, effusion = artifact.labels
    artifact.labels = (
        replace(nodule, threshold=0.001),  # positive
        replace(effusion, threshold=0.999),  # negative
    )
    datasets = sources("CT")
    prediction = Classifier(artifact, "cpu").predict(datasets, explain_top_k=1)
    assert [p.positive for p in prediction.labels] == [True, False]
    explained = next(e for e in prediction.explanations if e.label_index == 0)
    row, column = np.unravel_index(
        np.argmax(explained.heatmap), explained.heatmap.shape
    )
    path = tmp_path / "sr.dcm"
    path.write_bytes(file_bytes(build_results(datasets, prediction, 1).sr))
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
    prediction = Classifier(make_artifact(), "cpu").predict(datasets, explain_top_k=1)
    result = build_results(datasets, prediction, 1, parametric_map=True)
    assert len(result.maps) == len(prediction.explanations) == 2
    assert all(any(pm is ds for ds in result.datasets) for pm in result.maps)
    for explanation, pm in zip(prediction.explanations, result.maps, strict=True):
        path = tmp_path / f"{pm.InstanceNumber}.dcm"
        path.write_bytes(file_bytes(pm))
        assert dciodvfy_problems(path) == []
        back = dcmread(path)
        assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map
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


@pytest.mark.parametrize("kind", ["DX", "CR MONOCHROME1"])
def test_a_projection_radiograph_gets_no_parametric_map(kind: str) -> None:
    result, _ = results(kind, parametric_map=True)
    assert result.maps == ()  # no patient frame of reference to put it in
    assert len(result.captures) == 2


def _highdicom_tree(
    sources: Sequence[Dataset], result: ResultSet, prediction: StudyPrediction
) -> list[Dataset]:
    """The SR content highdicom's TID 1500 templates build for the same result."""
    labels = [e.label_index for e in prediction.explanations]
    captures = list(zip(result.captures, labels, strict=True))

    def code(c: CodedConcept) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(c.value, c.scheme, c.meaning)

    algorithm = hd.sr.AlgorithmIdentification(
        name=prediction.model_name, version=prediction.model_version
    )
    model = f"{prediction.model_name} {prediction.model_version}"
    tracking = {  # the UIDs are the node's own (derived); taken from its SR
        str(item.ContentSequence[0].TextValue): str(item.ContentSequence[1].UID)
        for item in _find(result.sr, "126010").ContentSequence
    }
    groups = []
    for index, p in enumerate(prediction.labels):
        finding = code(p.label.concept)
        explanation = next(
            (e for e in prediction.explanations if e.label_index == index), None
        )
        point = p.positive and explanation is not None
        what = POINT_MEANING if point else "whole-study score"
        identifier = f"AI {p.label.name}: {what}"
        options: dict[str, Any] = {
            "tracking_identifier": hd.sr.TrackingIdentifier(
                uid=tracking[identifier], identifier=identifier
            ),
            "finding_type": finding,
            "algorithm_id": algorithm,
            "finding_sites": (
                [hd.sr.FindingSite(code(p.label.finding_site))]
                if p.label.finding_site
                else None
            ),
            "measurements": [
                hd.sr.Measurement(
                    name=hd.sr.CodedConcept("122157", "DCM", "Probability"),
                    value=round(100 * p.probability, 2),
                    unit=hd.sr.CodedConcept("%", "UCUM", "Percent"),
                )
            ],
            "qualitative_evaluations": [
                hd.sr.QualitativeEvaluation(
                    name=finding,
                    value=(
                        hd.sr.CodedConcept("52101004", "SCT", "Present")
                        if p.positive
                        else hd.sr.CodedConcept("272519000", "SCT", "Absent")
                    ),
                )
            ],
        }
        line = summary_lines(prediction)[index]
        group: (
            hd.sr.MeasurementsAndQualitativeEvaluations
            | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        )
        if point:
            assert explanation is not None
            source = next(
                ds
                for ds in sources
                if ds.SOPInstanceUID == explanation.source.sop_instance_uid
            )
            heat = explanation.heatmap
            row, column = np.unravel_index(np.argmax(heat), heat.shape)
            multi = int(source.get("NumberOfFrames", 1)) > 1
            group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POINT,
                    graphic_data=np.array([[column + 0.5, row + 0.5]]),
                    source_image=hd.sr.SourceImageForRegion(
                        source.SOPClassUID,
                        source.SOPInstanceUID,
                        [explanation.source.frame_index + 1] if multi else None,
                    ),
                ),
                **options,
            )
            line += f"; the point is the Grad-CAM peak: {POINT_MEANING}"
        else:
            group = hd.sr.MeasurementsAndQualitativeEvaluations(**options)
        container = group[0]
        container.ContentSequence.append(
            hd.sr.TextContentItem(
                name=hd.sr.CodedConcept("121111", "DCM", "Summary"),
                value=f"{line}; model {model}; unverified, not for diagnostic use",
                relationship_type="CONTAINS",
            )
        )
        for capture, label_index in captures:
            if label_index == index:
                container.ContentSequence.append(
                    hd.sr.ImageContentItem(
                        name=hd.sr.CodedConcept(
                            "121080", "DCM", "Best illustration of finding"
                        ),
                        referenced_sop_class_uid=capture.SOPClassUID,
                        referenced_sop_instance_uid=capture.SOPInstanceUID,
                        relationship_type="CONTAINS",
                    )
                )
        groups.append(group)
    modality = sources[0].Modality
    procedure = {
        "CT": ("25045-6", "LN", "CT unspecified body region"),
        "DX": ("43468-8", "LN", "XR unspecified body region"),
    }.get(modality, ("363679005", "SCT", "Imaging procedure"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=prediction.device_uid,
                    name="DICOMNODE",
                    manufacturer_name="dicom-node",
                    model_name=model,
                ),
            )
        ),
        procedure_reported=hd.sr.CodedConcept(*procedure),
        imaging_measurements=groups,
    )
    library = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("111028", "DCM", "Image Library"),
        relationship_type="CONTAINS",
    )
    library_group = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("126200", "DCM", "Image Library Group"),
        relationship_type="CONTAINS",
    )
    library_group.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.ImageContentItem(
                name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                relationship_type="CONTAINS",
            )
            for ds in sources
        ]
    )
    library.ContentSequence = hd.sr.ContentSequence([library_group])
    root = report[0]
    root.ContentSequence.insert(len(root.ContentSequence) - 1, library)
    return [root, *root.ContentSequence]


@pytest.mark.parametrize("kind", ["CT", "DX", "MR multi-frame"])
def test_the_report_tree_is_what_highdicoms_tid_1500_templates_build(
    kind: str,
) -> None:
    artifact = make_artifact()
    nodule, effusion = artifact.labels
    artifact.labels = (  # one positive with a finding site, one negative
        replace(
            nodule,
            threshold=0.001,
            finding_site=CodedConcept("39607008", "SCT", "Lung"),
        ),
        replace(effusion, threshold=0.999),
    )
    datasets = (
        [dcmread(corpus_file("emri_small.dcm"))]
        if kind == "MR multi-frame"
        else sources(kind)
    )
    prediction = Classifier(artifact, "cpu").predict(datasets, explain_top_k=1)
    result = build_results(datasets, prediction, 1)
    root, *expected = _highdicom_tree(datasets, result, prediction)

    for keyword in (
        "ValueType",
        "ConceptNameCodeSequence",
        "ContinuityOfContent",
        "ContentTemplateSequence",
    ):
        assert result.sr[keyword] == root[keyword], keyword
    assert [i.to_json_dict() for i in result.sr.ContentSequence] == [
        i.to_json_dict() for i in expected
    ]


def _evidence_header(source: Dataset) -> Dataset:
    """What highdicom's SR constructor needs of an evidence instance."""
    header = Dataset()
    for keyword in _IDENTITY:
        header[keyword] = DataElement(
            tag_for_keyword(keyword),  # type: ignore[arg-type]
            dictionary_VR(keyword),
            source.get(keyword),
        )
    for keyword in (
        "SpecificCharacterSet",
        "Modality",
        "SeriesInstanceUID",
        "SOPClassUID",
        "SOPInstanceUID",
    ):
        if keyword in source:
            header[keyword] = source[keyword]
    return header


def _highdicom_document(
    result: ResultSet, sources: Sequence[Dataset], previous_sr: Dataset | None
) -> Dataset:
    """The SR highdicom's Comprehensive3DSR builds around the same content."""
    sr = result.sr
    root = Dataset()
    for keyword in (
        "ValueType",
        "ConceptNameCodeSequence",
        "ContinuityOfContent",
        "ContentTemplateSequence",
    ):
        root[keyword] = deepcopy(sr[keyword])
    root.ContentSequence = [deepcopy(sr.ContentSequence[0])]
    ours = sr.ContributingEquipmentSequence[0]
    reference = hd.sr.Comprehensive3DSR(
        evidence=[_evidence_header(ds) for ds in (*sources, *result.captures)],
        content=root,
        series_instance_uid=sr.SeriesInstanceUID,
        series_number=int(sr.SeriesNumber),
        sop_instance_uid=sr.SOPInstanceUID,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_verified=False,
        previous_versions=[previous_sr] if previous_sr is not None else None,
        series_description=sr.SeriesDescription,
        contributing_equipment=[
            hd.ContributingEquipment(
                manufacturer=ours.Manufacturer,
                purpose_of_reference=codes.DCM.ProcessingEquipment,
                manufacturer_model_name=ours.ManufacturerModelName,
                software_versions=ours.SoftwareVersions,
            )
        ],
    )
    reference.ContentSequence = sr.ContentSequence
    for keyword in _IDENTITY:  # the results copy the source's exactly
        reference[keyword] = deepcopy(sr[keyword])
    return reference


def _at_a_fixed_time(ds: Dataset) -> bytes:
    ds = deepcopy(ds)
    ds.InstanceCreationDate = ds.ContentDate = "20260101"
    ds.InstanceCreationTime = ds.ContentTime = "120000"
    if "DateOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture = "20260101"
        ds.TimeOfSecondaryCapture = "120000"
    for item in ds.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20260101120000"
    return file_bytes(ds)


@pytest.mark.parametrize(
    "kind", ["CT", "DX", "CR MONOCHROME1", "MR", "MR multi-frame", "sparse"]
)
def test_the_report_document_is_what_highdicoms_sr_constructor_builds(
    kind: str,
) -> None:
    datasets = (
        [dcmread(corpus_file("emri_small.dcm"))]
        if kind == "MR multi-frame"
        else sources(kind)
    )
    prediction = Classifier(make_artifact(), "cpu").predict(datasets, explain_top_k=1)
    first = build_results(datasets, prediction, 1)
    second = build_results(datasets, prediction, 2, previous_sr=first.sr)
    for result, previous in ((first, None), (second, first.sr)):
        expected = _highdicom_document(result, datasets, previous)
        assert _at_a_fixed_time(result.sr) == _at_a_fixed_time(expected)
    assert "PredecessorDocumentsSequence" in second.sr
    evidence = first.sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in (*datasets, *first.captures)}


@pytest.mark.parametrize("jpeg", [False, True])
@pytest.mark.parametrize(
    "kind", ["CT", "DX", "CR MONOCHROME1", "MR", "MR multi-frame", "sparse"]
)
def test_a_capture_is_what_highdicoms_sc_constructor_builds(
    kind: str, jpeg: bool
) -> None:
    source = (
        dcmread(corpus_file("emri_small.dcm"))
        if kind == "MR multi-frame"
        else sources(kind)[0]
    )
    rows, columns = 40, 52
    gradient = np.linspace(0, 255, rows * columns * 3).reshape(rows, columns, 3)
    pixels = gradient.astype(np.uint8)
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name="test 0",
        software_versions="dicom-node 0",
    )
    uids = {"series": "2.25.1001", "sop": "2.25.1002"}
    ours = _secondary_capture(
        source,
        pixels,
        jpeg=jpeg,
        series_uid=uids["series"],
        sop_uid=uids["sop"],
        number=2,
        series_description="AI Grad-CAM: test",
        equipment=equipment,
    )
    theirs = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="YBR_FULL_422" if jpeg else "RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids["series"],
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids["sop"],
        instance_number=2,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
        transfer_syntax_uid=JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian,
        series_description="AI Grad-CAM: test",
        contributing_equipment=[deepcopy(equipment)],
    )
    for ds in (ours, theirs):  # what _capture sets after either constructor
        ds.PatientOrientation = ["L", "F"]
        _with_source_identity(ds, source)
    assert _at_a_fixed_time(ours) == _at_a_fixed_time(theirs)


def test_a_source_with_a_non_standard_patients_sex_still_gets_results(
    tmp_path: Path,
) -> None:
    """Real sources carry "U" or lower case; highdicom's constructors refuse them."""
    datasets = sources("CT")
    for ds in datasets:
        ds.PatientSex = "U"
    prediction = Classifier(make_artifact(), "cpu").predict(datasets, explain_top_k=1)
    result = build_results(datasets, prediction, 1, parametric_map=True)
    assert result.maps  # CT: a Parametric Map too
    for i, ds in enumerate(result.datasets):
        assert ds.PatientSex == "U"  # the source's, as it is
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(file_bytes(ds))
        assert dcmread(path).PatientSex == "U"


def test_overlay_blends_the_heat_adds_a_colour_bar_and_burns_in_the_text() -> None:
    grey = np.full((200, 150), 100, np.uint8)
    heat = np.zeros((200, 150), np.float32)
    heat[150:180, 100:130] = 1.0

    out = overlay(grey, heat, [NOT_FOR_DIAGNOSIS, "Nodule 87 % - model"])

    bar = max(8, 150 // 24) + max(2, max(8, 150 // 24) // 4)
    assert out.shape == (200, 150 + bar, 3)
    # No heat: the source as it was; full heat: half the source, half jet's
    # top colour (dark red).
    assert out[100, 60].tolist() == [100, 100, 100]
    assert out[160, 110].tolist() == [114, 50, 50]
    # The bar runs from dark red (top) to dark blue (bottom).
    assert out[0, -1].tolist() == [128, 0, 0]
    assert out[-1, -1].tolist() == [0, 0, 128]
    # The text is yellow, outlined in black, in the top-left corner.
    corner = out[:30, :120].astype(int)
    yellow = (corner[..., 0] > 200) & (corner[..., 1] > 200) & (corner[..., 2] < 60)
    black = corner.max(axis=2) < 40
    assert yellow.sum() > 50
    assert black.sum() > 50
    assert np.all(out[30:140, :120] == 100)  # nothing below it
    # Drawing again (the text from the cache) gives the same picture.
    again = overlay(grey, heat, [NOT_FOR_DIAGNOSIS, "Nodule 87 % - model"])
    assert np.array_equal(out, again)


@pytest.mark.parametrize("kind", ["CT", "DX", "CR MONOCHROME1", "MR"])
def test_captures_name_the_source_equipment_and_this_node(kind: str) -> None:
    # Built twice: the second time highdicom's image-class lookup is cached.
    for _ in range(2):
        result, source = results(kind)
        equipment = result.captures[0].ContributingEquipmentSequence
        makers = [str(item.Manufacturer) for item in equipment]
        assert makers[:2] == [str(source.Manufacturer), "dicom-node"]
        assert (
            equipment[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
        )  # acquisition
