"""The text models of the CCT paper: word embedding → (conv tokenizer) → masked encoder → pooling → head.

Hassani et al. (2021), section 5 and the official `src/text/` models of SHI-Labs/Compact-Transformers:
* `text_cct_*`: Conv2d(1, dim, (k, word_dim)) over the word vectors → ReLU → max-pool over time;
* `text_cvt_*`: non-overlapping patches of 4 words (one strided conv), sequence pooling;
* `text_vit_*`: the same patches and a class token;
* `text_transformer_*`: the word vectors themselves (width 300) and a class token.

Built as the official code describes them, with the faults that stop it from running fixed:
* the sine embedding has no extra leading zero "padding" row, so its length matches the tokens;
* the mask is (B, tokens) everywhere, and a class token gets a True in front of it;
* attention ignores padded keys and sequence pooling ignores padded tokens;
* the conv's width is `word_embedding_dim` (the official passes 300 whatever it is given);
* the conv pads k//2 on both sides, so with k = 4 a sentence without padding would lose the last
  window that a padded copy keeps: the model appends the missing zero rows itself
  (`max(0, k - 1 - padding)` of them), and padding then never changes the answer.

The encoder block has the official layout (`cct.layers.OfficialBlock`'s parameter names), with a
key-padding mask that `OfficialBlock` cannot take yet: `MaskedAttention` is plain
qkv → masked scaled dot-product → proj, to be unified with `cct.layers` later.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError
from .layers import ClassifierHead, drop_path, official_init_, sinusoidal_embedding
from .safeload import FORMAT, read_checkpoint, state_dict_of

FAMILIES = ("cct", "cvt", "vit", "transformer")
POSITIONAL_EMBEDDINGS = ("sine", "learnable", "none")


@dataclass
class TextConfig:
    family: str = "cct"
    vocab_size: int = 100_000  # the official Embedder's default; the tokenizer's size in practice
    word_embedding_dim: int = 300
    seq_len: int = 64  # token ids per text the model is built for (sizes its positional embedding)
    num_classes: int = 6
    aux_classes: int = 0  # > 0: a second head on the pooled features, trained beside the first (`--fine-aux`)
    # > 0: predictions add this many times the second head's probabilities, each of its classes counted for the
    # first head's class `aux_parent` names (TREC: a fine label's coarse one; `--fine-vote`)
    aux_vote: float = 0.0
    aux_parent: list[int] | None = None
    padding_idx: int = 1  # the official Embedder's
    embedding_std: float = 1.0  # word vectors start N(0, embedding_std²): nn.Embedding's N(0, 1), as the official
    # conv tokenizer (cct: conv → ReLU → max-pool; cvt/vit: patches of `kernel_size` words)
    kernel_size: int = 4
    stride: int | None = None  # None: max(1, k//2 - 1) for cct, k for cvt/vit (the official rules)
    padding: int | None = None  # None: max(1, k//2) for cct, 0 for cvt/vit
    pool_kernel: int = 2
    pool_stride: int = 2
    pool_padding: int = 1
    # encoder
    embed_dim: int | None = None  # None: 128, or word_embedding_dim for the transformer family
    depth: int = 2
    num_heads: int = 2
    mlp_ratio: float = 1.0
    positional_embedding: str = "sine"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.1
    drop_path_rate: float = 0.1
    norm_eps: float = 1e-5

    def __post_init__(self):
        assert self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}"
        assert self.positional_embedding in POSITIONAL_EMBEDDINGS, \
            f"positional_embedding must be one of {POSITIONAL_EMBEDDINGS}, got {self.positional_embedding!r}"
        for name, least in (("vocab_size", 2), ("word_embedding_dim", 1), ("seq_len", 1), ("num_classes", 0),
                            ("aux_classes", 0),
                            ("padding_idx", 0), ("kernel_size", 1), ("stride", 1), ("padding", 0), ("pool_kernel", 1),
                            ("pool_stride", 1), ("pool_padding", 0), ("embed_dim", 1), ("depth", 1), ("num_heads", 1)):
            value = getattr(self, name)  # a bool is an int to Python, never a width or a count here
            derived = value is None and name in ("stride", "padding", "embed_dim")
            assert derived or (type(value) is int and value >= least), f"{name} must be an int >= {least}, got {value!r}"
        k = self.kernel_size
        if self.stride is None:
            self.stride = max(1, k // 2 - 1) if self.family == "cct" else k
        if self.padding is None:
            self.padding = max(1, k // 2) if self.family == "cct" else 0
        if self.embed_dim is None:
            self.embed_dim = self.word_embedding_dim if self.family == "transformer" else 128
        if self.family == "transformer":
            assert self.embed_dim == self.word_embedding_dim, \
                "the transformer family encodes the word vectors themselves: embed_dim must equal word_embedding_dim"
        assert self.embed_dim % self.num_heads == 0, \
            f"embed_dim {self.embed_dim} is not divisible by {self.num_heads} heads"
        assert self.vocab_size > self.padding_idx >= 0, f"vocab_size {self.vocab_size} must exceed padding_idx"
        assert self.embedding_std > 0, f"embedding_std must be positive, got {self.embedding_std}"
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            assert 0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}"
        assert self.aux_vote >= 0.0, f"aux_vote must be non-negative, got {self.aux_vote}"
        if self.aux_parent is not None:
            self.aux_parent = [int(c) for c in self.aux_parent]  # a list, as the checkpoint's JSON-like config
            assert len(self.aux_parent) == self.aux_classes and all(0 <= c < self.num_classes for c in self.aux_parent), \
                f"aux_parent must give each of the {self.aux_classes} aux classes one of the {self.num_classes} classes"
        assert not self.aux_vote or self.aux_parent is not None, "aux_vote needs aux_parent (each aux class's class)"

    @property
    def pooling(self) -> str:
        """Sequence pooling (cct, cvt) or a class token (vit, transformer), as the official models."""
        return "seq" if self.family in ("cct", "cvt") else "cls"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown text model config fields: {sorted(unknown)}")
        return cls(**d)


class TextConvTokenizer(nn.Module):
    """Word vectors (B, L, word_dim) and their mask → tokens (B, N, dim) and the tokens' mask.

    The conv spans the whole word vector (kernel (k, word_dim)), so it slides over time only; the
    mask goes through the same windows (a token is real when its window holds a real word), as the
    official `TextTokenizer.forward_mask` does.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv2d(1, cfg.embed_dim, (cfg.kernel_size, cfg.word_embedding_dim),
                              stride=(cfg.stride, 1), padding=(cfg.padding, 0), bias=False)
        self.act_and_pool = cfg.family == "cct"  # cvt/vit: plain patches
        # windows that start on the last word must exist however long the padded input is
        self.tail = max(0, cfg.kernel_size - 1 - cfg.padding)

    def num_tokens(self, length: int) -> int:
        """Tokens out of `length` word positions (the appended tail included), by arithmetic."""
        cfg = self.cfg
        n = (length + self.tail + 2 * cfg.padding - cfg.kernel_size) // cfg.stride + 1
        if self.act_and_pool:
            n = (n + 2 * cfg.pool_padding - cfg.pool_kernel) // cfg.pool_stride + 1
        return n

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if self.tail:
            x = F.pad(x, (0, 0, 0, self.tail))  # zero word vectors, as padding tokens are
            mask = F.pad(mask, (0, self.tail), value=False)
        x = self.conv(x.unsqueeze(1))  # (B, dim, L', 1)
        windows = torch.ones(1, 1, cfg.kernel_size, dtype=x.dtype, device=x.device)
        m = F.conv1d(mask.unsqueeze(1).to(x.dtype), windows, stride=cfg.stride, padding=cfg.padding)  # (B, 1, L')
        if self.act_and_pool:
            # ReLU outputs >= 0, so a padded window's 0 never wins a max over a real one
            x = F.max_pool2d(F.relu(x), (cfg.pool_kernel, 1), (cfg.pool_stride, 1), (cfg.pool_padding, 0))
            m = F.max_pool1d(m, cfg.pool_kernel, cfg.pool_stride, cfg.pool_padding)
        return x.squeeze(-1).transpose(1, 2), m.squeeze(1) > 0  # (B, N, dim), (B, N)


class MaskedAttention(nn.Module):
    """Multi-head self-attention (fused qkv without bias, as the official) that ignores padded keys."""

    def __init__(self, dim: int, *, num_heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = proj_drop

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, heads, N, N)
        # the most negative finite value, not -inf: a row of padded keys only stays finite
        attn = attn.masked_fill(~mask[:, None, None, :], torch.finfo(attn.dtype).min).softmax(dim=-1)
        attn = F.dropout(attn, self.attn_drop, self.training)
        x = (attn @ v).transpose(1, 2).reshape(B, N, D)
        return F.dropout(self.proj(x), self.proj_drop, self.training)


class TextBlock(nn.Module):
    """The official encoder layer (pre-norm attention, then the residual stream itself normalised), masked."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float,
                 drop_path: float, eps: float = 1e-5):
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim, eps=eps)
        self.attn = MaskedAttention(dim, num_heads=num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.drop = drop
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.pre_norm(x), mask), self.drop_path, self.training)
        x = self.norm1(x)  # as the official code: the stream itself is normalised
        y = F.dropout(F.gelu(self.fc1(x)), self.drop, self.training)
        y = F.dropout(self.fc2(y), self.drop, self.training)
        return x + drop_path(y, self.drop_path, self.training)


class TextCCT(ClassifierHead, nn.Module):
    """A text classifier of the CCT family, with timm's model interface.

    `model(token_ids, mask=None)`: token_ids a LongTensor (B, L), mask a bool (B, L), True for real
    tokens (None: all real). `forward_features` returns the features *and* their token mask, which
    `forward_head` needs to pool over real tokens only.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.class_names: list[str] | None = None
        self.tokenizer = None  # the text tokenizer (cct.tokenizer.TextTokenizer) a checkpoint carries
        D = cfg.embed_dim
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.word_embedding_dim, padding_idx=cfg.padding_idx)
        self.conv_tokenizer = TextConvTokenizer(cfg) if cfg.family != "transformer" else None
        self.num_prefix_tokens = 1 if cfg.pooling == "cls" else 0
        self.num_tokens = self.num_prefix_tokens + (
            self.conv_tokenizer.num_tokens(cfg.seq_len) if self.conv_tokenizer is not None else cfg.seq_len)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pooling == "cls" else None
        self.pos_embed = None
        if cfg.positional_embedding == "learnable":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, D))
        elif cfg.positional_embedding == "sine":
            # a buffer, not a weight: recomputed, never saved (and without the official leading zero row)
            self.register_buffer("sine_embed", sinusoidal_embedding(self.num_tokens, D), persistent=False)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            TextBlock(D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop=cfg.drop_rate,
                      attn_drop=cfg.attn_drop_rate, drop_path=r, eps=cfg.norm_eps) for r in rates)
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attention_pool = nn.Linear(D, 1) if cfg.pooling == "seq" else None
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        # fine labels (TREC's 50) as a second task; predictions use `head` alone unless `aux_vote`
        self.aux_head = nn.Linear(D, cfg.aux_classes) if cfg.aux_classes > 0 else None
        if cfg.aux_vote:  # (aux_classes, num_classes): sums the aux probabilities into the first head's classes
            self.register_buffer("aux_to_main", F.one_hot(torch.tensor(cfg.aux_parent), cfg.num_classes).float(),
                                 persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """As the official code: N(0, 1) word vectors (padding row 0; `embedding_std` scales them), kaiming-normal
        conv, trunc-normal(0.02) linears, zero class token, trunc-normal(0.2) learnable positions."""
        official_init_(self)
        with torch.no_grad():
            nn.init.normal_(self.embedding.weight, std=self.cfg.embedding_std)  # nn.Embedding's own draw when 1
            self.embedding.weight[self.cfg.padding_idx].zero_()
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.2)

    # timm's interface: `ClassifierHead` (new heads as `init_weights` draws them, trunc-normal 0.02)

    def _position(self, x: torch.Tensor) -> torch.Tensor:
        N, D = x.shape[1], x.shape[2]
        if self.pos_embed is not None:
            if N > self.num_tokens:
                raise ValueError(f"{N} tokens, but this model's learnable positional embedding has "
                                 f"{self.num_tokens} (seq_len {self.cfg.seq_len}): shorten the input")
            return x + self.pos_embed[:, :N]
        if self.cfg.positional_embedding == "sine":
            pe = self.sine_embed if N <= self.num_tokens else sinusoidal_embedding(N, D).to(x.device)
            return x + pe[:, :N].to(x.dtype)
        return x

    def forward_features(self, token_ids: torch.Tensor, mask: torch.Tensor | None = None,
                         mix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) and their mask → (features (B, N, embed_dim), token mask (B, N)).

        `mix` (training only): word mixup (Guo et al., 2019), a 0-d weight λ; each text's word vectors
        become λ·x + (1 - λ)·(those of the batch in reverse order), position by position, and a position
        is real where either text has a token. The targets are mixed likewise (`cct.kinds.augment_tokens`).
        """
        assert token_ids.ndim == 2, f"token_ids must be (batch, length), got shape {tuple(token_ids.shape)}"
        if mask is None:
            mask = torch.ones(token_ids.shape, dtype=torch.bool, device=token_ids.device)
        assert mask.dtype == torch.bool and mask.shape == token_ids.shape, \
            f"mask must be a bool tensor of shape {tuple(token_ids.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        x = self.embedding(token_ids) * mask.unsqueeze(-1).to(self.embedding.weight.dtype)  # (B, L, word_dim)
        if mix is not None:
            x = torch.lerp(x.flip(0), x, mix.to(x.dtype))  # λ·x + (1 - λ)·x.flip(0); padding rows are 0 in both
            mask = mask | mask.flip(0)
        if self.conv_tokenizer is not None:
            x, mask = self.conv_tokenizer(x, mask)  # (B, N, D), (B, N)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            mask = F.pad(mask, (1, 0), value=True)
        x = F.dropout(self._position(x), self.cfg.drop_rate, self.training)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x), mask

    def pool_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence-pooling weights (B, N): softmax over the real tokens of a learned score."""
        score = self.attention_pool(x).squeeze(-1)
        if mask is not None:
            score = score.masked_fill(~mask, torch.finfo(score.dtype).min)
        return score.softmax(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
        if self.attention_pool is not None:
            x = (self.pool_weights(x, mask).unsqueeze(1) @ x).squeeze(1)  # (B, D) sequence pooling
        else:
            x = x[:, 0]  # class token
        if pre_logits:
            return x
        return self.head(x) if not self.cfg.aux_vote else self.vote(self.head(x), self.aux_head(x))

    def vote(self, logits: torch.Tensor, aux_logits: torch.Tensor) -> torch.Tensor:
        """Both heads' prediction, log((p + w·q) / (1 + w)) with w = `aux_vote`, p the first head's probabilities
        and q the second's summed into the first head's classes: float32 log-probabilities (B, num_classes),
        which softmax, argmax and cross-entropy read as logits (softmax gives back the mixture)."""
        w = self.cfg.aux_vote
        # a broadcast sum, not a matmul, which autocast would run in 16 bits
        q = (aux_logits.float().softmax(-1).unsqueeze(-1) * self.aux_to_main).sum(1)  # (B, num_classes)
        p = logits.float().softmax(-1) + w * q
        return (p / (1 + w)).clamp_min(torch.finfo(torch.float32).tiny).log()  # no -inf where both underflow

    def forward(self, token_ids: torch.Tensor, mask: torch.Tensor | None = None,
                mix: torch.Tensor | None = None, *, with_aux: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, num_classes); with `with_aux` (training with `aux_classes`), (logits, aux logits)."""
        x, token_mask = self.forward_features(token_ids, mask, mix)
        if not with_aux:
            return self.forward_head(x, mask=token_mask)
        assert self.aux_head is not None, "with_aux needs a model built with aux_classes > 0"
        pooled = self.forward_head(x, pre_logits=True, mask=token_mask)
        return self.head(pooled), self.aux_head(pooled)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's: a new first head; the second head's classes no longer map onto its classes, so it stops voting."""
        super().reset_classifier(num_classes, global_pool)
        self.cfg.aux_vote, self.cfg.aux_parent = 0.0, None

    def extra_repr(self) -> str:
        return f"family={self.cfg.family!r}, seq_len={self.cfg.seq_len}, tokens={self.num_tokens}, " \
               f"positional_embedding={self.cfg.positional_embedding!r}"


# ---------------------------------------------------------------------- variants
# (depth, heads, mlp_ratio, width) of each official text model; text_cvt_6 is 128 wide, the others 256
_SIZES = {2: (2, 2, 1.0, 128), 4: (4, 2, 1.0, 128), 6: (6, 4, 2.0, 256)}
TEXT_VARIANTS: dict[str, dict] = {}
for _layers, (_depth, _heads, _mlp, _width) in _SIZES.items():
    _size = dict(depth=_depth, num_heads=_heads, mlp_ratio=_mlp)
    TEXT_VARIANTS[f"text_cct_{_layers}"] = dict(_size, family="cct", embed_dim=_width, kernel_size=4)
    TEXT_VARIANTS[f"text_cvt_{_layers}"] = dict(_size, family="cvt", embed_dim=128, kernel_size=4)
    TEXT_VARIANTS[f"text_vit_{_layers}"] = dict(_size, family="vit", embed_dim=_width, kernel_size=4)
    TEXT_VARIANTS[f"text_transformer_{_layers}"] = dict(_size, family="transformer")


def get_text_config(name: str, **overrides) -> TextConfig:
    """The `TextConfig` of a named text model with overrides applied; unknown names or fields are errors."""
    if name not in TEXT_VARIANTS:
        raise ValueError(f"unknown text model {name!r}; known: {', '.join(sorted(TEXT_VARIANTS))}")
    unknown = sorted(set(overrides) - {f.name for f in fields(TextConfig)})
    if unknown:
        raise TypeError(f"unknown override(s) for {name}: {', '.join(unknown)}")
    if "kernel_size" in overrides:  # stride and padding follow the kernel unless given too
        overrides = {"stride": None, "padding": None, **overrides}
    return replace(TextConfig(**TEXT_VARIANTS[name]), **overrides)


def create_text_model(name: str, *, pretrained: str | Path | None = None, **overrides) -> TextCCT:
    """Build a named text model.

    Args:
        name: a key of `TEXT_VARIANTS`, e.g. "text_cct_2".
        pretrained: optional path to a state dict saved from the official SHI-Labs text models; its
            vocabulary size and number of classes are taken from the file.
        **overrides: `TextConfig` fields, e.g. `kernel_size`, `vocab_size`, `num_classes`, `seq_len`.
    """
    state = None
    if pretrained is not None:
        data = read_checkpoint(pretrained)
        raw = state_dict_of(data)
        if data.get("format") == FORMAT:  # cct's own checkpoint: its tokenizer, not an official embedder
            what = ("a cct text checkpoint, whose vocabulary is its own tokenizer's" if
                    data.get("config_class") == "TextConfig" else
                    f"a cct checkpoint of the image model {data.get('model_name') or '?'}")
            raise CheckpointError(f"{pretrained} is {what}: a text model's pretrained weights are a state dict of the "
                                  "official text models (to go on training a cct text run, use --resume on its folder)")
        if not any(k.startswith(("embedder.", "module.embedder.")) for k in raw):
            raise CheckpointError(f"{pretrained}: not a state dict of the official text models (no embedder)")
        state = official_text_state_dict(raw)
        vocab = state["embedding.weight"].shape[0]
        if overrides.setdefault("vocab_size", vocab) != vocab:
            raise CheckpointError(f"{pretrained}: its vocabulary has {vocab} words, "
                                  f"not vocab_size={overrides['vocab_size']}")
        if "head.weight" in state:
            overrides.setdefault("num_classes", state["head.weight"].shape[0])
        overrides.setdefault("positional_embedding", "learnable" if "pos_embed" in state else "sine")
    model = TextCCT(get_text_config(name, **overrides))
    model.name = name
    if state is not None:
        conv = state.get("conv_tokenizer.conv.weight")
        if conv is not None and model.conv_tokenizer is not None and conv.shape[2] != model.cfg.kernel_size:
            raise CheckpointError(f"{pretrained}: its conv has kernel size {conv.shape[2]}; "
                                  f"pass kernel_size={conv.shape[2]}")
        state = _with_tail_positions(state, model)
        if model.aux_head is not None:  # a second head the official models do not have: the model's own
            state.update({k: v for k, v in model.state_dict().items() if k.startswith("aux_head.")})
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise CheckpointError(f"{pretrained}: weights do not fit {name}: {lines[-1][:300]}") from None
    return model


# ---------------------------------------------------------------------- official weights
_OFFICIAL_RENAMES = [("embedder.embeddings.", "embedding."), ("tokenizer.conv_layers.0.", "conv_tokenizer.conv."),
                     ("classifier.positional_emb", "pos_embed"), ("classifier.class_emb", "cls_token"),
                     ("classifier.fc.", "head."), ("classifier.", ""), (".self_attn.", ".attn."),
                     (".linear1.", ".fc1."), (".linear2.", ".fc2.")]


def _is_official_sine(pe: torch.Tensor) -> bool:
    """Whether an official `positional_emb` is its fixed sine table: a zero row, then the sines."""
    table = sinusoidal_embedding(pe.shape[1] - 1, pe.shape[2])
    return bool((pe[0, 0] == 0).all()) and torch.allclose(pe[:, 1:].float(), table, atol=1e-4)


def _with_tail_positions(state: dict[str, torch.Tensor], model: TextCCT) -> dict[str, torch.Tensor]:
    """An official learnable table has no rows for the tokens of the windows the official conv drops at the end
    (k = 4: 33 rows for cct's 34 tokens at seq_len 64): they get copies of its last row, the nearest position
    it trained; the rows it has land unchanged."""
    pe, tok = state.get("pos_embed"), model.conv_tokenizer
    if pe is None or model.pos_embed is None or tok is None or not tok.tail:
        return state
    extra = tok.num_tokens(model.cfg.seq_len) - tok.num_tokens(model.cfg.seq_len - tok.tail)
    if extra <= 0 or pe.shape[1] + extra != model.pos_embed.shape[1]:
        return state  # not the official length: load_state_dict names the mismatch
    return {**state, "pos_embed": torch.cat([pe, pe[:, -1:].expand(-1, extra, -1)], dim=1)}


def official_text_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a state dict of the official text models (`src/text/`) onto `TextCCT`'s names.

    Tensors are not changed: the conv weight (dim, 1, k, word_dim) and the fused qkv are cct's layout.
    The official `positional_emb` has an extra leading "padding" row: a sine table is dropped (cct
    recomputes it as a buffer), a learnable one loses that row.
    """
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for old, new in _OFFICIAL_RENAMES:
            if key.startswith(old) or (old.startswith(".") and old in key):
                key = key.replace(old, new, 1)
        out[key] = value
    pe = out.pop("pos_embed", None)
    if pe is not None and not _is_official_sine(pe):
        out["pos_embed"] = pe[:, 1:]
    return out
