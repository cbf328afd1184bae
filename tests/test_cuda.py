"""The CUDA path: model parity with the CPU, the training step in bf16 and fp16, resume, eval/predict/export.

Every test marked `cuda` skips without a CUDA device; CI has none, so `benchmarks/gpu_check.sh` runs them
(`pytest -m cuda tests/test_cuda.py`) on a lent GPU. They go through the public surface (`cct.create_model`,
`cct.list_models`, `cct.train.train` with `cct.recipes.make_config`, and the `cct` command in-process), so
a refactoring of the internals does not break them. One test at the end runs anywhere: a checkpoint
trained in fp16 on a GPU must still evaluate and predict on a CPU.
"""
import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cct
from cct import cli
from cct.recipes import make_config
from cct.train import train
from helpers import benchmark_script, make_tree, run_cli



def requires_cuda(test):
    """Marks a test `cuda` (`pytest -m cuda` selects them) and skips it without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


MODEL = "cct_2_3x2_32"  # at the tree's 16×16: 16 tokens, a fraction of a second per epoch
NO_NOISE = ["--no-hflip", "--drop-rate", "0", "--attn-drop-rate", "0", "--drop-path-rate", "0"]


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CCT_DATA", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"))


def history(out: Path) -> list[dict]:
    with open(out / "history.csv", newline="") as f:
        return [{k: float(v) if v else None for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30)) if ref.norm() > 0 else float(got.norm())


# ---------------------------------------------------------------------- model parity
@pytest.fixture
def exact_fp32():
    """fp32 as fp32: no TF32 in cuBLAS or cuDNN (cuDNN's convolutions default to TF32)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("name", cct.list_models())
@pytest.mark.usefixtures("exact_fp32")
@requires_cuda
def test_forward_backward_parity_with_the_cpu(name):
    torch.manual_seed(0)
    cpu = cct.create_model(name, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    # as `cct train` places it on a GPU: channels-last weights and inputs
    gpu = copy.deepcopy(cpu).cuda().to(memory_format=torch.channels_last)
    C, (H, W) = cpu.cfg.in_chans, cpu.cfg.img_size
    x = torch.randn(2, C, H, W)
    weights = torch.randn(2, cpu.cfg.num_classes)  # a random functional of the logits: every logit gets a gradient
    outputs = []
    for model, inputs in ((cpu, x), (gpu, x.cuda().contiguous(memory_format=torch.channels_last))):
        model.train()
        logits = model(inputs)
        (logits * weights.to(logits.device)).sum().backward()
        model.eval()
        with torch.no_grad():
            outputs.append((logits, model(inputs)))
    (train_cpu, eval_cpu), (train_gpu, eval_gpu) = outputs
    assert train_gpu.device.type == "cuda" and torch.isfinite(train_gpu).all()
    assert relative_error(train_gpu, train_cpu) < 1e-4
    assert relative_error(eval_gpu, eval_cpu) < 1e-4
    assert relative_error(eval_cpu, train_cpu) < 1e-5  # no dropout: training and inference paths agree
    for (pname, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        assert p_gpu.grad is not None and p_cpu.grad is not None, pname
        ref, diff = p_cpu.grad.double(), p_gpu.grad.double().cpu() - p_cpu.grad.double()
        assert float(diff.norm()) <= 1e-4 * float(ref.norm()) + 1e-7, pname  # relative, or ~0 where ref is ~0


# ---------------------------------------------------------------------- training step in each precision
def _train_argv(tree: Path, out: Path, device: str, precision: str, *extra: str) -> list[str]:
    return ["train", "--model", MODEL, "--recipe", "keras", "--data", str(tree), "--out", str(out),
            "--epochs", "4", "--batch-size", "16", "--val-split", "0", "--device", device,
            "--precision", precision, "--procs", "1", "--seed", "0", "--quiet", *extra]


@pytest.fixture(scope="module")
def runs(tree, tmp_path_factory) -> dict[str, Path]:
    """One small run each: fp32 on the CPU, fp32, bf16 and fp16 on the GPU; augmentation and dropout off."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    root = tmp_path_factory.mktemp("runs")
    outs = {}
    for key, device, precision in (("cpu-fp32", "cpu", "fp32"), ("fp32", "cuda", "fp32"),
                                   ("bf16", "cuda", "bf16"), ("fp16", "cuda", "fp16")):
        out = root / key
        assert cli.main(_train_argv(tree, out, device, precision, *NO_NOISE)) == 0, key
        outs[key] = out
    return outs


def _find_scaler_states(obj) -> list[dict]:
    """Every GradScaler state dict (a dict with a float "scale") inside a checkpoint, wherever it is kept."""
    found = []
    if isinstance(obj, dict):
        if isinstance(obj.get("scale"), float) and "_growth_tracker" in obj:
            found.append(obj)
        for value in obj.values():
            found += _find_scaler_states(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found += _find_scaler_states(value)
    return found


def _scaler_skips(run: Path) -> int:
    """Steps the fp16 gradient scaler skipped on overflow: each halves its scale from 2**16 (no growth in 12 steps)."""
    (state,) = _find_scaler_states(torch.load(run / "last.pt", weights_only=True))
    return round(math.log2(2.0 ** 16 / state["scale"]))


@requires_cuda
@pytest.mark.parametrize("key, tolerance", [("fp32", 0.01), ("bf16", 0.03), ("fp16", 0.03)])
def test_training_in_each_precision_follows_the_cpu_run(runs, key, tolerance):
    results = json.loads((runs[key] / "results.json").read_text())
    assert results["device"].startswith("cuda") and results["precision"] == key
    assert results["epochs"] == 4 and results["skipped_steps"] == 0
    if key == "fp16":  # a step the scaler skips on overflow is a step of progress missing (~0.07 of loss here)
        skips = _scaler_skips(runs[key])
        assert skips <= 4
        tolerance += 0.08 * skips
    ref, got = history(runs["cpu-fp32"]), history(runs[key])
    assert len(got) == len(ref) == 4
    # on a CPU this run goes from 1.16 to 0.61 (bf16 within 4e-4 of fp32); fp32 on CUDA differs from it by
    # cuDNN's TF32 convolutions only
    assert ref[-1]["train_loss"] < 0.8 * ref[0]["train_loss"]
    for r, g in zip(ref, got):
        assert abs(g["train_loss"] - r["train_loss"]) <= tolerance * max(1.0, r["train_loss"]), (r, g)


@requires_cuda
def test_fp16_trains_with_a_gradient_scaler_and_bf16_without(runs):
    fp16 = _find_scaler_states(torch.load(runs["fp16"] / "last.pt", weights_only=True))
    assert len(fp16) == 1 and 0 < fp16[0]["scale"] < float("inf")
    assert _find_scaler_states(torch.load(runs["bf16"] / "last.pt", weights_only=True)) == []


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("fp16", 2e-3)])
@requires_cuda
def test_resume_on_cuda_continues_the_run(tree, tmp_path, capsys, precision, tolerance):
    # dropout and flips on: a resume that lost the CUDA random state, the optimiser or the scaler would differ
    def config(out: Path):
        return make_config(MODEL, str(tree), str(out), "keras", epochs=3, batch_size=16, val_split=0.0,
                           device="cuda", precision=precision, procs=1, seed=3)

    reference = train(config(tmp_path / "reference"), quiet=True)
    split = tmp_path / "split"
    with pytest.raises(cct.CCTError, match="resume with"):
        train(config(split), quiet=True, stop_at_step=4)  # 3 steps per epoch: mid-epoch 2
    code, _, err = run_cli(["train", "--resume", str(split), "--quiet"], capsys)
    assert code == 0, err
    resumed = json.loads((split / "results.json").read_text())
    assert resumed["epochs"] == reference["epochs"] == 3 and resumed["steps"] == reference["steps"]
    ref, got = history(tmp_path / "reference"), history(split)
    assert len(got) == len(ref) == 3
    for r, g in zip(ref, got):
        assert abs(g["train_loss"] - r["train_loss"]) <= tolerance, (r, g)
    assert abs(resumed["test_loss"] - reference["test_loss"]) <= tolerance


# ---------------------------------------------------------------------- eval, predict, export
@pytest.mark.parametrize("key", ["bf16", "fp16"])
@requires_cuda
def test_eval_predict_export_from_a_cuda_checkpoint(runs, tree, tmp_path, capsys, key):
    best = runs[key] / "best.pt"
    results = json.loads((runs[key] / "results.json").read_text())
    n_test = results["test_images"]
    code, out, err = run_cli(["eval", str(best), "--data", str(tree), "--json", "--device", "cuda", "--quiet"], capsys)
    assert code == 0, err
    on_gpu = json.loads(out)
    assert on_gpu["precision"] == key
    assert abs(on_gpu["top1"] - results["test_top1"]) <= 1 / n_test  # the test figure of `cct train`
    code, out, err = run_cli(["eval", str(best), "--data", str(tree), "--json", "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    on_cpu = json.loads(out)
    assert on_cpu["precision"] == ("fp32" if key == "fp16" else key)  # fp16 is a CUDA precision
    assert abs(on_cpu["top1"] - on_gpu["top1"]) <= 2 / n_test

    images = sorted(str(p) for p in (tree / "test").rglob("*.png"))[::4]
    code, out, err = run_cli(["predict", str(best), *images, "--json"], capsys)  # the recorded precision
    assert code == 0, err
    assert len(json.loads(out)["results"]) == len(images)
    code, out, err = run_cli(["predict", str(best), *images, "--json", "--precision", "fp32"], capsys)
    assert code == 0, err
    from_checkpoint = json.loads(out)["results"]

    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / "m.onnx"
    code, _, err = run_cli(["export", str(best), "--format", "onnx", "--output", str(onnx_file)], capsys)
    assert code == 0 and onnx_file.is_file(), err
    code, out, err = run_cli(["predict", str(onnx_file), *images, "--json"], capsys)
    assert code == 0, err
    for a, b in zip(from_checkpoint, json.loads(out)["results"]):
        assert a["predictions"][0]["class"] == b["predictions"][0]["class"]
        assert abs(a["predictions"][0]["probability"] - b["predictions"][0]["probability"]) < 1e-3


# ---------------------------------------------------------------------- bench
@requires_cuda
def test_bench_on_cuda(capsys):
    code, out, err = run_cli(["bench", "--model", MODEL, "--device", "cuda", "--precision", "bf16", "--batch-size",
                              "64", "--infer-batch-size", "64", "--steps", "2", "--windows", "2", "--warmup", "2",
                              "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["device"].startswith("cuda") and result["precision"] == "bf16"
    assert result["train_images_per_second"] > 0 and result["infer_images_per_second"] > 0
    assert 0 < result["train_share_of_peak"] and result["peak_memory_mb"] > 0


# ---------------------------------------------------------------------- anywhere
def test_a_checkpoint_trained_in_fp16_evaluates_and_predicts_on_a_cpu(tree, tmp_path, capsys):
    """fp16 is recorded by a GPU run; on a CPU, where fp16 is refused, its default becomes fp32."""
    torch.manual_seed(0)
    model = cct.create_model(MODEL, num_classes=3, img_size=16)
    model.class_names = ["ant", "bee", "cat"]
    path = cct.save_checkpoint(model, tmp_path / "fp16.pt",
                               eval={"precision": "fp16", "batch_size": 8, "tta": False, "mean": None, "std": None,
                                     "img_size": [16, 16], "in_chans": 3})
    image = str(next((tree / "test").rglob("*.png")))
    code, out, err = run_cli(["predict", str(path), image, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["results"][0]["predictions"][0]["class"] in model.class_names
    code, out, err = run_cli(["eval", str(path), "--data", str(tree), "--json", "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads(out)["precision"] == "fp32"
    code, _, err = run_cli(["eval", str(path), "--data", str(tree), "--device", "cpu", "--precision", "fp16"], capsys)
    assert code == 2 and "fp16" in err  # asked for explicitly, it stays an error


# ---------------------------------------------------------------------- benchmarks/gpu_check.sh (CI runs no GPU)
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STAGES = ["setup", "cuda_tests", "train_keras", "train_paper", "torchrun", "bench", "official"]


def _gpu_check_module():
    return benchmark_script("gpu_check")


def test_gpu_check_script_parses_and_lists_its_stages_in_priority_order():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    listed = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True, check=True).stdout
    stages = [line.split() for line in listed.splitlines()]
    assert [name for name, _ in stages] == STAGES
    text = SCRIPT.read_text()
    for name, timeout in stages:
        assert 0 < int(timeout) <= 120 and f"stage_{name}() {{" in text and f"\nrun_stage {name}" in text, name
    assert "BUDGET=285" in text  # the whole run stays under the 5 minutes a lease can spare
    for argv in (["--bogus"], ["--only", "nope"], ["--budget", "x"]):
        assert subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True).returncode == 2, argv


def test_gpu_check_dry_run_writes_the_summary(tmp_path):
    """The plumbing for real on a CPU: setup (tiny tree) and the CUDA tests (all skipped) into $OUT/summary.json."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "cuda_tests"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mode"] == "dry-run" and summary["done"] is True
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("setup", "ok"), ("cuda_tests", "ok")]
    tests = summary["stages"][1]["tests"]
    assert tests["tests"] > 50 and tests["skipped"] == tests["tests"] and tests["failed"] == []
    assert (tmp_path / "out" / "gpu_check.log").is_file()
    assert not list(tmp_path.glob("cct_gpu_check.*"))  # its work folder is removed


def test_gpu_check_bench_summary_finds_the_batch_that_fills_the_gpu():
    fill_summary = _gpu_check_module().fill_summary
    runs = [{"model": "m", "batch_size": b, "infer_batch_size": 2 * b, "train_images_per_second": r,
             "train_gflops": g, "infer_images_per_second": 2 * r, "infer_gflops": g / 3}
            for b, r, g in ((128, 1000.0, 100.0), (512, 9500.0, 950.0), (2048, 10000.0, 1000.0))]
    runs.append({"model": "m", "batch_size": 8192, "error": "timed out"})
    entry = fill_summary(runs, peak_gflops=4000.0)["m"]
    assert entry["train"] == {"best_images_per_second": 10000.0, "best_batch": 2048, "batch_to_fill": 512,
                              "share_of_bf16_peak": 0.25}
    assert entry["infer"]["best_batch"] == 4096 and entry["infer"]["batch_to_fill"] == 1024
    assert [b["train_batch"] for b in entry["batches"]] == [128, 512, 2048]
    assert fill_summary(runs, peak_gflops=None)["m"]["train"]["share_of_bf16_peak"] is None
