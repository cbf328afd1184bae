"""Weights of the keras.io CCT example → `cct_2_3x2_32_keras`.

The example is Sayak Paul's "Compact Convolutional Transformers" (https://keras.io/examples/vision/cct/).
`keras_state_dict` is the one filter for this source (like timm's `checkpoint_filter_fn`): a pure
function from an HDF5 file to cct's state-dict names, read with h5py alone, no Keras needed.

Two HDF5 layouts are read:

* Keras 3 `model.save_weights("x.weights.h5")`: `layers/<name>/vars/<i>`, nested layers under
  their attribute (`layers/cct_tokenizer/conv_model/layers/conv2d_1/vars/0`,
  `layers/multi_head_attention/query_dense/vars/0`). Names are class names numbered per
  container (`dense`, `dense_1`, ...), not the layers' own names.
* the legacy HDF5 layout of tf.keras 2 (`save_weights("x.h5")`): one group per layer named
  `layer.name` (`dense_9/dense_9/kernel:0`), which carries whatever offsets Keras's global
  name counter had when the model was built.

Either way a layer's role comes from its kind and its rank among layers of that kind, ranked
by numeric suffix (creation order), never by string order: `dense_10` follows `dense_9`.
Both versions of the example are understood: the 2023 Keras 3 one (`PositionEmbedding`,
`SequencePooling`) and the 2021 tf.keras one (`Embedding` positions, an inline `Dense(1)`
scoring the tokens just before the classifier).

Kernel layouts: Dense (in, out) → Linear (out, in); Conv2D (kh, kw, in, out) → (out, in, kh, kw);
MultiHeadAttention's EinsumDense query/key/value kernels (dim, heads, key_dim) and output
kernel (heads, key_dim, dim), flattened head-major as cct's fused `qkv` and `proj` expect.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import CheckpointError

if TYPE_CHECKING:
    import h5py

__all__ = ["KerasWeightsError", "MODEL_NAME", "keras_state_dict", "read_keras", "layer_order_key", "sort_layer_names"]

MODEL_NAME = "cct_2_3x2_32_keras"

_SUFFIX = re.compile(r"^(?P<kind>.*?)(?:_(?P<index>\d+))?$")
_ATTENTION_PARTS = {"query": ("query_dense", "query"), "key": ("key_dense", "key"),
                    "value": ("value_dense", "value"), "output": ("output_dense", "attention_output")}


class KerasWeightsError(CheckpointError):
    """A Keras weights file that cannot be read or does not hold the keras.io CCT example."""


def layer_order_key(name: str) -> tuple[str, int]:
    """("dense", 10) for "dense_10"; an unnumbered name is the first of its kind: ("dense", 0)."""
    match = _SUFFIX.match(name)
    return match["kind"], int(match["index"] or 0)


def sort_layer_names(names) -> list[str]:
    """Keras layer names in creation order: by kind, then numeric suffix (dense, dense_2, dense_10)."""
    return sorted(names, key=layer_order_key)


# ---------------------------------------------------------------------- reading the two layouts
class _Layers:
    """What the file holds, by role: lists in creation order, arrays in Keras layout."""

    def __init__(self):
        self.convs: list[np.ndarray] = []
        self.positions: np.ndarray | None = None
        self.norms: list[tuple[np.ndarray, np.ndarray]] = []
        self.attentions: list[dict[str, np.ndarray]] = []
        self.denses: list[tuple[np.ndarray, np.ndarray]] = []
        self.pool: tuple[np.ndarray, np.ndarray] | None = None


def _vars(group: h5py.Group) -> list[np.ndarray]:
    """A Keras 3 layer's variables `vars/0`, `vars/1`, ... in index order."""
    if "vars" not in group:
        return []
    return [group["vars"][i][()] for i in sorted(group["vars"], key=int)]


def _read_keras3(root: h5py.Group) -> _Layers:
    found = _Layers()
    for name in sort_layer_names(root):
        group, kind = root[name], layer_order_key(name)[0]
        if kind == "cct_tokenizer":
            convs = group["conv_model"]["layers"]
            found.convs = [_vars(convs[c])[0] for c in sort_layer_names(convs) if c.startswith("conv2d")]
        elif kind in ("position_embedding", "embedding"):
            found.positions = _vars(group)[0]
        elif kind == "layer_normalization":
            found.norms.append(tuple(_vars(group)))
        elif kind == "multi_head_attention":
            found.attentions.append({
                f"{part}.{leaf}": value
                for part, (attribute, _) in _ATTENTION_PARTS.items()
                for leaf, value in zip(("kernel", "bias"), _vars(group[attribute]))})
        elif kind == "dense":
            found.denses.append(tuple(_vars(group)))
        elif kind == "sequence_pooling":
            found.pool = tuple(_vars(group["attention"]))
        elif _vars(group):
            raise ValueError(f"unexpected layer {name!r} with weights")
    return found


def _legacy_weights(group: h5py.Group) -> dict[str, np.ndarray]:
    """A legacy layer group's weights, keyed by their path inside the layer, ':0' dropped."""
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
    return {name.removesuffix(":0"): group[name][()] for name in names}


def _leaf(weights: dict[str, np.ndarray], leaf: str) -> np.ndarray:
    matches = [v for k, v in weights.items() if k.rsplit("/", 1)[-1] == leaf]
    if len(matches) != 1:
        raise ValueError(f"expected one weight named {leaf!r} among {sorted(weights)}")
    return matches[0]


def _read_legacy(root: h5py.File) -> _Layers:
    import h5py  # lazily: `import cct` need not load HDF5
    found = _Layers()
    for name in sort_layer_names(n for n in root if isinstance(root[n], h5py.Group)):
        weights, kind = _legacy_weights(root[name]), layer_order_key(name)[0]
        if not weights:
            continue
        if kind == "cct_tokenizer":  # "cct_tokenizer/sequential/conv2d_9/kernel"
            by_conv = {k.split("/")[-2]: v for k, v in weights.items() if k.endswith("/kernel")}
            found.convs = [by_conv[c] for c in sort_layer_names(by_conv)]
        elif kind in ("position_embedding", "embedding"):
            found.positions = _leaf(weights, "embeddings")
        elif kind == "layer_normalization":
            found.norms.append((_leaf(weights, "gamma"), _leaf(weights, "beta")))
        elif kind == "multi_head_attention":  # "multi_head_attention_9/query/kernel"
            found.attentions.append({
                f"{part}.{k.rsplit('/', 1)[-1]}": v
                for part, (_, legacy) in _ATTENTION_PARTS.items()
                for k, v in weights.items() if k.split("/")[-2] == legacy})
        elif kind == "dense":
            found.denses.append((_leaf(weights, "kernel"), _leaf(weights, "bias")))
        elif kind == "sequence_pooling":
            found.pool = (_leaf(weights, "kernel"), _leaf(weights, "bias"))
        else:
            raise ValueError(f"unexpected layer {name!r} with weights")
    return found


# ---------------------------------------------------------------------- conversion
def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _expect(array: np.ndarray, ndim: int, what: str) -> np.ndarray:
    if array.ndim != ndim:
        raise ValueError(f"{what} has shape {tuple(array.shape)}, expected {ndim} dimensions")
    return array


def _to_state_dict(found: _Layers) -> dict[str, torch.Tensor]:
    depth = len(found.attentions)
    denses = list(found.denses)
    if found.pool is None and len(denses) == 2 * depth + 2:  # 2021 example: inline Dense(1) before the head
        found.pool = denses.pop(-2)
    if not found.convs or found.positions is None or found.pool is None or depth == 0:
        raise ValueError("missing layers: expected a tokenizer, positional embedding, attention and sequence pooling")
    if len(found.norms) != 2 * depth + 1 or len(denses) != 2 * depth + 1:
        raise ValueError(f"{depth} attention layers need {2 * depth + 1} LayerNormalization and Dense layers, "
                         f"found {len(found.norms)} and {len(denses)}")

    state: dict[str, torch.Tensor] = {}
    for i, kernel in enumerate(found.convs):  # (kh, kw, in, out) -> (out, in, kh, kw)
        state[f"tokenizer.convs.{i}.weight"] = _tensor(_expect(kernel, 4, f"conv {i} kernel").transpose(3, 2, 0, 1))
    state["pos_embed"] = _tensor(_expect(found.positions, 2, "positional embedding"))[None]

    def linear(prefix: str, kernel: np.ndarray, bias: np.ndarray) -> None:
        state[f"{prefix}.weight"] = _tensor(_expect(kernel, 2, f"{prefix} kernel").T)
        state[f"{prefix}.bias"] = _tensor(_expect(bias, 1, f"{prefix} bias"))

    def norm(prefix: str, gamma: np.ndarray, beta: np.ndarray) -> None:
        state[f"{prefix}.weight"] = _tensor(_expect(gamma, 1, f"{prefix} gamma"))
        state[f"{prefix}.bias"] = _tensor(_expect(beta, 1, f"{prefix} beta"))

    for i, attention in enumerate(found.attentions):
        block = f"blocks.{i}"
        norm(f"{block}.norm1", *found.norms[2 * i])
        norm(f"{block}.norm2", *found.norms[2 * i + 1])
        missing = {f"{p}.{leaf}" for p in _ATTENTION_PARTS for leaf in ("kernel", "bias")} - set(attention)
        if missing:
            raise ValueError(f"attention {i} lacks {', '.join(sorted(missing))}")
        qkv_kernels, qkv_biases = [], []
        for part in ("query", "key", "value"):
            kernel = _expect(attention[f"{part}.kernel"], 3, f"attention {i} {part} kernel")  # (dim, heads, key_dim)
            qkv_kernels.append(kernel.reshape(kernel.shape[0], -1).T)  # (heads*key_dim, dim)
            qkv_biases.append(_expect(attention[f"{part}.bias"], 2, f"attention {i} {part} bias").reshape(-1))
        state[f"{block}.attn.qkv.weight"] = _tensor(np.concatenate(qkv_kernels))  # (3*heads*key_dim, dim)
        state[f"{block}.attn.qkv.bias"] = _tensor(np.concatenate(qkv_biases))
        out = _expect(attention["output.kernel"], 3, f"attention {i} output kernel")  # (heads, key_dim, dim)
        state[f"{block}.attn.proj.weight"] = _tensor(out.reshape(-1, out.shape[-1]).T)  # (dim, heads*key_dim)
        state[f"{block}.attn.proj.bias"] = _tensor(_expect(attention["output.bias"], 1, f"attention {i} output bias"))
        linear(f"{block}.fc1", *denses[2 * i])
        linear(f"{block}.fc2", *denses[2 * i + 1])
    norm("norm", *found.norms[-1])
    linear("attention_pool", *found.pool)
    linear("head", *denses[-1])
    return state


@contextmanager
def _reading(path: Path):
    """Turn whatever goes wrong while reading `path` into one line naming the file."""
    try:
        yield
    except KerasWeightsError:
        raise
    except OSError as e:
        raise KerasWeightsError(f"{path}: not a readable HDF5 file ({e})") from None
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise KerasWeightsError(f"{path}: not the keras.io CCT example's weights: {e}") from None


def _read(path: Path) -> _Layers:
    import h5py  # lazily: `import cct` need not load HDF5
    if not path.is_file():
        raise KerasWeightsError(f"{path}: no such file")
    with _reading(path), h5py.File(path, "r") as f:
        if "layers" in f and isinstance(f["layers"], h5py.Group):
            return _read_keras3(f["layers"])
        if "layer_names" in f.attrs or "model_weights" in f:
            return _read_legacy(f["model_weights"] if "model_weights" in f else f)
        raise ValueError("no 'layers' group (Keras 3) or 'layer_names' attribute (legacy Keras)")


def keras_state_dict(h5_path: str | Path) -> dict[str, torch.Tensor]:
    """Read the keras.io CCT example's weights file and return cct's state dict for it.

    Args:
        h5_path: a Keras 3 `.weights.h5` file, or a tf.keras 2 legacy `.h5` weights file.

    Raises:
        KerasWeightsError: the file is missing, not HDF5, or not the example's model.
    """
    path = Path(h5_path)
    found = _read(path)
    with _reading(path):
        return _to_state_dict(found)


def read_keras(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The keras.io CCT example's weights and the `cct_2_3x2_32_keras` config overrides they imply.

    The sizes the example lets one edit (width, depth, heads, key_dim, MLP width, classes,
    conv widths, image size) are read from the file's shapes; the example's own file gives no
    change from the registered variant (`cct.from_keras` builds the model from both).

    Args:
        path: a Keras 3 `.weights.h5` file, or a tf.keras 2 legacy `.h5` weights file.
    Returns:
        (cct state dict, `CCTConfig` overrides of `MODEL_NAME`).
    """
    path = Path(path)
    found = _read(path)
    with _reading(path):
        state = _to_state_dict(found)
        dim, num_heads, key_dim = found.attentions[0]["query.kernel"].shape
        grid = math.isqrt(found.positions.shape[0])
        overrides = dict(
            embed_dim=dim, depth=len(found.attentions), num_heads=num_heads, head_dim=key_dim,
            mlp_ratio=found.denses[0][0].shape[1] / dim, num_classes=found.denses[-1][0].shape[1],
            conv_layers=len(found.convs), conv_channels=found.convs[0].shape[-1],
            img_size=grid * 2 ** len(found.convs),  # per stage: valid conv, pad 1, "same" pool halves
        )
    return state, overrides
