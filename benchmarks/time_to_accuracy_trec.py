"""Time to accuracy on TREC-6: `cct train --model text_cct_2 --data ../shared/data/trec` at several budgets.

Each run trains with `--time-budget MINUTES` (or `--epochs N` with `--epochs-list`), then the test
top-1 of its `results.json` is plotted against the run's training minutes (`train_seconds`: the
training loop's own time, first step to last, data loading and the final test excluded), one line per
seed, into a PNG. Tune on a validation split (`--val-split 0.1`), never on the test file; report the
runs with the recipe's own split.

    .venv/bin/python benchmarks/time_to_accuracy_trec.py --budgets 0.5 1 2 5 --out /tmp/tta_trec
    .venv/bin/python benchmarks/time_to_accuracy_trec.py --epochs-list 5 10 20 --seeds 0 1 2 -- --kernel-size 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(model: str, data: str, out: Path, *, seed: int, budget: float | None, epochs: int | None,
        val_split: float | None, extra: list[str]) -> dict:
    """One `cct train` run; returns its results.json with the settings that made it."""
    cmd = [sys.executable, "-m", "cct", "train", "--model", model, "--data", data, "--out", str(out),
           "--seed", str(seed), "--quiet"]
    cmd += ["--time-budget", str(budget)] if budget is not None else ["--epochs", str(epochs)]
    if val_split is not None:
        cmd += ["--val-split", str(val_split)]
    cmd += extra
    print(" ".join(cmd), file=sys.stderr, flush=True)
    if (code := subprocess.run(cmd, stdout=sys.stderr).returncode) != 0:
        sys.exit(f"time_to_accuracy_trec: cct train exited with {code} (its error is above): {' '.join(cmd)}")
    results = json.loads((out / "results.json").read_text())
    return {"seed": seed, "budget_minutes": budget, "epochs_asked": epochs, "out": str(out),
            "model": results.get("model"), "epochs": results.get("epochs"), "steps": results.get("steps"),
            "train_minutes": round(results["train_seconds"] / 60, 3), "test_top1": results.get("test_top1"),
            "test_top5": results.get("test_top5")}


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Test top-1 (%) against training minutes, one line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for seed in sorted({r["seed"] for r in rows}):
        points = sorted((r["train_minutes"], 100 * r["test_top1"]) for r in rows
                        if r["seed"] == seed and r["test_top1"] is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=f"seed {seed}")
    ax.axhline(92.0, color="gray", linestyle="--", linewidth=1, label="target 92.0%")
    ax.set_xlabel("training minutes (first step to last)")
    ax.set_ylabel("TREC-6 test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "trec"))
    parser.add_argument("--model", default="text_cct_2")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--budgets", type=float, nargs="+", help="training minutes, one run each (default 0.5 1 2 5)")
    group.add_argument("--epochs-list", type=int, nargs="+", help="epochs, one run each, instead of budgets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--val-split", type=float, default=None, help="e.g. 0.1 for tuning (default: the recipe's)")
    parser.add_argument("--out", default="/tmp/cct_tta_trec")
    parser.add_argument("--plot", default=None, help="the PNG (default: OUT/time_to_accuracy.png)")
    parser.add_argument("extra", nargs="*", help="more `cct train` flags, after --")
    args = parser.parse_args(argv)
    budgets = args.budgets if args.epochs_list is None else [None] * len(args.epochs_list)
    if args.epochs_list is None and budgets is None:
        budgets = [0.5, 1.0, 2.0, 5.0]
    epochs = args.epochs_list or [None] * len(budgets)

    root = Path(args.out)
    rows = []
    for seed in args.seeds:
        for budget, epoch_count in zip(budgets, epochs):
            tag = f"budget_{budget:g}min" if budget is not None else f"epochs_{epoch_count}"
            out = root / f"{tag}_seed{seed}_{time.strftime('%Y%m%d-%H%M%S')}"
            row = run(args.model, args.data, out, seed=seed, budget=budget, epochs=epoch_count,
                      val_split=args.val_split, extra=args.extra)
            rows.append(row)
            print(json.dumps(row), flush=True)
    png = Path(args.plot) if args.plot else root / "time_to_accuracy.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png, f"{args.model} on TREC-6 " + " ".join(args.extra))
    (root / "time_to_accuracy.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {png}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
