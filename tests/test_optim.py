import copy

import pytest
import torch

from cct import create_model
from cct.optim import Lookahead, MuonAdamW, muon_params, orthogonalize
from cct.recipes import make_config
from cct.step import make_optimizer


@pytest.mark.parametrize("shape", [(384, 128), (128, 576), (32, 64)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    g = torch.randn(shape) * torch.logspace(-1.5, 0, shape[1])  # unevenly scaled directions
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.6 and s.max() < 1.25
    assert orthogonalize(g).shape == shape


def test_muon_params_are_the_hidden_matrices():
    names = muon_params(create_model("cct_2_3x2_32"))
    assert "tokenizer.convs.1.weight" in names and "blocks.0.attn.qkv.weight" in names
    assert "blocks.1.fc2.weight" in names and len(names) == 9
    for outside in ("tokenizer.convs.0.weight", "pos_embed", "head.weight", "attention_pool.weight"):
        assert outside not in names
    deep = muon_params(create_model("cct_2_3x5_32"))  # every conv after the first
    assert {f"tokenizer.convs.{i}.weight" for i in (1, 2, 3, 4)} <= deep and "tokenizer.convs.0.weight" not in deep
    text = muon_params(create_model("text_cct_2", vocab_size=50, num_classes=3))
    assert not any(n.startswith(("embed", "word")) for n in text) and "blocks.0.attn.qkv.weight" in text


def _params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]


def _grads(params, step):
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_its_adamw_groups_are_torch_adamw():
    ours, ref = _params(), _params()
    opt = MuonAdamW([{"params": ours, "weight_decay": 0.05}], lr=1e-2, eps=1e-8)
    torch_opt = torch.optim.AdamW([{"params": ref, "weight_decay": 0.05}], lr=1e-2, eps=1e-8)
    for step in range(5):
        _grads(ours, step), _grads(ref, step)
        opt.step(), torch_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_muon_step_moves_every_direction_by_adamws_rms():
    w = torch.nn.Parameter(torch.zeros(128, 64, 3, 3))  # a conv: filters become rows of (128, 576)
    opt = MuonAdamW([{"params": [w], "muon": True, "weight_decay": 0.0}], lr=1e-3)
    w.grad = torch.randn(w.shape) * torch.logspace(-3, 0, 9).view(1, 1, 3, 3)
    opt.step()
    rms = w.detach().pow(2).mean().sqrt()
    assert 0.15e-3 < rms < 0.25e-3  # 0.2 · lr, whatever the gradient's scale
    s = torch.linalg.svdvals(w.detach().reshape(128, -1))
    assert s.max() / s.min() < 2  # orthogonalised: no direction dominates


def test_muon_steps_with_nesterov_momentum_and_decoupled_weight_decay():
    """Two steps written out: p ← p·(1 − lr·wd) − lr·0.2·√max(rows, cols)·orth(g + μ(b − g)), b ← μb + (1 − μ)g."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 16))
    opt = MuonAdamW([{"params": [w], "muon": True, "weight_decay": 0.1}], lr=0.01, momentum=0.9)
    expected, buf = w.detach().clone(), torch.zeros(8, 16)
    for _ in range(2):
        g = torch.randn(8, 16)
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        update = orthogonalize((g + 0.9 * (buf - g))[None], 5, torch.float32)[0]
        expected = expected * (1 - 0.01 * 0.1) - 0.01 * 0.2 * 4.0 * update
    torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=1e-5)


def test_muon_recipe_groups_cover_every_parameter_once_and_resume_exactly():
    model = create_model("cct_2_3x2_32", num_classes=4, img_size=16).eval()  # eval: no random stochastic depth
    cfg = make_config("cct_2_3x2_32", "", "", "fast", optimizer="muon")
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, MuonAdamW)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(set(seen)) == len(seen)
    assert sum(len(g["params"]) for g in opt.param_groups if g["muon"]) == 9

    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))

    def step(m, o):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
        o.zero_grad()

    for _ in range(3):
        step(model, opt)
    clone = copy.deepcopy(model)
    clone_opt = make_optimizer(clone, cfg)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        step(model, opt), step(clone, clone_opt)
    for a, b in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_orthogonalisation_lands_near_the_fp32_one():
    g = torch.randn(3, 128, 384)
    a, b = orthogonalize(g), orthogonalize(g, dtype=torch.bfloat16).float()
    assert (a - b).norm() / a.norm() < 0.05


def test_lookahead_follows_airbenchs_rule():
    """Every 5 steps slow ← lerp(slow, w, 1 − 0.95⁵·(t/T)³) and w ← slow; after step T, w ← slow."""
    total = 23
    ours, ref = _params(), _params()
    look = Lookahead(ours)
    slow = [p.detach().clone() for p in ref]
    for t in range(1, total + 1):
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for a, b in zip(ours, ref):
                step = torch.randn(a.shape, generator=g)
                a.add_(step), b.add_(step)
            if t % 5 == 0 and t < total:
                d = 0.95 ** 5 * (t / total) ** 3
                for s, b in zip(slow, ref):
                    s.mul_(d).add_(b, alpha=1 - d)
                    b.copy_(s)
        look.update(t, total)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b)
    look.finish()
    for a, s in zip(ours, slow):
        torch.testing.assert_close(a, s)


def test_lookahead_smooths_late_steps_only():
    w = torch.nn.Parameter(torch.zeros(4))
    look = Lookahead([w])
    with torch.no_grad():
        w.add_(1.0)
    look.update(5, 1000)  # d = 0.77·(0.005)³ ≈ 1e-7: the weights stay where the steps took them
    torch.testing.assert_close(w.detach(), torch.ones(4))
    with torch.no_grad():
        w.add_(1.0)
    look.update(995, 1000)  # d ≈ 0.77·0.985: most of the way back to the slow copy (1)
    d = 0.95 ** 5 * 0.995 ** 3
    torch.testing.assert_close(w.detach(), torch.full((4,), d * 1 + (1 - d) * 2))
    look.update(996, 1000)  # not a multiple of 5: nothing
    torch.testing.assert_close(w.detach(), torch.full((4,), d * 1 + (1 - d) * 2))


def test_lookahead_state_round_trips_and_checks_shapes():
    params = _params()
    look = Lookahead(params)
    with torch.no_grad():
        params[0].add_(1.0)
    look.update(5, 10)
    other = Lookahead(_params(seed=1))
    other.load_state_dict(look.state_dict())
    for a, b in zip(other.slow, look.slow):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="do not match"):
        Lookahead([torch.nn.Parameter(torch.zeros(2))]).load_state_dict(look.state_dict())
