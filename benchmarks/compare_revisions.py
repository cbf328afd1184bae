"""Two revisions of cct on the same machine: `cct bench` alternating between them, medians and ratios.

The old revision is exported from git (`git archive`) into a temporary folder and run from there with
the same Python (its `src/` first on PYTHONPATH); the new one is this working tree. Each round runs
every model on both sides, in alternating order, so that drift in the machine's load reaches both.
The ratio new/old is of the medians over rounds.

    .venv/bin/python benchmarks/compare_revisions.py --old a8fcc82 --rounds 3
    .venv/bin/python benchmarks/compare_revisions.py --old a8fcc82 --models cct_2_3x2_32 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("cct_2_3x2_32_keras", "cct_2_3x2_32", "cct_7_3x1_32")
# cct_7_3x1_32 trains at ~35 img/s on 2 cores: a smaller timed window keeps a round within minutes
BENCH_ARGS = {"cct_7_3x1_32": ["--steps", "3", "--windows", "3", "--warmup", "1"]}
FIELDS = ("train_images_per_second", "infer_images_per_second", "train_sequences_per_second",
          "infer_sequences_per_second")  # those a run reports (--no-infer drops inference; text models count sequences)


def bench(src: Path, model: str, extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "cct", "bench", "--model", model, "--json", "--no-peak", *BENCH_ARGS.get(model, []),
           *extra]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env, cwd=src.parent)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="the git revision to compare against (e.g. a commit of main)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--bench-args", default="", help="extra `cct bench` arguments for both sides, one string")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    extra = args.bench_args.split()
    with tempfile.TemporaryDirectory() as tmp:
        archived = subprocess.run(["git", "-C", str(ROOT), "archive", args.old, "src"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        if archived.returncode:
            parser.error(f"--old {args.old}: {archived.stderr.decode(errors='replace').strip().splitlines()[-1]}")
        archive = archived.stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        sides = {"old": Path(tmp) / "src", "new": ROOT / "src"}
        runs: dict[str, dict[str, list[dict]]] = {m: {"old": [], "new": []} for m in args.models}
        for r in range(args.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for model in args.models:
                for side in order:
                    result = bench(sides[side], model, extra)
                    runs[model][side].append(result)
                    print(f"round {r + 1} {model} {side}: " + ", ".join(f"{f} {result[f]:.1f}" for f in FIELDS
                                                                        if f in result), file=sys.stderr, flush=True)
    summary = {"old": args.old, "rounds": args.rounds, "bench_args": extra, "models": {}}
    for model, sides_runs in runs.items():
        row = {}
        for f in (f for f in FIELDS if all(f in r for r in sides_runs["old"] + sides_runs["new"])):
            old = statistics.median(r[f] for r in sides_runs["old"])
            new = statistics.median(r[f] for r in sides_runs["new"])
            row[f] = {"old": round(old, 1), "new": round(new, 1), "ratio": round(new / old, 3),
                      "ratios_by_round": [round(n[f] / o[f], 3) for o, n in zip(sides_runs["old"], sides_runs["new"])]}
        row["precision"] = sides_runs["new"][0]["precision"]
        summary["models"][model] = row
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"new / old ({args.old}), medians of {args.rounds} alternating rounds:")
        for model, row in summary["models"].items():
            print(f"  {model} ({row['precision']}): " + "; ".join(
                f"{f.split('_')[0]} {row[f]['old']} → {row[f]['new']} {'seq' if 'sequences' in f else 'img'}/s "
                f"(×{row[f]['ratio']})" for f in FIELDS if f in row))
    return summary


if __name__ == "__main__":
    main()
