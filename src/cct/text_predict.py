"""Classify raw texts with a text checkpoint or its ONNX export — `cct predict --text`.

A text checkpoint carries its tokenizer (`cct.tokenizer.TextTokenizer`, trained on the training
texts), so it classifies raw strings by itself: each text is tokenized as in training, cut to the
model's `seq_len` tokens (the number of texts cut is reported), padded with [PAD] to the longest
text of its batch and masked, so padding never changes an answer. From Python:

    model = cct.load_checkpoint("runs/trec/best.pt")
    ids, mask = model.tokenizer.encode(["What is the capital of Peru ?"])  # cut to the model's seq_len
    print(model.class_names[model(ids, mask).argmax(-1).item()])

or `predict_texts("runs/trec/best.pt", ["What is the capital of Peru ?"])` for the top-k classes with
their probabilities. An ONNX file from `cct export` needs no PyTorch model: onnxruntime runs the
graph, and the tokenizer comes from the file's metadata (`text_tokenizer`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint, read_checkpoint
from .errors import CCTError, CheckpointError
from .kernels import fuse, use_kernels
from .onnxrt import onnx_session
from .runtime import autocast, recorded_precision, resolve_precision
from .tables import lines_of
from .text_model import TextCCT, TextConfig
from .tokenizer import TextTokenizer

BATCH_SIZE = 256
TOKENIZER_KEY = "tokenizer"  # the checkpoint entry holding `TextTokenizer.to_json()`
ONNX_TOKENIZER_KEY = "text_tokenizer"  # the ONNX metadata entry holding the same JSON


def is_text_config(config: object) -> bool:
    """Whether a checkpoint's "config" entry describes a text model (`TextConfig`) rather than a `CCTConfig`."""
    return isinstance(config, dict) and "word_embedding_dim" in config


def is_text_checkpoint(path: str | Path) -> bool:
    return is_text_config(read_checkpoint(path).get("config"))


def load_text_model(path: str | Path) -> TextCCT:
    """A text checkpoint's model in eval mode, with `model.tokenizer` and `model.class_names`.

    `cct.load_checkpoint` rebuilds text models once the checkpoint code knows them; until then this
    rebuilds one from the same entries (config, state_dict, class_names, "tokenizer").
    """
    data = read_checkpoint(path)
    if not is_text_config(data.get("config")):
        raise CCTError(f"{path} is an image model: classify image files with it, not --text")
    try:
        model = load_checkpoint(path)
    except CheckpointError:  # a checkpoint module that does not know text models yet
        model = _rebuild_text_model(data, path)
    if getattr(model, "tokenizer", None) is None:
        raise CheckpointError(f"{path} has no text tokenizer: it cannot classify raw text")
    return model.eval()


def _rebuild_text_model(data: dict, path: str | Path) -> TextCCT:
    try:
        model = TextCCT(TextConfig.from_dict(dict(data["config"])))
        model.load_state_dict(data["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, AssertionError, RuntimeError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a valid text checkpoint: {detail[:300]}") from None
    model.name = data.get("model_name")
    model.class_names = list(data["class_names"]) if data.get("class_names") else None
    if isinstance(data.get(TOKENIZER_KEY), str):
        model.tokenizer = TextTokenizer.from_json(data[TOKENIZER_KEY])
    return model


def _class_names(names: list[str] | None, num_classes: int) -> list[str]:
    return list(names) if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


@dataclass
class TextClassifier:
    """A text model ready to classify: (token ids, mask) batches → logits, with its tokenizer and classes."""
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, L) int64, (B, L) bool → (B, classes)
    class_names: list[str]
    tokenizer: TextTokenizer
    seq_len: int
    batch_size: int
    source: str


def text_classifier(model: TextCCT, *, precision: str = "fp32", kernels: str = "fast",
                    batch_size: int = BATCH_SIZE, source: str = "model") -> TextClassifier:
    """Wrap a text model (with `model.tokenizer`) for `predict_texts`; `precision` as resolved for the CPU."""
    if getattr(model, "tokenizer", None) is None:
        raise CCTError("this text model has no tokenizer (set model.tokenizer to a cct.tokenizer.TextTokenizer)")
    model = fuse(use_kernels(model.float().eval(), kernels))
    precision = resolve_precision(precision, "cpu")

    @torch.inference_mode()
    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with autocast(precision, "cpu"):
            return model(ids, mask).float()

    return TextClassifier(logits, _class_names(model.class_names, model.cfg.num_classes), model.tokenizer,
                          model.cfg.seq_len, batch_size, source)


def open_text_classifier(path: str | Path, precision: str | None = None, *, kernels: str = "fast") -> TextClassifier:
    """A text checkpoint (`.pt`, `.safetensors`) or its ONNX export, ready to classify raw texts.

    Args:
        path: the model file.
        precision: for checkpoints, "fp32", "bf16" or "auto"; default: the one its training recorded
            (the "eval" entry), else fp32. An ONNX model computes in float32.
        kernels: for checkpoints, "fast" (`cct.kernels`) or "reference".
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if precision not in (None, "fp32"):
            raise CCTError(f"--precision {precision} is for checkpoints: an ONNX model computes in float32")
        return text_onnx_classifier(onnx_session(path), path)
    model = load_text_model(path)
    record = read_checkpoint(path).get("eval") or {}
    precision = precision or recorded_precision(record.get("precision", "fp32"), "cpu")
    return text_classifier(model, precision=precision, kernels=kernels,
                           batch_size=int(record.get("batch_size") or BATCH_SIZE), source=str(path))


def onnx_is_text(session) -> bool:
    return ONNX_TOKENIZER_KEY in session.get_modelmeta().custom_metadata_map


def text_onnx_classifier(session, path: str | Path) -> TextClassifier:
    """A `TextClassifier` on an onnxruntime session of a text graph from `cct export` (no PyTorch model)."""
    meta = session.get_modelmeta().custom_metadata_map
    if ONNX_TOKENIZER_KEY not in meta:
        raise CCTError(f"{path} is an image model: classify image files with it, not --text")
    tokenizer = TextTokenizer.from_json(meta[ONNX_TOKENIZER_KEY])
    record = json.loads(meta.get("preprocessing", "{}"))
    num_classes = int(session.get_outputs()[0].shape[1])

    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {"token_ids": ids.numpy().astype(np.int64), "mask": mask.numpy().astype(bool)})
        return torch.from_numpy(out[0])

    names = json.loads(meta.get("class_names", "null"))
    return TextClassifier(logits, _class_names(names, num_classes), tokenizer, int(record["seq_len"]),
                          int(record.get("batch_size") or BATCH_SIZE), str(path))


def read_text_file(path: str | Path) -> list[str]:
    """One text a line (UTF-8; blank lines skipped); an unreadable or empty file is a one-line `CCTError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CCTError(f"cannot read --text-file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise CCTError(f"{path}:{line}: not UTF-8 text") from None
    texts = [line.strip() for line in lines_of(text) if line.strip()]
    if not texts:
        raise CCTError(f"--text-file {path} holds no text (one text a line)")
    return texts


def predict_texts(model_or_path: str | Path | TextCCT | TextClassifier, texts: Sequence[str], *, topk: int = 5,
                  precision: str | None = None, batch_size: int | None = None) -> list[dict]:
    """The `topk` most probable classes of each text.

    Args:
        model_or_path: a text checkpoint or `.onnx` path, a `TextCCT` carrying `model.tokenizer`, or a
            `TextClassifier` from `open_text_classifier`.
        texts: raw strings; each is tokenized by the model's tokenizer and cut to its `seq_len` tokens.
        topk: classes per text (at most the number of classes).
        precision: see `open_text_classifier`.
        batch_size: texts classified at once (default: the one training recorded, else 256).

    Returns:
        One dict per text, in order: {"text", "truncated": bool (cut to seq_len tokens),
        "predictions": [{"class", "index", "probability"}, ...]}.
    """
    if topk < 1:
        raise CCTError(f"--topk must be at least 1, got {topk}")
    if isinstance(model_or_path, TextClassifier):
        clf = model_or_path
    elif isinstance(model_or_path, TextCCT):
        clf = text_classifier(model_or_path, precision=precision or "fp32")
    else:
        clf = open_text_classifier(model_or_path, precision)
    texts = [str(t) for t in texts]
    if not texts:
        raise CCTError("no texts to classify")
    empty = next((i for i, t in enumerate(texts) if not t.strip()), None)
    if empty is not None:  # training refuses empty texts too: a model has never seen one
        raise CCTError(f"text {empty + 1} of {len(texts)} is empty: nothing to classify")
    size = batch_size or clf.batch_size
    results = []
    for start in range(0, len(texts), size):
        chunk = texts[start:start + size]
        ids, mask = clf.tokenizer.encode(chunk, seq_len=clf.seq_len)
        cut = [len(clf.tokenizer.tokens(t)) > clf.seq_len for t in chunk]
        probs = torch.softmax(clf.logits(ids, mask).float(), dim=1)
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        for text, truncated, vs, ixs in zip(chunk, cut, values.tolist(), indices.tolist()):
            results.append({"text": text, "truncated": truncated,
                            "predictions": [{"class": clf.class_names[j], "index": j, "probability": v}
                                            for v, j in zip(vs, ixs)]})
    return results
