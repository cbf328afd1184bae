"""cct.dropout_kernels: both ways of drawing dropout compute inverted dropout, values and gradients."""
import math

import pytest
import torch

from cct.dropout_kernels import (FastDropout, _memory_offsets, drop_at, draws_positions, dropout, dropout_mask,
                                 dropped_positions)


# ---------------------------------------------------------------------- the mask
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


# ---------------------------------------------------------------------- the dropped positions
def test_dropped_positions_are_sorted_distinct_and_in_range():
    torch.manual_seed(0)
    n, p = 200_000, 0.1
    pos = dropped_positions(n, p)
    assert pos.dtype == torch.int64 and pos.dim() == 1
    assert (pos[1:] > pos[:-1]).all() and pos[0] >= 0 and pos[-1] < n
    assert len(pos) / n == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / n))


@pytest.mark.parametrize("p", [0.02, 0.1, 0.25])
def test_dropped_positions_have_geometric_gaps(p):
    """Each element dropped independently with probability p: the gaps between drops are geometric."""
    torch.manual_seed(1)
    pos = dropped_positions(400_000, p)
    gaps = torch.diff(pos, prepend=torch.tensor([-1]))
    m = len(gaps)
    for g in (1, 2, 3):  # P(gap = g) = (1 - p)^(g - 1) p
        expected = (1 - p) ** (g - 1) * p
        assert (gaps == g).float().mean().item() == pytest.approx(expected, abs=5 * math.sqrt(expected / m))
    assert gaps.double().mean().item() == pytest.approx(1 / p, rel=5 * math.sqrt((1 - p) / m))


def test_dropped_positions_do_not_depend_on_the_batch_and_are_seeded():
    torch.manual_seed(2)
    whole = dropped_positions(5000, 0.1)
    torch.manual_seed(2)
    in_threes = dropped_positions(5000, 0.1, batch=3)  # drawn 3 gaps at a time: many rounds
    assert torch.equal(whole, in_threes)
    other = dropped_positions(5000, 0.1)
    assert not torch.equal(whole, other)


def test_dropped_positions_of_nothing_and_of_one():
    assert dropped_positions(0, 0.1).numel() == 0
    torch.manual_seed(3)
    draws = [dropped_positions(1, 0.2).tolist() for _ in range(2000)]
    assert all(d in ([], [0]) for d in draws)
    assert sum(d == [0] for d in draws) / 2000 == pytest.approx(0.2, abs=0.05)
    for p in (1.0, 1e-19):  # below 2^-12 the float32 uniforms no longer resolve p (and 1/p gaps overflow)
        with pytest.raises(AssertionError, match="p must be in"):
            dropped_positions(10, p)


def test_draws_positions_for_wide_floats_at_small_rates():
    assert draws_positions(0.1, torch.float32) and draws_positions(0.25, torch.float64)
    assert not draws_positions(0.1, torch.bfloat16) and not draws_positions(0.1, torch.float16)
    assert not draws_positions(0.5, torch.float32) and not draws_positions(0.0, torch.float32)
    assert not draws_positions(1e-5, torch.float32) and draws_positions(2 ** -12, torch.float32)
    x = torch.ones(4, 250)
    assert torch.equal(dropout(x, 1e-19, training=True), x)  # the mask's rule: below 7.6e-6 nothing is dropped


@pytest.mark.parametrize("perm", [(0, 1, 2, 3), (0, 2, 1, 3), (3, 1, 0, 2), (2, 3, 0, 1)])
def test_memory_offsets_of_a_permuted_tensor(perm):
    """Each row-major (logical) index maps to where that element sits in storage."""
    storage = torch.arange(3 * 4 * 5 * 6).view(3, 4, 5, 6)  # each element holds its own storage offset
    t = storage.permute(perm)
    logical = torch.arange(t.numel())
    assert torch.equal(_memory_offsets(logical, t), t.reshape(-1))
    assert torch.equal(_memory_offsets(logical[::7], t), t.reshape(-1)[::7])


def test_drop_at_keeps_a_transposed_layout_and_drops_in_logical_order():
    x = torch.randn(4, 6, 3, 5).transpose(1, 2)  # (4, 3, 6, 5), not contiguous
    positions = torch.tensor([0, 7, 19, 200, 359])
    y = drop_at(x, positions, 0.2)
    assert y.stride() == x.stride()
    expected = (x / 0.8).reshape(-1)
    expected[positions] = 0
    torch.testing.assert_close(y.reshape(-1), expected)


def test_drop_at_gradient_is_its_own_mask():
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([1, 2, 20, 41])
    assert torch.autograd.gradcheck(lambda t: drop_at(t, positions, 0.3), (x,))
    assert torch.autograd.gradcheck(lambda t: drop_at(t.t(), positions, 0.3), (x,))  # a transposed input


# ---------------------------------------------------------------------- dropout
def test_dropout_is_identity_when_off():
    x = torch.randn(4, 5)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert FastDropout(0.1).eval()(x) is x


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_dropout_gradient_uses_the_same_mask(p):
    torch.manual_seed(0)
    x = torch.randn(64, 64, requires_grad=True)
    y = dropout(x, p, training=True)
    y.sum().backward()
    assert torch.allclose(x.grad, y.detach() / x.detach())
    assert (y == 0).float().mean().item() == pytest.approx(p, abs=0.05)


def test_fast_dropout_is_x_times_its_mask():
    """FastDropout is nn.Dropout's function (inverted dropout), with the mask of `dropout_mask` (p above 0.25)."""
    x = torch.randn(17, 33)
    torch.manual_seed(4)
    y = FastDropout(0.3).train()(x)
    torch.manual_seed(4)
    mask = dropout_mask(x.shape, 0.3, dtype=x.dtype, device=x.device)
    assert torch.equal(y, x * mask)
    torch.testing.assert_close(y[y != 0] / x[y != 0], torch.full_like(y[y != 0], 1 / 0.7), atol=1e-4, rtol=0)


def test_fast_dropout_drops_the_drawn_positions():
    """At a small rate in float32, FastDropout zeroes the positions `dropped_positions` draws, scales the rest."""
    x = torch.randn(3, 40, 50).transpose(0, 2)
    torch.manual_seed(6)
    y = FastDropout(0.1).train()(x)
    torch.manual_seed(6)
    positions = dropped_positions(x.numel(), 0.1)
    expected = (x / 0.9).reshape(-1)
    expected[positions] = 0
    torch.testing.assert_close(y.reshape(-1), expected)
    assert torch.equal((y.reshape(-1) == 0).nonzero().flatten(), positions)


@pytest.mark.parametrize("p", [0.1, 0.5])  # positions, and the mask
def test_dropout_has_second_derivatives(p):
    """d²/dx² of sum(dropout(x)²) is 2·mask²: the positions' backward is itself differentiable, like x * mask."""
    torch.manual_seed(8)
    x = torch.randn(30, 20, dtype=torch.float64, requires_grad=True)
    y = dropout(x.t(), p, training=True)  # a transposed input: the backward runs on the gradient's layout
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    g.sum().backward()
    mask = (y / x.t()).detach()
    torch.testing.assert_close(x.grad, 2 * mask.square().t())
