"""Text → token ids for the text models, by Hugging Face `tokenizers` (fast, and serialises to JSON).

Word-level by default, because the official text models were built for word vectors (one embedding
row per word, which GloVe/word2vec files can initialise: `load_word_vectors`); WordPiece and BPE are
options. The tokenizer is trained on the training texts only, and its JSON (`to_json`) is meant to be
stored inside a checkpoint, so a checkpoint classifies raw text by itself.

Special tokens: [UNK] is id 0 and [PAD] id 1, the padding index of the official `Embedder`. With
`unk_shapes` (the text recipe's), ids 2-4 are three more [UNK]s that an unknown word takes by its shape, as
parsers' unknown-word signatures do: one with a digit, one capitalised (not the text's first token), any other.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn

from .errors import CCTError

UNK, PAD = "[UNK]", "[PAD]"
UNK_ID, PAD_ID = 0, 1
SHAPES = ("[UNK-NUM]", "[UNK-CAP]", "[UNK-LOW]")  # with unk_shapes: a digit in it, capitalised, any other
NUM_ID, CAP_ID, LOW_ID = 2, 3, 4
KINDS = ("word", "wordpiece", "bpe")
FORMAT = "cct-text-tokenizer"
VERSION = 2  # 2: unk_shapes, written only when on (version 1 files read as before)


class TextTokenizer:
    """A trained Hugging Face tokenizer plus the recipe it was trained with.

    Build one with `TextTokenizer.train(texts, ...)` or `TextTokenizer.from_json(text)`.
    """

    def __init__(self, backend: Tokenizer, *, kind: str, lowercase: bool, vocab_limit: int,
                 seq_len: int | None = None, unk_shapes: bool = False):
        assert kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}"
        assert seq_len is None or seq_len > 0, f"seq_len must be positive, got {seq_len}"
        assert backend.token_to_id(UNK) == UNK_ID and backend.token_to_id(PAD) == PAD_ID, \
            f"the vocabulary must start with {UNK} (0) and {PAD} (1)"
        assert not unk_shapes or [backend.token_to_id(t) for t in SHAPES] == [NUM_ID, CAP_ID, LOW_ID], \
            f"with unk_shapes, ids 2-4 must be {SHAPES}"
        self.backend = backend
        self.kind = kind
        self.lowercase = lowercase
        self.vocab_limit = vocab_limit
        self.seq_len = seq_len  # `encode`'s default length: the model's, once trained with one (`cct train`)
        self.unk_shapes = unk_shapes

    @classmethod
    def train(cls, texts: Iterable[str], *, kind: str = "word", lowercase: bool = True, vocab_size: int = 30_000,
              min_frequency: int = 1, unk_shapes: bool = False) -> "TextTokenizer":
        """Learn a vocabulary from the training texts (never the test texts).

        Args:
            texts: the training texts.
            kind: "word" (one id per word), "wordpiece" or "bpe" (sub-words).
            lowercase: lower-case every text first (after Unicode NFKC normalisation).
            vocab_size: the most ids, the two special tokens included.
            min_frequency: words seen fewer times become [UNK].
            unk_shapes: an unknown word becomes one of three [UNK]s by its shape (a digit in it; capitalised
                and not the first token; any other), so rare training words teach what each shape tends to be.
        """
        assert kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}"
        assert vocab_size > 2, f"vocab_size must leave room beyond {UNK} and {PAD}, got {vocab_size}"
        model, trainer = {"word": (models.WordLevel, trainers.WordLevelTrainer),
                          "wordpiece": (models.WordPiece, trainers.WordPieceTrainer),
                          "bpe": (models.BPE, trainers.BpeTrainer)}[kind]
        backend = Tokenizer(model(unk_token=UNK))
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        backend.normalizer = normalizers.Sequence(steps)
        backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
        specials = [UNK, PAD] + (list(SHAPES) if unk_shapes else [])
        backend.train_from_iterator(texts, trainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                   special_tokens=specials, show_progress=False))
        return cls(backend, kind=kind, lowercase=lowercase, vocab_limit=vocab_size, unk_shapes=unk_shapes)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unknown_ids(self) -> tuple[int, ...]:
        """The ids an unknown word can get: [UNK], and the shaped ones with `unk_shapes`."""
        return (UNK_ID, NUM_ID, CAP_ID, LOW_ID) if self.unk_shapes else (UNK_ID,)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (UNK_ID, PAD_ID) + self.unknown_ids[1:]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _ids(self, text: str, encoding) -> list[int]:
        """One text's ids, each [UNK] shaped with `unk_shapes` by the word it stands for in `text`."""
        if not self.unk_shapes:
            return encoding.ids
        ids = []
        for position, (token, (start, end)) in enumerate(zip(encoding.ids, encoding.offsets)):
            if token == UNK_ID:
                word = text[start:end]
                token = NUM_ID if any(c.isdigit() for c in word) else \
                    CAP_ID if position and word[:1].isupper() else LOW_ID
            ids.append(token)
        return ids

    def tokens(self, text: str) -> list[str]:
        """The tokens of one text, as the model sees them (before truncation)."""
        ids = self._ids(text, self.backend.encode(text, add_special_tokens=False))
        return [self.backend.id_to_token(i) for i in ids]

    def encode(self, texts: Sequence[str], *, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) padded with [PAD] and their mask (B, L), True for real tokens: `model(ids, mask)`.
        Texts longer than `seq_len` tokens (default: `self.seq_len`, the trained model's) keep their first
        `seq_len`; `encode_counted` also says how many were cut. L is the longest text's length, at most
        `seq_len` (at least 1: a text without tokens has an all-False row)."""
        ids, mask, _ = self.encode_counted(texts, seq_len=seq_len)
        return ids, mask

    def encode_counted(self, texts: Sequence[str], *,
                       seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`encode`'s ids and mask, and how many texts were truncated to `seq_len` tokens."""
        seq_len = seq_len or self.seq_len
        assert seq_len is not None and seq_len > 0, f"seq_len must be positive (or set on the tokenizer), got {seq_len}"
        texts = list(texts)
        encoded = [self._ids(t, e) for t, e in zip(texts, self.backend.encode_batch(texts, add_special_tokens=False))]
        truncated = sum(len(ids) > seq_len for ids in encoded)
        length = max([1] + [min(len(ids), seq_len) for ids in encoded])
        ids = torch.full((len(encoded), length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.bool)
        for row, seq in enumerate(encoded):
            seq = seq[:seq_len]
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = True
        return ids, mask, truncated

    def to_json(self) -> str:
        """The tokenizer and its recipe as one JSON string (to store inside a checkpoint)."""
        shapes = {"unk_shapes": True} if self.unk_shapes else {}
        return json.dumps({"format": FORMAT, "version": VERSION if self.unk_shapes else 1, "kind": self.kind,
                           "lowercase": self.lowercase, "vocab_limit": self.vocab_limit, "seq_len": self.seq_len,
                           **shapes, "tokenizer": json.loads(self.backend.to_str())})

    @classmethod
    def from_json(cls, text: str) -> "TextTokenizer":
        """Rebuild a tokenizer from `to_json`'s string; anything else is a one-line `CCTError`."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError("not a cct text tokenizer")
            if data.get("version") not in (1, VERSION):
                raise ValueError(f"unsupported version {data.get('version')!r}")
            backend = Tokenizer.from_str(json.dumps(data["tokenizer"]))
            seq_len = data.get("seq_len")  # absent from tokenizers saved before it existed
            return cls(backend, kind=data["kind"], lowercase=bool(data["lowercase"]),
                       vocab_limit=int(data["vocab_limit"]), seq_len=int(seq_len) if seq_len is not None else None,
                       unk_shapes=bool(data.get("unk_shapes", False)))
        except Exception as e:  # json/KeyError/TypeError/AssertionError, and tokenizers raises plain Exception
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CCTError(f"unreadable text tokenizer: {detail[:200]}") from None

    def __repr__(self) -> str:
        return (f"TextTokenizer(kind={self.kind!r}, lowercase={self.lowercase}, vocab_size={self.vocab_size}, "
                f"seq_len={self.seq_len}, unk_shapes={self.unk_shapes})")


def load_word_vectors(path: str | Path, tokenizer: TextTokenizer, embedding: nn.Embedding) -> int:
    """Initialise the embedding rows of the words a GloVe/word2vec text file knows; returns how many.

    One `word v1 ... vD` a line (D = the embedding's width); a word2vec header line `count D` is
    skipped. With a lower-casing tokenizer the file's words are lower-cased too, and the first
    vector of a word wins. The special tokens' rows are left alone. A malformed line is a one-line
    `CCTError` naming the file and line.
    """
    path = Path(path)
    dim = embedding.embedding_dim
    found: set[int] = set()
    first = True  # the first vector line fixes the width: a file of another dimension fails there
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CCTError(f"cannot read word vectors {path}: {e.strerror or e}") from None
    with f, torch.no_grad():
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n").rstrip(" ")  # a BOM
            except UnicodeDecodeError:
                raise CCTError(f"{path}:{number}: not UTF-8 text") from None
            fields = line.split(" ")
            if number == 1 and len(fields) == 2 and all(s.isdigit() for s in fields):
                if int(fields[1]) != dim:
                    raise CCTError(f"{path}:1: {fields[1]}-dimensional vectors, but the embedding has {dim}")
                continue  # word2vec header
            if not line.strip():
                raise CCTError(f"{path}:{number}: empty line")
            if len(fields) < dim + 1 or (first and len(fields) != dim + 1):
                raise CCTError(f"{path}:{number}: expected a word and {dim} numbers, got {len(fields)} fields")
            first = False
            word = " ".join(fields[:-dim])  # a few GloVe tokens contain spaces
            index = tokenizer.token_to_id(word.lower() if tokenizer.lowercase else word)
            if index is None or index in tokenizer.special_ids or index in found:
                continue
            try:
                values = [float(v) for v in fields[-dim:]]
            except ValueError:
                raise CCTError(f"{path}:{number}: a value of {word!r} is not a number") from None
            if not all(math.isfinite(v) for v in values):
                raise CCTError(f"{path}:{number}: a value of {word!r} is not finite")
            embedding.weight[index] = torch.tensor(values, dtype=embedding.weight.dtype)
            found.add(index)
    return len(found)
