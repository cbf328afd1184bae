"""cct.runlock: one run per output folder — a second holder fails naming the PID, SIGKILL leaves no lock,
processes the holder starts share its lock, torchrun ranks other than 0 never take it."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cct.errors import CCTError
from cct.runlock import ENV, LOCK_NAME, hold_run_lock

SRC = Path(__file__).resolve().parents[1] / "src" / "cct"
# imports cct.runlock without cct/__init__ (and so without torch): a holder starts in a fraction of a second
SCRIPT = """
import sys, time, types
pkg = types.ModuleType("cct"); pkg.__path__ = [sys.argv[1]]; sys.modules["cct"] = pkg
from cct.errors import CCTError
from cct.runlock import hold_run_lock
try:
    with hold_run_lock(sys.argv[2]):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
except CCTError as e:
    print(e, flush=True)
    sys.exit(2)
"""


def _start(out: Path, seconds: float, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(SRC), str(out), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env=env)


def _env_without_lock() -> dict:
    return {k: v for k, v in os.environ.items() if k != ENV}


def test_second_holder_fails_with_the_pid_and_sigkill_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    holder = _start(out, 60, env=_env_without_lock())
    try:
        assert holder.stdout.readline().strip() == "held"
        assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)
        with pytest.raises(CCTError, match=rf"run is in use by another cct train \(PID {holder.pid}\)"):
            with hold_run_lock(out):
                pass
        second = _start(out, 0, env=_env_without_lock())  # a second process, as a second `cct train` is
        message, _ = second.communicate(timeout=60)
        assert second.returncode == 2 and f"PID {holder.pid}" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL and (out / LOCK_NAME).exists()  # the file stays, the lock does not
    with hold_run_lock(out):  # what the next `--resume` does
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert os.environ[ENV] == str(out.absolute())
    assert ENV not in os.environ  # restored on exit


def test_processes_the_holder_starts_share_its_lock(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    out = tmp_path / "run"
    with hold_run_lock(out):
        child = _start(out, 0)  # inherits CCT_RUN_LOCK_HELD, as a --procs worker does
        assert child.communicate(timeout=60)[0].strip() == "held" and child.returncode == 0
        stranger = _start(out, 0, env=_env_without_lock())
        message = stranger.communicate(timeout=60)[0]
        assert stranger.returncode == 2 and f"PID {os.getpid()}" in message
        with hold_run_lock(out, rank=1):  # a torchrun rank other than 0: never takes it
            pass
    with hold_run_lock(out, rank=1):  # nor checks it
        pass


def test_an_inherited_variable_without_a_holder_takes_the_lock(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(ENV, str(out.absolute()))  # its holder is gone
    with hold_run_lock(out):
        stranger = _start(out, 0, env=_env_without_lock())
        message = stranger.communicate(timeout=60)[0]
        assert stranger.returncode == 2 and f"(PID {os.getpid()})" in message


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CCTError, match="cannot lock .*file"):
        with hold_run_lock(tmp_path / "file" / "run"):
            pass
    with pytest.raises(CCTError, match=r"--out .*file is a file, not a folder$"):  # was "cannot lock ...: File exists"
        with hold_run_lock(tmp_path / "file"):
            pass
    assert (tmp_path / "file").read_text() == "not a folder"


def test_out_as_a_dangling_link_and_outputs_under_a_file_name_the_cause(tmp_path):
    """Both were "File exists", from mkdir."""
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CCTError, match=r"--out .*gone is a symbolic link to .*nowhere, which does not exist$"):
        with hold_run_lock(tmp_path / "gone"):
            pass
    from cct.checkpoint import atomic_write
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CCTError, match=r"cannot write .*afile/sub/x.onnx: .*afile is a file, not a folder$"):
        atomic_write(tmp_path / "afile" / "sub" / "x.onnx", lambda f: f.write(b"y"))
    assert (tmp_path / "afile").read_text() == "x"
