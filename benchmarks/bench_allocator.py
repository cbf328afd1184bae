"""The allocator tuning (`cct.runtime.tune_allocator`) on and off: alternating `cct bench` processes.

glibc's settings belong to a process, so each side runs in its own process; the sides alternate
round after round so that drift in the machine's load reaches both, and the ratio of medians is
printed.

    .venv/bin/python benchmarks/bench_allocator.py --rounds 3
    .venv/bin/python benchmarks/bench_allocator.py --model cct_7_3x1_32 --precision fp32 --rounds 3 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def run(env_value: str, args) -> dict:
    cmd = [sys.executable, "-m", "cct", "bench", "--json", "--no-peak", "--model", args.model,
           "--precision", args.precision, "--recipe", args.recipe, "--steps", str(args.steps),
           "--windows", str(args.windows)]
    env = {**os.environ, "CCT_TUNE_ALLOCATOR": env_value}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env)
    return json.loads(proc.stdout)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cct_2_3x2_32_keras")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--recipe", default="keras")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for i in range(args.rounds):
        for side in (("off", "on") if i % 2 == 0 else ("on", "off")):
            r = run("1" if side == "on" else "0", args)
            assert r["allocator_tuned"] is (side == "on"), f"the {side} run reported allocator_tuned={r['allocator_tuned']}"
            runs[side].append(r)
            print(f"round {i + 1} {side:>3}: train {r['train_images_per_second']:8.1f} img/s, "
                  f"infer {r['infer_images_per_second']:8.1f} img/s", file=sys.stderr)
    summary = {"model": args.model, "precision": args.precision, "recipe": args.recipe, "rounds": args.rounds}
    for kind in ("train", "infer"):
        med = {side: statistics.median(r[f"{kind}_images_per_second"] for r in rs) for side, rs in runs.items()}
        summary[kind] = {"off": med["off"], "on": med["on"], "ratio": round(med["on"] / med["off"], 3)}
    if args.json:
        print(json.dumps(summary))
    else:
        for kind in ("train", "infer"):
            s = summary[kind]
            print(f"{kind:>5}: off {s['off']:8.1f} img/s, on {s['on']:8.1f} img/s, ratio x{s['ratio']:.2f}")
    return summary


if __name__ == "__main__":
    main()
