"""Inference throughput: ONNX Runtime against PyTorch on the same cct model (default cct_2_3x2_32_keras).

The model is exported with `cct.export.export_onnx` (dynamic batch, checked against PyTorch) and both
backends run float32 on the CPU with the same number of threads: PyTorch as `cct predict` and `cct eval`
run it (the fast kernels, `cct.kernels.use_kernels`, fused for inference, `cct.kernels.fuse`) in eval mode
under `torch.inference_mode()`, ONNX Runtime's CPU execution provider with all graph optimisations. For each
batch size, after warm-up calls, `--repeats` windows of about `--window` seconds are timed per backend,
the two backends taking turns so that both see the same load, and the median window rate (images/s) is
reported with the spread.

    .venv/bin/python benchmarks/bench_onnx.py            # readable table
    .venv/bin/python benchmarks/bench_onnx.py --json     # one JSON object on stdout

The machine is shared: check `load_average_before` (near 0 when idle) and the spread of the windows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import cct
from cct.export import export_onnx
from cct.kernels import fuse, use_kernels
from cct.registry import model_kind
from cct.predict import onnx_session


def calls_per_window(run, window: float) -> int:
    """Warm up `run` (allocations, graph caches) and size a timed window of about `window` seconds."""
    calls = 0
    start = time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min(window, 1.0):
        run()
        calls += 1
    return max(1, round(window * calls / (time.perf_counter() - start)))


def rates(runs: dict, batch: int, repeats: int, window: float) -> dict:
    """Images/s of each backend: windows taken in turn (A B, B A, ...) so both see the same machine load."""
    sizes = {name: calls_per_window(run, window) for name, run in runs.items()}
    measured: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t = time.perf_counter()
            for _ in range(sizes[name]):
                runs[name]()
            measured[name].append(batch * sizes[name] / (time.perf_counter() - t))
    return {name: {"images_per_second": statistics.median(v), "min": min(v), "max": max(v), "windows": repeats,
                   "calls_per_window": sizes[name]} for name, v in measured.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cct_2_3x2_32_keras")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--repeats", type=int, default=7, help="timed windows per measurement (median reported)")
    parser.add_argument("--window", type=float, default=2.0, help="seconds per timed window")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.repeats < 1 or args.window <= 0:
        parser.error("--repeats must be at least 1 and --window positive")
    if model_kind(args.model) != "image":
        parser.error(f"{args.model} is a text model: this script times image models")
    model = cct.create_model(args.model).eval()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        report = export_onnx(model, Path(tmp) / "model.onnx")
        model = fuse(use_kernels(model, "fast")).eval()  # the PyTorch path cct's own inference takes
        session = onnx_session(report.path, threads=args.threads)
        results = []
        for batch in args.batch_sizes:
            x = torch.randn(batch, model.cfg.in_chans, *model.cfg.img_size)
            x_np = x.numpy()

            def run_torch():
                with torch.inference_mode():
                    model(x)

            def run_onnx():
                session.run(None, {"images": x_np})

            measured = rates({"pytorch": run_torch, "onnxruntime": run_onnx}, batch, args.repeats, args.window)
            for backend, r in measured.items():
                results.append({"backend": backend, "batch_size": batch, **r})
                if not args.json:
                    print(f"{backend:12s} batch {batch:4d}: {r['images_per_second']:10.1f} img/s "
                          f"(windows {r['min']:.1f}-{r['max']:.1f})", file=sys.stderr)

    import onnxruntime
    out = {"model": args.model, "threads": args.threads, "torch": torch.__version__,
           "onnxruntime": onnxruntime.__version__, "opset": report.opset, "export_max_abs_diff": report.max_abs_diff,
           "cpu": platform.processor() or platform.machine(), "load_average_before": load_before, "results": results}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"\n{args.model}, float32, {args.threads} threads; torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, opset {report.opset}; load average before {load_before:.2f}\n")
    print("| batch | PyTorch img/s | ONNX Runtime img/s | ONNX Runtime / PyTorch |")
    print("|------:|--------------:|-------------------:|-----------------------:|")
    for batch in args.batch_sizes:
        pt, ort = (next(r["images_per_second"] for r in results if r["backend"] == b and r["batch_size"] == batch)
                   for b in ("pytorch", "onnxruntime"))
        print(f"| {batch} | {pt:,.0f} | {ort:,.0f} | {ort / pt:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
