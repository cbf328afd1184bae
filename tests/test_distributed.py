"""cct.distributed and data-parallel training: 2-process gloo runs under torchrun on tiny data (CPU).

Each torchrun launch costs seconds of interpreter and torch start-up, so the module makes two: the
command line on an image tree (outputs, agreement with one process) and a script that trains,
interrupts and resumes inside one process group.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cct import cli, distributed
from cct.train import make_config, train
from helpers import make_tree

MODEL = "cct_2_3x2_32"
# keras recipe without its random flips, and no dropout: one process and two then compute the same thing
SAME_MATH = ["--recipe", "keras", "--no-hflip", "--drop-rate", "0", "--attn-drop-rate", "0", "--drop-path-rate", "0",
             "--precision", "fp32", "--epochs", "2", "--batch-size", "12", "--val-split", "0.25", "--workers", "1"]




def torchrun(args: list[str], tmp_path: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "CCT_DATA": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_history(path: Path) -> list[dict]:
    import csv
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def two_process_run(tree, tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    out = work / "out"
    proc = torchrun(["-m", "cct", "train", "--model", MODEL, "--data", str(tree), "--out", str(out), *SAME_MATH], work)
    return out, proc


# ---------------------------------------------------------------------- the command line under torchrun
def test_two_processes_write_one_set_of_outputs(two_process_run):
    out, proc = two_process_run
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.pt", "last.pt", "history.csv", "curves.png", "config.json", "results.json"])  # no stray temporaries
    assert proc.stderr.count("done: 2 epochs") == 1 and proc.stderr.count("epoch 2/2: lr") == 1  # rank 0 alone
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs"] == 2 and results["steps"] == 6
    assert results["train_images"] == 36 and results["test_images"] == 18 and results["val_images"] == 12
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert len(torch.load(out / "last.pt", weights_only=True)["rng"]["ranks"]) == 2


def test_one_and_two_processes_agree(two_process_run, tree, tmp_path, monkeypatch):
    out2, _ = two_process_run
    monkeypatch.setenv("CCT_DATA", str(tmp_path / "cache"))
    out1 = tmp_path / "one"
    assert cli.main(["train", "--model", MODEL, "--data", str(tree), "--out", str(out1), "--quiet", *SAME_MATH]) == 0
    one, two = read_history(out1 / "history.csv"), read_history(out2 / "history.csv")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):  # same global batches, gradients averaged over the shards: only rounding differs
        for key in ("train_loss", "val_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-4), key
        assert a["train_top1"] == b["train_top1"] and a["val_top1"] == b["val_top1"]
    r1, r2 = (json.loads((o / "results.json").read_text()) for o in (out1, out2))
    assert r1["test_loss"] == pytest.approx(r2["test_loss"], abs=2e-4) and r1["test_top1"] == r2["test_top1"]
    w1, w2 = (torch.load(o / "last.pt", weights_only=True)["state_dict"] for o in (out1, out2))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=2e-4, rtol=1e-3, msg=k)


# ---------------------------------------------------------------------- resume, inside one process group
RESUME_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from cct import distributed, train as T
    from cct.data import Dataset, ImageSet

    def images(n, g):
        y = torch.arange(n) % 3
        x = (torch.rand(n, 3, 16, 16, generator=g) * 90 + y.view(-1, 1, 1, 1) * 70).to(torch.uint8)
        return ImageSet(x, y.long())

    def config(out):  # flips, translations, mixup (per-rank generators), dropout and drop path (per-rank torch RNG)
        return T.make_config("cct_2_3x2_32", "memory", out, "keras", epochs=2, batch_size=32, translate=2,
                             mixup_alpha=0.4, seed=3, precision="fp32")

    root = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    data = Dataset(images(90, g), images(30, g), None, ["ant", "bee", "cat"], "memory", 0)
    with distributed.process_group("cpu", threads=1) as job:
        kw = dict(dataset=data, quiet=True, rank=job.rank, world_size=job.world_size)
        reference = T.train(config(root + "/reference"), **kw)
        try:
            T.train(config(root + "/split"), stop_at_step=4, **kw)  # 3 steps per epoch: mid-epoch 2
            raise SystemExit("not interrupted")
        except T.TrainingInterrupted:
            pass
        resumed = T.train(T.resume_config(root + "/split"), resume=True, **kw)
        if job.rank == 0:
            with open(root + "/results.json", "w") as f:
                json.dump({"reference": reference, "resumed": resumed}, f)
''')


def test_distributed_run_resumes_exactly(tmp_path):
    (tmp_path / "resume.py").write_text(RESUME_SCRIPT)
    torchrun([str(tmp_path / "resume.py"), str(tmp_path)], tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    reference, resumed = results["reference"], results["resumed"]
    assert reference["world_size"] == resumed["world_size"] == 2
    assert resumed["test_loss"] == reference["test_loss"] and resumed["test_top1"] == reference["test_top1"]
    assert read_history(tmp_path / "split" / "history.csv") == read_history(tmp_path / "reference" / "history.csv")
    w1, w2 = (torch.load(tmp_path / o / "last.pt", weights_only=True)["state_dict"] for o in ("reference", "split"))
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


# ---------------------------------------------------------------------- helpers without a process group
def test_one_process_helpers_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group("cpu") as job:
        assert (job.rank, job.world_size, job.is_main) == (0, 1, True)
        assert not distributed.is_active()
        values = torch.tensor([1.5, 2.0])
        assert torch.equal(distributed.all_reduce_sum(values), values)
        assert distributed.any_true(True, False) == (True, False)
        assert distributed.all_finite(torch.tensor(1.0)) and not distributed.all_finite(torch.tensor(float("nan")))
        assert distributed.min_int(7) == 7 and distributed.from_main(True)
        assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
        assert distributed.shard_bounds(10) == (0, 10)
        assert torch.equal(distributed.sharded_rows(lambda x: x * 2, torch.arange(5)), torch.arange(5) * 2)
        with distributed.main_process_first():
            pass
    assert distributed.rank_seed(5, 0) == 5 and distributed.rank_seed(5, 1) != distributed.rank_seed(5, 0) + 1


def test_env_from_torchrun_variables():
    env = distributed.env_from_environ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.is_main) == (3, 4, 1, 2, False)
    assert distributed.env_from_environ({}) == distributed.DistEnv()


def test_global_batch_must_split_evenly(tmp_path):
    cfg = make_config(MODEL, "memory", str(tmp_path / "out"), "keras", batch_size=15)
    with pytest.raises(Exception, match="multiple of the 2 processes"):
        train(cfg, world_size=2, rank=0)
