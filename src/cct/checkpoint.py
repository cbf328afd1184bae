"""Saving and loading: self-describing checkpoints, safe loading, foreign weights.

A cct checkpoint carries the model's config (and which config class it is: `CCTConfig` for image
models, `TextConfig` for text models) and class names beside its weights (as nanoGPT keeps
`model_args`), so `load_checkpoint(path)` rebuilds either kind unaided; a text model's trained
tokenizer travels inside it as a JSON string ("tokenizer") and comes back as `model.tokenizer`.
Nothing is ever unpickled (`cct.safeload`). Writes are atomic (temporary file, fsync, rename), so
a crash or a full disk leaves the previous file intact.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import CCTError, CheckpointError
from .interop.keras import keras_state_dict
from .interop.official import is_official, official_state_dict
from .layers import resize_pos_embed, sinusoidal_embedding
from .model import CCT, CCTConfig
from .safeload import FORMAT, SAFETENSORS_EXTRAS, VERSION, read_checkpoint, state_dict_of, unwrap_keys
from .text_model import TextCCT, TextConfig
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

__all__ = ["adapt_state_dict", "atomic_write", "load_checkpoint", "load_pretrained", "official_state_dict",
           "read_checkpoint", "remove_stale_temporaries", "save_checkpoint"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        _write_in_place(path, write)  # a device or FIFO (/dev/null, /dev/full): renaming over it would replace it
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        above = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
        if above is not None and not above.is_dir():  # mkdir's "File exists" says nothing of which
            raise CheckpointError(f"cannot write {path}: {above} is a file, not a folder") from e
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = _os_error_behind(e)
        if cause is not None:
            raise CheckpointError(f"cannot write {path}: {cause.strerror or cause}") from e
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def check_output(output: str | Path, *inputs: str | Path, flag: str = "--output") -> None:
    """Refuse, before any work, an output path that is a folder or one of the command's own input files, or "-"
    (standard output, which only `cct predict`'s CSV takes: the caller handles it before this check)."""
    if str(output) == "-":
        raise CCTError(f"{flag} - (standard output) is not for this command's binary file: give a file name")
    output = Path(output)
    if output.is_dir():
        raise CCTError(f"cannot write {output}: Is a directory ({flag} takes a file name)")
    if not output.exists():  # the usual case: nothing to compare, however many inputs
        return
    target = output.stat()
    for source in inputs:
        try:
            same = os.path.samestat(target, os.stat(source))
        except OSError:  # an input that is not there: its own error comes later
            same = False
        if same:
            raise CCTError(f"{flag} {output} is {source}, an input of this command: it would be overwritten")


def _os_error_behind(e: BaseException) -> OSError | None:
    """The OSError an exception was raised while handling, if any: `torch.save`'s zip writer turns a full disk's
    OSError into a RuntimeError ("unexpected pos ...") as it closes."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _write_in_place(path: Path, write: Callable[[Any], None]) -> None:
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
    except Exception as e:
        cause = _os_error_behind(e)
        if cause is None:
            raise
        raise CheckpointError(f"cannot write {path}: {cause.strerror or cause}") from e


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files `atomic_write` left beside `names` in `folder` when a process died mid-write.

    Only call this where no other process is writing those files (e.g. when a run starts)."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{glob.escape(name)}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


# the model class of each config class, by the name a checkpoint stores under "config_class"
MODEL_CLASSES: dict[str, tuple[type, type[nn.Module]]] = {"CCTConfig": (CCTConfig, CCT),
                                                          "TextConfig": (TextConfig, TextCCT)}


def _model_entries(model: nn.Module) -> dict:
    """What identifies the model: its config and config class, and a text model's tokenizer (JSON)."""
    entries = {"config_class": type(model.cfg).__name__}
    assert entries["config_class"] in MODEL_CLASSES, f"cannot save a model configured by {entries['config_class']}"
    if isinstance(model, TextCCT) and model.tokenizer is not None:
        entries["tokenizer"] = model.tokenizer.to_json()
    return entries


def checkpoint_dict(model: CCT | TextCCT, **extra: Any) -> dict:
    """The plain-data dict stored in a `.pt` checkpoint (only tensors, numbers, strings, lists, dicts)."""
    return {"format": FORMAT, "version": VERSION, "model_name": getattr(model, "name", None),
            "config": model.cfg.to_dict(), **_model_entries(model), "class_names": model.class_names,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}


def save_checkpoint(model: CCT | TextCCT, path: str | Path, *, format: str | None = None, **extra: Any) -> Path:
    """Write `model` (weights, config, class names) to `path` atomically.

    Args:
        model: a model built by `cct.create_model` or `cct.load_checkpoint` (image or text).
        path: destination file.
        format: "pt" (default, or inferred from a `.safetensors` suffix) or "safetensors".
        **extra: further plain data to store in a `.pt` checkpoint (optimizer state, epoch, ...); a
            safetensors file keeps only the evaluation settings (`eval`) among them.
    """
    path = Path(path)
    format = format or ("safetensors" if path.suffix == ".safetensors" else "pt")
    assert format in ("pt", "safetensors"), f"format must be 'pt' or 'safetensors', got {format!r}"
    if format == "pt":
        data = checkpoint_dict(model, **extra)
        atomic_write(path, lambda f: torch.save(data, f))
        return path
    from safetensors.torch import save
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    entries = _model_entries(model)
    extra = {**extra, **({"tokenizer": entries["tokenizer"]} if "tokenizer" in entries else {})}
    meta = {"format": FORMAT, "version": str(VERSION), "model_name": getattr(model, "name", None) or "",
            "config": json.dumps(model.cfg.to_dict()), "config_class": entries["config_class"],
            "class_names": json.dumps(model.class_names),
            **{k: json.dumps(v) for k, v in extra.items() if k in SAFETENSORS_EXTRAS}}
    payload = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(payload))
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> CCT | TextCCT:
    """Rebuild a model from a cct checkpoint (`.pt` or `.safetensors`) without being told its name.

    The returned model is in eval mode; `model.class_names` holds the class names when known. A text
    model (`TextCCT`, `model.cfg` a `TextConfig`) comes with its tokenizer: `model.tokenizer`.
    """
    return model_from_checkpoint(read_checkpoint(path), path, map_location=map_location)


def model_from_checkpoint(data: dict, path: str | Path, *, map_location: str | torch.device = "cpu") -> CCT | TextCCT:
    """`load_checkpoint` on the dict `read_checkpoint(path)` returned, for callers that read other entries too."""
    if data.get("format") != FORMAT or "config" not in data:
        raise CheckpointError(f"{path} is not a cct checkpoint (no model config); to load foreign weights use "
                              "cct.create_model(name, pretrained=path)")
    config_class = data.get("config_class", "CCTConfig")  # checkpoints before text models: image ones
    if config_class not in MODEL_CLASSES:
        raise CheckpointError(f"{path}: unknown model config class {config_class!r}")
    config_type, model_type = MODEL_CLASSES[config_class]
    cfg = _recorded_config(data, config_type, path)
    try:
        model = model_type(cfg)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise _invalid_config(path, e) from None
    model.name = data.get("model_name")
    _load_state(model, data["state_dict"], path)
    model.class_names = list(data["class_names"]) if data.get("class_names") else None
    if isinstance(model, TextCCT):
        if not isinstance(data.get("tokenizer"), str):
            raise CheckpointError(f"{path}: a text model checkpoint without its tokenizer")
        model.tokenizer = TextTokenizer.from_json(data["tokenizer"])
        if model.tokenizer.seq_len is None:  # so that `model(*model.tokenizer.encode(texts))` fits the model
            model.tokenizer.seq_len = model.cfg.seq_len
    return model.to(map_location).eval()


def _invalid_config(path: str | Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: invalid model config: {str(e) or 'a value is out of range'}")


def _recorded_config(data: dict, config_type: type, path: str | Path) -> CCTConfig | TextConfig:
    """The model config a cct checkpoint records, and the entries loaders index into, checked: a damaged or crafted
    file is a `CheckpointError` naming it."""
    try:
        cfg = config_type.from_dict(dict(data.get("config") or {}))
        _check_fields(data, cfg, path)
    except CheckpointError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise _invalid_config(path, e) from None
    return cfg


def _check_fields(data: dict, cfg: CCTConfig | TextConfig, path: str | Path) -> None:
    """The entries that loaders and `cct eval`/`predict` index into, so a damaged or crafted file is a clear error."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{path} is not a valid cct checkpoint: {what}")
    state = data.get("state_dict")
    need(isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()),
         "no state_dict of named tensors")
    names = data.get("class_names")
    need(names is None or (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)),
         "class_names is not a list of names")
    settings = data.get("eval")
    need(settings is None or isinstance(settings, dict), "its eval settings are not a dict")
    if isinstance(cfg, TextConfig):
        return
    for key in ("mean", "std"):
        value = (settings or {}).get(key)
        need(value is None or (isinstance(value, (list, tuple)) and len(value) == cfg.in_chans
                               and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)),
             f"eval {key} is not {cfg.in_chans} numbers")


def _load_state(model: nn.Module, state: dict, path: str | Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path}: weights do not fit the model: {detail[:300]}") from None


def require_classifier(num_classes: int, path: str | Path) -> None:
    """A model without a classifier (`num_classes` 0: a feature extractor) has no classes to give."""
    if num_classes == 0:
        raise CheckpointError(f"{path} has no classifier (num_classes 0: a feature extractor); give it one with "
                              "reset_classifier(n) and train it, or take its features from Python")


# ---------------------------------------------------------------------- foreign weights (filters in cct.interop)
def _fit_head(model: CCT, state: dict, source_classes: list | None, class_names: list | None) -> str | None:
    """Keep, reorder or replace the head of `state` for `model`; what was done, said in a line (None: kept as is)."""
    head_w, n = state.get("head.weight"), model.num_classes

    def fresh() -> None:  # the model's own new head
        state["head.weight"], state["head.bias"] = model.head.weight.detach().clone(), model.head.bias.detach().clone()

    if head_w is None or head_w.shape != model.head.weight.shape:
        fresh()  # fine-tuning (or no head given)
        return (f"head: new, {n} classes (the weights have none)" if head_w is None else
                f"head: new, {n} classes (the weights' head has {head_w.shape[0]})")
    if not source_classes or not class_names or list(source_classes) == list(class_names):
        return None if source_classes else f"head: kept, {n} classes (the weights do not name theirs)"
    if sorted(source_classes) == sorted(class_names) and len(set(class_names)) == len(class_names):
        order = [list(source_classes).index(c) for c in class_names]  # the same classes, in another order
        state["head.weight"], state["head.bias"] = state["head.weight"][order], state["head.bias"][order]
        return "head: kept, its rows put in the data's class order"
    fresh()  # as many classes, but others: their rows mean nothing
    return f"head: new, {n} classes (the weights' {len(source_classes)} are others: " \
           f"{', '.join(map(str, source_classes[:4]))}{', ...' if len(source_classes) > 4 else ''})"


def adapt_state_dict(model: CCT, state: dict[str, torch.Tensor], *, source_grid: tuple[int, int] | None = None,
                     source_prefix: int | None = None, source_classes: list | None = None,
                     class_names: list | None = None, notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Fit foreign weights to `model`: resize the positional embedding to the model's token grid (the source's grid
    and class-token rows when known, as a cct checkpoint's config says; else a square grid and the model's rows),
    re-initialise a head of another size (or, when both name their classes, of other classes; the same classes in
    another order have their rows reordered). A line per change is appended to `notes`."""
    state, notes = dict(state), notes if notes is not None else []
    pe = state.get("pos_embed")
    if pe is not None and model.pos_embed is not None and (
            pe.shape != model.pos_embed.shape or (source_grid and tuple(source_grid) != tuple(model.grid))):
        prefix = model.num_prefix_tokens if source_prefix is None else source_prefix
        n = pe.shape[1] - prefix
        side = math.isqrt(n)
        old_grid = source_grid or (side, side)
        if old_grid[0] * old_grid[1] != n:
            raise CheckpointError(f"its positional embedding has {n} tokens, not a square grid, and plain weights do "
                                  "not say their grid: load them at their own image size, or from a cct checkpoint")
        rows = pe[:, :prefix] if prefix == model.num_prefix_tokens else model.pos_embed[:, :model.num_prefix_tokens]
        state["pos_embed"] = torch.cat([rows.detach(), resize_pos_embed(pe[:, prefix:], old_grid, model.grid)], 1)
        notes.append(f"positional embedding: interpolated from a {old_grid[0]}x{old_grid[1]} token grid to "
                     f"{model.grid[0]}x{model.grid[1]}")
    if pe is None and isinstance(model.pos_embed, nn.Parameter):  # from weights without a learnable one: fresh
        state["pos_embed"] = model.pos_embed.detach().clone()
        notes.append("positional embedding: new (the weights have no learnable one)")
    if isinstance(model.head, nn.Linear):
        note = _fit_head(model, state, source_classes, class_names)
        notes += [note] if note else []
    else:  # a model without a classifier takes none
        state.pop("head.weight", None), state.pop("head.bias", None)
    return state


def _own_keys(state: dict, model: CCT) -> bool:
    """Whether `state` is a plain state dict of a cct model like `model` (its keys, DDP's `module.` and
    torch.compile's `_orig_mod.` aside, are the model's own; a head or positional embedding may be missing or extra)."""
    keys = set(unwrap_keys(state))
    core = {k for k in model.state_dict() if not k.startswith(("head.", "pos_embed"))}
    return bool(core) and core <= keys and keys <= core | {"head.weight", "head.bias", "pos_embed"}


def _unrecognised(path: Path, state: object, model: CCT) -> CheckpointError:
    keys, own = set(unwrap_keys(state)) if isinstance(state, dict) else set(), set(model.state_dict())
    if len(keys & own) <= min(len(keys), len(own)) // 2:  # not mostly a cct model's keys
        return CheckpointError(f"{path}: unrecognised weights (neither a cct checkpoint or state dict nor an "
                               "official Compact-Transformers state dict)")
    missing, extra = sorted(own - keys), sorted(keys - own - {"head.weight", "head.bias", "pos_embed"})
    return CheckpointError(f"{path}: a state dict of another model than {getattr(model, 'name', None) or 'this one'} "
                           f"({len(missing)} of its tensors missing, e.g. {', '.join(missing[:2]) or '-'}; "
                           f"{len(extra)} unknown, e.g. {', '.join(extra[:2]) or '-'}): check the model name (--model)")


def load_pretrained(model: CCT, path: str | Path, *, class_names: list | None = None,
                    notes: list[str] | None = None) -> CCT:
    """Load weights into `model` from a cct checkpoint, an official `.pth` or a Keras `.weights.h5`.

    `class_names`: the classes the model is for; when the weights name theirs too (a cct checkpoint), a head of other
    classes starts fresh and one of the same classes in another order is reordered. `notes` collects a line for each
    thing adapted (head, positional embedding), which `cct train` prints.
    """
    path = Path(path)
    source = {}  # what a cct checkpoint says of the model its weights come from
    source_name = None
    if path.suffix == ".h5" or path.name.endswith(".weights.h5"):
        state = keras_state_dict(path)
    else:
        data = read_checkpoint(path)
        if data.get("format") == FORMAT:
            if data.get("config_class", "CCTConfig") != "CCTConfig":
                raise CheckpointError(f"{path} is a text model's checkpoint ({data.get('model_name') or 'text'}): "
                                      f"its weights do not fit the image model {getattr(model, 'name', '')}".rstrip())
            src = _recorded_config(data, CCTConfig, path)
            state, source_name = data["state_dict"], data.get("model_name")
            source = dict(source_grid=type(model.tokenizer)(src).grid(src.img_size),
                          source_prefix=1 if src.pooling == "cls" else 0, source_classes=data.get("class_names") or None)
        else:
            state = state_dict_of(data)
            if isinstance(state, dict) and _own_keys(state, model):  # `torch.save(model.state_dict())` of a cct model
                state = unwrap_keys(state)
            elif isinstance(state, dict) and is_official(state):
                state = official_state_dict(state)
            else:
                raise _unrecognised(path, state, model)
    if model.pos_embed is None and "pos_embed" in state:  # a sine or no embedding: nothing to load into
        state = dict(state)
        pe = state.pop("pos_embed")
        if not torch.allclose(pe[:1].float(), sinusoidal_embedding(pe.shape[1], pe.shape[2]), atol=1e-4):
            log.warning("%s: its positional embedding is learned (as the official `_sine` factories build theirs); "
                        "%s has %s, so it is left out", path, getattr(model, "name", "this model"),
                        "a fixed sine one" if model.cfg.positional_embedding == "sine" else "none")
    try:
        state = adapt_state_dict(model, state, **source, class_names=class_names, notes=notes)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        _load_state(model, state, path)
    except CheckpointError:
        if source_name and source_name != getattr(model, "name", None):
            raise CheckpointError(f"{path} holds the model {source_name}, whose weights do not fit "
                                  f"{getattr(model, 'name', None) or 'this one'} (give --model {source_name}, or "
                                  "leave --model out)") from None
        raise
    return model
