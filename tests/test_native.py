"""cct.native: the compiled attention core computes `_AttentionCore`'s function from the same draw.

Builds the core once (about 20 s, cached by PyTorch afterwards); CI has a compiler and ninja (the test extra), so
these run there. Where it cannot build they skip, except the tests of what the user is told then.
"""
import copy
import json
import os
import sys

import pytest
import torch
from torch.utils import cpp_extension

import cct
from cct import native
from cct.errors import CCTError
from cct.kernels import FastAttention, FastDropout, NativeAttention, use_kernels
from cct.layers import Attention
from cct.native import NativeUnavailable
from helpers import run_cli
from data_fixtures import make_tree

TREE = {"train": {"cat": 6, "dog": 6}, "test": {"cat": 2, "dog": 2}}  # a tiny image folder


@pytest.fixture(scope="module")
def built():
    try:
        return native.load()
    except NativeUnavailable as e:
        pytest.skip(str(e))


def _pair(dim: int, heads: int, attn_drop: float, dtype=torch.float32) -> tuple[Attention, NativeAttention]:
    """A reference attention drawing its dropout as the kernels do, and its native twin (non-zero weights)."""
    torch.manual_seed(0)
    reference = Attention(dim, num_heads=heads, qkv_bias=True, attn_drop=attn_drop).to(dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.1)
    twin = use_kernels(copy.deepcopy(reference), "native")
    reference.attn_drop.__class__ = FastDropout  # the same dropped elements, element for element
    return reference, twin


@pytest.mark.parametrize("dim,heads,tokens,batch", [(64, 2, 256, 2), (96, 3, 65, 3), (256, 4, 17, 2), (32, 2, 1, 2)])
def test_native_core_is_the_reference_with_the_same_draw(built, dim, heads, tokens, batch, monkeypatch):
    """Outputs and gradients (input, every parameter) of the reference attention computed in float64, in float32
    training with dropout, to float32 rounding (the fast core's error is about 1e-6 of each tensor's largest
    element too); the compiled core runs once per forward."""
    reference, twin = _pair(dim, heads, 0.2)
    reference.double()
    calls = []
    forward = built.attention_core_forward
    monkeypatch.setattr(built, "attention_core_forward", lambda *args: calls.append(1) or forward(*args))
    x = torch.randn(batch, tokens, dim)
    grad = torch.randn(batch, tokens, dim).transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous grad
    results = []
    for module, dtype in ((twin, torch.float32), (reference, torch.float64)):
        inputs = x.to(dtype).requires_grad_()
        torch.manual_seed(5)
        out = module.train()(inputs)
        results.append((out, *torch.autograd.grad(out, [inputs, *module.parameters()], grad.to(dtype))))
    assert calls == [1]
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours.double(), theirs, atol=5e-6 * float(theirs.detach().abs().max()), rtol=0)


def test_native_drops_what_fast_drops_and_leaves_the_rest_to_it(built, monkeypatch):
    """The same elements dropped as the fast core from the same seed (a dropped element's gradient is exactly 0
    in both); float64, eval and bf16 autocast never reach the compiled core."""
    reference, twin = _pair(64, 4, 0.25)
    fast = use_kernels(copy.deepcopy(twin), "fast")
    assert type(fast) is FastAttention and type(twin) is NativeAttention
    x = torch.randn(2, 40, 64)
    torch.manual_seed(1)
    ours = twin.train()(x)
    torch.manual_seed(1)
    theirs = fast.train()(x)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)
    monkeypatch.setattr(built, "attention_core_forward", lambda *args: pytest.fail("the compiled core ran"))
    twin.double()(x.double())  # float64: `_AttentionCore`
    twin.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        twin(x)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), reference.eval()(x), atol=2e-6, rtol=1e-5)


def test_compiled_core_checks_its_inputs(built):
    qkv = torch.randn(2, 8, 3 * 16)
    positions = torch.zeros(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        built.attention_core_forward(qkv.double(), 2, 0.35, 0.1, positions)
    with pytest.raises(RuntimeError, match="3·heads·d"):
        built.attention_core_forward(qkv, 5, 0.35, 0.1, positions)
    with pytest.raises(RuntimeError, match="int64"):
        built.attention_core_forward(qkv, 2, 0.35, 0.1, positions.int())


def test_use_kernels_native_swaps_attention_only_and_back(built):
    model = cct.create_model("cct_2_3x2_32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_kernels(model, "native")
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions and all(type(m) is NativeAttention for m in attentions)
    assert any(type(m) is FastDropout for m in model.modules())  # the rest as "fast"
    use_kernels(model, "fast")
    assert all(type(m) is FastAttention for m in attentions)
    use_kernels(model, "native")
    use_kernels(model, "reference")
    assert all(type(m) is Attention for m in attentions)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_native_model_trains_as_the_fast_model(built):
    """A few optimiser steps of a whole model with every dropout on: native and fast stay together."""
    torch.manual_seed(0)
    fast = use_kernels(cct.create_model("cct_2_3x2_32"), "fast").train()
    twin = use_kernels(copy.deepcopy(fast), "native")
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for model in (fast, twin):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(3)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(fast.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_cli_trains_with_native_kernels(built, tmp_path, capsys, monkeypatch):
    calls = []
    forward = built.attention_core_forward
    monkeypatch.setattr(built, "attention_core_forward", lambda *args: calls.append(1) or forward(*args))
    tree = make_tree(tmp_path / "tree", TREE)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--model", "cct_2_3x2_32", "--data", tree, "--out", out, "--epochs", "1",
                            "--batch-size", "4", "--precision", "fp32", "--kernels", "native", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["kernels"] == "native"
    assert len(calls) >= 4 and len(calls) % 2 == 0  # both blocks in each training step (paper recipe: attention dropout)


def test_without_a_compiler_it_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setenv("CXX", "no-such-compiler-cct")
    model = cct.create_model("cct_2_3x2_32")
    with pytest.raises(NativeUnavailable, match="needs a C\\+\\+ compiler: 'no-such-compiler-cct'"):
        use_kernels(model, "native")
    assert not any(isinstance(m, FastAttention) for m in model.modules())  # nothing changed
    assert issubclass(NativeUnavailable, CCTError)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--model", "cct_2_3x2_32", "--data", make_tree(tmp_path / "tree", TREE), "--out", out,
                            "--epochs", "1", "--kernels", "native", "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "C++ compiler" in err, err
    assert not out.exists() or not any(out.glob("*.pt"))


def test_a_failed_build_is_one_line(tmp_path, monkeypatch):
    """A source that does not compile: the compiler's first error, on one line."""
    broken = tmp_path / "attention_core.cpp"
    broken.write_text("int f() { return undefined_name; }\n")  # no PyTorch headers: compiles in a moment
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    if native.shutil.which("c++") is None or not cpp_extension.is_ninja_available():
        pytest.skip("no C++ compiler or no ninja")
    try:
        native.load()
    except NativeUnavailable as e:
        message = str(e)
    else:
        pytest.fail("a broken source built")
    assert "\n" not in message and "attention_core.cpp failed" in message
    assert "undefined_name" in message, message  # the compiler's error, not PyTorch's command line


def test_first_error_skips_the_command_line():
    output = ("Error building extension 'x': [1/2] c++ -MMD -c core.cpp -o core.o\nFAILED: core.o\n"
              "core.cpp:3:1: error: 'y' was not declared\nninja: build stopped")
    assert native._first_error(output) == "core.cpp:3:1: error: 'y' was not declared"
    assert native._first_error("something odd") == "something odd"


def test_ninja_of_this_environment_goes_on_path(monkeypatch):
    """`pip install ninja` into a venv that is not activated: its bin folder joins PATH, where PyTorch looks."""
    monkeypatch.setenv("PATH", "/nonexistent-cct")
    native._find_ninja()
    folders = os.environ["PATH"].split(os.pathsep)
    assert os.path.dirname(sys.executable) in folders and folders[-1] == "/nonexistent-cct"
