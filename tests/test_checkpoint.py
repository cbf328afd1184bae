"""Checkpoints: self-describing round trips, safe loading, official SHI-Labs weights, adaptation."""
import pickle

import pytest
import torch

import cct
from cct.checkpoint import official_state_dict, read_checkpoint
from cct.layers import sinusoidal_embedding


def _same_outputs(a, b, size=(32, 32), chans=3):
    x = torch.randn(2, chans, *size)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("name", ["cct_2_3x2_32", "cct_2_3x2_32_sine", "cvt_2_4_32", "vit_lite_2_4_32_sine",
                                  "cct_2_3x2_32_keras"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_round_trip_rebuilds_without_name(tmp_path, name, fmt):
    model = cct.create_model(name, num_classes=3, img_size=(32, 48))
    model.class_names = ["cat", "dog", "emu"]
    path = cct.save_checkpoint(model, tmp_path / f"m.{fmt}", format=fmt)
    loaded = cct.load_checkpoint(path)
    assert loaded.cfg == model.cfg and loaded.class_names == ["cat", "dog", "emu"] and loaded.name == model.name
    _same_outputs(model, loaded, size=(32, 48))
    assert not list(tmp_path.glob(".*.tmp"))


def test_pickled_object_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"format": "cct-checkpoint", "config": {}, "state_dict": {}, "x": Evil()}, path)
    with pytest.raises(cct.CheckpointError, match="pickled Python objects"):
        cct.load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, bytes(range(256)) * 4, pickle.dumps([1, 2])])
def test_garbage_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(cct.CheckpointError, match="bad.pt"):
        cct.load_checkpoint(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(cct.CheckpointError, match="not found"):
        cct.load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(cct.CheckpointError, match="not a cct checkpoint"):
        cct.load_checkpoint(tmp_path / "sd.pt")
    with pytest.raises(cct.CheckpointError, match="unrecognised weights"):
        cct.create_model("cct_2_3x2_32", pretrained=tmp_path / "sd.pt")


def test_mismatched_weights_are_a_clear_error(tmp_path):
    path = cct.save_checkpoint(cct.create_model("cct_2_3x2_32"), tmp_path / "a.pt")
    data = read_checkpoint(path)
    data["config"]["embed_dim"] = 64
    torch.save(data, path)
    with pytest.raises(cct.CheckpointError, match="do not fit"):
        cct.load_checkpoint(path)


# -------------------------------------------------------------------- official SHI-Labs weights
def official_keys(model):
    """Our state dict renamed by hand to the official module names (src/utils/{tokenizer,transformers}.py)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("tokenizer.convs."):
            _, _, i, p = k.split(".")
            k = f"tokenizer.conv_layers.{i}.0.{p}"
        elif k == "pos_embed":
            k = "classifier.positional_emb"
        elif k == "cls_token":
            k = "classifier.class_emb"
        elif k.startswith("head."):
            k = "classifier.fc." + k[5:]
        else:
            k = "classifier." + k.replace(".attn.", ".self_attn.").replace(".fc1.", ".linear1.").replace(".fc2.", ".linear2.")
        out[k] = v
    return out


EXPECTED_OFFICIAL_KEYS = {
    "tokenizer.conv_layers.0.0.weight", "tokenizer.conv_layers.1.0.weight", "classifier.positional_emb",
    "classifier.attention_pool.weight", "classifier.attention_pool.bias", "classifier.blocks.0.pre_norm.weight",
    "classifier.blocks.0.pre_norm.bias", "classifier.blocks.0.self_attn.qkv.weight",
    "classifier.blocks.0.self_attn.proj.weight", "classifier.blocks.0.self_attn.proj.bias",
    "classifier.blocks.0.linear1.weight", "classifier.blocks.0.linear1.bias", "classifier.blocks.0.norm1.weight",
    "classifier.blocks.0.norm1.bias", "classifier.blocks.0.linear2.weight", "classifier.blocks.0.linear2.bias",
    "classifier.norm.weight", "classifier.norm.bias", "classifier.fc.weight", "classifier.fc.bias",
}


def test_official_key_names_are_the_real_ones():
    keys = set(official_keys(cct.create_model("cct_2_3x2_32")))
    assert EXPECTED_OFFICIAL_KEYS <= keys and all(k.startswith(("tokenizer.", "classifier.")) for k in keys)


@pytest.mark.parametrize("name", ["cct_7_3x1_32", "cvt_6_4_32", "vit_lite_7_4_32"])
def test_official_state_dict_loads(tmp_path, name):
    src = cct.create_model(name)
    path = tmp_path / "official.pth"
    torch.save({"module." + k: v for k, v in official_keys(src).items()}, path)  # as saved from DDP
    dst = cct.create_model(name, pretrained=path)
    _same_outputs(src, dst)


def test_official_sine_checkpoint_ignores_stored_embedding_and_says_so_when_learned(tmp_path, caplog):
    """A sine or no-embedding model has nothing to load a `positional_emb` into: a sine table goes quietly; a
    learned one (what the official `_sine` factories really train) goes with a warning, not silently."""
    src = cct.create_model("cct_2_3x2_32_sine")
    state = official_keys(src)
    assert official_state_dict(state).keys() == src.state_dict().keys()
    for table, warned in ((sinusoidal_embedding(64, 128), False), (torch.randn(1, 64, 128), True)):
        state["classifier.positional_emb"] = table
        torch.save(state, tmp_path / "sine.pth")
        caplog.clear()
        _same_outputs(src, cct.create_model("cct_2_3x2_32_sine", pretrained=tmp_path / "sine.pth"))
        cct.create_model("cct_2_3x2_32", positional_embedding="none", pretrained=tmp_path / "sine.pth")
        assert caplog.text.count("sine.pth: its positional embedding is learned") == 2 * warned, caplog.text
    learned = cct.create_model("cct_2_3x2_32")
    cct.save_checkpoint(learned, tmp_path / "learned.pt")
    caplog.clear()
    cct.create_model("cct_2_3x2_32_sine", pretrained=tmp_path / "learned.pt")  # a cct checkpoint: the same rule
    assert "learned.pt: its positional embedding is learned" in caplog.text


def test_fine_tuning_resizes_embedding_and_resets_head(tmp_path):
    src = cct.create_model("cct_7_3x1_32")
    torch.save({"state_dict": official_keys(src)}, tmp_path / "c10.pth")  # timm's trainer wraps in state_dict
    dst = cct.create_model("cct_7_3x1_32", pretrained=tmp_path / "c10.pth", img_size=(48, 64), num_classes=5)
    assert dst.pos_embed.shape == (1, 24 * 32, 256) and dst.head.out_features == 5
    torch.testing.assert_close(dst.blocks[3].fc1.weight, src.blocks[3].fc1.weight)
    assert dst(torch.randn(1, 3, 48, 64)).shape == (1, 5)


def test_pretrained_from_a_plain_state_dict_a_headless_model_and_a_sine_one(tmp_path):
    torch.manual_seed(0)
    source = cct.create_model("cct_2_3x2_32", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "plain.pt")  # `torch.save(model.state_dict())`, as users do
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ddp.pt")
    same = cct.create_model("cct_2_3x2_32", pretrained=str(tmp_path / "plain.pt"))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), source.state_dict().values()))
    other = cct.create_model("cct_2_3x2_32", pretrained=str(tmp_path / "ddp.pt"), num_classes=3)  # a fresh head
    assert other.head.out_features == 3 and torch.equal(other.pos_embed, source.pos_embed)
    cct.save_checkpoint(cct.create_model("cct_2_3x2_32", num_classes=0), tmp_path / "nc0.pt")
    assert cct.create_model("cct_2_3x2_32", pretrained=str(tmp_path / "nc0.pt"), num_classes=4).head.out_features == 4
    assert isinstance(cct.create_model("cct_2_3x2_32", pretrained=str(tmp_path / "plain.pt"), num_classes=0).head,
                      torch.nn.Identity)
    sine = cct.create_model("cct_2_3x2_32_sine", num_classes=10)
    cct.save_checkpoint(sine, tmp_path / "sine.pt")
    learnable = cct.create_model("cct_2_3x2_32", pretrained=str(tmp_path / "sine.pt"))  # a fresh embedding
    assert torch.equal(learnable.blocks[0].attn.qkv.weight, sine.blocks[0].attn.qkv.weight)
    torch.save({"tokenizer.nothing": torch.zeros(1)}, tmp_path / "alien.pt")
    with pytest.raises(cct.CheckpointError, match="unrecognised weights"):
        cct.create_model("cct_2_3x2_32", pretrained=str(tmp_path / "alien.pt"))


def test_a_text_checkpoint_as_an_image_models_pretrained_weights_is_named(tmp_path):
    text = cct.create_model("text_cct_2", vocab_size=30)
    cct.save_checkpoint(text, tmp_path / "text.pt")
    with pytest.raises(cct.CheckpointError, match=r"text.pt is a text model's checkpoint \(text_cct_2\): its weights "
                                                  "do not fit the image model cct_2_3x2_32$"):
        cct.create_model("cct_2_3x2_32", pretrained=tmp_path / "text.pt")


def test_cct_checkpoint_as_pretrained_other_size(tmp_path):
    src = cct.create_model("cct_2_3x2_32", img_size=(32, 64))
    cct.save_checkpoint(src, tmp_path / "rect.pt")
    dst = cct.create_model("cct_2_3x2_32", pretrained=tmp_path / "rect.pt", img_size=(64, 128))
    assert dst.pos_embed.shape == (1, 16 * 32, 128)
    same = cct.create_model("cct_2_3x2_32", pretrained=tmp_path / "rect.pt", img_size=(32, 64))
    _same_outputs(src, same, size=(32, 64))


def test_safetensors_keeps_eval_settings(tmp_path):
    model = cct.create_model("cct_2_3x2_32")
    settings = {"precision": "bf16", "batch_size": 64, "tta": True, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    path = cct.save_checkpoint(model, tmp_path / "m.safetensors", eval=settings, optimizer={"ignored": 1})
    data = read_checkpoint(path)
    assert data["eval"] == settings and "optimizer" not in data


def test_pretrained_cct_checkpoint_comes_back_as_trained(tmp_path):
    """create_model(name, pretrained=checkpoint) keeps the checkpoint's head, class names and settings unless
    overridden; a head of the same classes in another order is reordered; a non-square grid is resized by its
    shape; torch.compile's key prefix is stripped; another cct model's state dict is named as such."""
    torch.manual_seed(0)
    src = cct.create_model("cct_2_3x2_32", num_classes=3, img_size=(16, 24), positional_embedding="learnable")
    src.class_names = ["ant", "bee", "cat"]
    cct.save_checkpoint(src, tmp_path / "src.pt")
    same = cct.create_model("cct_2_3x2_32", pretrained=str(tmp_path / "src.pt"))
    assert same.class_names == ["ant", "bee", "cat"] and same.cfg.img_size == (16, 24)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), src.state_dict().values()))
    assert cct.create_model("cct_2_3x2_32", pretrained=str(tmp_path / "src.pt"), num_classes=5).class_names is None

    notes = []
    model = cct.create_model("cct_2_3x2_32", num_classes=3, img_size=(24, 16))  # the grid turned: 6x4 → 4x6
    cct.checkpoint.load_pretrained(model, tmp_path / "src.pt", class_names=["cat", "ant", "bee"], notes=notes)
    assert torch.equal(model.head.weight, src.head.weight[[2, 0, 1]])
    assert notes == ["positional embedding: interpolated from a 4x6 token grid to 6x4",
                     "head: kept, its rows put in the data's class order"]
    expected = cct.layers.resize_pos_embed(src.pos_embed.detach(), (4, 6), (6, 4))
    assert torch.allclose(model.pos_embed, expected)

    torch.save({"_orig_mod." + k: v for k, v in src.state_dict().items()}, tmp_path / "compiled.pt")
    compiled = cct.create_model("cct_2_3x2_32", num_classes=3, img_size=(16, 24), pretrained=str(tmp_path / "compiled.pt"))
    assert torch.equal(compiled.pos_embed, src.pos_embed)
    torch.save(cct.create_model("cct_4_3x2_32").state_dict(), tmp_path / "cct4.pt")
    with pytest.raises(cct.CheckpointError, match=r"cct4.pt: a state dict of another model than cct_2_3x2_32 \(0 of "
                                                  r"its tensors missing.*; 22 unknown"):
        cct.create_model("cct_2_3x2_32", pretrained=str(tmp_path / "cct4.pt"))
    torch.save({k: v for k, v in src.state_dict().items() if k != "pos_embed"} | {"pos_embed": torch.zeros(1, 24, 128)},
               tmp_path / "plain.pt")
    with pytest.raises(cct.CheckpointError, match="plain.pt: its positional embedding has 24 tokens, not a square"):
        cct.create_model("cct_2_3x2_32", num_classes=3, pretrained=str(tmp_path / "plain.pt"))


def test_pretrained_from_a_checkpoint_with_a_crafted_config_is_a_named_error(tmp_path):
    cct.save_checkpoint(cct.create_model("cct_2_3x2_32", num_classes=3), tmp_path / "ok.pt")
    data = torch.load(tmp_path / "ok.pt", weights_only=True)
    data["config"]["embed_dim"] = -4
    torch.save(data, tmp_path / "crafted.pt")
    with pytest.raises(cct.CheckpointError, match="crafted.pt: invalid model config"):
        cct.checkpoint.load_pretrained(cct.create_model("cct_2_3x2_32"), tmp_path / "crafted.pt")
