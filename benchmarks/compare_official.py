"""cct against the official SHI-Labs Compact-Transformers code: training images/s of the same model.

The official model (`src/cct.py` of https://github.com/SHI-Labs/Compact-Transformers, run eagerly
in float32 as its timm-based trainer runs on a CPU) and `cct bench` alternate round after
round on the same machine; the ratio of the medians is printed. The official code is not part of
this project: point `--official-repo` at a checkout of it, which runs in its own process.

Each side times what its training does per batch of 128. Official: forward, label-smoothed cross
entropy, backward, AdamW step, on ready float tensors (its augmentation runs in loader worker
processes, so it is left out, in its favour). cct: the whole `cct train` step of the paper recipe,
augmentation (RandAugment, MixUp/CutMix, ...) included.

    git clone https://github.com/SHI-Labs/Compact-Transformers /tmp/cct-official
    .venv/bin/python benchmarks/compare_official.py --official-repo /tmp/cct-official --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# runs in a child process with the official checkout first on sys.path
OFFICIAL_STEP = r"""
import json, statistics, sys, time
import torch
import torch.nn.functional as F
repo, model_name, batch, steps, windows, warmup = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
sys.path.insert(0, repo)
import src  # the official package: src/cct.py, src/cvt.py, src/vit.py
torch.manual_seed(0)
model = getattr(src, model_name)(num_classes=10).train()
opt = torch.optim.AdamW(model.parameters(), lr=5.5e-4, weight_decay=6e-2)
x = torch.randn(batch, 3, 32, 32)
y = torch.randint(0, 10, (batch,))

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
print(json.dumps({"train_images_per_second": statistics.median(rates), "train_window_rates": rates,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official-repo", required=True, help="a checkout of SHI-Labs/Compact-Transformers")
    parser.add_argument("--model", default="cct_7_3x1_32", help="a model name both sides know")
    parser.add_argument("--precisions", nargs="+", default=["auto", "fp32"], choices=["auto", "fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed window (both sides)")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per run (both sides)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    repo = Path(args.official_repo).resolve()
    if not (repo / "src" / "cct.py").is_file():
        parser.error(f"--official-repo {repo}: no src/cct.py there (clone SHI-Labs/Compact-Transformers)")

    official_cmd = [sys.executable, "-c", OFFICIAL_STEP, str(repo), args.model, str(args.batch_size),
                    str(args.steps), str(args.windows), "1"]

    def cct_cmd(precision: str) -> list[str]:
        return [sys.executable, "-m", "cct", "bench", "--json", "--no-infer", "--no-peak", "--model", args.model,
                "--precision", precision, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                "--windows", str(args.windows), "--warmup", "1"]

    runs: dict[str, list[dict]] = {"official": [], **{p: [] for p in args.precisions}}
    for i in range(args.rounds):
        order = ["official", *args.precisions]
        for side in (order if i % 2 == 0 else order[::-1]):
            r = run_json(official_cmd if side == "official" else cct_cmd(side))
            runs[side].append(r)
            print(f"round {i + 1} {side:>8}: {r['train_images_per_second']:.2f} img/s", file=sys.stderr, flush=True)
    med = {side: statistics.median(r["train_images_per_second"] for r in rs) for side, rs in runs.items()}
    summary = {"model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
               "train_images_per_second": med,
               "ratio_vs_official": {p: round(med[p] / med["official"], 2) for p in args.precisions}}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.model}, batch {args.batch_size}, medians of {args.rounds} alternating rounds (images/s):")
        print(f"  official SHI-Labs code, fp32 eager: {med['official']:.2f}")
        for p in args.precisions:
            print(f"  cct --precision {p}: {med[p]:.2f}  (x{summary['ratio_vs_official'][p]:.2f})")
    return summary


if __name__ == "__main__":
    main()
