"""Evaluation: logits in batches, top-k accuracy, loss, per-class accuracy, confusion matrix — `cct eval`.

Training records how its model is to be evaluated under the checkpoint's "eval" key (precision,
batch size, test-time augmentation, input normalisation, image size, channels); `cct eval` and
`cct predict` reuse it by default, so evaluating the checkpoint that produced `results.json`
reproduces its test figures exactly. Test-time augmentation averages the logits of each image
and its horizontal mirror, and with `tta_translate` also of shifted copies (`tta_logits`). Text
checkpoints are evaluated the same way on a text source: its texts go through the checkpoint's own
tokenizer at the recorded `seq_len` (`cct.kinds.TextPreprocessing`).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from typing import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from .checkpoint import model_from_checkpoint, read_checkpoint
from .cifar import RELEASES
from .errors import CCTError, CheckpointError
from .kernels import KERNELS, fuse, use_kernels
from .kinds import TextPreprocessing, TextSet, TokenBatch, detect_kind, model_args, preprocessing_from_checkpoint
from .preprocess import Preprocessing
from .holdout import OtherSource, class_difference
from .text_data import LABEL_LEVELS, load_text, recorded_test
from .text_model import TextCCT
from .runtime import PRECISIONS, autocast, recorded_precision, resolve_device, resolve_precision, tune_allocator

log = logging.getLogger(__name__)


def load_for_eval(path: str | Path, device: str | torch.device = "cpu", *,
                  kernels: str = "fast") -> tuple[nn.Module, Preprocessing | TextPreprocessing]:
    """A checkpoint's model (eval mode, on `device`, computing with `kernels`) and its input record."""
    model, prep, _ = _open(path, device, kernels)
    return model, prep


def _open(path: str | Path, device, kernels: str) -> tuple[nn.Module, Preprocessing | TextPreprocessing, dict]:
    """`load_for_eval`, and the checkpoint's entries, from one read of the file."""
    data = read_checkpoint(path)
    model = use_kernels(model_from_checkpoint(data, path, map_location=device), kernels)
    return model, preprocessing_from_checkpoint(data), data


@torch.no_grad()
def predict_logits(model: nn.Module, images, prep: Preprocessing | TextPreprocessing, *,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """Logits (N, num_classes), float32 on the CPU, of uint8 images (N, C, H, W) (or of a text model's
    `cct.kinds.TokenBatch` with its `TextPreprocessing`).

    Args:
        model: a CCT (its mode is restored afterwards), fused (`cct.kernels.fuse`) by the caller where it
            runs the fast kernels: `evaluate` does so once for a whole dataset.
        images: uint8 images at the model's input size and channels: a tensor, or anything with
            `split(batch_size)` yielding uint8 batches (a streamed image set).
        prep: normalisation, precision ("auto" is resolved for the device), batch size (results can
            depend on it in reduced precision) and TTA (average with the horizontal mirror).
        device: where to compute (default: where the model is).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = resolve_precision(prep.precision, device)
    tune_allocator()
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for chunk in images.split(prep.batch_size):
            x = [a.to(device) for a in model_args(prep, chunk)]
            with autocast(precision, device):
                logits = model(*x).float()
                if prep.tta:
                    logits = tta_logits(model, x[0], logits, prep.tta_translate)
            outputs.append(logits.cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.zeros(0, getattr(model.cfg, "num_classes", 0))
    return torch.cat(outputs)


def tta_views(tta: bool, translate: int = 0) -> int:
    """Forward passes per image of an evaluation with these TTA settings (`tta_logits`)."""
    return 1 if not tta else 6 if translate else 2


def check_tta_shift(translate: int, img_size: tuple[int, int]) -> None:
    """A shift of half an image's side or more leaves a blank view: refused, in training and in `cct eval` alike."""
    if translate and 2 * translate >= min(img_size):
        raise CCTError(f"--tta-translate {translate} would shift {img_size[0]}x{img_size[1]} images by half of their "
                       "side or more")


def tta_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, logits: torch.Tensor,
               translate: int = 0) -> torch.Tensor:
    """Test-time augmentation of a normalised batch whose plain logits are `logits`: the average with its mirror;
    with `translate` > 0, that average weighs half and the other half is the mean over the batch shifted
    `translate` pixels up-left and down-right (zero padded), each with its mirror (airbench's TTA; validation
    top-1 +0.5 points for the fast recipe, benchmarks/README.md)."""
    flipped = (logits + model(x.flip(-1)).float()) / 2
    if not translate:
        return flipped
    h, w = x.shape[-2:]
    padded = F.pad(x, (translate,) * 4)
    shifted = (padded[..., :h, :w], padded[..., 2 * translate:, 2 * translate:])
    return (flipped + sum(model(s).float() + model(s.flip(-1)).float() for s in shifted) / 4) / 2


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


def evaluate(model: nn.Module, images, labels: torch.Tensor, prep: Preprocessing | TextPreprocessing, *,
             device: str | torch.device | None = None, label_smoothing: float = 0.0,
             class_names: list[str] | None = None) -> dict:
    """Evaluate `model` on uint8 images (or token batches) and int64 labels; see `metrics` for the returned keys."""
    fuse(model)  # the explicit inference step of the fast kernels, once for the whole evaluation
    logits = predict_logits(model, images, prep, device=device)
    names = class_names or getattr(model, "class_names", None)
    return metrics(logits, labels, label_smoothing=label_smoothing, class_names=names)


def _same_source(data: str | None, source: str) -> bool:
    """Whether `source` is the run's `data`: the same path, or the same CIFAR release by name."""
    if not data:
        return False
    if str(data).lower() in RELEASES or str(source).lower() in RELEASES:
        return str(data).lower() == str(source).lower()
    return Path(data).expanduser().resolve() == Path(source).expanduser().resolve()


def _decoded_natively(run: dict, source: str, skip_bad_images: bool, resize_mode: str) -> bool:
    """Whether `source` is the run's own, which training decoded at its own size and channels with these settings."""
    if run.get("img_size") is not None or run.get("in_chans") is not None or run.get("pretrained") \
            or bool(run.get("skip_bad_images")) != skip_bad_images or run.get("resize_mode", "resize") != resize_mode:
        return False
    return _same_source(run.get("data"), source)


def evaluate_checkpoint(path: str | Path, source: str, *, split: str = "auto", precision: str | None = None,
                        batch_size: int | None = None, tta: bool | None = None, tta_translate: int | None = None,
                        device: str = "auto",
                        kernels: str = "fast", skip_bad_images: bool = False, progress: bool = True,
                        label_level: str | None = None) -> dict:
    """Evaluate a checkpoint on a data source, with the checkpoint's evaluation settings unless overridden.

    A text checkpoint reads a text source (`cct.text_data.load_text`; TREC labels at `label_level`,
    default: the level it was trained on; the test texts its run held out of a source without a test set)
    and reports how many texts were truncated ("truncated")."""
    device = resolve_device(device)
    model, prep, recorded = _open(path, device, kernels)
    kind, found = ("text" if isinstance(model, TextCCT) else "image"), detect_kind(source)
    if found not in (None, kind):
        raise CCTError(f"{path} is {'a text' if kind == 'text' else 'an image'} model, but {source} is {found} data")
    prep = replace(prep, precision=recorded_precision(prep.precision, device))
    if (tta or tta_translate) and isinstance(prep, TextPreprocessing):
        raise CCTError("--tta and --tta-translate (test-time augmentation) are for image models")
    overrides = {k: v for k, v in dict(precision=precision, batch_size=batch_size, tta=tta,
                                       tta_translate=tta_translate).items() if v is not None}
    prep = replace(prep, **overrides)
    if prep.batch_size < 1:
        raise CCTError(f"--batch-size must be at least 1, got {prep.batch_size}")
    if tta_translate is not None and (tta_translate < 0 or (tta_translate and not prep.tta)):
        raise CCTError(f"--tta-translate must be a non-negative number of pixels, used with --tta; got {tta_translate}")
    if tta_translate:
        check_tta_shift(tta_translate, tuple(model.cfg.img_size))
    prep = replace(prep, precision=resolve_precision(prep.precision, device))
    extra = {}
    if isinstance(model, TextCCT):
        parts, classes, extra = _text_parts(recorded if split in ("auto", "test") else {}, source, model, prep,
                                            label_level)
    else:  # class folders and CSVs: exactly the test files training held out (recorded in the checkpoint)
        test_files = recorded.get("split") if split in ("auto", "test") else None
        run = recorded.get("train_config") or {}  # the other splits: drawn as the run drew them
        drawn = {k: run[k] for k in ("test_split", "seed") if recorded.get("split") and run.get(k) is not None}
        sized = dict(img_size=tuple(model.cfg.img_size), in_chans=model.cfg.in_chans)
        # the run's own source, decoded as the run decoded it (at its own size): the same pixels, from the same
        # cache entry, instead of a second entry of the same pixels at the size asked for
        native = test_files is None and _decoded_natively(run, source, skip_bad_images, prep.resize_mode)
        load = functools.partial(data_mod.load, source, skip_bad_images=skip_bad_images, progress=progress,
                                 resize_mode=prep.resize_mode)
        try:
            # a run that held nothing out (trained on a tree, an archive, CIFAR) drew no split of this source either
            split_args = dict(test_files=test_files, **(drawn if recorded.get("split") else {"test_split": 0.0}))
            dataset = load(**(dict(img_size=None, in_chans=None) if native else sized), **split_args)
            first = next((s for s in (dataset.test, dataset.train) if s is not None), None)
            if native and first is not None and tuple(first.images.shape[1:]) != (sized["in_chans"], *sized["img_size"]):
                dataset = load(**sized, **split_args)  # the source's images are no longer what the run decoded
            other = None if recorded.get("split") or dataset.test is not None else \
                f"{source}: the checkpoint's run held out no files of it"
        except OtherSource as e:  # other labelled data: its own test split, or every image of a flat one
            dataset, other = load(test_split=0.0), str(e)
        if other is not None:
            log.warning("%s: evaluating %s", other, "its test split" if dataset.test is not None else
                        f"all {len(dataset.train)} of its images")
            dataset = dataset if dataset.test is not None else replace(dataset, test=dataset.train)
        parts = {"test": dataset.test, "val": dataset.val, "train": dataset.train}
        if split in ("train", "val") and ((recorded.get("split") and other is None) or _same_source(run.get("data"),
                                                                                                   source)):
            # the run's own source: its training and validation sets, carved as the run carved them
            parts["train"], parts["val"] = data_mod.split(dataset, train_limit=run.get("train_limit"),
                                                          val_split=run.get("val_split") or 0.0, seed=run.get("seed", 0))
        classes = list(dataset.classes)
        extra = {"source_changed": True} if dataset.source_changed else {}
    if split == "auto":
        split = next(name for name in ("test", "val", "train") if parts[name] is not None)
    part = parts.get(split)
    if part is None:
        raise CCTError(f"{source} has no {split} split")
    num_classes = model.cfg.num_classes
    if len(classes) != num_classes:
        difference = f": {class_difference(list(model.class_names), classes)}" if model.class_names else ""
        raise CheckpointError(f"{path} was trained on {num_classes} classes but {source} has {len(classes)}{difference}")
    if model.class_names and list(model.class_names) != classes:
        i = next(i for i, (a, b) in enumerate(zip(model.class_names, classes)) if a != b)
        raise CheckpointError(f"{path} was trained on other classes than {source} has: class {i} is "
                              f"{model.class_names[i]!r} there, {classes[i]!r} here")
    result = evaluate(model, part.inputs, part.labels, prep, device=device, class_names=classes)
    if "truncated" in extra:
        result["truncated"] = extra["truncated"].get(split)
    if extra.get("source_changed"):
        result["source_changed"] = True
    return {"checkpoint": str(path), "data": source, "split": split, **result, "precision": prep.precision,
            "batch_size": prep.batch_size, "tta": prep.tta,
            **({"tta_translate": prep.tta_translate} if prep.tta and getattr(prep, "tta_translate", 0) else {})}


def _text_parts(recorded: dict, source: str, model: TextCCT, prep: TextPreprocessing, label_level: str | None):
    """A text source's splits, tokenized by the checkpoint's tokenizer: (parts, classes, {"truncated": ...})."""
    if label_level is None:  # as the run was trained
        label_level = (recorded.get("train_config") or {}).get("label_level", "coarse")
    dataset = load_text(source, label_level=label_level)
    if recorded.get("split"):  # the test texts the run held out of a source without a test set
        dataset = recorded_test(dataset, recorded["split"], source, hint="; --split train evaluates on all its texts")
    parts, truncated = {"test": None, "val": None, "train": None}, {}
    for name, texts, labels in (("test", dataset.test_texts, dataset.test_labels),
                                ("train", dataset.train_texts, dataset.train_labels)):
        if texts is not None:
            ids, mask, truncated[name] = model.tokenizer.encode_counted(texts, seq_len=prep.seq_len)
            parts[name] = TextSet(TokenBatch(ids, mask), labels)
    return parts, list(dataset.classes), {"truncated": truncated}


# ---------------------------------------------------------------------- command line
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint: top-1/5, loss, per-class accuracy, confusion",
                              description="Evaluate a checkpoint on a data source's test split (by default with the "
                                          "precision, batch size and TTA recorded in the checkpoint).")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--data", required=True, metavar="SOURCE")
    p.add_argument("--split", default="auto", choices=("auto", "test", "val", "train"),
                   help="which part of SOURCE (auto: test if present, else val, else train); of the run's own "
                        "source, train and val are the run's training and validation images")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the flipped image (default: as recorded in the checkpoint)")
    p.add_argument("--tta-translate", type=int, metavar="PIXELS",
                   help="with TTA, also average shifted copies of each image (default: as recorded)")
    p.add_argument("--plot", metavar="FILE", help="draw the confusion matrix to FILE (.png, .pdf, .svg)")
    p.add_argument("--precision", choices=PRECISIONS, help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, help="default: the checkpoint's")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--kernels", default="fast", choices=[k for k in KERNELS if k != "native"],  # training only
                   help="fast: cct.kernels (default); reference: the plain layers of cct.layers")
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--label-level", choices=LABEL_LEVELS, help="text models on TREC: coarse or fine labels "
                                                                "(default: the level the model was trained on)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.plot:
        from .plots import check_figure_path
        check_figure_path(args.plot, "--plot")  # before the evaluation, not after it
    result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, precision=args.precision,
                                 batch_size=args.batch_size, tta=args.tta, tta_translate=args.tta_translate,
                                 device=args.device,
                                 kernels=args.kernels, skip_bad_images=args.skip_bad_images,
                                 progress=not (args.quiet or args.json), label_level=args.label_level)
    if args.plot:
        from .plots import plot_confusion
        plot_confusion(result["confusion"], result["classes"], args.plot)
        if not args.json:
            print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    unit = "texts" if "truncated" in result else "images"
    print(f"{result['checkpoint']} on {result['data']} ({result['split']}, {result['n']} {unit}, "
          f"{result['precision']}, batch {result['batch_size']}{', TTA' if result['tta'] else ''})")
    print(f"top-1 {result['top1']:.4f}   top-{result['top5_k']} {result['top5']:.4f}   loss {result['loss']:.4f}")
    width = max(len(c) for c in result["classes"])
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {'-' if acc is None else f'{acc:.4f}'}")
    return 0
