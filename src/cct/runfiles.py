"""What a training run writes beside its checkpoints: history.csv, config.json, results.json, curves.png.

Every file is written atomically (`cct.checkpoint.atomic_write`), so a run killed mid-write leaves
the previous version whole. The formats are read by other tools and by runs resumed later: the
columns of history.csv and the keys of results.json only ever grow.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from .checkpoint import atomic_write, remove_stale_temporaries
from .plots import plot_curves
from .kinds import RunInputs, TextPreprocessing
from .preprocess import Preprocessing
from .recipes import TrainConfig
from .runtime import processor_name

OUTPUT_FILES = ("last.pt", "best.pt", "history.csv", "config.json", "results.json", "curves.png", "split.json")
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "seconds")


def log(quiet: bool, *parts) -> None:
    """A line on stderr for the user (progress and summaries; stdout stays for data)."""
    if not quiet:
        print(*parts, file=sys.stderr, flush=True)


def progress_bar(quiet: bool, epoch: int, total_epochs: int, n_examples: int, done: int, *,
                 kind: str = "image") -> tqdm | None:
    """The epoch's progress bar on stderr (None when quiet; disabled off a terminal), counting images or texts."""
    if quiet:
        return None
    unit = "text" if kind == "text" else "img"
    # disable=None: no bar when stderr is not a terminal, so a redirected log gets no carriage-return redraws
    return tqdm(total=n_examples, initial=done, desc=f"epoch {epoch + 1}/{total_epochs}", unit=unit,
                file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5, disable=None)


# ---------------------------------------------------------------------- history.csv
def history_row(epoch: int, *, lr: float, train_loss: float, train_top1: float, val: dict | None,
                seconds: float) -> dict:
    """One epoch's row of history.csv (and of last.pt's "history")."""
    return {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_top1": train_top1,
            "val_loss": val["loss"] if val else None, "val_top1": val["top1"] if val else None,
            "val_top5": val["top5"] if val else None, "seconds": seconds}


def _history_line(row: dict) -> list[str]:
    def num(v, spec):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
    return [str(row["epoch"]), num(row["lr"], ".6g"), num(row["train_loss"], ".6f"), num(row["train_top1"], ".6f"),
            num(row["val_loss"], ".6f"), num(row["val_top1"], ".6f"), num(row["val_top5"], ".6f"),
            num(row["seconds"], ".2f")]


def write_history(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    writer.writerows(_history_line(r) for r in rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_curves(history: list[dict], path: Path) -> None:
    """curves.png: the Keras example's loss and accuracy plot."""
    plot_curves(history, path)


def epoch_line(row: dict, total_epochs: int, skipped: int, num_classes: int = 5) -> str:
    """The line logged at each epoch's end (top-k with k = 5, or the class count when smaller, as `cct eval` says)."""
    line = (f"epoch {row['epoch']}/{total_epochs}: lr {row['lr']:.3g}, train loss {row['train_loss']:.4f}, "
            f"top-1 {row['train_top1']:.4f}")
    if row["val_top1"] is not None:
        line += (f"; val loss {row['val_loss']:.4f}, top-1 {row['val_top1']:.4f}, "
                 f"top-{min(5, num_classes)} {row['val_top5']:.4f}")
    line += f"; {row['seconds']:.1f}s"
    return line + (f"; {skipped} non-finite steps skipped" if skipped else "")


# ---------------------------------------------------------------------- config.json, results.json
def write_json(path: Path, obj: dict) -> None:
    """`obj` as strict JSON (a non-finite number, a NaN loss say, is written as null), atomically."""
    text = json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def clear_leftovers(out: Path, *, fresh: bool) -> None:
    """What writes cut short by a kill left in `out` (never read, but they take space); for a fresh run, an older
    run's results.json too, which a later `--resume` would take for this run's ("already finished")."""
    remove_stale_temporaries(out, OUTPUT_FILES)
    if fresh:
        (out / "results.json").unlink(missing_ok=True)


def write_record(path: Path, record: dict | None) -> None:
    """`record` as `write_json`, or, for a run without one, no file: an older run's left in --out would name
    a split this run did not use."""
    if record:
        write_json(path, record)
    else:
        path.unlink(missing_ok=True)


def nonfinite_advice(out: Path, precision: str) -> str:
    """The end of the message of a run stopped by a non-finite loss: where it can resume from, what to try."""
    saved = (out / "last.pt").is_file()
    return (f" — the last good checkpoint is {out / 'last.pt'}" if saved else " (no epoch had ended: nothing to resume)") \
        + "; try a lower --lr" + (", --precision fp32" if precision != "fp32" else "") + " or --skip-nonfinite"


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def resolved_config(cfg: TrainConfig, *, precision: str, device: str, world_size: int, total_steps: int,
                    steps_per_epoch: int, num_classes: int, prep: Preprocessing | TextPreprocessing) -> dict:
    """The contents of config.json: the configuration, and what the run resolved of it."""
    if isinstance(prep, TextPreprocessing):
        inputs = {"seq_len_resolved": prep.seq_len}
    else:
        inputs = {"in_chans": prep.in_chans, "img_size_resolved": list(prep.img_size),
                  "mean": list(prep.mean) if prep.mean else None, "std": list(prep.std) if prep.std else None}
    return {**cfg.to_dict(), "precision_resolved": precision, "device_resolved": device,
            "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "num_classes": num_classes,
            **inputs, "world_size": world_size}


def brief(metrics: dict | None) -> dict | None:
    """The metrics best.pt records of its epoch's validation."""
    return None if metrics is None else {k: metrics[k] for k in ("top1", "top5", "loss")}


def results(cfg: TrainConfig, *, state: dict, test: dict | None, params: int, inputs: RunInputs, train_images: int,
            val_images: int | None, skipped_steps: int, precision: str, world_size: int, device: str,
            train_macs: int | None = None) -> dict:
    """The contents of results.json. `val_images` is None for a run without a validation split.

    Machine-independent figures, to compare runs on different computers: `train_images_seen` and
    `train_tflop`, forward + backward (taken as 3 forward passes, 2 FLOPs a multiply-accumulate) of
    every example trained on, at the resolution trained (`train_macs`: their forward multiply-accumulates);
    beside them the processor and whether bf16 was used.
    """
    split = inputs.split_record
    validated = val_images is not None
    return {
        "model": cfg.model, "recipe": cfg.recipe, "params": params, "epochs": state["epoch"],
        "steps": state["step"], "test_top1": test["top1"] if test else None, "test_top5": test["top5"] if test else None,
        "test_loss": test["loss"] if test else None, "test_images": len(inputs.test_set) if test else 0,
        "best_epoch": state["best_epoch"], "best_val_top1": state["best_top1"] if validated else None,
        "weights": "best" if cfg.restore_best and validated and (Path(cfg.out) / "best.pt").is_file() else "last",
        "train_seconds": round(state["train_seconds"], 2),
        "images_per_second": round(state["images"] / max(state["train_seconds"], 1e-9), 1),
        "train_images": train_images, "val_images": val_images or 0,
        "data": cfg.data, "classes": list(inputs.classes), "skipped_images": inputs.skipped,
        "skipped_steps": skipped_steps, "precision": precision, "seed": cfg.seed, "world_size": world_size,
        "device": device, "processor": processor_name(device), "bf16": precision == "bf16",
        "train_images_seen": state["images"],
        "train_tflop": round(6 * train_macs / 1e12, 3) if train_macs else None,
        # class folders and CSVs: the recorded test split (its files are listed in split.json)
        "test_split": {"seed": split["seed"], "fraction": split["fraction"], "files": "split.json"} if split else None,
        "kind": inputs.kind, **inputs.results,
    }


def done_line(r: dict, out: Path) -> str:
    """The line logged when a run ends."""
    unit = "texts" if r.get("kind") == "text" else "images"  # results.json's key says images for both kinds
    # a run that validated but tests its last weights: best.pt is then another epoch than the one tested
    other = r["test_top1"] is not None and r["weights"] == "last" and r["val_images"] and r["best_epoch"] != r["epochs"]
    return (f"done: {r['epochs']} epochs in {r['train_seconds']:.0f}s ({r['images_per_second']:.0f} {unit}/s)"
            + (f"; test top-1 {r['test_top1']:.4f}, top-{min(5, len(r['classes']))} {r['test_top5']:.4f}"
               if r["test_top1"] is not None else "")
            + (f" of the last epoch's weights (last.pt; best.pt holds epoch {r['best_epoch']}'s, the best on "
               "validation: --restore-best tests those)" if other else "")
            + f"; outputs in {out}")
