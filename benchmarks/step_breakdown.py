"""Where a training step's time goes: each part of an image model timed alone, forward and backward.

`torch.profiler` inflates the small operators of a CPU step 2-3× (its own bookkeeping), so this script times
the parts directly instead. It times the whole `cct train` step of a recipe (`cct.step.TrainStep`, as `cct bench` does),
then runs one forward pass on an augmented batch with hooks that record the input of every module of one
block, and times each part on its recorded input: forward, then backward from a random gradient of its
output's shape (drawn once, before the clock starts).

Parts: the augmentation, the tokenizer (with the positional embedding), the blocks, the head after them with the
loss, the optimiser step. Blocks differ only in their stochastic-depth rate, so one (the middle one) is timed and
counted `depth` times. Inside it: each child module (one called more than once, as the Keras block's GELU, counted
as often), the attention's linear layers with their GFLOP/s (forward and both backward products) and its core (the
attention module minus its linear layers; the Keras model's folded attention calls neither, so it has no such
rows); the residual adds and stochastic depth are the block minus its children. The parts' sum is printed beside
the measured step; the step's own work that no part has (the metrics, the finiteness check) and the autograd
engine's work over a whole graph make the difference.

    .venv/bin/python benchmarks/step_breakdown.py --model cct_7_3x1_32 --precision fp32
    .venv/bin/python benchmarks/step_breakdown.py --model cct_2_3x5_32 --recipe fast --batch-size 64
    .venv/bin/python benchmarks/step_breakdown.py --model cct_2_3x2_32_keras --json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch import nn

from cct import recipes
from cct.bench import timed_windows
from cct.errors import CCTError
from cct.kernels import KERNELS, use_kernels
from cct.model import CCT
from cct.registry import create_model
from cct.runtime import autocast, configure_threads, resolve_precision
from cct.step import augment_config, make_optimizer, make_train_step


def median_ms(fn, *, rounds: int, reps: int) -> float:
    """Median over `rounds` of the mean milliseconds of `reps` calls, after two untimed calls."""
    return statistics.median(timed_windows(fn, warmup=2, steps=reps, windows=rounds)) / reps * 1e3


def forward_backward(fn, inputs: torch.Tensor, precision: str, params: list[nn.Parameter], *,
                     input_grad: bool = True):
    """A call of fn on a leaf copy of `inputs`, then backward from a fixed random gradient.

    The gradients of `inputs` and `params` are dropped before each call, as a step's `zero_grad(set_to_none=True)`
    drops them: backward then writes them afresh instead of adding to them (one more pass each).
    """
    inputs = inputs.detach().requires_grad_(input_grad)
    with autocast(precision):
        out = fn(inputs)
    grad = torch.randn_like(out)

    def run() -> None:
        inputs.grad = None
        for p in params:
            p.grad = None
        with autocast(precision):
            y = fn(inputs)
        y.backward(grad)
    return run


def linear_gflop(module: nn.Module, inputs: torch.Tensor) -> float:
    """GFLOP of a linear layer's forward and both backward products on `inputs`."""
    return 3 * 2 * inputs.numel() // inputs.shape[-1] * module.in_features * module.out_features / 1e9


def breakdown(model_name: str, *, precision: str, batch_size: int, rounds: int, reps: int, kernels: str,
              recipe: str | None = None) -> dict:
    """Milliseconds of the measured step and of each part (module docstring), for an image model and a recipe."""
    configure_threads(None)  # and the allocator, as `cct train` runs
    prec = resolve_precision(precision, torch.device("cpu"))
    torch.manual_seed(0)
    recipe = recipe or recipes.default_recipe(model_name)
    cfg = recipes.make_config(model_name, "", "", recipe=recipe, batch_size=batch_size, precision=prec)
    net = use_kernels(create_model(model_name, **recipes.drop_rates(cfg)), kernels).train()
    if not isinstance(net, CCT):
        raise SystemExit(f"{model_name}: this script breaks down image models only")
    params = list(net.parameters())
    C, (H, W) = net.cfg.in_chans, net.cfg.img_size
    classes = max(net.cfg.num_classes, 1)
    optimizer = make_optimizer(net, cfg, precision=prec)
    step = make_train_step(net, optimizer, augment_config(cfg, (0.5,) * C, (0.25,) * C), precision=prec,
                           device="cpu", label_smoothing=cfg.label_smoothing, num_classes=classes,
                           generator=torch.Generator().manual_seed(1))
    images = torch.randint(0, 256, (batch_size, C, H, W), dtype=torch.uint8)
    labels = torch.randint(0, classes, (batch_size,))
    times: dict[str, float] = {}
    times["step (measured)"] = median_ms(lambda: step(images, labels, cfg.lr * 1e-3), rounds=rounds, reps=1)

    g = torch.Generator().manual_seed(2)

    def augment():
        return step.augment(images, labels, g, step.aug_cfg, num_classes=classes, mix=True)
    times["augmentation"] = median_ms(augment, rounds=rounds, reps=reps)
    (x,), targets = augment()

    block = net.blocks[len(net.blocks) // 2]
    seen: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output stays as it is
            seen.setdefault(name, inputs[0])  # the first call's input (the Keras block calls its GELU twice)
            calls[name] = calls.get(name, 0) + 1
        return hook
    watched = [("block", block), ("norm", net.norm), *((f"block.{n}", m) for n, m in block.named_modules() if n)]
    hooks = [m.register_forward_hook(record(name)) for name, m in watched]
    with torch.no_grad(), autocast(prec):
        net(x)
    for h in hooks:
        h.remove()

    times["tokenizer (+ embedding)"] = median_ms(
        forward_backward(lambda t: _stem(net, t), x, prec, params, input_grad=False), rounds=rounds, reps=reps)
    times[f"{len(net.blocks)} blocks"] = len(net.blocks) * median_ms(
        forward_backward(block, seen["block"], prec, params), rounds=rounds, reps=reps)

    def head(t: torch.Tensor) -> torch.Tensor:  # as `TrainStep.forward_backward` ends a step
        return torch.nn.functional.cross_entropy(net.forward_head(net.norm(t)).float(), targets)
    times["head + loss"] = median_ms(forward_backward(head, seen["norm"], prec, params), rounds=rounds, reps=reps)

    def optimizer_step() -> None:
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    times["optimiser (+ zeroed grads)"] = median_ms(optimizer_step, rounds=rounds, reps=reps)

    parts: dict[str, dict] = {}  # inside the block
    for name, module in block.named_children():
        if f"block.{name}" not in seen or isinstance(module, nn.Identity):
            continue
        inputs = seen[f"block.{name}"]
        n = calls[f"block.{name}"]
        one = median_ms(forward_backward(module, inputs, prec, params), rounds=rounds, reps=reps)
        row = {"ms": n * one, "calls": n}
        if isinstance(module, nn.Linear):
            row["gflop_per_s"] = linear_gflop(module, inputs) / one * 1e3
        parts[name] = row
        for sub, child in module.named_children():
            key = f"block.{name}.{sub}"
            if isinstance(child, nn.Linear) and key in seen:  # (the folded Keras attention calls neither)
                cms = median_ms(forward_backward(child, seen[key], prec, params), rounds=rounds, reps=reps)
                parts[f"{name}.{sub}"] = {"ms": calls[key] * cms, "calls": calls[key],
                                          "gflop_per_s": linear_gflop(child, seen[key]) / cms * 1e3}
        linears = [f"{name}.{sub}" for sub, c in module.named_children() if f"{name}.{sub}" in parts]
        if linears:
            parts[f"{name} without its linear layers"] = {"ms": row["ms"] - sum(parts[k]["ms"] for k in linears)}
    block_ms = times[f"{len(net.blocks)} blocks"] / len(net.blocks)
    children = [k for k in parts if "." not in k and "without" not in k]
    parts["residual adds, stochastic depth, rest"] = {"ms": block_ms - sum(parts[k]["ms"] for k in children)}
    summed = sum(v for k, v in times.items() if k != "step (measured)")
    return {"model": model_name, "recipe": recipe, "precision": prec, "batch_size": batch_size, "kernels": kernels,
            "threads": torch.get_num_threads(), "step_ms": times, "sum_of_parts_ms": summed,
            "block_ms": block_ms, "block_parts_ms": parts}


class _StemOutput(Exception):
    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.tensor = tensor


def _stem(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`forward_features` up to the first block (tokenizer, class token, positional embedding): its output."""
    def stop(module, inputs):
        raise _StemOutput(inputs[0])
    hook = net.blocks[0].register_forward_pre_hook(stop)
    try:
        net.forward_features(x)
    except _StemOutput as e:
        return e.tensor
    finally:
        hook.remove()
    raise RuntimeError("the first block was never reached")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cct_7_3x1_32")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--recipe", choices=sorted(recipes.RECIPES), help="whose augmentation, optimiser and dropout rates "
                    "(default: the model's, as `cct train` picks it)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--kernels", default="fast", choices=KERNELS)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per part (the median is kept)")
    ap.add_argument("--reps", type=int, default=2, help="calls per round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        r = breakdown(args.model, precision=args.precision, batch_size=args.batch_size, rounds=args.rounds,
                      reps=args.reps, kernels=args.kernels, recipe=args.recipe)
    except CCTError as e:  # a recipe that does not fit the model, say
        raise SystemExit(f"step_breakdown: {e}") from None
    if args.json:
        print(json.dumps(r, indent=1))
        return r
    step_ms = r["step_ms"]["step (measured)"]
    print(f"{r['model']}, recipe {r['recipe']}, batch {r['batch_size']}, {r['precision']}, kernels {r['kernels']}, "
          f"{r['threads']} threads")
    for k, v in r["step_ms"].items():
        print(f"  {k:48s} {v:8.1f} ms  {100 * v / step_ms:5.1f}%")
    print(f"  {'sum of the parts':48s} {r['sum_of_parts_ms']:8.1f} ms  {100 * r['sum_of_parts_ms'] / step_ms:5.1f}%")
    print(f"one block: {r['block_ms']:.1f} ms")
    for k, v in r["block_parts_ms"].items():
        rate = f"  {v['gflop_per_s']:5.0f} GFLOP/s" if "gflop_per_s" in v else ""
        if v.get("calls", 1) > 1:
            k = f"{k} (x{v['calls']}, timed on the first call's input)"
        indent = "    " if "." in k or "without" in k else "  "
        print(f"{indent}{k:{50 - len(indent)}s} {v['ms']:8.1f} ms  {100 * v['ms'] / r['block_ms']:5.1f}%{rate}")
    return r


if __name__ == "__main__":
    main()
