"""Fault injection: kills, failed writes, signals, non-finite losses and a corpus of broken inputs.

What the reliability promise says, done for real:
* a `python -m cct train` subprocess is SIGKILLed at seeded random moments and, through
  tests/faults/sitecustomize.py, at chosen points of a checkpoint write (mid-write, before the
  fsync's rename, just after it, before any last.pt exists, at the very end). After each kill the
  files left load, `cct train --resume` finishes, history.csv has one row per epoch — the rows of
  an uninterrupted run — and no temporary file is left behind;
* writes fail with ENOSPC or EROFS (injected into the write, the rename or the temporary file's
  creation — CI runs as root, so a read-only folder would prove nothing — and a real /dev/full):
  one clear line, exit status 2, the previous file intact;
* SIGTERM finishes the step, saves, says how to resume; a second SIGINT aborts without saving;
  a NaN loss stops with the last good checkpoint kept, or is skipped and counted;
* broken inputs, all generated here: images (empty, random, truncated, decompression bombs,
  unconvertible modes), archives (path traversal, links, truncation), CIFAR pickles (crafted
  globals, wrong shapes, labels out of range), checkpoints (random bytes, truncated, pickled code,
  damaged fields, another model's or class count's), Keras files and out-of-range flags, each
  through `cct train`, `eval`, `predict`, `export` and `import-keras`: one line, non-zero exit,
  no traceback, and code in a file never runs.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import pickle
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cct
from cct import cli
from cct import train as train_mod
from cct.checkpoint import read_checkpoint
import helpers
from helpers import CLASSES

MODEL = "cct_2_3x2_32"
EPOCHS = 3
# 27 training images (36 less a 25% validation split) in batches of 8: 4 steps per epoch
TRAIN_FLAGS = ["--img-size", "16", "--epochs", str(EPOCHS), "--workers", "1", "--precision", "fp32",
               "--batch-size", "8", "--val-split", "0.25", "--seed", "0", "--quiet"]
FAULTS = Path(__file__).parent / "faults"
KERAS_WEIGHTS = Path(__file__).parent / "fixtures" / "keras_cct.weights.h5"


# ---------------------------------------------------------------------- helpers and fixtures
@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CCT_DATA", str(cache))
        yield cache


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def make_tree(root: Path, classes=CLASSES, train_per_class=12, test_per_class=4, size=16) -> Path:
    return helpers.make_tree(root, classes, train_per_class, test_per_class, size)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`cct ARGV` in this process; warnings reach stderr as in a fresh `cct` process (pytest would record them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = warnings._showwarning_orig
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err: str, *needles: str, status: int = 2) -> None:
    assert code == status, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def history(out: Path) -> list[dict]:
    """history.csv without the timing column."""
    with open(out / "history.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def temporaries(out: Path) -> list[Path]:
    return sorted(out.glob(".*.tmp"))


def cct_subprocess(argv: list[str], faults: str = "", kill_after: float | None = None,
                   timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m cct ...` with tests/faults on its path and CCT_FAULTS set; optionally SIGKILLed after a delay."""
    env = dict(os.environ, CCT_FAULTS=faults, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "cct", *map(str, argv)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train_argv(tree: Path, out: Path, *extra) -> list[str]:
    return ["train", "--model", MODEL, "--data", tree, "--out", out, *TRAIN_FLAGS, *extra]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    """An uninterrupted subprocess run: what every interrupted and resumed run must end as."""
    out = tmp_path_factory.mktemp("reference") / "out"
    start = time.perf_counter()
    proc = cct_subprocess(train_argv(tree, out))
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert [int(r["epoch"]) for r in history(out)] == list(range(1, EPOCHS + 1))
    return {"out": out, "seconds": seconds, "history": history(out),
            "results": json.loads((out / "results.json").read_text())}


def assert_leftovers_load(out: Path) -> None:
    """Whatever a killed run left in place is complete: last.pt and best.pt load."""
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            model = cct.load_checkpoint(out / name)
            assert model.class_names == CLASSES
    if (out / "last.pt").exists():
        state = read_checkpoint(out / "last.pt")["train_state"]
        assert 1 <= state["epoch"] <= EPOCHS and state["batch"] == 0  # SIGKILL never saves mid-epoch


def resume_and_check(out: Path, tree: Path, reference: dict, capsys) -> None:
    """`cct train --resume` finishes the run exactly as the uninterrupted one, leaving no temporary file."""
    if not (out / "last.pt").exists() and not (out / "config.json").exists():
        code, _, err = run_cli(["train", "--resume", out], capsys)  # killed before anything was written
        assert_one_line_error(code, err, "nothing to resume")
        code, _, err = run_cli(train_argv(tree, out), capsys)
    else:
        code, _, err = run_cli(["train", "--resume", out, "--quiet"], capsys)
    assert code == 0, err
    assert history(out) == reference["history"]  # one row per epoch, no duplicates, the same numbers
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == EPOCHS and results["test_top1"] == reference["results"]["test_top1"]
    assert results["test_loss"] == reference["results"]["test_loss"]
    assert temporaries(out) == []
    cct.load_checkpoint(out / "last.pt")


# ---------------------------------------------------------------------- SIGKILL, at chosen points and at random
KILL_POINTS = {
    # rule for tests/faults/sitecustomize.py: (what must be on disk after the kill)
    "write:best.pt:1:kill": "before any last.pt: --resume starts the run again from config.json",
    "write:last.pt:2:kill": "half of epoch 2's last.pt written: epoch 1's stays",
    "fsync:last.pt:2:kill": "epoch 2's last.pt written in full but not renamed: epoch 1's stays",
    "replaced:last.pt:2:kill": "epoch 2's last.pt in place, history.csv not yet rewritten",
    "write:history.csv:3:kill": "inside epoch 3's history.csv",
    "write:results.json:1:kill": "the run finished but its results.json is half written",
}


@pytest.mark.parametrize("rule", list(KILL_POINTS))
def test_sigkill_inside_a_write_then_resume(rule, tree, reference, tmp_path, capsys):
    out = tmp_path / "out"
    proc = cct_subprocess(train_argv(tree, out), faults=rule)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if rule.split(":")[0] in ("write", "fsync"):  # the kill left its temporary file behind ...
        assert temporaries(out), KILL_POINTS[rule]
    if rule.startswith(("write:last.pt", "fsync:last.pt")):
        assert read_checkpoint(out / "last.pt")["train_state"]["epoch"] == 1
    if rule.startswith("replaced:last.pt"):
        assert read_checkpoint(out / "last.pt")["train_state"]["epoch"] == 2 and len(history(out)) == 1
    if rule.startswith("write:best.pt:1"):
        assert not (out / "last.pt").exists() and (out / "config.json").exists()
    assert_leftovers_load(out)
    resume_and_check(out, tree, reference, capsys)  # ... and the resumed run removes it


KILL_SEEDS = range(5)


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_at_a_random_moment_then_resume(seed, tree, reference, tmp_path, capsys):
    delay = random.Random(f"cct-faults-{seed}").uniform(0.3, 1.0) * reference["seconds"]
    out = tmp_path / "out"
    proc = cct_subprocess(train_argv(tree, out), kill_after=delay)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    assert_leftovers_load(out)
    resume_and_check(out, tree, reference, capsys)


def test_leftover_temporaries_are_harmless_and_cleaned(tree, reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    (out / "results.json").unlink()
    garbage = [out / ".last.pt.abc123.tmp", out / ".best.pt.x_9.tmp", out / ".history.csv.q.tmp"]
    for path in garbage:
        path.write_bytes(b"half a checkpoint")
    (out / "notes.tmp").write_text("mine")  # not cct's: kept
    code, _, err = run_cli(["train", "--resume", out, "--quiet"], capsys)
    assert code == 0, err
    assert temporaries(out) == [] and (out / "notes.tmp").exists()
    assert history(out) == reference["history"]


# ---------------------------------------------------------------------- failed writes
@pytest.mark.parametrize("rule, reason", [
    ("write:last.pt:2:enospc", "No space left on device"),
    ("replace:last.pt:2:erofs", "Read-only file system"),
])
def test_failed_checkpoint_write_in_a_subprocess(rule, reason, tree, reference, tmp_path, capsys):
    out = tmp_path / "out"
    proc = cct_subprocess(train_argv(tree, out), faults=rule)
    assert_one_line_error(proc.returncode, proc.stderr, "cct train: error: cannot write", "last.pt", reason)
    assert proc.stdout == ""
    assert read_checkpoint(out / "last.pt")["train_state"]["epoch"] == 1  # the previous one survives
    assert temporaries(out) == []
    assert_leftovers_load(out)
    resume_and_check(out, tree, reference, capsys)


class _FailingFile:
    """A binary file whose writes fail as a full disk's do, after half of the first one."""

    def __init__(self, file, code):
        self._file, self._code = file, code

    def write(self, data):
        view = memoryview(data).cast("B")
        self._file.write(view[:len(view) // 2])
        raise OSError(self._code, os.strerror(self._code))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
        return False

    def __getattr__(self, name):
        return getattr(self._file, name)


def break_writes(monkeypatch, name: str, code: int, where: str, after: int = 0) -> None:
    """Make atomic writes of files called `name` fail with `code` at `where` (create/write/replace), after
    `after` successful ones."""
    import tempfile
    seen = {"n": 0}

    def due() -> bool:
        seen["n"] += 1
        return seen["n"] > after

    def fail():
        raise OSError(code, os.strerror(code))

    if where == "create":
        real = tempfile.mkstemp

        def mkstemp(suffix=None, prefix=None, dir=None, text=False):
            if prefix == f".{name}." and due():
                fail()
            return real(suffix, prefix, dir, text)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    elif where == "write":
        real_fdopen = os.fdopen

        def fdopen(fd, *args, **kwargs):
            file = real_fdopen(fd, *args, **kwargs)
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}.") and due():
                return _FailingFile(file, code)
            return file
        monkeypatch.setattr(os, "fdopen", fdopen)
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == name and due():
                fail()
            return real_replace(src, dst, *args, **kwargs)
        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("name, where, after, code", [
    ("config.json", "create", 0, errno.EROFS),  # a read-only --out: nothing written, nothing to lose
    ("best.pt", "write", 1, errno.ENOSPC),
    ("history.csv", "replace", 1, errno.EROFS),
    ("curves.png", "write", 0, errno.ENOSPC),
    ("results.json", "write", 0, errno.ENOSPC),
])
def test_failed_output_write_keeps_the_previous_file(name, where, after, code, tree, reference, tmp_path,
                                                     monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        break_writes(mp, name, code, where, after)
        code_, _, err = run_cli(train_argv(tree, out), capsys)
    assert_one_line_error(code_, err, "cannot write", name, os.strerror(code))
    assert temporaries(out) == []
    assert_leftovers_load(out)
    if (out / "last.pt").exists():  # the previous checkpoint survives, and the run can go on
        resume_and_check(out, tree, reference, capsys)


@pytest.fixture
def device_full(tmp_path) -> Path:
    """A /dev/full of our own (mknod, as root), so a failure cannot harm the system's."""
    path = tmp_path / "full"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        with open(path, "wb") as f:
            f.write(b"x")
            f.flush()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return path
        pytest.skip(f"no character device here: {e}")
    pytest.skip("the node did not behave as /dev/full")


def test_writing_into_dev_full_is_a_clear_error_and_keeps_the_device(device_full, reference, capsys):
    for argv in (["export", reference["out"] / "best.pt", "--format", "safetensors", "--output", device_full],
                 ["import-keras", KERAS_WEIGHTS, "--output", device_full]):
        code, _, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, "cannot write", "No space left on device")
        assert stat.S_ISCHR(os.stat(device_full).st_mode)  # written through, never renamed over
    assert temporaries(device_full.parent) == []


@pytest.mark.parametrize("where", ["write", "replace"])
def test_failed_export_and_import_keep_the_previous_file(where, reference, tree, tmp_path, monkeypatch, capsys):
    for name, argv in (("m.safetensors", ["export", reference["out"] / "best.pt", "--format", "safetensors",
                                          "--output", tmp_path / "m.safetensors"]),
                       ("k.pt", ["import-keras", KERAS_WEIGHTS, "--output", tmp_path / "k.pt"]),
                       ("c.png", ["eval", reference["out"] / "best.pt", "--data", tree,
                                  "--plot", tmp_path / "c.png", "--quiet"])):
        (tmp_path / name).write_bytes(b"previous")
        with monkeypatch.context() as mp:
            break_writes(mp, name, errno.ENOSPC, where)
            code, _, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, "cannot write", name, "No space left on device")
        assert (tmp_path / name).read_bytes() == b"previous"
    assert temporaries(tmp_path) == []


# ---------------------------------------------------------------------- signals and non-finite losses
def test_sigterm_finishes_the_step_saves_and_resumes(tree, reference, tmp_path, capsys):
    out = tmp_path / "out"
    proc = cct_subprocess(train_argv(tree, out), faults="step:-:6:term")  # epoch 2, batch 2 of 4
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "SIGTERM" in proc.stderr and f"resume with: cct train --resume {out}" in proc.stderr
    assert "Traceback" not in proc.stderr
    state = read_checkpoint(out / "last.pt")["train_state"]
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 6)
    cct.load_checkpoint(out / "last.pt")
    resume_and_check(out, tree, reference, capsys)


def test_sigterm_while_testing_says_the_resume_runs_the_test(tree, reference, tmp_path, monkeypatch, capsys):
    real_test = train_mod._test

    def test(run):
        os.kill(os.getpid(), signal.SIGTERM)  # training is done and saved: the test is the only work left
        return real_test(run)
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        mp.setattr(train_mod, "_test", test)
        code, _, err = run_cli(train_argv(tree, out), capsys)
    assert code == 128 + signal.SIGTERM and not (out / "results.json").exists()
    assert_one_line_error(code, err, "SIGTERM while testing: training is complete", f"cct train --resume {out} runs "
                                     "the test", status=128 + signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resume_and_check(out, tree, reference, capsys)


def test_second_sigint_aborts_without_saving(tree, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_call = train_mod.TrainStep.__call__

    def call(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # "send it again to abort without saving"
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(train_mod.TrainStep, "__call__", call)
    out = tmp_path / "out"
    code, _, err = run_cli(train_argv(tree, out), capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert read_checkpoint(out / "last.pt")["train_state"]["epoch"] == 1  # epoch 1's, untouched
    assert temporaries(out) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_resumes(tree, reference, tmp_path, monkeypatch,
                                                                   capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        helpers.poison_loss(mp, at_call=6)  # epoch 2, step 2
        code, _, err = run_cli(train_argv(tree, out), capsys)
    assert_one_line_error(code, err, "loss became nan", "epoch 2, step 2", "last good checkpoint")
    assert read_checkpoint(out / "last.pt")["train_state"]["epoch"] == 1
    assert_leftovers_load(out)
    resume_and_check(out, tree, reference, capsys)  # the cause gone, the run goes on from epoch 1


def test_nan_loss_in_the_first_epoch_says_nothing_is_saved(tree, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    helpers.poison_loss(monkeypatch, at_call=2)  # epoch 1: no last.pt yet
    code, _, err = run_cli(train_argv(tree, out, "--precision", "fp32"), capsys)
    assert_one_line_error(code, err, "loss became nan", "no epoch had ended: nothing to resume")
    assert "last good checkpoint" not in err and "--precision fp32" not in err  # already fp32
    assert not (out / "last.pt").exists()


def test_results_json_is_strict_json_even_with_a_nan_loss(tmp_path):
    from cct.runfiles import write_json
    write_json(tmp_path / "r.json", {"test_loss": float("nan"), "per": [float("inf"), 1.0], "top1": 0.5})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"test_loss": None, "per": [None, 1.0], "top1": 0.5} and "NaN" not in text


def test_nan_loss_skipped_and_counted(tree, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    helpers.poison_loss(monkeypatch, at_call=6)
    code, _, err = run_cli(train_argv(tree, out, "--skip-nonfinite"), capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_steps"] == 1 and results["epochs"] == EPOCHS
    assert [int(r["epoch"]) for r in history(out)] == list(range(1, EPOCHS + 1))
    assert all(np.isfinite(float(r["train_loss"])) for r in history(out))


# ---------------------------------------------------------------------- broken images
def crafted_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of any size, compressed to a few kilobytes: the shape of a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def broken_images() -> dict[str, tuple[bytes, str]]:
    """name → (file bytes, what the error says)."""
    good = png_bytes(np.full((16, 16, 3), 100, np.uint8))
    jpeg = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), "JPEG")
    header_only_bomb = crafted_png(20000, 20000)[:33] + b"\0\0\0\0IEND\xaeB`\x82"  # 400 Mpixels, > 2x the limit
    return {
        "zero-byte.png": (b"", "cannot identify image file"),
        "random.png": (np.random.default_rng(1).bytes(700), "cannot identify image file"),
        "text.jpg": (b"this is not an image\n", "cannot identify image file"),
        "truncated.png": (good[:len(good) // 2], "truncated"),
        "truncated.jpg": (jpeg[:len(jpeg) // 2], "truncated"),
        "bomb.png": (header_only_bomb, "decompression bomb"),
    }


BROKEN = broken_images()


@pytest.fixture(scope="module")
def checkpoint(reference) -> Path:
    return reference["out"] / "best.pt"


def tree_with(root: Path, bad_name: str, content: bytes, split: str = "train") -> Path:
    make_tree(root, train_per_class=2, test_per_class=1)
    (root / split / CLASSES[0] / bad_name).write_bytes(content)
    return root


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_image_is_one_line_in_every_command(name, checkpoint, tmp_path, capsys):
    content, reason = BROKEN[name]
    image = tmp_path / name
    image.write_bytes(content)
    code, out, err = run_cli(["predict", checkpoint, image], capsys)
    assert_one_line_error(code, err, f"cannot read image {image}", reason)
    assert out == ""
    train_tree = tree_with(tmp_path / "t1", name, content, "train")
    code, _, err = run_cli(train_argv(train_tree, tmp_path / "o"), capsys)
    assert_one_line_error(code, err, name, reason, "--skip-bad-images")
    eval_tree = tree_with(tmp_path / "t2", name, content, "test")
    code, _, err = run_cli(["eval", checkpoint, "--data", eval_tree, "--quiet"], capsys)
    assert_one_line_error(code, err, name, reason)


def test_images_past_the_pixel_limit_are_refused_not_warned_about(checkpoint, tmp_path, monkeypatch, capsys):
    """Between Pillow's limit and twice it, Pillow only warns — and would decode the whole image."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    image = tmp_path / "big.png"
    image.write_bytes(crafted_png(80, 80))  # 6400 pixels: above the limit, below twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(["predict", checkpoint, image], capsys)
        assert_one_line_error(code, err, f"cannot read image {image}", "exceeds limit")
        code, _, err = run_cli(train_argv(tree_with(tmp_path / "t", "big.png", image.read_bytes()), tmp_path / "o"),
                               capsys)
        assert_one_line_error(code, err, "big.png", "exceeds limit")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_real_size_decompression_bomb_costs_nothing(checkpoint, tmp_path, capsys):
    image = tmp_path / "bomb.png"
    image.write_bytes(crafted_png(13000, 13000))  # 169 Mpixels: 500 MB as RGB, in a 21 kB file
    assert image.stat().st_size < 100_000
    start = time.perf_counter()
    code, _, err = run_cli(["predict", checkpoint, image], capsys)
    assert_one_line_error(code, err, f"cannot read image {image}", "decompression bomb")
    assert time.perf_counter() - start < 10  # refused from the header, never decoded


def test_unconvertible_mode_is_one_line(tmp_path, capsys):
    model = cct.create_model(MODEL, num_classes=3, in_chans=1, img_size=16)
    gray = cct.save_checkpoint(model, tmp_path / "gray.pt")
    image = tmp_path / "lab.tif"
    Image.new("LAB", (8, 8)).save(image)  # Pillow cannot turn LAB into luma
    code, _, err = run_cli(["predict", gray, image], capsys)
    assert_one_line_error(code, err, f"cannot read image {image}", "LAB")
    train_tree = tree_with(tmp_path / "t", "lab.tif", image.read_bytes())
    code, _, err = run_cli(train_argv(train_tree, tmp_path / "o", "--in-chans", "1"), capsys)
    assert_one_line_error(code, err, "lab.tif", "LAB")


def test_skip_bad_images_trains_on_the_rest(tmp_path, capsys):
    root = make_tree(tmp_path / "t", train_per_class=4, test_per_class=2)
    for name, (content, _) in BROKEN.items():
        (root / "train" / CLASSES[1] / name).write_bytes(content)
    out = tmp_path / "o"
    code, _, err = run_cli(train_argv(root, out, "--skip-bad-images", "--epochs", "1"), capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_images"] == len(BROKEN) and results["train_images"] + results["val_images"] == 12


def test_missing_and_empty_paths(checkpoint, tree, tmp_path, capsys):
    missing = tmp_path / "missing"
    cases = [
        (["train", "--model", MODEL, "--data", missing, "--out", tmp_path / "o"], "not found"),
        (["train", "--model", MODEL, "--data", "", "--out", tmp_path / "o"], "missing --data"),
        (["train", "--model", MODEL, "--data", tree, "--out", ""], "missing --out"),
        (["train", "--resume", missing], "nothing to resume"),
        (["eval", missing / "m.pt", "--data", tree], "not found"),
        (["eval", "", "--data", tree], "not found"),
        (["eval", checkpoint, "--data", missing], "not found"),
        (["eval", checkpoint, "--data", ""], "empty path"),
        (["eval", checkpoint, "--data", tmp_path], "no image files"),  # neither class folders nor a tree
        (["predict", missing / "m.pt", tree / "test" / "ant" / "0.png"], "not found"),
        (["predict", checkpoint, missing / "x.png"], "No such file"),
        (["predict", checkpoint, ""], "cannot read image"),
        (["predict", checkpoint, tmp_path], "no image files"),  # a folder is searched for images
        (["export", missing / "m.pt", "--format", "safetensors", "--output", tmp_path / "x.safetensors"], "not found"),
        (["export", "", "--format", "safetensors", "--output", tmp_path / "x.safetensors"], "not found"),
        (["export", checkpoint, "--format", "safetensors", "--output", tmp_path], "Is a directory"),
        (["import-keras", missing / "w.h5", "--output", tmp_path / "k.pt"], "no such file"),
        (["import-keras", "", "--output", tmp_path / "k.pt"], "no such file"),
        (["import-keras", KERAS_WEIGHTS, "--output", checkpoint / "k.pt"], "cannot write"),  # under a file
    ]
    for argv, *messages in cases:
        code, _, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, *messages)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- archives and CIFAR pickles
def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, data: bytes = b"x", kind=tarfile.REGTYPE, target: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def hostile_archives(root: Path) -> dict[str, tuple[Path, str]]:
    image = png_bytes(np.zeros((16, 16, 3), np.uint8))
    ok = [_member(f"d/{split}/{c}/0.png", image) for split in ("train", "test") for c in CLASSES]
    archives = {
        "tar-dotdot": (_tar(root / "a.tar", ok + [_member("d/train/../../../evil.png", image)]), "outside"),
        "tar-parent": (_tar(root / "a2.tar", ok + [_member("../evil.png", image)]), "outside"),
        "tar-absolute": (_tar(root / "b.tar", ok + [_member(str(root / "evil.png"), image)]), "outside"),
        "tar-symlink": (_tar(root / "c.tar", ok + [_member("d/train/ant/l.png", kind=tarfile.SYMTYPE,
                                                           target="/etc/passwd")]), "link"),
        "tar-hardlink": (_tar(root / "d.tar", ok + [_member("d/train/ant/h.png", kind=tarfile.LNKTYPE,
                                                            target="d/train/ant/0.png")]), "link"),
        "tar-device": (_tar(root / "e.tar", ok + [_member("d/train/ant/dev.png", kind=tarfile.CHRTYPE)]), "special"),
    }
    with zipfile.ZipFile(root / "f.zip", "w") as zf:
        for info, data in ok:
            zf.writestr(info.name, data)
        zf.writestr("d/../../evil.png", image)
    archives["zip-dotdot"] = (root / "f.zip", "outside")
    with zipfile.ZipFile(root / "g.zip", "w") as zf:
        for info, data in ok:
            zf.writestr(info.name, data)
        link = zipfile.ZipInfo("d/train/ant/l.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    archives["zip-symlink"] = (root / "g.zip", "link")
    whole = _tar(root / "h.tar", ok)
    (root / "h-truncated.tar").write_bytes(whole.read_bytes()[:1500])
    archives["tar-truncated"] = (root / "h-truncated.tar", "")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info, data in ok:
            tf.addfile(info, io.BytesIO(data))
    (root / "i.tar.gz").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    archives["tgz-truncated"] = (root / "i.tar.gz", "")
    (root / "j.zip").write_bytes(np.random.default_rng(2).bytes(4000))
    archives["random-bytes.zip"] = (root / "j.zip", "not a folder, .tar, .tar.gz or .zip")
    (root / "k.tar").write_bytes(b"")
    archives["zero-byte.tar"] = (root / "k.tar", "")
    return archives


def test_hostile_and_broken_archives_are_refused(tmp_path, capsys):
    root = tmp_path / "archives"
    root.mkdir()
    for name, (path, message) in hostile_archives(root).items():
        code, _, err = run_cli(train_argv(path, tmp_path / "o"), capsys)
        assert_one_line_error(code, err, str(path), message)
    assert not list(tmp_path.rglob("evil.png")) and not (tmp_path.parent / "evil.png").exists()
    assert not (tmp_path / "o").exists()


class _Marker:
    """Unpickling this creates a file: proof that code in a data file ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cifar(root: Path, *, n=10, data=None, labels=None, meta=None, raw: dict[str, bytes] | None = None) -> Path:
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": np.zeros((n, 3072), np.uint8) if data is None else data,
             b"labels": list(range(n)) if labels is None else labels}
        (root / name).write_bytes(pickle.dumps(d))
    (root / "batches.meta").write_bytes(pickle.dumps(meta if meta is not None else
                                                     {b"label_names": [b"c%d" % i for i in range(10)]}))
    for name, content in (raw or {}).items():
        (root / name).write_bytes(content)
    return root


def test_malformed_cifar_batches(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    cases = {
        "random-bytes": (dict(raw={"data_batch_3": np.random.default_rng(3).bytes(3000)}), "not a CIFAR batch"),
        "truncated": (dict(raw={"test_batch": pickle.dumps({b"data": np.zeros((10, 3072), np.uint8)})[:500]}),
                      "not a CIFAR batch"),
        "pickled-code": (dict(raw={"data_batch_1": pickle.dumps({b"data": _Marker(marker)})}), "not allowed"),
        "not-a-dict": (dict(raw={"data_batch_2": pickle.dumps([1, 2, 3])}), "not a CIFAR batch"),
        "wrong-shape": (dict(data=np.zeros((10, 100), np.uint8)), "not a CIFAR-10 batch"),
        "label-out-of-range": (dict(labels=[12] * 10), "labels outside 0..9"),
        "negative-label": (dict(labels=[-1] * 10), "labels outside 0..9"),
        "labels-count": (dict(labels=[0] * 7), "10 images, 7 labels"),
        "no-label-key": (dict(raw={"data_batch_1": pickle.dumps({b"data": np.zeros((10, 3072), np.uint8)})}),
                         "not a CIFAR-10 batch"),
        "no-class-names": (dict(meta={b"other": 1}), "has no label_names"),
    }
    for name, (kwargs, message) in cases.items():
        root = _cifar(tmp_path / name, **kwargs)
        code, _, err = run_cli(train_argv(root, tmp_path / "o"), capsys)
        assert_one_line_error(code, err, message)
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- broken checkpoints
def broken_checkpoints(root: Path, good: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, what the error says): bytes that are not checkpoints, and checkpoints that lie."""
    data = read_checkpoint(good)
    files = {
        "zero-byte.pt": (b"", "is an empty file, not a checkpoint"),
        "random.pt": (np.random.default_rng(4).bytes(5000), "not a"),
        "text.pt": (b"model weights\n" * 10, "not a valid checkpoint"),
        "truncated.pt": (good.read_bytes()[:good.stat().st_size // 2], "is a damaged or truncated PyTorch checkpoint"),
        "notes.pt": (b"hello this is text\n" * 100, "not a PyTorch checkpoint (neither torch.save's zip nor a pickle)"),
        "random.safetensors": (np.random.default_rng(5).bytes(5000), "not a readable safetensors file"),
        "python-pickle.pt": (pickle.dumps({"state_dict": {"w": [1.0]}}, protocol=5), "not a"),
    }
    # bytes damaged inside the largest tensor (what a bad copy or disk does): torch.load read them as weights
    with zipfile.ZipFile(good) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
    damaged = bytearray(good.read_bytes())
    start = member.header_offset + 30 + len(member.filename.encode()) + 64  # past the local header (and its extra)
    damaged[start:start + 256] = bytes(256)
    files["damaged.pt"] = (bytes(damaged), f"is corrupted: its member {member.filename} fails its checksum")
    out = {}
    for name, (content, message) in files.items():
        (root / name).write_bytes(content)
        out[name] = (root / name, message)
    crafted = {
        "pickled-code.pt": ({**data, "extra": _Marker(marker)}, "pickled Python objects"),
        "numpy-inside.pt": ({**data, "extra": np.zeros(3)}, "pickled Python objects"),
        "a-list.pt": ([1, 2, 3], "holds a list"),
        "plain-state-dict.pt": (dict(cct.create_model("cct_7_3x1_32").state_dict()), "not a cct checkpoint"),
        "no-state-dict.pt": ({k: v for k, v in data.items() if k != "state_dict"}, "no state_dict"),
        "state-dict-a-list.pt": ({**data, "state_dict": [1, 2]}, "no state_dict"),
        "other-model-weights.pt": ({**data, "state_dict": cct.create_model("cct_7_3x1_32").state_dict()},
                                   "weights do not fit"),
        "config-unknown-field.pt": ({**data, "config": {**data["config"], "frobnicate": 1}}, "invalid model config"),
        "config-negative.pt": ({**data, "config": {**data["config"], "num_classes": -1}}, "invalid model config"),
        "config-a-string.pt": ({**data, "config": "cct_2"}, "invalid model config"),
        "class-names-int.pt": ({**data, "class_names": 3}, "class_names"),
        "eval-a-string.pt": ({**data, "eval": "fast"}, "eval settings"),
        "eval-mean-short.pt": ({**data, "eval": {**data["eval"], "mean": [0.5], "std": [0.2]}}, "eval mean"),
    }
    for name, (obj, message) in crafted.items():
        torch.save(obj, root / name)
        out[name] = (root / name, message)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(root / "bad-metadata.safetensors"),
              metadata={"format": "cct-checkpoint", "config": "{not json"})
    out["bad-metadata.safetensors"] = (root / "bad-metadata.safetensors", "unreadable cct metadata")
    save_file({"w": torch.zeros(2)}, str(root / "no-config.safetensors"), metadata={"format": "cct-checkpoint"})
    out["no-config.safetensors"] = (root / "no-config.safetensors", "unreadable cct metadata")
    return out


def test_broken_checkpoints_in_every_command(checkpoint, tree, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    root = tmp_path / "ckpts"
    root.mkdir()
    image = tree / "test" / "ant" / "0.png"
    for name, (path, message) in broken_checkpoints(root, checkpoint, marker).items():
        for argv in (["eval", path, "--data", tree, "--quiet"], ["predict", path, image],
                     ["export", path, "--format", "safetensors", "--output", tmp_path / "x.safetensors"]):
            code, out, err = run_cli(argv, capsys)
            assert_one_line_error(code, err, name, message)
            assert out == ""
        if path.suffix == ".pt":  # the same file as a run's last.pt
            run_dir = tmp_path / "runs" / name
            run_dir.mkdir(parents=True)
            shutil.copy(path, run_dir / "last.pt")
            code, _, err = run_cli(["train", "--resume", run_dir], capsys)
            assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()
    assert not (tmp_path / "x.safetensors").exists()


def test_official_pth_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    state = {"classifier.fc.weight": torch.zeros(10, 128), "extra": _Marker(marker)}
    torch.save({"state_dict": state}, tmp_path / "official.pth")
    with pytest.raises(cct.CheckpointError, match="pickled Python objects"):
        cct.create_model(MODEL, pretrained=tmp_path / "official.pth")
    assert not marker.exists()


def test_checkpoint_of_another_class_count_or_classes(checkpoint, tmp_path, capsys, reference):
    four = make_tree(tmp_path / "four", classes=CLASSES + ["dog"], train_per_class=2, test_per_class=1)
    code, _, err = run_cli(["eval", checkpoint, "--data", four, "--quiet"], capsys)
    assert_one_line_error(code, err, "trained on 3 classes", "has 4: the data has 'dog' the run did not")
    renamed = make_tree(tmp_path / "renamed", classes=["x", "y", "z"], train_per_class=2, test_per_class=1)
    code, _, err = run_cli(["eval", checkpoint, "--data", renamed, "--quiet"], capsys)
    assert_one_line_error(code, err, "trained on other classes than", "class 0 is 'ant' there, 'x' here")
    last = make_tree(tmp_path / "last", classes=["ant", "bee", "cow"], train_per_class=2, test_per_class=1)
    code, _, err = run_cli(["eval", checkpoint, "--data", last, "--quiet"], capsys)  # the first five agree
    assert_one_line_error(code, err, "class 2 is 'cat' there, 'cow' here")
    run_dir = tmp_path / "run"
    shutil.copytree(reference["out"], run_dir)
    (run_dir / "results.json").unlink()
    code, _, err = run_cli(["train", "--resume", run_dir, "--data", four, "--quiet"], capsys)
    assert_one_line_error(code, err, "the run trained on 3 classes and the data given holds 4, not the same: the "
                                     "data has 'dog' the run did not")


# ---------------------------------------------------------------------- Keras files and flags
def test_broken_keras_files(tmp_path, capsys):
    import h5py
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    (tmp_path / "random.h5").write_bytes(np.random.default_rng(6).bytes(3000))
    (tmp_path / "zero.h5").write_bytes(b"")
    (tmp_path / "truncated.h5").write_bytes(KERAS_WEIGHTS.read_bytes()[:KERAS_WEIGHTS.stat().st_size // 2])
    for name, message in (("other.h5", "not the keras.io CCT example's weights"), ("random.h5", "not a readable HDF5"),
                          ("zero.h5", "not a readable HDF5"), ("truncated.h5", "")):
        code, _, err = run_cli(["import-keras", tmp_path / name, "--output", tmp_path / "k.pt"], capsys)
        assert_one_line_error(code, err, name, message)
    assert not (tmp_path / "k.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "two"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
    (["--val-split", "1"], "--val-split must be in [0, 1)"),
    (["--val-split", "-0.1"], "--val-split must be in [0, 1)"),
    (["--val-split", "nan"], "--val-split must be in [0, 1)"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr", "inf"], "--lr must be positive"),
    (["--img-size", "0"], "--img-size must be at least 8 pixels"),
    (["--in-chans", "2"], "--in-chans must be 1 or 3"),
    (["--train-limit", "0"], "--train-limit must be at least 1"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--workers", "-1"], "--workers must be non-negative"),
    (["--drop-rate", "nan"], "--drop-rate must be in [0, 1)"),
    (["--time-budget", "0"], "--time-budget must be a positive number of minutes"),
    (["--time-budget", "inf"], "--time-budget must be a positive number of minutes"),
    (["--time-budget", "nan"], "--time-budget must be a positive number of minutes"),
])
def test_out_of_range_train_flags(flags, message, tree, tmp_path, capsys):
    code, _, err = run_cli(train_argv(tree, tmp_path / "o", *flags), capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "o").exists()


def test_out_of_range_flags_of_other_commands(checkpoint, tree, tmp_path, capsys):
    image = tree / "test" / "ant" / "0.png"
    (tmp_path / "exported.onnx").write_bytes(b"\x08\x07")  # an ONNX file's first bytes
    shutil.copytree(tree, tmp_path / "other")
    cases = [
        (["eval", checkpoint, "--data", tree, "--batch-size", "0"], "--batch-size must be at least 1"),
        (["eval", checkpoint, "--data", tree, "--batch-size", "-4"], "--batch-size must be at least 1"),
        (["eval", checkpoint, "--data", tmp_path / "other", "--split", "val"], "has no val split"),  # not the run's
        (["eval", checkpoint, "--data", tmp_path / "missing", "--plot", tmp_path / "cm.xyz"],  # before the data is read
         "--plot", "matplotlib writes no .xyz files"),
        (["eval", tmp_path / "exported.onnx", "--data", tree], "is an ONNX export", "`cct predict` takes .onnx"),
        (["predict", checkpoint, image, "--topk", "0"], "--topk must be at least 1"),
        (["export", checkpoint, "--format", "onnx", "--output", tmp_path / "m.onnx", "--batch-size", "0"],
         "--batch-size must be at least 1 or 'dynamic'"),
        (["export", checkpoint, "--format", "safetensors", "--output", tmp_path / "m.st", "--batch-size", "2"],
         "not to safetensors"),
    ]
    for argv, *messages in cases:
        code, _, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, *messages)


def _file_size_limit(limit: int):
    def set_limit():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_real_file_size_limit_while_writing_a_checkpoint(tree, tmp_path):
    """A real write failure (RLIMIT_FSIZE: EFBIG, as a full disk's ENOSPC) inside `torch.save`, whose zip writer
    turns the OSError into a RuntimeError as it closes: still one line naming the file, no temporary left."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "cct", *map(str, train_argv(tree, out))], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=180,
                          preexec_fn=_file_size_limit(256 * 1024))  # config.json fits, a checkpoint does not
    assert_one_line_error(proc.returncode, proc.stderr, "cct train: error: cannot write", ".pt", "File too large")
    assert temporaries(out) == []


def test_an_os_error_no_command_expected_is_one_line(monkeypatch, capsys):
    """A PermissionError (or any OSError) from deep inside a command: its file and reason on one line, exit 2."""
    def denied(args):
        raise PermissionError(13, "Permission denied", "/runs/a/best.pt")
    monkeypatch.setattr(cli, "_models", denied)
    code = cli.main(["models"])
    assert_one_line_error(code, capsys.readouterr().err, "cct models: error: /runs/a/best.pt: Permission denied")


def test_an_unreadable_csv_is_named_not_called_text(monkeypatch, tmp_path, capsys):
    """Telling an image CSV from a text one reads its first rows: a file that cannot be read is that file's error, where
    it used to count as text and refuse the image model ("--data labels.csv is text data")."""
    from cct import kinds
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.png,cat\n")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(kinds, "open", denied, raising=False)  # tests run as root, whom chmod does not stop
    code = cli.main(["train", "--model", "cct_2_3x2_32", "--data", str(labels), "--out", str(tmp_path / "run")])
    assert_one_line_error(code, capsys.readouterr().err, "labels.csv: Permission denied")
    assert not (tmp_path / "run").exists()


def test_a_file_name_that_is_not_utf8(checkpoint, tmp_path, capsys):
    """A name from an older system's media (Latin-1 bytes): trained on, evaluated, and written back to predict's CSV
    as its own bytes, where the data's fingerprint used to refuse it."""
    root = make_tree(tmp_path / "tree", train_per_class=4, test_per_class=2)
    odd = os.fsencode(root / "train" / CLASSES[0]) + b"/caf\xe9.png"
    shutil.copyfile(root / "train" / CLASSES[0] / "0.png", odd)
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "--model", MODEL, "--data", root, "--out", out, "--img-size", "16", "--epochs",
                            "1", "--batch-size", "8", "--quiet"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["predict", checkpoint, root / "train" / CLASSES[0], "--output", tmp_path / "p.csv"],
                           capsys)
    assert code == 0, err
    assert b"caf\xe9.png," in (tmp_path / "p.csv").read_bytes()


def test_outputs_that_are_inputs_or_folders_are_refused_first(checkpoint, tmp_path, capsys):
    """predict --output and export --output naming the checkpoint or an image it reads (which it would overwrite), or
    a folder: one line before any work, and the file untouched."""
    weights = tmp_path / "w.pt"
    shutil.copyfile(checkpoint, weights)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    before = weights.read_bytes(), image.read_bytes()
    for argv, needle in [(["predict", weights, image, "--output", weights], "w.pt, an input of this command"),
                         (["predict", weights, image, "--output", image], "x.png, an input of this command"),
                         (["predict", weights, image, "--output", tmp_path], "Is a directory"),
                         (["export", weights, "--format", "torchscript", "--output", weights], "an input"),
                         (["export", weights, "--format", "onnx", "--output", tmp_path], "Is a directory")]:
        code, _, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, "--output", needle)
    assert (weights.read_bytes(), image.read_bytes()) == before


def test_a_fresh_run_does_not_overwrite_weights_in_out(tree, tmp_path, capsys):
    out = tmp_path / "models"
    out.mkdir()
    (out / "best.pt").write_bytes(b"someone's weights")
    code, _, err = run_cli(train_argv(tree, out), capsys)
    assert_one_line_error(code, err, "already holds weights (best.pt)")
    assert (out / "best.pt").read_bytes() == b"someone's weights"


def test_photos_without_img_size_are_refused_with_advice(tmp_path, capsys):
    """Images larger than MAX_NATIVE_SIDE build a model of their own size only when --img-size asks for it."""
    from cct.image_run import MAX_NATIVE_SIDE
    side = MAX_NATIVE_SIDE + 8
    for c in ("a", "b"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((side, 9, 3), 40 * i, np.uint8)).save(tmp_path / "photos" / c / f"{i}.png")
    code, _, err = run_cli(["train", "--data", tmp_path / "photos", "--out", tmp_path / "out", "--model", MODEL,
                            "--epochs", "1", "--quiet"], capsys)
    assert_one_line_error(code, err, f"images are {side}x9", "--img-size 64")


def test_out_inside_the_data_folder_is_refused(tree, tmp_path, capsys):
    """The run's curves.png inside an image folder becomes a class of its own for the next run (its --resume too)."""
    data = tmp_path / "data"
    shutil.copytree(tree, data)
    code, _, err = run_cli(train_argv(data, data / "train" / "run"), capsys)
    assert_one_line_error(code, err, "is inside --data", "choose a folder outside")
    assert not (data / "train" / "run").exists()


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_a_device_as_data_is_refused_not_read_for_ever(tmp_path, capsys):
    code, _, err = run_cli(["train", "--data", "/dev/zero", "--out", tmp_path / "out", "--model", MODEL], capsys)
    assert_one_line_error(code, err, "--data /dev/zero is neither a file nor a folder")
    assert not (tmp_path / "out").exists()
