"""The text tokenizer: training, special ids, encoding with truncation, JSON round trip, word vectors."""
import json

import pytest
import torch
from torch import nn

from cct.errors import CCTError
from cct.tokenizer import CAP_ID, LOW_ID, NUM_ID, PAD_ID, UNK_ID, TextTokenizer, load_word_vectors

TRAIN = ["What is the capital of Peru ?", "Who wrote Hamlet ?", "What is the tallest mountain ?",
         "How far is the Moon ?", "Who is the president of Peru ?"]
TEST = ["What is the capital of France ?", "WHO WROTE HAMLET", "", "far far far far far far far far"]


def test_word_level_trains_on_training_texts_only():
    tok = TextTokenizer.train(TRAIN)
    assert tok.token_to_id("[UNK]") == UNK_ID == 0 and tok.token_to_id("[PAD]") == PAD_ID == 1
    assert tok.token_to_id("peru") is not None and tok.token_to_id("Peru") is None  # lower-cased
    assert tok.token_to_id("france") is None  # a test word is not in the vocabulary
    assert tok.tokens("Who wrote Hamlet?") == ["who", "wrote", "hamlet", "?"]  # punctuation split off


def test_case_kept_and_vocabulary_limit():
    tok = TextTokenizer.train(TRAIN, lowercase=False, vocab_size=6)
    assert tok.vocab_size == 6 and tok.token_to_id("Peru") is not None
    assert tok.token_to_id("is") is not None  # the most frequent words stay
    assert tok.token_to_id("Moon") is None


def test_encode_pads_masks_and_counts_truncation():
    tok = TextTokenizer.train(TRAIN)
    ids, mask, truncated = tok.encode_counted(TEST, seq_len=7)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (4, 7)
    assert truncated == 1  # the eight "far"
    assert mask.sum(1).tolist() == [7, 3, 0, 7]
    assert ids[1, :3].tolist() == [tok.token_to_id(w) for w in ("who", "wrote", "hamlet")]
    assert (ids[~mask] == PAD_ID).all()
    assert ids[0, 5] == UNK_ID  # "france"
    ids, mask, truncated = tok.encode_counted(["Who wrote Hamlet ?"], seq_len=64)
    assert ids.shape == (1, 4) and mask.all() and truncated == 0  # as long as the longest text


@pytest.mark.parametrize("kind", ["word", "wordpiece", "bpe"])
def test_json_round_trip_gives_identical_encodings(kind):
    tok = TextTokenizer.train(TRAIN * 3, kind=kind, vocab_size=60)
    text = tok.to_json()
    json.loads(text)  # plain JSON, storable in a checkpoint
    again = TextTokenizer.from_json(text)
    assert (again.kind, again.lowercase, again.vocab_size) == (kind, True, tok.vocab_size)
    for a, b in zip(tok.encode(TEST + TRAIN, seq_len=9), again.encode(TEST + TRAIN, seq_len=9)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_unk_shapes_give_unknown_words_the_unk_of_their_shape():
    tok = TextTokenizer.train(TRAIN, unk_shapes=True)
    assert [tok.token_to_id(t) for t in ("[UNK]", "[PAD]", "[UNK-NUM]", "[UNK-CAP]", "[UNK-LOW]")] == [0, 1, 2, 3, 4]
    assert tok.vocab_size == TextTokenizer.train(TRAIN).vocab_size + 3
    # the shape is read from the text as written, before lower-casing (offsets into a non-ASCII text too)
    text = "Where is Zürich , the café of 1984 ?"
    assert tok.tokens(text) == ["[UNK-LOW]", "is", "[UNK-CAP]", "[UNK-LOW]", "the", "[UNK-LOW]", "of", "[UNK-NUM]",
                                "?"]
    ids, _ = tok.encode([text, "Zebra far ?"], seq_len=9)
    assert ids[0].tolist() == [LOW_ID, tok.token_to_id("is"), CAP_ID, LOW_ID, tok.token_to_id("the"), LOW_ID,
                               tok.token_to_id("of"), NUM_ID, tok.token_to_id("?")]
    assert ids[1, 0] == LOW_ID  # a capital on the first word says nothing
    assert tok.unknown_ids == (UNK_ID, NUM_ID, CAP_ID, LOW_ID) and TextTokenizer.train(TRAIN).unknown_ids == (UNK_ID,)
    again = TextTokenizer.from_json(tok.to_json())
    assert again.unk_shapes and torch.equal(again.encode([text], seq_len=9)[0], ids[:1])
    plain = json.loads(TextTokenizer.train(TRAIN).to_json())
    assert plain["version"] == 1 and "unk_shapes" not in plain  # as before the option: older cct reads it
    assert json.loads(tok.to_json())["version"] == 2  # older cct refuses it instead of encoding it wrongly
    assert not TextTokenizer.from_json(json.dumps(plain)).unk_shapes


def test_subword_kinds_split_unknown_words():
    tok = TextTokenizer.train(TRAIN * 3, kind="wordpiece", vocab_size=80)
    assert tok.token_to_id("[PAD]") == PAD_ID
    assert len(tok.tokens("capitals")) > 1


def test_bad_json_is_one_line_error():
    for text in ("{", json.dumps({"format": "other"}), json.dumps({"format": "cct-text-tokenizer", "version": 1})):
        with pytest.raises(CCTError) as e:
            TextTokenizer.from_json(text)
        assert "\n" not in str(e.value)


def _vectors_file(tmp_path, lines, name="vec.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_word_vectors_initialise_known_words(tmp_path):
    tok = TextTokenizer.train(TRAIN)
    emb = nn.Embedding(tok.vocab_size, 3, padding_idx=PAD_ID)
    before = emb.weight.detach().clone()
    path = _vectors_file(tmp_path, ["Peru 0.5 -1 2", "hamlet 1 2 3", "unseen 9 9 9", "peru 7 7 7", "[PAD] 5 5 5"])
    assert load_word_vectors(path, tok, emb) == 2
    assert emb.weight[tok.token_to_id("peru")].tolist() == [0.5, -1.0, 2.0]  # the first vector of a word wins
    assert emb.weight[tok.token_to_id("hamlet")].tolist() == [1.0, 2.0, 3.0]
    assert torch.equal(emb.weight[PAD_ID], before[PAD_ID])  # special rows untouched
    who = tok.token_to_id("who")
    assert torch.equal(emb.weight[who], before[who])


def test_word_vectors_leave_the_shaped_unk_rows_alone(tmp_path):
    tok = TextTokenizer.train(TRAIN, lowercase=False, unk_shapes=True)  # cased: the file's "[UNK-CAP]" is its id
    path = tmp_path / "v.txt"
    path.write_text("[UNK-CAP] 5 5\nPeru 1 2\n")
    emb = nn.Embedding(tok.vocab_size, 2)
    before = emb.weight.detach().clone()
    assert load_word_vectors(path, tok, emb) == 1
    assert torch.equal(emb.weight[CAP_ID], before[CAP_ID]) and emb.weight[tok.token_to_id("Peru")].tolist() == [1, 2]


def test_word2vec_header_is_skipped(tmp_path):
    tok = TextTokenizer.train(TRAIN)
    emb = nn.Embedding(tok.vocab_size, 2)
    assert load_word_vectors(_vectors_file(tmp_path, ["2 2", "moon 1 1", "far 2 2"]), tok, emb) == 2
    with pytest.raises(CCTError, match=r"vec.txt:1: 3-dimensional"):
        load_word_vectors(_vectors_file(tmp_path, ["2 3", "moon 1 1 1"]), tok, emb)


@pytest.mark.parametrize("lines,where", [
    (["moon 1 2 3", "far 1 x 3"], ":2: a value of 'far' is not a number"),
    (["moon 1 2 3", "far 1 2"], ":2: expected a word and 3 numbers, got 3 fields"),
    (["moon 1 2 3 4"], ":1: expected a word and 3 numbers, got 5 fields"),  # a file of another width
    (["moon 1 2 3", "", "far 1 2 3"], ":2: empty line"),
    (["moon 1 nan 3"], ":1: a value of 'moon' is not finite"),
])
def test_malformed_vectors_are_one_line_errors(tmp_path, lines, where):
    tok = TextTokenizer.train(TRAIN)
    with pytest.raises(CCTError) as e:
        load_word_vectors(_vectors_file(tmp_path, lines), tok, nn.Embedding(tok.vocab_size, 3))
    assert str(e.value).endswith("vec.txt" + where) or ("vec.txt" + where) in str(e.value)
    assert "\n" not in str(e.value)


def test_undecodable_vectors_file(tmp_path):
    tok = TextTokenizer.train(TRAIN)
    path = tmp_path / "vec.txt"
    path.write_bytes(b"moon 1 2 3\n\xff\xfe 1 2 3\n")
    with pytest.raises(CCTError, match=r"vec.txt:2: not UTF-8"):
        load_word_vectors(path, tok, nn.Embedding(tok.vocab_size, 3))
    with pytest.raises(CCTError, match="cannot read word vectors"):
        load_word_vectors(tmp_path / "missing.txt", tok, nn.Embedding(tok.vocab_size, 3))
