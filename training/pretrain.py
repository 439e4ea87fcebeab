"""pretrain: self-supervised starting weights from unlabelled images (SimCLR)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from inference import ARCHITECTURES, PreprocessError, PreprocessSpec, build_model
from training.config import TrainConfig
from training.data import IMAGE_SUFFIXES, DataError, Sample, preprocessed
from training.engine import augment, schedule
from training.progress import bar

__all__ = ["PretrainConfig", "PretrainResult", "image_files", "nt_xent", "pretrain"]

# The augmentation of a view: stronger than fit's, as the two views of an image
# must differ in everything but what the image shows.
_VIEW = TrainConfig(rotation=15.0, translate=0.1, scale=0.25, intensity=0.3, hflip=True)


@dataclass(frozen=True, slots=True)
class PretrainConfig:
    """Settings of ``medtrain pretrain`` (the flags, snake_case).

    Parameters
    ----------
    architecture
        The ResNet whose backbone is trained (as fit's ``--architecture``).
    size
        Input side in pixels; convolution weights do not depend on it, so fit
        may use another.
    epochs
        Passes over the images.
    batch_size
        Images per batch (each gives two views; the others of the batch are
        the negatives).
    lr
        AdamW learning rate (warm-up, then cosine decay).
    temperature
        Of the contrastive loss.
    noise
        Standard deviation of the Gaussian noise added to each view (in
        normalized units).
    seed
        Random seed.
    """

    architecture: str = "resnet18"
    size: int = 128
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 0.2
    noise: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        """Check the values; raise ValueError naming the flag."""
        checks = [
            (
                self.architecture in ARCHITECTURES,
                f"--architecture: expected one of {sorted(ARCHITECTURES)}, "
                f"found {self.architecture!r}",
            ),
            (self.size >= 32, f"--size: expected >= 32, found {self.size}"),
            (self.epochs >= 1, f"--epochs: expected >= 1, found {self.epochs}"),
            (
                self.batch_size >= 4,
                f"--batch-size: expected >= 4, found {self.batch_size}",
            ),
            (self.lr > 0, f"--lr: expected > 0, found {self.lr}"),
            (
                self.temperature > 0,
                f"--temperature: expected > 0, found {self.temperature}",
            ),
            (self.noise >= 0, f"--noise: expected >= 0, found {self.noise}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(slots=True)
class PretrainResult:
    """What ``pretrain`` did.

    Parameters
    ----------
    images
        Frames trained on.
    skipped
        Files that are not images (a structured report, a damaged file).
    losses
        Mean contrastive loss of each epoch.
    seconds
        Time spent training.
    """

    images: int
    skipped: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def image_files(folder: Path) -> list[Path]:
    """Return the DICOM, PNG and JPEG files under ``folder``, sorted.

    Raises
    ------
    DataError
        If ``folder`` is not a folder or holds no such file.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.suffix.lower() in IMAGE_SUFFIXES | {".dcm", ""}
    )
    if not files:
        raise DataError(f"{folder}: no DICOM, PNG or JPEG file")
    return files


def nt_xent(
    first: torch.Tensor, second: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Return the SimCLR loss of two views' embeddings [N, D] (row i: one image).

    Each embedding's positive is the other view of its image; the other 2N - 2
    embeddings of the batch are its negatives.
    """
    z = F.normalize(torch.cat([first, second]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(-math.inf)
    n = first.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, targets)


def pretrain(
    files: list[Path],
    config: PretrainConfig,
    out: Path,
    cache: Path | None,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> PretrainResult:
    """Train a backbone on unlabelled images and write its weights to ``out``.

    A hospital's node receives thousands of images nobody labels. Contrastive
    learning (SimCLR: Chen et al., 2020) trains the backbone to give two random
    views of the same image (rotated, shifted, zoomed, flipped, contrast and
    brightness changed, noised) near embeddings, and views of different images
    far ones; the backbone then starts ``medtrain fit --init-weights`` instead
    of random weights. Images go through ``inference.preprocess`` as in ``fit``
    (grayscale, the file's window, normalized alike), so what the backbone sees
    is what the node will feed it.

    Parameters
    ----------
    files
        The images (DICOM, PNG, JPEG); those that are not images are skipped.
    config
        The settings.
    out
        The weights file (``.safetensors``): a torchvision state dict without
        the head, for ``medtrain fit --init-weights``.
    cache
        Folder for preprocessed frames, or None.
    device
        Where to train.
    log
        Where the per-epoch lines go.

    Returns
    -------
    PretrainResult
        What was done.

    Raises
    ------
    DataError
        If fewer images than a batch could be read.
    """
    spec = PreprocessSpec(
        size=(config.size, config.size),
        channels=1,
        window=_VIEW.window,
        resize=_VIEW.resize,
        mean=(0.5,),
        std=(0.25,),
    )
    frames: list[torch.Tensor] = []
    skipped = 0
    with bar(len(files), "preprocessing") as shown:
        for path in files:
            try:
                frames.append(preprocessed(Sample(path, "", str(path)), spec, cache))
            except (DataError, PreprocessError):
                skipped += 1
            shown.update(1)
    x = torch.cat(frames) if frames else torch.empty(0, 1, config.size, config.size)
    if len(x) < config.batch_size:
        raise DataError(
            f"{len(x)} images could be read ({skipped} files skipped); "
            f"--batch-size {config.batch_size} needs at least that many"
        )
    log(
        f"{len(x)} images from {len(files) - skipped} files"
        + (f" ({skipped} skipped: not images)" if skipped else "")
        + f", {config.size} px, {config.architecture}"
    )

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    backbone = build_model(config.architecture, 1, 1)
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    head = nn.Sequential(nn.Linear(width, 512), nn.ReLU(), nn.Linear(512, 128))
    backbone = backbone.to(device, memory_format=torch.channels_last)
    head = head.to(device)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-4)
    steps = len(x) // config.batch_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, schedule(config.epochs * steps, 0.1)
    )
    view = replace(_VIEW, size=config.size)
    result = PretrainResult(images=len(x), skipped=skipped)
    started = time.perf_counter()
    backbone.train()
    head.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        with bar(steps, f"epoch {epoch + 1}/{config.epochs}", unit="batch") as shown:
            for step in range(steps):
                batch = x[
                    order[step * config.batch_size : (step + 1) * config.batch_size]
                ]
                views = []
                for _ in range(2):
                    moved, _ = augment(batch, view, generator)
                    noise = torch.randn(moved.shape, generator=generator)
                    views.append(
                        (moved + config.noise * noise).to(
                            device, memory_format=torch.channels_last
                        )
                    )
                loss = nt_xent(
                    head(backbone(views[0])),
                    head(backbone(views[1])),
                    config.temperature,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                scheduler.step()
                total += float(loss.detach())
                shown.set_postfix_str(f"loss {total / (step + 1):.4f}", False)
                shown.update(1)
        result.losses.append(total / steps)
        mean = result.losses[-1]
        log(f"epoch {epoch + 1}/{config.epochs}: contrastive loss {mean:.4f}")
    result.seconds = time.perf_counter() - started
    _save(backbone, config, result, out)
    return result


def _save(
    backbone: nn.Module, config: PretrainConfig, result: PretrainResult, out: Path
) -> None:
    from safetensors.torch import save_file

    state = {
        k: v.detach().cpu().contiguous()
        for k, v in backbone.state_dict().items()
        if not k.startswith("fc.")
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(
        state,
        str(tmp),
        metadata={
            "format": "medtrain pretrain (SimCLR backbone, no head)",
            "architecture": config.architecture,
            "size": str(config.size),
            "images": str(result.images),
            "epochs": str(config.epochs),
            "final_loss": f"{result.losses[-1]:.4f}",
        },
    )
    tmp.replace(out)
