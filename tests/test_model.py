"""Every registered model: shapes, gradients, parameter counts, positional embeddings, input sizes."""
import math

import pytest
import torch

import cct
from cct.model import _same_pool_padding, any_token_grid

# the official implementation's counts (default heads: 10 classes at 32 px, 102 for Flowers, 1000 for ImageNet)
OFFICIAL_PARAMS = {
    "cct_2_3x2_32": 283_723, "cct_4_3x2_32": 482_123, "cct_6_3x1_32": 3_233_803, "cct_6_3x2_32": 3_326_923,
    "cct_7_3x1_32": 3_760_139, "cct_7_3x2_32": 3_853_259, "cct_7_7x2_224": 4_573_735,
    "cct_14_7x2_224": 22_367_273, "cct_14_7x2_384": 22_513_193, "cvt_6_4_32": 3_190_283,
    "cvt_7_4_32": 3_716_619, "vit_lite_6_4_32": 3_190_538, "vit_lite_7_4_32": 3_716_874,
    "vit_6_4_32": 3_190_538, "cct_2_3x2_32_keras": 416_331,
}
SMALL = [n for n in cct.list_models() if not n.startswith("text_") and cct.get_config(n).img_size == (32, 32)]


@pytest.mark.parametrize("name", cct.list_models())
def test_builds_with_config(name):
    model = cct.create_model(name)
    assert model.cfg.num_classes == model.head.out_features
    if "_sine" in name:
        assert model.cfg.positional_embedding == "sine" and model.pos_embed is None
        assert "sine_embed" not in model.state_dict()  # recomputed, never a weight


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_count_matches_official(name):
    assert cct.num_params(cct.create_model(name)) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", SMALL)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = cct.create_model(name)
    x = torch.randn(3, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (3, model.cfg.num_classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    feats = model.forward_features(x)
    assert feats.shape == (3, model.grid[0] * model.grid[1] + model.num_prefix_tokens, model.cfg.embed_dim)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (3, model.cfg.embed_dim)
    torch.testing.assert_close(model.forward_head(feats), model(x))


def test_large_models_forward():
    model = cct.create_model("cct_7_7x2_224").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 102)


@pytest.mark.parametrize("pe", ["learnable", "sine", "none"])
@pytest.mark.parametrize("name", ["cct_2_3x2_32", "cvt_2_4_32", "vit_2_4_32", "cct_2_3x2_32_keras"])
def test_positional_embedding_kinds(name, pe):
    model = cct.create_model(name, positional_embedding=pe).eval()
    learnable = cct.num_params(cct.create_model(name, positional_embedding="learnable"))
    tokens = model.grid[0] * model.grid[1] + model.num_prefix_tokens
    expected = learnable - (0 if pe == "learnable" else tokens * model.cfg.embed_dim)
    assert cct.num_params(model) == expected
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    if pe == "sine":  # the embedding really is added: zeroing it changes the output
        model.sine_embed.zero_()
        assert not torch.allclose(model(x), y)


@pytest.mark.parametrize("size", [(32, 48), (40, 24)])
@pytest.mark.parametrize("pe", ["sine", "none", "learnable"])
def test_rectangular_and_single_channel(size, pe):
    model = cct.create_model("cct_2_3x2_32", img_size=size, in_chans=1, positional_embedding=pe, num_classes=4)
    assert model(torch.randn(2, 1, *size)).shape == (2, 4)


def test_sine_and_none_accept_other_sizes_but_learnable_says_how_to_resize():
    for pe in ("sine", "none"):
        assert cct.create_model("cct_2_3x2_32", positional_embedding=pe)(torch.randn(1, 3, 48, 40)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"resize the embedding with model.set_img_size\(size\)"):
        cct.create_model("cct_2_3x2_32")(torch.randn(1, 3, 48, 48))


def test_any_token_grid_interpolates_the_learnable_embedding_with_gradients():
    """Progressive resizing's forward: inside `any_token_grid` a smaller input takes the native embedding resized
    (the same values `set_img_size` would give), and the gradient reaches the native embedding; outside, an error."""
    model = cct.create_model("vit_2_4_32").eval()
    x = torch.randn(2, 3, 16, 16)
    with cct.model.any_token_grid(model):
        small = model(x)
        small.sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="set_img_size"):
        model(x)
    model.set_img_size(16)
    torch.testing.assert_close(model(x), small)


def test_set_img_size_interpolates_learnable_embedding():
    model = cct.create_model("vit_2_4_32").eval()
    old = model.pos_embed.detach().clone()
    model.set_img_size((48, 32))
    assert model.grid == (12, 8) and model.pos_embed.shape == (1, 1 + 96, 128)
    torch.testing.assert_close(model.pos_embed[:, :1], old[:, :1])  # the class token's embedding is kept
    assert model(torch.randn(2, 3, 48, 32)).shape == (2, 10)
    model.set_img_size(32)  # a constant embedding survives a round trip exactly
    flat = torch.full_like(model.pos_embed, 0.5)
    model.pos_embed.data.copy_(flat)
    model.set_img_size(64)
    torch.testing.assert_close(model.pos_embed, torch.full((1, 1 + 256, 128), 0.5))


@pytest.mark.parametrize("size", [5, 6, 31, 32, 33])
def test_tf_same_pooling_matches_definition(size):
    # TensorFlow: out = ceil(n / s), pad total = max((out - 1) * s + k - n, 0), the extra pixel after
    k, s = 3, 2
    before, after = _same_pool_padding(size, k, s)
    out = math.ceil(size / s)
    assert before + after == max((out - 1) * s + k - size, 0) and after - before in (0, 1)
    model = cct.create_model("cct_2_3x2_32_keras", img_size=size + 4, positional_embedding="none")
    x = torch.randn(1, 64, size, size)
    y = model.tokenizer._pool(x)
    assert y.shape[-1] == out
    # brute force: each output is the max over its window clipped to the image
    ref = torch.stack([torch.stack([x[..., max(i * s - before, 0):i * s - before + k, max(j * s - before, 0):j * s - before + k]
                                    .amax(dim=(-2, -1)) for j in range(out)], -1) for i in range(out)], -2)
    torch.testing.assert_close(y, ref)


def test_stochastic_depth_and_dropout_only_in_training():
    torch.manual_seed(0)
    model = cct.create_model("cct_2_3x2_32_keras")
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_forward_computes_in_parameter_dtype():
    model = cct.create_model("cct_2_3x2_32").to(torch.bfloat16).eval()
    assert model(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16
    model = cct.create_model("cct_2_3x2_32").double().eval()
    assert model(torch.randn(2, 3, 32, 32)).dtype == torch.float64


@pytest.mark.parametrize("name", ["cct_7_3x1_32", "vit_2_4_32", "text_cct_2"])
def test_timm_interface(name):
    model = cct.create_model(name)
    x = torch.randint(2, 50, (1, 12)) if name.startswith("text") else torch.randn(1, 3, 32, 32)
    width = model.cfg.embed_dim
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert model.num_features == width and model.num_classes == model.cfg.num_classes
    assert model.get_classifier() is model.head
    model.class_names = ["a"] * model.num_classes
    model.reset_classifier(5)
    assert model.head.out_features == 5 and model.num_classes == model.cfg.num_classes == 5 and model.class_names is None
    pooling = "cls" if name.startswith("vit") else "seq"
    model.reset_classifier(3, pooling)  # timm's global_pool: the model's own pooling only
    assert model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (1, width) and model.num_classes == 0
    for bad, message in ((-1, "num_classes must be a non-negative int"), ("3", "num_classes must be a non-negative"),
                         ((5, "avg"), "not global_pool='avg'")):
        with pytest.raises(AssertionError, match=message):  # refused before a checkpoint could hold it
            model.reset_classifier(*(bad if isinstance(bad, tuple) else (bad,)))


def test_keras_model_drops_out_where_the_example_does():
    """The Keras example goes from the positional embedding straight into its blocks; the official code has a
    dropout there (drop_rate)."""
    assert isinstance(cct.create_model("cct_2_3x2_32_keras").pos_drop, torch.nn.Identity)
    assert cct.get_config("cct_2_3x2_32_keras").drop_rate == 0.1  # the MLP's dropouts still
    assert isinstance(cct.create_model("cct_7_3x1_32", drop_rate=0.1).pos_drop, torch.nn.Dropout)


def test_deeper_tokenizer_widths_and_pools():
    model = cct.create_model("cct_2_3x4_32")
    assert [c.out_channels for c in model.tokenizer.convs] == [64, 128, 128, 128]
    assert model.grid == (8, 8) and model.tokenizer.grid((16, 16)) == (4, 4)  # pooled after convs 0 and 2 only
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 64, 128)
    with any_token_grid(model):
        assert model.forward_features(torch.randn(2, 3, 16, 16)).shape == (2, 16, 128)
    cfg = model.cfg
    assert cct.CCTConfig.from_dict(cfg.to_dict()) == cfg  # lists in the checkpoint's JSON-able dict, tuples back
    # by hand: 3x3 convs at 32, 16, 16 and 8 px, then the encoder and head of cct_2_3x2_32
    conv = 32 * 32 * 64 * 27 + 16 * 16 * 128 * 576 + 16 * 16 * 128 * 1152 + 8 * 8 * 128 * 1152
    official_convs = 32 * 32 * 64 * 27 + 16 * 16 * 128 * 576
    assert cct.count_macs(model) - conv == cct.count_macs(cct.create_model("cct_2_3x2_32")) - official_convs


def test_fifth_conv_on_the_token_grid():
    model, four = cct.create_model("cct_2_3x5_32"), cct.create_model("cct_2_3x4_32")
    assert [c.out_channels for c in model.tokenizer.convs] == [64, 128, 128, 128, 128]
    assert model.grid == (8, 8) and model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 64, 128)
    # the one extra 3x3 conv runs on the 8x8 grid, unpooled: everything else is cct_2_3x4_32's
    assert cct.count_macs(model) - cct.count_macs(four) == 8 * 8 * 128 * 1152
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in four.parameters()) == 128 * 1152


@pytest.mark.parametrize("overrides, message", [
    (dict(conv_widths=(64, 128)), "conv_widths must give 4 widths"),
    (dict(conv_widths=(64, 128, 128, 64)), "ending in embed_dim 128"),
    (dict(pool_layers=(0, 4)), "pool_layers must be conv indices"),
])
def test_deeper_tokenizer_rejects_inconsistent_settings(overrides, message):
    with pytest.raises(AssertionError, match=message):
        cct.create_model("cct_2_3x4_32", **overrides)


@pytest.mark.parametrize("overrides, message", [
    (dict(img_size="32"), "img_size must be a positive int or .h, w. of ints, got '32'"),  # not (3, 2)
    (dict(img_size=(32, 0)), "img_size must be a positive int"),
    (dict(num_classes=-1), "num_classes must be a non-negative int .0: no classifier., got -1"),
    (dict(in_chans=0), "in_chans must be an int >= 1, got 0"),
    (dict(depth=2.5), "depth must be an int >= 1, got 2.5"),
    (dict(num_heads=3), "embed_dim 128 is not divisible by num_heads 3"),  # was a 126-wide attention
    (dict(embed_dim=127), "embed_dim 127 is not divisible by num_heads 2"),
    (dict(num_heads=0), "num_heads must be an int >= 1, got 0"),  # was a ZeroDivisionError
    (dict(stride=0), "stride must be an int >= 1, got 0"),
    (dict(kernel_size=0), "kernel_size must be an int >= 1, got 0"),  # built, then failed in forward
    (dict(in_chans=True), "in_chans must be an int >= 1, got True"),  # a bool is no channel count
    (dict(num_classes=True), "num_classes must be a non-negative int .0: no classifier., got True"),
])
def test_config_overrides_are_checked(overrides, message):
    with pytest.raises(AssertionError, match=message):
        cct.create_model("cct_2_3x2_32", **overrides)


def test_count_macs():
    # cct_2_3x2_32_keras: ≈ 0.041 GMACs, i.e. ≈ 0.25 GFLOP per training image (forward + backward ≈ 3 × forward)
    macs = cct.count_macs(cct.create_model("cct_2_3x2_32_keras"))
    conv = 30 * 30 * 64 * 27 + 14 * 14 * 128 * 576
    assert conv < macs < conv + 2 * 64 * (128 * 768 + 256 * 128 + 2 * 128 * 128 + 2 * 64 * 256) + 64 * 129 + 1290 + 1
    assert 6 * macs / 1e9 == pytest.approx(0.25, rel=0.05)
    # at half the side (progressive resizing): a quarter of the convolutions' and about a quarter of the rest
    half = cct.count_macs(cct.create_model("cct_2_3x2_32"), (16, 16))
    assert 0.2 < half / cct.count_macs(cct.create_model("cct_2_3x2_32")) < 0.3
