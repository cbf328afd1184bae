"""Time to accuracy on CIFAR-10: `cct train --recipe R --time-budget MINUTES`, then the test top-1, drawn.

Wall time is the training loop's own `train_seconds` (data decoding and the final test excluded,
as the target counts them); the run's `history.csv` gives the per-epoch curve. Tune with
`--val-split 0.1` (the validation top-1 is printed per epoch); the reported run trains on all
50,000 images (`--val-split 0`, the recipe's default) and is tested once at the end.

`--plot FILE.png` draws test top-1 against training minutes and against training TFLOP (the
machine-independent `train_tflop` of results.json) for every recipe run, with the anchors: the
Keras example (its own code on this project's machine, and its published figure) and the paper's
two 30-minute points (90% on an RTX 2080Ti, 80% on a 12-core AMD 5900X CPU). `--results DIR...`
draws runs made before, without training.

    .venv/bin/python benchmarks/time_to_accuracy.py --budgets 10 30 --out /tmp/tta --plot tta.png
    .venv/bin/python benchmarks/time_to_accuracy.py --recipes fast keras --budgets 10 --plot tta.png
    .venv/bin/python benchmarks/time_to_accuracy.py --budgets 10 --val-split 0.1 -- --lr 3e-3
    .venv/bin/python benchmarks/time_to_accuracy.py --results /tmp/tta/* --plot tta.png
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from cct import count_macs, create_model

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--model", default=None, help="any registered model (default: each recipe's own)")
    parser.add_argument("--recipes", nargs="+", default=["fast"], help="recipes to run at every budget")
    parser.add_argument("--budgets", type=float, nargs="+", default=[10.0], help="training minutes, one run each")
    parser.add_argument("--results", nargs="+", default=[], metavar="DIR", help="runs made before: summarise and draw these instead of training new runs")
    parser.add_argument("--plot", metavar="FILE", help="draw test top-1 against minutes and TFLOP to FILE")
    parser.add_argument("--val-split", type=float, default=0.0, help="0.1 for tuning; 0 for the reported run")
    parser.add_argument("--out", default="/tmp/cct_time_to_accuracy")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("extra", nargs="*", help="more `cct train` flags, after --")
    args = parser.parse_args(argv)

    rows = [summarise(Path(d), budget=None, wall=None) for d in args.results]
    for recipe in args.recipes if not args.results else []:
        for budget in args.budgets:
            out = Path(args.out) / f"{recipe}_{budget:g}min_{time.strftime('%Y%m%d-%H%M%S')}"
            cmd = [sys.executable, "-m", "cct", "train", "--recipe", recipe, "--data", args.data, "--out", str(out),
                   "--time-budget", str(budget), "--val-split", str(args.val_split), *args.extra]
            cmd += ["--model", args.model] if args.model else []
            print(" ".join(cmd), file=sys.stderr, flush=True)
            start = time.perf_counter()
            if (code := subprocess.run(cmd, stdout=sys.stderr).returncode) != 0:
                sys.exit(f"time_to_accuracy: cct train exited with {code} (its error is above): {' '.join(cmd)}")
            row = summarise(out, budget=budget, wall=time.perf_counter() - start)
            rows.append(row)
            print(f"{recipe}, budget {budget:g} min: {row['model']}, {row['epochs']} epochs in "
                  f"{row['train_seconds']:.0f} s of training ({row['images_per_second']:.0f} images/s), "
                  f"test top-1 {row['test_top1']:.4f}", file=sys.stderr, flush=True)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(json.dumps(row))
    return rows


def summarise(out: Path, *, budget: float | None, wall: float | None) -> dict:
    """One run's figures, from its results.json and history.csv."""
    if not (out / "results.json").is_file():
        sys.exit(f"time_to_accuracy: {out} has no results.json (not a finished `cct train` run)")
    results = json.loads((out / "results.json").read_text())
    config = out / "config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    return {"recipe": results["recipe"], "budget_minutes": budget, "model": results["model"],
            "train_seconds": results["train_seconds"], "process_seconds": round(wall, 1) if wall else None,
            "epochs": results["epochs"], "steps": results["steps"], "images_per_second": results["images_per_second"],
            "test_top1": results["test_top1"], "train_tflop": results.get("train_tflop"),
            "train_images": results["train_images"], "val_images": results["val_images"],
            "precision": results["precision"], "processor": results.get("processor"), "out": str(out),
            "res_schedule": settings.get("res_schedule"), "optimizer": settings.get("optimizer", "adamw"),
            "lr": settings.get("lr"),
            "val_top1_per_epoch": [float(h["val_top1"]) for h in history if h.get("val_top1")]}


# (label, minutes, TFLOP or None, top-1 %): published or measured anchors. The Keras example's TFLOP:
# 30 epochs of 45,000 images through cct_2_3x2_32_keras × 3 passes × 2 FLOPs a multiply-accumulate.
KERAS_TFLOP = 30 * 45_000 * 6 * count_macs(create_model("cct_2_3x2_32_keras")) / 1e12
ANCHORS = [
    # measured once, on the first sessions' 2-core AMD EPYC with AVX512-BF16 (not on the machine drawing the plot)
    ("Keras example's code, 2-core EPYC with bf16 (JPEG copy)", 37.7, KERAS_TFLOP, 76.17),
    ("paper: RTX 2080Ti, under 30 min", 30.0, None, 90.0),
    ("paper: 12-core AMD 5900X, under 30 min", 30.0, None, 80.0),
]


def plot(rows: list[dict], path: str) -> None:
    """Test top-1 against training minutes and against training TFLOP, one series per recipe, model, precision,
    optimiser, learning rate and resolution schedule (runs of the same recipe before and after a change of its
    defaults apart)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    by_minutes, by_tflop = fig.subplots(1, 2)
    series: dict[str, list[dict]] = {}
    for row in rows:
        sizes = f", sizes {row['res_schedule']}" if row.get("res_schedule") else ""
        optimiser = f", {row.get('optimizer', 'adamw')}" + (f" lr {row['lr']:g}" if row.get("lr") else "")
        series.setdefault(f"{row['recipe']} ({row['model']}, {row['precision']}{optimiser}{sizes})", []).append(row)
    for label, runs in sorted(series.items()):
        runs.sort(key=lambda r: r["train_seconds"])
        top1 = [100 * r["test_top1"] for r in runs]
        by_minutes.plot([r["train_seconds"] / 60 for r in runs], top1, "o-", label=label)
        costed = [(r["train_tflop"], t) for r, t in zip(runs, top1) if r.get("train_tflop")]
        if costed:
            by_tflop.plot(*zip(*costed), "o-", label=label)
    for (label, minutes, tflop, top1), marker in zip(ANCHORS, ("s", "^", "v")):
        by_minutes.plot([minutes], [top1], marker, color="gray", label=label)
        if tflop is not None:
            by_tflop.plot([tflop], [top1], marker, color="gray", label=label)
    by_minutes.axhline(77.82, color="gray", linestyle=":", label="Keras example, published (30 epochs)")
    for ax, xlabel in ((by_minutes, "training minutes"), (by_tflop, "training TFLOP (forward + backward)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("CIFAR-10 test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Time to accuracy, " + ", ".join(sorted({r.get("processor") or "processor not recorded" for r in rows})),
                 fontsize=9)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
