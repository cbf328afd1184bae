"""Which words a text model reads: sequence-pooling weights spread back onto the words — `cct explain --text`.

A text CCT classifies the weighted mean of its final tokens, with the sequence-pooling weights
softmax(g(x_L)) over the real tokens (Hassani et al., 2021, section 3.2). After the conv tokenizer and
its max-pool a token no longer stands for one word: pooled token j is the max over `pool_kernel`
conv windows, each of `kernel_size` words. So each token's weight is spread over the words in its
receptive field, computed from the conv's kernel, stride and padding and the pool's kernel, stride
and padding (`receptive_fields`), in proportion to how many of its conv windows cover each word
(the max-pool may take any of them, channel by channel). Padding, the zero rows the model appends
and the pool's padding are no words and get nothing. Every real token covers at least one real word,
so the word weights of a text sum to 1, as the pooling weights do.

The words are the tokenizer's tokens (words and runs of punctuation for the default word-level
tokenizer), as the model saw them: lower-cased, and cut at `seq_len`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .errors import CCTError
from .plots import save_figure
from .text_model import TextCCT
from .text_predict import load_text_model

CELL_INCHES = (0.75, 0.45)  # one word's cell in the heat strip
MAX_COLUMNS = 16  # words per strip row before it wraps
DPI = 100


def receptive_fields(model: TextCCT, length: int) -> torch.Tensor:
    """Coverage (N, length): how many conv windows of each final token cover each of `length` word positions.

    Conv window t covers the words t·stride - padding ... + kernel_size - 1 of the input, which the model
    extends by `tail` zero rows at its end; pooled token j takes the conv windows j·pool_stride -
    pool_padding ... + pool_kernel - 1 (cct), or is conv window j itself (cvt); without a conv tokenizer
    (text_transformer) token j is word j. Positions outside the words count nothing.
    """
    tokenizer = model.conv_tokenizer
    if tokenizer is None:
        return torch.eye(length)
    cfg = tokenizer.cfg
    conv_out = (length + tokenizer.tail + 2 * cfg.padding - cfg.kernel_size) // cfg.stride + 1
    windows = torch.zeros(conv_out, length)
    for t in range(conv_out):
        first = t * cfg.stride - cfg.padding
        words = [w for w in range(first, first + cfg.kernel_size) if 0 <= w < length]
        windows[t, words] = 1.0
    if not tokenizer.act_and_pool:
        return windows
    pooled = tokenizer.num_tokens(length)
    cover = torch.zeros(pooled, length)
    for j in range(pooled):
        first = j * cfg.pool_stride - cfg.pool_padding
        for t in range(max(first, 0), min(first + cfg.pool_kernel, conv_out)):
            cover[j] += windows[t]
    return cover


@torch.no_grad()
def word_weights(model: TextCCT, texts: Sequence[str]) -> tuple[list[list[str]], list[torch.Tensor], torch.Tensor]:
    """Each text's tokens (cut at seq_len), their weights (each summing to 1), and the logits (B, classes).

    Args:
        model: a text model with sequence pooling (text_cct, text_cvt) and `model.tokenizer`, in eval mode.
        texts: raw strings.
    """
    if model.attention_pool is None:
        raise CCTError(f"{getattr(model, 'name', None) or 'this model'} has a class token, not sequence "
                       "pooling: word weights come from the pooling of text_cct and text_cvt models")
    if getattr(model, "tokenizer", None) is None:
        raise CCTError("this text model has no tokenizer")
    seq_len = model.cfg.seq_len
    ids, mask = model.tokenizer.encode(list(texts), seq_len=seq_len)
    features, token_mask = model.forward_features(ids, mask)
    pooled = model.pool_weights(features, token_mask).float()  # (B, N), 0 on padded tokens
    logits = model.forward_head(features, mask=token_mask).float()
    words, weights = [], []
    for row, text in enumerate(texts):
        tokens = model.tokenizer.tokens(text)[:seq_len]
        n = len(tokens)
        if n == 0:
            raise CCTError(f"text {row + 1} has no tokens to weigh: {text!r}")
        cover = receptive_fields(model, ids.shape[1])[:, :n]  # the real words only
        share = cover / cover.sum(1, keepdim=True).clamp_min(1e-12)  # each token's weight, split over its words
        weights.append(pooled[row, :cover.shape[0]] @ share)
        words.append(tokens)
    return words, weights, logits


def draw_strips(words: list[list[str]], weights: list[torch.Tensor], titles: list[str], output: str | Path) -> Path:
    """One heat strip per text (a cell per word, coloured by its weight, wrapped every `MAX_COLUMNS` words)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    rows = [max(1, -(-len(w) // MAX_COLUMNS)) for w in words]
    columns = min(MAX_COLUMNS, max(len(w) for w in words))
    fig = Figure(figsize=(CELL_INCHES[0] * columns + 0.5, sum(CELL_INCHES[1] * r + 0.45 for r in rows)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(words), 1, squeeze=False, height_ratios=rows)[:, 0]
    for ax, tokens, w, title, r in zip(axes, words, weights, titles, rows):
        grid = torch.full((r, columns), float("nan"))
        grid.view(-1)[:len(tokens)] = w
        top = max(float(w.max()), 1e-12)
        ax.imshow(grid.numpy(), cmap="Reds", vmin=0, vmax=top, aspect="auto")
        for i, token in enumerate(tokens):  # white on the dark cells
            ax.text(i % columns, i // columns, f"{token}\n{float(w[i]):.2f}", ha="center", va="center", fontsize=7,
                    color="white" if float(w[i]) > 0.6 * top else "black")
        ax.set_title(title, fontsize=8, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, output, dpi=DPI)


def explain_texts(checkpoint: str | Path | TextCCT, texts: Sequence[str], *, output: str | Path | None = None,
                  topk: int = 3) -> list[dict]:
    """Word weights and top classes of each text; with `output`, also a PNG of heat strips.

    Returns one dict per text: {"text", "truncated", "words": [{"word", "weight"}], "predictions": [{"class",
    "probability"}]}; a text longer than the model's `seq_len` tokens is weighed on its first `seq_len` words
    (`truncated` True).
    """
    texts = [str(t) for t in texts]
    if not texts:
        raise CCTError("no texts to explain")
    model = checkpoint if isinstance(checkpoint, TextCCT) else load_text_model(checkpoint)
    model.float().eval()
    words, weights, logits = word_weights(model, texts)
    probs = torch.softmax(logits, dim=1)
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    names = model.class_names or [str(i) for i in range(probs.shape[1])]
    results = []
    for i, text in enumerate(texts):
        truncated = len(model.tokenizer.tokens(text)) > model.cfg.seq_len
        results.append({"text": text, "truncated": truncated, "words": [{"word": t, "weight": float(w)} for t, w in zip(words[i], weights[i])],
                        "predictions": [{"class": names[j], "probability": v}
                                        for v, j in zip(values[i].tolist(), indices[i].tolist())]})
    if output is not None:
        titles = [f"{text[:80]}  →  " + ", ".join(f"{p['class']} {p['probability']:.0%}" for p in r["predictions"])
                  for text, r in zip(texts, results)]
        draw_strips(words, weights, titles, output)
    return results
