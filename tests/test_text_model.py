"""Text models: official parameter counts, padding invariance, forward/backward, official weights."""
from pathlib import Path

import pytest
import torch

import cct
from cct.errors import CheckpointError
from cct.text_model import (TEXT_VARIANTS, TextCCT, TextConfig, create_text_model, get_text_config,
                            official_text_state_dict)
from cct.tokenizer import TextTokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "official_text_cct_2.pt"
# The fixture is the state_dict() of the official text_cct_2(kernel_size=4, vocab_size=50, num_classes=6), built
# with torch.manual_seed(0) from SHI-Labs/Compact-Transformers at cd11f09 by a script kept outside this repository
# (the official code is not copied here); 1.5 MB, its sine `classifier.positional_emb` included.

# the official code's trainable parameters without the word embedding (num_classes=6), as issue 14 lists them
OFFICIAL_PARAMS = {
    ("text_cct_2", 1): 237_959, ("text_cct_2", 2): 276_359, ("text_cct_2", 4): 353_159,
    ("text_cct_4", 1): 436_359, ("text_cct_4", 2): 474_759, ("text_cct_4", 4): 551_559,
    ("text_cct_6", 1): 3_237_127, ("text_cct_6", 2): 3_313_927, ("text_cct_6", 4): 3_467_527,
    ("text_cvt_2", 4): 353_159, ("text_cvt_4", 4): 551_559, ("text_cvt_6", 4): 947_335,
    ("text_vit_2", 4): 353_158, ("text_vit_4", 4): 551_558, ("text_vit_6", 4): 3_467_526,
    ("text_transformer_2", 4): 1_086_906, ("text_transformer_4", 4): 2_171_106,
    ("text_transformer_6", 4): 4_337_106,
}
FAMILY_MODELS = ["text_cct_2", "text_cvt_2", "text_vit_2", "text_transformer_2"]


def trainable_without_embedding(model: TextCCT) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("embedding."))


@pytest.mark.parametrize("name,kernel", sorted(OFFICIAL_PARAMS))
def test_parameter_counts_match_official(name, kernel):
    model = create_text_model(name, vocab_size=50, num_classes=6, kernel_size=kernel)
    assert trainable_without_embedding(model) == OFFICIAL_PARAMS[(name, kernel)]
    assert sum(isinstance(m, torch.nn.Embedding) for m in model.modules()) == 1
    assert "sine_embed" not in model.state_dict()  # the default sine embedding is a buffer, never a weight


def test_variants_cover_every_official_name():
    expected = {f"text_{f}_{n}" for f in ("cct", "cvt", "vit", "transformer") for n in (2, 4, 6)}
    assert set(TEXT_VARIANTS) == expected


def test_official_stride_and_padding_rule():
    for k in (1, 2, 3, 4, 6, 8):
        cfg = get_text_config("text_cct_2", kernel_size=k)
        assert (cfg.stride, cfg.padding) == (max(1, k // 2 - 1), max(1, k // 2))
    cfg = get_text_config("text_cvt_2", kernel_size=2)
    assert (cfg.stride, cfg.padding) == (2, 0)


def test_sine_has_no_leading_zero_row():
    model = create_text_model("text_cct_2", vocab_size=50)
    assert model.sine_embed.shape == (1, model.num_tokens, 128)
    assert model.sine_embed[0, 0, 1::2].eq(1).all()  # position 0: cos(0) = 1, not a zero row


def test_invalid_choices_rejected():
    with pytest.raises(AssertionError):
        TextConfig(family="rnn")
    with pytest.raises(AssertionError):
        TextConfig(positional_embedding="rope")
    with pytest.raises(TypeError, match="kernal_size"):
        create_text_model("text_cct_2", kernal_size=2)
    with pytest.raises(ValueError, match="unknown text model"):
        create_text_model("text_cct_3")
    for overrides, message in ((dict(num_classes=-1), "num_classes must be an int >= 0, got -1"),  # was a bare assert
                               (dict(seq_len=0), "seq_len must be an int >= 1, got 0"),
                               (dict(kernel_size=True), "kernel_size must be an int >= 1, got True"),
                               (dict(stride=0), "stride must be an int >= 1, got 0"),
                               (dict(num_heads=3), "embed_dim 128 is not divisible by 3 heads")):
        with pytest.raises(AssertionError, match=message):
            create_text_model("text_cct_2", **overrides)


def _sentence_logits(model: TextCCT, ids: torch.Tensor, pad_to: int | None) -> torch.Tensor:
    if pad_to is None:
        return model(ids[None])
    padded = torch.full((1, pad_to), model.cfg.padding_idx, dtype=torch.long)
    padded[0, :len(ids)] = ids
    mask = torch.zeros(1, pad_to, dtype=torch.bool)
    mask[0, :len(ids)] = True
    return model(padded, mask)


@pytest.mark.parametrize("name", FAMILY_MODELS)
@pytest.mark.parametrize("kernel", [1, 2, 4])
@pytest.mark.parametrize("positional", ["sine", "learnable"])
def test_padding_does_not_change_the_answer(name, kernel, positional):
    torch.manual_seed(kernel)
    model = create_text_model(name, vocab_size=40, kernel_size=kernel, positional_embedding=positional,
                              word_embedding_dim=300 if "transformer" in name else 32).eval()
    for length in (1, 5, 9, 16):
        ids = torch.randint(2, 40, (length,))
        with torch.no_grad():
            unpadded = _sentence_logits(model, ids, None)
            for pad_to in (16, 64):
                torch.testing.assert_close(_sentence_logits(model, ids, pad_to), unpadded, rtol=0, atol=1e-5)


def test_padding_invariance_is_not_vacuous():
    """Without the mask the padded sentence gives other logits, so the test above can fail."""
    torch.manual_seed(0)
    model = create_text_model("text_cct_2", vocab_size=40, word_embedding_dim=32).eval()
    ids = torch.randint(2, 40, (7,))
    padded = torch.cat([ids, torch.ones(9, dtype=torch.long)])[None]
    with torch.no_grad():
        assert (model(padded) - model(ids[None])).abs().max() > 1e-3


def test_mixed_lengths_in_one_batch_match_single_sentences():
    torch.manual_seed(1)
    model = create_text_model("text_cct_4", vocab_size=30, word_embedding_dim=16).eval()
    lengths = [3, 12, 7]
    ids = torch.ones(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    singles = []
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(2, 30, (n,))
        mask[i, :n] = True
        with torch.no_grad():
            singles.append(model(ids[i:i + 1, :n]))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), torch.cat(singles), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_text_model(name, vocab_size=60, num_classes=4)
    ids = torch.randint(0, 60, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 11:] = False
    logits = model(ids, mask)  # the mask by position
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    model.eval()
    with torch.no_grad():
        feats, token_mask = model.forward_features(ids, mask)
        assert feats.shape[:2] == token_mask.shape and feats.shape[2] == model.cfg.embed_dim
        assert model.forward_head(feats, pre_logits=True, mask=token_mask).shape == (3, model.cfg.embed_dim)
        torch.testing.assert_close(model.forward_head(feats, mask=token_mask), model(ids, mask=mask))
        torch.testing.assert_close(model(ids, mask), model(ids, mask=mask))


def test_full_length_input_fits_the_positional_embedding():
    for name in FAMILY_MODELS:
        for kernel in (1, 2, 4):
            model = create_text_model(name, vocab_size=20, kernel_size=kernel, positional_embedding="learnable",
                                      word_embedding_dim=300 if "transformer" in name else 8).eval()
            feats, _ = model.forward_features(torch.randint(0, 20, (2, model.cfg.seq_len)))
            assert feats.shape[1] == model.num_tokens


def test_timm_interface():
    model = create_text_model("text_vit_2", vocab_size=20, positional_embedding="learnable")
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    model.reset_classifier(3)
    assert model(torch.randint(0, 20, (2, 10))).shape == (2, 3) and model.cfg.num_classes == 3
    model.reset_classifier(0)
    assert model(torch.randint(0, 20, (2, 10))).shape == (2, 128)


def test_second_head_trains_beside_the_first_and_predicts_nothing_without_aux_vote():
    plain = create_text_model("text_cct_2", vocab_size=20)
    model = create_text_model("text_cct_2", vocab_size=20, aux_classes=7)
    assert plain.aux_head is None and model.aux_head.out_features == 7
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters()) == 128 * 7 + 7
    model.eval()
    ids, mask = torch.randint(2, 20, (3, 9)), torch.ones(3, 9, dtype=torch.bool)
    logits, aux = model(ids, mask, with_aux=True)
    assert logits.shape == (3, 6) and aux.shape == (3, 7)
    assert torch.equal(model(ids, mask), logits)  # predictions are the first head's, the same pooled features
    features, token_mask = model.forward_features(ids, mask)
    pooled = model.forward_head(features, pre_logits=True, mask=token_mask)
    assert torch.allclose(aux, model.aux_head(pooled))
    with pytest.raises(AssertionError, match="aux_classes"):
        plain(ids, mask, with_aux=True)


def _voting(**overrides):
    torch.manual_seed(0)
    settings = dict(vocab_size=20, num_classes=3, aux_classes=5, aux_vote=2.0, aux_parent=[0, 0, 1, 2, 2])
    return create_text_model("text_cct_2", **{**settings, **overrides}).eval()


def _by_hand(logits: torch.Tensor, aux: torch.Tensor, w: float) -> torch.Tensor:
    """log((p + w·q) / (1 + w)), q the aux probabilities of classes 0+1, 2 and 3+4 (the parents above)."""
    q = aux.float().softmax(-1)
    q = torch.stack([q[:, 0] + q[:, 1], q[:, 2], q[:, 3] + q[:, 4]], 1)
    return ((logits.float().softmax(-1) + w * q) / (1 + w)).log()


def test_the_second_head_votes_in_predictions_with_aux_vote():
    model = _voting()
    ids, mask = torch.randint(2, 20, (4, 9)), torch.ones(4, 9, dtype=torch.bool)
    logits, aux = model(ids, mask, with_aux=True)  # training reads both heads as they are
    features, token_mask = model.forward_features(ids, mask)
    pooled = model.forward_head(features, pre_logits=True, mask=token_mask)
    assert torch.equal(logits, model.head(pooled)) and torch.equal(aux, model.aux_head(pooled))
    out = model(ids, mask)
    assert out.dtype == torch.float32 and torch.allclose(out, _by_hand(logits, aux, 2.0), atol=1e-6)
    assert torch.allclose(out.softmax(-1).sum(-1), torch.ones(4))  # log-probabilities: softmax gives them back
    assert torch.allclose(model.forward_head(features, mask=token_mask), out)  # timm's forward = head(features)
    # padding changes nothing, as for the first head alone
    padded = torch.cat([ids, torch.ones(4, 7, dtype=torch.long)], 1)
    padded_mask = torch.cat([mask, torch.zeros(4, 7, dtype=torch.bool)], 1)
    assert torch.allclose(model(padded, padded_mask), out, atol=1e-5)
    # under bf16 autocast the heads run in bf16, and the mixture in float32 from their outputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_aux = model(ids, mask, with_aux=True)
        mixed = model(ids, mask)
    assert low.dtype == torch.bfloat16 and mixed.dtype == torch.float32
    assert torch.allclose(mixed, _by_hand(low, low_aux, 2.0), atol=1e-6)


def test_aux_vote_is_checked_and_a_new_classifier_stops_it():
    for bad, match in ((dict(aux_parent=None), "aux_vote needs aux_parent"),
                       (dict(aux_parent=[0, 1, 2]), "aux_parent must give each of the 5"),
                       (dict(aux_parent=[0, 0, 1, 2, 3]), "aux_parent must give each of the 5"),
                       (dict(aux_vote=-1.0), "aux_vote must be non-negative")):
        with pytest.raises(AssertionError, match=match):
            _voting(**bad)
    model = _voting()
    ids = torch.randint(2, 20, (2, 9))
    model.reset_classifier(4)
    assert model.cfg.aux_vote == 0.0 and model.cfg.aux_parent is None
    assert torch.equal(model(ids), model(ids, with_aux=True)[0]) and model(ids).shape == (2, 4)


def test_a_voting_model_round_trips_through_a_checkpoint(tmp_path):
    model = _voting()
    ids = torch.randint(2, 20, (3, 9))
    model.tokenizer = TextTokenizer.train(["what is it ?", "who is he ?"], vocab_size=20)
    path = cct.save_checkpoint(model, tmp_path / "vote.pt", tokenizer=model.tokenizer.to_json())
    loaded = cct.load_checkpoint(path).eval()
    assert loaded.cfg.aux_vote == 2.0 and loaded.cfg.aux_parent == [0, 0, 1, 2, 2]
    assert torch.equal(loaded(ids), model(ids))


def test_config_round_trip():
    cfg = get_text_config("text_cct_4", kernel_size=2, vocab_size=77)
    assert TextConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        TextConfig.from_dict({**cfg.to_dict(), "img_size": 32})


# ---------------------------------------------------------------------- official weights
# the official text_cct_2 module names (SHI-Labs/Compact-Transformers, src/text/cct.py and src/utils/)
def _official_like_state(vocab: int, kernel: int, word_dim: int = 300, dim: int = 128, depth: int = 2) -> dict:
    g = torch.Generator().manual_seed(kernel)
    state = {"embedder.embeddings.weight": torch.randn(vocab, word_dim, generator=g),
             "tokenizer.conv_layers.0.weight": torch.randn(dim, 1, kernel, word_dim, generator=g)}
    for i in range(depth):
        p = f"classifier.blocks.{i}."
        for key, shape in (("pre_norm.weight", (dim,)), ("pre_norm.bias", (dim,)),
                           ("self_attn.qkv.weight", (3 * dim, dim)),
                           ("self_attn.proj.weight", (dim, dim)), ("self_attn.proj.bias", (dim,)),
                           ("linear1.weight", (dim, dim)), ("linear1.bias", (dim,)), ("norm1.weight", (dim,)),
                           ("norm1.bias", (dim,)), ("linear2.weight", (dim, dim)), ("linear2.bias", (dim,))):
            state[p + key] = torch.randn(shape, generator=g)
    for key, shape in (("attention_pool.weight", (1, dim)), ("attention_pool.bias", (1,)), ("norm.weight", (dim,)),
                       ("norm.bias", (dim,)), ("fc.weight", (6, dim)), ("fc.bias", (6,))):
        state["classifier." + key] = torch.randn(shape, generator=g)
    return state


@pytest.mark.skipif(not FIXTURE.exists(), reason="fixture not generated")
def test_official_fixture_lands_unchanged(tmp_path):
    official = torch.load(FIXTURE, weights_only=True)
    kernel = official["tokenizer.conv_layers.0.weight"].shape[2]
    model = create_text_model("text_cct_2", pretrained=FIXTURE, kernel_size=kernel)
    assert model.cfg.vocab_size == official["embedder.embeddings.weight"].shape[0]
    mine = model.state_dict()
    mapped = official_text_state_dict(official)
    assert set(mapped) == set(mine)  # every weight of the model comes from the file
    assert "pos_embed" not in mapped and "classifier.positional_emb" in official  # the sine table is dropped
    for key, value in official.items():
        if key != "classifier.positional_emb":
            assert torch.equal(mapped[OFFICIAL_TO_CCT(key)], value), key
            assert torch.equal(mine[OFFICIAL_TO_CCT(key)], value), key


def OFFICIAL_TO_CCT(key: str) -> str:  # noqa: N802 (a table written out, independent of the module's)
    key = key.replace("embedder.embeddings.", "embedding.").replace("tokenizer.conv_layers.0.", "conv_tokenizer.conv.")
    key = key.replace("classifier.fc.", "head.").replace("classifier.", "").replace(".self_attn.", ".attn.")
    return key.replace(".linear1.", ".fc1.").replace(".linear2.", ".fc2.")


@pytest.mark.parametrize("kernel", [1, 2, 4])
def test_official_layout_loads_for_every_kernel(tmp_path, kernel):
    state = _official_like_state(vocab=37, kernel=kernel)
    path = tmp_path / "official.pth"
    torch.save(state, path)
    model = create_text_model("text_cct_2", pretrained=path, kernel_size=kernel)
    assert model.cfg.vocab_size == 37
    mine = model.state_dict()
    for key, value in state.items():
        assert torch.equal(mine[OFFICIAL_TO_CCT(key)], value), key
    with pytest.raises(CheckpointError, match=f"kernel_size={kernel}"):
        create_text_model("text_cct_2", pretrained=path, kernel_size=3 if kernel != 3 else 2)
    # a model with a second head (`--fine-aux`) keeps its own: the official models have none
    aux = create_text_model("text_cct_2", pretrained=path, kernel_size=kernel, aux_classes=5)
    assert torch.equal(aux.state_dict()["head.weight"], state["classifier.fc.weight"]) and aux.aux_head.out_features == 5


@pytest.mark.parametrize("kernel", [2, 4])
def test_official_learnable_embedding_loses_its_padding_row(tmp_path, kernel):
    """The official table: a padding row, then one row per official token (33 at seq_len 64 for k = 2 and k = 4:
    conv (64 + 2·(k//2) − k) + 1 windows, max-pooled 2/2/1). cct's k = 4 model has a 34th token, the window the
    official conv drops at the end: it gets a copy of the last trained row."""
    state = _official_like_state(vocab=20, kernel=kernel)
    state["classifier.positional_emb"] = torch.randn(1, 1 + 33, 128)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    model = create_text_model("text_cct_2", pretrained=path, kernel_size=kernel)
    assert model.cfg.positional_embedding == "learnable" and model.num_tokens == {2: 33, 4: 34}[kernel]
    assert torch.equal(model.pos_embed.data[:, :33], state["classifier.positional_emb"][:, 1:])
    last = state["classifier.positional_emb"][:, -1:]
    assert torch.equal(model.pos_embed.data[:, 33:], last.expand(-1, model.num_tokens - 33, -1))


def test_not_official_text_weights(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"classifier.fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="official text"):
        create_text_model("text_cct_2", pretrained=path)


# ---------------------------------------------------------------------- the shared registry
def test_registry_covers_the_text_models():
    import cct
    from cct.registry import model_kind
    assert set(cct.list_models("text_*")) == set(TEXT_VARIANTS) and len(TEXT_VARIANTS) == 12
    assert set(TEXT_VARIANTS) <= set(cct.list_models())
    model = cct.create_model("text_cct_2", kernel_size=1, vocab_size=30, num_classes=6)
    assert isinstance(model, TextCCT) and model.cfg.kernel_size == 1 and model.cfg.stride == 1
    assert trainable_without_embedding(model) == OFFICIAL_PARAMS[("text_cct_2", 1)]
    assert isinstance(cct.get_config("text_vit_4"), TextConfig)
    assert model_kind("text_transformer_6") == "text" and model_kind("cct_7_3x1_32") == "image"
    with pytest.raises(TypeError, match="img_size"):
        cct.create_model("text_cct_2", img_size=32)


def test_text_models_keep_the_timm_interface():
    import cct
    model = cct.create_model("text_cct_4", vocab_size=30, num_classes=6, kernel_size=2).eval()
    ids = torch.randint(2, 30, (3, 9))
    x, mask = model.forward_features(ids)
    assert x.shape[0] == 3 and x.shape[2] == 128 and mask.shape == x.shape[:2]
    assert model.forward_head(x, pre_logits=True, mask=mask).shape == (3, 128)
    torch.testing.assert_close(model.forward_head(x, mask=mask), model(ids))
    model.reset_classifier(4)
    assert model(ids).shape == (3, 4) and model.no_weight_decay() == {"pos_embed", "cls_token"}
