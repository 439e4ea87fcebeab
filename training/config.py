"""TrainConfig: defaults, a TOML file, then command-line flags, checked when built."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from inference import text_problem

__all__ = ["KNOWN_FINDINGS", "DataSizes", "TrainConfig", "choose", "read_toml"]

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

    The defaults train a model from scratch (every layer from the first epoch);
    ``medtrain fit`` fills in what the user leaves out with :func:`choose`.

    Parameters
    ----------
    architecture
        torchvision ResNet name.
    size
        Input side in pixels (square); :func:`choose` sizes it by the lesions.
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
        Epochs of stage 1: backbone frozen, head trained (0: no stage 1;
        :func:`choose` gives 2 with ``init_weights``).
    unfreeze_from
        Stage 2 trains from this stage on: conv1 (every layer), layer1 ... layer4.
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
        Weight of a per-location loss: every layer4 cell of a normal image is
        trained to score negative (the image-level rule "no finding
        anywhere"), and where a positive image has a lesion mask, the cells
        the lesion reaches to score positive; so the evidence stays where the
        finding is and Grad-CAM points at it. 0 turns it off.
    gradcam_layer
        The stage Grad-CAM explains at in the artifact: layer4, or layer3 /
        layer2 for finer heatmaps (layer4 is 4x4 at 128 px); :func:`choose`
        picks one a lesion covers a node of.
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
    mixup
        Mixup's Beta(a, a) parameter: each batch is blended with a shuffled
        copy of itself, its targets likewise (0: off, the default).
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
        fp32, or bf16 autocast (CPU). CUDA always trains in mixed precision:
        bf16 where the GPU has it (Ampere and newer), else fp16 with loss scaling.
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
    epochs: int = 16
    freeze_epochs: int = 0
    unfreeze_from: str = "conv1"
    batch_size: int = 32
    lr: float = 1e-3
    finetune_lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.05
    balance: str = "weighted"
    dropout: float = 0.0
    cell_loss: float = 1.0
    gradcam_layer: str = "layer4"
    augment: bool = True
    rotation: float = 7.0
    translate: float = 0.05
    scale: float = 0.08
    intensity: float = 0.1
    hflip: bool = False
    vflip: bool = False
    mixup: float = 0.0
    patience: int = 8
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
        """Check the values; raise ValueError naming the flag of the key."""
        checks = [
            # Messages name the flag (the --config key is its snake_case).
            (self.size >= 32, f"--size: expected >= 32, found {self.size}"),
            (
                self.channels in (1, 3),
                f"--channels: expected 1 or 3, found {self.channels}",
            ),
            (self.epochs >= 1, f"--epochs: expected >= 1, found {self.epochs}"),
            (
                0 <= self.freeze_epochs <= self.epochs,
                f"--freeze-epochs: expected 0..{self.epochs} (--epochs), "
                f"found {self.freeze_epochs}",
            ),
            (
                self.unfreeze_from in ("conv1", "layer1", "layer2", "layer3", "layer4"),
                "--unfreeze-from: expected conv1 or layer1..layer4, "
                f"found {self.unfreeze_from!r}",
            ),
            (
                self.batch_size >= 2,
                f"--batch-size: expected >= 2, found {self.batch_size}",
            ),
            (
                self.lr > 0 and self.finetune_lr > 0,
                "--lr, --finetune-lr: expected > 0",
            ),
            (
                0 <= self.warmup_fraction < 1,
                "--warmup-fraction: expected 0 <= f < 1",
            ),
            (
                0 <= self.label_smoothing < 0.5,
                "--label-smoothing: expected 0 <= s < 0.5",
            ),
            (
                self.balance in ("weighted", "sampler", "none"),
                "--balance: expected weighted, sampler or none, "
                f"found {self.balance!r}",
            ),
            (self.patience >= 1, f"--patience: expected >= 1, found {self.patience}"),
            (
                0 < self.val_fraction < 1
                and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1,
                "--val-fraction / --test-fraction: expected fractions that leave "
                "data to train",
            ),
            (
                self.target_sensitivity is None or 0 < self.target_sensitivity <= 1,
                "--target-sensitivity: expected (0, 1]",
            ),
            (self.mixup >= 0, f"--mixup: expected >= 0, found {self.mixup}"),
            (
                self.cell_loss >= 0,
                f"--cell-loss: expected >= 0, found {self.cell_loss}",
            ),
            (
                self.gradcam_layer in ("layer2", "layer3", "layer4"),
                "--gradcam-layer: expected layer2, layer3 or layer4, "
                f"found {self.gradcam_layer!r}",
            ),
            (
                self.precision in ("fp32", "bf16"),
                f"--precision: expected fp32 or bf16, found {self.precision!r}",
            ),
        ]
        for flag, text in (("--name", self.name), ("--version", self.version)):
            problem = text_problem(text)
            checks.append((problem is None, f"{flag} {text!r}: has {problem}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as JSON-able values."""
        return asdict(self)


# A ResNet's stem (conv1 + max pool) leaves a grid of 1/4 the input side, and
# layer2 / layer3 / layer4 grids of 1/8, 1/16, 1/32.
_STEM_STRIDE = 4
_LAYER_STRIDES = (("layer4", 32), ("layer3", 16), ("layer2", 8))
# The smallest lesions should span about this many stem cells: at two a small
# nodule is lost in the first residual stage (bench/train.py: at 128 px, 8-px
# nodules, pointing game 0.65; at 192 px 1.00).
_LESION_CELLS = 3
_MIN_SIZE, _MAX_SIZE = 64, 512  # past 512 px a CPU epoch takes too long
_MAX_PLAIN_SIZE = 256  # without masks: the common chest-radiograph input
_MIN_GRID = 7  # without masks: a Grad-CAM grid as fine as layer4's at 224 px
# From scratch, the schedule: the work per image of _EPOCHS_AT epochs at
# _BUDGET_SIDE px, between the default (16) and _MOST_EPOCHS epochs.
_EPOCHS_AT, _BUDGET_SIDE, _MOST_EPOCHS = 16, 192, 24


@dataclass(frozen=True, slots=True)
class DataSizes:
    """What ``medtrain fit`` measures of the data to choose its settings.

    Parameters
    ----------
    image_side
        The images' typical side in pixels (median), or None when unknown.
    lesion
        The smallest lesions' diameter (10th percentile of the masks), in
        pixels of an image of ``image_side``; None without lesion masks.
    lesions
        The number of lesion masks measured.
    """

    image_side: int | None
    lesion: float | None = None
    lesions: int = 0


def _round32(value: float, *, up: bool = False) -> int:
    # A multiple of 32 keeps every ResNet grid exact; up: at least ``value``.
    steps = math.ceil(value / 32) if up else round(value / 32)
    return int(min(_MAX_SIZE, max(_MIN_SIZE, 32 * steps)))


def choose(given: Mapping[str, Any], sizes: DataSizes) -> tuple[TrainConfig, list[str]]:
    """Complete the user's settings with choices made for the data.

    A value in ``given`` is always kept. Of the rest: without ``init_weights``
    every layer trains from the first epoch (a random backbone has nothing to
    keep frozen), for the work per image of 16 epochs at 192 px (16 to 24
    epochs: 23 at 160 px), and the patience is half the epochs (a model from
    scratch has a noisy validation loss at first); with it, the two-stage
    recipe (16 epochs, head alone for 2, then from layer1 on, patience 5). The
    input side is the images' side (up to 256), raised where lesion masks show
    the smallest lesions would span fewer than about three cells of the ResNet
    stem's 1/4 grid (up to 512; a multiple of 32); the Grad-CAM layer is the
    coarsest whose grid spacing a lesion covers (1/8 of the side for layer2),
    or, without masks, the coarsest with at least 7 cells across.

    Parameters
    ----------
    given
        Keys of :class:`TrainConfig` the user set (``--config``, then flags).
    sizes
        What the data measured.

    Returns
    -------
    tuple
        The configuration, and one line per choice saying what and why.

    Raises
    ------
    ValueError
        If a value, given or chosen, is invalid (the message names the flag).
    """
    chosen: dict[str, Any] = {}
    why: list[str] = []
    base = TrainConfig()  # the static defaults

    def value(key: str) -> Any:
        return chosen[key] if key in chosen else given.get(key, getattr(base, key))

    side = sizes.image_side
    lesion = sizes.lesion
    if "size" in given:
        size = int(given["size"])
    elif side is None:
        size = base.size
        chosen["size"] = size
        why.append(f"input {size} px: the images' size is unknown")
    else:
        plain = _round32(min(side, _MAX_PLAIN_SIZE))
        images = f"the images are {side} px" + (
            f" (input at most {_MAX_PLAIN_SIZE} unless lesions need more)"
            if side > _MAX_PLAIN_SIZE
            else ""
        )
        if lesion is None:
            size = plain
            reason = f"{images}; no lesion masks to size it by"
        else:
            wanted = side * _LESION_CELLS * _STEM_STRIDE / lesion
            size = max(plain, _round32(wanted, up=True))
            cells = lesion * size / side / _STEM_STRIDE
            reason = (
                f"the smallest lesions are {lesion:.1f} px across at {side} px; "
                f"at {size} px they span {cells:.1f} cells of the ResNet stem's "
                f"1/{_STEM_STRIDE} grid (at least {_LESION_CELLS} wanted"
                + (f"; {size} px at most" if wanted > _MAX_SIZE + 16 else "")
                + ")"
            )
        chosen["size"] = size
        why.append(f"input {size} px: {reason}")
    pretrained = bool(value("init_weights"))
    if "epochs" not in given and not pretrained and size >= 32:  # else refused below
        # The same work per image as 16 epochs at 192 px (the synthetic set's
        # input, 12 min for 600 images here), up to 24 epochs: a smaller input
        # gets a longer schedule (bench/recipe.py, 160 px: 24 epochs gave test
        # AUROC 0.807 against 0.752 with 16).
        budget = _EPOCHS_AT * (_BUDGET_SIDE / size) ** 2
        chosen["epochs"] = min(_MOST_EPOCHS, max(base.epochs, round(budget)))
        why.append(
            f"{chosen['epochs']} epochs: at {size} px, the work per image of "
            f"{_EPOCHS_AT} epochs at {_BUDGET_SIDE} px"
            + (f", {_MOST_EPOCHS} at most" if budget > _MOST_EPOCHS else "")
            + (f", {base.epochs} at least" if budget < base.epochs else "")
        )
    epochs = int(value("epochs"))
    if pretrained:
        recipe: dict[str, Any] = {
            "freeze_epochs": min(2, epochs // 2),
            "unfreeze_from": "layer1",
        }
        patience, patience_reason = 5, "--init-weights given, the loss settles fast"
    else:
        recipe = {"freeze_epochs": 0, "unfreeze_from": "conv1"}
        patience = max(1, epochs // 2)
        patience_reason = (
            f"half of the {epochs} epochs, as from scratch the validation loss "
            "is noisy at first"
        )
    chosen |= {k: v for k, v in recipe.items() if k not in given}
    if any(k in chosen for k in recipe):
        freeze, start = int(value("freeze_epochs")), str(value("unfreeze_from"))
        layers = "every layer" if start == "conv1" else f"{start} on"
        stages = (
            f"the head trains alone for {freeze} epoch{'s' * (freeze != 1)}, then "
            f"{layers}"
            if freeze
            else f"{layers} trains from the first epoch (no frozen stage)"
        )
        if pretrained:
            reason = (
                "--init-weights given: the head learns on the pretrained "
                "features first, then they are fine-tuned"
                if freeze
                else "--init-weights given"
                + (
                    "; one epoch leaves no room for a head-only stage"
                    if epochs < 2
                    else ""
                )
            )
        else:
            reason = (
                "no --init-weights, and a random backbone has nothing to keep frozen"
            )
        why.append(f"{stages}: {reason}")
    if "patience" not in given:
        chosen["patience"] = patience
        why.append(f"patience {patience}: {patience_reason}")

    if "gradcam_layer" not in given:
        if side is not None and lesion is not None:
            across = lesion * size / side
            layer, stride = next(
                ((name, s) for name, s in _LAYER_STRIDES if s <= across),
                _LAYER_STRIDES[-1],
            )
            covers = (
                "cover a node of it"
                if stride <= across
                else "are smaller than any layer's node spacing"
            )
            why.append(
                f"Grad-CAM at {layer} ({size // stride}x{size // stride} grid, a "
                f"node every {stride} px): the smallest lesions, {across:.1f} px "
                f"across at {size} px, {covers}"
            )
        else:
            layer, stride = next(
                ((name, s) for name, s in _LAYER_STRIDES if size // s >= _MIN_GRID),
                _LAYER_STRIDES[-1],
            )
            why.append(
                f"Grad-CAM at {layer} ({size // stride}x{size // stride} grid at "
                f"{size} px): no lesion masks; the coarsest layer with at least "
                f"{_MIN_GRID} cells across"
            )
        chosen["gradcam_layer"] = layer
    if "cell_loss" not in given:
        chosen["cell_loss"] = base.cell_loss
        why.append(
            f"cell loss {chosen['cell_loss']}: every location of a normal image "
            "is trained to score negative"
            + (
                ", and the locations a lesion mask covers to score positive"
                if sizes.lesions
                else ""
            )
            + ", so heatmaps stay on the finding"
        )
    return TrainConfig(**(chosen | dict(given))), why


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
