"""cct.bench, and the speed-ups it measures: each must compute the same model as before."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cct
from cct import bench
from cct.cli import main
from cct.layers import Attention, dropout, dropout_mask, gelu_tanh
from cct.model import _pool_out_sizes, _same_pool_padding


# ---------------------------------------------------------------------- cheap dropout masks
def test_dropout_mask_has_dropout_statistics():
    torch.manual_seed(0)
    p = 0.1
    mask = dropout_mask((256, 64, 128), p, dtype=torch.float32, device=torch.device("cpu"))
    values = mask.unique()
    assert len(values) == 2 and values[0] == 0
    kept = (mask > 0).float().mean().item()
    assert kept == pytest.approx(1 - p, abs=2e-3)
    assert values[1].item() == pytest.approx(1 / (1 - p), rel=1e-4)
    assert mask.mean().item() == pytest.approx(1.0, abs=3e-3)  # expectation preserved


def test_dropout_masks_are_independent_and_seeded():
    torch.manual_seed(1)
    a = dropout_mask((4096,), 0.5, dtype=torch.float32, device=torch.device("cpu"))
    b = dropout_mask((4096,), 0.5, dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(1)
    a2 = dropout_mask((4096,), 0.5, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(a, a2)
    agree = ((a > 0) == (b > 0)).float().mean().item()
    assert agree == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("shape", [(3,), (5, 7), (2, 3, 5)])  # sizes that are not multiples of 4
def test_dropout_mask_odd_sizes_and_dtypes(shape):
    mask = dropout_mask(shape, 0.3, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert mask.shape == shape and mask.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_its_definition_bit_for_bit(dtype, p):
    """The integer arithmetic gives exactly the comparison-and-scale mask, from the same random bits."""
    shape = (33, 65)
    torch.manual_seed(3)
    mask = dropout_mask(shape, p, dtype=dtype, device=torch.device("cpu"))
    torch.manual_seed(3)  # the same draw, turned into the mask the plain way
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None).view(torch.int16)[:n].view(shape)
    dropped = round(p * 65536)
    scale = torch.ones((), dtype=dtype).mul_(65536 / (65536 - dropped))
    reference = torch.where(bits >= dropped - 32768, scale, torch.zeros((), dtype=dtype))
    assert mask.dtype == dtype and torch.equal(mask, reference)
    assert not torch.signbit(mask).any()  # dropped elements are +0.0


def test_dropout_mask_extremes():
    cpu = torch.device("cpu")
    assert torch.equal(dropout_mask((5,), 1e-7, dtype=torch.float32, device=cpu), torch.ones(5))  # rounds to none
    assert torch.equal(dropout_mask((5,), 1.0, dtype=torch.bfloat16, device=cpu), torch.zeros(5, dtype=torch.bfloat16))


def test_dropout_is_identity_when_off():
    x = torch.randn(4, 5)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0, training=True) is x


def test_dropout_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 64, requires_grad=True)
    y = dropout(x, 0.25, training=True)
    y.sum().backward()
    assert torch.allclose(x.grad, y.detach() / x.detach())


# ---------------------------------------------------------------------- GELU by table
def _bf16_values() -> torch.Tensor:
    """All 65,536 bfloat16 bit patterns: every finite value, ±0, ±inf and the NaNs."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    return bits.view(torch.bfloat16)


def test_gelu_tanh_is_f_gelu_bit_for_bit_on_every_bf16():
    x = _bf16_values().clone().requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y = gelu_tanh(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    ref_x = x.detach().clone().requires_grad_()
    ref = F.gelu(ref_x, approximate="tanh")
    (ref_dx,) = torch.autograd.grad(ref, ref_x, grad)
    assert y.grad_fn.name() == "_GeluTanhBF16Backward"  # the table, not F.gelu
    for ours, theirs in ((y, ref), (dx, ref_dx)):
        nan = theirs.isnan()
        assert torch.equal(ours.isnan(), nan)
        assert torch.equal(ours[~nan].view(torch.int16), theirs[~nan].view(torch.int16))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_gelu_tanh_shapes_and_other_dtypes(monkeypatch):
    monkeypatch.setattr(cct.layers, "_GELU_TABLES", {})
    with torch.inference_mode():  # tables built in inference mode still serve training
        gelu_tanh(torch.randn(8).to(torch.bfloat16))
    x = torch.randn(8).to(torch.bfloat16).requires_grad_()
    gelu_tanh(x).sum().backward()
    assert torch.equal(x.grad, torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)[0])
    x = torch.randn(3, 5, 7).to(torch.bfloat16)[:, ::2]  # not contiguous
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    x = torch.randn(4, 9, dtype=torch.float64)  # no table: PyTorch's kernel
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    traced = torch.jit.trace(gelu_tanh, torch.randn(4, 9).to(torch.bfloat16))  # exports keep aten::gelu
    assert "aten::gelu" in str(traced.graph) and "index_select" not in str(traced.graph)
    model = cct.create_model("cct_2_3x2_32_keras").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32)).float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------- attention
@pytest.mark.parametrize("heads,head_dim", [(2, None), (2, 128), (4, None)])
def test_training_attention_path_matches_sdpa(heads, head_dim):
    """With a mask that keeps everything, the training path (matmul → softmax → dropout → matmul) is SDPA."""
    torch.manual_seed(0)
    attn = Attention(64, num_heads=heads, head_dim=head_dim, qkv_bias=True, attn_drop=1e-9)  # rounds to p = 0
    x = torch.randn(3, 17, 64)
    attn.train()
    train_out = attn(x)
    attn.eval()
    eval_out = attn(x)
    assert (train_out - eval_out).abs().max().item() < 1e-5


@pytest.mark.parametrize("tokens,training,attn_drop,dtype,matmul", [
    (64, False, 0.0, torch.bfloat16, True),      # bf16 inference, short sequence: two matmuls beat SDPA
    (256, False, 0.0, torch.bfloat16, False),    # bf16 inference, long sequence: SDPA
    (256, True, 0.0, torch.bfloat16, True),      # bf16 training: matmuls at every length measured
    (64, False, 0.0, torch.float32, False),      # fp32: SDPA
    (64, True, 0.0, torch.float32, False),
    (64, True, 0.1, torch.float32, True),        # attention dropout: SDPA would fall back to its unfused path
    (64, False, 0.1, torch.float32, False),
])
def test_attention_path_choice_and_equivalence(tokens, training, attn_drop, dtype, matmul):
    torch.manual_seed(0)
    attn = Attention(64, num_heads=2, qkv_bias=True, attn_drop=attn_drop).train(training)
    x = torch.randn(2, tokens, 64)
    assert attn._matmul_path(torch.empty(1, 2, tokens, 32, dtype=dtype)) is matmul
    if attn_drop == 0:  # either path: the same numbers as SDPA in this dtype
        attn = attn.to(dtype)
        out = attn(x.to(dtype)).float()
        q, k, v = attn.qkv(x.to(dtype)).view(2, tokens, 3, 2, 32).permute(2, 0, 3, 1, 4)
        ref = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, tokens, 64)).float()
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_model_trains_with_dropout_in_bf16():
    model = cct.create_model("cct_2_3x2_32_keras").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------- tokenizer: pool before ReLU
def _reference_tokenizer(tok, x):
    """The tokenizer as its sources write it: conv → ReLU → zero pad → max-pool (TF 'same' with -inf)."""
    cfg = tok.cfg
    for conv in tok.convs:
        x = F.relu(conv(x))
        if cfg.post_pad:
            x = F.pad(x, (cfg.post_pad,) * 4)
        if cfg.pool_padding == "same":
            top, bottom = _same_pool_padding(x.shape[-2], cfg.pool_kernel, cfg.pool_stride)
            left, right = _same_pool_padding(x.shape[-1], cfg.pool_kernel, cfg.pool_stride)
            x = F.max_pool2d(F.pad(x, (left, right, top, bottom), value=float("-inf")), cfg.pool_kernel, cfg.pool_stride)
        else:
            x = F.max_pool2d(x, cfg.pool_kernel, cfg.pool_stride, cfg.pool_padding)
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("name,size", [("cct_2_3x2_32_keras", 32), ("cct_2_3x2_32_keras", 29), ("cct_7_3x1_32", 32),
                                       ("cct_2_3x2_32", 31), ("cct_7_7x2_224", 64)])
def test_tokenizer_matches_relu_pad_pool_exactly(name, size):
    torch.manual_seed(0)
    tok = cct.create_model(name).tokenizer
    x = torch.randn(2, 3, size, size, requires_grad=True)
    ours = tok(x)
    ours.square().sum().backward()
    grads = [x.grad.clone()] + [c.weight.grad.clone() for c in tok.convs]
    x.grad = None
    tok.zero_grad()
    ref = _reference_tokenizer(tok, x.contiguous(memory_format=torch.channels_last))  # the same conv kernels
    ref.square().sum().backward()
    ref_grads = [x.grad] + [c.weight.grad for c in tok.convs]
    assert ours.shape == ref.shape and torch.equal(ours, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n", range(5, 20))
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_pool_out_sizes_match_pytorch(n, padding, ceil_mode):
    out = F.max_pool2d(torch.zeros(1, 1, n, n), 3, 2, padding, ceil_mode=ceil_mode)
    assert _pool_out_sizes((n, n), 3, 2, padding, ceil_mode) == list(out.shape[-2:])


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
