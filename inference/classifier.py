"""Classifier: data sets -> batched frames -> model on cuda / cpu -> StudyPrediction."""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from functools import partial

import numpy as np
import numpy.typing as npt
import torch
from pydicom.dataset import Dataset
from torch import nn

from inference.artifact import Label, ModelArtifact
from inference.compiled import Compiled, compilable
from inference.findings import Explanation, LabelPrediction, StudyPrediction
from inference.gradcam import (
    from_stage,
    gradcam_split,
    gradcam_through,
    head,
    to_stage,
    trunk,
    upsample,
)
from inference.model import resolve_device
from inference.preprocess import Frames, FrameSource, heatmap_to_source, preprocess
from inference.variants import (
    OnnxTrunk,
    Trunk,
    int8_trunk,
    onnxruntime_version,
    use_int8_engine,
)

__all__ = [
    "Classifier",
    "Explanation",
    "LabelPrediction",
    "StudyPrediction",
    "StudyScores",
]

logger = logging.getLogger(__name__)

# A frame kept for Grad-CAM: probability, frame index, layer4 activations, input.
_Kept = tuple[float, int, torch.Tensor, torch.Tensor]

# Frames tied with the last of a label's top frames kept beyond top_k, at most.
_MAX_TIED = 16
# In place of a kept frame's input where Grad-CAM does not need it.
_NO_INPUT = torch.empty(0)

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class StudyScores:
    """A study's instances scored so far by one model, and what explaining needs.

    Filled by :meth:`Classifier.score_into` (instances in any order, over any
    number of calls: a node scores each image as it arrives) and read by
    :meth:`Classifier.prediction`. Each frame keeps its probabilities; only
    each label's ``top_k`` best frames keep their layer4 activations and input
    (for Grad-CAM without a second pass), so memory is a few bytes per frame
    plus ``labels x top_k`` frames' activations.

    Parameters
    ----------
    n_labels
        The model's label count.
    top_k
        How many of the highest-scoring frames per label are kept for heatmaps.
    keep_input
        Keep the top frames' input too (Grad-CAM at a layer before layer4
        runs the model again from it); at layer4 the activations suffice.
    """

    def __init__(self, n_labels: int, top_k: int, keep_input: bool = True) -> None:
        self.top_k = top_k
        self.keep_input = keep_input
        self.model_seconds = 0.0
        self._probabilities: dict[Hashable, list[torch.Tensor]] = {}
        self._sources: dict[Hashable, list[FrameSource]] = {}
        # Per label: (probability, arrival number, key, frame in instance,
        # activations, input), best first.
        self._kept: list[
            list[tuple[float, int, Hashable, int, torch.Tensor, torch.Tensor]]
        ] = [[] for _ in range(n_labels)]
        self._arrived = 0

    def keys(self) -> list[Hashable]:
        """Return the scored instances' keys, in the order they were scored."""
        return list(self._sources)

    def __contains__(self, key: object) -> bool:
        """Return whether an instance of this key was scored."""
        return key in self._sources

    def __len__(self) -> int:
        """Return the number of frames scored."""
        return sum(len(s) for s in self._sources.values())

    def add(
        self,
        key: Hashable,
        rows: Sequence[int],
        probabilities: torch.Tensor,
        sources: Sequence[FrameSource],
        features: torch.Tensor,
        pixels: torch.Tensor,
    ) -> None:
        """Add the frames ``rows`` of a batch, all of the instance ``key``.

        Parameters
        ----------
        key
            The instance (its frames may come over several batches, in order).
        rows
            The instance's rows in the batch.
        probabilities
            The batch's probabilities [N, labels].
        sources
            The batch's frame sources.
        features
            The batch's layer4 activations.
        pixels
            The batch's input.
        """
        self._probabilities.setdefault(key, []).append(probabilities[list(rows)])
        done = self._sources.setdefault(key, [])
        offset = len(done)
        done.extend(sources[r] for r in rows)
        first = self._arrived
        self._arrived += len(rows)
        if not self.top_k:
            return
        for label, best in enumerate(self._kept):
            scores = probabilities[list(rows), label]
            candidates = best + [
                (
                    float(scores[t]),
                    first + t,
                    key,
                    offset + t,
                    features[rows[t]],
                    pixels[rows[t]],
                )
                for t in torch.topk(scores, min(self.top_k, len(rows))).indices.tolist()
            ]
            candidates.sort(key=lambda c: (-c[0], c[1]))
            cut = candidates[: self.top_k]
            # Frames tied with the last kept one stay too (a few): which of
            # them is explained follows the study's order, known at the end.
            cut += [c for c in candidates[self.top_k :] if c[0] == cut[-1][0]][
                :_MAX_TIED
            ]
            # The new ones are views of the batch: copied, so it can go.
            self._kept[label] = [
                (p, n, k, f, a.clone(), x.clone() if self.keep_input else _NO_INPUT)
                if n >= first
                else (p, n, k, f, a, x)
                for p, n, k, f, a, x in cut
            ]

    def in_order(
        self, order: Sequence[Hashable]
    ) -> tuple[torch.Tensor, list[FrameSource], list[list[_Kept]]]:
        """Return probabilities, sources and kept frames, instances in ``order``."""
        start: dict[Hashable, int] = {}
        sources: list[FrameSource] = []
        for key in order:
            start[key] = len(sources)
            sources.extend(self._sources[key])
        probabilities = torch.cat(
            [p for key in order for p in self._probabilities[key]]
        )
        kept = [
            sorted(
                ((p, start[k] + f, a, x) for p, _, k, f, a, x in best),
                key=lambda c: (-c[0], c[1]),
            )[: self.top_k]
            for best in self._kept
        ]
        return probabilities, sources, kept


class Classifier:
    """Runs a model artifact on data sets.

    Parameters
    ----------
    artifact
        The model.
    device
        ``cuda``, ``cpu`` or e.g. ``cuda:1``; CUDA when available when None.
    precision
        ``fp32`` (default), or ``bf16`` / ``fp16`` autocast.
    batch_size
        Frames per forward pass; frames of several instances share a batch.
    preprocess_workers
        Threads preprocessing the next data sets while the model runs.
    trace
        On the CPU in fp32, run the convolutional trunk as one TorchScript
        graph (traced once here, same weights, same numbers): a forward pass
        then takes Python's GIL once instead of at every layer, so the other
        threads of a busy process (receiving, writing results, sending) do not
        stall it. Measured on 2 cores with one busy Python thread beside it:
        eager 92 ms per image, traced 38 (36 for both alone). Where tracing is
        not possible the model runs eagerly; :attr:`traced` says which.
    compiled
        The model as compiled from its file (:mod:`inference.compiled`): run
        instead of building the model, so that this process never imports
        torchvision. It is the traced graph (``trace`` makes no difference);
        only for a model :func:`inference.compiled.compilable` on ``device``,
        else ValueError.

    A deployment variant (:mod:`inference.variants`) runs as such: an int8
    model's trunk runs quantized on the CPU (on CUDA, the fp32 weights it
    carries run); an fp16 / bf16 model computes in that type on CUDA (autocast,
    its weights widened to fp32; a ``precision`` other than fp32 wins) and in
    fp32 on the CPU; an ONNX model's trunk runs in onnxruntime on the CPU
    where it is installed (else, and on CUDA, the fp32 weights it carries run).
    Grad-CAM at layer4 uses the trunk's activations; at layer2 / layer3 it runs
    the fp32 weights (a quantized or ONNX layer has no gradient in PyTorch).
    """

    def __init__(
        self,
        artifact: ModelArtifact,
        device: str | None = None,
        precision: str = "fp32",
        batch_size: int = 8,
        preprocess_workers: int = 1,
        trace: bool = False,
        compiled: Compiled | None = None,
    ) -> None:
        if precision not in _PRECISIONS:
            raise ValueError(
                f"precision: expected one of {sorted(_PRECISIONS)}, found {precision!r}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, found {batch_size}")
        self.artifact = artifact
        self.device = resolve_device(device)
        kind = artifact.variant.get("format") if artifact.variant else None
        if (
            kind in ("fp16", "bf16")
            and precision == "fp32"
            and self.device.type == "cuda"
        ):
            precision = str(kind)
        self.precision = precision
        self.batch_size = batch_size
        self.preprocess_workers = max(1, preprocess_workers)
        self.onnx = self.int8 = self.traced = False
        if compiled is not None:
            if not compilable(artifact, self.device, precision):
                raise ValueError(
                    f"compiled: model {artifact.name} runs uncompiled on "
                    f"{self.device} in {precision}"
                )
            self.model: nn.Module | None = None
            self._trunk: Callable[[torch.Tensor], torch.Tensor] = compiled.trunk
            self._head: Callable[[torch.Tensor], torch.Tensor] = compiled.head
            self._before, self._after = compiled.before, compiled.after
            self.traced = True
            self.int8 = kind == "int8"  # its trunk runs quantized, as built
            if self.int8:
                use_int8_engine()
            return
        self.model = artifact.build().to(self.device)
        self.model.to(memory_format=torch.channels_last)
        self._trunk = partial(trunk, self.model)
        self._head = partial(head, self.model)
        # Grad-CAM at layer2 / layer3: the fp32 network before and after it.
        layer = artifact.gradcam_layer
        self._before = partial(to_stage, self.model, layer=layer)
        self._after = partial(from_stage, self.model, layer=layer)
        self.int8 = kind == "int8" and self.device.type == "cpu"
        if self.int8:
            spec = artifact.preprocessing
            self._trunk = int8_trunk(
                self.model,
                spec.channels,
                spec.size,
                artifact.quantization,
                str(artifact.variant.get("torch", "")),
            )
        self.onnx = kind == "onnx" and self.device.type == "cpu"
        if self.onnx:
            if onnxruntime_version() is None:
                # The same weights are in the file: the model runs as trained.
                logger.warning(
                    "model %s is an ONNX variant and onnxruntime is not installed: "
                    "it runs in PyTorch (install dicom-node[onnx])",
                    artifact.name,
                )
                self.onnx = False
            else:
                self._trunk = OnnxTrunk(artifact.onnx_graph, torch.get_num_threads())
        self.traced = False
        if (
            trace
            and not self.onnx
            and self.device.type == "cpu"
            and _PRECISIONS[precision] is None
        ):
            self._trace(self.trunk_module())

    def trunk_module(self) -> nn.Module:
        """Return the trunk this model runs, as a module (to trace or compile).

        The fp32 ResNet's layers up to layer4, or an int8 variant's quantized
        trunk.

        Returns
        -------
        torch.nn.Module
            Input [N, C, H, W] -> layer4 activations.

        Raises
        ------
        ValueError
            For a compiled model (it has no modules) or an ONNX trunk.
        """
        if self.model is None or self.onnx:
            raise ValueError(f"model {self.artifact.name}: its trunk is not a module")
        if isinstance(self._trunk, nn.Module):  # int8, or traced
            return self._trunk
        return Trunk(self.model)

    def _trace(self, module: Callable[[torch.Tensor], torch.Tensor]) -> None:
        spec = self.artifact.preprocessing
        example = torch.zeros(
            (1, spec.channels, *spec.size), device=self.device
        ).contiguous(memory_format=torch.channels_last)
        try:
            with warnings.catch_warnings():
                # torch marks TorchScript deprecated; it still runs, and if a
                # version drops it the model runs eagerly (below).
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    graph = torch.jit.trace(  # type: ignore[no-untyped-call]
                        module, example
                    )
                with torch.inference_mode():
                    for _ in range(2):  # the first calls optimise the graph
                        graph(example)
        except Exception as exc:  # noqa: BLE001 - any failure: the eager model is correct
            where = traceback.extract_tb(exc.__traceback__)
            logger.warning(
                "model %s not traced (%s%s): it runs eagerly, slower",
                self.artifact.name,
                type(exc).__name__,
                f" at {where[-1].name}" if where else "",
            )
            return
        self._trunk = graph
        self.traced = True

    def _autocast(self) -> AbstractContextManager[object]:
        dtype = _PRECISIONS[self.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model on a batch; return probabilities and layer4 activations.

        Parameters
        ----------
        pixels
            float32 [N, C, H, W] from :func:`inference.preprocess`.

        Returns
        -------
        tuple of torch.Tensor
            Probabilities [N, labels] (sigmoid of the logits, float32, on the CPU)
            and layer4 activations [N, K, h, w] (on the model's device).
        """
        x = pixels.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last
        )
        with torch.inference_mode(), self._autocast():
            features = self._trunk(x)
            logits = self._head(features)
        return torch.sigmoid(logits.float()).cpu(), features

    def _batches(
        self, datasets: Sequence[Dataset], owners: Sequence[int]
    ) -> Iterator[tuple[Frames, list[int]]]:
        # Preprocess ahead in a thread (decoding and resizing release the GIL)
        # while the model runs on the previous batch. Each frame carries the
        # owner (study) of its data set.
        spec = self.artifact.preprocessing
        with ThreadPoolExecutor(
            self.preprocess_workers, thread_name_prefix="preprocess"
        ) as pool:
            pending: list[Frames] = []
            pending_owners: list[int] = []
            count = 0
            for frames, owner in zip(
                pool.map(lambda ds: preprocess(ds, spec), datasets), owners, strict=True
            ):
                pending.append(frames)
                pending_owners.extend([owner] * len(frames))
                count += len(frames)
                while count >= self.batch_size:
                    batch, pending, count = _take(pending, self.batch_size)
                    yield batch, pending_owners[: self.batch_size]
                    pending_owners = pending_owners[self.batch_size :]
            if count:
                batch, _, _ = _take(pending, count)
                yield batch, pending_owners

    def predict(
        self, datasets: Sequence[Dataset], explain_top_k: int = 0
    ) -> StudyPrediction:
        """Score a study, and explain its top frames per label with Grad-CAM.

        Parameters
        ----------
        datasets
            The study's instances (any order; multi-frame ones are split).
        explain_top_k
            How many of the highest-scoring frames per label get a heatmap.

        Returns
        -------
        StudyPrediction
            Per label the study-level probability and decision, per frame the
            probabilities, and the heatmaps.

        Raises
        ------
        inference.PreprocessError
            If a data set cannot be preprocessed.
        ValueError
            If ``datasets`` is empty.
        """
        return self.predict_many([datasets], explain_top_k)[0]

    def predict_many(
        self, studies: Sequence[Sequence[Dataset]], explain_top_k: int = 0
    ) -> list[StudyPrediction]:
        """Score several studies in shared batches: :meth:`predict` for each.

        Frames of different studies share forward passes (a burst of one-image
        studies is scored ``batch_size`` at a time); every study gets the result
        it would get alone.

        Parameters
        ----------
        studies
            Each study's instances.
        explain_top_k
            How many of the highest-scoring frames per label and study get a
            heatmap.

        Returns
        -------
        list of StudyPrediction
            One per study, in order.

        Raises
        ------
        inference.PreprocessError
            If a data set cannot be preprocessed (no study gets a result then).
        ValueError
            If a study has no instances.
        """
        if any(not datasets for datasets in studies):
            raise ValueError("datasets: a study needs at least one instance")
        scores = [self.study_scores(explain_top_k) for _ in studies]
        self.score_into(
            [
                (scores[s], i, ds)
                for s, study in enumerate(studies)
                for i, ds in enumerate(study)
            ]
        )
        return [
            self.prediction(part, range(len(study)))
            for part, study in zip(scores, studies, strict=True)
        ]

    def study_scores(self, explain_top_k: int = 0) -> StudyScores:
        """Return an empty :class:`StudyScores` for one study scored by this model.

        Parameters
        ----------
        explain_top_k
            How many of the highest-scoring frames per label get a heatmap.
        """
        return StudyScores(
            len(self.artifact.labels),
            explain_top_k,
            keep_input=self.artifact.gradcam_layer != "layer4",
        )

    def score_into(
        self, items: Sequence[tuple[StudyScores, Hashable, Dataset]]
    ) -> None:
        """Score instances in shared batches, each into its study's scores.

        Parameters
        ----------
        items
            (the study's scores, the instance's key in them, the instance).
            Instances of several studies share forward passes; a study's
            instances may come over several calls, in any order.

        Raises
        ------
        inference.PreprocessError
            If a data set cannot be preprocessed (what was added before stays).
        ValueError
            If an instance's key is already in its study's scores.
        """
        seen: set[tuple[int, Hashable]] = set()
        for part, key, _ in items:
            if key in part or (id(part), key) in seen:
                raise ValueError(f"instance {key!r} was scored already")
            seen.add((id(part), key))
        frames = [0] * len(items)
        started = time.perf_counter()
        for batch, owners in self._batches(
            [ds for _, _, ds in items], range(len(items))
        ):
            probs, features = self.forward(batch.pixels)
            for owner in dict.fromkeys(owners):
                rows = [i for i, o in enumerate(owners) if o == owner]
                part, key, _ = items[owner]
                part.add(key, rows, probs, batch.sources, features, batch.pixels)
                frames[owner] += len(rows)
        per_frame = (time.perf_counter() - started) / max(1, sum(frames))
        for (part, _, _), n in zip(items, frames, strict=True):
            part.model_seconds += per_frame * n

    def prediction(
        self, scores: StudyScores, order: Iterable[Hashable]
    ) -> StudyPrediction:
        """Aggregate a study's scores into its prediction, with its heatmaps.

        The result is that of :meth:`predict` on the study's instances in
        ``order``, however the instances were batched and whenever they came.

        Parameters
        ----------
        scores
            The study's scores.
        order
            The keys of every scored instance, in the study's order.

        Raises
        ------
        ValueError
            If ``order`` is not exactly the scored instances, or names none.
        """
        order = list(order)
        if not order or sorted(map(repr, order)) != sorted(map(repr, scores.keys())):
            raise ValueError("order: expected the keys of every scored instance")
        probabilities, sources, kept = scores.in_order(order)
        return self._study_prediction(
            probabilities, sources, kept, scores.model_seconds
        )

    def _study_prediction(
        self,
        probabilities: torch.Tensor,
        sources: list[FrameSource],
        kept: list[list[_Kept]],
        model_seconds: float = 0.0,
    ) -> StudyPrediction:
        frame_probs = probabilities.numpy().astype(np.float32)
        labels = tuple(
            self._label_prediction(label, frame_probs[:, i])
            for i, label in enumerate(self.artifact.labels)
        )
        started = time.perf_counter()
        explanations = tuple(
            self._explain(label, frame, feats, pixels, p, sources[frame])
            for label, best in enumerate(kept)
            for p, frame, feats, pixels in best
        )
        gradcam_seconds = time.perf_counter() - started if explanations else 0.0
        return StudyPrediction(
            model_name=self.artifact.name,
            model_version=self.artifact.version,
            device_uid=self.artifact.device_uid,
            labels=labels,
            frames=tuple(sources),
            frame_probabilities=frame_probs,
            explanations=explanations,
            model_seconds=model_seconds,
            gradcam_seconds=gradcam_seconds,
        )

    def explain(
        self, frames: Frames, label_index: int
    ) -> list[npt.NDArray[np.float32]]:
        """Grad-CAM heatmaps for a batch of frames, at each source image's resolution.

        Parameters
        ----------
        frames
            Preprocessed frames (from :func:`inference.preprocess`).
        label_index
            Which label to explain.

        Returns
        -------
        list of numpy.ndarray
            One float32 [rows, columns] heatmap in [0, 1] per frame.
        """
        if not 0 <= label_index < len(self.artifact.labels):
            raise ValueError(
                f"label_index: expected 0..{len(self.artifact.labels) - 1}, "
                f"found {label_index}"
            )
        heatmaps: list[npt.NDArray[np.float32]] = []
        size = self.artifact.preprocessing.size
        for start in range(0, len(frames), self.batch_size):
            pixels = frames.pixels[start : start + self.batch_size]
            cams = upsample(
                self._cams(pixels, label_index), size, self.artifact.gradcam_offset
            ).cpu()
            for cam, source in zip(
                cams, frames.sources[start : start + self.batch_size], strict=True
            ):
                heatmaps.append(
                    heatmap_to_source(cam, source).numpy().astype(np.float32)
                )
        return heatmaps

    def _label_prediction(
        self, label: Label, probs: npt.NDArray[np.float32]
    ) -> LabelPrediction:
        rule = self.artifact.aggregation
        if rule == "mean":
            value = float(probs.mean())
        elif rule == "topk_mean":
            k = min(self.artifact.top_k, len(probs))
            value = float(np.sort(probs)[-k:].mean())
        else:
            value = float(probs.max())
        return LabelPrediction(
            label=label,
            probability=value,
            positive=value >= label.threshold,
            top_frame=int(np.argmax(probs)),
        )

    def _cams(
        self, pixels: torch.Tensor, label: int, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Grad-CAM at the artifact's layer, at that layer's grid."""
        layer = self.artifact.gradcam_layer
        if layer != "layer4":
            x = pixels.to(self.device).contiguous(memory_format=torch.channels_last)
            return gradcam_split(self._before, self._after, x, label)
        if features is None:
            _, features = self.forward(pixels)
        return gradcam_through(self._head, features.float(), label)

    def _explain(
        self,
        label: int,
        frame: int,
        features: torch.Tensor,
        pixels: torch.Tensor,
        probability: float,
        source: FrameSource,
    ) -> Explanation:
        cam = self._cams(pixels[None], label, features[None])
        size = self.artifact.preprocessing.size
        at_input = upsample(cam, size, self.artifact.gradcam_offset)[0].cpu()
        heatmap = heatmap_to_source(at_input, source).numpy().astype(np.float32)
        return Explanation(label, frame, source, probability, heatmap)


def _take(pending: list[Frames], n: int) -> tuple[Frames, list[Frames], int]:
    pixels = torch.cat([f.pixels for f in pending])
    sources = [s for f in pending for s in f.sources]
    batch = Frames(pixels[:n], sources[:n])
    rest = Frames(pixels[n:], sources[n:])
    remaining = [rest] if len(rest) else []
    return batch, remaining, len(rest)
