"""cct.step: the learning-rate schedule, weight-decay groups, and the training step itself (CPU)."""
import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cct import create_model
from cct.errors import CCTError
from cct.evaluate import evaluate
from cct.kinds import TextAugmentConfig, TokenBatch, augmenter
from cct.kernels import use_kernels
from cct.preprocess import Preprocessing
from cct.recipes import make_config, validate
from cct.step import (NonFiniteLossError, augment_config, lr_at, make_optimizer, make_train_step, param_groups,
                      resize_batch, resolution_at, schedule_steps, VAT_PROBE)
from cct.tokenizer import PAD_ID
from helpers import MODEL


# ---------------------------------------------------------------------- schedule and optimiser
def test_lr_schedule():
    kw = dict(lr=1.0, total_steps=100, warmup_steps=10, warmup_lr=0.1, min_lr=0.01, cooldown_steps=20)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(5, **kw) == pytest.approx(0.55)
    assert lr_at(40, **kw) == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 40 / 80)))
    assert lr_at(80, **kw) == lr_at(99, **kw) == pytest.approx(0.01)
    assert lr_at(50, **{**kw, "schedule": "constant"}) == 1.0
    assert lr_at(3, lr=1e-3, total_steps=10, schedule="constant") == 1e-3


def test_schedule_steps_caps_a_short_runs_warmup_and_cooldown_and_says_so():
    cfg = make_config(MODEL, "d", "o", warmup_epochs=5, cooldown_epochs=2)
    assert schedule_steps(cfg, steps_per_epoch=10, total_steps=200) == (50, 20, None)  # room for both
    warmup, cooldown, note = schedule_steps(cfg, steps_per_epoch=10, total_steps=40)
    assert (warmup, cooldown) == (20, 10)
    assert note == "schedule: warm-up 50 → 20 steps (at most half of the run's 40); cooldown 20 → 10 steps (at most " \
                   "a quarter of the run's 40)"
    assert schedule_steps(cfg, steps_per_epoch=10, total_steps=80) == \
        (40, 20, "schedule: warm-up 50 → 40 steps (at most half of the run's 80)")  # only what was cut is named


def test_weight_decay_groups():
    model = create_model(MODEL)
    (everything,) = param_groups(model, 1e-4, decay_all=True)
    assert len(everything["params"]) == len(list(model.parameters()))
    decay, no_decay = param_groups(model, 6e-2, decay_all=False)
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any(p is model.pos_embed for p in no_decay["params"])
    assert all(p is not model.pos_embed for p in decay["params"])


# ---------------------------------------------------------------------- the step
def _step(model, *, skip_nonfinite=False, recipe="keras", precision="fp32"):
    cfg = make_config(model.name, "memory", "unused", recipe, batch_size=8, precision=precision)
    return make_train_step(model, make_optimizer(model, cfg), augment_config(cfg, None, None), precision=precision,
                           device="cpu", label_smoothing=0.1, num_classes=model.cfg.num_classes,
                           generator=torch.Generator().manual_seed(1), skip_nonfinite=skip_nonfinite)


def _batch(n=8, size=32):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def _count_backward(monkeypatch) -> dict:
    calls = {"n": 0}
    real = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    return calls


def test_a_step_runs_backward_once_steps_and_counts(monkeypatch):
    torch.manual_seed(0)
    model = create_model("cct_2_3x2_32_keras")
    step = _step(model)
    before = [p.detach().clone() for p in model.parameters()]
    calls = _count_backward(monkeypatch)
    images, labels = _batch()
    loss = step(images, labels, 1e-3, share=lambda: (True, False))
    assert calls["n"] == 1 and not loss.requires_grad and math.isfinite(loss.item())
    assert step.shared == (True, False)  # one process: the flags as given
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True) after the step
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    mean_loss, top1, seen = step.totals()
    assert seen == 8 and mean_loss == pytest.approx(loss.item()) and 0 <= top1 <= 1
    step(images, labels, 1e-3)
    assert calls["n"] == 2 and step.shared == () and step.totals()[2] == 16


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_a_step_computes_in_its_precision(precision, dtype):
    """bf16 on a CPU: the forward runs under bf16 autocast (the head's output is bf16), the weights stay fp32."""
    torch.manual_seed(0)
    model = create_model("cct_2_3x2_32_keras")
    seen = []
    model.head.register_forward_hook(lambda m, inp, out: seen.append(out.dtype))
    _step(model, precision=precision)(*_batch(), 1e-3)
    assert seen == [dtype] and all(p.dtype == torch.float32 for p in model.parameters())


def test_one_process_reads_the_stop_flags_after_the_optimiser_step():
    """A signal that arrives during a step, its optimiser step included, stops the run right after it."""
    torch.manual_seed(0)
    model = create_model("cct_2_3x2_32_keras")
    step = _step(model)
    signalled = {"now": False}
    real_step = step.optimizer.step

    def optimiser_step(*args, **kwargs):
        signalled["now"] = True
        return real_step(*args, **kwargs)
    step.optimizer.step = optimiser_step
    step(*_batch(), 1e-3, share=lambda: (signalled["now"],))
    assert step.shared == (True,)


@pytest.mark.parametrize("skip", [False, True])
def test_a_nonfinite_loss_never_steps(monkeypatch, skip):
    torch.manual_seed(0)
    model = create_model("cct_2_3x2_32_keras")
    step = _step(model, skip_nonfinite=skip)
    before = [p.detach().clone() for p in model.parameters()]
    calls = _count_backward(monkeypatch)
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    images, labels = _batch()
    if skip:
        assert math.isnan(step(images, labels, 1e-3).item()) and step.skipped == 1
    else:
        with pytest.raises(NonFiniteLossError, match="the loss became nan"):
            step(images, labels, 1e-3)
    assert calls["n"] == 1  # backward ran (as every DDP rank must), then the gradients were dropped
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert step.totals()[2] == 0  # a skipped step counts no images


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluation_between_steps_sees_the_current_weights(precision):
    """Validation after training steps evaluates the weights as they are now: the Keras model's fast
    attention folds its products for inference (`cct.kernels.fuse`, which evaluation calls), and train's
    fused AdamW updates weights in place without bumping their version counters (a stale inference cache
    once evaluated old weights mid-run). Compared with the reference layers on the same weights."""
    cfg = make_config("cct_2_3x2_32_keras", "memory", "unused", "keras", batch_size=16, precision=precision)
    torch.manual_seed(0)
    model = use_kernels(create_model("cct_2_3x2_32_keras"), "fast")
    reference = create_model("cct_2_3x2_32_keras")
    optimizer = make_optimizer(model, cfg)
    step = make_train_step(model, optimizer, augment_config(cfg, None, None), precision=precision,
                           device="cpu", label_smoothing=0.1, num_classes=10,
                           generator=torch.Generator().manual_seed(1))
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(16) % 10
    prep = Preprocessing((32, 32), 3, precision=precision, batch_size=16)
    losses = []
    for _ in range(3):
        model.train()
        step(images, labels, 1e-2)
        model.eval()
        folded = evaluate(model, images, labels, prep)["loss"]
        reference.load_state_dict(model.state_dict())
        plain = evaluate(reference, images, labels, prep)["loss"]
        assert folded == pytest.approx(plain, rel=2e-2 if precision == "bf16" else 1e-4)
        losses.append(plain)
    assert len(set(losses)) == 3  # the weights did move


# ---------------------------------------------------------------------- progressive resizing
def test_resolution_at_follows_the_phases():
    phases = [(0.0, 16), (0.4, 24), (0.7, 32)]
    sides = [resolution_at(s, total_steps=10, phases=phases) for s in range(10)]
    assert sides == [16] * 4 + [24] * 3 + [32] * 3
    # a floor (the largest side trained so far) holds where a longer total moved the phases later
    assert [resolution_at(s, total_steps=20, phases=phases, floor=24) for s in range(7, 16)] == [24] * 7 + [32] * 2


def test_res_schedule_phases_in_pixels_and_too_small_an_input():
    from cct.step import res_phases
    model = create_model("cvt_2_4_32")  # 4-px patches
    assert res_phases(make_config("cvt_2_4_32", "d", "o", res_schedule="0.5@0,0.75@0.5,1@0.7"), model) == \
        [(0.0, 16), (0.5, 24), (0.7, 32)]
    with pytest.raises(CCTError, match="3 px is too small for cvt_2_4_32's tokenizer"):
        res_phases(make_config("cvt_2_4_32", "d", "o", res_schedule="0.1@0,1@0.5"), model)


def test_resize_batch_averages_areas():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(2, 3, 1, 1)
    half = resize_batch(x, 2)
    assert half.shape == (2, 3, 2, 2) and half[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]  # 2×2 means
    assert resize_batch(x, 4) is x
    assert resize_batch(torch.zeros(1, 3, 8, 12), 4).shape == (1, 3, 4, 6)  # the width in proportion


def test_a_step_at_a_reduced_resolution_trains_the_native_embedding():
    model = create_model(MODEL, num_classes=10)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    step = _step(model)
    before = model.pos_embed.detach().clone()
    step.resolution = 16
    step(*_batch(), lr=1e-3)
    step.resolution = 32  # the native side: no resize
    step(*_batch(), lr=1e-3)
    assert seen == [(16, 16), (32, 32)]
    assert model.pos_embed.shape == before.shape and not torch.equal(model.pos_embed, before)
    assert not model.any_grid  # only inside the step
    with pytest.raises(ValueError, match="positional embedding"):
        model(torch.zeros(1, 3, 16, 16))


# ---------------------------------------------------------------------- adversarial word vectors (text)
def _text_model():
    torch.manual_seed(0)  # no dropout of any kind, so that both passes are deterministic
    return create_model("text_cct_2", num_classes=3, vocab_size=30, seq_len=8, kernel_size=2, drop_rate=0.0,
                        attn_drop_rate=0.0, drop_path_rate=0.0)


def _token_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 30, (6, 8), generator=g)
    mask = torch.arange(8) < torch.tensor([8, 5, 3, 8, 2, 6])[:, None]
    return TokenBatch(ids.masked_fill(~mask, PAD_ID), mask), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("fgm", [0.0, 0.5])
def test_fgm_adds_the_gradient_at_the_moved_word_vectors(monkeypatch, fgm):
    model, (batch, labels) = _text_model(), _token_batch()
    reference = copy.deepcopy(model)
    # the expected update by hand: SGD at lr 1 moves every weight by minus the sum of the two passes' gradients
    loss = F.cross_entropy(reference(batch.ids, batch.mask), labels, label_smoothing=0.1)
    expected = torch.autograd.grad(loss, list(reference.parameters()))
    if fgm:
        table = reference.embedding.weight
        g = expected[[p is table for p in reference.parameters()].index(True)]
        assert 0 < int((g.abs().sum(1) > 0).sum()) < 30  # only the batch's words have a gradient, so only they move
        with torch.no_grad():
            table += fgm * g / g.norm()
        loss = F.cross_entropy(reference(batch.ids, batch.mask), labels, label_smoothing=0.1)
        expected = [a + b for a, b in zip(expected, torch.autograd.grad(loss, list(reference.parameters())))]
        with torch.no_grad():
            table -= fgm * g / g.norm()
    aug = TextAugmentConfig(label_smoothing=0.1, fgm=fgm)
    step = make_train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), aug, precision="fp32", device="cpu",
                           label_smoothing=0.1, num_classes=3, generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    calls = _count_backward(monkeypatch)
    step(batch, labels, 1.0)
    assert calls["n"] == (2 if fgm else 1)
    for b, p, g in zip(before, model.parameters(), expected):
        torch.testing.assert_close(p.detach(), b - g, atol=2e-5, rtol=1e-4)
    # the clean pass's loss is what the step reports
    assert step.totals()[0] == pytest.approx(F.cross_entropy(_text_model()(batch.ids, batch.mask), labels,
                                                             label_smoothing=0.1).item(), rel=1e-5)


def test_fgm_per_text_moves_each_texts_word_vectors_by_fgm(monkeypatch):
    model, (batch, labels) = _text_model(), _token_batch()
    reference = copy.deepcopy(model)
    fgm = 0.5
    # by hand: a zero shift added to the word vectors, its gradient taken, then the loss again at fgm along it,
    # normalised text by text (padded positions get no gradient, so they do not move)
    zero = torch.zeros(6, 8, reference.cfg.word_embedding_dim, requires_grad=True)
    handle = reference.embedding.register_forward_hook(lambda m, i, out: out + zero)
    loss = F.cross_entropy(reference(batch.ids, batch.mask), labels, label_smoothing=0.1)
    *expected, g = torch.autograd.grad(loss, [*reference.parameters(), zero])
    handle.remove()
    assert torch.all(g[~batch.mask] == 0) and torch.all(g.flatten(1).norm(dim=1) > 0)
    shift = fgm * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    handle = reference.embedding.register_forward_hook(lambda m, i, out: out + shift)
    loss = F.cross_entropy(reference(batch.ids, batch.mask), labels, label_smoothing=0.1)
    expected = [a + b for a, b in zip(expected, torch.autograd.grad(loss, list(reference.parameters())))]
    handle.remove()
    aug = TextAugmentConfig(label_smoothing=0.1, fgm=fgm, fgm_norm="text")
    step = make_train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), aug, precision="fp32", device="cpu",
                           label_smoothing=0.1, num_classes=3, generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    calls = _count_backward(monkeypatch)
    step(batch, labels, 1.0)
    assert calls["n"] == 2
    for b, p, g in zip(before, model.parameters(), expected):
        torch.testing.assert_close(p.detach(), b - g, atol=2e-5, rtol=1e-4)
    # the step's hooks are gone: the model predicts as before it
    assert not model.embedding._forward_hooks
    # and the table-normalised move is another one
    other = _text_model()
    make_train_step(other, torch.optim.SGD(other.parameters(), lr=1.0), TextAugmentConfig(label_smoothing=0.1,
                    fgm=fgm), precision="fp32", device="cpu", label_smoothing=0.1, num_classes=3,
                    generator=torch.Generator().manual_seed(1))(batch, labels, 1.0)
    assert not torch.allclose(other.head.weight, model.head.weight, atol=1e-6)


def _shifted(model, batch, shift):
    """The model's logits with `shift` added to its word vectors."""
    handle = model.embedding.register_forward_hook(lambda m, i, out: out + shift)
    try:
        return model(batch.ids, batch.mask)
    finally:
        handle.remove()


def _per_text(x: torch.Tensor, length: float) -> torch.Tensor:
    return length * x / x.flatten(1).norm(dim=1).view(-1, 1, 1)


@pytest.mark.parametrize("fgm", [0.0, 0.5])
def test_vat_adds_the_kl_gradient_at_the_virtually_adversarial_word_vectors(monkeypatch, fgm):
    model, (batch, labels) = _text_model(), _token_batch()
    reference = copy.deepcopy(model)
    vat, dim = 2.0, reference.cfg.word_embedding_dim
    aug = TextAugmentConfig(label_smoothing=0.1, fgm=fgm, fgm_norm="text", vat=vat)
    # by hand: the clean pass (and FGM's, per text), then VAT: a random direction drawn as the step draws it,
    # masked and scaled to the probe's length per text, the KL's gradient there, the KL again at vat along it
    zero = torch.zeros(6, 8, dim, requires_grad=True)
    logits = _shifted(reference, batch, zero)
    loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
    *expected, g = torch.autograd.grad(loss, [*reference.parameters(), zero])
    if fgm:
        loss = F.cross_entropy(_shifted(reference, batch, _per_text(g, fgm)), labels, label_smoothing=0.1)
        expected = [a + b for a, b in zip(expected, torch.autograd.grad(loss, list(reference.parameters())))]
    clean = logits.detach().log_softmax(-1)
    kl = lambda out: F.kl_div(out.log_softmax(-1), clean, log_target=True, reduction="batchmean")
    drawn = torch.Generator().manual_seed(1)
    augmenter(aug)(batch, labels, drawn, aug, num_classes=3, mix=True)  # whatever the augmentation draws first
    probe = _per_text(torch.randn(6, 8, dim, generator=drawn) * batch.mask.unsqueeze(-1), VAT_PROBE)
    probe.requires_grad_()
    direction, = torch.autograd.grad(kl(_shifted(reference, batch, probe)), probe)
    assert torch.all(direction[~batch.mask] == 0)  # padded positions do not move
    loss = kl(_shifted(reference, batch, _per_text(direction, vat)))
    assert loss > 0
    expected = [a + b for a, b in zip(expected, torch.autograd.grad(loss, list(reference.parameters())))]
    step = make_train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), aug, precision="fp32", device="cpu",
                           label_smoothing=0.1, num_classes=3, generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    calls = _count_backward(monkeypatch)
    step(batch, labels, 1.0)
    assert calls["n"] == (3 if fgm else 2)  # the probe's gradient is taken by autograd.grad, on it alone
    for b, p, g in zip(before, model.parameters(), expected):
        torch.testing.assert_close(p.detach(), b - g, atol=2e-5, rtol=1e-4)
    assert not model.embedding._forward_hooks
    # without VAT the step lands elsewhere
    other = _text_model()
    make_train_step(other, torch.optim.SGD(other.parameters(), lr=1.0), replace(aug, vat=0.0), precision="fp32",
                    device="cpu", label_smoothing=0.1, num_classes=3,
                    generator=torch.Generator().manual_seed(1))(batch, labels, 1.0)
    assert not torch.allclose(other.head.weight, model.head.weight, atol=1e-6)


def test_fgm_norm_is_checked():
    validate(make_config("text_cct_2", "d", "o", fgm=1.0, fgm_norm="table"))
    validate(make_config("text_cct_2", "d", "o", fgm=0.0))  # FGM off: the recipe's fgm_norm is unused, not an error
    with pytest.raises(CCTError, match="--fgm-norm text .* needs --fgm > 0"):
        make_config("text_cct_2", "d", "o", fgm=0.0, fgm_norm="text")
    with pytest.raises(CCTError, match="--fgm-norm.* is for text models"):
        validate(make_config(MODEL, "d", "o", fgm_norm="text"))
    with pytest.raises(AssertionError, match="fgm_norm must be one of"):
        TextAugmentConfig(fgm=1.0, fgm_norm="batch")


@pytest.mark.parametrize("name,value", [("fgm", 1.0), ("vat", 1.0), ("fine_aux", 0.5), ("fine_vote", 2.0)])
def test_text_step_options_are_refused_for_image_models_and_below_zero(name, value):
    flag = "--" + name.replace("_", "-")
    validate(make_config("text_cct_2", "d", "o", **{name: value}))
    with pytest.raises(CCTError, match=f"{flag}.* is for text models"):
        validate(make_config(MODEL, "d", "o", **{name: value}))
    with pytest.raises(CCTError, match=f"{flag} must be non-negative"):
        validate(make_config("text_cct_2", "d", "o", **{name: -1.0}))


def test_fgm_needs_a_word_embedding():
    with pytest.raises(AssertionError, match="one word embedding"):
        make_train_step(create_model(MODEL), torch.optim.SGD(create_model(MODEL).parameters(), lr=1.0),
                        TextAugmentConfig(fgm=1.0), precision="fp32", device="cpu", label_smoothing=0.0,
                        num_classes=10, generator=torch.Generator())


# ---------------------------------------------------------------------- the fine labels' second head (text)
def test_fine_aux_adds_the_second_heads_loss_and_reports_the_first():
    torch.manual_seed(0)
    model = create_model("text_cct_2", num_classes=3, vocab_size=30, seq_len=8, kernel_size=2, drop_rate=0.0,
                         attn_drop_rate=0.0, drop_path_rate=0.0, aux_classes=4)
    reference = copy.deepcopy(model)
    batch, labels = _token_batch()
    fine = torch.tensor([0, 3, -1, 1, 2, 3])  # -1: a text without a fine label adds nothing
    logits, aux_logits = reference(batch.ids, batch.mask, with_aux=True)
    main = F.cross_entropy(logits, labels, label_smoothing=0.1)
    has = fine >= 0
    aux = F.cross_entropy(aux_logits[has], fine[has], label_smoothing=0.1, reduction="sum") / len(fine)
    expected = torch.autograd.grad(main + 0.5 * aux, list(reference.parameters()))
    step = make_train_step(model, torch.optim.SGD(model.parameters(), lr=1.0),
                           TextAugmentConfig(label_smoothing=0.1, fine_aux=0.5), precision="fp32", device="cpu",
                           label_smoothing=0.1, num_classes=3, generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    step(TokenBatch(batch.ids, batch.mask, fine), labels, 1.0)
    for b, p, g in zip(before, model.parameters(), expected):
        torch.testing.assert_close(p.detach(), b - g, atol=2e-5, rtol=1e-4)
    assert step.totals()[0] == pytest.approx(main.item(), rel=1e-5)  # the run's loss is the first head's
    head = model.aux_head.weight.detach().clone()
    step(batch, labels, 1.0)  # a batch without fine labels (a validation or benchmark batch) trains no second head
    assert torch.equal(model.aux_head.weight, head)


def test_a_voting_model_trains_as_the_same_model_without_the_vote():
    """`aux_vote` changes what `forward` predicts, not what the step trains: the first head's own logits (its loss,
    VAT's KL) and the second head's, with FGM and VAT on, and on a batch without fine labels."""
    def trained(**vote) -> list[list[torch.Tensor]]:
        torch.manual_seed(0)
        model = create_model("text_cct_2", num_classes=3, vocab_size=30, seq_len=8, kernel_size=2, drop_rate=0.0,
                             attn_drop_rate=0.0, drop_path_rate=0.0, aux_classes=4, **vote)
        step = make_train_step(model, torch.optim.SGD(model.parameters(), lr=1.0),
                               TextAugmentConfig(label_smoothing=0.1, fgm=0.5, fgm_norm="text", vat=2.0,
                                                 fine_aux=0.5), precision="fp32", device="cpu",
                               label_smoothing=0.1, num_classes=3, generator=torch.Generator().manual_seed(1))
        batch, labels = _token_batch()
        weights = []
        for b in (TokenBatch(batch.ids, batch.mask, torch.tensor([0, 3, -1, 1, 2, 3])), batch):
            step(b, labels, 1.0)
            weights.append([p.detach().clone() for p in model.parameters()])
        return weights

    plain, voting = trained(), trained(aux_vote=2.0, aux_parent=[0, 1, 1, 2])
    for after_plain, after_voting in zip(plain, voting):
        for a, b in zip(after_plain, after_voting):
            torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_fine_aux_targets_are_smoothed_and_mixed_as_the_main_ones():
    model = create_model("text_cct_2", num_classes=3, vocab_size=30, seq_len=8, aux_classes=4)
    step = make_train_step(model, torch.optim.SGD(model.parameters(), lr=1.0),
                           TextAugmentConfig(label_smoothing=0.2, mixup_alpha=0.4, fine_aux=0.5), precision="fp32",
                           device="cpu", label_smoothing=0.2, num_classes=3, generator=torch.Generator())
    batch = TokenBatch(torch.full((3, 2), 5), torch.ones(3, 2, dtype=torch.bool), torch.tensor([2, -1, 0]))
    plain = step._aux_targets(batch, [batch.ids, batch.mask])
    torch.testing.assert_close(plain, torch.tensor([[0.05, 0.05, 0.85, 0.05], [0, 0, 0, 0], [0.85, 0.05, 0.05, 0.05]]))
    mixed = step._aux_targets(batch, [batch.ids, batch.mask, torch.tensor(0.3)])
    torch.testing.assert_close(mixed, 0.3 * plain + 0.7 * plain.flip(0))
