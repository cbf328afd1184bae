"""cct against the keras.io CCT example on the same machine: alternating runs, medians and ratios.

Each round runs the Keras example's model (benchmarks/keras_reference.py, in the throwaway Keras 3
+ TensorFlow venv that benchmarks/setup_keras_env.sh builds) and then `cct bench --json` in each
requested precision, in alternating order, so that drift in the machine's load reaches both sides.
The ratios are of the medians over rounds. Keras trains in float32 (its default policy), so
`fp32` is the like-for-like row and `auto` (bf16 autocast on CPUs with native bf16) is cct's default;
each precision is timed with the recipe's own `--procs` (keras: one process per core) and with one
process (`--procs 1`), so that the gain of each is visible.

    .venv/bin/python benchmarks/compare_keras.py --setup --rounds 3    # the first time: builds the Keras venv
    .venv/bin/python benchmarks/compare_keras.py --rounds 3            # then: reuses it
    .venv/bin/python benchmarks/compare_keras.py --keras-venv /tmp/kerasenv --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_json(cmd: list[str]) -> dict:
    """Run a command that prints one JSON object on stdout (logs on stderr pass through)."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keras-venv", default="/tmp/kerasenv", help="venv with Keras 3 + TensorFlow")
    parser.add_argument("--setup", action="store_true", help="build the Keras venv first (setup_keras_env.sh)")
    parser.add_argument("--model", default="cct_2_3x2_32_keras")
    parser.add_argument("--precisions", nargs="+", default=["auto", "fp32"], choices=["auto", "fp32", "bf16"])
    parser.add_argument("--procs", nargs="+", default=["default", "1"],
                        help="cct bench --procs values to time; 'default' is the recipe's own (keras: one per core)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--infer-batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window (both sides)")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per run (both sides)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)

    keras_python = Path(args.keras_venv) / "bin" / "python"
    if not args.setup and not keras_python.exists():  # a multi-GB install is asked for, never assumed
        parser.error(f"no Keras venv at {args.keras_venv}: give --keras-venv DIR, or --setup to build it there")
    if args.setup:
        subprocess.run(["bash", str(HERE / "setup_keras_env.sh"), args.keras_venv], check=True,
                       stdout=sys.stderr)
    keras_cmd = [str(keras_python), str(HERE / "keras_reference.py"), "--json", "--batch-size", str(args.batch_size),
                 "--infer-batch-size", str(args.infer_batch_size), "--window", str(args.steps),
                 "--windows", str(args.windows)]

    def cct_cmd(side: str) -> list[str]:
        precision, procs = side.split(" procs=")
        return [sys.executable, "-m", "cct", "bench", "--json", "--model", args.model, "--precision", precision,
                "--batch-size", str(args.batch_size), "--infer-batch-size", str(args.infer_batch_size),
                "--steps", str(args.steps), "--windows", str(args.windows),
                *([] if procs == "default" else ["--procs", procs])]

    sides = [f"{p} procs={n}" for p in args.precisions for n in args.procs]
    runs: dict[str, list[dict]] = {"keras": [], **{s: [] for s in sides}}
    for i in range(args.rounds):
        order = ["keras", *sides]
        if i % 2:
            order.reverse()
        for side in order:
            print(f"round {i + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
            result = run_json(keras_cmd if side == "keras" else cct_cmd(side))
            runs[side].append(result)
            print(f"  train {result['train_images_per_second']:.0f}/s, infer {result['infer_images_per_second']:.0f}/s",
                  file=sys.stderr, flush=True)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    keras_train, keras_infer = median("keras", "train_images_per_second"), median("keras", "infer_images_per_second")
    summary = {"model": args.model, "rounds": args.rounds, "batch_size": args.batch_size,
               "infer_batch_size": args.infer_batch_size,
               "keras": {"train_images_per_second": keras_train, "infer_images_per_second": keras_infer,
                         "versions": {k: runs["keras"][0].get(k) for k in ("keras", "tensorflow", "backend")}},
               "cct": {}}
    for p in sides:
        train, infer = median(p, "train_images_per_second"), median(p, "infer_images_per_second")
        summary["cct"][p] = {"precision_resolved": runs[p][0]["precision"], "procs_resolved": runs[p][0].get("procs", 1),
                             "train_images_per_second": train,
                             "infer_images_per_second": infer, "train_ratio": round(train / keras_train, 2),
                             "infer_ratio": round(infer / keras_infer, 2)}
    summary["runs"] = runs
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.model}, medians of {args.rounds} alternating rounds "
              f"(train batch {args.batch_size}, inference batch {args.infer_batch_size})")
        print(f"  Keras {summary['keras']['versions']['keras']} + TF {summary['keras']['versions']['tensorflow']} "
              f"(float32): train {keras_train:8.1f}/s   infer {keras_infer:8.1f}/s")
        for p, row in summary["cct"].items():
            print(f"  cct {p:18s} ({row['precision_resolved']}, {row['procs_resolved']} proc):  "
                  f"train {row['train_images_per_second']:8.1f}/s "
                  f"(×{row['train_ratio']:.2f})   infer {row['infer_images_per_second']:8.1f}/s (×{row['infer_ratio']:.2f})")
    return summary


if __name__ == "__main__":
    main()
