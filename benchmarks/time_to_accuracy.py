"""Time to accuracy on CIFAR-10: `cct train --recipe fast --time-budget MINUTES`, then the test top-1.

Wall time is the training loop's own `train_seconds` (data decoding and the final test excluded,
as the target counts them); the run's `history.csv` gives the per-epoch curve. Tune with
`--val-split 0.1` (the validation top-1 is printed per epoch); the reported run trains on all
50,000 images (`--val-split 0`, the recipe's default) and is tested once at the end.

    .venv/bin/python benchmarks/time_to_accuracy.py --budgets 10 30 --out /tmp/tta
    .venv/bin/python benchmarks/time_to_accuracy.py --budgets 10 --val-split 0.1 -- --lr 3e-3
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--model", default="cct_2_3x2_32",
                        help="any registered model (default: the fastest to a given accuracy in our trials)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[10.0], help="training minutes, one run each")
    parser.add_argument("--val-split", type=float, default=0.0, help="0.1 for tuning; 0 for the reported run")
    parser.add_argument("--out", default="/tmp/cct_time_to_accuracy")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("extra", nargs="*", help="more `cct train` flags, after --")
    args = parser.parse_args(argv)

    rows = []
    for budget in args.budgets:
        out = Path(args.out) / f"budget_{budget:g}min_{time.strftime('%Y%m%d-%H%M%S')}"
        cmd = [sys.executable, "-m", "cct", "train", "--recipe", "fast", "--data", args.data, "--out", str(out),
               "--time-budget", str(budget), "--val-split", str(args.val_split), *args.extra]
        cmd += ["--model", args.model]
        print(" ".join(cmd), file=sys.stderr, flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        wall = time.perf_counter() - start
        results = json.loads((out / "results.json").read_text())
        with open(out / "history.csv") as f:
            history = list(csv.DictReader(f))
        row = {"budget_minutes": budget, "model": results["model"], "train_seconds": results["train_seconds"],
               "process_seconds": round(wall, 1), "epochs": results["epochs"], "steps": results["steps"],
               "images_per_second": results["images_per_second"], "test_top1": results["test_top1"],
               "train_images": results["train_images"], "val_images": results["val_images"],
               "precision": results["precision"], "out": str(out),
               "val_top1_per_epoch": [float(h["val_top1"]) for h in history if h.get("val_top1")]}
        rows.append(row)
        print(f"budget {budget:g} min: {row['model']}, {row['epochs']} epochs in {row['train_seconds']:.0f} s of "
              f"training ({row['images_per_second']:.0f} images/s), test top-1 {row['test_top1']:.4f}",
              file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
