"""Resuming a run from its last.pt: the position, the running sums and every random stream.

An interrupted run, resumed, ends exactly as an uninterrupted one would: last.pt keeps the epoch's
shuffling seed (`data_epoch_start`), the batch index, the step's running sums, and the state of
every generator: torch's (dropout, drop path), the data order's and the augmentation's. With several
processes it keeps each rank's own streams (`rng["ranks"]`) and the running sums of all ranks, so
that a run resumed with the same number of processes continues exactly; with another number, rank
0 keeps the recorded streams and the other ranks start fresh ones.

The keys of last.pt (`train_config`, `resolved_config`, `eval`, `optimizer`, `step_state`,
`train_state`, `rng`, `history`) are a format: runs started by earlier versions must resume.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .checkpoint import read_checkpoint
from .errors import CCTError, CheckpointError
from .holdout import class_difference
from .recipes import TrainConfig
from .runfiles import log
from .step import TrainStep


def resume_config(out: str | Path, **overrides) -> TrainConfig:
    """The configuration of the run in `out`, from its last.pt, with `data`/`device`/`workers` overrides."""
    path = Path(out) / "last.pt"
    overrides = {k: v for k, v in overrides.items() if k != "quiet"}
    if not path.is_file() and (Path(out) / "config.json").is_file():  # stopped before its first last.pt
        try:
            cfg = TrainConfig.from_dict(json.loads((Path(out) / "config.json").read_text()))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"nothing to resume: no {path}, and {Path(out) / 'config.json'} is unreadable "
                                  f"({e})") from None
        return replace(cfg, out=str(out), **overrides)
    if not path.is_file():
        raise CCTError(f"nothing to resume: {path} not found")
    checkpoint = read_checkpoint(path)
    if "train_config" not in checkpoint or "train_state" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint (no train_config/train_state)")
    cfg = TrainConfig.from_dict(checkpoint["train_config"])
    return replace(cfg, out=str(out), **overrides)


def read_last(out: Path, *, resume: bool, quiet: bool, data: str | None = None) -> dict | None:
    """The contents of `out`/last.pt when resuming; None to start a fresh run.

    A run that stopped before its first last.pt (only config.json exists) starts again; a fresh run
    refuses a folder that already holds one, or a best.pt, or that lies inside the `data` folder.
    """
    path = out / "last.pt"
    if resume and not path.is_file() and (out / "config.json").is_file():
        log(quiet, f"{out} has no last.pt (the run stopped before its first epoch ended): starting it again")
        return None
    if resume:
        return read_checkpoint(path)
    if path.exists():
        raise CCTError(f"{out} already holds a run (last.pt): continue it with `cct train --resume {out}`, "
                       "or choose another --out")
    if (out / "best.pt").exists():  # weights a run would replace (copied there, or the --pretrained source itself)
        raise CCTError(f"{out} already holds weights (best.pt) that a run would overwrite: choose another --out")
    if data and Path(data).is_dir() and Path(data).resolve() in out.resolve().parents:
        raise CCTError(f"--out {out} is inside --data {data}: the run's own files (curves.png, ...) would be read as "
                       "data, a class of their own, by the next run on it; choose a folder outside it")
    return None


def is_finished(checkpoint: dict, out: Path) -> bool:
    """Whether last.pt is the end of the run and its results.json is written."""
    return bool(checkpoint.get("train_state", {}).get("finished")) and (out / "results.json").is_file()


# ---------------------------------------------------------------------- random streams
def rng_state(data_epoch_state: torch.Tensor, data_gen: torch.Generator, aug_gen: torch.Generator) -> dict:
    """This process's generators, as last.pt's "rng" records them (rank 0's, with several processes)."""
    state = {"torch": torch.get_rng_state(), "data_epoch_start": data_epoch_state, "data": data_gen.get_state(),
             "augment": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_rng_state(aug_gen: torch.Generator) -> dict:
    """This rank's own random streams (augmentation, dropout), gathered into rank 0's `last.pt`."""
    state = {"torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rank_rng(rng: dict, aug_gen: torch.Generator, *, seed: int, rank: int, world_size: int,
                     step: int) -> None:
    """Each rank's streams from `last.pt`; with another number of processes, fresh ones for ranks > 0."""
    ranks = rng.get("ranks") or []
    if len(ranks) == world_size:
        mine = ranks[rank]
        aug_gen.set_state(mine["augment"])
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])
    elif rank > 0:  # rank 0 keeps the recorded streams; the others must not replay the start of the run
        aug_gen.manual_seed(distributed.rank_seed(seed + 2, rank) + step)
        torch.manual_seed(distributed.rank_seed(seed, rank) + step)


# ---------------------------------------------------------------------- last.pt
def last_state(step: TrainStep, *, data_epoch_state: torch.Tensor, data_gen: torch.Generator,
               aug_gen: torch.Generator, world_size: int) -> tuple[dict, dict]:
    """(step_state, rng) for last.pt. With several processes: the running sums of all ranks and each rank's
    own streams, gathered (every rank must call this)."""
    step_state, rng = step.state_dict(), rng_state(data_epoch_state, data_gen, aug_gen)
    if world_size > 1:
        loss_sum, correct, seen = step.sums()
        step_state.update(loss_sum=loss_sum, correct=correct.long(), seen=seen.long())
        rng["ranks"] = distributed.all_gather_object(rank_rng_state(aug_gen))
    return step_state, rng


def restore(checkpoint: dict, path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, step: TrainStep,
            data_gen: torch.Generator, aug_gen: torch.Generator, seed: int, rank: int,
            world_size: int, classes: list[str] | None = None) -> tuple[dict, list[dict], torch.Tensor]:
    """Put the run back where last.pt left it; returns (train_state, history, the epoch's data generator state).

    History rows past the checkpoint's epoch (written after it by a run that then died) are dropped. `classes`:
    the data's, which must be the run's (a `--data` given to the resume must hold the same classes).
    """
    saved = checkpoint.get("class_names")
    if classes is not None and saved and list(saved) != list(classes):
        raise CheckpointError(f"{path}: the run trained on {len(saved)} classes and the data given holds "
                              f"{len(classes)}, not the same: {class_difference(list(saved), list(classes))}")
    try:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step.load_state_dict(checkpoint["step_state"])
    except (KeyError, RuntimeError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines or [type(e).__name__])[0]
        raise CheckpointError(f"{path} does not match this run: {detail[:200]}") from None
    state = dict(checkpoint["train_state"])
    history = [dict(r) for r in checkpoint["history"] if r["epoch"] <= state["epoch"]]
    rng = checkpoint["rng"]
    data_gen.set_state(rng["data"])
    aug_gen.set_state(rng["augment"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if world_size > 1:
        restore_rank_rng(rng, aug_gen, seed=seed, rank=rank, world_size=world_size, step=state["step"])
        if rank:  # last.pt holds the running sums of all ranks, restored on rank 0 only
            step.reset_totals()
    return state, history, rng["data_epoch_start"]
