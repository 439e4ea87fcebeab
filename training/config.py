"""TrainConfig: defaults, a TOML file, then command-line flags, checked when built."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["KNOWN_FINDINGS", "TrainConfig", "read_toml"]

# Codes for findings medtrain knows by name (SNOMED CT): label -> (code, meaning).
KNOWN_FINDINGS: dict[str, tuple[str, str]] = {
    "nodule": ("27925004", "Nodule"),
    "mass": ("4147007", "Mass"),
    "effusion": ("60046008", "Pleural effusion"),
    "pneumothorax": ("36118008", "Pneumothorax"),
    "consolidation": ("95436008", "Lung consolidation"),
}


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything ``medtrain fit`` needs; saved beside the model as config.json.

    Parameters
    ----------
    architecture
        torchvision ResNet name.
    size
        Input side in pixels (square).
    channels
        1 or 3 input channels.
    window
        Preprocessing window rule (auto, minmax, fixed).
    window_center, window_width
        The fixed window, when ``window`` is fixed.
    resize
        stretch or letterbox.
    epochs
        Most epochs in all.
    freeze_epochs
        Epochs of stage 1: backbone frozen, head trained.
    unfreeze_from
        Stage 2 trains from this stage on: conv1, layer1 ... layer4.
    batch_size
        Images per step.
    lr
        Learning rate of stage 1.
    finetune_lr
        Learning rate of stage 2.
    weight_decay
        AdamW weight decay.
    warmup_fraction
        Fraction of each stage's steps spent warming up (then cosine decay).
    label_smoothing
        Targets become y * (1 - s) + s / 2.
    balance
        weighted (positive class weight in the loss), sampler, or none.
    dropout
        Dropout before the head.
    cell_loss
        Weight of a per-location loss on negative images: every layer4 cell of
        a normal image is trained to score negative (the image-level rule
        "no finding anywhere"), so the evidence of a positive image stays
        where the finding is and Grad-CAM points at it. 0 turns it off.
    gradcam_layer
        The stage Grad-CAM explains at in the artifact: layer4 (default), or
        layer3 / layer2 for finer heatmaps (small inputs: layer4 is 4x4 at 128 px).
    augment
        Random rotation, translation, scale, brightness and contrast.
    rotation
        Largest rotation in degrees.
    translate
        Largest shift, as a fraction of the side.
    scale
        Largest zoom in or out, as a fraction.
    intensity
        Largest brightness / contrast change, as a fraction.
    hflip
        Random horizontal flips (off: laterality matters on radiographs).
    vflip
        Random vertical flips.
    patience
        Epochs without a better validation loss before stopping.
    val_fraction, test_fraction
        Patient-level split of the data (the rest trains).
    seed
        Seed of the split, the initialisation and the augmentation.
    positive
        The positive class name; inferred for two classes when empty.
    code
        Coded concept of the finding, ``value,scheme,meaning``; known names get
        theirs.
    finding_site
        Coded concept of the site, ``value,scheme,meaning`` (default: lung).
    target_sensitivity
        When set, the threshold reaching it on validation data; else Youden's J.
    name, version
        The model's name and version in the artifact.
    precision
        fp32, or bf16 autocast (CPU); CUDA always uses fp16 mixed precision.
    init_weights
        Local torchvision state dict to start from (e.g. ImageNet), or empty.
    """

    architecture: str = "resnet18"
    size: int = 128
    channels: int = 1
    window: str = "auto"
    window_center: float | None = None
    window_width: float | None = None
    resize: str = "stretch"
    epochs: int = 20
    freeze_epochs: int = 2
    unfreeze_from: str = "layer1"
    batch_size: int = 32
    lr: float = 1e-3
    finetune_lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.05
    balance: str = "weighted"
    dropout: float = 0.0
    cell_loss: float = 0.0
    gradcam_layer: str = "layer4"
    augment: bool = True
    rotation: float = 7.0
    translate: float = 0.05
    scale: float = 0.08
    intensity: float = 0.1
    hflip: bool = False
    vflip: bool = False
    patience: int = 5
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    positive: str = ""
    code: str = ""
    finding_site: str = "39607008,SCT,Lung"
    target_sensitivity: float | None = None
    name: str = "medtrain-model"
    version: str = "1"
    precision: str = "fp32"
    init_weights: str = ""

    def __post_init__(self) -> None:
        """Check the values; raise ValueError naming the key."""
        checks = [
            (self.size >= 32, f"size: expected >= 32, found {self.size}"),
            (
                self.channels in (1, 3),
                f"channels: expected 1 or 3, found {self.channels}",
            ),
            (self.epochs >= 1, f"epochs: expected >= 1, found {self.epochs}"),
            (
                0 <= self.freeze_epochs <= self.epochs,
                "freeze_epochs: expected 0..epochs",
            ),
            (
                self.unfreeze_from in ("conv1", "layer1", "layer2", "layer3", "layer4"),
                "unfreeze_from: expected conv1 or layer1..layer4, "
                f"found {self.unfreeze_from!r}",
            ),
            (
                self.batch_size >= 2,
                f"batch_size: expected >= 2, found {self.batch_size}",
            ),
            (self.lr > 0 and self.finetune_lr > 0, "lr, finetune_lr: expected > 0"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction: expected 0 <= f < 1"),
            (0 <= self.label_smoothing < 0.5, "label_smoothing: expected 0 <= s < 0.5"),
            (
                self.balance in ("weighted", "sampler", "none"),
                f"balance: expected weighted, sampler or none, found {self.balance!r}",
            ),
            (self.patience >= 1, f"patience: expected >= 1, found {self.patience}"),
            (
                0 < self.val_fraction < 1
                and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1,
                "val_fraction / test_fraction: expected fractions that leave "
                "data to train",
            ),
            (
                self.target_sensitivity is None or 0 < self.target_sensitivity <= 1,
                "target_sensitivity: expected (0, 1]",
            ),
            (self.cell_loss >= 0, f"cell_loss: expected >= 0, found {self.cell_loss}"),
            (
                self.gradcam_layer in ("layer2", "layer3", "layer4"),
                "gradcam_layer: expected layer2, layer3 or layer4, "
                f"found {self.gradcam_layer!r}",
            ),
            (
                self.precision in ("fp32", "bf16"),
                f"precision: expected fp32 or bf16, found {self.precision!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as JSON-able values."""
        return asdict(self)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a training configuration file.

    Parameters
    ----------
    path
        TOML with keys of :class:`TrainConfig` at the top level.

    Returns
    -------
    dict
        The values, keys checked.

    Raises
    ------
    ValueError
        If the file cannot be read, is not TOML or has an unknown key.
    """
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}")
    return data
