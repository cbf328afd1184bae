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
from cct.errors import CCTError
from cct.recipes import make_config
from cct.train import train
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
        [".lock", "best.pt", "last.pt", "history.csv", "curves.png", "config.json", "results.json"])  # no stray
    # temporaries; .lock is the run folder's lock (cct.runlock), taken by rank 0 alone
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
    assert cli.main(["train", "--model", MODEL, "--data", str(tree), "--out", str(out1), "--quiet", *SAME_MATH,
                     "--procs", "1"]) == 0  # the keras recipe's default is a process per core
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


# ---------------------------------------------------------------------- --procs: the job cct starts by itself
def cct_subprocess(args: list[str], tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "CCT_DATA": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "cct", *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path, **kw)


def test_procs_is_the_torchrun_job(two_process_run, tree, tmp_path):
    out = tmp_path / "procs"
    proc = cct_subprocess(["train", "--model", MODEL, "--data", str(tree), "--out", str(out), *SAME_MATH,
                           "--procs", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done: 2 epochs") == 1  # the first process alone reports
    assert proc.stderr.count("training in 2 data-parallel processes (--procs 1 for one)") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(  # one .lock: the workers shared the first's
        [".lock", "best.pt", "last.pt", "history.csv", "curves.png", "config.json", "results.json"])
    # the same ranks, seeds and shards as torchrun's two processes: the same numbers, bit for bit
    assert read_history(out / "history.csv") == read_history(two_process_run[0] / "history.csv")
    mine, theirs = (json.loads((o / "results.json").read_text()) for o in (out, two_process_run[0]))
    assert mine["world_size"] == 2 and (mine["test_loss"], mine["test_top1"]) == (theirs["test_loss"], theirs["test_top1"])
    w1, w2 = (torch.load(o / "last.pt", weights_only=True)["state_dict"] for o in (out, two_process_run[0]))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_procs_workers_die_with_the_first_process(tree, tmp_path):
    import signal
    import time
    env = {**os.environ, "CCT_DATA": str(tmp_path / "cache")}
    parent = subprocess.Popen([sys.executable, "-m", "cct", "train", "--model", MODEL, "--data", str(tree),
                               "--out", str(tmp_path / "out"), "--epochs", "500", "--batch-size", "12", "--procs", "2",
                               "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _children(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _children(parent.pid)
        assert workers, "no worker process was started"
        time.sleep(1)  # the worker is starting up, not yet joined: nothing but the kernel would stop it
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "a worker outlived the process that started it"
    finally:
        parent.kill()
        for w in workers if "workers" in locals() else []:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_failing_worker_ends_the_job(tmp_path):
    """A worker that fails alone: its message, exit status 2, instead of a wait in a collective."""
    script = ("import time\nfrom cct import distributed\n"
              "with distributed.local_workers(2, ['no-such-command'], grace_seconds=0.5):\n    time.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "process 1 of 2 failed (exit status 2)" in proc.stderr, proc.stderr
    assert "invalid choice: 'no-such-command'" in proc.stderr  # the worker's own last line
    with pytest.raises(CCTError, match="process 1 of 2 failed"):  # one that fails while the block is ending
        with distributed.local_workers(2, ["no-such-command"], grace_seconds=60):
            import time
            time.sleep(1.5)
    assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ
    # a worker's death that breaks rank 0's own work first (a collective's socket reset): the worker is reported
    with pytest.raises(CCTError, match="process 1 of 2 failed .exit status 2."):
        with distributed.local_workers(2, ["no-such-command"], grace_seconds=60):
            import time
            time.sleep(6)  # the worker has died by now: its argument error comes after `import torch`, 3 s on CI hosts
            raise RuntimeError("[gloo] Connection reset by peer")
    with pytest.raises(RuntimeError, match="rank 0's own"):  # workers alive: rank 0's error is the error
        with distributed.local_workers(2, ["models", "--no-macs"], grace_seconds=60):
            raise RuntimeError("rank 0's own")


@pytest.mark.parametrize("extra, message", [
    (["--procs", "-1"], "--procs must be 0 (one per core) or positive"),
    (["--procs", "2", "--batch-size", "7"], "--batch-size 7 must be a multiple of --procs 2"),
    (["--procs", "2", "--data", "no-such-dir"], "no-such-dir"),  # found by both processes, said once
])
def test_procs_errors_are_one_line(tree, tmp_path, extra, message):
    args = ["train", "--model", MODEL, "--data", str(tree), "--out", str(tmp_path / "out"), "--epochs", "1", *extra]
    proc = cct_subprocess(args, tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "last.pt").exists()


def test_resolve_procs(monkeypatch):
    monkeypatch.setattr(distributed, "_cpu_cores", lambda: 6)
    assert distributed.resolve_procs(0, "cpu") == 6 and distributed.resolve_procs(3, "cpu") == 3
    batches = {"--batch-size": 128, "--infer-batch-size": 256}
    assert distributed.resolve_procs(0, "cpu", batch_sizes=batches) == 4  # as many as split the batches evenly
    assert distributed.resolve_procs(0, "cpu", batch_sizes={"--batch-size": 7}) == 1
    with pytest.raises(CCTError, match="--infer-batch-size 256 must be a multiple of --procs 3"):
        distributed.resolve_procs(3, "cpu", batch_sizes={"--batch-size": 129, "--infer-batch-size": 256})
    assert distributed.resolve_procs(0, "cuda") == 1 and distributed.resolve_procs(1, "cuda") == 1
    with pytest.raises(Exception, match="torchrun"):
        distributed.resolve_procs(2, "cuda")
    with pytest.raises(Exception, match="--procs"):
        distributed.resolve_procs(-1, "cpu")
    with distributed.local_workers(1, ["train"]) as n:  # one process: nothing is started
        assert n == 1 and "WORLD_SIZE" not in os.environ


# ---------------------------------------------------------------------- resume, inside one process group
RESUME_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from cct import distributed, recipes, resume, train as T
    from cct.data import Dataset, ImageSet

    def images(n, g):
        y = torch.arange(n) % 3
        x = (torch.rand(n, 3, 16, 16, generator=g) * 90 + y.view(-1, 1, 1, 1) * 70).to(torch.uint8)
        return ImageSet(x, y.long())

    def config(out):  # flips, translations, mixup (per-rank generators), dropout and drop path (per-rank torch RNG)
        return recipes.make_config("cct_2_3x2_32", "memory", out, "keras", epochs=2, batch_size=32, translate=2,
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
        resumed = T.train(resume.resume_config(root + "/split"), resume=True, **kw)
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
        assert distributed.average_gradients([torch.zeros(2)], finite=False, flags=(True, False)) == (False, (True, False))
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
