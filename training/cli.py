"""The `medtrain` command: argv -> the training subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from inference import (
    ArtifactError,
    Classifier,
    ModelArtifact,
    PreprocessError,
)
from inference.gradcam import gradcam
from inference.preprocess import preprocess
from inference.variants import ONNX_OPSET, VARIANTS
from training.config import choose, read_toml
from training.data import DataError, load_samples
from training.engine import (
    Dataset,
    evaluate,
    fit,
    lesion_frames,
    load_frames,
    measure,
    pointing,
)
from training.metrics import auroc, binary_metrics, calibration_error
from training.pretrain import PretrainConfig
from training.progress import bar
from training.report import overlay_png, write_report

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], found {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``medtrain``.

    Returns
    -------
    argparse.ArgumentParser
        The parser with its subcommands.
    """
    parser = argparse.ArgumentParser(
        prog="medtrain",
        description="Make, train, evaluate and explain the models dicom-node runs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    synth = sub.add_parser(
        "synth",
        help="write a labelled synthetic data set as DICOM",
        description="Write N chest-radiograph-like DX images (or CT slices) as valid "
        "DICOM under OUT/dicom/<patient>/<study>/, the lesion mask of each positive "
        "image under OUT/masks/, and OUT/labels.csv (path, label, patient_id, "
        "study_uid, mask). Positive images carry a subtle nodule in a lung field. "
        "The same seed gives the same data. With --background, the DX images are "
        "cut from real radiographs instead of drawn: a harder benchmark.",
    )
    synth.add_argument("out", type=Path, metavar="OUT", help="output folder")
    synth.add_argument("--n", type=_positive, required=True, help="number of images")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument(
        "--modality", choices=("DX", "CT"), default="DX", help="DX (default) or CT"
    )
    synth.add_argument(
        "--size", type=int, default=256, help="image side in pixels (default 256)"
    )
    synth.add_argument(
        "--prevalence",
        type=_fraction,
        default=0.5,
        help="fraction of positive images (default 0.5)",
    )
    synth.add_argument(
        "--background",
        metavar="DIR",
        help="cut each DX image from a real radiograph: a folder of DICOM "
        "radiographs (searched recursively; grayscale, at least --size a side), or "
        "'pydicom-data' for the chest CR that package installs (RG1_UNCR.dcm; "
        "nothing is downloaded). Each image is a different crop (40-85%% of the "
        "side), flip, window, gamma and noise; a positive one carries a simulated "
        "nodule of radius 3.5-7%% of the side and contrast 0.2-0.7 of the window, "
        "a third of them faint",
    )
    fit = sub.add_parser(
        "fit",
        help="train a model and write the artifact dicom-node loads",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_FIT_DESCRIPTION,
        epilog=_FIT_EPILOG,
    )
    fit.add_argument(
        "data",
        type=Path,
        metavar="DATA",
        help="labels.csv, a folder holding one, or a folder of <class>/ folders",
    )
    fit.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="MODEL",
        help="the model file to write, ending in .safetensors; the report goes "
        "to MODEL-report/, the checkpoint to MODEL.ckpt",
    )
    fit.add_argument(
        "--config",
        type=Path,
        metavar="TOML",
        help="settings file: the flags below as keys in snake_case "
        "(freeze_epochs = 0); flags given here win over it",
    )
    fit.add_argument("--resume", action="store_true", help="continue from MODEL.ckpt")
    fit.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    fit.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="preprocessing cache folder (default: .medtrain-cache beside MODEL)",
    )
    for flag, kind, text in _FIT_FLAGS:
        if kind is bool:
            fit.add_argument(flag, action="store_true", default=None, help=text)
        else:
            fit.add_argument(flag, type=kind, default=None, help=text)

    evaluate = sub.add_parser(
        "evaluate",
        help="measure a model on labelled data",
        description="Score every image of DATA with MODEL through inference.Classifier "
        "(what the node runs) and print AUROC, accuracy, sensitivity, specificity, "
        "PPV, NPV at the model's threshold and the calibration error; with lesion "
        "masks, the Grad-CAM pointing game.",
    )
    evaluate.add_argument(
        "model", type=Path, metavar="MODEL", help="the .safetensors file fit wrote"
    )
    evaluate.add_argument(
        "data",
        type=Path,
        metavar="DATA",
        help="labelled images, as for fit: labels.csv (a mask column adds the "
        "pointing game), a folder holding one, or <class>/ folders",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    evaluate.add_argument(
        "--cache", type=Path, metavar="DIR", help="preprocessing cache folder"
    )

    explain = sub.add_parser(
        "explain",
        help="draw Grad-CAM heatmaps over images",
        description="For each DICOM FILE, write DIR/<name>.png: the image, the "
        "Grad-CAM heatmap over it and the model's score.",
    )
    explain.add_argument(
        "model", type=Path, metavar="MODEL", help="the .safetensors file fit wrote"
    )
    explain.add_argument(
        "files", type=Path, nargs="+", metavar="FILE", help="DICOM files to explain"
    )
    explain.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for the PNGs (made when missing)",
    )
    explain.add_argument("--device", help="cpu or cuda (default: cuda when available)")

    exp = sub.add_parser(
        "export",
        help="a deployment variant of a model: int8 or onnx (CPU), fp16 or bf16 (GPU)",
        description="Write a variant of MODEL that the node loads by path like "
        "any model: int8 (static quantization of the convolutions, activation "
        "ranges calibrated on images of DIR; for CPU serving), onnx (the "
        f"convolutional trunk as an ONNX graph, opset {ONNX_OPSET}, run by "
        "onnxruntime on the CPU; needs dicom-node[onnx]), fp16 or bf16 weights "
        "(for GPU "
        "serving; on a CPU they run in fp32). It keeps MODEL's "
        "labels, thresholds and preprocessing, gets a Device UID of its own, and "
        "records what was measured on DIR against MODEL, both run as the node runs "
        "them: AUROC and its change, the largest probability difference, agreement "
        "at the thresholds and images/s. A variant whose AUROC drops by more than "
        "--tolerance is refused and nothing is written. Exit 1 then.",
        epilog="example: medtrain export models/chest.safetensors --format int8 "
        "--data data/test --out models/chest-int8.safetensors",
    )
    exp.add_argument(
        "model", type=Path, metavar="MODEL", help="the .safetensors file fit wrote"
    )
    exp.add_argument(
        "--format",
        required=True,
        choices=VARIANTS,
        help="int8 or onnx (CPU), fp16 or bf16 (GPU)",
    )
    exp.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="DIR",
        help="labelled held-out images (labels.csv, as fit reads; not the "
        "training images): int8 calibrates on up to 128 of them, and the "
        "variant is measured on all",
    )
    exp.add_argument(
        "--out", type=Path, required=True, help="the variant's .safetensors file"
    )
    exp.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="largest AUROC drop accepted (default 0.01)",
    )
    exp.add_argument(
        "--device",
        help="where both models run for the measurement (int8, onnx: the CPU; default: "
        "cuda when available)",
    )
    exp.add_argument("--cache", type=Path, help="preprocessing cache folder")

    vis = sub.add_parser(
        "visualize",
        help="look inside a model: filters, stage activations, CAM and Grad-CAM",
        description="Write DIR/index.html and the PNGs it shows: the first "
        "convolution's filters as a grid; for each FILE (DICOM, PNG or JPEG; "
        "the first frame), each ResNet stage's strongest activation maps, and "
        "the image under Grad-CAM at each stage (layer1 ... layer4) beside CAM "
        "(which exists at layer4 only, the stage the head reads). Open "
        "DIR/index.html in a browser.",
    )
    vis.add_argument(
        "model", type=Path, metavar="MODEL", help="the .safetensors file fit wrote"
    )
    vis.add_argument(
        "files",
        type=Path,
        nargs="*",
        metavar="FILE",
        help="images to look at (none: the filters only)",
    )
    vis.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for index.html and the PNGs (made when missing)",
    )
    vis.add_argument("--device", help="cpu or cuda (default: cuda when available)")

    pre = sub.add_parser(
        "pretrain",
        help="self-supervised starting weights from unlabelled images",
        description="Train a ResNet backbone on the unlabelled images under DIR "
        "(DICOM, PNG or JPEG, searched recursively; e.g. what the node received) "
        "with SimCLR contrastive learning: two random views of an image (rotated, "
        "shifted, zoomed, flipped, contrast, brightness, noise) are pulled "
        "together, views of different images pushed apart. Writes OUT, a state "
        "dict of the backbone for `medtrain fit DATA --out M --init-weights OUT`. "
        "Files that are not images are skipped.",
    )
    pre.add_argument(
        "dir", type=Path, metavar="DIR", help="folder of unlabelled images"
    )
    pre.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="OUT",
        help="the weights file to write (.safetensors)",
    )
    defaults = PretrainConfig()
    for flag, kind, text in (
        ("--architecture", str, "resnet18 (default), resnet34, resnet50, ..."),
        ("--size", int, f"input side in pixels (default {defaults.size})"),
        ("--epochs", int, f"passes over the images (default {defaults.epochs})"),
        (
            "--batch-size",
            int,
            f"images per batch, each the others' negatives (default "
            f"{defaults.batch_size})",
        ),
        ("--lr", float, f"AdamW learning rate (default {defaults.lr})"),
        (
            "--temperature",
            float,
            f"of the contrastive loss (default {defaults.temperature})",
        ),
        (
            "--noise",
            float,
            f"standard deviation of the noise added to each view, in normalized "
            f"units (default {defaults.noise})",
        ),
        ("--seed", int, f"random seed (default {defaults.seed})"),
    ):
        pre.add_argument(flag, type=kind, default=None, help=text)
    pre.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    pre.add_argument(
        "--cache", type=Path, metavar="DIR", help="preprocessing cache folder"
    )
    return parser


_FIT_DESCRIPTION = """\
Train a ResNet on labelled images, split by patient (stratified, by --seed), and
write MODEL (.safetensors, what dicom-node loads), MODEL-report/ (metrics.json,
history.csv, config.json, plots, model-card.md) and a resumable MODEL.ckpt.

DATA is a labels.csv manifest, a folder holding one, or <root>/<class>/ folders
of DICOM, PNG or JPEG files. labels.csv columns (other columns are ignored):
  path        the image file, relative to the manifest's folder (required)
  label       its class name, e.g. nodule or normal (required)
  patient_id  whose image it is: no patient is in two splits (default: the file)
  split       train, val or test to fix the image's split (default: drawn)
  mask        a PNG lesion mask of a positive image, at the image's size: sizes
              the input and the Grad-CAM layer, trains the lesion's locations
              to score positive (--cell-loss), and scores the pointing game
The positive class is the one not called normal, negative or absent (or
--positive); nodule, mass, effusion, pneumothorax and consolidation have SNOMED
CT codes built in, another name needs --code.

With no other flag, fit chooses for the data and prints each choice and why:
without --init-weights every layer trains from the first epoch; with it, the
head trains alone for 2 epochs and then layer1 on fine-tunes; the input size
makes the smallest lesions span about 3 cells of the ResNet stem's 1/4 grid;
the Grad-CAM layer is one whose grid a lesion covers a node of. A value given
by a flag or in --config always wins.

Under torchrun (torchrun --nproc-per-node 2 $(which medtrain) fit ...) the
processes train one model with DDP: gloo on the CPU, nccl with one GPU each;
--batch-size is the whole batch, shared among them."""

_FIT_EPILOG = """\
example:
  medtrain synth data/train --n 600 --seed 1 --size 128
  medtrain fit data/train --out models/chest.safetensors
  medtrain evaluate models/chest.safetensors data/test"""

# Flags of `fit`: each overrides the TrainConfig key of the same name.
_FIT_FLAGS: list[tuple[str, type, str]] = [
    ("--architecture", str, "resnet18 (default) .. resnet152"),
    ("--size", int, "input side in pixels (default: chosen from the data)"),
    ("--channels", int, "1 (default) or 3"),
    (
        "--epochs",
        int,
        "most epochs (default: 16 to 24, chosen from the input size; 16 with "
        "--init-weights)",
    ),
    (
        "--freeze-epochs",
        int,
        "head-only epochs first (default 0; 2 with --init-weights)",
    ),
    (
        "--unfreeze-from",
        str,
        "train from conv1 (every layer) or layer1..4 (default conv1; layer1 with "
        "--init-weights)",
    ),
    ("--batch-size", int, "images per step (default 32)"),
    ("--lr", float, "learning rate of the head-only epochs (default 1e-3)"),
    ("--finetune-lr", float, "learning rate after them (default 5e-4)"),
    ("--weight-decay", float, "AdamW weight decay (default 1e-4)"),
    ("--warmup-fraction", float, "share of each stage's steps warming up (0.1)"),
    ("--label-smoothing", float, "targets y(1 - s) + s/2 (default 0.05)"),
    ("--balance", str, "weighted (default), sampler or none"),
    ("--dropout", float, "before the head (default 0)"),
    (
        "--cell-loss",
        float,
        "weight of the loss that trains every location of a normal image to "
        "score negative and, where masks are given, the locations a lesion "
        "covers to score positive, keeping heatmaps on the finding "
        "(default 1; 0: off)",
    ),
    (
        "--gradcam-layer",
        str,
        "layer2, layer3 or layer4: where heatmaps are drawn, finer to coarser "
        "(default: chosen from the lesion masks and --size)",
    ),
    ("--hflip", bool, "random horizontal flips (off: laterality matters)"),
    (
        "--mixup",
        float,
        "blend each batch with a shuffled copy of itself, weight ~ Beta(a, a) "
        "(default 0: off)",
    ),
    (
        "--patience",
        int,
        "epochs without a better validation loss before stopping (default: "
        "half of --epochs; 5 with --init-weights)",
    ),
    ("--val-fraction", float, "patients for validation (default 0.2)"),
    ("--test-fraction", float, "patients held out for a test (default 0)"),
    ("--seed", int, "seed of the split, initialisation, augmentation (0)"),
    ("--positive", str, "the positive class (default: the one not named normal)"),
    (
        "--code",
        str,
        "the finding's coded concept value,scheme,meaning, e.g. "
        "27925004,SCT,Nodule (known names have one)",
    ),
    ("--finding-site", str, "the site's value,scheme,meaning (39607008,SCT,Lung)"),
    ("--target-sensitivity", float, "threshold reaching it (default: Youden's J)"),
    ("--name", str, "model name in the artifact"),
    ("--version", str, "model version in the artifact"),
    ("--precision", str, "fp32 (default) or bf16 on the CPU (CUDA: mixed)"),
    ("--init-weights", str, "local torchvision state dict to start from"),
    ("--window", str, "auto (default), minmax or fixed"),
    ("--window-center", float, "fixed window centre"),
    ("--window-width", float, "fixed window width"),
    ("--resize", str, "stretch (default) or letterbox"),
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medtrain``.

    Parameters
    ----------
    argv
        The arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        0 on success, 1 on a failure, 2 on a usage error.
    """
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from training.realistic import synthesize_realistic
        from training.synthetic import synthesize

        if args.background is not None and args.modality != "DX":
            print("medtrain: --background makes DX images only", file=sys.stderr)
            return EXIT_USAGE
        if args.size < 32:
            print("medtrain: --size must be at least 32", file=sys.stderr)
            return EXIT_USAGE
        if args.out.exists() and any(args.out.iterdir()):
            print(
                f"medtrain: {args.out} is not empty; give a new folder",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if args.background is None:
            with bar(args.n, "writing") as shown:
                labels = synthesize(
                    args.out,
                    args.n,
                    args.seed,
                    args.modality,
                    args.size,
                    args.prevalence,
                    shown.update,
                )
            print(f"wrote {args.n} {args.modality} images and {labels}")
            return EXIT_OK
        try:
            with bar(args.n, "writing") as shown:
                labels = synthesize_realistic(
                    args.out,
                    args.n,
                    args.seed,
                    args.background,
                    args.size,
                    args.prevalence,
                    shown.update,
                )
        except ValueError as exc:
            print(f"medtrain: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"wrote {args.n} DX images on {args.background} and {labels}")
        return EXIT_OK
    try:
        if args.command == "fit":
            return _fit(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "explain":
            return _explain(args)
        if args.command == "export":
            return _export(args)
        if args.command == "visualize":
            return _visualize(args)
        if args.command == "pretrain":
            return _pretrain(args)
    except (DataError, ArtifactError, PreprocessError, ValueError) as exc:
        print(f"medtrain: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    raise AssertionError(f"unhandled command {args.command}")  # argparse requires one


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _fit(args: argparse.Namespace) -> int:
    values = read_toml(args.config) if args.config else {}
    for flag, _, _ in _FIT_FLAGS:
        key = flag[2:].replace("-", "_")
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    out: Path = args.out
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the model file must end in .safetensors")
    checkpoint = out.with_suffix(".ckpt")
    if args.resume and not checkpoint.is_file():
        raise ValueError(f"--resume: no checkpoint {checkpoint}")
    cache = args.cache or out.parent / ".medtrain-cache"
    device = _device(args.device)
    samples = load_samples(args.data)
    config, choices = choose(values, measure(samples))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        for line in choices:
            print(line)
    result = fit(samples, config, checkpoint, cache, device, resume=args.resume)
    if result.rank != 0:
        return 0  # under torchrun, rank 0 writes the model and the report
    artifact = result.artifact
    model = artifact.build().to(device)
    positive = result.metrics["positive"]
    val, val_scores = result.val, result.val_scores
    threshold = artifact.labels[0].threshold
    result.metrics["val"].update(
        binary_metrics(val_scores, val.y.numpy(), threshold)
        | {"calibration_error": calibration_error(val_scores, val.y.numpy())}
    )
    if result.splits["test"]:
        with bar(len(result.splits["test"]), "test split") as shown:
            test = load_frames(
                result.splits["test"],
                positive,
                artifact.preprocessing,
                cache,
                shown.update,
            )
        _, test_scores = evaluate(model, test, device)
        result.metrics["test"] = {
            "frames": len(test),
            "auroc": auroc(test_scores, test.y.numpy()),
            **binary_metrics(test_scores, test.y.numpy(), threshold),
        }
    sha = artifact.save(out)
    examples = _examples(model, val, val_scores, artifact)
    write_report(
        out.with_name(out.stem + "-report"),
        artifact,
        result.history,
        result.metrics,
        config.to_dict(),
        val_scores,
        val.y.numpy().astype(np.float64),
        examples,
    )
    val_m = result.metrics["val"]
    print(
        f"wrote {out} (sha256 {sha[:16]}...): validation AUROC "
        f"{val_m['auroc']:.3f}, sensitivity {val_m['sensitivity']:.3f}, "
        f"specificity {val_m['specificity']:.3f} at threshold {threshold:.3f}; "
        f"report in {out.stem}-report/"
    )
    return EXIT_OK


def _examples(
    model: torch.nn.Module,
    val: Dataset,
    scores: np.ndarray[Any, Any],
    artifact: ModelArtifact,
) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], float]]:
    # The four highest-scoring validation frames, with their Grad-CAM.
    order = np.argsort(-scores)[:4]
    if not len(order):
        return []
    x = val.x[torch.as_tensor(order.copy())].to(next(model.parameters()).device)
    heatmaps, _ = gradcam(model, x, 0)
    spec = artifact.preprocessing
    images = (x.cpu() * spec.std[0] + spec.mean[0]).mean(dim=1).clamp(0, 1)
    return [
        (images[i].numpy(), heatmaps[i].cpu().numpy(), float(scores[j]))
        for i, j in enumerate(order)
    ]


def _evaluate(args: argparse.Namespace) -> int:
    artifact = ModelArtifact.load(args.model)
    classifier = Classifier(artifact, device=args.device)
    samples = load_samples(args.data)
    label = artifact.labels[0]
    with bar(len(samples), "preprocessing") as shown:
        data = load_frames(
            samples, label.name, artifact.preprocessing, args.cache, shown.update
        )
    batches = []
    with bar(len(data), "scoring") as shown:
        for i in range(0, len(data), 32):
            batch = data.x[i : i + 32]
            batches.append(classifier.forward(batch)[0][:, 0].double().numpy())
            shown.update(len(batch))
    scores = np.concatenate(batches)
    y = data.y.numpy()
    result: dict[str, Any] = {
        "model": f"{artifact.name} {artifact.version}",
        "frames": len(data),
        "positive": label.name,
        "threshold": label.threshold,
        "auroc": auroc(scores, y),
        **binary_metrics(scores, y, label.threshold),
        "calibration_error": calibration_error(scores, y),
    }
    pairs = lesion_frames(samples, label.name, artifact.preprocessing)
    with bar(len(pairs), "Grad-CAM") as shown:
        scored, images = pointing(classifier, pairs, shown.update)
    if images:
        result["pointing_game"] = scored
        result["pointing_game_images"] = images
    if args.json:
        print(
            json.dumps(
                {
                    k: (None if isinstance(v, float) and np.isnan(v) else v)
                    for k, v in result.items()
                },
                indent=2,
            )
        )
        return EXIT_OK
    for key, value in result.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<22}{text}")
    return EXIT_OK


def _pretrain(args: argparse.Namespace) -> int:
    from training.pretrain import image_files, pretrain

    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: the weights file must end in .safetensors")
    given = {
        key: getattr(args, key)
        for key in (
            "architecture",
            "size",
            "epochs",
            "batch_size",
            "lr",
            "temperature",
            "noise",
            "seed",
        )
        if getattr(args, key) is not None
    }
    config = PretrainConfig(**given)
    result = pretrain(
        image_files(args.dir), config, args.out, args.cache, _device(args.device)
    )
    print(
        f"wrote {args.out}: {config.architecture} backbone after {config.epochs} "
        f"epochs on {result.images} images ({result.seconds / 60:.1f} min, "
        f"contrastive loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}); "
        f"start from it with: medtrain fit DATA --out MODEL --init-weights {args.out}"
    )
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from training.export import export

    out: Path = args.out
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the model file must end in .safetensors")
    if out.resolve() == args.model.resolve():
        raise ValueError(f"--out {out}: give another file than MODEL")
    source = ModelArtifact.load(args.model)
    samples = len(load_samples(args.data))
    with bar(samples, "preprocessing") as shown:
        done = export(
            source,
            args.model,
            args.format,
            args.data,
            args.tolerance,
            _device(args.device),
            args.cache,
            shown.update,
        )
    sha = done.artifact.save(out)
    m = done.measured
    print(
        f"wrote {out} (sha256 {sha[:16]}...): {args.format} of {source.name} "
        f"{source.version}. On {m['images']} images of {args.data} ({m['device']}): "
        f"AUROC {m['auroc_source']:.3f} -> {m['auroc']:.3f} (change "
        f"{m['auroc_delta']:+.4f}, tolerance {m['tolerance']}), largest probability "
        f"difference {m['largest_probability_difference']:.4f}, agreement at the "
        f"threshold {100 * m['agreement_at_threshold']:.1f} %, "
        f"{m['images_per_s']:.1f} images/s against {m['images_per_s_source']:.1f} "
        f"({m['speedup']:.2f}x, batches of 8)"
    )
    return EXIT_OK


def _visualize(args: argparse.Namespace) -> int:
    from training.visualize import visualize

    artifact = ModelArtifact.load(args.model)
    with bar(len(args.files), "visualizing") as shown:
        done = visualize(
            artifact, args.files, args.out, _device(args.device), shown.update
        )
    print(f"wrote {len(done.images)} images and {done.index}: open it in a browser")
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    artifact = ModelArtifact.load(args.model)
    classifier = Classifier(artifact, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    label = artifact.labels[0]
    with bar(len(args.files), "explaining") as shown:
        for path in args.files:
            try:
                ds = dcmread(path)
            except (InvalidDicomError, OSError) as exc:
                raise DataError(f"{path}: cannot read as DICOM ({exc})") from exc
            prediction = classifier.predict([ds], explain_top_k=1)
            explanation = prediction.explanations[0]
            spec = artifact.preprocessing
            plain = replace(
                spec,
                size=(explanation.source.rows, explanation.source.columns),
                resize="stretch",
                mean=(0.0,) * spec.channels,
                std=(1.0,) * spec.channels,
            )
            image = (
                preprocess(ds, plain).pixels[explanation.source.frame_index].mean(dim=0)
            )
            p = prediction.labels[0]
            verdict = "Present" if p.positive else "Absent"
            target = args.out / f"{path.stem}.png"
            overlay_png(
                target,
                image.numpy(),
                explanation.heatmap,
                f"{label.name}: p = {p.probability:.2f} "
                f"({verdict} at {label.threshold:.2f})",
            )
            shown.write(
                f"{path}: p({label.name}) = {p.probability:.3f} {verdict} -> {target}",
                file=sys.stdout,
            )
            shown.update(1)
    return EXIT_OK
