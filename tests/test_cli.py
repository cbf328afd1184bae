"""The `cct` command's shared behaviour: model table, argument errors, exit codes."""
import subprocess
import sys

import pytest

from cct.cli import main


def test_models_table(capsys):
    assert main(["models", "cct_2*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "params", "MACs"]
    row = next(line for line in out if line.startswith("cct_2_3x2_32_keras "))
    assert "416,331" in row and "32x32" in row and "learnable" in row
    sine = next(line for line in out if line.startswith("cct_2_3x2_32_sine "))
    assert sine.rstrip().endswith("sine")


def test_models_no_match_is_exit_2(capsys):
    assert main(["models", "resnet*"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resnet*" in err


def test_unknown_command_and_flag_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["models", "--colour"])
    assert e.value.code == 2
    assert "--colour" in capsys.readouterr().err


def test_import_keras_missing_file(tmp_path, capsys):
    assert main(["import-keras", str(tmp_path / "none.weights.h5"), "--output", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "none.weights.h5" in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()


def test_debug_shows_the_traceback(tmp_path):
    """`cct --debug ...` (README: errors) re-raises, so the traceback shows; without it, one line and status 2."""
    from cct.errors import CheckpointError
    argv = ["eval", str(tmp_path / "none.pt"), "--data", str(tmp_path)]
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        main(["--debug", *argv])
    proc = subprocess.run([sys.executable, "-m", "cct", "--debug", *argv], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "checkpoint not found" in proc.stderr
    assert main(argv) == 2


def test_python_m_cct_entry_point():
    proc = subprocess.run([sys.executable, "-m", "cct", "models", "cvt_7*", "--no-macs"], capture_output=True, text=True)
    assert proc.returncode == 0 and "3,716,619" in proc.stdout


def test_a_closed_stdout_pipe_ends_quietly():
    """`cct models | head -1`: the reader leaves before cct writes; no traceback, the shell's SIGPIPE status."""
    proc = subprocess.Popen([sys.executable, "-m", "cct", "models", "--no-macs"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has started, so every write finds no reader
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == "", err


def test_help_lists_every_subcommand_in_order(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    commands = ["models", "import-keras", "train", "eval", "predict", "export", "explain", "bench"]
    positions = [out.index(f"\n    {c}") for c in commands]
    assert positions == sorted(positions)


def test_parser_does_not_import_the_training_loop():
    """`cct --help` builds every parser; the loop and the benchmark are imported only to run."""
    script = ("import sys\nfrom cct.cli import build_parser\nbuild_parser()\n"
              "assert not {'cct.train', 'cct.bench', 'cct.step'} & set(sys.modules), sorted(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_train_has_a_flag_for_every_config_field(capsys):
    from dataclasses import fields

    from cct.recipes import TrainConfig
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
