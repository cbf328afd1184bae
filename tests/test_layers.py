"""cct.layers: the reference math of attention, the two encoder-block layouts, drop path, positional embeddings."""
import math

import pytest
import torch
import torch.nn.functional as F

import cct
from cct.layers import drop_path, sinusoidal_embedding


def test_sinusoidal_embedding_matches_official_formula():
    n, d = 7, 6
    ref = torch.tensor([[p / (10000 ** (2 * (i // 2) / d)) for i in range(d)] for p in range(n)])
    ref[:, 0::2] = torch.sin(ref[:, 0::2])
    ref[:, 1::2] = torch.cos(ref[:, 1::2])
    torch.testing.assert_close(sinusoidal_embedding(n, d)[0], ref)


def test_keras_layout():
    model = cct.create_model("cct_2_3x2_32_keras")
    blk = model.blocks[0]
    assert blk.attn.num_heads == 2 and blk.attn.head_dim == 128 and blk.attn.qkv.bias is not None
    assert [b.drop_path for b in model.blocks] == [0.0, pytest.approx(0.1)]
    assert model.grid == (8, 8) and model.cfg.norm_eps == 1e-5
    # the MLP applies the tanh GELU after both Dense layers
    x = torch.randn(4, 64, 128)
    blk.eval()
    ref = F.gelu(blk.fc2(F.gelu(blk.fc1(x), approximate="tanh")), approximate="tanh")
    torch.testing.assert_close(blk.mlp(x), ref)


def test_official_block_normalises_residual_stream():
    model = cct.create_model("cct_2_3x2_32", drop_path_rate=0.0, attn_drop_rate=0.0).eval()
    blk = model.blocks[0]
    x = torch.randn(2, 64, 128)
    h = x + blk.attn(blk.pre_norm(x))
    h = blk.norm1(h)
    ref = h + blk.fc2(F.gelu(blk.fc1(h)))
    torch.testing.assert_close(blk(x), ref)
    assert blk.attn.qkv.bias is None and blk.attn.proj.bias is not None


def test_attention_matches_explicit_softmax():
    model = cct.create_model("cct_2_3x2_32_keras").eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 128)
    q, k, v = attn.qkv(x).view(2, 10, 3, 2, 128).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(128), dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 10, 256))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_drop_path_keeps_the_expectation_per_sample():
    torch.manual_seed(0)
    x = torch.ones(20000, 3)
    y = drop_path(x, 0.25, training=True)
    kept = (y[:, 0] > 0).float()
    assert kept.mean().item() == pytest.approx(0.75, abs=0.02)
    assert torch.equal(y[kept > 0], torch.full_like(y[kept > 0], 1 / 0.75))  # whole samples, scaled
    assert torch.equal(y[:, 0], y[:, 2])
    assert drop_path(x, 0.25, training=False) is x and drop_path(x, 0.0, training=True) is x
