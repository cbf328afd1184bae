"""The Python half of `benchmarks/gpu_check.sh`: its JSON summary, the bf16 GEMM peak, the bench sweep, the
official SHI-Labs model's timing, and a tiny image tree for the dry run.

The shell script runs the stages (each under its own `timeout`) and calls `record` after each one, which
rewrites the summary under `$OUT` atomically, so whatever a killed run leaves behind is a valid JSON file.
Nothing here needs a GPU: with `--device cpu` every subcommand runs on a CPU (the script's `--dry-run`).
Only the standard library is imported at the top, so that `record` after each stage starts in a moment;
the subcommands that compute import torch (the machine lending the GPU has no registry: nothing else).
`python3 benchmarks/gpu_check.py --help` lists the subcommands; gpu_check.sh shows how each is called.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

# a batch size "fills" the GPU when it reaches this share of the best rate measured for the model
FILL_SHARE = 0.9


def write_json(path: Path, data: dict) -> None:
    """Atomic: a run killed mid-write leaves the previous file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------- running a stage
def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def cmd_run(args: argparse.Namespace) -> None:
    """Run a stage in a process group of its own; on timeout SIGTERM the group (exit status 124).

    `timeout` signals only the shell of a stage, which dies at once, and returns while torchrun's workers
    or a `cct bench` child still run (and hold the GPU during the next stage). Here whatever the stage
    leaves running gets `--grace` seconds to finish (a SIGTERMed `cct train` saves after its current
    step), then SIGKILL.
    """
    with open(args.log, "ab") as log:
        proc = subprocess.Popen(args.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            rc = 124
        deadline = time.monotonic() + args.grace  # one grace period in all: a stage ends by timeout + grace
        while proc.poll() is None or _group_alive(proc.pid):  # poll() reaps the shell: no zombie counts
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                log.write(f"[gpu_check] killed what the stage left running {args.grace:.0f} s on\n".encode())
                proc.wait()
                break
            time.sleep(0.2)
    sys.exit(rc)


# ---------------------------------------------------------------------- summary
def environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "machine": platform.machine()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported())
    return env


def cmd_init(args: argparse.Namespace) -> None:
    write_json(args.summary, {"script": "benchmarks/gpu_check.sh", "mode": args.mode, "commit": args.commit,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": args.budget,
                              "environment": environment(), "stages": [], "done": False})


def junit_counts(path: Path) -> dict:
    """Counts and failed test ids from pytest's --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = [f"{case.get('classname', '')}::{case.get('name')}" for case in root.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None][:30]
    return counts


def train_outcome(out: Path) -> dict:
    """What a `cct train` run left in its --out folder: results.json's figures and the history."""
    result: dict = {}
    results = read_json(out / "results.json")
    if results:
        result.update({k: results.get(k) for k in ("model", "recipe", "epochs", "steps", "test_top1", "test_top5",
                                                   "train_seconds", "images_per_second", "train_images",
                                                   "val_images", "best_val_top1", "precision", "device",
                                                   "world_size", "skipped_steps")})
    try:
        with open(out / "history.csv", newline="") as f:
            result["history"] = list(csv.DictReader(f))
    except OSError:
        pass
    return result


def cmd_record(args: argparse.Namespace) -> None:
    summary = read_json(args.summary) or {"stages": []}
    stage = {"name": args.stage, "status": args.status, "rc": args.rc, "seconds": args.seconds,
             "timeout_s": args.timeout}
    try:
        if args.junit and Path(args.junit).is_file():
            stage["tests"] = junit_counts(Path(args.junit))
        if args.train_out:
            stage["result"] = train_outcome(Path(args.train_out))
        if args.result_json:
            stage["result"] = read_json(Path(args.result_json))
    except Exception as e:  # a damaged output file must not lose the stage's status
        stage["record_error"] = f"{type(e).__name__}: {e}"
    if args.note:
        stage["note"] = args.note
    summary["stages"] = [s for s in summary.get("stages", []) if s["name"] != args.stage] + [stage]
    summary["elapsed_s"] = args.elapsed
    write_json(args.summary, summary)


# ---------------------------------------------------------------------- GEMM peak
def gemm_peak(device, precision: str, size: int, repeats: int = 10) -> dict:
    """GFLOP/s of a (size × size) @ (size × size) product on random data: the median of `repeats` timings."""
    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: cuBLAS handles and heuristics
        a @ b
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            a @ b
            seconds.append(time.perf_counter() - t)
    gflops = 2 * size ** 3 / statistics.median(seconds) / 1e9
    return {"precision": precision, "size": size, "gflops": round(gflops, 1), "tflops": round(gflops / 1e3, 1),
            "device": str(device)}


def cmd_peak(args: argparse.Namespace) -> None:
    import torch
    result = gemm_peak(torch.device(args.device), args.precision, args.size)
    write_json(args.json_out, result)
    print(json.dumps(result))


# ---------------------------------------------------------------------- cct bench sweep
def fill_summary(runs: list[dict], peak_gflops: float | None) -> dict:
    """Per model: each batch size's rates, the best, and the smallest batch within FILL_SHARE of the best."""
    by_model: dict[str, list[dict]] = {}
    for run in runs:
        if "train_images_per_second" in run or "infer_images_per_second" in run:
            by_model.setdefault(run["model"], []).append(run)
    summary = {}
    for model, rows in by_model.items():
        entry: dict = {"batches": []}
        for row in sorted(rows, key=lambda r: r["batch_size"]):
            item = {"train_batch": row["batch_size"], "infer_batch": row["infer_batch_size"],
                    "train_images_per_second": row.get("train_images_per_second"),
                    "infer_images_per_second": row.get("infer_images_per_second"),
                    "train_tflops": round(row["train_gflops"] / 1e3, 2) if "train_gflops" in row else None,
                    "infer_tflops": round(row["infer_gflops"] / 1e3, 2) if "infer_gflops" in row else None,
                    "peak_memory_mb": row.get("peak_memory_mb")}
            if peak_gflops:
                for kind in ("train", "infer"):
                    if f"{kind}_gflops" in row:
                        item[f"{kind}_share_of_bf16_peak"] = round(row[f"{kind}_gflops"] / peak_gflops, 4)
            entry["batches"].append(item)
        for kind, batch_key in (("train", "train_batch"), ("infer", "infer_batch")):
            rated = [b for b in entry["batches"] if b[f"{kind}_images_per_second"]]
            if not rated:
                continue
            best = max(rated, key=lambda b: b[f"{kind}_images_per_second"])
            filled = min((b for b in rated if b[f"{kind}_images_per_second"] >= FILL_SHARE
                          * best[f"{kind}_images_per_second"]), key=lambda b: b[batch_key])
            entry[kind] = {"best_images_per_second": best[f"{kind}_images_per_second"],
                           "best_batch": best[batch_key], "batch_to_fill": filled[batch_key],
                           "share_of_bf16_peak": best.get(f"{kind}_share_of_bf16_peak")}
        summary[model] = entry
    return summary


def cmd_bench(args: argparse.Namespace) -> None:
    """`cct bench --json` for each model and batch size, one process each; the file is rewritten after each."""
    result: dict = {"peak": read_json(args.peak) if args.peak else None, "runs": [], "fill_share": FILL_SHARE}
    peak_gflops = (result["peak"] or {}).get("gflops")
    deadline = time.monotonic() + args.budget
    for model in args.models:
        for batch in args.batch_sizes:
            left = deadline - time.monotonic()
            if left < 5:
                result["runs"].append({"model": model, "batch_size": batch, "skipped": "out of time"})
                continue
            cmd = [sys.executable, "-m", "cct", "bench", "--model", model, "--device", args.device,
                   "--precision", args.precision, "--batch-size", str(batch), "--infer-batch-size", str(2 * batch),
                   "--steps", str(args.steps), "--windows", str(args.windows), "--warmup", str(args.warmup),
                   "--procs", "1", "--no-peak", "--json"]
            print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
            try:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=min(args.timeout_each, left))
                run = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
                    {"model": model, "batch_size": batch, "error": f"exit status {proc.returncode}"}
            except subprocess.TimeoutExpired:
                run = {"model": model, "batch_size": batch, "error": "timed out"}
            except (ValueError, IndexError) as e:
                run = {"model": model, "batch_size": batch, "error": f"no JSON on stdout: {e}"}
            result["runs"].append(run)
            result["summary"] = fill_summary(result["runs"], peak_gflops)
            write_json(args.json_out, result)
            print(json.dumps({k: run.get(k) for k in ("model", "batch_size", "train_images_per_second",
                                                      "infer_images_per_second", "peak_memory_mb", "error")}),
                  file=sys.stderr, flush=True)
    result["summary"] = fill_summary(result["runs"], peak_gflops)
    write_json(args.json_out, result)


# ---------------------------------------------------------------------- the official SHI-Labs model
def cmd_official(args: argparse.Namespace) -> None:
    """Training and inference images/s of the official `cct_7_3x1_32` (its own code, eager, autocast).

    The training step is what its timm trainer does per batch on ready tensors: forward under bf16
    autocast, label-smoothed cross-entropy, backward, AdamW step (no augmentation, in its favour); bf16
    needs no gradient scaler.
    """
    import torch
    sys.path.insert(0, str(Path(args.repo).resolve()))  # before this repository's own src/ folder
    import src as official  # noqa: E402  (the official package: src/cct.py, src/cvt.py, src/vit.py)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(official, args.model)(num_classes=10).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5.5e-4, weight_decay=6e-2)
    result: dict = {"model": args.model, "precision": "autocast bf16", "device": str(device),
                    "params": sum(p.numel() for p in model.parameters()), "runs": []}
    deadline = time.monotonic() + args.budget

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def rate(step, batch: int) -> float:
        for _ in range(args.warmup):
            step()
        rates = []
        for _ in range(args.windows):
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            rates.append(args.steps * batch / (time.perf_counter() - t))
        return round(statistics.median(rates), 1)

    for batch in args.batch_sizes:
        if time.monotonic() > deadline:
            result["runs"].append({"batch_size": batch, "skipped": "out of time"})
            continue
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device)

        def train_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
            loss.backward()
            optimizer.step()

        @torch.no_grad()
        def infer_step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                model(x)

        model.train()
        train_rate = rate(train_step, batch)
        model.eval()
        result["runs"].append({"batch_size": batch, "train_images_per_second": train_rate,
                               "infer_images_per_second": rate(infer_step, batch)})
        write_json(args.json_out, result)
        print(json.dumps(result["runs"][-1]), file=sys.stderr, flush=True)
    write_json(args.json_out, result)


# ---------------------------------------------------------------------- dry-run data
def cmd_make_tree(args: argparse.Namespace) -> None:
    """root/{train,test}/<class>/*.png, 24 and 8 a class at 32×32: each class its own mean colour."""
    import torch
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 24), ("test", 8)):
        for c, name in enumerate(("ant", "bee", "cat")):
            folder = Path(args.root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = torch.randint(0, 90, (32, 32, 3), generator=g, dtype=torch.uint8) + 70 * c
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


# ---------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> None:
    """Mark the summary complete, and print it as a short table for the end of the script's output."""
    s = read_json(args.summary) or {"stages": []}
    s.update(elapsed_s=args.elapsed, done=True, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json(args.summary, s)
    env = s.get("environment", {})
    print(f"gpu_check ({s.get('mode')}): {env.get('gpu', 'no GPU')}, torch {env.get('torch')}, "
          f"{s.get('elapsed_s')} s of {s.get('budget_s')} s")
    for stage in s.get("stages", []):
        line = f"  {stage['name']:<18} {stage['status']:<8} {stage['seconds']:>6} s"
        tests = stage.get("tests")
        result = stage.get("result") or {}
        if tests:
            failed = tests["failures"] + tests["errors"]
            line += f"  passed {tests['passed']}, failed {failed}, skipped {tests['skipped']}"
        elif "test_top1" in result:
            history = result.get("history") or [{}]
            line += (f"  steps {result.get('steps')}, {result.get('images_per_second')} img/s, test top-1 "
                     f"{result.get('test_top1')}, epoch-1 val top-1 {history[0].get('val_top1') or '-'}")
        elif "summary" in result:
            for model, entry in (result.get("summary") or {}).items():
                for kind in ("train", "infer"):
                    if kind in entry:
                        k = entry[kind]
                        line += (f"\n      {model} {kind}: {k['best_images_per_second']} img/s at batch "
                                 f"{k['best_batch']} (fills at {k['batch_to_fill']}), share of bf16 peak "
                                 f"{k['share_of_bf16_peak']}")
        elif "runs" in result:
            for run in result["runs"]:
                line += f"\n      batch {run.get('batch_size')}: {run.get('train_images_per_second')} / " \
                        f"{run.get('infer_images_per_second')} img/s train / infer"
        print(line)


def _sweep_args(p: argparse.ArgumentParser, budget: float) -> None:
    """The options `bench` and `official` share: device, timing windows, time budget, output file."""
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-sizes", nargs="+", type=int, required=True)
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3, help="timed windows; the median is reported")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--budget", type=float, default=budget, help="seconds for the whole sweep")
    p.add_argument("--json-out", type=Path, required=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="start the summary with the environment")
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--mode", choices=("gpu", "dry-run"), required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--commit", default=None)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("run", help="run a stage's command in its own process group, with a timeout")
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--grace", type=float, default=10.0, help="seconds left to stragglers before SIGKILL")
    p.add_argument("--log", type=Path, required=True, help="the file the command's output is appended to")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- the command")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("record", help="add one stage's outcome to the summary")
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--status", choices=("ok", "failed", "timeout", "skipped"), required=True)
    p.add_argument("--rc", type=int, default=None)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--junit", default=None, help="pytest's --junitxml file")
    p.add_argument("--train-out", default=None, help="a `cct train --out` folder")
    p.add_argument("--result-json", default=None, help="a JSON file to attach as the result")
    p.add_argument("--note", default=None)
    p.add_argument("--elapsed", type=float, default=None)
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("peak", help="the GEMM rate of a large square product")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--json-out", type=Path, required=True)
    p.set_defaults(func=cmd_peak)

    p = sub.add_parser("bench", help="cct bench over models and batch sizes (inference at twice the batch)")
    _sweep_args(p, budget=100)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--timeout-each", type=float, default=60, help="seconds for one `cct bench`")
    p.add_argument("--peak", type=Path, default=None, help="the `peak` subcommand's JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("official", help="time the official SHI-Labs model with bf16 autocast")
    p.add_argument("--repo", required=True, help="a folder holding the official src/ package")
    p.add_argument("--model", default="cct_7_3x1_32")
    _sweep_args(p, budget=40)
    p.set_defaults(func=cmd_official)

    p = sub.add_parser("make-tree", help="a tiny image tree for the dry run")
    p.add_argument("root")
    p.set_defaults(func=cmd_make_tree)

    p = sub.add_parser("report", help="mark the summary complete and print it as a short table")
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--elapsed", type=float, default=None)
    p.set_defaults(func=cmd_report)

    args = parser.parse_args(argv)
    if getattr(args, "argv", None) and args.argv[0] == "--":
        args.argv = args.argv[1:]
    args.func(args)


if __name__ == "__main__":
    main()
