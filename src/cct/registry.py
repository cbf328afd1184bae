"""Named variants of the CCT family as data: name → `CCTConfig` overrides.

Names follow the official SHI-Labs repository: `cct_{layers}_{kernel}x{conv layers}_{img size}`,
`cvt_{layers}_{patch}_{img size}`, `vit_{layers}_{patch}_{img size}` (with `vit_lite_*` aliases).
Every `_sine` variant really has sinusoidal embeddings; the official CCT and CVT factories
silently build learnable ones for them, a bug not reproduced here.

The text models of `cct.text_model` (`text_{cct,cvt,vit,transformer}_{2,4,6}`) share the registry:
`list_models`, `get_config` (a `TextConfig` for them), `create_model` and `model_kind` cover both kinds.
"""
from __future__ import annotations

import fnmatch
from dataclasses import fields, replace
from pathlib import Path

from .checkpoint import load_pretrained, read_checkpoint
from .errors import CCTError, CheckpointError
from .interop.keras import MODEL_NAME as KERAS_MODEL_NAME, KerasWeightsError, read_keras
from .model import CCT, CCTConfig
from .safeload import FORMAT
from .text_model import TEXT_VARIANTS, TextCCT, TextConfig, create_text_model, get_text_config

# (depth, heads, mlp_ratio, width) of each size in the paper's Table 1
_SIZES = {2: (2, 2, 1.0, 128), 4: (4, 2, 1.0, 128), 6: (6, 4, 2.0, 256), 7: (7, 4, 2.0, 256),
          14: (14, 6, 3.0, 384)}


def _size(layers: int) -> dict:
    depth, heads, mlp_ratio, width = _SIZES[layers]
    return dict(depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, embed_dim=width)


def _cct(layers: int, kernel: int, conv_layers: int, img: int, num_classes: int) -> dict:
    # the official `_cct` factory's rule: stride max(1, k//2 - 1), padding max(1, k//2)
    return dict(_size(layers), kernel_size=kernel, conv_layers=conv_layers, stride=max(1, kernel // 2 - 1),
                padding=max(1, kernel // 2), img_size=(img, img), num_classes=num_classes)


def _patches(layers: int, patch: int, img: int, pooling: str) -> dict:
    """CVT (sequence pooling) and ViT-Lite (class token): one strided conv with bias, no ReLU or pool."""
    return dict(_size(layers), kernel_size=patch, stride=patch, padding=0, conv_layers=1, conv_bias=True,
                conv_act=False, max_pool=False, pooling=pooling, img_size=(img, img), num_classes=10,
                attn_drop_rate=0.1, drop_path_rate=0.1)


_VARIANTS: dict[str, dict] = {}
for _layers, _kernel, _convs, _img, _classes in [
        (2, 3, 2, 32, 10), (4, 3, 2, 32, 10), (6, 3, 1, 32, 10), (6, 3, 2, 32, 10), (7, 3, 1, 32, 10),
        (7, 3, 2, 32, 10), (7, 7, 2, 224, 102), (14, 7, 2, 224, 1000), (14, 7, 2, 384, 1000)]:
    _name = f"cct_{_layers}_{_kernel}x{_convs}_{_img}"
    _VARIANTS[_name] = _cct(_layers, _kernel, _convs, _img, _classes)
    _VARIANTS[_name + "_sine"] = dict(_VARIANTS[_name], positional_embedding="sine")
_VARIANTS["cct_7_3x1_32_c100"] = dict(_VARIANTS["cct_7_3x1_32"], num_classes=100)
_VARIANTS["cct_7_3x1_32_sine_c100"] = dict(_VARIANTS["cct_7_3x1_32_sine"], num_classes=100)
_VARIANTS["cct_14_7x2_384_fl"] = dict(_VARIANTS["cct_14_7x2_384"], num_classes=102)
for _layers in (2, 4, 6, 7):
    for _family, _pooling in (("cvt", "seq"), ("vit", "cls")):
        _name = f"{_family}_{_layers}_4_32"
        _VARIANTS[_name] = _patches(_layers, 4, 32, _pooling)
        _VARIANTS[_name + "_sine"] = dict(_VARIANTS[_name], positional_embedding="sine")
# The keras.io example: valid convs, ZeroPadding2D(1), TF-"same" pooling, Keras's pre-norm block,
# 2 heads of key_dim 128, and dropout 0.1 everywhere it puts one.
_VARIANTS["cct_2_3x2_32_keras"] = dict(
    _size(2), head_dim=128, kernel_size=3, conv_layers=2, stride=1, padding=0, post_pad=1, pool_padding="same",
    block="keras", img_size=(32, 32), num_classes=10, drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1)

# A tokenizer that carries more of the work (issue 15): four 3x3 convs, 64, 128, 128 and 128 wide, each
# followed by a ReLU, max-pooled after the first and the third; the same 8x8 grid of 128-wide tokens and the
# same CCT-2 encoder as cct_2_3x2_32, at 2.4x its MACs. Not an official variant (nor the next one).
_VARIANTS["cct_2_3x4_32"] = dict(_VARIANTS["cct_2_3x2_32"], conv_layers=4, conv_widths=(64, 128, 128, 128),
                                 pool_layers=(0, 2))
# One more 3x3 conv on the 8x8 grid (128 wide): +9.4M MACs (x1.11), about x0.95 the images/s in bf16; the fast
# recipe's model since the tenth session (validation top-1 0.8950 against 0.8846-0.8884 for cct_2_3x4_32).
_VARIANTS["cct_2_3x5_32"] = dict(_VARIANTS["cct_2_3x4_32"], conv_layers=5, conv_widths=(64, 128, 128, 128, 128))

_ALIASES = {f"vit_lite_{n}_4_32{s}": f"vit_{n}_4_32{s}" for n in (2, 4, 6, 7) for s in ("", "_sine")}
_CONFIG_FIELDS = {f.name for f in fields(CCTConfig)}


class UnknownModelError(ValueError):
    pass


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of every registered model (aliases included), optionally filtered by a glob."""
    names = sorted({*_VARIANTS, *_ALIASES, *TEXT_VARIANTS})
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def model_kind(name: str) -> str:
    """"text" for the text models, "image" for the others (unknown names are an `UnknownModelError`)."""
    if name in TEXT_VARIANTS:
        return "text"
    get_config(name)
    return "image"


def get_config(name: str, **overrides) -> CCTConfig | TextConfig:
    """The config of a registered model (`TextConfig` for text models, else `CCTConfig`), with overrides
    applied; unknown names or fields are errors."""
    if name in TEXT_VARIANTS:
        return get_text_config(name, **overrides)
    key = _ALIASES.get(name, name)
    if key not in _VARIANTS:
        close = [n for n in list_models() if n.startswith(name.split("_")[0])][:6]
        raise UnknownModelError(f"unknown model {name!r}" + (f"; similar: {', '.join(close)}" if close else
                                                             "; see `cct models`"))
    unknown = sorted(set(overrides) - _CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"unknown override(s) for {name}: {', '.join(unknown)}")
    base = CCTConfig(**_VARIANTS[key])
    return replace(base, **_follow_kernel(base, overrides), **overrides)


def _follow_kernel(base: CCTConfig, overrides: dict) -> dict:
    """What a `kernel_size` override changes with it, as the official factories derive it (unless given too):
    a CCT's stride max(1, k//2 - 1) and padding max(1, k//2), a CVT's / ViT-Lite's patch stride k. The Keras
    example's valid convs keep stride 1 and no padding."""
    k = overrides.get("kernel_size")
    if type(k) is not int or k < 1:
        return {}  # CCTConfig names the bad value
    if not base.max_pool and base.stride == base.kernel_size and base.padding == 0:  # patches
        derived = dict(stride=k)
    elif base.stride == max(1, base.kernel_size // 2 - 1) and base.padding == max(1, base.kernel_size // 2):
        derived = dict(stride=max(1, k // 2 - 1), padding=max(1, k // 2))
    else:
        derived = {}
    return {name: v for name, v in derived.items() if name not in overrides}


def create_model(name: str, *, pretrained: str | Path | bool | None = None, **overrides) -> CCT | TextCCT:
    """Build a registered model.

    Args:
        name: a name from `list_models()`.
        pretrained: optional path to weights to load (None or False: none): a cct checkpoint, an official
            SHI-Labs `.pth` state dict, or a Keras `.weights.h5` (for `cct_2_3x2_32_keras`); for a text model, a state
            dict of the official text models (`cct.text_model.create_text_model`). A cct checkpoint of this very
            model comes back as it was trained: its head, class names and settings (`checkpoint_settings`), unless
            `overrides` change them.
        **overrides: `CCTConfig` fields, e.g. `num_classes`, `img_size` (int or (h, w)), `in_chans`,
            `positional_embedding`, `drop_rate`, `attn_drop_rate`, `drop_path_rate`; for a text model,
            `TextConfig` fields, e.g. `kernel_size`, `vocab_size`, `seq_len`, `num_classes`.
    """
    if pretrained is True:  # timm's flag for hosted weights
        raise CheckpointError(f"cct hosts no weights to download for {name}: give pretrained= a path (a cct checkpoint, "
                              "an official .pth, a Keras .weights.h5)")
    pretrained = pretrained or None  # False, as timm's
    if name in TEXT_VARIANTS:
        return create_text_model(name, pretrained=pretrained, **overrides)
    if pretrained is not None:
        return model_with_weights(name, pretrained, **overrides)
    model = CCT(get_config(name, **overrides))
    model.name = _ALIASES.get(name, name)
    return model


def model_with_weights(name: str, path: str | Path, *, class_names: list[str] | None = None,
                       notes: list[str] | None = None, **overrides) -> CCT:
    """The image model `name` with the weights of `path` (`cct.checkpoint.load_pretrained`), built as a cct checkpoint
    of it was (`checkpoint_settings`), `overrides` aside. `class_names`: the classes it is for (a head of other classes
    starts fresh); `notes` collects a line for each thing adapted, as `cct train --pretrained` prints them."""
    settings, classes = checkpoint_settings(name, path, overrides)
    model = CCT(get_config(name, **settings, **overrides))
    model.name = _ALIASES.get(name, name)
    if settings and notes is not None:
        notes.append(f"model settings of {Path(path).name}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    load_pretrained(model, path, class_names=class_names, notes=notes)
    model.class_names = classes
    return model


def checkpoint_settings(name: str, path: str | Path, overrides: dict) -> tuple[dict, list[str] | None]:
    """What a cct checkpoint of the model `name` was built with, so that its weights come back in the model they
    were trained in: the settings that differ from the registry's (a `positional_embedding`, `num_classes`,
    `img_size`, ...) and are not in `overrides`, and its class names when the class count stays. Other weights
    files, and checkpoints of other models, give ({}, None)."""
    if Path(path).suffix == ".h5":
        return {}, None
    data = read_checkpoint(path)
    key = _ALIASES.get(name, name)
    if data.get("format") != FORMAT or data.get("config_class", "CCTConfig") != "CCTConfig" or key not in _VARIANTS \
            or _ALIASES.get(data.get("model_name"), data.get("model_name")) != key:
        return {}, None
    try:
        saved = CCTConfig.from_dict(dict(data.get("config") or {}))
    except (TypeError, ValueError, AssertionError):
        return {}, None  # load_pretrained names what is wrong with the file
    base = CCTConfig(**_VARIANTS[key])
    skip = set(overrides) | ({"stride", "padding"} if "kernel_size" in overrides else set())
    settings = {f.name: getattr(saved, f.name) for f in fields(CCTConfig)
                if f.name not in skip and getattr(saved, f.name) != getattr(base, f.name)}
    stays = overrides.get("num_classes", saved.num_classes) == saved.num_classes
    return settings, (list(data["class_names"]) if stays and data.get("class_names") else None)


def pretrained_model(path: str | Path) -> str:
    """The registered model a weights file is for: a cct checkpoint names it, the Keras example's is
    `cct_2_3x2_32_keras`; an official `.pth` does not say (a `CCTError` asks for --model)."""
    if Path(path).suffix == ".h5":
        return KERAS_MODEL_NAME
    name = read_checkpoint(path).get("model_name")
    if not name:
        raise CCTError(f"--pretrained {path} does not name its model (an official .pth, say): give --model")
    return name


def from_keras(path) -> CCT:
    """The keras.io example's model (`cct_2_3x2_32_keras`) with the weights of its `.weights.h5` file.

    The sizes the example lets one edit are read from the file; its own file gives exactly
    `create_model("cct_2_3x2_32_keras")`. The model expects images in [0, 1] (the example's
    `Rescaling(1/255)` is not part of it) and is returned in eval mode.
    """
    state, overrides = read_keras(path)
    model = create_model(KERAS_MODEL_NAME, **overrides)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise KerasWeightsError(f"{path}: weights do not fit {KERAS_MODEL_NAME}: {lines[-1][:300]}") from None
    return model.eval()
