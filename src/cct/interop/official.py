"""Weights of the official SHI-Labs/Compact-Transformers code (`.pth` state dicts) under cct's names.

One key-mapping filter, as timm's `checkpoint_filter_fn`: `cct.checkpoint.load_pretrained` uses it for
`create_model(name, pretrained="....pth")`, then fits the result to the model (positional-embedding
resize, a fresh head for another class count).
"""
from __future__ import annotations

import torch


def official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a SHI-Labs/Compact-Transformers state dict (`src/cct.py`, `cvt.py`, `vit.py`) onto cct's names.

    The official modules: `tokenizer.conv_layers.{i}.0` (conv), `classifier.positional_emb`,
    `classifier.class_emb`, `classifier.attention_pool`, `classifier.blocks.{i}.{pre_norm, self_attn.qkv,
    self_attn.proj, linear1, norm1, linear2}`, `classifier.norm`, `classifier.fc`. Keys only: what a
    model without a learnable embedding does with `positional_emb` is `cct.checkpoint.load_pretrained`'s.
    """
    renames = [("module.", ""), ("tokenizer.conv_layers.", "tokenizer.convs."), ("classifier.positional_emb", "pos_embed"),
               ("classifier.class_emb", "cls_token"), ("classifier.fc.", "head."), ("classifier.", ""),
               (".self_attn.", ".attn."), (".linear1.", ".fc1."), (".linear2.", ".fc2.")]
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old) or (old.startswith(".") and old in key):
                key = key.replace(old, new, 1)
        if key.startswith("tokenizer.convs.") and key.count(".") == 4:  # convs.{i}.0.weight -> convs.{i}.weight
            parts = key.split(".")
            key = ".".join(parts[:3] + parts[4:])
        out[key] = value
    return out


def is_official(state: dict) -> bool:
    return any(k.startswith(("classifier.", "module.classifier.", "tokenizer.conv_layers.")) for k in state)
