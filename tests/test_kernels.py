"""cct.kernels: every fast kernel computes its reference module's function, values and gradients."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cct
from cct import kernels
from cct.kernels import FastAttention, FastConvTokenizer, FastDropout, FastGELU, _pool_out_sizes, fuse, gelu_tanh, use_kernels
from cct.layers import Attention
from cct.model import ConvTokenizer

SMALL = [n for n in cct.list_models() if not n.startswith("text_") and cct.get_config(n).img_size == (32, 32)]


# ---------------------------------------------------------------------- choosing kernels
def test_use_kernels_swaps_classes_only_and_back():
    model = cct.create_model("cct_2_3x2_32_keras")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_kernels(model, "fast") is model
    kinds = {type(m) for m in model.modules()}
    assert {FastAttention, FastDropout, FastGELU, FastConvTokenizer} <= kinds
    assert not kinds & {Attention, nn.Dropout, nn.GELU, ConvTokenizer}
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    use_kernels(model, "reference")
    assert not {type(m) for m in model.modules()} & {FastAttention, FastDropout, FastGELU, FastConvTokenizer}
    with pytest.raises(AssertionError, match="kernels must be one of"):
        use_kernels(model, "quick")


@pytest.mark.parametrize("name", SMALL)
def test_fast_model_is_the_reference_model(name):
    """Without dropout, the whole model: the same outputs and gradients (fp32 rounding apart)."""
    torch.manual_seed(0)
    reference = cct.create_model(name, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    fast = use_kernels(copy.deepcopy(reference), "fast")
    x = torch.randn(2, 3, 32, 32)
    results = []
    for model in (reference, fast):
        out = model(x)
        results.append((out, *torch.autograd.grad(out.square().sum(), list(model.parameters()))))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fuse(fast.eval())(x), reference.eval()(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["cct_2_3x2_32_keras", "cct_2_3x2_32"])  # folded attention, and the float core
def test_fast_training_with_dropout_draws_the_reference_masks(name):
    """With dropout on, fast and reference-with-FastDropout draw the same masks: the same outputs."""
    torch.manual_seed(0)
    fast = use_kernels(cct.create_model(name).double(), "fast").train()
    reference = copy.deepcopy(fast)
    for m in reference.modules():  # reference math everywhere but the dropout masks
        if type(m) in (FastAttention, FastConvTokenizer, FastGELU):
            m.__class__ = {FastAttention: Attention, FastConvTokenizer: ConvTokenizer, FastGELU: nn.GELU}[type(m)]
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    outs = []
    for model in (fast, reference):
        torch.manual_seed(7)
        outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------- GELU by table
def _bf16_values() -> torch.Tensor:
    """All 65,536 bfloat16 bit patterns: every finite value, ±0, ±inf and the NaNs."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    return bits.view(torch.bfloat16)


@pytest.mark.parametrize("fn", [gelu_tanh, FastGELU(approximate="tanh")], ids=["function", "module"])
def test_gelu_tanh_is_f_gelu_bit_for_bit_on_every_bf16(fn):
    x = _bf16_values().clone().requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    ref_x = x.detach().clone().requires_grad_()
    ref = nn.GELU(approximate="tanh")(ref_x)
    (ref_dx,) = torch.autograd.grad(ref, ref_x, grad)
    assert y.grad_fn.name() == "_GeluTanhBF16Backward"  # the table, not F.gelu
    for ours, theirs in ((y, ref), (dx, ref_dx)):
        nan = theirs.isnan()
        assert torch.equal(ours.isnan(), nan)
        assert torch.equal(ours[~nan].view(torch.int16), theirs[~nan].view(torch.int16))


def test_gelu_tanh_shapes_and_other_dtypes(monkeypatch):
    monkeypatch.setattr(kernels, "_GELU_TABLES", {})
    with torch.inference_mode():  # tables built in inference mode still serve training
        gelu_tanh(torch.randn(8).to(torch.bfloat16))
    x = torch.randn(8).to(torch.bfloat16).requires_grad_()
    gelu_tanh(x).sum().backward()
    assert torch.equal(x.grad, torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)[0])
    x = torch.randn(3, 5, 7).to(torch.bfloat16)[:, ::2]  # not contiguous
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    x = torch.randn(4, 9, dtype=torch.float64)  # no table: PyTorch's kernel
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    exact = torch.randn(4, 9).to(torch.bfloat16)  # the exact GELU keeps PyTorch's kernel
    assert torch.equal(FastGELU()(exact), F.gelu(exact))
    model = use_kernels(cct.create_model("cct_2_3x2_32_keras"), "fast").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32)).float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------- attention
def _fast(attn: Attention) -> FastAttention:
    return use_kernels(attn, "fast")


@pytest.mark.parametrize("heads,head_dim", [(2, None), (2, 128), (4, None)])
def test_training_attention_path_matches_sdpa(heads, head_dim):
    """With a mask that keeps everything, the training path (matmul → softmax → dropout → matmul) is SDPA."""
    torch.manual_seed(0)
    attn = _fast(Attention(64, num_heads=heads, head_dim=head_dim, qkv_bias=True, attn_drop=1e-9))  # rounds to p = 0
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
    reference = Attention(64, num_heads=2, qkv_bias=True, attn_drop=attn_drop).train(training)
    attn = _fast(copy.deepcopy(reference))
    x = torch.randn(2, tokens, 64)
    assert attn._matmul_path(torch.empty(1, 2, tokens, 32, dtype=dtype)) is matmul
    if attn_drop == 0:  # either path: the reference's numbers in this dtype
        attn, reference = attn.to(dtype), reference.to(dtype)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(attn(x.to(dtype)).float(), reference(x.to(dtype)).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dim,heads,dtype", [(256, 4, torch.float64), (96, 3, torch.float64), (64, 2, torch.float32)])
def test_attention_core_is_the_reference_with_the_same_draw(dim, heads, dtype, monkeypatch):
    """Training with attention dropout in float32/64 runs `_AttentionCore`: the reference's outputs and gradients
    (input and every parameter) from the same dropout draw; bf16 keeps the matmul path."""
    torch.manual_seed(0)
    reference = Attention(dim, num_heads=heads, qkv_bias=True, attn_drop=0.2).to(dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.1)
    reference.attn_drop.__class__ = FastDropout
    attn = _fast(copy.deepcopy(reference))
    calls = []
    core = kernels._AttentionCore.apply
    monkeypatch.setattr(kernels._AttentionCore, "apply", lambda *args: calls.append(args[1:]) or core(*args))
    x = torch.randn(3, 17, dim, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 17, dim, dtype=dtype)
    results = []
    for module in (attn, reference):
        torch.manual_seed(5)
        out = module.train()(x)
        results.append((out, *torch.autograd.grad(out, [x, *module.parameters()], grad)))
    assert calls == [(heads, (dim // heads) ** -0.5, 0.2)]
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)
    if dtype == torch.float32:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attn(x)
        assert len(calls) == 1  # bf16 under autocast: the matmul path
    (g,) = torch.autograd.grad(attn(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):  # second derivatives: the reference layers
        g.sum().backward()


def _keras_attention(attn_drop: float = 0.0, dtype=torch.float32) -> tuple[Attention, FastAttention]:
    """The Keras example's attention (2 heads of 128 on a 128 stream), non-zero biases, reference and fast."""
    torch.manual_seed(0)
    reference = Attention(128, num_heads=2, head_dim=128, qkv_bias=True, attn_drop=attn_drop).to(dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.1)  # non-zero biases (Keras initialises them to 0): the fold must carry them
    return reference, _fast(copy.deepcopy(reference))


@pytest.mark.parametrize("route", ["sdpa", "matmul"])
def test_fused_inference_is_the_reference_function(route, monkeypatch):
    """Heads wider than half the stream run folded: after `fuse`, the reference outputs through either
    route; `train()` drops the fused weights, so training then evaluating never sees stale ones."""
    reference, attn = _keras_attention()
    reference.eval(), attn.eval()
    monkeypatch.setattr(FastAttention, "_matmul_path", lambda self, q: route == "matmul")
    x = torch.randn(4, 64, 128)
    assert attn.folds() and attn._fused is None
    fuse(attn)
    assert attn._fused is not None and not any("fuse" in k for k in attn.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(attn(x), reference(x), atol=2e-5, rtol=1e-5)
    attn.train()
    assert attn._fused is None
    optimizer = torch.optim.AdamW(attn.parameters(), lr=0.01, fused=True)  # in place, no version bump
    attn(x).square().mean().backward()
    optimizer.step()
    reference.load_state_dict(attn.state_dict())
    attn.eval()
    with torch.inference_mode():  # unfused: folds from the parameters as they are now
        torch.testing.assert_close(attn(x), reference(x), atol=2e-5, rtol=1e-5)
    fuse(attn)
    with torch.inference_mode():
        torch.testing.assert_close(attn(x), reference(x), atol=2e-5, rtol=1e-5)
    # weights loaded, edited in place or cast after `fuse`: the fold follows them (it stayed stale before)
    other = _keras_attention()[0].state_dict()
    attn.load_state_dict(other), reference.load_state_dict(other)
    with torch.inference_mode():
        torch.testing.assert_close(attn(x), reference(x), atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        attn.proj.weight.mul_(2), reference.proj.weight.mul_(2)
    with torch.inference_mode():
        torch.testing.assert_close(attn(x), reference(x), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(attn.to(torch.bfloat16)(x.bfloat16()).float(), reference(x), atol=0.1, rtol=0.05)
    attn.float()
    use_kernels(attn, "reference")
    assert "_fused" not in attn.__dict__ and type(attn) is Attention


def test_fold_only_where_it_pays():
    official = _fast(Attention(256, num_heads=4))  # head_dim 64 on a 256 stream: more multiplies folded
    keras = _fast(Attention(128, num_heads=2, head_dim=128, qkv_bias=True))
    assert not official.folds() and keras.folds()
    fuse(official)
    assert official._fused is None


@pytest.mark.parametrize("attn_drop", [0.0, 0.2])
@pytest.mark.parametrize("training", [True, False])
def test_folded_attention_has_the_reference_gradients(attn_drop, training):
    """With gradients on (training, or eval with grad) the fold is part of the graph: the same outputs and
    the same gradients for the input and every parameter as the reference, with the same dropout mask."""
    reference, attn = _keras_attention(attn_drop, torch.float64)
    reference.attn_drop.__class__ = FastDropout  # the fast path's masks, element for element
    x = torch.randn(3, 17, 128, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 17, 128, dtype=torch.float64)
    results = []
    for module in (attn, reference):
        module.train(training)
        torch.manual_seed(5)  # the same dropout draw
        out = module(x)
        results.append((out, *torch.autograd.grad(out, [x, *module.parameters()], grad)))
    assert attn._fused is None  # nothing stored on this path
    for folded, plain in zip(*results):
        torch.testing.assert_close(folded, plain, atol=1e-12, rtol=1e-12)


def test_folded_training_in_bf16_follows_the_reference():
    reference, attn = _keras_attention(0.1)
    reference.attn_drop.__class__ = FastDropout
    x = torch.randn(8, 64, 128, requires_grad=True)
    grads = []
    for module in (attn, reference):
        module.train()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        grads.append(torch.autograd.grad(out.float().square().sum(), [x, module.qkv.weight, module.proj.weight]))
    for folded, plain in zip(*grads):  # bf16 rounding apart
        assert (folded - plain).norm() / plain.norm() < 0.02


def test_evaluation_after_training_steps_sees_the_new_weights():
    """The bug an inference cache once shipped: fuse → train steps → evaluate must use the new weights."""
    model = use_kernels(cct.create_model("cct_2_3x2_32_keras"), "fast")
    reference = cct.create_model("cct_2_3x2_32_keras")
    x = torch.rand(4, 3, 32, 32)
    fuse(model.eval())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model.train()
    for _ in range(2):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fuse(model.eval())(x), reference.eval()(x), atol=2e-5, rtol=1e-4)


def test_fast_model_trains_with_dropout_in_bf16():
    model = use_kernels(cct.create_model("cct_2_3x2_32_keras"), "fast").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------- tokenizer: pool before ReLU
@pytest.mark.parametrize("name,size,overrides", [
    ("cct_2_3x2_32_keras", 32, {}), ("cct_2_3x2_32_keras", 29, {}), ("cct_7_3x1_32", 32, {}), ("cct_2_3x2_32", 31, {}),
    ("cct_7_7x2_224", 64, {}), ("cct_2_3x4_32", 29, {}), ("cct_2_3x5_32", 30, {}),
    ("cct_2_3x2_32_keras", 29, {"pool_layers": (1,)})])  # an unpooled conv whose ReLU is zero-padded
def test_tokenizer_matches_relu_pad_pool_exactly(name, size, overrides):
    torch.manual_seed(0)
    reference = cct.create_model(name, **overrides).tokenizer
    tok = _fast_tokenizer(reference)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    results = []
    for module, inputs in ((tok, x), (reference, x.contiguous(memory_format=torch.channels_last))):  # same conv kernels
        out = module(inputs)
        results.append((out, *torch.autograd.grad(out.square().sum(), [x, *(c.weight for c in module.convs)])))
    assert results[0][0].shape == results[1][0].shape and torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1:], results[1][1:]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def _fast_tokenizer(reference: ConvTokenizer) -> FastConvTokenizer:
    return use_kernels(copy.deepcopy(reference), "fast")


@pytest.mark.parametrize("n", range(5, 20))
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_pool_out_sizes_match_pytorch(n, padding, ceil_mode):
    out = F.max_pool2d(torch.zeros(1, 1, n, n), 3, 2, padding, ceil_mode=ceil_mode)
    assert _pool_out_sizes((n, n), 3, 2, padding, ceil_mode) == list(out.shape[-2:])


# ---------------------------------------------------------------------- text conv tokenizer
@pytest.mark.parametrize("name", ["text_cct_2", "text_cvt_2", "text_vit_2"])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
def test_fast_text_conv_is_the_reference_conv(name, kernel):
    from cct.kernels import FastTextConvTokenizer
    torch.manual_seed(0)
    ref = cct.create_model(name, vocab_size=40, kernel_size=kernel, word_embedding_dim=24).eval()
    fast = kernels.use_kernels(copy.deepcopy(ref), "fast")
    assert isinstance(fast.conv_tokenizer, FastTextConvTokenizer)
    assert fast.state_dict().keys() == ref.state_dict().keys()
    ids = torch.randint(2, 40, (4, 11))
    mask = torch.ones(4, 11, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 1:] = False
    (feats_ref, mask_ref), (feats_fast, mask_fast) = ref.forward_features(ids, mask), fast.forward_features(ids, mask)
    assert torch.equal(mask_ref, mask_fast)
    torch.testing.assert_close(feats_fast, feats_ref, atol=1e-5, rtol=1e-5)
    ref(ids, mask).square().sum().backward()
    fast(ids, mask).square().sum().backward()
    for (n, a), b in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=n)
