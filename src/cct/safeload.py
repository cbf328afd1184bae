"""Reading checkpoint files into plain dicts without ever unpickling code.

`.pt` files load with `torch.load(weights_only=True)`, `.safetensors` through safetensors (cct's own
metadata, when present, decoded from JSON). Kept apart from `cct.checkpoint` (which builds models from
what is read) so that model modules can read foreign weights without importing every model class.
"""
from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError

FORMAT = "cct-checkpoint"
VERSION = 1
# plain-data extras that safetensors metadata carries too (as JSON): the input record, a text model's tokenizer,
# the recorded test split of class folders and CSVs
SAFETENSORS_EXTRAS = ("eval", "tokenizer", "split")


def _check_crcs(path: Path, head: bytes) -> None:
    """A zip-format checkpoint's members against their CRCs: torch.load does not check them, so damaged tensor bytes
    loaded as weights (NaN losses, wrong answers, no error)."""
    if not head.startswith(b"PK"):
        return  # not a zip: torch.load names what it is
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return  # truncated or unreadable: torch.load's own error says so
    if bad is not None:
        raise CheckpointError(f"{path} is corrupted: its member {bad} fails its checksum (a damaged copy or disk)")


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel's and torch.compile's key prefixes


def state_dict_of(data: dict) -> dict:
    """The weights a loaded checkpoint holds: cct's and timm's `state_dict`, the official `model`, or the dict itself."""
    return data.get("state_dict") or data.get("model") or data


def unwrap_keys(state: dict) -> dict:
    """`state` with DDP's `module.` and torch.compile's `_orig_mod.` prefixes taken off its keys."""
    out = {}
    for k, v in state.items():
        while isinstance(k, str) and k.startswith(WRAPPER_PREFIXES):
            k = k.removeprefix("module.").removeprefix("_orig_mod.")
        out[k] = v
    return out


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file into a plain dict, refusing anything that would need unpickling code."""
    if not str(path).strip():
        raise CheckpointError("checkpoint not found: an empty path")
    path = Path(path)
    if path.is_dir():
        hint = next((f"; did you mean {path / n}?" for n in ("best.pt", "last.pt") if (path / n).is_file()), "")
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{path} is an ONNX export: this reads cct checkpoints (.pt, .safetensors); "
                              "`cct predict` takes .onnx files")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path} is an empty file, not a checkpoint")
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return _read_safetensors(path)
    _check_crcs(path, head)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the outcome is what we report
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if re.search(r"GLOBAL|Unsupported global", str(e)):
            raise CheckpointError(f"refusing to load {path}: it contains pickled Python objects, which could run "
                                  "code (only tensors and plain data are accepted)") from None
        raise CheckpointError(f"{path} is not a valid checkpoint (corrupt or not a PyTorch file)") from None
    except Exception as e:  # truncated zip, random bytes, ...
        if "TorchScript" in str(e):
            raise CheckpointError(f"{path} is a TorchScript export, for torch.jit.load: cct reads checkpoints (.pt, "
                                  ".safetensors) and, to predict, .onnx exports") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first if len(first) <= 160 else first[:157] + "..."  # torch's zip reader can write a paragraph
        if head[:2] == b"PK":  # torch.save's zip format
            raise CheckpointError(f"{path} is a damaged or truncated PyTorch checkpoint ({first})") from None
        if head[:1] != b"\x80":  # nor a pickle, the legacy format (protocol 2+)
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither torch.save's zip nor a pickle)") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {first}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a checkpoint or state dict")
    return data


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        return {"state_dict": tensors}
    try:
        return {"format": FORMAT, "version": int(meta.get("version", 1)), "model_name": meta.get("model_name") or None,
                "config": json.loads(meta["config"]), "class_names": json.loads(meta.get("class_names", "null")),
                "state_dict": tensors, **({"config_class": meta["config_class"]} if "config_class" in meta else {}),
                **{k: json.loads(meta[k]) for k in SAFETENSORS_EXTRAS if k in meta}}
    except (KeyError, ValueError) as e:  # damaged or hand-made metadata
        raise CheckpointError(f"{path}: unreadable cct metadata ({type(e).__name__}: {e})") from None
