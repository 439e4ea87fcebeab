"""Scoring on arrival: images scored while their study arrives, results unchanged."""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node import metrics
from dicom_node.completion import PreparedResults
from dicom_node.config import NodeConfig
from dicom_node.dimse import SUCCESS
from dicom_node.results.builder import ResultBuilder
from inference import Classifier, ModelArtifact, StudyPrediction
from tests.factories import corpus_file, make_ct
from tests.helpers import (
    Destination,
    ct_study,
    node_config,
    status,
    store_datasets,
    wait_for,
)


def scored_images() -> dict[str, float]:
    """Images scored for jobs so far in this process, by when, as /metrics says."""
    text = metrics.exposition().decode()
    found = {"arrival": 0.0, "job": 0.0}
    for when, value in re.findall(
        r'^dicom_node_images_scored_total\{[^}]*when="(\w+)"[^}]*\} (\S+)$',
        text,
        re.MULTILINE,
    ):
        found[when] += float(value)
    return found


def probabilities(report: Dataset) -> list[float]:
    """Every Probability (122157) in an SR's content tree, in order."""
    found: list[float] = []

    def walk(item: Dataset) -> None:
        for child in item.get("ContentSequence", []):
            name = child.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == "122157":
                found.append(float(child.MeasuredValueSequence[0].NumericValue))
            walk(child)

    walk(report)
    return found


def explained(received: list[Dataset], study_uid: str) -> set[str]:
    """The source images of a study's Grad-CAM captures."""
    return {
        str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
        for ds in received
        if ds.Modality != "SR" and ds.StudyInstanceUID == study_uid
    }


def expected(model: Path, datasets: list[Dataset]) -> StudyPrediction:
    """What scoring the whole study at once gives (as `dicom-node score` does)."""
    classifier = Classifier(ModelArtifact.load(model), "cpu")
    return classifier.predict(datasets, explain_top_k=1)


def assert_results_of(received: list[Dataset], prediction: StudyPrediction) -> None:
    """One result set of a study: the SR's probabilities, the images explained."""
    reports = [ds for ds in received if ds.Modality == "SR"]
    assert len(reports) == 1
    written = probabilities(reports[0])
    assert len(written) == len(prediction.labels)
    for percent, label in zip(written, prediction.labels, strict=True):
        assert abs(percent - 100 * label.probability) < 0.01
    top = {prediction.frames[e.frame].sop_instance_uid for e in prediction.explanations}
    assert explained(received, str(reports[0].StudyInstanceUID)) == top


def of_study(received: list[Dataset], study_uid: str) -> list[Dataset]:
    return [ds for ds in received if ds.StudyInstanceUID == study_uid]


def start(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
    **settings: object,
) -> tuple[NodeConfig, int]:
    """A node, its model loaded (a first study through it), scoring on arrival."""
    config = node_config(tmp_path, model, destination.port, **settings)
    port = run_serve(config)
    assert store_datasets(port, ct_study(1)) == [SUCCESS]
    wait_for(lambda: status(config)["deliveries"]["done"] == 1, 60, "warm-up")
    return config, port


def sent(
    config: NodeConfig, port: int, datasets: list[Dataset], done: int
) -> dict[str, float]:
    """Store data sets, wait for the ``done``-th delivery; return the images
    scored meanwhile for jobs, by when (as /metrics counts them)."""
    before = scored_images()
    assert store_datasets(port, datasets) == [SUCCESS] * len(datasets)
    wait_for(lambda: status(config)["deliveries"]["done"] == done, 60, "results sent")
    after = scored_images()
    return {when: after[when] - before[when] for when in after}


def test_a_study_is_scored_while_it_arrives_and_gets_the_results_of_scoring_it_at_once(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    # A 3 s quiet timer: the images are scored during it; when the study is
    # quiet, its job finds every image scored and only aggregates, explains,
    # writes and sends.
    config, port = start(tmp_path, model, destination, run_serve, stable_after=3.0)
    study = ct_study(3)
    uid = str(study[0].StudyInstanceUID)

    counted = sent(config, port, study, done=2)
    assert counted == {"arrival": 3, "job": 0}
    assert_results_of(of_study(destination.received, uid), expected(model, study))

    # A late image: scored when it arrives, the study aggregated again over
    # all four, none of the first three scored again.
    late = ct_study(4)[3]
    late.StudyInstanceUID = study[0].StudyInstanceUID
    late.SeriesInstanceUID = study[0].SeriesInstanceUID
    first = len(destination.received)
    assert sent(config, port, [late], done=3) == {"arrival": 4, "job": 0}
    assert_results_of(destination.received[first:], expected(model, [*study, late]))


def test_an_image_sent_again_changed_is_scored_as_it_is_now(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    # The same SOP Instance UID sent again with other pixels while its study
    # is still arriving: the results are those of the study as stored now.
    config, port = start(tmp_path, model, destination, run_serve, stable_after=3.0)
    study = ct_study(3)
    changed = make_ct(rows=64, columns=64, seed=99)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(changed, keyword, study[0].get(keyword))
    changed.file_meta.MediaStorageSOPInstanceUID = study[0].SOPInstanceUID

    assert store_datasets(port, study) == [SUCCESS] * 3
    sent(config, port, [changed], done=2)

    uid = str(study[0].StudyInstanceUID)
    now = expected(model, [changed, *study[1:]])
    assert now.frame_probabilities[0].tolist() != pytest.approx(
        expected(model, study).frame_probabilities[0].tolist(), abs=1e-4
    )
    assert_results_of(of_study(destination.received, uid), now)


def test_without_scoring_on_arrival_the_job_scores_and_the_results_are_the_same(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    off = {"stable_after": 1.0, "score_on_arrival": False}
    config, port = start(tmp_path, model, destination, run_serve, **off)
    study = ct_study(3)

    assert sent(config, port, study, done=2) == {"arrival": 0, "job": 3}
    uid = str(study[0].StudyInstanceUID)
    assert_results_of(of_study(destination.received, uid), expected(model, study))


def prepared_left(config: NodeConfig) -> list[Path]:
    """Prepared result sets still on disk (each process's folder keeps its lock)."""
    early = config.state_dir / "results" / ".early"
    return [path for path in early.glob("*/*") if path.name != "lock"]


def prepared_results() -> dict[str, float]:
    """Result sets built while their study arrived, by outcome, as /metrics says."""
    text = metrics.exposition().decode()
    found = {"built": 0.0, "used": 0.0, "not used": 0.0}
    for outcome, value in re.findall(
        r'^dicom_node_results_prepared_total\{outcome="([\w ]+)"\} (\S+)$',
        text,
        re.MULTILINE,
    ):
        found[outcome] += float(value)
    return found


def test_a_studys_results_are_built_while_its_quiet_timer_runs(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    # Every image scored on arrival: the results are built in the quiet timer,
    # and the job, finding them to be what it would build, sends those.
    config, port = start(tmp_path, model, destination, run_serve, stable_after=3.0)
    study = ct_study(2)
    uid = str(study[0].StudyInstanceUID)
    before = prepared_results()
    sent(config, port, study, done=2)
    after = prepared_results()
    assert after["used"] - before["used"] == 1
    assert after["built"] - before["built"] >= 1
    assert_results_of(of_study(destination.received, uid), expected(model, study))

    # A late image: the study's next run is built in its timer too, with it.
    late = ct_study(3)[2]
    late.StudyInstanceUID = study[0].StudyInstanceUID
    late.SeriesInstanceUID = study[0].SeriesInstanceUID
    first = len(destination.received)
    sent(config, port, [late], done=3)
    assert prepared_results()["used"] - after["used"] == 1
    assert_results_of(destination.received[first:], expected(model, [*study, late]))
    # Nothing prepared is left behind.
    assert not prepared_left(config)


def test_results_prepared_before_a_late_image_are_not_sent(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    # The third image must come before the timer ends: it starts half the timer
    # after the second, when the set is prepared (6 s: room for a slow host).
    config, port = start(tmp_path, model, destination, run_serve, stable_after=6.0)
    study = ct_study(3)
    before = prepared_results()
    assert store_datasets(port, study[:2]) == [SUCCESS] * 2
    wait_for(lambda: prepared_results()["built"] > before["built"], 10, "prepared")
    wait_for(lambda: bool(prepared_left(config)), 10, "the prepared set written")
    assert store_datasets(port, study[2:]) == [SUCCESS]  # before the timer ends
    wait_for(lambda: status(config)["deliveries"]["done"] == 2, 60, "results sent")
    uid = str(study[0].StudyInstanceUID)
    assert_results_of(of_study(destination.received, uid), expected(model, study))
    assert not prepared_left(config)


def test_results_prepared_by_a_process_that_ended_are_removed_at_start(
    tmp_path: Path,
) -> None:
    root = tmp_path / "results"
    ended, alive = root / ".early" / "a1", root / ".early" / "b2"
    for folder in (ended, alive):
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "sr.dcm").write_bytes(b"x")
        (folder / "lock").touch()
    kept = root / "1.2.3" / "2.25.1-run1"  # a recorded result set
    kept.mkdir(parents=True)
    held = os.open(alive / "lock", os.O_RDWR)  # a live process holds its lock
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        PreparedResults(ResultBuilder(0), root)
        assert not ended.exists()
        assert (alive / "1" / "sr.dcm").exists()
        assert kept.exists()
    finally:
        os.close(held)


def test_results_prepared_for_an_image_since_sent_again_changed_are_not_sent(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    # Prepared from the first copy of an image; the PACS then sends it again
    # with other pixels (same UIDs) before the timer ends. The results sent
    # are those of the study as it is now.
    config, port = start(tmp_path, model, destination, run_serve, stable_after=6.0)
    study = ct_study(2)
    before = prepared_results()
    assert store_datasets(port, study) == [SUCCESS] * 2
    wait_for(lambda: prepared_results()["built"] > before["built"], 10, "prepared")
    changed = make_ct(rows=64, columns=64, seed=99)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(changed, keyword, getattr(study[0], keyword))
    assert store_datasets(port, [changed]) == [SUCCESS]
    wait_for(lambda: status(config)["deliveries"]["done"] == 2, 60, "results sent")
    uid = str(study[0].StudyInstanceUID)
    assert_results_of(
        of_study(destination.received, uid), expected(model, [changed, study[1]])
    )
    assert prepared_results()["used"] == before["used"]


def test_a_study_with_a_report_beside_its_images_has_its_results_built_early_too(
    tmp_path: Path,
    model: Path,
    destination: Destination,
    run_serve: Callable[[NodeConfig], int],
) -> None:
    # A PACS sends the study whole: its images and a report the model does not
    # take. The report is passed over on arrival as its job passes it over.
    config, port = start(tmp_path, model, destination, run_serve, stable_after=3.0)
    study = ct_study(2)
    report = dcmread(corpus_file("reportsi.dcm"))
    report.StudyInstanceUID = study[0].StudyInstanceUID
    report.SeriesInstanceUID = generate_uid()
    report.SOPInstanceUID = generate_uid()
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    before = prepared_results()
    sent(config, port, [*study, report], done=2)
    assert prepared_results()["used"] - before["used"] == 1
    uid = str(study[0].StudyInstanceUID)
    assert_results_of(of_study(destination.received, uid), expected(model, study))
