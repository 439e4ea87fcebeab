"""fit: two-stage transfer learning with early stopping, checkpoints and resume."""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from inference import (
    GRADCAM_LAYERS,
    Classifier,
    CodedConcept,
    Frames,
    Label,
    ModelArtifact,
    PreprocessSpec,
    build_model,
)
from inference.preprocess import preprocess
from training.config import KNOWN_FINDINGS, DataSizes, TrainConfig
from training.data import (
    IMAGE_SUFFIXES,
    DataError,
    Sample,
    image_size,
    mask_frame,
    preprocessed,
    split_by_patient,
)
from training.metrics import (
    auroc,
    pointing_game,
    threshold_for_sensitivity,
    youden_threshold,
)
from training.progress import Progress, bar

__all__ = [
    "Dataset",
    "FitResult",
    "augment",
    "batch_starts",
    "cell_loss",
    "cuda_autocast_dtype",
    "evaluate",
    "fit",
    "load_frames",
    "measure",
    "schedule",
    "train_one_epoch",
]

_STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")


@dataclass(slots=True)
class Dataset:
    """Frames in memory with their labels and where each came from.

    Parameters
    ----------
    x
        float32 [N, C, H, W], normalized.
    y
        float32 [N]: 1 positive, 0 negative.
    samples
        The file of each frame.
    masks
        bool [N, 1, H, W]: where each frame's lesion is, in the input's
        geometry (all False where none is known), or None when no mask was
        loaded or none marks a pixel.
    """

    x: torch.Tensor
    y: torch.Tensor
    samples: list[Sample] = field(default_factory=list)
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        """Return the number of frames."""
        return int(self.y.shape[0])


def load_frames(
    samples: Sequence[Sample],
    positive: str,
    spec: PreprocessSpec,
    cache: Path | None,
    progress: Progress | None = None,
    masks: bool = False,
) -> Dataset:
    """Preprocess every sample (through the cache) into one in-memory data set.

    Parameters
    ----------
    samples
        The files.
    positive
        The positive class name.
    spec
        The preprocessing spec.
    cache
        Cache folder, or None.
    progress
        Called with 1 after each sample.
    masks
        Load the lesion masks of the positive single-frame samples that have
        one (for training: the other uses read them at the image's size).

    Returns
    -------
    Dataset
        One row per frame (a multi-frame file gives several).

    Raises
    ------
    DataError
        If a file cannot be read, or a mask is not its image's size.
    """
    xs: list[torch.Tensor] = []
    ys: list[float] = []
    owners: list[Sample] = []
    height, width = spec.size
    lesions: list[torch.Tensor] = []
    for sample in samples:
        frames = preprocessed(sample, spec, cache)
        xs.append(frames)
        ys += [float(sample.label == positive)] * len(frames)
        owners += [sample] * len(frames)
        lesion = sample.mask if sample.label == positive else None
        if masks and lesion is not None and len(frames) == 1:
            lesions.append(mask_frame(lesion, spec, image_size(sample.path)))
        elif masks:
            blank = torch.zeros((len(frames), 1, height, width), dtype=torch.bool)
            lesions.append(blank)
        if progress is not None:
            progress(1)
    x = torch.cat(xs) if xs else torch.empty((0, spec.channels, height, width))
    known = torch.cat(lesions) if lesions else None
    return Dataset(
        x,
        torch.tensor(ys, dtype=torch.float32),
        owners,
        known if known is not None and bool(known.any()) else None,
    )


def augment(
    x: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    part: slice = slice(None),
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly rotate, shift, scale, flip and change the intensity of a batch.

    Each image gets its own parameters; the geometry is one affine grid sample,
    which moves the lesion masks with their images.

    Parameters
    ----------
    x
        Normalized batch [N, C, H, W], or this process's part of a batch.
    config
        The augmentation settings.
    generator
        Random source (seeded, so a run can be repeated).
    part
        Under DDP, which images of the whole batch ``x`` holds: the parameters
        are drawn for the whole batch, so every process draws the same numbers
        and the generators stay in step.
    masks
        bool [N, 1, H, W] lesion masks of the batch, or None.

    Returns
    -------
    tuple
        The augmented batch, and its masks moved the same way (or None).
    """
    n = x.shape[0] if part.stop is None else int(part.stop)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-config.rotation, config.rotation) * math.pi / 180
    zoom = uniform(1 - config.scale, 1 + config.scale)
    shift_x = uniform(-config.translate, config.translate) * 2
    shift_y = uniform(-config.translate, config.translate) * 2
    flip_x = (
        torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        if config.hflip
        else torch.ones(n)
    )
    flip_y = (
        torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        if config.vflip
        else torch.ones(n)
    )
    contrast = uniform(1 - config.intensity, 1 + config.intensity)
    brightness = uniform(-config.intensity, config.intensity) * 2
    angle, zoom, shift_x, shift_y, flip_x, flip_y, contrast, brightness = (
        t[part]
        for t in (angle, zoom, shift_x, shift_y, flip_x, flip_y, contrast, brightness)
    )
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos * flip_x, -sin, shift_x], dim=1),
            torch.stack([sin, cos * flip_y, shift_y], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Pad with the image's own minimum (black after normalization).
    floor = x.amin(dim=(1, 2, 3), keepdim=True)
    out = (
        F.grid_sample(x - floor, grid, align_corners=False, padding_mode="zeros")
        + floor
    )
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    moved = (
        None
        if masks is None
        else F.grid_sample(masks.float(), grid, align_corners=False) > 0.5
    )
    return (
        (out - mean) * contrast.view(-1, 1, 1, 1) + mean + brightness.view(-1, 1, 1, 1)
    ), moved


def mixup(
    x: torch.Tensor,
    target: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor | None,
    alpha: float,
    generator: torch.Generator,
    whole: int,
    part: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Blend a batch with a shuffled copy of itself (mixup, ``config.mixup``).

    One weight ``lam ~ Beta(alpha, alpha)`` per batch: images and targets become
    ``lam * a + (1 - lam) * b``. For the cell loss, a blend holds a finding when
    either image does (its lesion stays visible, fainter), and the masks are
    united.

    Parameters
    ----------
    x, target, y
        This process's part of the batch, its soft targets and its labels.
    masks
        Its lesion masks, or None.
    alpha
        The Beta distribution's parameter.
    generator
        Random source. Under DDP each process blends within its part, drawing
        the numbers of the whole batch (``whole`` images) so that the
        processes' generators stay in step.
    whole
        Images in the whole batch.
    part
        Which of them this process holds.

    Returns
    -------
    tuple
        The blended images, targets, labels (for the cell loss) and masks.
    """
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    order = torch.rand(whole, generator=generator)[part].argsort()
    x = lam * x + (1 - lam) * x[order]
    target = lam * target + (1 - lam) * target[order]
    y = torch.maximum(y, y[order])
    if masks is not None:
        masks = masks | masks[order]
    return x, target, y, masks


def _freeze(model: nn.Module, train_from: str | None) -> list[nn.Parameter]:
    """Train the head, and the backbone from ``train_from`` on (None: head only)."""
    start = len(_STAGES) if train_from is None else _STAGES.index(train_from)
    trainable: set[str] = {"fc"} | set(_STAGES[start:])
    if train_from == "conv1":
        trainable |= {"bn1"}
    params = []
    for name, param in model.named_parameters():
        param.requires_grad = name.split(".")[0] in trainable
        if param.requires_grad:
            params.append(param)
    return params


def schedule(steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Return the learning-rate factor of each step: linear warm-up, cosine decay."""
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batches(
    data: Dataset,
    batch_size: int,
    config: TrainConfig,
    generator: torch.Generator,
    world: int = 1,
) -> list[torch.Tensor]:
    n = len(data)
    if config.balance == "sampler":
        positives = float(data.y.sum())
        weights = torch.where(
            data.y > 0, 1 / max(positives, 1), 1 / max(n - positives, 1)
        )
        order = torch.multinomial(weights, n, replacement=True, generator=generator)
    else:
        order = torch.randperm(n, generator=generator)
    return [order[i : i + batch_size] for i in batch_starts(n, batch_size, world)]


def batch_starts(n: int, batch_size: int, world: int = 1) -> range:
    """Return where each batch of an epoch starts (their number: steps per epoch).

    A last batch that would leave a process a single frame is left out:
    BatchNorm cannot train on one frame.

    Parameters
    ----------
    n
        Frames in the epoch.
    batch_size
        Frames per batch, over all processes.
    world
        Processes that share each batch (DDP world size).

    Returns
    -------
    range
        The index of each batch's first frame.
    """
    return range(0, n + 1 - 2 * world, batch_size)


def cell_loss(
    model: nn.Module,
    features: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-location loss of a batch (``cell_loss``).

    The head applied to every layer4 cell gives that location's logit (the
    image's logit is their mean). In an image without the finding every
    location should score negative; in an image with a lesion mask, the
    locations the lesion reaches should score positive (the others are left
    free: the image's own loss already wants their mean positive).

    Parameters
    ----------
    model
        The ResNet (not its DDP wrapper).
    features
        layer4 output [N, K, h, w] of the batch.
    y
        Labels [N] (1 positive, 0 negative).
    masks
        bool [N, 1, H, W] lesion masks in the input's geometry, or None.

    Returns
    -------
    torch.Tensor
        Mean binary cross-entropy of the negatives' cells against 0, plus that
        of the lesion cells against 1 (each 0 when there is none).
    """
    fc = cast(nn.Module, cast(Any, model).fc)
    cells: torch.Tensor = fc(features.permute(0, 2, 3, 1))[..., 0].float()  # [N, h, w]
    loss = cells.sum() * 0.0  # keeps the graph the same for DDP
    negative = cells[y == 0]
    if negative.numel():
        loss = loss + F.binary_cross_entropy_with_logits(
            negative, torch.zeros_like(negative)
        )
    if masks is not None:
        reached = F.adaptive_max_pool2d(masks.float(), cells.shape[-2:])[:, 0] > 0
        lesion = cells[reached & (y == 1).view(-1, 1, 1)]
        if lesion.numel():
            loss = loss + F.binary_cross_entropy_with_logits(
                lesion, torch.ones_like(lesion)
            )
    return loss


def train_one_epoch(
    model: nn.Module,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    pos_weight: torch.Tensor | None,
    device: torch.device,
    generator: torch.Generator,
    progress: Callable[[int, int, float, float], None] | None = None,
    rank: int = 0,
    world: int = 1,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float]:
    """Train for one pass over the data.

    Parameters
    ----------
    model
        The model.
    data
        Training frames.
    optimizer
        The optimizer.
    scheduler
        Stepped after every batch.
    config
        Training settings (augmentation, smoothing, balance, precision).
    pos_weight
        Weight of the positive class in the loss, or None.
    device
        Where to train.
    generator
        Random source for the order and the augmentation.
    progress
        Called with (batch, batches, mean loss, images/s) after each batch.
    rank, world
        Under DDP: this process's rank and the number of processes. Every
        process draws the same batch order and augmentation from its generator
        and trains on every ``world``-th image of each batch (the model wrapper
        averages the gradients), so a batch is ``batch_size`` images in all.
    scaler
        Scales the loss where the forward pass runs in fp16 (CUDA without
        bf16: see :func:`cuda_autocast_dtype`), so that small gradients do not
        underflow to zero; None (or disabled) elsewhere.

    Returns
    -------
    tuple of float
        Mean loss and images per second (of all processes together).
    """
    model.train()
    batches = _batches(data, config.batch_size, config, generator, world)
    total, seen, started = 0.0, 0, time.perf_counter()
    base = model.module if isinstance(model, DistributedDataParallel) else model
    layer4: list[torch.Tensor] = []  # this batch's layer4 output, for cell_loss
    hook = (
        cast(nn.Module, base.layer4).register_forward_hook(
            lambda _m, _i, out: layer4.append(out)
        )
        if config.cell_loss > 0
        else None
    )
    try:
        for i, whole in enumerate(batches):
            part = slice(rank, len(whole), world)
            index = whole[part]
            x = data.x[index]
            masks = None if data.masks is None else data.masks[index]
            if config.augment:
                x, masks = augment(
                    x, config, generator, part if world > 1 else slice(None), masks
                )
            y = data.y[index]
            target = y * (1 - config.label_smoothing) + config.label_smoothing / 2
            if config.mixup > 0:
                x, target, y, masks = mixup(
                    x, target, y, masks, config.mixup, generator, len(whole), part
                )
            x = x.to(device, memory_format=torch.channels_last)
            target = target.to(device)
            with _autocast(device, config):
                logits = model(x)[:, 0].float()
            loss = F.binary_cross_entropy_with_logits(
                logits, target, pos_weight=pos_weight
            )
            if hook is not None:
                with _autocast(device, config):
                    cells = cell_loss(
                        base,
                        layer4.pop(),
                        y.to(device),
                        None if masks is None else masks.to(device),
                    )
                loss = loss + config.cell_loss * cells
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None and scaler.is_enabled():
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                scaler.step(optimizer)  # skipped when a gradient overflowed
                scaler.update()
            else:
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
            seen += len(index)
            if progress:
                progress(
                    i + 1,
                    len(batches),
                    total / seen,
                    seen * world / (time.perf_counter() - started),
                )
    finally:
        if hook is not None:
            hook.remove()
    elapsed = time.perf_counter() - started
    if world > 1:
        sums = torch.tensor([total, float(seen)], dtype=torch.float64)
        dist.all_reduce(sums)
        total, seen = float(sums[0]), int(sums[1])
    return total / max(seen, 1), seen / elapsed


def cuda_autocast_dtype() -> torch.dtype:
    """Return the mixed-precision type of training on CUDA: bf16 where it exists.

    bf16 (Ampere and newer) keeps fp32's exponent range, so gradients need no
    scaling; older GPUs get fp16, trained with a GradScaler.
    """
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, config: TrainConfig) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=cuda_autocast_dtype())
    if config.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 64
) -> tuple[float, np.ndarray[Any, np.dtype[np.float64]]]:
    """Return the mean loss and the probability of every frame.

    Parameters
    ----------
    model
        The model (put in eval mode here).
    data
        The frames.
    device
        Where to run.
    batch_size
        Frames per forward.

    Returns
    -------
    tuple
        Mean binary cross-entropy and the probabilities.
    """
    model.eval()
    probs: list[torch.Tensor] = []
    total = 0.0
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(device)
        y = data.y[start : start + batch_size].to(device)
        logits = model(x)[:, 0].float()
        total += float(F.binary_cross_entropy_with_logits(logits, y, reduction="sum"))
        probs.append(torch.sigmoid(logits).cpu())
    p = torch.cat(probs).double().numpy() if probs else np.zeros(0)
    return total / max(len(data), 1), p


@dataclass(slots=True)
class FitResult:
    """What fit produced.

    Parameters
    ----------
    artifact
        The model, ready to save.
    history
        One row per epoch: epoch, stage, train_loss, val_loss, val_auroc, images_s.
    metrics
        Validation (and test) figures at the chosen threshold.
    splits
        The samples of each split.
    val
        The validation frames.
    val_scores
        The best model's probability for each validation frame.
    rank
        Under DDP, this process's rank: only rank 0 writes outputs.
    """

    artifact: ModelArtifact
    history: list[dict[str, float]]
    metrics: dict[str, Any]
    splits: dict[str, list[Sample]]
    val: Dataset
    val_scores: np.ndarray[Any, np.dtype[np.float64]]
    rank: int = 0


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1).

    Parameters
    ----------
    device
        The device asked for: CUDA becomes this process's local GPU (nccl);
        the CPU uses gloo.

    Returns
    -------
    tuple
        Rank, number of processes, and the device this process trains on.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _concept(text: str, where: str) -> CodedConcept:
    parts = [p.strip() for p in text.split(",", 2)]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{where}: expected value,scheme,meaning, found {text!r}")
    try:
        return CodedConcept(*parts)
    except ValueError as exc:  # a part the result objects cannot hold
        raise ValueError(f"{where}: {exc}") from exc


def _positive_label(samples: Sequence[Sample], config: TrainConfig) -> str:
    labels = sorted({s.label for s in samples})
    if config.positive:
        if config.positive not in labels:
            raise DataError(f"positive class {config.positive!r} is not among {labels}")
        return config.positive
    if len(labels) != 2:
        raise DataError(f"expected two classes, found {labels}; name the positive one")
    negatives = [
        label for label in labels if label.lower() in {"normal", "negative", "absent"}
    ]
    if len(negatives) != 1:
        raise DataError(
            f"cannot tell the positive class among {labels}; give --positive"
        )
    return next(label for label in labels if label not in negatives)


def fit(
    samples: Sequence[Sample],
    config: TrainConfig,
    checkpoint: Path,
    cache: Path | None,
    device: torch.device,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> FitResult:
    """Train a model and choose its operating threshold on validation data.

    Stage 1 trains the head with the backbone frozen for ``freeze_epochs``;
    stage 2 fine-tunes from ``unfreeze_from`` on with ``finetune_lr``. AdamW with
    warm-up and cosine decay in each stage; early stopping on validation loss;
    the best epoch's weights are kept. After every epoch a checkpoint is written,
    from which ``resume`` continues (model, optimizer, scheduler, epoch, RNG).

    Parameters
    ----------
    samples
        The labelled files.
    config
        The settings.
    checkpoint
        Where the resumable checkpoint lives.
    cache
        Preprocessing cache folder.
    device
        Where to train. Under ``torchrun`` (WORLD_SIZE > 1) the processes
        train one model with DDP: gloo on the CPU, nccl with one GPU each.
    resume
        Continue from ``checkpoint``.
    log
        Where the per-epoch lines go (rank 0 only).
    on_epoch
        Called on rank 0 after each epoch with its number (from 1) and the
        model as it stands (e.g. to keep each epoch's weights; do not change it).

    Returns
    -------
    FitResult
        The artifact, the history and the metrics.
    """
    rank, world, device = init_distributed(device)
    if config.batch_size < 2 * world:
        raise ValueError(
            f"--batch-size: {config.batch_size} is shared among {world} processes; "
            f"expected at least {2 * world} (two frames each, for BatchNorm)"
        )
    if rank != 0:
        log = _silent
    positive = _positive_label(samples, config)
    code = config.code or (
        f"{KNOWN_FINDINGS[positive][0]},SCT,{KNOWN_FINDINGS[positive][1]}"
        if positive in KNOWN_FINDINGS
        else ""
    )
    if not code:
        raise DataError(
            f"no code known for {positive!r}; the known findings are "
            f"{', '.join(sorted(KNOWN_FINDINGS))}. Name the class after one of "
            "them, or give the finding's coded concept as value,scheme,meaning, "
            'e.g. --code "27925004,SCT,Nodule" (SNOMED CT)'
        )
    concept = _concept(code, "--code")
    site = (
        _concept(config.finding_site, "--finding-site") if config.finding_site else None
    )
    test_fraction = config.test_fraction
    splits = split_by_patient(
        samples,
        (1 - config.val_fraction - test_fraction, config.val_fraction, test_fraction),
        config.seed,
    )
    if not splits["train"] or not splits["val"]:
        raise DataError("too few patients to split into training and validation")
    spec = PreprocessSpec(
        size=(config.size, config.size),
        channels=config.channels,
        window=config.window,
        window_center=config.window_center,
        window_width=config.window_width,
        resize=config.resize,
        mean=(0.5,) * config.channels,
        std=(0.25,) * config.channels,
    )
    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 fills the cache first; the others read it
    total = len(splits["train"]) + len(splits["val"])
    with bar(total, "preprocessing", show=rank == 0) as shown:
        train = load_frames(
            splits["train"],
            positive,
            spec,
            cache,
            shown.update,
            masks=config.cell_loss > 0,
        )
        val = load_frames(splits["val"], positive, spec, cache, shown.update)
    if world > 1 and rank == 0:
        dist.barrier()
    if float(train.y.sum()) in (0.0, float(len(train))):
        raise DataError("the training split holds one class only")
    log(
        f"{len(train)} training and {len(val)} validation frames "
        f"({int(train.y.sum())} / {int(val.y.sum())} positive '{positive}')"
        + (f", {world} processes (DDP)" if world > 1 else "")
    )

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    init = Path(config.init_weights) if config.init_weights else None
    # channels_last: the convolutions run about 10 % faster on this CPU.
    model = build_model(
        config.architecture, 1, config.channels, config.dropout, init
    ).to(device, memory_format=torch.channels_last)
    positives = float(train.y.sum())
    pos_weight = (
        torch.tensor((len(train) - positives) / positives, device=device)
        if config.balance == "weighted"
        else None
    )
    steps_per_epoch = len(batch_starts(len(train), config.batch_size, world))
    scaler = torch.amp.GradScaler(  # only fp16 needs its loss scaled
        "cuda",
        enabled=device.type == "cuda" and cuda_autocast_dtype() == torch.float16,
    )

    def stage_of(epoch: int) -> int:
        return 1 if epoch < config.freeze_epochs else 2

    net: nn.Module = model

    def make_optimizer(
        stage: int,
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        nonlocal net
        params = _freeze(model, None if stage == 1 else config.unfreeze_from)
        if world > 1:  # DDP takes the parameters that train in this stage
            net = DistributedDataParallel(model)
        lr = config.lr if stage == 1 else config.finetune_lr
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
        epochs = (
            config.freeze_epochs if stage == 1 else config.epochs - config.freeze_epochs
        )
        factor = schedule(max(1, epochs * steps_per_epoch), config.warmup_fraction)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    state: dict[str, Any] = {
        "epoch": 0,
        "history": [],
        "best_loss": math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "best_state": copy.deepcopy(model.state_dict()),
    }
    optimizer, scheduler = make_optimizer(stage_of(0))
    if resume:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        # The run goes on with the settings it began with (a default may have
        # changed since, or a flag been left out): a different one is refused.
        before = saved.get("config", config.to_dict())
        defaults = TrainConfig().to_dict()  # a key newer than the checkpoint
        changed = [
            f"{key} {before.get(key, defaults[key])!r} there, {value!r} now"
            for key, value in config.to_dict().items()
            if before.get(key, defaults[key]) != value
        ]
        if changed:
            raise DataError(
                f"--resume: {checkpoint.name} was made with other settings ("
                + "; ".join(changed)
                + "); give the flags it was made with (a default chosen for the "
                "data, such as the epochs, may have changed since)"
            )
        model.load_state_dict(saved["model"])
        optimizer, scheduler = make_optimizer(stage_of(int(saved["epoch"])))
        if stage_of(int(saved["epoch"])) == saved["stage"]:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        state = {
            k: saved[k]
            for k in (
                "epoch",
                "history",
                "best_loss",
                "best_epoch",
                "bad_epochs",
                "best_state",
            )
        }
        log(
            f"resumed after epoch {state['epoch']} "
            f"(best so far: epoch {state['best_epoch'] + 1})"
        )

    for epoch in range(int(state["epoch"]), config.epochs):
        stage = stage_of(epoch)
        if epoch > 0 and stage != stage_of(epoch - 1):
            optimizer, scheduler = make_optimizer(stage)
        what = f"epoch {epoch + 1}/{config.epochs}"
        with bar(steps_per_epoch, what, unit="batch", show=rank == 0) as shown:

            def progress(
                i: int, n: int, loss: float, rate: float, shown: Any = shown
            ) -> None:
                shown.set_postfix_str(f"loss {loss:.4f}, {rate:.1f} img/s", False)
                shown.update(i - shown.n)

            train_loss, rate = train_one_epoch(
                net,
                train,
                optimizer,
                scheduler,
                config,
                pos_weight,
                device,
                generator,
                progress,
                rank,
                world,
                scaler,
            )
        if world > 1:  # the same BatchNorm statistics everywhere, so the same
            for buffer in model.buffers():  # validation loss and stop decision
                dist.broadcast(buffer, 0)
        val_loss, val_probs = evaluate(model, val, device)
        val_auc = auroc(val_probs, val.y.numpy())
        state["history"].append(
            {
                "epoch": epoch + 1,
                "stage": stage,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_auroc": val_auc,
                "images_s": rate,
            }
        )
        improved = val_loss < state["best_loss"] - 1e-4
        if improved:
            state["best_loss"], state["best_epoch"], state["bad_epochs"] = (
                val_loss,
                epoch,
                0,
            )
            state["best_state"] = copy.deepcopy(model.state_dict())
        else:
            state["bad_epochs"] += 1
        log(
            f"epoch {epoch + 1}/{config.epochs} stage {stage}: "
            f"train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
            f"val AUROC {val_auc:.3f}, {rate:.0f} img/s" + (" *" if improved else "")
        )
        state["epoch"] = epoch + 1
        if rank == 0 and on_epoch is not None:
            on_epoch(epoch + 1, model)
        if rank == 0:
            _save_checkpoint(
                checkpoint, model, optimizer, scheduler, stage, generator, state, config
            )
        if state["bad_epochs"] >= config.patience:
            log(f"early stop: no better validation loss for {config.patience} epochs")
            break

    model.load_state_dict(state["best_state"])
    _, val_probs = evaluate(model, val, device)
    if config.target_sensitivity is not None:
        threshold = threshold_for_sensitivity(
            val_probs, val.y.numpy(), config.target_sensitivity
        )
        rule = f"sensitivity >= {config.target_sensitivity} on validation"
    else:
        threshold = youden_threshold(val_probs, val.y.numpy())
        rule = "Youden's J on validation"
    metrics: dict[str, Any] = {
        "positive": positive,
        "threshold": threshold,
        "threshold_rule": rule,
        "best_epoch": int(state["best_epoch"]) + 1,
        "val": {"auroc": auroc(val_probs, val.y.numpy()), "frames": len(val)},
    }
    modalities = sorted({_modality(s) for s in samples} - {""})
    artifact = ModelArtifact(
        name=config.name,
        version=config.version,
        device_uid=str(generate_uid()),
        architecture=config.architecture,
        preprocessing=spec,
        labels=(Label(positive, concept, float(np.clip(threshold, 0.0, 1.0)), site),),
        state_dict={
            k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
        },
        dropout=config.dropout,
        gradcam_layer=config.gradcam_layer,
        accepts={"modalities": modalities, "body_parts": [], "sop_classes": []},
        training={
            "data": {
                "images": len(samples),
                "patients": len({s.patient_id for s in samples}),
                "train_frames": len(train),
                "val_frames": len(val),
                "positive": positive,
            },
            "metrics": metrics,
            "config": config.to_dict(),
        },
    )
    if rank == 0:
        measured = heatmap_offset(artifact, splits["val"], positive, device)
        if measured is not None:
            offset, lesions, before, after = measured
            metrics["gradcam_offset"] = {
                "rows": offset[0],
                "columns": offset[1],
                "lesions": lesions,
                "val_pointing_game_before": before,
                "val_pointing_game": after,
            }
            artifact = replace(
                artifact,
                gradcam_offset=offset,
                training={**artifact.training, "metrics": metrics},
            )
            log(
                f"heatmap offset ({offset[0]:+.1f}, {offset[1]:+.1f}) input px from "
                f"{lesions} validation lesions: validation pointing game "
                f"{before:.3f} -> {after:.3f}"
            )
    return FitResult(
        artifact, list(state["history"]), metrics, splits, val, val_probs, rank
    )


def heatmap_offset(
    artifact: ModelArtifact,
    samples: Sequence[Sample],
    positive: str,
    device: torch.device,
    minimum: int = 5,
) -> tuple[tuple[float, float], int, float, float] | None:
    """Measure where the model's Grad-CAM evidence lies from its cells' centres.

    A trained network's cells respond to a finding a few pixels off their
    receptive fields' centres, the same way everywhere in the image (a
    convolution is translation-equivariant). On the positive DICOM images
    that carry a lesion mask, this is the median displacement from each
    heatmap's peak to its lesion's centre, in input pixels, clipped to one cell
    of the Grad-CAM layer.

    Parameters
    ----------
    artifact
        The trained model, heatmaps drawn without an offset.
    samples
        Validation samples; those of ``positive`` with a mask are used.
    positive
        The label explained.
    device
        Where to run.
    minimum
        Fewer lesions than this measure nothing.

    Returns
    -------
    tuple or None
        ((rows, columns) offset, lesions used, validation pointing game
        without and with the offset), or None without enough lesions.
    """
    pairs = lesion_frames(samples, positive, artifact.preprocessing)
    if len(pairs) < minimum:
        return None
    plain = Classifier(replace(artifact, gradcam_offset=(0.0, 0.0)), device=str(device))
    shifts, hits = [], []
    for frames, mask in pairs:
        for heatmap, source in zip(
            plain.explain(frames, 0), frames.sources, strict=True
        ):
            if heatmap.shape != mask.shape:
                continue
            peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            hits.append(bool(mask[peak]))
            centre = np.argwhere(mask).mean(axis=0)
            _, _, box_rows, box_columns = source.box
            shifts.append(
                (
                    float(centre[0] - peak[0]) * box_rows / source.rows,
                    float(centre[1] - peak[1]) * box_columns / source.columns,
                )
            )
    if len(shifts) < minimum:
        return None
    stride = 2 ** (GRADCAM_LAYERS.index(artifact.gradcam_layer) + 3)  # one cell
    median = np.clip(np.median(np.array(shifts), axis=0), -stride, stride)
    offset = (round(float(median[0]), 1), round(float(median[1]), 1))
    shifted = Classifier(replace(artifact, gradcam_offset=offset), device=str(device))
    after, _ = pointing(shifted, pairs)
    return offset, len(shifts), float(np.mean(hits)), after


def lesion_frames(
    samples: Sequence[Sample], positive: str, spec: PreprocessSpec
) -> list[tuple[Frames, npt.NDArray[np.bool_]]]:
    """Return the frames and lesion mask of each positive DICOM with a mask.

    Parameters
    ----------
    samples
        Samples; those of ``positive`` whose mask marks a lesion are used.
    positive
        The label explained.
    spec
        The model's preprocessing.

    Returns
    -------
    list of tuple
        (frames, mask) per image; the mask at the source image's size.
    """
    pairs = []
    for sample in samples:
        if (
            sample.label != positive
            or sample.mask is None
            or sample.path.suffix.lower() in IMAGE_SUFFIXES
        ):
            continue
        mask = np.asarray(Image.open(sample.mask)) > 0
        if mask.any():
            pairs.append((preprocess(dcmread(sample.path), spec), mask))
    return pairs


def measure(samples: Sequence[Sample], most: int = 500) -> DataSizes:
    """Measure the images' side and the smallest lesions, for choosing settings.

    Parameters
    ----------
    samples
        The labelled files; up to ``most`` images and ``most`` masks, spread
        evenly over them, are read (headers only for DICOM).
    most
        The most files of each kind read.

    Returns
    -------
    DataSizes
        The median image side (the geometric mean of rows and columns), and the
        10th percentile of the lesions' diameters (that of a disc of the mask's
        area), scaled to that side.
    """
    sides: list[float] = []
    for sample in _spread(samples, most):
        try:
            if sample.path.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(sample.path) as image:
                    columns, rows = image.size
            else:
                ds = dcmread(
                    sample.path,
                    stop_before_pixels=True,
                    specific_tags=["Rows", "Columns"],
                )
                rows, columns = int(ds.Rows), int(ds.Columns)
        except (OSError, ValueError, AttributeError):
            continue  # fit reads every file later and says which one fails
        sides.append(math.sqrt(rows * columns))
    if not sides:
        return DataSizes(None)
    side = round(float(np.median(sides)))
    fractions: list[float] = []
    for sample in _spread([s for s in samples if s.mask is not None], most):
        if sample.mask is None:
            continue
        try:
            with Image.open(sample.mask) as image:
                mask = np.asarray(image) > 0
        except OSError:
            continue
        if mask.ndim == 2 and mask.any():
            diameter = 2 * math.sqrt(float(mask.sum()) / math.pi)
            fractions.append(diameter / math.sqrt(mask.shape[0] * mask.shape[1]))
    if not fractions:
        return DataSizes(side)
    return DataSizes(side, float(np.percentile(fractions, 10)) * side, len(fractions))


def _spread(samples: Sequence[Sample], most: int) -> Sequence[Sample]:
    if len(samples) <= most:
        return samples
    return [samples[i] for i in np.linspace(0, len(samples) - 1, most).astype(int)]


def pointing(
    classifier: Classifier,
    pairs: Sequence[tuple[Frames, npt.NDArray[np.bool_]]],
    progress: Progress | None = None,
) -> tuple[float, int]:
    """Score the Grad-CAM pointing game on (frames, lesion mask) pairs.

    Parameters
    ----------
    classifier
        The model, its heatmaps drawn as the node draws them.
    pairs
        From :func:`lesion_frames`.
    progress
        Called with 1 after each pair.

    Returns
    -------
    tuple
        The fraction of heatmaps whose maximum lies in the lesion (NaN for
        none), and the number of heatmaps (frames of the mask's size).
    """
    heatmaps, masks = [], []
    for frames, mask in pairs:
        for heatmap in classifier.explain(frames, 0):
            if heatmap.shape == mask.shape:
                heatmaps.append(heatmap)
                masks.append(mask)
        if progress is not None:
            progress(1)
    return pointing_game(heatmaps, masks), len(heatmaps)


def _silent(_: str) -> None:
    pass


def _modality(sample: Sample) -> str:
    if sample.path.suffix.lower() in {".png", ".jpg", ".jpeg"}:
        return ""
    from pydicom import dcmread

    try:
        return str(
            dcmread(
                sample.path, stop_before_pixels=True, specific_tags=["Modality"]
            ).get("Modality", "")
        )
    except (OSError, ValueError):
        return ""


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    stage: int,
    generator: torch.Generator,
    state: dict[str, Any],
    config: TrainConfig,
) -> None:
    # Tensors and plain values only, so torch.load(weights_only=True) reads it.
    payload = {
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "stage": stage,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        **state,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
