"""Where a model looks: token-relevance heat maps drawn over the input — `cct explain`.

Two maps of the token grid, each upsampled (bilinear) onto the model's input image:

* "pool": the sequence-pooling weights of CCT and CVT (Hassani et al., 2021, section 3.2),
  softmax(g(x_L)) over the final tokens — the exact share of each token in the pooled vector
  the classifier reads.
* "rollout": attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers",
  2020, section 3): per layer, the head-averaged attention A plus the identity for the residual
  connection, 0.5 A + 0.5 I, multiplied through the layers. The row read off is the class
  token's for ViT-Lite; for sequence pooling the pooling weights act as one last attention row.

The blocks compute attention with `F.scaled_dot_product_attention`, which never returns the
probabilities, so a forward pre-hook on each block's attention takes its input and the
probabilities are recomputed here from the block's own qkv weights: softmax(q kᵀ / √d).

A text model (`--text`) is explained by `cct.text_explain`: its sequence-pooling weights spread
over the words in each token's receptive field.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, read_checkpoint, require_classifier
from .errors import CCTError
from .model import CCT
from .plots import save_figure
from .predict import image_files, load_image
from .preprocess import Preprocessing
from .text_explain import explain_texts
from .text_predict import is_text_checkpoint

METHODS = ("auto", "pool", "rollout")
PANEL_INCHES = 3.0
DPI = 100


def attention_probabilities(model: CCT, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each block's attention probabilities (B, heads, N, N) and the final token features (B, N, D)."""
    captured: list[torch.Tensor] = []

    def hook(attn, args):
        tokens = args[0]
        B, N, _ = tokens.shape
        qkv = attn.qkv(tokens).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]  # (B, heads, N, head_dim)
        captured.append(torch.softmax(q @ k.transpose(-2, -1) * attn.head_dim ** -0.5, dim=-1))  # (B, heads, N, N)

    handles = [blk.attn.register_forward_pre_hook(hook) for blk in model.blocks]
    try:
        with torch.no_grad():
            features = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return captured, features


def attention_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's rollout (B, N, N): row i says how much each input token flows into output token i."""
    rollout = None
    for probs in attentions:
        a = probs.mean(1)  # (B, N, N), heads averaged
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def relevance_map(model: CCT, x: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """Token relevance on the grid (B, gh, gw), the logits (B, classes), and the method used.

    Args:
        model: a CCT in eval mode.
        x: a preprocessed float batch at the model's input size.
        method: "pool" (sequence-pooling weights), "rollout", or "auto" (pool when the model has
            sequence pooling, else rollout from the class token).
    """
    assert method in METHODS, f"method must be one of {METHODS}, got {method!r}"
    seq_pool = model.attention_pool is not None
    if method == "auto":
        method = "pool" if seq_pool else "rollout"
    if method == "pool" and not seq_pool:
        raise CCTError("this model has a class token, not sequence pooling (ViT-Lite): use --method rollout")
    attentions, features = attention_probabilities(model, x)
    with torch.no_grad():
        logits = model.forward_head(features)
        if method == "pool":
            relevance = model.pool_weights(features)  # (B, N)
        elif seq_pool:
            relevance = (model.pool_weights(features).unsqueeze(1) @ attention_rollout(attentions)).squeeze(1)
        else:
            relevance = attention_rollout(attentions)[:, 0]  # the class token's row
    relevance = relevance[:, model.num_prefix_tokens:]  # the grid tokens only
    return relevance.reshape(-1, *model.grid), logits, method


def _heat(relevance: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) → (B, H, W) in [0, 1], bilinear onto the image."""
    heat = F.interpolate(relevance[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    low = heat.amin((1, 2), keepdim=True)
    high = heat.amax((1, 2), keepdim=True)
    return (heat - low) / (high - low).clamp_min(1e-12)


def explain(checkpoint: str | Path, images: Sequence[str | Path], output: str | Path, *, method: str = "auto",
            topk: int = 3) -> Path:
    """Draw each image beside its relevance heat map and top classes; one row per image.

    Args:
        checkpoint: a cct checkpoint (`.pt` or `.safetensors`).
        images: image files of any size and mode (see `cct.predict.load_image`).
        output: the figure file (PNG; other matplotlib formats by suffix), 600 × 300 pixels per image.
        method: see `relevance_map`.
        topk: classes listed under each map.
    """
    if not images:
        raise CCTError("no images to explain")
    model = load_checkpoint(checkpoint).float().eval()
    require_classifier(model.cfg.num_classes, checkpoint)
    prep = Preprocessing.from_checkpoint(read_checkpoint(checkpoint))
    pixels = torch.stack([load_image(f, prep.img_size, prep.in_chans) for f in images])  # (B, C, H, W) uint8
    relevance, logits, method = relevance_map(model, prep(pixels), method)
    heat = _heat(relevance, prep.img_size)
    probs = torch.softmax(logits.float(), dim=1)
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    names = model.class_names or [str(i) for i in range(probs.shape[1])]

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(2 * PANEL_INCHES, PANEL_INCHES * len(images)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(images), 2, squeeze=False)
    title = {"pool": "sequence-pooling weights", "rollout": "attention rollout"}[method]
    for row, (file, image) in enumerate(zip(images, pixels)):
        shown = image.permute(1, 2, 0).numpy()
        gray = shown.shape[-1] == 1
        shown = shown[..., 0] if gray else shown
        left, right = axes[row]
        left.imshow(shown, cmap="gray" if gray else None, vmin=0, vmax=255)
        left.set_title(Path(file).name, fontsize=9)
        right.imshow(shown, cmap="gray" if gray else None, vmin=0, vmax=255)
        right.imshow(heat[row].numpy(), cmap="inferno", alpha=0.55, vmin=0, vmax=1, interpolation="nearest")
        right.set_title(title, fontsize=9)
        right.set_xlabel("\n".join(f"{names[i]}  {v:.1%}" for v, i in zip(values[row].tolist(),
                                                                          indices[row].tolist())), fontsize=8)
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
    return save_figure(fig, output, dpi=DPI)


# ---------------------------------------------------------------------- command line
def _run_texts(args: argparse.Namespace) -> int:
    if args.images:
        raise CCTError("give image files or --text, not both")
    if args.method != "auto":
        raise CCTError("--method is for images: a text model's word weights are its sequence-pooling weights")
    if not is_text_checkpoint(args.checkpoint):
        raise CCTError(f"{args.checkpoint} is an image model: give it image files, not --text")
    results = explain_texts(args.checkpoint, args.text, output=args.output)
    truncated = sum(r["truncated"] for r in results)
    if truncated:
        print(f"cct explain: {truncated} of {len(results)} text(s) longer than the model's seq_len tokens were "
              "truncated: only their first words are weighed", file=sys.stderr)
    if args.json:
        json.dump({"model": args.checkpoint, "results": results}, sys.stdout, indent=2)
        print()
    else:
        for r in results:
            print(r["text"] + ("  [truncated]" if r["truncated"] else "") + "  →  " + ", ".join(f"{p['class']} {p['probability']:.1%}" for p in r["predictions"]))
            for w in r["words"]:
                print(f"  {w['weight']:6.3f}  {w['word']}")
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.text is not None:
        return _run_texts(args)
    if not args.images:
        raise CCTError("nothing to explain: give image files or --text")
    if not args.output:
        raise CCTError("--output FILE.png is needed to explain images")
    if args.json:
        raise CCTError("--json prints a text model's word weights; an image's explanation is the --output figure")
    if Path(args.checkpoint).suffix.lower() == ".onnx":
        raise CCTError(f"{args.checkpoint}: explain reads a checkpoint (.pt, .safetensors), whose attention and "
                       "pooling an ONNX graph does not expose")
    if is_text_checkpoint(args.checkpoint):
        raise CCTError(f"{args.checkpoint} is a text model: give it --text, not image files")
    path = explain(args.checkpoint, image_files(args.images), args.output, method=args.method)
    print(f"wrote {path}", file=sys.stderr)
    return 0


TEXT_HELP = ("a text for a text model (repeat for several): prints each word with its weight, the model's "
             "sequence-pooling weight of each final token spread over the words in that token's receptive field "
             "(from the conv's kernel, stride and padding and the max-pool's), in proportion to how many of its "
             "conv windows cover each word; a text's weights sum to 1")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="draw where a model looks: pooling weights or attention rollout "
                                              "(images), word weights (texts)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("images", metavar="IMAGE", nargs="*")
    p.add_argument("--text", action="append", metavar="TEXT", help=TEXT_HELP)
    p.add_argument("--output", metavar="FILE.png",
                   help="the figure: required for images; for texts, a heat strip of the word weights")
    p.add_argument("--json", action="store_true", help="texts: print the word weights as JSON")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="pool: sequence-pooling weights (CCT, CVT); rollout: attention rollout (Abnar & Zuidema "
                        "2020); auto (default): pool, or rollout for ViT-Lite")
    p.set_defaults(func=_run)
