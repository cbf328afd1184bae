"""Processes against threads: `cct bench --procs 1` and `--procs N` alternately, medians and ratios.

On a small CPU `cct train --procs N` runs N processes of one thread each, each on its share of every
batch, instead of one process whose N threads split every operation. Whether that pays depends on the
model (how much of a step is short operations); this script measures it for each model and recipe
given, alternating the two settings round after round so that drift in the machine's load reaches
both.

    .venv/bin/python benchmarks/bench_procs.py --rounds 3
    .venv/bin/python benchmarks/bench_procs.py --models cct_7_3x1_32 --steps 2 --windows 3 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from cct.recipes import RECIPE_MODELS


def run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=[f"{RECIPE_MODELS[r]}:{r}" for r in ("keras", "fast")],
                        help="MODEL or MODEL:RECIPE (default: the keras and the fast recipe's models)")
    parser.add_argument("--procs", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count(), help="processes of the multi-process side (default: one per CPU)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    summary: dict = {"procs": args.procs, "rounds": args.rounds, "precision": args.precision, "models": {}}
    for spec in args.models:
        model, _, recipe = spec.partition(":")
        sides = {"threads": "1", "procs": str(args.procs)}
        runs: dict[str, list[dict]] = {k: [] for k in sides}
        for i in range(args.rounds):
            for side in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
                threads = ["--threads", str(args.procs)] if side == "threads" else []  # not OMP_NUM_THREADS's
                cmd = [sys.executable, "-m", "cct", "bench", "--json", "--no-peak", "--model", model, *threads,
                       "--precision", args.precision, "--procs", sides[side], "--steps", str(args.steps),
                       "--windows", str(args.windows), *(["--recipe", recipe] if recipe else [])]
                r = run_json(cmd)
                runs[side].append(r)
                print(f"{spec} round {i + 1} {side:>7} ({r['procs']} x {r['threads']} threads): train "
                      f"{r['train_images_per_second']:.0f}/s, infer {r['infer_images_per_second']:.0f}/s",
                      file=sys.stderr, flush=True)
        med = {side: {k: statistics.median(r[k] for r in rs) for k in ("train_images_per_second",
                                                                        "infer_images_per_second")}
               for side, rs in runs.items()}
        summary["models"][spec] = {
            "median": med,
            "train_ratio": round(med["procs"]["train_images_per_second"] / med["threads"]["train_images_per_second"], 3),
            "infer_ratio": round(med["procs"]["infer_images_per_second"] / med["threads"]["infer_images_per_second"], 3),
            "threads_per_process": {side: rs[0]["threads"] for side, rs in runs.items()}}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"medians of {args.rounds} alternating rounds, {args.precision}; 1 process of N threads against "
              f"{args.procs} processes of 1 thread:")
        for spec, row in summary["models"].items():
            t, p = row["median"]["threads"], row["median"]["procs"]
            print(f"  {spec:28s} train {t['train_images_per_second']:7.1f} -> {p['train_images_per_second']:7.1f}/s "
                  f"(x{row['train_ratio']:.2f})   infer {t['infer_images_per_second']:7.1f} -> "
                  f"{p['infer_images_per_second']:7.1f}/s (x{row['infer_ratio']:.2f})")
    return summary


if __name__ == "__main__":
    main()
