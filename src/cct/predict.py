"""Classify image files with a checkpoint or an exported ONNX model — `cct predict`.

An image of any size and Pillow mode is decoded as a dataset's images are (`cct.decode`), so a
prediction sees what training and `cct eval` saw: palette images go through RGBA, the image is
converted to the model's channels (RGB, or ITU-R 601-2 luma for one channel; alpha is dropped)
and resized to the model's input size with Pillow's bicubic filter (JPEGs first shrink while
decoding through libjpeg's draft mode). Pixels then become floats as in training: x / 255, then
(x - mean) / std per channel when the checkpoint records a normalisation.

That normalisation comes from the checkpoint's "eval" entry, written by `cct train`. Checkpoints
without one get the recipe's usual input: x / 255 for the Keras example's model (its
`Rescaling(1 / 255)`), the CIFAR-10 mean and std of the official SHI-Labs recipe for the others.
An ONNX file exported by `cct export` carries the same description in its metadata.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint, read_checkpoint
from .decode import decode_image
from .errors import CCTError
from .kernels import fuse, use_kernels
from .preprocess import Preprocessing
from .runtime import autocast, recorded_precision, resolve_precision

BATCH_SIZE = 256


def load_image(path: str | Path, img_size: tuple[int, int], in_chans: int) -> torch.Tensor:
    """One image file as a uint8 (C, H, W) tensor of the model's size and channels, decoded by
    `cct.decode.decode_image` as datasets are.

    Raises `cct.data.DataError` (a `CCTError`) naming the file when it cannot be read.
    """
    if in_chans not in (1, 3):
        raise CCTError(f"cannot feed image files to a model of {in_chans} input channels (only 1 or 3)")
    return torch.from_numpy(decode_image(path, size=tuple(img_size), channels=in_chans))


@dataclass
class Classifier:
    """A model ready to classify: float batches → logits, with its class names and preprocessing."""
    logits: Callable[[torch.Tensor], torch.Tensor]
    class_names: list[str]
    preprocessing: Preprocessing
    source: str


def open_classifier(path: str | Path, precision: str | None = None, *, kernels: str = "fast") -> Classifier:
    """A checkpoint (`.pt`, `.safetensors`) or an ONNX file exported by `cct export`, ready to classify.

    Args:
        path: the model file.
        precision: for checkpoints, "fp32", "bf16" or "auto"; default: the one recorded by training (fp16, a
            CUDA precision, runs as fp32 here), else fp32.
            An ONNX model always computes in float32.
        kernels: for checkpoints, "fast" (`cct.kernels`, fused for inference) or "reference".
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return _open_onnx(path)
    model = fuse(use_kernels(load_checkpoint(path).float().eval(), kernels))
    prep = Preprocessing.from_checkpoint(read_checkpoint(path))
    precision = resolve_precision(precision or recorded_precision(prep.precision, "cpu"), "cpu")

    @torch.inference_mode()
    def logits(x: torch.Tensor) -> torch.Tensor:
        with autocast(precision, "cpu"):
            return model(x).float()

    names = _class_names(model.class_names, model.cfg.num_classes)
    return Classifier(logits, names, prep, str(path))


def _class_names(names: list[str] | None, num_classes: int) -> list[str]:
    return list(names) if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def require_onnxruntime():
    """The onnxruntime module, or a `CCTError` saying how to install the optional extra."""
    try:
        import onnxruntime
    except ImportError:
        raise CCTError("running an ONNX model needs onnxruntime, part of the optional extra: "
                       "pip install 'cct[export]'") from None
    return onnxruntime


def onnx_session(path: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session on an ONNX file (or the serialised model itself)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: stdout and stderr stay readable
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        if not isinstance(path, bytes) and not Path(path).is_file():
            raise CCTError(f"model not found: {path}") from None
        where = "the exported model" if isinstance(path, bytes) else path
        raise CCTError(f"{where} is not a readable ONNX model: {str(e).strip().splitlines()[0]}") from None


def _open_onnx(path: Path) -> Classifier:
    session = onnx_session(path)
    meta = session.get_modelmeta().custom_metadata_map
    if "preprocessing" not in meta:
        raise CCTError(f"{path} has no 'preprocessing' metadata: export it with `cct export`")
    preprocessing = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
    input_name = session.get_inputs()[0].name
    batch = session.get_inputs()[0].shape[0]
    num_classes = session.get_outputs()[0].shape[1]
    fixed = batch if isinstance(batch, int) else None

    def logits(x: torch.Tensor) -> torch.Tensor:
        x = x.float().numpy()
        if fixed is None:
            return torch.from_numpy(session.run(None, {input_name: x})[0])
        out = []  # a graph exported for a fixed batch size: run full batches, padding the last
        for start in range(0, len(x), fixed):
            chunk = x[start:start + fixed]
            padded = np.concatenate([chunk, np.zeros((fixed - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            out.append(session.run(None, {input_name: padded})[0][:len(chunk)])
        return torch.from_numpy(np.concatenate(out))

    names = json.loads(meta.get("class_names", "null"))
    return Classifier(logits, _class_names(names, int(num_classes)), preprocessing, str(path))


def predict(model: str | Path | Classifier, images: Sequence[str | Path], *, topk: int = 5,
            precision: str | None = None) -> list[dict]:
    """The `topk` most probable classes of each image file.

    Args:
        model: a checkpoint or `.onnx` path, or a `Classifier` from `open_classifier`.
        images: image files, any size and Pillow mode.
        topk: classes per image (at most the number of classes).
        precision: see `open_classifier`.

    Returns:
        One dict per image: {"image": path, "predictions": [{"class", "index", "probability"}, ...]}.
    """
    if topk < 1:
        raise CCTError(f"--topk must be at least 1, got {topk}")
    clf = model if isinstance(model, Classifier) else open_classifier(model, precision)
    prep = clf.preprocessing
    results = []
    for start in range(0, len(images), BATCH_SIZE):
        files = images[start:start + BATCH_SIZE]
        batch = torch.stack([load_image(f, prep.img_size, prep.in_chans) for f in files])
        probs = torch.softmax(clf.logits(prep(batch)).float(), dim=1)
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        for f, vs, ixs in zip(files, values.tolist(), indices.tolist()):
            results.append({"image": str(f), "predictions": [
                {"class": clf.class_names[i], "index": i, "probability": v} for v, i in zip(vs, ixs)]})
    return results


# ---------------------------------------------------------------------- command line
def _run(args: argparse.Namespace) -> int:
    results = predict(args.model, args.images, topk=args.topk, precision=args.precision)
    if args.json:
        json.dump({"model": args.model, "results": results}, sys.stdout, indent=2)
        print()
        return 0
    for r in results:
        print(r["image"])
        for p in r["predictions"]:
            print(f"  {p['probability']:7.2%}  {p['class']}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify image files with a checkpoint or an exported .onnx model",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL", help="a checkpoint (.pt, .safetensors) or an ONNX file from `cct export`")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files of any size and mode")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5, at most all)")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="checkpoints only; default: the precision recorded by training, else fp32")
    p.set_defaults(func=_run)
