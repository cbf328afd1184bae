"""cct against the official SHI-Labs Compact-Transformers code: training images/s (or sequences/s) of the same model.

The official model (`src/cct.py`, or `src/text/` for the text models, of
https://github.com/SHI-Labs/Compact-Transformers, run eagerly in float32 as its timm-based trainer
runs on a CPU) and `cct bench` alternate round after round on the same machine; the ratio of the
medians is printed. The official code is not part of this project: point `--official-repo` at a
checkout of it, or at a bare git mirror of it (its `src/` is then exported into a temporary folder
for the run and removed afterwards); it runs in its own process.

Image models: each side times what its training does per batch of 128. Official: forward,
label-smoothed cross entropy, backward, AdamW step, on ready float tensors (its augmentation runs in
loader worker processes, so it is left out, in its favour). cct: the whole `cct train` step of the
paper recipe, augmentation (RandAugment, MixUp/CutMix, ...) included.

Text models (`text_cct_2`, `text_cct_6`, ...): the official text models ship no trainer, and their
forward only runs unmasked and at one or two tokens past `seq_len` (65 or 66 tokens for the default
seq_len 64 and kernel 4; every other length and any mask fails). So both sides time batches of
random token ids of exactly `--seq-len` (default 65) tokens without padding: the official model
unmasked, cct through `cct bench --fixed-length` (cct always computes with its mask). Each step is
forward, label-smoothed cross entropy, backward and an AdamW step (torch's default AdamW for the
official side, cct's fused one), with the same vocabulary size on both sides.

    git clone https://github.com/SHI-Labs/Compact-Transformers /tmp/cct-official
    .venv/bin/python benchmarks/compare_official.py --official-repo /tmp/cct-official --rounds 3
    .venv/bin/python benchmarks/compare_official.py --official-repo /tmp/cct-official --precisions fp32 \
        --kernels fast native --rounds 5
    .venv/bin/python benchmarks/compare_official.py --official-repo /tmp/cct-official --model text_cct_2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# runs in a child process with the official checkout first on sys.path
OFFICIAL_STEP = r"""
import json, statistics, sys, time
import torch
import torch.nn.functional as F
repo, model_name = sys.argv[1], sys.argv[2]
batch, steps, windows, warmup, seq_len, vocab, threads = map(int, sys.argv[3:10])
sys.path.insert(0, repo)
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
if model_name.startswith("text_"):
    import src.text  # the official text models: src/text/{cct,cvt,vit,transformer}.py
    model = getattr(src.text, model_name)(num_classes=6, vocab_size=vocab).train()
    x = torch.randint(2, vocab, (batch, seq_len))  # unmasked: the only way its forward runs
    y = torch.randint(0, 6, (batch,))
else:
    import src  # the official package: src/cct.py, src/cvt.py, src/vit.py
    model = getattr(src, model_name)(num_classes=10).train()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
opt = torch.optim.AdamW(model.parameters(), lr=5.5e-4, weight_decay=6e-2)

def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    loss.backward()
    opt.step()

for _ in range(warmup):
    step()
rates = []
for _ in range(windows):
    t = time.perf_counter()
    for _ in range(steps):
        step()
    rates.append(steps * batch / (time.perf_counter() - t))
print(json.dumps({"train_per_second": statistics.median(rates), "train_window_rates": rates,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def official_checkout(path: str):
    """A folder holding the official `src/`: the checkout itself, or `src/` exported from a bare git mirror."""
    repo = Path(path).resolve()
    if (repo / "src" / "cct.py").is_file():
        yield repo
        return
    if not (repo / "HEAD").is_file() and not (repo / ".git").exists():
        raise SystemExit(f"--official-repo {repo}: neither a checkout with src/cct.py nor a git mirror "
                         "(clone SHI-Labs/Compact-Transformers)")
    folder = Path(tempfile.mkdtemp(prefix="cct-official-"))
    try:
        archive = subprocess.run(["git", "--git-dir", str(repo), "archive", "HEAD", "src"],
                                 stdout=subprocess.PIPE, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official-repo", required=True,
                        help="a checkout of SHI-Labs/Compact-Transformers, or a bare git mirror of it")
    parser.add_argument("--model", default="cct_7_3x1_32", help="a model name both sides know (text_cct_2, ...)")
    parser.add_argument("--precisions", nargs="+", default=["auto", "fp32"], choices=["auto", "fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed window (both sides)")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per run (both sides)")
    parser.add_argument("--seq-len", type=int, default=65,
                        help="text models: tokens per sequence (default 65, where the official forward runs)")
    parser.add_argument("--vocab-size", type=int, default=100_000,
                        help="text models: embedding rows on both sides (default 100,000, the official default)")
    parser.add_argument("--kernels", nargs="+", default=["fast"], choices=["fast", "native", "reference"],
                        help="cct's kernels, each timed at each precision (native: the compiled attention core)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of both sides (default: torch's own choice, one per core); 1 keeps a "
                             "shared, busy machine from stalling every operator at its thread barrier")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    text = args.model.startswith("text_")
    unit = "sequences" if text else "images"

    # cct's sides: each precision with each kernels setting, named "fp32" (fast kernels) or "fp32+native"
    sides = {(p if k == "fast" else f"{p}+{k}"): (p, k) for p in args.precisions for k in args.kernels}

    def cct_cmd(side: str) -> list[str]:
        precision, kernels = sides[side]
        cmd = [sys.executable, "-m", "cct", "bench", "--json", "--no-infer", "--no-peak", "--model", args.model,
               "--precision", precision, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--windows", str(args.windows), "--warmup", "1", "--kernels", kernels]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if text:
            cmd += ["--seq-len", str(args.seq_len), "--fixed-length", "--vocab-size", str(args.vocab_size)]
        return cmd

    runs: dict[str, list[float]] = {"official": [], **{side: [] for side in sides}}
    with official_checkout(args.official_repo) as repo:
        official_cmd = [sys.executable, "-c", OFFICIAL_STEP, str(repo), args.model, str(args.batch_size),
                        str(args.steps), str(args.windows), "1", str(args.seq_len), str(args.vocab_size),
                        str(args.threads)]
        for i in range(args.rounds):
            order = ["official", *sides]
            for side in (order if i % 2 == 0 else order[::-1]):
                r = run_json(official_cmd if side == "official" else cct_cmd(side))
                rate = r["train_per_second"] if side == "official" else r[f"train_{unit}_per_second"]
                runs[side].append(rate)
                print(f"round {i + 1} {side:>8}: {rate:.2f} {unit}/s", file=sys.stderr, flush=True)
    med = {side: statistics.median(rs) for side, rs in runs.items()}
    summary = {"model": args.model, "batch_size": args.batch_size, "rounds": args.rounds, "threads": args.threads,
               f"train_{unit}_per_second": med, "per_round": runs,
               "ratio_vs_official": {side: round(med[side] / med["official"], 2) for side in sides}}
    if text:
        summary.update(seq_len=args.seq_len, vocab_size=args.vocab_size)
    if args.json:
        print(json.dumps(summary))
    else:
        shape = f", {args.seq_len} tokens, vocabulary {args.vocab_size:,}" if text else ""
        print(f"{args.model}, batch {args.batch_size}{shape}, medians of {args.rounds} alternating rounds ({unit}/s):")
        print(f"  official SHI-Labs code, fp32 eager: {med['official']:.2f}")
        for side, (p, k) in sides.items():
            print(f"  cct --precision {p} --kernels {k}: {med[side]:.2f}  (x{summary['ratio_vs_official'][side]:.2f})")
    return summary


if __name__ == "__main__":
    main()
