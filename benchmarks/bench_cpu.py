"""Micro-benchmarks behind cct's CPU speed-ups: each row times a variant against the one it replaced.

Every pair computes the same thing (the script checks it before timing); variants are timed
alternately, round after round, in one process, and the median per variant is printed, so a
machine whose load drifts affects both sides alike. Shapes are those of `cct_2_3x2_32_keras`
at batch 128 (and cct_7_3x1_32's attention with --model).

    .venv/bin/python benchmarks/bench_cpu.py                    # all groups, bf16 and fp32
    .venv/bin/python benchmarks/bench_cpu.py --groups dropout attention --threads 1 --json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import cct
from cct.kernels import FastDropout, dropout_mask, fuse, gelu_tanh, use_kernels
from cct.model import _same_pool_padding
from cct.runtime import tune_allocator


def timeit(variants: dict, rounds: int, reps: int) -> dict:
    """Median milliseconds per call of each variant, timed alternately."""
    for fn in variants.values():
        fn()
        fn()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - start) / reps * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


# ---------------------------------------------------------------------- groups
def group_dropout(precision: str, batch: int):
    """Dropout on an MLP activation (B, 64, 128): bernoulli_ mask vs 16 random bits per element, turned
    into the mask by a comparison and a bool cast (before) or by integer arithmetic (now)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(batch, 64, 128, dtype=dtype)
    p = 0.1
    dropped = round(p * 65536)

    def compare_and_cast():
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None).view(torch.int16)[:n]
        return x * (bits.view(x.shape) >= dropped - 32768).to(dtype).mul_(65536 / (65536 - dropped))

    torch.manual_seed(0)
    expected = compare_and_cast()
    torch.manual_seed(0)
    assert torch.equal(expected, x * dropout_mask(x.shape, p, dtype=dtype, device=x.device))
    return {
        "F.dropout (bernoulli_)": lambda: F.dropout(x, p, True),
        "int16 bits, compare + cast (before)": compare_and_cast,
        "int16 bits, integer mask (now)": lambda: x * dropout_mask(x.shape, p, dtype=x.dtype, device=x.device),
    }


def _gelu_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, 64, 128).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(batch, 64, 128).to(torch.bfloat16)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    assert torch.equal(*(torch.autograd.grad(f(x), x, grad)[0] for f in (gelu_tanh, _reference_gelu)))
    return x, grad


def _reference_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def group_gelu(precision: str, batch: int):
    """The MLP's tanh-GELU on (B, 64, 128) in bf16, forward + backward: `F.gelu` against the
    65,536-entry table of `cct.kernels.gelu_tanh` (bit for bit the same values and gradients)."""
    x, grad = _gelu_inputs(batch)
    return {"F.gelu (before)": lambda: _reference_gelu(x).backward(grad),
            "table (now)": lambda: gelu_tanh(x).backward(grad)}


def group_gelu_inference(precision: str, batch: int):
    """The same GELU forward only, with gradients off."""
    x, _ = _gelu_inputs(batch)
    x = x.detach()
    return {"F.gelu (before)": lambda: _reference_gelu(x), "table (now)": lambda: gelu_tanh(x)}


def _keras_attention_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """cct_2_3x2_32_keras's first attention layer (2 heads of 128 on a 128 stream, 64 tokens, attention
    dropout 0.1), folded (`cct.kernels.FastAttention`) and the reference layer of `cct.layers` computing
    with the same weights and the same cheap dropout masks."""
    torch.manual_seed(0)
    plain = cct.create_model("cct_2_3x2_32_keras", attn_drop_rate=0.1).blocks[0].attn
    with torch.no_grad():
        for param in plain.parameters():
            param.normal_(0, 0.05)  # non-zero biases, as after training
    folded = use_kernels(copy.deepcopy(plain), "fast")
    plain.attn_drop.__class__ = FastDropout  # the reference math, the fast path's masks
    return folded, plain


def group_attention_training(precision: str, batch: int):
    """Training attention of cct_2_3x2_32_keras, forward (dropout on) + backward: the plain
    qkv → attention → proj against the fold inside the graph (`FastAttention._folded_forward`)."""
    folded, plain = _keras_attention_pair()
    x = torch.randn(batch, 64, 128, requires_grad=True)
    grad = torch.randn(batch, 64, 128)
    outs = []
    for module in (folded, plain):
        torch.manual_seed(1)  # the same dropout mask
        outs.append(module.train()(x))
    assert torch.allclose(*outs, atol=1e-4)

    def run(module):
        def go():
            with autocast(precision):
                out = module(x)
            out.float().backward(grad)
        return go

    return {"plain qkv + proj (before)": run(plain), "folded (now)": run(folded)}


def group_attention_inference(precision: str, batch: int):
    """Inference attention of cct_2_3x2_32_keras: plain against the fused folded weights (`cct.kernels.fuse`)."""
    folded, plain = (m.eval() for m in _keras_attention_pair())
    fuse(folded)
    x = torch.randn(batch, 64, 128)
    with torch.no_grad():
        assert torch.allclose(plain(x), folded(x), atol=1e-4)

    def run(module):
        def go():
            with torch.inference_mode(), autocast(precision):
                module(x)
        return go

    return {"plain qkv + proj (before)": run(plain), "folded (now)": run(folded)}


def _attention_inputs(model: str, batch: int, precision: str):
    net = cct.create_model(model)
    blk = net.blocks[0].attn
    tokens = net.grid[0] * net.grid[1] + net.num_prefix_tokens  # the model's own sequence, not a guess by name
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    qkv = torch.randn(batch, tokens, 3 * blk.num_heads * blk.head_dim, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, blk.num_heads, tokens, blk.head_dim, dtype=dtype)
    return blk.num_heads, blk.head_dim, qkv, grad


def group_attention(precision: str, batch: int, model: str):
    """Training attention with dropout 0.1, forward + backward: SDPA (its unfused dropout path) vs
    matmul → softmax → cheap dropout → matmul."""
    heads, head_dim, qkv, grad = _attention_inputs(model, batch, precision)
    B, N = qkv.shape[:2]
    p = 0.1

    def split():
        return qkv.view(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def sdpa():
        q, k, v = split()
        F.scaled_dot_product_attention(q, k, v, dropout_p=p).backward(grad)

    def manual():
        q, k, v = split()
        attn = (q @ k.transpose(-2, -1)).mul_(head_dim ** -0.5).softmax(-1)
        (attn * dropout_mask(attn.shape, p, dtype=attn.dtype, device=attn.device) @ v).backward(grad)

    def sdpa_no_dropout():
        q, k, v = split()
        F.scaled_dot_product_attention(q, k, v).backward(grad)

    return {"SDPA dropout 0.1": sdpa, "manual dropout 0.1": manual, "(SDPA, no dropout)": sdpa_no_dropout}


def group_tokenizer(precision: str, batch: int):
    """The Keras tokenizer, forward + backward: conv → relu → zero pad → -inf pad → pool (NCHW), vs
    conv → pool with padding → relu, NCHW and channels-last."""
    torch.manual_seed(0)
    tok = cct.create_model("cct_2_3x2_32_keras").tokenizer
    x = torch.randn(batch, 3, 32, 32)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def reference(inp):
        for conv in tok.convs:
            y = F.pad(F.relu(conv(inp)), (1, 1, 1, 1))
            top, bottom = _same_pool_padding(y.shape[-2], 3, 2)
            inp = F.max_pool2d(F.pad(y, (top, bottom, top, bottom), value=float("-inf")), 3, 2)
        return inp

    def fused(inp):
        for conv in tok.convs:
            inp = F.relu(F.max_pool2d(conv(inp), 3, 2, 1, ceil_mode=True))
        return inp

    with torch.no_grad():
        assert torch.allclose(reference(x), fused(x), atol=1e-5)

    def run(fn, inp):
        def go():
            with autocast(precision):
                out = fn(inp)
            out.float().sum().backward()
        return go

    return {"relu→pad→pool NCHW (before)": run(reference, x), "pool→relu NCHW": run(fused, x),
            "relu→pad→pool channels-last": run(reference, x_cl), "pool→relu channels-last (now)": run(fused, x_cl)}


def group_optimizer(precision: str, batch: int):
    """AdamW step over cct_2_3x2_32_keras's parameters: for-loop vs foreach vs fused."""
    variants = {}
    for kind in ("for-loop", "foreach", "fused"):
        model = cct.create_model("cct_2_3x2_32_keras")
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        kw = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, **kw)
        variants[f"AdamW {kind}"] = opt.step
    return variants


def group_pooling(precision: str, batch: int):
    """Sequence pooling of (B, 64, 128) tokens, forward + backward: einsum vs batched matmul."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(batch, 64, 128, dtype=dtype, requires_grad=True)
    w = torch.randn(batch, 64, dtype=dtype).softmax(-1).requires_grad_()

    def einsum():
        torch.einsum("bn,bnd->bd", w, x).sum().backward()

    def matmul():
        (w.unsqueeze(1) @ x).squeeze(1).sum().backward()

    return {"einsum": einsum, "matmul": matmul}


GROUPS = {"dropout": group_dropout, "gelu": group_gelu, "gelu_inference": group_gelu_inference,
          "attention": group_attention, "attention_training": group_attention_training,
          "attention_inference": group_attention_inference,
          "tokenizer": group_tokenizer, "optimizer": group_optimizer, "pooling": group_pooling}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="cct_2_3x2_32_keras", help="whose attention shapes to time")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()  # as `cct train` and `cct bench` do: otherwise page faults distort each fresh tensor
    torch.manual_seed(0)
    rows = []
    for group in args.groups:
        for precision in args.precisions:
            if (group == "optimizer" and precision == "bf16") or (group.startswith("gelu") and precision == "fp32"):
                continue  # the optimiser always updates fp32 weights; the GELU table is bf16's
            kw = {"model": args.model} if group == "attention" else {}
            variants = GROUPS[group](precision, args.batch_size, **kw)
            ms = timeit(variants, args.rounds, args.reps)
            base = next(iter(ms.values()))
            for name, t in ms.items():
                rows.append({"group": group, "precision": precision, "variant": name, "ms": round(t, 3),
                             "speedup": round(base / t, 2)})
                if not args.json:
                    print(f"{group:10s} {precision:5s} {name:34s} {t:9.3f} ms  ×{base / t:5.2f}", flush=True)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "batch_size": args.batch_size, "rows": rows}))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
