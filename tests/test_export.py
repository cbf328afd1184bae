"""Export: ONNX, TorchScript and safetensors round trips, metadata, checks, the optional extra."""
import json
import sys

import pytest
import torch

import cct
from cct.cli import main
from cct.errors import CCTError
from cct.export import export_checkpoint, export_onnx, export_torchscript, read_torchscript_metadata
from cct.preprocess import Preprocessing

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

SIZE = (32, 40)  # not square, so height and width cannot be swapped unnoticed
VARIANTS = [("cct_2_3x2_32", {}), ("cct_2_3x2_32_sine", {}), ("cct_2_3x2_32", {"positional_embedding": "none"}),
            ("cvt_2_4_32", {}), ("vit_lite_2_4_32", {}), ("cct_2_3x2_32_keras", {})]
IDS = ["learnable", "sine", "none", "cvt", "vit_lite", "keras"]


def _model(name="cct_2_3x2_32", **overrides):
    torch.manual_seed(0)
    model = cct.create_model(name, num_classes=3, img_size=SIZE, **overrides)
    model.class_names = ["cat", "dog", "emu"]
    return model


def _expected(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _ort(path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=IDS)
def test_onnx_matches_pytorch_at_dynamic_batch_sizes(tmp_path, name, overrides):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = _model(name, **overrides).train()  # export must switch dropout off itself
    report = export_onnx(model, tmp_path / "m.onnx")
    assert model.training, "export changed the caller's model"
    assert report.max_abs_diff <= 1e-4 and report.opset == 18
    session = _ort(tmp_path / "m.onnx")
    assert session.get_inputs()[0].name == "images" and session.get_inputs()[0].shape[1:] == [3, *SIZE]
    for n in (1, 7):
        x = torch.randn(n, 3, *SIZE)
        (logits,) = session.run(None, {"images": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), _expected(model, x), atol=1e-4, rtol=0)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == ["cat", "dog", "emu"]
    assert json.loads(meta["preprocessing"])["img_size"] == list(SIZE)
    assert cct.CCTConfig.from_dict(json.loads(meta["config"])) == model.cfg


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=IDS)
def test_torchscript_matches_pytorch_at_any_batch_size(tmp_path, name, overrides):
    model = _model(name, **overrides)
    prep = Preprocessing(SIZE, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    report = export_torchscript(model, tmp_path / "m.ts", preprocessing=prep)
    assert report.max_abs_diff <= 1e-4
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    for n in (1, 7):
        x = torch.randn(n, 3, *SIZE)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), _expected(model, x), atol=1e-4, rtol=0)
    meta = read_torchscript_metadata(tmp_path / "m.ts")
    assert meta["class_names"] == ["cat", "dog", "emu"]
    assert Preprocessing.from_dict(meta["preprocessing"]) == prep
    assert meta["config"]["img_size"] == list(SIZE)


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=IDS)
def test_safetensors_round_trip(tmp_path, name, overrides):
    model = _model(name, **overrides)
    path = cct.save_checkpoint(model, tmp_path / "m.safetensors", format="safetensors")
    loaded = cct.load_checkpoint(path)
    assert loaded.cfg == model.cfg and loaded.class_names == ["cat", "dog", "emu"]
    x = torch.randn(2, 3, *SIZE)
    torch.testing.assert_close(_expected(loaded, x), _expected(model, x), atol=0, rtol=0)


def test_fixed_batch_size_onnx(tmp_path):
    pytest.importorskip("onnxscript")
    model = _model()
    export_onnx(model, tmp_path / "m.onnx", batch_size=4)
    session = _ort(tmp_path / "m.onnx")
    assert session.get_inputs()[0].shape == [4, 3, *SIZE]
    x = torch.randn(4, 3, *SIZE)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), _expected(model, x),
                               atol=1e-4, rtol=0)


def test_cli_exports_every_format_with_recorded_preprocessing(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = _model("cct_2_3x2_32_keras")
    ckpt = cct.save_checkpoint(model, tmp_path / "m.pt", eval={"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3]})
    for fmt, out in (("onnx", "m.onnx"), ("torchscript", "m.ts"), ("safetensors", "m.safetensors")):
        assert main(["export", str(ckpt), "--format", fmt, "--output", str(tmp_path / out)]) == 0
        assert "max |diff| against PyTorch" in capsys.readouterr().out
    meta = _ort(tmp_path / "m.onnx").get_modelmeta().custom_metadata_map
    prep = json.loads(meta["preprocessing"])
    assert prep["mean"] == [0.1, 0.2, 0.3] and prep["std"] == [1, 2, 3]
    assert read_torchscript_metadata(tmp_path / "m.ts")["preprocessing"]["mean"] == [0.1, 0.2, 0.3]
    assert cct.load_checkpoint(tmp_path / "m.safetensors").class_names == ["cat", "dog", "emu"]


def test_cli_batch_size_flag(tmp_path, capsys):
    ckpt = cct.save_checkpoint(_model(), tmp_path / "m.pt")
    assert main(["export", str(ckpt), "--format", "torchscript", "--output", str(tmp_path / "m.ts"),
                 "--batch-size", "5"]) == 0
    assert "batch size 5" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["export", str(ckpt), "--format", "torchscript", "--output", str(tmp_path / "m.ts"), "--batch-size", "x"])
    assert e.value.code == 2


def test_opset_flag_is_checked_and_kept(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    ckpt = cct.save_checkpoint(_model(), tmp_path / "m.pt")
    out = tmp_path / "m.onnx"
    for opset, message in (("5", "--opset must be between 17"), ("999", "--opset must be between 17")):
        assert main(["export", str(ckpt), "--format", "onnx", "--output", str(out), "--opset", opset]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not out.exists()
    assert main(["export", str(ckpt), "--format", "torchscript", "--output", str(tmp_path / "m.ts"),
                 "--opset", "20"]) == 2
    assert "--opset applies to ONNX graphs" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "onnx", "--output", str(out), "--opset", "17"]) == 0
    assert "(onnx, opset 17)" in capsys.readouterr().out  # the opset asked for, or an error: never another one
    with pytest.raises(CCTError, match="could not write this model at opset 17 .it kept opset 18"):
        from cct.onnxrt import written_opset
        import onnx
        written_opset(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []),
                                             opset_imports=[onnx.helper.make_opsetid("", 18)]), 17)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_failed_check_writes_nothing(tmp_path, monkeypatch, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    monkeypatch.setattr("cct.export.TOLERANCE", -1.0)  # no export can pass
    ckpt = cct.save_checkpoint(_model(), tmp_path / "m.pt")
    with pytest.raises(CCTError, match="differs from PyTorch"):
        export_checkpoint(ckpt, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*.tmp"))


def test_default_preprocessing_by_recipe():
    official = cct.checkpoint.checkpoint_dict(_model())
    keras = cct.checkpoint.checkpoint_dict(_model("cct_2_3x2_32_keras"))
    assert Preprocessing.from_checkpoint(official).mean == (0.4914, 0.4822, 0.4465)
    assert Preprocessing.from_checkpoint(keras).mean is None
    assert Preprocessing.from_checkpoint({**official, "eval": {"mean": None, "std": None}}).mean is None


def test_missing_optional_dependency_is_a_clear_error(tmp_path, monkeypatch, capsys):
    ckpt = cct.save_checkpoint(_model(), tmp_path / "m.pt")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    with pytest.raises(CCTError, match=r"pip install 'cct\[export\]'"):
        export_checkpoint(ckpt, tmp_path / "m.onnx", "onnx")
    assert main(["export", str(ckpt), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cct[export]" in err and "onnxscript" in err
    assert not (tmp_path / "m.onnx").exists()
