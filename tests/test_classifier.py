"""Classifier and Grad-CAM: batching, aggregation, head-only Grad-CAM, a heatmap."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from pydicom import dcmread
from pydicom.dataset import Dataset

from inference import (
    ArtifactError,
    Classifier,
    build_model,
    gradcam_at,
    gradcam_full_backward,
    preprocess_many,
)
from inference.gradcam import gradcam, upsample
from tests.factories import corpus_file, make_ct
from tests.factories import make_artifact as artifact


def study() -> list[Dataset]:
    # Mixed sizes, a multi-frame MR (10 frames) and single-frame CTs: 16 frames.
    return [
        make_ct(rows=96, columns=80, seed=1),
        dcmread(corpus_file("emri_small.dcm")),
        make_ct(rows=64, columns=64, seed=2),
        dcmread(corpus_file("CT_small.dcm")),
        make_ct(rows=128, columns=128, seed=3),
        make_ct(rows=50, columns=70, seed=4),
        make_ct(rows=64, columns=64, seed=5),
    ]


def test_batching_gives_the_same_probabilities_as_one_by_one() -> None:
    datasets = study()
    batched = Classifier(artifact(), device="cpu", batch_size=8).predict(datasets)
    single = Classifier(artifact(), device="cpu", batch_size=1).predict(datasets)

    assert batched.frame_probabilities.shape == (16, 2)
    np.testing.assert_allclose(
        batched.frame_probabilities, single.frame_probabilities, atol=1e-5
    )
    assert [s.sop_instance_uid for s in batched.frames] == [
        s.sop_instance_uid for s in single.frames
    ]


def test_studies_scored_together_get_what_each_gets_alone() -> None:
    # Frames of several studies share forward passes (batches of 4 cut across
    # the studies); each study must still get its own result.
    whole = study()
    studies = [whole[:2], [whole[2]], whole[3:6], [whole[6]]]
    classifier = Classifier(artifact(), device="cpu", batch_size=4)

    together = classifier.predict_many(studies, explain_top_k=2)

    assert len(together) == len(studies)
    for datasets, shared in zip(studies, together, strict=True):
        alone = classifier.predict(datasets, explain_top_k=2)
        assert [f.sop_instance_uid for f in shared.frames] == [
            f.sop_instance_uid for f in alone.frames
        ]
        np.testing.assert_allclose(
            shared.frame_probabilities, alone.frame_probabilities, atol=1e-5
        )
        assert [(p.positive, p.top_frame) for p in shared.labels] == [
            (p.positive, p.top_frame) for p in alone.labels
        ]
        assert [(e.label_index, e.frame) for e in shared.explanations] == [
            (e.label_index, e.frame) for e in alone.explanations
        ]
        for a, b in zip(shared.explanations, alone.explanations, strict=True):
            np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)
    with pytest.raises(ValueError, match="at least one instance"):
        classifier.predict_many([whole[:1], []])


def assert_same_prediction(a: Any, b: Any) -> None:
    assert [f.sop_instance_uid for f in a.frames] == [
        f.sop_instance_uid for f in b.frames
    ]
    np.testing.assert_allclose(a.frame_probabilities, b.frame_probabilities, atol=1e-5)
    assert [(p.positive, p.top_frame) for p in a.labels] == [
        (p.positive, p.top_frame) for p in b.labels
    ]
    np.testing.assert_allclose(
        [p.probability for p in a.labels], [p.probability for p in b.labels], atol=1e-5
    )
    assert [(e.label_index, e.frame) for e in a.explanations] == [
        (e.label_index, e.frame) for e in b.explanations
    ]
    for x, y in zip(a.explanations, b.explanations, strict=True):
        np.testing.assert_allclose(x.heatmap, y.heatmap, atol=1e-4)


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_a_study_scored_image_by_image_as_it_arrives_gets_what_it_gets_at_once(
    layer: str,
) -> None:
    # The node scores each image when it arrives (a batch of one, or with
    # other studies' images), in whatever order, then aggregates once the
    # study is quiet: the prediction must be that of the whole study at once.
    # (Grad-CAM at layer4 is made from the kept activations, at layer3 from
    # the kept input.)
    datasets = study()
    model = artifact()
    model.gradcam_layer = layer
    classifier = Classifier(model, device="cpu", batch_size=4)
    whole = classifier.predict(datasets, explain_top_k=2)

    scores = classifier.study_scores(explain_top_k=2)
    other = classifier.study_scores(explain_top_k=2)
    arrival = [
        3,
        0,
        6,
        1,
        5,
        2,
        4,
    ]  # out of order, the MR (10 frames) in a batch of its own
    classifier.score_into([(scores, arrival[0], datasets[arrival[0]])])
    classifier.score_into(
        [(scores, i, datasets[i]) for i in arrival[1:3]]
        + [(other, "x", make_ct(rows=64, columns=64, seed=9))]
    )
    for i in arrival[3:]:
        classifier.score_into([(scores, i, datasets[i])])

    assert len(scores) == 16
    assert_same_prediction(classifier.prediction(scores, range(len(datasets))), whole)
    assert scores.model_seconds > 0
    # A late image: scored on arrival, the study aggregated again.
    late = make_ct(rows=80, columns=80, seed=11)
    classifier.score_into([(scores, 7, late)])
    assert_same_prediction(
        classifier.prediction(scores, range(8)),
        classifier.predict([*datasets, late], explain_top_k=2),
    )
    with pytest.raises(ValueError, match="every scored instance"):
        classifier.prediction(scores, range(7))
    with pytest.raises(ValueError, match="scored already"):
        classifier.score_into([(scores, 7, late)])


def test_tied_images_arriving_out_of_order_explain_what_the_study_at_once_does() -> (
    None
):
    # Two identical images tie exactly; scored at once, the first in the
    # study's order is explained: arriving in reverse order must not change it.
    image = make_ct(rows=64, columns=64, seed=3)
    copy = image.copy()
    copy.SOPInstanceUID = "1.2.3.4.5"
    classifier = Classifier(artifact(), device="cpu", batch_size=1)
    whole = classifier.predict([image, copy], explain_top_k=1)

    scores = classifier.study_scores(explain_top_k=1)
    classifier.score_into([(scores, 1, copy)])
    classifier.score_into([(scores, 0, image)])

    assert_same_prediction(classifier.prediction(scores, [0, 1]), whole)
    assert {e.frame for e in whole.explanations} == {0}
    with pytest.raises(ValueError, match="scored already"):
        # The same key twice in one call (an image sent again meanwhile).
        classifier.score_into([(scores, 2, copy), (scores, 2, image)])


@pytest.mark.parametrize("architecture", ["resnet18", "resnet50"])
def test_a_traced_model_gives_what_the_eager_one_gives(architecture: str) -> None:
    datasets = study()
    model = artifact(architecture=architecture)
    traced = Classifier(model, device="cpu", trace=True)
    eager = Classifier(model, device="cpu")
    assert traced.traced
    assert not eager.traced

    a = traced.predict(datasets, explain_top_k=2)
    b = eager.predict(datasets, explain_top_k=2)
    np.testing.assert_allclose(a.frame_probabilities, b.frame_probabilities, atol=1e-6)
    assert [(e.label_index, e.frame) for e in a.explanations] == [
        (e.label_index, e.frame) for e in b.explanations
    ]
    for x, y in zip(a.explanations, b.explanations, strict=True):
        np.testing.assert_allclose(x.heatmap, y.heatmap, atol=1e-5)
    # Batches of another size than the one traced with run the same graph.
    assert traced.predict(datasets[:1]).frame_probabilities.shape == (1, 2)


@pytest.mark.parametrize(("rule", "k"), [("max", 1), ("mean", 1), ("topk_mean", 3)])
def test_study_probability_follows_the_aggregation_rule(rule: str, k: int) -> None:
    prediction = Classifier(artifact(aggregation=rule, top_k=k), device="cpu").predict(
        study()
    )

    for i, label in enumerate(prediction.labels):
        frames = prediction.frame_probabilities[:, i]
        expected = {
            "max": frames.max(),
            "mean": frames.mean(),
            "topk_mean": np.sort(frames)[-3:].mean(),
        }[rule]
        assert label.probability == pytest.approx(float(expected), abs=1e-6)
        assert label.positive == (label.probability >= label.label.threshold)
        assert label.top_frame == int(frames.argmax())
    assert prediction.device_uid == "2.25.42"


def test_top_frames_are_explained_at_source_resolution() -> None:
    datasets = study()
    prediction = Classifier(artifact(), device="cpu", batch_size=4).predict(
        datasets, explain_top_k=2
    )

    assert len(prediction.explanations) == 4  # 2 labels x top 2
    for label in (0, 1):
        explained = [e for e in prediction.explanations if e.label_index == label]
        order = np.argsort(-prediction.frame_probabilities[:, label], kind="stable")[:2]
        assert [e.frame for e in explained] == order.tolist()
        for e in explained:
            assert e.heatmap.shape == (e.source.rows, e.source.columns)
            assert e.heatmap.min() >= 0.0
            assert e.heatmap.max() <= 1.0
            assert e.probability == pytest.approx(
                float(prediction.frame_probabilities[e.frame, label])
            )


def test_explain_frames_matches_the_explanations_of_predict() -> None:
    datasets = study()
    classifier = Classifier(artifact(), device="cpu", batch_size=4)
    prediction = classifier.predict(datasets, explain_top_k=1)
    frames = preprocess_many(datasets, classifier.artifact.preprocessing)

    heatmaps = classifier.explain(frames, 1)

    assert len(heatmaps) == 16
    assert [h.shape for h in heatmaps] == [(s.rows, s.columns) for s in frames.sources]
    top = next(e for e in prediction.explanations if e.label_index == 1)
    np.testing.assert_allclose(heatmaps[top.frame], top.heatmap, atol=1e-5)
    with pytest.raises(ValueError, match="label_index"):
        classifier.explain(frames, 2)


def test_bf16_autocast_stays_close_to_fp32() -> None:
    datasets = study()[:3]
    fp32 = Classifier(artifact(), device="cpu").predict(datasets)
    bf16 = Classifier(artifact(), device="cpu", precision="bf16").predict(datasets)

    np.testing.assert_allclose(
        bf16.frame_probabilities, fp32.frame_probabilities, atol=0.05
    )


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        Classifier(artifact(), device="cpu", precision="int4")
    with pytest.raises(ValueError, match="at least one instance"):
        Classifier(artifact(), device="cpu").predict([])


@pytest.mark.parametrize("architecture", ["resnet18", "resnet50"])
def test_head_only_gradcam_equals_full_backward(architecture: str) -> None:
    art = artifact(architecture, size=96)
    model = art.build()
    x = preprocess_many(study()[:4], art.preprocessing).pixels[:6]

    for label in (0, 1):
        fast, logits = gradcam(model, x, label)
        classic = gradcam_full_backward(model, x, label)
        assert fast.shape == (6, 96, 96)
        torch.testing.assert_close(fast, classic, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())  # no side effects


@pytest.mark.parametrize("layer", ["layer2", "layer3"])
def test_gradcam_at_an_earlier_stage_equals_full_backward(layer: str) -> None:
    art = artifact(size=96)
    model = art.build()
    x = preprocess_many(study()[:4], art.preprocessing).pixels[:6]
    side = {"layer2": 12, "layer3": 6}[layer]

    for label in (0, 1):
        cams = gradcam_at(model, x, label, layer)
        assert cams.shape == (6, side, side)
        classic = gradcam_full_backward(model, x, label, layer)
        torch.testing.assert_close(
            upsample(cams, (96, 96)),
            classic,
            atol=1e-5,
            rtol=1e-4,
        )
    assert all(p.grad is None for p in model.parameters())

    # A model that names the stage explains there: heatmaps at source size.
    finer = Classifier(dataclasses.replace(art, gradcam_layer=layer), device="cpu")
    prediction = finer.predict(study()[:2], explain_top_k=1)
    for e in prediction.explanations:
        assert e.heatmap.shape == (e.source.rows, e.source.columns)
    with pytest.raises(ArtifactError, match="gradcam_layer"):
        dataclasses.replace(art, gradcam_layer="layer1")


@pytest.mark.parametrize("layer", ["layer2", "layer3", "layer4"])
def test_a_heatmap_cell_lands_where_that_cell_looks(layer: str) -> None:
    # The input pixels a stage's cell depends on (its receptive field: where the
    # gradient is not zero) are centred on one pixel; a heatmap hot in that cell
    # alone must peak there, or a small lesion's evidence is drawn beside it.
    size = 512  # large enough for layer4's field (435 px) to fit inside
    model = build_model("resnet18", 1, 1).eval()
    x = torch.randn(4, 1, size, size, requires_grad=True)
    m: Any = model
    a = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        a = getattr(m, stage)(a)
        if stage == layer:
            break
    side = a.shape[-1]
    for i, j in ((side // 2, side // 2), (side // 2 - 1, side // 2 + 1)):
        (grad,) = torch.autograd.grad(a[:, :, i, j].sum(), x, retain_graph=True)
        field = grad.abs().sum(dim=(0, 1)) > 0
        rows = torch.nonzero(field.any(dim=1)).flatten()
        cols = torch.nonzero(field.any(dim=0)).flatten()
        centre = (int(rows[0] + rows[-1]) / 2, int(cols[0] + cols[-1]) / 2)
        one_hot = torch.zeros(1, side, side)
        one_hot[0, i, j] = 1.0
        heatmap = upsample(one_hot, (size, size))[0]
        peak = divmod(int(heatmap.argmax()), size)
        assert peak == pytest.approx(centre)
        assert float(heatmap.max()) == pytest.approx(1.0)
        # A model whose cells respond off-centre draws them where they respond.
        moved = upsample(one_hot, (size, size), offset=(-5.0, 3.0))[0]
        peak = divmod(int(moved.argmax()), size)
        assert peak == pytest.approx((centre[0] - 5, centre[1] + 3))


def squares(
    n: int, generator: torch.Generator, size: int = 128, side: int = 28
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int] | None]]:
    """Noise images; every other one carries a bright square at a random place."""
    x = torch.rand(n, 1, size, size, generator=generator) * 0.3
    y = torch.zeros(n)
    where: list[tuple[int, int] | None] = []
    for i in range(n):
        if i % 2:
            where.append(None)
            continue
        r, c = torch.randint(0, size - side, (2,), generator=generator).tolist()
        x[i, 0, r : r + side, c : c + side] += 0.6
        y[i] = 1.0
        where.append((r, c))
    return (x - 0.5) / 0.25, y, where


@pytest.mark.slow
def test_heatmap_peaks_on_the_planted_square() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 1, 1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        x, y, _ = squares(16, generator)
        model.train()
        loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    model.eval()

    x, y, where = squares(20, torch.Generator().manual_seed(7))
    heatmaps, logits = gradcam(model, x, 0)

    probs = torch.sigmoid(logits[:, 0])
    assert probs[y == 1].min() > probs[y == 0].max()  # it did learn the task
    hits, contrast = 0, []
    for heatmap, place in zip(heatmaps, where, strict=True):
        if place is None:
            continue
        r, c = place
        inside = torch.zeros_like(heatmap, dtype=torch.bool)
        inside[r : r + 28, c : c + 28] = True
        contrast.append(float(heatmap[inside].mean() / heatmap[~inside].mean()))
        peak_r, peak_c = divmod(int(heatmap.argmax()), heatmap.shape[1])
        # layer4 sees 32-pixel cells: allow half a cell around the square.
        hits += r - 16 <= peak_r < r + 28 + 16 and c - 16 <= peak_c < c + 28 + 16
    assert hits >= 8  # of 10
    # Hotter on every square than around it, twice as hot on most. (What a cell
    # has learnt to respond to sits a few pixels off its receptive field's
    # centre, up to half a 32-px cell in a model this young.)
    assert min(contrast) > 1.3
    assert float(np.median(contrast)) > 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    datasets: Sequence[Dataset] = study()
    cpu = Classifier(artifact(), device="cpu").predict(datasets, explain_top_k=1)
    gpu = Classifier(artifact(), device="cuda").predict(datasets, explain_top_k=1)

    np.testing.assert_allclose(
        gpu.frame_probabilities, cpu.frame_probabilities, atol=1e-3
    )
    np.testing.assert_allclose(
        gpu.explanations[0].heatmap, cpu.explanations[0].heatmap, atol=1e-2
    )
