"""cct.registry: the variants as data, create_model's overrides and errors, the model a weights file names."""
from pathlib import Path

import pytest
import torch

import cct
from cct.errors import CCTError
from cct.registry import pretrained_model
from test_checkpoint import official_keys

FIXTURES = Path(__file__).parent / "fixtures"


def test_list_models_sorted_and_filtered():
    names = cct.list_models()
    assert names == sorted(names)
    assert "vit_lite_7_4_32" in names and "vit_7_4_32" in names and "cct_2_3x2_32_keras" in names
    assert cct.list_models("cvt_*") == [n for n in names if n.startswith("cvt_")]
    assert all(n.endswith("_sine") for n in cct.list_models("*_sine"))


def test_unknown_model_and_override_are_errors():
    with pytest.raises(ValueError, match="unknown model"):
        cct.create_model("cct_99_3x2_32")
    with pytest.raises(TypeError, match="num_clases"):
        cct.create_model("cct_2_3x2_32", num_clases=5)
    with pytest.raises(AssertionError, match="positional_embedding"):
        cct.create_model("cct_2_3x2_32", positional_embedding="rotary")


def test_pretrained_false_is_none_and_true_says_there_are_no_hosted_weights():
    for name in ("cct_2_3x2_32", "text_cct_2"):
        assert type(cct.create_model(name, pretrained=False)) is type(cct.create_model(name))
        with pytest.raises(cct.CheckpointError, match="cct hosts no weights to download for " + name):
            cct.create_model(name, pretrained=True)


@pytest.mark.parametrize("name, kernel, stride, padding, tokens", [
    ("cct_2_3x2_32", 5, 1, 2, 64),  # the official cct_2(kernel_size=5): 417,867 parameters
    ("cct_7_7x2_224", 3, 1, 1, 3136),
    ("cvt_2_4_32", 8, 8, 0, 16),  # patches: the stride is the patch size
    ("cct_2_3x2_32_keras", 5, 1, 0, 49),  # the Keras example's valid convs stay valid
])
def test_kernel_size_override_brings_the_official_stride_and_padding(name, kernel, stride, padding, tokens):
    model = cct.create_model(name, kernel_size=kernel)
    assert (model.cfg.stride, model.cfg.padding, model.grid[0] * model.grid[1]) == (stride, padding, tokens)
    if name == "cct_2_3x2_32":
        assert sum(p.numel() for p in model.parameters()) == 417_867
    given = cct.create_model(name, kernel_size=kernel, padding=padding + 1, stride=2)  # what is given wins
    assert (given.cfg.stride, given.cfg.padding) == (2, padding + 1)


def test_overrides():
    model = cct.create_model("cct_7_3x1_32", num_classes=3, img_size=(24, 40), in_chans=1, drop_rate=0.2,
                             attn_drop_rate=0.0, drop_path_rate=0.3)
    assert model.grid == (12, 20) and model.pos_embed.shape == (1, 240, 256)
    assert model(torch.randn(2, 1, 24, 40)).shape == (2, 3)
    assert model.blocks[-1].drop_path == pytest.approx(0.3) and model.blocks[0].drop_path == 0.0


def test_pretrained_model_names_the_weights_model(tmp_path):
    cct.save_checkpoint(cct.create_model("cvt_2_4_32"), tmp_path / "m.pt")
    assert pretrained_model(tmp_path / "m.pt") == "cvt_2_4_32"
    assert pretrained_model(FIXTURES / "keras_cct.weights.h5") == "cct_2_3x2_32_keras"
    torch.save(official_keys(cct.create_model("cct_2_3x2_32")), tmp_path / "official.pth")
    with pytest.raises(CCTError, match="give --model"):
        pretrained_model(tmp_path / "official.pth")
