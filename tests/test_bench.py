"""cct.bench, and the speed-ups it measures: each must compute the same model as before."""
import json
import subprocess
import sys

import pytest

from cct import bench, recipes
from cct.optim import Lookahead
from cct.cli import main


# ---------------------------------------------------------------------- the benchmark
def test_benchmark_reports_rates():
    r = bench.benchmark("cct_2_3x2_32_keras", batch_size=8, infer_batch_size=8, precision="fp32", steps=1,
                        windows=2, warmup=1, peak=False)
    assert r["train_images_per_second"] > 0 and r["infer_images_per_second"] > 0
    assert len(r["train_window_rates"]) == 2 and r["precision"] == "fp32" and r["recipe"] == "keras"
    assert r["gflops_per_image_forward"] == pytest.approx(0.082, abs=0.002)
    assert r["peak_memory_mb"] > 0


def test_benchmark_builds_the_model_of_its_recipe():
    """`--recipe fast` turns dropout off, which changes the attention path: the timed model must follow."""
    fast = bench.benchmark("cct_2_3x2_32_keras", batch_size=4, steps=1, windows=1, warmup=0, recipe="fast",
                           precision="fp32", infer=False, peak=False)
    keras = bench.benchmark("cct_2_3x2_32_keras", batch_size=4, steps=1, windows=1, warmup=0,
                            precision="fp32", infer=False, peak=False)
    assert fast["drop_rates"] == {"drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": 0.05}
    assert keras["drop_rates"] == {}  # the keras recipe keeps the model's own rates


def test_benchmark_times_the_loops_own_work_of_the_recipe(monkeypatch):
    """The fast recipe's alternating flip (and a recipe's lookahead) run in the loop, not the step: timed too."""
    calls = {"flip": 0, "lookahead": 0}
    real_flip, real_update = bench.flip_where, Lookahead.update
    monkeypatch.setattr(bench, "flip_where", lambda x, f: calls.__setitem__("flip", calls["flip"] + 1) or
                        real_flip(x, f))
    monkeypatch.setattr(Lookahead, "update", lambda self, t, total: calls.__setitem__("lookahead", t) or
                        real_update(self, t, total))
    monkeypatch.setitem(recipes.RECIPES, "fast", {**recipes.RECIPES["fast"], "lookahead": True})
    bench.benchmark("cct_2_3x2_32_keras", batch_size=4, steps=2, windows=1, warmup=1, recipe="fast",
                    precision="fp32", infer=False, peak=False)
    assert calls == {"flip": 3, "lookahead": 3}
    calls.update(flip=0, lookahead=0)
    bench.benchmark("cct_2_3x2_32_keras", batch_size=4, steps=2, windows=1, warmup=1, recipe="keras",
                    precision="fp32", infer=False, peak=False, world_size=1)
    assert calls == {"flip": 0, "lookahead": 0}  # coin flips inside the step's augmentation; no lookahead


def test_gemm_peak_is_positive():
    assert bench.gemm_peak_gflops("fp32", size=128, min_seconds=0.01) > 0


def test_bench_imports_the_step_not_the_loop_and_needs_no_resource_module():
    """`cct bench` times `cct.step.TrainStep` without importing `cct.train`; `resource` is POSIX's only."""
    script = ("import sys; sys.modules['resource'] = None\n"  # None in sys.modules: the import fails
              "import torch, cct.bench\n"
              "assert 'cct.train' not in sys.modules, 'cct.train imported'\n"
              "assert cct.bench.peak_memory_mb(torch.device('cpu')) is None\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cli_json_prints_one_object(capsys):
    code = main(["bench", "--model", "cct_2_3x2_32", "--batch-size", "4", "--infer-batch-size", "4", "--steps", "1",
                 "--windows", "1", "--warmup", "0", "--no-peak", "--precision", "fp32", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert {"train_images_per_second", "infer_images_per_second"} <= set(result)
    assert "timing training" in captured.err


def test_cli_rejects_bad_values(capsys):
    assert main(["bench", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_cli_procs_times_the_whole_job(capsys):
    """`--procs 2`: two processes, one thread each, each on half of every batch; one JSON object."""
    code = main(["bench", "--model", "cct_2_3x2_32", "--batch-size", "4", "--infer-batch-size", "4", "--steps", "2",
                 "--windows", "2", "--warmup", "1", "--precision", "fp32", "--json", "--procs", "2"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert result["procs"] == 2 and result["threads"] == 1 and result["batch_size"] == 4
    assert result["train_images_per_second"] > 0 and result["infer_images_per_second"] > 0
    assert result["gemm_peak_gflops"] > 0 and result["train_share_of_peak"] > 0  # measured by the first process


def test_cli_procs_defaults_to_the_recipe(capsys, monkeypatch):
    from cct import distributed
    monkeypatch.setattr(distributed, "_cpu_cores", lambda: 2)
    assert main(["bench", "--model", "cct_2_3x2_32_keras", "--batch-size", "4", "--infer-batch-size", "4", "--steps",
                 "1", "--windows", "1", "--warmup", "0", "--no-peak", "--no-infer", "--json"]) == 0
    keras = json.loads(capsys.readouterr().out)
    assert keras["procs"] == 2  # the keras recipe: a process per core
    assert main(["bench", "--model", "cct_2_3x2_32_keras", "--recipe", "fast", "--batch-size", "4", "--steps", "1",
                 "--windows", "1", "--warmup", "0", "--no-peak", "--no-infer", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["procs"] == 1
