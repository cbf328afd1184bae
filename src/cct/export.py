"""Deployable copies of a checkpoint: ONNX, TorchScript and safetensors — `cct export`.

Every exported graph maps a float32 image batch (N, C, H, W), already preprocessed, to the
logits `model(x)` — no softmax and no normalisation inside — so it computes exactly what the
checkpoint computes. What the graph leaves out travels with it: class names and the
preprocessing (see `cct.predict.Preprocessing`) go into the ONNX model's `metadata_props`
or the TorchScript archive's extra files (`extra/class_names.json`, `extra/preprocessing.json`,
`extra/config.json`). Each export is run against PyTorch on random input before it is written,
and refused when the largest absolute difference of the logits exceeds `TOLERANCE`.

ONNX goes through PyTorch's `torch.export`-based exporter (`torch.onnx.export(..., dynamo=True)`,
which needs onnxscript; the TorchScript-based one is deprecated since PyTorch 2.9), and is checked
with ONNX Runtime. `F.scaled_dot_product_attention` becomes MatMul/Softmax nodes. TorchScript
is a `torch.jit.trace` (deprecated by PyTorch in favour of `torch.export`, still loadable from C++).
The batch axis is dynamic unless a batch size is given; the spatial size is the checkpoint's
`img_size`, which a learnable positional embedding fixes anyway.

A text checkpoint exports through `cct.text_export`: inputs `token_ids` (int64) and `mask` (bool),
batch and length dynamic, the tokenizer's JSON in the file's metadata (ONNX `text_tokenizer`,
TorchScript `extra/text_tokenizer.json`, safetensors `tokenizer`).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .checkpoint import (SAFETENSORS_EXTRAS, atomic_write, check_output, load_checkpoint, read_checkpoint,
                         save_checkpoint)
from .errors import CCTError
from .kernels import use_kernels
from .model import CCT
from .onnxrt import (DEFAULT_OPSET, check_opset, onnx_session, quiet_export as _quiet,  # noqa: F401
                     require_onnx, written_opset)  # (require_onnx re-exported)
from .preprocess import Preprocessing
from .text_export import export_text_onnx, export_text_torchscript
from .text_predict import TOKENIZER_KEY, is_text_config, load_text_model

FORMATS = ("onnx", "torchscript", "safetensors")
TOLERANCE = 1e-4


@dataclass
class ExportReport:
    path: Path
    format: str
    max_abs_diff: float  # largest |exported - PyTorch| over the logits of the check
    checked_batch_sizes: tuple[int, ...]
    opset: int | None = None

    def __str__(self) -> str:
        opset = f", opset {self.opset}" if self.opset else ""
        sizes = ", ".join(map(str, self.checked_batch_sizes))
        return (f"wrote {self.path} ({self.format}{opset}); max |diff| against PyTorch = {self.max_abs_diff:.2e} "
                f"at batch size {sizes} (tolerance {TOLERANCE:g})")


def _prepare(model: CCT) -> CCT:
    """A float32 copy in eval mode with the reference layers: exports hold PyTorch's own operators, never
    the CPU kernels of `cct.kernels` (the caller's model keeps its mode, dtype and kernels)."""
    return use_kernels(copy.deepcopy(model).float().eval(), "reference")


def _example(model: CCT, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.cfg.in_chans, *model.cfg.img_size, generator=generator)


def _check_sizes(batch_size: int | None) -> tuple[int, ...]:
    return (batch_size,) if batch_size else (1, 3)


def _compare(model: CCT, run, sizes: tuple[int, ...], path: Path, fmt: str) -> float:
    worst = 0.0
    for i, n in enumerate(sizes):
        x = _example(model, n, seed=i)
        with torch.inference_mode():
            expected = model(x)
        worst = max(worst, (run(x) - expected).abs().max().item())
    if not worst <= TOLERANCE:  # also catches NaN
        raise CCTError(f"the {fmt} export differs from PyTorch by {worst:.3g} (> {TOLERANCE:g}); {path} not written")
    return worst


def _metadata(model: CCT, preprocessing: Preprocessing | None) -> dict[str, str]:
    preprocessing = preprocessing or Preprocessing(model.cfg.img_size, model.cfg.in_chans)
    return {"class_names": json.dumps(model.class_names), "preprocessing": json.dumps(preprocessing.to_dict()),
            "config": json.dumps(model.cfg.to_dict()), "model_name": getattr(model, "name", None) or "",
            "cct_version": __version__}


def export_onnx(model: CCT, path: str | Path, *, opset: int = DEFAULT_OPSET, batch_size: int | None = None,
                preprocessing: Preprocessing | None = None) -> ExportReport:
    """Write `model` as an ONNX graph and check it with ONNX Runtime.

    Args:
        model: a CCT; exported in eval mode and float32 at `model.cfg.img_size`.
        path: destination `.onnx` file.
        opset: ONNX operator set, 17 to the installed onnx's newest (17 is converted from 18).
        batch_size: a fixed batch size; None leaves the batch axis dynamic.
        preprocessing: stored in the metadata; default x / 255 at the model's size.
    """
    onnx = require_onnx()
    check_opset(opset)
    path = Path(path)
    model = _prepare(model)
    x = _example(model, batch_size or 2)
    dynamic = None if batch_size else {"x": {0: torch.export.Dim("batch", min=1)}}
    try:
        with _quiet():
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=dynamic, verbose=False)
        proto = program.model_proto
    except Exception as e:
        raise CCTError(f"ONNX export failed: {str(e).strip().splitlines()[0]}") from e
    existing = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**existing, **_metadata(model, preprocessing)})
    payload = proto.SerializeToString()
    session = onnx_session(payload)  # checked before anything is written

    def run(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": t.numpy()})[0])

    diff = _compare(model, run, _check_sizes(batch_size), path, "ONNX")
    written = written_opset(proto, opset)
    atomic_write(path, lambda f: f.write(payload))
    return ExportReport(path, "onnx", diff, _check_sizes(batch_size), written)


def export_torchscript(model: CCT, path: str | Path, *, batch_size: int | None = None,
                       preprocessing: Preprocessing | None = None) -> ExportReport:
    """Write `model` as a traced TorchScript archive, with the metadata as extra files, and check it.

    Args: as `export_onnx`. A trace is shape-generic in the batch, so `batch_size` only picks the
    example it is traced and checked with (and is recorded in `extra/preprocessing.json`).
    """
    path = Path(path)
    model = _prepare(model)
    meta = _metadata(model, preprocessing)
    if batch_size:
        meta["preprocessing"] = json.dumps({**json.loads(meta["preprocessing"]), "batch_size": batch_size})
    extra = {f"{key}.json": value for key, value in meta.items() if key in ("class_names", "preprocessing", "config")}
    with _quiet(), torch.inference_mode():
        traced = torch.jit.trace(model, _example(model, batch_size or 2), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files=extra)
    with _quiet():
        loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))  # checked before anything is written

    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded(t)

    diff = _compare(model, run, _check_sizes(batch_size), path, "TorchScript")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return ExportReport(path, "torchscript", diff, _check_sizes(batch_size))


def read_torchscript_metadata(path: str | Path) -> dict:
    """The class names, preprocessing and config stored in a TorchScript export (decoded JSON)."""
    extra = {"class_names.json": "", "preprocessing.json": "", "config.json": ""}
    with _quiet():
        torch.jit.load(str(path), _extra_files=extra)
    return {name.removesuffix(".json"): json.loads(value) if value else None for name, value in extra.items()}


def export_checkpoint(checkpoint: str | Path, output: str | Path, format: str, *, opset: int = DEFAULT_OPSET,
                      batch_size: int | None = None) -> ExportReport:
    """Export a cct checkpoint; its recorded preprocessing (see `cct.predict`) goes into the metadata.

    A text checkpoint goes through `cct.text_export` (its tokenizer travels in the file).
    """
    assert format in FORMATS, f"format must be one of {FORMATS}, got {format!r}"
    if batch_size is not None and batch_size < 1:
        raise CCTError(f"--batch-size must be at least 1 or 'dynamic', got {batch_size}")
    data = read_checkpoint(checkpoint)
    if is_text_config(data.get("config")):
        return _export_text(checkpoint, data, output, format, opset=opset, batch_size=batch_size)
    model = load_checkpoint(checkpoint)
    preprocessing = Preprocessing.from_checkpoint(data)
    if format == "onnx":
        return export_onnx(model, output, opset=opset, batch_size=batch_size, preprocessing=preprocessing)
    if format == "torchscript":
        return export_torchscript(model, output, batch_size=batch_size, preprocessing=preprocessing)
    path = save_checkpoint(model, output, format="safetensors", **({"eval": data["eval"]} if "eval" in data else {}))
    loaded = load_checkpoint(path)
    diff = _compare(model, lambda t: loaded(t), (2,), path, "safetensors")
    return ExportReport(path, "safetensors", diff, (2,))


def _export_text(checkpoint: str | Path, data: dict, output: str | Path, format: str, *, opset: int,
                 batch_size: int | None) -> ExportReport:
    """ONNX and TorchScript graphs of a text model, dynamic in batch and length; safetensors weights."""
    if batch_size is not None:
        raise CCTError("a text model's graph keeps batch and length dynamic: drop --batch-size")
    model = load_text_model(checkpoint)
    record = data.get("eval") or {}
    sizes = (1, 3, 2)  # the batches `cct.text_export.check_parity` runs
    if format == "onnx":
        diff, _, opset = export_text_onnx(model, output, opset=opset, tolerance=TOLERANCE, eval_record=record)
        return ExportReport(Path(output), "onnx", diff, sizes, opset)
    if format == "torchscript":
        diff = export_text_torchscript(model, output, tolerance=TOLERANCE, eval_record=record)
        return ExportReport(Path(output), "torchscript", diff, sizes)
    if TOKENIZER_KEY not in SAFETENSORS_EXTRAS:  # the file would classify nothing without its tokenizer
        raise CCTError("a safetensors copy of a text model cannot carry its tokenizer yet: export the .pt "
                       "checkpoint as it is, or use --format onnx or torchscript")
    extra = {"eval": record} if record else {}
    path = save_checkpoint(model, output, format="safetensors", **extra, **{TOKENIZER_KEY: model.tokenizer.to_json()})
    loaded = load_text_model(path)  # refuses a copy that lost its tokenizer
    ids, mask = model.tokenizer.encode(["a text to compare", "and another one"], seq_len=model.cfg.seq_len)
    with torch.inference_mode():
        diff = (loaded(ids, mask) - model(ids, mask)).abs().max().item()
    if not diff <= TOLERANCE:
        raise CCTError(f"the safetensors export differs from the checkpoint by {diff:.3g}")
    return ExportReport(path, "safetensors", diff, (2,))


# ---------------------------------------------------------------------- command line
def _batch_size(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'dynamic' or a positive integer, got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    if args.format == "safetensors" and args.batch_size:
        raise CCTError("--batch-size applies to graphs (onnx, torchscript), not to safetensors weights")
    if args.format != "onnx" and args.opset != DEFAULT_OPSET:
        raise CCTError(f"--opset applies to ONNX graphs, not to --format {args.format}")
    check_output(args.output, args.checkpoint)
    report = export_checkpoint(args.checkpoint, args.output, args.format, opset=args.opset, batch_size=args.batch_size)
    print(report)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint to ONNX, TorchScript or safetensors",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, metavar="FILE")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--batch-size", type=_batch_size, default=None, metavar="dynamic|N",
                   help="batch axis of the graph (default dynamic)")
    p.set_defaults(func=_run)
