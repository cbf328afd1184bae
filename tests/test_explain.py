"""Explanations: recomputed attention, rollout, pooling maps and the figure."""
import numpy as np
import pytest
import torch
from PIL import Image

import cct
from cct.cli import main
from cct.errors import CCTError
from cct.explain import attention_probabilities, attention_rollout, explain, relevance_map


def _model(name, **overrides):
    torch.manual_seed(0)
    return cct.create_model(name, num_classes=3, **overrides).eval()


def _image(tmp_path, name="x.png", size=(50, 70)):
    array = np.random.default_rng(0).integers(0, 255, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize("name", ["cct_2_3x2_32", "cct_2_3x2_32_keras", "vit_lite_2_4_32"])
def test_recomputed_attention_reproduces_each_block(name):
    model = _model(name)
    inputs, outputs = [], []

    def keep(module, args, out):
        inputs.append(args[0])
        outputs.append(out)

    handles = [blk.attn.register_forward_hook(keep) for blk in model.blocks]
    probs, _ = attention_probabilities(model, torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    for blk, p, x, out in zip(model.blocks, probs, inputs, outputs):
        attn = blk.attn
        B, N, _ = x.shape
        v = attn.qkv(x).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
        y = (p @ v).transpose(1, 2).reshape(B, N, -1)  # (B, N, heads * head_dim)
        torch.testing.assert_close(attn.proj(y), out, atol=1e-5, rtol=1e-4)


def test_rollout_rows_are_distributions():
    a = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    rollout = attention_rollout([a, a.flip(-1)])
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 5))
    identity = torch.eye(5).expand(2, 4, 5, 5)  # attention to oneself only: nothing flows anywhere else
    torch.testing.assert_close(attention_rollout([identity, identity]), torch.eye(5).expand(2, 5, 5))
    # the formula itself, on numbers worked by hand: one head, two tokens, two layers of (A + I) / 2 chained
    first = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]])  # token 0 attends only to token 1
    second = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])  # everything attends to token 0
    torch.testing.assert_close(attention_rollout([first]), torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    # second layer (A + I) / 2 = [[1, 0], [0.5, 0.5]], times the first layer's
    torch.testing.assert_close(attention_rollout([first, second]), torch.tensor([[[0.5, 0.5], [0.375, 0.625]]]))


@pytest.mark.parametrize("name,method,expected", [("cct_2_3x2_32", "auto", "pool"),
                                                  ("cvt_2_4_32", "rollout", "rollout"),
                                                  ("vit_lite_2_4_32", "auto", "rollout")])
def test_relevance_is_a_distribution_on_the_token_grid(name, method, expected):
    model = _model(name, img_size=(32, 48))
    x = torch.randn(2, 3, 32, 48)
    relevance, logits, used = relevance_map(model, x, method)
    assert used == expected and relevance.shape == (2, *model.grid)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
        if used == "pool":
            torch.testing.assert_close(relevance.flatten(1), model.pool_weights(model.forward_features(x)))
    total = relevance.flatten(1).sum(1)
    assert torch.all(total <= 1 + 1e-5) and torch.all(total > (0.5 if name.startswith("vit") else 1 - 1e-5))


def test_vit_lite_has_no_pooling_weights():
    with pytest.raises(CCTError, match="rollout"):
        relevance_map(_model("vit_lite_2_4_32"), torch.randn(1, 3, 32, 32), "pool")


@pytest.mark.parametrize("name,method", [("cct_2_3x2_32", "auto"), ("cct_2_3x2_32_keras", "rollout"),
                                         ("vit_lite_2_4_32", "auto")])
def test_explain_writes_a_png_of_the_expected_size(tmp_path, name, method):
    model = _model(name)
    model.class_names = ["ant", "bee", "cow"]
    ckpt = cct.save_checkpoint(model, tmp_path / "m.pt")
    images = [_image(tmp_path, "a.png"), _image(tmp_path, "b.jpg", (20, 20))]
    path = explain(ckpt, images, tmp_path / "out.png", method=method)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (600, 600)


def test_cli(tmp_path, capsys):
    ckpt = cct.save_checkpoint(_model("vit_lite_2_4_32"), tmp_path / "m.safetensors")
    image = _image(tmp_path)
    assert main(["explain", str(ckpt), image, "--output", str(tmp_path / "e.png")]) == 0
    with Image.open(tmp_path / "e.png") as im:
        assert im.size == (600, 300)
    assert main(["explain", str(ckpt), image, "--output", str(tmp_path / "f.png"), "--method", "pool"]) == 2
    assert "rollout" in capsys.readouterr().err and not (tmp_path / "f.png").exists()
    assert main(["explain", str(ckpt), str(tmp_path / "missing.png"), "--output", str(tmp_path / "g.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
