"""Evaluation: logits in batches, top-k accuracy, loss, per-class accuracy, confusion matrix — `cct eval`.

Training records how its model is to be evaluated under the checkpoint's "eval" key (precision,
batch size, test-time augmentation, input normalisation, image size, channels); `cct eval` and
`cct predict` reuse it by default, so evaluating the checkpoint that produced `results.json`
reproduces its test figures exactly. Test-time augmentation averages the logits of each image
and its horizontal mirror.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint, read_checkpoint
from .data import CIFAR_MEAN, CIFAR_STD
from .errors import CCTError, CheckpointError
from .runtime import autocast, recorded_precision, resolve_device, resolve_precision, tune_allocator


@dataclass
class EvalSettings:
    """How a checkpoint's model is evaluated; `mean`/`std` None means inputs are x / 255."""
    precision: str = "fp32"
    batch_size: int = 256
    tta: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    img_size: tuple[int, int] | None = None
    in_chans: int | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "EvalSettings":
        """The settings recorded by `cct train`; defaults (fp32, 256, no TTA, the model's usual normalisation) otherwise."""
        d = dict(checkpoint.get("eval") or {})
        config = checkpoint.get("config") or {}
        if "mean" in d:
            mean, std = d.get("mean"), d.get("std")
        else:  # not trained by `cct train`: the Keras example feeds x / 255, the official recipes CIFAR statistics
            mean, std = (None, None) if config.get("block") == "keras" else (CIFAR_MEAN, CIFAR_STD)
            if len(mean or ()) != config.get("in_chans", 3):
                mean, std = None, None
        return cls(precision=d.get("precision", "fp32"), batch_size=int(d.get("batch_size", 256)),
                   tta=bool(d.get("tta", False)),
                   mean=tuple(mean) if mean else None, std=tuple(std) if std else None,
                   img_size=tuple(d.get("img_size") or config.get("img_size") or ()) or None,
                   in_chans=d.get("in_chans", config.get("in_chans")))


def load_for_eval(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, EvalSettings]:
    """A checkpoint's model (eval mode, on `device`) and its evaluation settings.

    The settings are also attached as `model.eval_settings`, which `predict_logits` uses by default.
    """
    model = load_checkpoint(path, map_location=device)
    settings = EvalSettings.from_checkpoint(read_checkpoint(path))
    model.eval_settings = settings
    return model, settings


def preprocess(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """uint8 (N, C, H, W) → float inputs as in training: x / 255, then (x - mean) / std when given."""
    from .augment import normalize
    return normalize(images, mean, std)


_FROM_MODEL = object()


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, *, precision: str, batch_size: int, tta: bool = False,
                   mean=_FROM_MODEL, std=_FROM_MODEL, device: str | torch.device | None = None) -> torch.Tensor:
    """Logits (N, num_classes), float32 on the CPU, of uint8 images (N, C, H, W).

    Args:
        model: a CCT (its mode is restored afterwards).
        images: uint8 images at the model's input size and channels.
        precision: "fp32", "bf16", ... (see `cct.runtime`); "auto" is resolved for the device.
        batch_size: images per forward pass (results can depend on it in reduced precision).
        tta: average the logits of each image and its horizontal mirror.
        mean, std: the normalisation (fractions of 255; None: x / 255). By default the one recorded in
            the checkpoint, from `model.eval_settings` (set by `load_for_eval`), else x / 255.
        device: where to compute (default: where the model is).
    """
    settings = getattr(model, "eval_settings", None)
    if mean is _FROM_MODEL:
        mean = settings.mean if settings is not None else None
    if std is _FROM_MODEL:
        std = settings.std if settings is not None else None
    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = resolve_precision(precision, device)
    tune_allocator()
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for chunk in images.split(batch_size):
            x = preprocess(chunk, mean, std).to(device)
            with autocast(precision, device):
                logits = model(x).float()
                if tta:
                    logits = (logits + model(x.flip(-1)).float()) / 2
            outputs.append(logits.cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.zeros(0, getattr(model.cfg, "num_classes", 0))
    return torch.cat(outputs)


def metrics(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
            class_names: list[str] | None = None) -> dict:
    """top1, top5 (k = min(5, classes)), mean cross-entropy loss, per-class accuracy and confusion matrix."""
    num_classes = logits.shape[1]
    labels = labels.long()
    n = len(labels)
    if n == 0:
        raise CCTError("nothing to evaluate: no images")
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    predicted = topk[:, 0]
    # 6 decimals: fp32 kernels can differ in the 9th digit between processes; accuracies are exact counts
    loss = round(F.cross_entropy(logits.double(), labels, label_smoothing=label_smoothing).item(), 6)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)  # rows: true class, columns: predicted
    per_class_total = confusion.sum(1)
    names = class_names if class_names and len(class_names) == num_classes else [str(i) for i in range(num_classes)]
    per_class = {name: (confusion[i, i].item() / per_class_total[i].item() if per_class_total[i] else None)
                 for i, name in enumerate(names)}
    return {"n": n, "top1": (predicted == labels).double().mean().item(),
            "top5": (topk == labels[:, None]).any(1).double().mean().item(), "top5_k": k, "loss": loss,
            "per_class": per_class, "classes": names, "confusion": confusion.tolist()}


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, precision: str, batch_size: int,
             tta: bool = False, mean=None, std=None, device: str | torch.device | None = None,
             label_smoothing: float = 0.0, class_names: list[str] | None = None) -> dict:
    """Evaluate `model` on uint8 images and int64 labels; see `metrics` for the returned keys."""
    logits = predict_logits(model, images, precision=precision, batch_size=batch_size, tta=tta, mean=mean, std=std,
                            device=device)
    names = class_names or getattr(model, "class_names", None)
    return metrics(logits, labels, label_smoothing=label_smoothing, class_names=names)


def evaluate_checkpoint(path: str | Path, source: str, *, split: str = "auto", precision: str | None = None,
                        batch_size: int | None = None, tta: bool | None = None, device: str = "auto",
                        skip_bad_images: bool = False, progress: bool = True) -> dict:
    """Evaluate a checkpoint on a data source, with the checkpoint's evaluation settings unless overridden."""
    from . import data as data_mod
    device = resolve_device(device)
    model, settings = load_for_eval(path, device)
    precision = resolve_precision(precision or recorded_precision(settings.precision, device), device)
    batch_size = settings.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise CCTError(f"--batch-size must be at least 1, got {batch_size}")
    tta = settings.tta if tta is None else tta
    dataset = data_mod.load(source, img_size=tuple(model.cfg.img_size), in_chans=model.cfg.in_chans,
                            skip_bad_images=skip_bad_images, progress=progress)
    parts = {"test": dataset.test, "val": dataset.val, "train": dataset.train}
    if split == "auto":
        split = next(name for name in ("test", "val", "train") if parts[name] is not None)
    part = parts.get(split)
    if part is None:
        raise CCTError(f"{source} has no {split} split")
    num_classes = model.cfg.num_classes
    if len(dataset.classes) != num_classes:
        raise CheckpointError(f"{path} was trained on {num_classes} classes but {source} has {len(dataset.classes)}")
    if model.class_names and list(model.class_names) != list(dataset.classes):
        raise CheckpointError(f"{path} was trained on classes {model.class_names[:5]}... but {source} has "
                              f"{list(dataset.classes)[:5]}...")
    result = evaluate(model, part.images, part.labels, precision=precision, batch_size=batch_size, tta=tta,
                      mean=settings.mean, std=settings.std, device=device, class_names=list(dataset.classes))
    return {"checkpoint": str(path), "data": source, "split": split, **result, "precision": precision,
            "batch_size": batch_size, "tta": tta}


# ---------------------------------------------------------------------- command line
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint: top-1/5, loss, per-class accuracy, confusion",
                              description="Evaluate a checkpoint on a data source's test split (by default with the "
                                          "precision, batch size and TTA recorded in the checkpoint).")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--data", required=True, metavar="SOURCE")
    p.add_argument("--split", default="auto", choices=("auto", "test", "val", "train"),
                   help="which part of SOURCE (auto: test if present, else val, else train)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the flipped image (default: as recorded in the checkpoint)")
    p.add_argument("--plot", metavar="FILE", help="draw the confusion matrix to FILE (.png, .pdf, .svg)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, help="default: the checkpoint's")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, precision=args.precision,
                                 batch_size=args.batch_size, tta=args.tta, device=args.device,
                                 skip_bad_images=args.skip_bad_images, progress=not (args.quiet or args.json))
    if args.plot:
        from .plots import plot_confusion
        plot_confusion(result["confusion"], result["classes"], args.plot)
        if not args.json:
            print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['checkpoint']} on {result['data']} ({result['split']}, {result['n']} images, "
          f"{result['precision']}, batch {result['batch_size']}{', TTA' if result['tta'] else ''})")
    print(f"top-1 {result['top1']:.4f}   top-{result['top5_k']} {result['top5']:.4f}   loss {result['loss']:.4f}")
    width = max(len(c) for c in result["classes"])
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {'-' if acc is None else f'{acc:.4f}'}")
    return 0
