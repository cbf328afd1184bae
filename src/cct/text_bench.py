"""Throughput of the text models — `cct bench --model text_cct_2`: training and inference sequences/s.

Batches are random token ids of `length` (default: the model's `seq_len`) with random lengths from 1 to
`length` padded with [PAD] and masked, as a batch of real texts is (`--fixed-length`: every sequence
full, no padding, as the official code can only run). A timed training step is forward with dropout
on → label-smoothed cross entropy → backward → AdamW step (fused where the device has it, the
parameter groups of `cct.step.param_groups`); a timed inference step is a forward in eval mode after
`cct.kernels.fuse`. Each rate is the median of timed windows after warm-up steps, as `cct.bench` times
images, and the result has the same keys with "sequences" for "images".

That plain step is the one `benchmarks/compare_official.py` sets beside the official code's. With a recipe
(`cct bench --model text_cct_2 --recipe text`) the timed step is what `cct train` runs per batch instead
(`cct.step.make_train_step`: the recipe's optimiser, word mixup, FGM, whose second pass doubles the cost, and
VAT where the recipe has it, two passes more),
on the model as the recipe builds it (its kernel size and word-vector scale), at the recipe's precision and
threads unless `precision` / `threads` say otherwise. Precision "auto" is settled as `cct train` settles it
for a text model: on a CPU with native bf16, by a trial of a few steps in each (`cct.text_run.trial_precision`).

The embedding table is most of the parameters (vocab_size × 300), and AdamW updates all of it every
step, so the vocabulary size matters: the default is the model's (100,000, the official `Embedder`'s),
`vocab_size` sets another (a word-level TREC vocabulary has about 9,000 words).
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from . import recipes
from .bench import gemm_peak_gflops, peak_memory_mb, timed_windows
from .kernels import fuse, use_kernels
from .kinds import TokenBatch
from .model import num_params
from .runtime import autocast, configure_threads, cpu_supports_bf16, resolve_device, resolve_precision, tune_allocator
from .step import make_optimizer, make_train_step, param_groups, text_augment_config
from .text_model import TEXT_VARIANTS, TextCCT, create_text_model
from .text_run import recipe_model_overrides, settled_by_trial, trial_precision

LABEL_SMOOTHING = 0.1
POOL = 8  # distinct batches, cycled, so no step sees a cached input


def is_text_model(name: str) -> bool:
    return name in TEXT_VARIANTS


def count_text_macs(model: TextCCT, length: int) -> int:
    """Multiply-accumulates of one forward pass of a `length`-token sequence (conv, linears, attention),
    counted on a reference copy of the same config (with a 2-word vocabulary: a lookup multiplies nothing)."""
    reference = TextCCT(replace(model.cfg, vocab_size=2)).eval()
    macs = 0

    def hook(m, inp, out):
        nonlocal macs
        if isinstance(m, nn.Conv2d):
            macs += out.numel() // out.shape[0] * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        else:
            macs += out.numel() // out.shape[0] * m.in_features

    for m in reference.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    ids = torch.zeros(1, length, dtype=torch.long)
    with torch.no_grad():
        features, _ = reference.forward_features(ids, torch.ones(1, length, dtype=torch.bool))
        reference.forward_head(features)
    tokens = features.shape[1]
    for blk in reference.blocks:  # q·k and attn·v: 2 × tokens² × width
        macs += 2 * tokens * tokens * blk.attn.num_heads * blk.attn.head_dim
    return macs


def random_batches(count: int, batch: int, length: int, vocab_size: int, *, fixed_length: bool,
                   generator: torch.Generator, padding_idx: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` batches of token ids (count, batch, length) and masks: random lengths 1..length, padded with
    `padding_idx`, or all full with `fixed_length`."""
    ids = torch.randint(2, vocab_size, (count, batch, length), generator=generator)
    if fixed_length:
        return ids, torch.ones(count, batch, length, dtype=torch.bool)
    lengths = torch.randint(1, length + 1, (count, batch, 1), generator=generator)
    mask = torch.arange(length) < lengths
    return ids.masked_fill(~mask, padding_idx), mask


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def benchmark_text(model: str = "text_cct_2", *, batch_size: int = 128, infer_batch_size: int = 256,
                   precision: str = "auto", steps: int = 10, windows: int = 5, warmup: int = 10,
                   length: int | None = None, fixed_length: bool = False, vocab_size: int | None = None,
                   num_classes: int = 6, device: str = "auto", threads: int | None = None, train: bool = True,
                   infer: bool = True, peak: bool = True, seed: int = 0, quiet: bool = True,
                   kernels: str = "fast", recipe: str | None = None) -> dict:
    """Training and inference throughput of a text model on random token ids.

    Args:
        model: a text model name (`cct.text_model.TEXT_VARIANTS`).
        batch_size, infer_batch_size: sequences per training and inference step.
        precision: "auto" (on a CPU with native bf16, the faster of bf16 and fp32 in a trial of a few steps,
            as `cct train` decides for a text model; elsewhere fp32), "fp32", "bf16".
        steps, windows, warmup: steps per timed window, windows (the median is reported), untimed steps.
        length: tokens per padded sequence (default: the model's seq_len).
        fixed_length: every sequence `length` real tokens (no padding), else random lengths, padded.
        vocab_size: the embedding's rows (default: the model's).
        num_classes: classes of the head.
        device, threads, seed, quiet, kernels: as `cct.bench.benchmark`.
        recipe: None times the plain step (see the module docstring); a recipe name times `cct train`'s step
            for it, with "auto" precision and unset threads taken from the recipe.
    Returns:
        a dict with `train_sequences_per_second`, `infer_sequences_per_second`, GFLOP/s, share of the
        measured GEMM peak, peak memory and the settings.
    """
    if not is_text_model(model):
        raise ValueError(f"{model!r} is not a text model (known: {', '.join(sorted(TEXT_VARIANTS))})")
    overrides = {"num_classes": num_classes, **({"vocab_size": vocab_size} if vocab_size else {})}
    cfg = recipes.make_config(model, "", "", recipe=recipe, batch_size=batch_size) if recipe else None
    if cfg is not None:  # as `cct train` runs this recipe
        precision = cfg.precision if precision == "auto" else precision
        threads = threads or cfg.workers or None
        overrides.update(recipe_model_overrides(cfg), **recipes.drop_rates(cfg))  # as `cct train` builds it
    threads = configure_threads(threads)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    torch.manual_seed(seed)
    net = use_kernels(create_text_model(model, **overrides), kernels).to(dev)
    length = net.cfg.seq_len if length is None else length
    if length < 1:
        raise ValueError(f"--seq-len must be at least 1, got {length}")
    macs = count_text_macs(net, length)
    trial = None
    if settled_by_trial(precision, prec, dev):  # as `cct train` settles it
        t = torch.Generator().manual_seed(seed)  # its own, so the timed batches stay those of a fixed precision
        ids, mask = random_batches(1, batch_size, length, net.cfg.vocab_size, fixed_length=fixed_length, generator=t,
                                   padding_idx=net.cfg.padding_idx)
        prec, trial = trial_precision(model, overrides, TokenBatch(ids[0], mask[0]),
                                      torch.randint(0, num_classes, (batch_size,), generator=t), kernels=kernels)
    g = torch.Generator().manual_seed(seed)
    result: dict = {
        "model": model, "params": num_params(net), "gflops_per_sequence_forward": round(2 * macs / 1e9, 5),
        "precision": prec, "device": str(dev), "threads": threads, "batch_size": batch_size,
        "infer_batch_size": infer_batch_size, "steps_per_window": steps, "windows": windows, "warmup": warmup,
        "seq_len": length, "fixed_length": fixed_length, "vocab_size": net.cfg.vocab_size,
        "torch": torch.__version__, "cpu_bf16": cpu_supports_bf16(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "allocator_tuned": tune_allocator(), "procs": 1, "kernels": kernels,
        "recipe": recipe, "precision_trial_ms": trial and {k: round(v, 1) for k, v in trial.items()},
    }
    batches = dict(fixed_length=fixed_length, generator=g, padding_idx=net.cfg.padding_idx)

    if train:
        ids, mask = random_batches(POOL, batch_size, length, net.cfg.vocab_size, **batches)
        labels = torch.randint(0, num_classes, (POOL, batch_size), generator=g)
        net.train()
        counter = iter(range(1 << 62))
        passes = 1  # forward + backward passes a step makes
        if cfg is None:
            groups = param_groups(net, 0.05, False)
            optimizer = torch.optim.AdamW(groups, lr=1e-6, fused=dev.type in ("cpu", "cuda"))  # tiny lr: random data
            ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)

            def train_step() -> None:
                i = next(counter) % POOL
                with autocast(prec, dev):
                    logits = net(ids[i], mask[i])
                F.cross_entropy(logits.float(), labels[i], label_smoothing=LABEL_SMOOTHING).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            optimizer = make_optimizer(net, cfg, precision=prec)
            step = make_train_step(net, optimizer, text_augment_config(cfg), precision=prec, device=dev, label_smoothing=cfg.label_smoothing,
                                   num_classes=num_classes, generator=torch.Generator().manual_seed(seed + 1))
            passes = 1 + bool(cfg.fgm) + 2 * bool(cfg.vat)  # VAT: its probe, then its own pass

            def train_step() -> None:
                i = next(counter) % POOL
                step(TokenBatch(ids[i], mask[i]), labels[i], cfg.lr * 1e-3)  # a small lr: random data

        _log(quiet, f"timing training: {model}, batch {batch_size} × {length} tokens, {prec}")
        seconds = timed_windows(train_step, warmup=warmup, steps=steps, windows=windows, device=dev)
        rates = [steps * batch_size / s for s in seconds]
        rate = statistics.median(rates)
        result.update(train_sequences_per_second=round(rate, 1), train_window_rates=[round(r, 1) for r in rates],
                      train_ms_per_step=round(1e3 * batch_size / rate, 2),
                      train_gflops=round(rate * passes * 3 * 2 * macs / 1e9, 1))
        del optimizer

    if infer:
        fuse(net.eval())
        ids, mask = random_batches(POOL // 2, infer_batch_size, length, net.cfg.vocab_size, **batches)
        ids, mask = ids.to(dev), mask.to(dev)
        counter = iter(range(1 << 62))

        @torch.inference_mode()
        def infer_step() -> None:
            i = next(counter) % (POOL // 2)
            with autocast(prec, dev):
                net(ids[i], mask[i]).float()

        _log(quiet, f"timing inference: batch {infer_batch_size}, {prec}")
        seconds = timed_windows(infer_step, warmup=max(2, warmup // 2), steps=steps, windows=windows, device=dev)
        rates = [steps * infer_batch_size / s for s in seconds]
        rate = statistics.median(rates)
        result.update(infer_sequences_per_second=round(rate, 1), infer_window_rates=[round(r, 1) for r in rates],
                      infer_gflops=round(rate * 2 * macs / 1e9, 1))

    if peak:
        _log(quiet, f"measuring the {prec} GEMM peak")
        gemm = gemm_peak_gflops(prec, dev)
        result["gemm_peak_gflops"] = round(gemm, 1)
        for kind in ("train", "infer"):
            if f"{kind}_gflops" in result:
                result[f"{kind}_share_of_peak"] = round(result[f"{kind}_gflops"] / gemm, 3)
    memory = peak_memory_mb(dev)
    result["peak_memory_mb"] = round(memory, 1) if memory is not None else None
    return result
