"""Deployable copies of a text checkpoint: ONNX and TorchScript graphs of `model(token_ids, mask)`.

The graph maps token ids (B, L) int64 and their mask (B, L) bool (True for real tokens) to the logits,
with both the batch axis and the length L dynamic (1 <= L <= the model's `seq_len`, as
`TextTokenizer.encode` produces them). Tokenizing stays outside the graph: the tokenizer's JSON
(`TextTokenizer.to_json()`; its "tokenizer" member is a plain Hugging Face `tokenizer.json`) travels
inside the file, in the ONNX metadata under `text_tokenizer` and in TorchScript's extra files as
`extra/text_tokenizer.json`, beside the class names, the config and the text record
(`preprocessing`: kind, seq_len, input names and dtypes). So one file classifies raw text:
`cct predict model.onnx --text "..."` needs onnxruntime and tokenizers, no PyTorch model.

Each export runs against PyTorch on texts of several lengths (padded and not) before it is written,
and is refused when the logits differ by more than `cct.export.TOLERANCE`.
"""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import __version__
from .checkpoint import atomic_write
from .errors import CCTError
from .kernels import use_kernels
from .onnxrt import check_opset, onnx_session, quiet_export, require_onnx, written_opset
from .text_model import TextCCT, TextConvTokenizer
from .text_predict import ONNX_TOKENIZER_KEY

INPUT_NAMES = ("token_ids", "mask")


def text_record(model: TextCCT, eval_record: dict | None = None) -> dict:
    """The text counterpart of an image model's preprocessing record, stored with an export."""
    record = {"kind": "text", "seq_len": model.cfg.seq_len, "precision": "fp32", "batch_size": 256}
    record.update({k: v for k, v in (eval_record or {}).items() if k in ("precision", "batch_size")})
    record.update(inputs={"token_ids": "int64 (batch, length)", "mask": "bool (batch, length), True for real tokens"},
                  length="1 to seq_len tokens, padded with [PAD] (id 1) to the longest text of the batch",
                  tokenizer=f"metadata {ONNX_TOKENIZER_KEY}: cct TextTokenizer JSON",
                  output="logits (no softmax)" if not model.cfg.aux_vote else
                  "log-probabilities of both heads' vote (softmax gives the probabilities)")
    return record


def _metadata(model: TextCCT, eval_record: dict | None) -> dict[str, str]:
    if getattr(model, "tokenizer", None) is None:
        raise CCTError("this text model has no tokenizer to export with it")
    return {"class_names": json.dumps(model.class_names), "preprocessing": json.dumps(text_record(model, eval_record)),
            "config": json.dumps(model.cfg.to_dict()), "model_name": getattr(model, "name", None) or "",
            "cct_version": __version__, ONNX_TOKENIZER_KEY: model.tokenizer.to_json()}


class _ExportableConvTokenizer(TextConvTokenizer):
    """`TextConvTokenizer` with the mask's max-pool as a 2-D pool over (tokens, 1): the same numbers, but
    `torch.export` (PyTorch 2.13) fixes the length of a padded `max_pool1d`'s input, and not of this one."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if self.tail:
            x = F.pad(x, (0, 0, 0, self.tail))
            mask = F.pad(mask, (0, self.tail), value=False)
        x = self.conv(x.unsqueeze(1))  # (B, dim, L', 1)
        windows = torch.ones(1, 1, cfg.kernel_size, 1, dtype=x.dtype, device=x.device)
        m = F.conv2d(mask[:, None, :, None].to(x.dtype), windows, stride=(cfg.stride, 1), padding=(cfg.padding, 0))
        if self.act_and_pool:
            pool = dict(kernel_size=(cfg.pool_kernel, 1), stride=(cfg.pool_stride, 1), padding=(cfg.pool_padding, 0))
            x = F.max_pool2d(F.relu(x), **pool)
            m = F.max_pool2d(m, **pool)
        return x.squeeze(-1).transpose(1, 2), m.squeeze(-1).squeeze(1) > 0  # (B, N, dim), (B, N)


def _prepare(model: TextCCT) -> TextCCT:
    """A float32 eval-mode copy computing with the reference layers, its conv tokenizer exportable with a
    dynamic length (the caller's model is unchanged)."""
    copied = use_kernels(copy.deepcopy(model).float().eval(), "reference")
    if type(copied.conv_tokenizer) is TextConvTokenizer:
        copied.conv_tokenizer.__class__ = _ExportableConvTokenizer
    copied.tokenizer = model.tokenizer
    return copied


def example_batch(model: TextCCT, batch: int, length: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (batch, length) and a mask whose rows hold 1 to `length` real tokens (row 0 all real)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.cfg.vocab_size, (batch, length), generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, model.cfg.padding_idx), mask


def check_parity(model: TextCCT, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], path: Path, fmt: str,
                 *, tolerance: float) -> tuple[float, tuple[tuple[int, int], ...]]:
    """Largest |run - model| of the logits over batches of several sizes and lengths; refuses above `tolerance`."""
    seq_len = model.cfg.seq_len
    shapes = ((1, seq_len), (3, max(1, seq_len // 2)), (2, 1))
    worst = 0.0
    for i, (batch, length) in enumerate(shapes):
        ids, mask = example_batch(model, batch, length, seed=i)
        with torch.inference_mode():
            expected = model(ids, mask)
        worst = max(worst, (run(ids, mask) - expected).abs().max().item())
    if not worst <= tolerance:  # also catches NaN
        raise CCTError(f"the {fmt} export differs from PyTorch by {worst:.3g} (> {tolerance:g}); {path} not written")
    return worst, shapes


def export_text_onnx(model: TextCCT, path: str | Path, *, opset: int, tolerance: float,
                     eval_record: dict | None = None) -> tuple[float, bytes, int]:
    """Write a text model as ONNX (dynamic batch and length) after checking it; returns (max |diff|, the
    serialised model, its opset)."""
    onnx = require_onnx()
    check_opset(opset)
    path = Path(path)
    model = _prepare(model)
    meta = _metadata(model, eval_record)
    ids, mask = example_batch(model, 2, model.cfg.seq_len)
    batch = torch.export.Dim("batch", min=1)
    axes = {0: batch}
    if model.cfg.seq_len > 1:  # a model of one token has no length to vary
        axes[1] = torch.export.Dim("length", min=1, max=model.cfg.seq_len)
    dynamic = {"token_ids": axes, "mask": axes}
    try:
        with quiet_export():
            program = torch.onnx.export(model, (ids, mask), dynamo=True, opset_version=opset,
                                        input_names=list(INPUT_NAMES), output_names=["logits"],
                                        dynamic_shapes=dynamic, verbose=False)
        proto = program.model_proto
    except Exception as e:
        raise CCTError(f"ONNX export failed: {str(e).strip().splitlines()[0]}") from e
    existing = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**existing, **meta})
    payload = proto.SerializeToString()
    session = onnx_session(payload)  # checked before anything is written

    def run(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"token_ids": t.numpy(), "mask": m.numpy()})[0])

    diff, _ = check_parity(model, run, path, "ONNX", tolerance=tolerance)
    opset = written_opset(proto, opset)
    atomic_write(path, lambda f: f.write(payload))
    return diff, payload, opset


def export_text_torchscript(model: TextCCT, path: str | Path, *, tolerance: float,
                            eval_record: dict | None = None) -> float:
    """Write a text model as a traced TorchScript archive (metadata in extra files) after checking it."""
    path = Path(path)
    model = _prepare(model)
    meta = _metadata(model, eval_record)
    extra = {f"{key}.json": value for key, value in meta.items()
             if key in ("class_names", "preprocessing", "config", ONNX_TOKENIZER_KEY)}
    with quiet_export(), torch.inference_mode():
        # traced at full length: shorter inputs take the same operations (the sine table is sliced)
        traced = torch.jit.trace(model, example_batch(model, 2, model.cfg.seq_len), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files=extra)
    with quiet_export():
        loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))

    def run(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded(t, m)

    diff, _ = check_parity(model, run, path, "TorchScript", tolerance=tolerance)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return diff
