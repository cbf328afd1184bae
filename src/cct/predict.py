"""Classify image files, or texts, with a checkpoint or an exported ONNX model — `cct predict`.

Texts (`--text`, `--text-file`) go to a text model through `cct.text_predict`, which tokenizes them
with the tokenizer the model carries; an image model given texts, or a text model given image files,
is a one-line error. The rest of this module is about images.

Files and folders (searched recursively for images, by extension) are decoded and classified in
batches; `--output preds.csv` writes one row per file, with the top-k classes and probabilities,
and an `error` column for a file that could not be read (the others are still classified). Each
failed file is one line on stderr and the command then exits 2.

An image of any size and Pillow mode is decoded as a dataset's images are (`cct.decode`), so a
prediction sees what training and `cct eval` saw: palette images go through RGBA, the image is
converted to the model's channels (RGB, or ITU-R 601-2 luma for one channel; alpha is dropped)
and resized to the model's input size with Pillow's bicubic filter, plainly or keeping the aspect
ratio and cropping the centre, as training did (JPEGs first shrink while decoding through
libjpeg's draft mode; the EXIF orientation is applied). Pixels then become floats as in training: x / 255, then
(x - mean) / std per channel when the checkpoint records a normalisation.

That normalisation comes from the checkpoint's "eval" entry, written by `cct train`. Checkpoints
without one get the recipe's usual input: x / 255 for the Keras example's model (its
`Rescaling(1 / 255)`), the CIFAR-10 mean and std of the official SHI-Labs recipe for the others.
An ONNX file exported by `cct export` carries the same description in its metadata.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoint import atomic_write, check_output, model_from_checkpoint, read_checkpoint, require_classifier
from .decode import UnreadableImageError, decode_image
from .errors import CCTError
from .evaluate import tta_logits
from .kernels import fuse, use_kernels
from .onnxrt import onnx_session, require_onnxruntime  # noqa: F401  (re-exported: callers import them from here)
from .preprocess import Preprocessing
from .runtime import autocast, recorded_precision, resolve_precision
from .sources import IMAGE_EXTENSIONS, folder_files, is_image_name
from .text_predict import is_text_checkpoint, onnx_is_text, open_text_classifier, predict_texts, read_text_file

BATCH_SIZE = 256


def load_image(path: str | Path, img_size: tuple[int, int], in_chans: int, *,
               resize_mode: str = "resize") -> torch.Tensor:
    """One image file as a uint8 (C, H, W) tensor of the model's size and channels, decoded by
    `cct.decode.decode_image` as datasets are.

    Raises `cct.data.DataError` (a `CCTError`) naming the file when it cannot be read.
    """
    if in_chans not in (1, 3):
        raise CCTError(f"cannot feed image files to a model of {in_chans} input channels (only 1 or 3)")
    return torch.from_numpy(decode_image(path, size=tuple(img_size), channels=in_chans, resize_mode=resize_mode))


def image_files(paths: Sequence[str | Path]) -> list[str]:
    """The files given, in order, with each folder replaced by the image files under it (recursively,
    by extension, hidden ones left out, sorted). A folder without images is a `CCTError`."""
    found = []
    for p in paths:
        folder = Path(p)
        if not str(p) or not folder.is_dir():
            found.append(str(p))  # a file, or a path that does not exist: its row reports why
            continue
        inside = sorted(str(f) for f in folder_files(folder) if is_image_name(f.name)
                        and not any(part.startswith(".") for part in f.relative_to(folder).parts))
        if not inside:
            raise CCTError(f"no image files in {p} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        found.extend(inside)
    return found


@dataclass
class Classifier:
    """A model ready to classify: float batches → logits, with its class names and preprocessing."""
    logits: Callable[[torch.Tensor], torch.Tensor]
    class_names: list[str]
    preprocessing: Preprocessing
    source: str


def _with_tta(logits: Callable[[torch.Tensor], torch.Tensor], prep: Preprocessing,
              tta: bool | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The recorded test-time views (`cct.evaluate.tta_logits`), as `cct eval` and the run's test scored them;
    `tta` False: the plain logits."""
    if not (prep.tta if tta is None else tta):
        return logits
    return lambda x: tta_logits(logits, x, logits(x), prep.tta_translate if prep.tta else 0)


def open_classifier(path: str | Path, precision: str | None = None, *, kernels: str = "fast",
                    tta: bool | None = None) -> Classifier:
    """A checkpoint (`.pt`, `.safetensors`) or an ONNX file exported by `cct export`, ready to classify.

    Args:
        path: the model file.
        precision: for checkpoints, "fp32", "bf16" or "auto"; default: the one recorded by training (fp16, a
            CUDA precision, runs as fp32 here), else fp32.
            An ONNX model always computes in float32.
        kernels: for checkpoints, "fast" (`cct.kernels`, fused for inference) or "reference".
        tta: average the test-time views training recorded (the mirror, and shifts of `tta_translate` pixels),
            as `cct eval` does; default: the record's; False: the plain image only.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if precision not in (None, "fp32"):
            raise CCTError(f"--precision {precision} is for checkpoints: an ONNX model computes in float32")
        clf = _open_onnx(path)
        return replace(clf, logits=_with_tta(clf.logits, clf.preprocessing, tta))
    if is_text_checkpoint(path):
        raise CCTError(f"{path} is a text model: classify texts with --text or --text-file, not image files")
    data = read_checkpoint(path)
    model = fuse(use_kernels(model_from_checkpoint(data, path).float().eval(), kernels))
    require_classifier(model.cfg.num_classes, path)
    prep = Preprocessing.from_checkpoint(data)
    precision = resolve_precision(precision or recorded_precision(prep.precision, "cpu"), "cpu")

    @torch.inference_mode()
    def logits(x: torch.Tensor) -> torch.Tensor:
        with autocast(precision, "cpu"):
            return model(x).float()

    names = _class_names(model.class_names, model.cfg.num_classes)
    return Classifier(_with_tta(logits, prep, tta), names, prep, str(path))


def _class_names(names: list[str] | None, num_classes: int) -> list[str]:
    return list(names) if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def _open_onnx(path: Path) -> Classifier:
    session = onnx_session(path)
    meta = session.get_modelmeta().custom_metadata_map
    if onnx_is_text(session):
        raise CCTError(f"{path} is a text model: classify texts with --text or --text-file, not image files")
    if "preprocessing" not in meta:
        raise CCTError(f"{path} has no 'preprocessing' metadata: export it with `cct export`")
    preprocessing = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
    require_classifier(json.loads(meta.get("config") or "{}").get("num_classes", -1), path)
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
            precision: str | None = None, bad_images: str = "raise", progress: bool = False,
            batch_size: int = BATCH_SIZE) -> list[dict]:
    """The `topk` most probable classes of each image file.

    Args:
        model: a checkpoint or `.onnx` path, or a `Classifier` from `open_classifier`.
        images: image files, any size and Pillow mode (`image_files` expands folders).
        topk: classes per image (at most the number of classes).
        precision: see `open_classifier`.
        bad_images: "raise" a `DataError` naming the first unreadable file, or "report" it in its
            result ({"image", "error", "predictions": []}) and classify the others.
        progress: a progress bar on stderr (shown when stderr is a terminal).
        batch_size: images decoded and classified at once.

    Returns:
        One dict per image, in order: {"image": path, "predictions": [{"class", "index", "probability"}, ...]}.
    """
    if topk < 1:
        raise CCTError(f"--topk must be at least 1, got {topk}")
    assert bad_images in ("raise", "report"), f"bad_images must be 'raise' or 'report', got {bad_images!r}"
    from tqdm import tqdm
    clf = model if isinstance(model, Classifier) else open_classifier(model, precision)
    prep = clf.preprocessing
    results = []
    with tqdm(total=len(images), desc="classifying", unit="img", file=sys.stderr, leave=False,
              disable=None if progress else True) as bar:
        for start in range(0, len(images), batch_size):
            files = [str(f) for f in images[start:start + batch_size]]
            decoded: dict[int, torch.Tensor | str] = {}
            for i, f in enumerate(files):
                try:
                    decoded[i] = load_image(f, prep.img_size, prep.in_chans, resize_mode=prep.resize_mode)
                except UnreadableImageError as e:
                    if bad_images == "raise":
                        raise
                    decoded[i] = str(e)
            good = [i for i, x in decoded.items() if not isinstance(x, str)]
            top: dict[int, list[dict]] = {}
            if good:
                probs = torch.softmax(clf.logits(prep(torch.stack([decoded[i] for i in good]))).float(), dim=1)
                values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
                for i, vs, ixs in zip(good, values.tolist(), indices.tolist()):
                    top[i] = [{"class": clf.class_names[j], "index": j, "probability": v} for v, j in zip(vs, ixs)]
            for i, f in enumerate(files):
                results.append({"image": f, "predictions": top[i]} if i in top
                               else {"image": f, "error": decoded[i], "predictions": []})
            bar.update(len(files))
    return results


def write_csv(path: str | Path, results: list[dict], *, topk: int) -> None:
    """`predict`'s results as a CSV, written atomically: path,label,probability, then top2_label,
    top2_probability, ... up to `topk`, then error (empty for classified files)."""
    header = ["path", "label", "probability"]
    for k in range(2, topk + 1):
        header += [f"top{k}_label", f"top{k}_probability"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header + ["error"])
    for r in results:
        cells = [r["image"]]
        for p in r["predictions"][:topk]:
            cells += [p["class"], f"{p['probability']:.6f}"]
        cells += [""] * (len(header) - len(cells))
        writer.writerow(cells + [r.get("error", "")])
    # a name that is not UTF-8 (`surrogateescape`d by Python) is written back as its own bytes
    data = text.getvalue().encode("utf-8", "surrogateescape")
    if str(path) == "-":  # standard output, as Unix tools read "-"
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    atomic_write(path, lambda f: f.write(data))


# ---------------------------------------------------------------------- command line
def _model_is_text(path: str) -> bool:
    if Path(path).suffix.lower() == ".onnx":
        return onnx_is_text(onnx_session(path))
    return is_text_checkpoint(path)


def _run_texts(args: argparse.Namespace) -> int:
    if args.images:
        raise CCTError("give image files or --text/--text-file, not both")
    if args.output:
        raise CCTError("--output writes image predictions; for texts use --json")
    texts = list(args.text or [])
    for path in args.text_file or []:
        texts += read_text_file(path)
    if not _model_is_text(args.model):
        raise CCTError(f"{args.model} is an image model: give it image files, not --text or --text-file")
    clf = open_text_classifier(args.model, args.precision)
    results = predict_texts(clf, texts, topk=args.topk)
    truncated = sum(r["truncated"] for r in results)
    if truncated:
        print(f"cct predict: {truncated} of {len(results)} text(s) longer than {clf.seq_len} tokens were truncated",
              file=sys.stderr)
    if args.json:
        json.dump({"model": args.model, "seq_len": clf.seq_len, "truncated": truncated, "results": results},
                  sys.stdout, indent=2)
        print()
    else:
        for r in results:
            print(r["text"] + ("  [truncated]" if r["truncated"] else ""))
            for p in r["predictions"]:
                print(f"  {p['probability']:7.2%}  {p['class']}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.text is not None or args.text_file is not None:
        if args.tta is not None:
            raise CCTError("--tta (test-time views of an image) is for image models")
        return _run_texts(args)
    if not args.images:
        raise CCTError("nothing to classify: give image files or folders, --text or --text-file")
    files = image_files(args.images)  # a text model is refused by open_classifier
    if args.output == "-" and args.json:
        raise CCTError("--output - and --json both write to standard output: choose one")
    if args.output and args.output != "-":
        check_output(args.output, args.model, *files)
    clf = open_classifier(args.model, args.precision, tta=args.tta)
    results = predict(clf, files, topk=args.topk, bad_images="report", progress=True)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"cct predict: error: {r['error']}", file=sys.stderr)
    if args.output:
        write_csv(args.output, results, topk=min(args.topk, len(clf.class_names)))
        where = "standard output" if args.output == "-" else args.output
        print(f"wrote {where}: {len(results)} file(s), {len(failed)} unreadable", file=sys.stderr)
    if args.json:
        json.dump({"model": args.model, "results": results}, sys.stdout, indent=2)
        print()
    elif not args.output:
        for r in results:
            if "error" not in r:
                print(r["image"])
                for p in r["predictions"]:
                    print(f"  {p['probability']:7.2%}  {p['class']}")
    return 2 if failed else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify image files and folders, or texts, with a checkpoint or "
                                              "an .onnx model", description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL", help="a checkpoint (.pt, .safetensors) or an ONNX file from `cct export`")
    p.add_argument("images", metavar="PATH", nargs="*",
                   help="image files of any size and mode, or folders (searched recursively for images)")
    p.add_argument("--text", action="append", metavar="TEXT",
                   help="a text for a text model (repeat for several); longer than its seq_len tokens: truncated, "
                        "and the count reported on stderr")
    p.add_argument("--text-file", action="append", metavar="FILE",
                   help="texts for a text model, one a line (UTF-8; blank lines skipped)")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image or text (default 5, at most all)")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.add_argument("--output", metavar="CSV", default=None,
                   help="write path,label,probability, top-k columns and error per file to this CSV "
                        "(-: standard output)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="checkpoints only; default: the precision recorded by training, else fp32")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="images: average the test-time views training recorded (mirror, shifts), as cct eval does "
                        "(default: the record's)")
    p.set_defaults(func=_run)
