"""Text classification through the training pipeline: `cct train` on tiny TREC/CSV/JSONL corpora, resume, eval,
the tokenizer inside checkpoints, data-kind errors, truncation counts, word vectors, the shared TREC files."""
import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import cct
from cct import cli
from cct.checkpoint import read_checkpoint, save_checkpoint
from cct.kinds import TextPreprocessing, TokenBatch, data_kind, preprocessing_from_checkpoint
from cct.recipes import make_config
from cct.text_run import text_inputs
from cct.tokenizer import TextTokenizer
from cct.train import TrainingInterrupted, resume_config, train
from helpers import make_tree, run_cli

SHARED_TREC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "trec"
CLASSES = {"HUM": ["who is", "who wrote", "whose"], "LOC": ["where is", "which city", "what country"],
           "NUM": ["how many", "how much", "what year"]}
FILL = "the a big old red river king paris war book song moon".split()
FAST = ["--epochs", "2", "--batch-size", "16", "--seq-len", "8", "--precision", "fp32", "--quiet"]


def questions(n: int, seed: int) -> list[tuple[str, str]]:
    """(label, question) pairs: each class starts with its own words, so it is learnable."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(CLASSES)[i % 3]
        rows.append((label, f"{rng.choice(CLASSES[label])} {' '.join(rng.choices(FILL, k=rng.randint(2, 9)))} ?"))
    return rows


def write_corpus(root: Path, kind: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    train, test = questions(60, 0), questions(15, 1)
    if kind == "trec":
        for name, rows in (("train_5500.label", train), ("TREC_10.label", test)):
            (root / name).write_text("".join(f"{label}:other {q}\n" for label, q in rows))
    elif kind == "csv":
        for name, rows in (("train.csv", train), ("test.csv", test)):
            with open(root / name, "w", newline="") as f:
                csv.writer(f).writerows([("label", "text"), *rows])
    else:
        for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
            (root / name).write_text("".join(json.dumps({"text": q, "label": label}) + "\n" for label, q in rows))
    return root


@pytest.fixture(scope="module")
def trec_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("trec"), "trec")


@pytest.fixture(scope="module")
def finished(trec_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert cli.main(["train", "--model", "text_cct_2", "--data", str(trec_dir), "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.parametrize("kind", ["trec", "csv", "jsonl"])
def test_cct_train_end_to_end(kind, tmp_path, capsys):
    data = write_corpus(tmp_path / "data", kind)
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", data, "--out", out, *FAST[:-1],
                            "--val-split", "0.1"], capsys)
    assert code == 0, err
    for name in ("last.pt", "best.pt", "history.csv", "curves.png", "config.json", "results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"] == "text" and results["kind"] == "text" and results["classes"] == ["HUM", "LOC", "NUM"]
    assert results["train_images"] == 54 and results["val_images"] == 6 and results["test_images"] == 15
    assert 0.0 <= results["test_top1"] <= 1.0 and results["seq_len"] == 8
    assert "tokenizer: word" in err and "trained on 54 training texts" in err
    assert "texts/s)" in err and "images/s" not in err  # the closing line counts texts
    # the text recipe's second head on TREC's fine labels (all "other" here: one per coarse class)
    model = cct.load_checkpoint(out / "last.pt")
    if kind == "trec":
        assert "fine labels: a second head trained on the source's 3, loss weight 0.5" in err
        assert "predictions weigh it 2 × the first head (--fine-vote)" in err
        assert model.cfg.aux_classes == 3 and model.aux_head.out_features == 3
        # HUM:other, LOC:other, NUM:other: each fine class votes for its own coarse one
        assert model.cfg.aux_vote == 2.0 and model.cfg.aux_parent == [0, 1, 2]
    else:
        assert "fine labels: none in this source" in err and model.aux_head is None


def test_a_source_without_a_test_set_holds_one_out_for_train_and_eval(tmp_path, capsys):
    """One training file (a TREC `.label` file, a CSV, a .jsonl): `--test-split` holds a seeded, stratified share of
    each class out before the validation split and the tokenizer, records it, and `cct eval` holds out the same."""
    data = write_corpus(tmp_path / "data", "trec")
    for source in (data / "train_5500.label", write_corpus(tmp_path / "csv", "csv") / "train.csv"):
        out = tmp_path / f"out-{source.suffix[1:]}"
        code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", source, "--out", out, "--test-split",
                                "0.25", "--seed", "2", "--val-split", "0.1", *FAST[:-1]], capsys)
        assert code == 0, err
        results, split = json.loads((out / "results.json").read_text()), json.loads((out / "split.json").read_text())
        assert results["test_images"] == 15 and len(split["test_rows"]) == 15  # 5 of each class's 20
        assert (results["train_images"], results["val_images"]) == (39, 6) and "trained on 39 training texts" in err
        assert results["test_split"]["fraction"] == 0.25 and "(held out: --test-split 0.25, seed 2)" in err
        tested = out / f"{results['weights']}.pt"  # the recipe tests its last epoch, which may not be the best
        code, stdout, err = run_cli(["eval", tested, "--data", source, "--json"], capsys)
        report = json.loads(stdout)
        assert code == 0 and report["n"] == 15 and report["top1"] == pytest.approx(results["test_top1"]), err
        code, stdout, _ = run_cli(["eval", out / "best.pt", "--data", source, "--json", "--split", "train"], capsys)
        assert code == 0 and json.loads(stdout)["n"] == 60  # every text of the file
    with open(source, "a") as f:  # another row: not the texts the run held its test split out of
        f.write("HUM,who is there ?\n")
    code, _, err = run_cli(["eval", out / "best.pt", "--data", source], capsys)
    assert code == 2 and "is not the source the run held its 15 test texts out of" in err and err.count("\n") == 1
    # a resume from the changed file is refused too: a new split would put trained-on texts in the test set
    with pytest.raises(TrainingInterrupted):
        train(make_config("text_cct_2", str(data / "train_5500.label"), str(tmp_path / "stop"), seq_len=8,
                          precision="fp32", epochs=2, batch_size=16), quiet=True, stop_at_step=3)
    # resumed on a source with a test set of its own (the folder): scored on that, so no held-out record remains
    shutil.copytree(tmp_path / "stop", tmp_path / "own-test")
    train(resume_config(tmp_path / "own-test", data=str(data)), quiet=True, resume=True)
    results = json.loads((tmp_path / "own-test" / "results.json").read_text())
    assert results["test_split"] is None and results["test_images"] == 15 and not (tmp_path / "own-test" / "split.json").exists()
    assert "split" not in read_checkpoint(tmp_path / "own-test" / "last.pt")
    with open(data / "train_5500.label", "a") as f:
        f.write("HUM:ind who is there ?\n")
    with pytest.raises(cct.CCTError, match="is not the source the run held its 12 test texts out of"):
        train(resume_config(tmp_path / "stop"), quiet=True, resume=True)
    (data / "TREC_10.label").rename(tmp_path / "moved.label")  # a TREC folder without its test file: one held out
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", data, "--out", tmp_path / "folder",
                            *FAST[:-1]], capsys)
    assert code == 0 and "(held out: --test-split 0.2, seed 0)" in err, err


def test_a_held_out_test_split_with_nothing_in_it_ends_the_run_without_a_test(tmp_path, capsys):
    """One text a class: the held-out split is empty, and the run ends with no test figures (it raised a reshape
    error from the conv, after writing the checkpoints)."""
    (tmp_path / "two.csv").write_text("label,text\npos,good movie\nneg,bad movie\n")
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", tmp_path / "two.csv", "--out", tmp_path / "o",
                            *FAST], capsys)
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert code == 0 and results["test_images"] == 0 and results["test_top1"] is None, err


def test_default_recipe_and_config_for_text_models():
    cfg = make_config("text_cct_2", "d", "o")
    assert cfg.recipe == "text" and cfg.token_dropout == 0.0 and cfg.schedule == "cosine"
    assert cfg.fgm == 1.0 and cfg.fgm_norm == "text"  # each text's word vectors moved, not the table
    assert cfg.vat == 0.0  # VAT (--vat) is an option: short of its rule on 20 splits, level on 10 fresh ones
    assert cfg.val_split == 0 and not cfg.restore_best  # all training texts, the last epoch tested
    assert cfg.precision == "auto"  # settled by a trial on CPUs with native bf16 (the next test)
    from cct.recipes import RECIPE_MODELS
    assert RECIPE_MODELS["text"] == "text_cct_2"


@pytest.mark.parametrize("faster", ["fp32", "bf16"])
def test_precision_auto_is_settled_by_a_trial_of_the_first_batch(trec_dir, tmp_path, monkeypatch, faster):
    import cct.text_run
    import cct.train
    trials = []

    def fake_faster(step):  # runs the real steps, so the trial model is built and trained in each precision
        step("fp32"), step("bf16")
        trials.append(1)
        return faster, {"fp32": 10.0, "bf16": 20.0 if faster == "fp32" else 5.0}

    monkeypatch.setattr(cct.text_run, "faster_precision", fake_faster)
    monkeypatch.setattr(cct.train, "resolve_precision", lambda p, d: "bf16" if p == "auto" else p)  # a bf16 CPU
    before = torch.random.get_rng_state()
    cfg = make_config("text_cct_2", str(trec_dir), "unused", seq_len=8, batch_size=16)
    inputs = text_inputs(cfg, checkpoint=None, precision="bf16", quiet=True)
    assert inputs.precision == faster == inputs.prep.precision and len(trials) == 1
    assert torch.equal(torch.random.get_rng_state(), before)  # the trial model leaves the run's random state
    results = train(make_config("text_cct_2", str(trec_dir), str(tmp_path / "run"), epochs=1, batch_size=16,
                                seq_len=8), quiet=True)
    assert results["precision"] == faster and results["precision_trial_ms"]["fp32"] == 10.0 and len(trials) == 2
    # an explicit precision, or a resolved fp32 (a CPU without native bf16), runs no trial
    assert text_inputs(make_config("text_cct_2", str(trec_dir), "unused", seq_len=8, precision="bf16"),
                       checkpoint=None, precision="bf16", quiet=True).precision == "bf16"
    assert text_inputs(cfg, checkpoint=None, precision="fp32", quiet=True).precision == "fp32" and len(trials) == 2


def test_a_resumed_run_keeps_its_trials_precision(trec_dir, tmp_path, monkeypatch):
    import cct.text_run
    import cct.train
    monkeypatch.setattr(cct.train, "resolve_precision", lambda p, d: "bf16" if p == "auto" else p)
    monkeypatch.setattr(cct.text_run, "faster_precision", lambda step: ("fp32", {"fp32": 1.0, "bf16": 2.0}))
    cfg = make_config("text_cct_2", str(trec_dir), str(tmp_path / "a"), epochs=2, batch_size=16, seq_len=8)
    with pytest.raises(TrainingInterrupted):
        train(cfg, stop_at_step=3, quiet=True)
    # the host now times bf16 faster: the resumed run still trains in the fp32 its first trial chose
    monkeypatch.setattr(cct.text_run, "faster_precision", lambda step: ("bf16", {"fp32": 2.0, "bf16": 1.0}))
    assert train(resume_config(tmp_path / "a"), resume=True, quiet=True)["precision"] == "fp32"


def test_eval_json_matches_the_run(finished, trec_dir, capsys):
    code, out, _ = run_cli(["eval", finished / "best.pt", "--data", trec_dir, "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert {"top1", "top5", "loss", "per_class"} <= set(result)
    assert set(result["per_class"]) == {"HUM", "LOC", "NUM"} and result["n"] == 15
    results = json.loads((finished / "results.json").read_text())
    assert result["top1"] == pytest.approx(results["test_top1"]) and result["loss"] == pytest.approx(results["test_loss"])
    assert result["truncated"] == results["truncated_texts"]["test"]


def test_tokenizer_round_trip_through_checkpoints(finished, trec_dir, tmp_path):
    model = cct.load_checkpoint(finished / "best.pt")
    assert isinstance(model.cfg, cct.get_config("text_cct_2").__class__) and model.cfg.seq_len == 8
    assert isinstance(model.tokenizer, TextTokenizer) and model.tokenizer.seq_len == 8
    # the tokenizer was trained on the training split only: the run's 54 training texts
    data = read_checkpoint(finished / "best.pt")
    assert data["config_class"] == "TextConfig" and data["eval"]["kind"] == "text"
    prep = preprocessing_from_checkpoint(data)
    assert isinstance(prep, TextPreprocessing) and prep.seq_len == 8 and prep.precision == "fp32"
    assert {"kind", "seq_len", "precision", "batch_size"} <= set(data["eval"])
    texts = ["who wrote the book ?", "how many kings ?", "where is paris ?"]
    ids, mask, truncated = model.tokenizer.encode_counted(texts)
    assert ids.shape[1] <= 8 and truncated == 0
    logits = model(ids, mask)
    for path in (tmp_path / "copy.pt", tmp_path / "copy.safetensors"):
        save_checkpoint(model, path)
        again = cct.load_checkpoint(path)
        assert again.tokenizer.to_json() == model.tokenizer.to_json()
        assert torch.equal(again(*again.tokenizer.encode(texts)), logits)


def test_resume_continues_exactly(trec_dir, tmp_path):
    def cfg(out):
        return make_config("text_cct_2", str(trec_dir), str(out), epochs=3, batch_size=16, seq_len=8,
                           precision="fp32")
    with pytest.raises(TrainingInterrupted):
        train(cfg(tmp_path / "a"), stop_at_step=5, quiet=True)
    resumed = train(resume_config(tmp_path / "a"), resume=True, quiet=True)
    whole = train(cfg(tmp_path / "b"), quiet=True)
    assert resumed["test_loss"] == whole["test_loss"] and resumed["steps"] == whole["steps"] == 12

    def rows(out):
        return [line.rsplit(",", 1)[0] for line in (out / "history.csv").read_text().splitlines()]
    assert rows(tmp_path / "a") == rows(tmp_path / "b")


def test_data_kind_mismatch_is_one_line(trec_dir, tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", tree, "--out", tmp_path / "o1"], capsys)
    assert code == 2 and "text_cct_2 is a text model" in err and "image data" in err and err.count("\n") == 1
    code, _, err = run_cli(["train", "--model", "cct_2_3x2_32", "--data", trec_dir, "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "is an image model" in err and "text data" in err and err.count("\n") == 1
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", trec_dir, "--data-kind", "image",
                            "--out", tmp_path / "o3"], capsys)
    assert code == 2 and "--data-kind" in err
    assert data_kind(str(trec_dir), "auto", "text_cct_2") == "text"
    code, _, err = run_cli(["train", "--model", "cct_2_3x2_32", "--data", tree, "--kernel-size", "2",
                            "--out", tmp_path / "o4"], capsys)
    assert code == 2 and "--kernel-size is for text models" in err


def test_eval_of_the_other_kind_of_data_is_one_line(finished, trec_dir, tmp_path, capsys):
    image_ckpt = save_checkpoint(cct.create_model("cct_2_3x2_32", num_classes=3), tmp_path / "image.pt")
    for ckpt, data, message in ((finished / "best.pt", make_tree(tmp_path / "tree"), "is a text model, but"),
                                (image_ckpt, trec_dir, "is an image model, but")):
        code, _, err = run_cli(["eval", ckpt, "--data", data], capsys)
        assert code == 2 and message in err and f"{data} is {'image' if 'text' in message else 'text'} data" in err
        assert err.count("\n") == 1


def test_truncation_is_counted_and_reported(tmp_path, capsys):
    data = write_corpus(tmp_path / "data", "jsonl")
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    long_test = sum(len(TextTokenizer.train([r["text"]]).tokens(r["text"])) > 5 for r in rows)
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", data, "--out", out, "--epochs", "1",
                            "--seq-len", "5", "--precision", "fp32", "--kernel-size", "2"], capsys)
    assert code == 0
    truncated = json.loads((out / "results.json").read_text())["truncated_texts"]
    assert truncated["test"] == long_test > 0 and truncated["train"] > 0
    assert f"truncated to 5 tokens: {truncated['train']} of 60 train texts" in err
    assert f"{long_test} of 15 test texts" in err
    assert cct.load_checkpoint(out / "best.pt").cfg.kernel_size == 2


def test_val_split_and_train_limit_are_seeded_and_stratified(trec_dir):
    cfg = make_config("text_cct_2", str(trec_dir), "unused", train_limit=30, val_split=0.2, seq_len=8)
    a = text_inputs(cfg, checkpoint=None, precision="fp32", quiet=True)
    b = text_inputs(cfg, checkpoint=None, precision="fp32", quiet=True)
    assert len(a.train_set) == 24 and len(a.val_set) == 6
    assert torch.bincount(a.val_set.labels).tolist() == [2, 2, 2]
    assert torch.equal(a.val_set.inputs.ids, b.val_set.inputs.ids)
    # the vocabulary comes from the 24 training texts only
    words = {w for row in a.train_set.inputs.ids.tolist() for w in row}
    assert words <= set(range(a.model_overrides["vocab_size"]))


def test_word_vectors_initialise_known_words(trec_dir, tmp_path, capsys):
    vectors = tmp_path / "vectors.txt"
    known = {"who": [0.5] * 300, "river": [-0.25] * 300, "zebra": [1.0] * 300}  # zebra: not in the corpus
    vectors.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in known.items()))
    cfg = make_config("text_cct_2", str(trec_dir), "unused", seq_len=8, word_vectors=str(vectors), min_frequency=1)
    vectors.write_bytes(b"\xef\xbb\xbf" + vectors.read_bytes())  # a BOM (Windows editors): "who" is still "who"
    inputs = text_inputs(cfg, checkpoint=None, precision="fp32", quiet=False)
    model = cct.create_model("text_cct_2", num_classes=3, **inputs.model_overrides)
    inputs.setup_model(model)
    tok = model.tokenizer
    assert torch.equal(model.embedding.weight[tok.token_to_id("who")], torch.full((300,), 0.5))
    assert torch.equal(model.embedding.weight[tok.token_to_id("river")], torch.full((300,), -0.25))
    assert "word vectors: 2 of" in capsys.readouterr().err
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", trec_dir, "--out", out, "--word-vectors",
                            vectors, "--epochs", "1", "--seq-len", "8", "--min-frequency", "1"], capsys)
    assert code == 0 and "word vectors: 2 of" in err
    bad = tmp_path / "bad.txt"
    bad.write_text("who 1 2 3\n")
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", trec_dir, "--out", tmp_path / "o2",
                            "--word-vectors", bad, "--epochs", "1"], capsys)
    assert code == 2 and "bad.txt:1" in err


def test_label_level_fine(tmp_path):
    root = tmp_path / "trec"
    root.mkdir()
    (root / "train_5500.label").write_text("HUM:ind Who is he ?\nHUM:gr Who are they ?\nNUM:How many ?\n"
                                           "LOC:city Where is it ?\nHUM:ind Who wrote it ?\nHUM:gr Which team ?\n")
    (root / "TREC_10.label").write_text("HUM:ind Who is she ?\n")
    cfg = make_config("text_cct_2", str(root), "unused", label_level="fine", val_split=0.0, seq_len=8)
    inputs = text_inputs(cfg, checkpoint=None, precision="fp32", quiet=True)
    assert inputs.classes == ["HUM:gr", "HUM:ind", "LOC:city"] and inputs.results["skipped_lines"] == 1


def test_token_batch_trims_to_the_longest_text():
    batch = TokenBatch(torch.tensor([[5, 6, 1, 1], [7, 1, 1, 1]]), torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]).bool())
    ids, mask = batch.trimmed()
    assert ids.tolist() == [[5, 6], [7, 1]] and mask.tolist() == [[True, True], [True, False]]
    assert len(batch[torch.tensor([1])]) == 1 and [len(b) for b in batch.split(1)] == [1, 1]


@pytest.mark.skipif(not (SHARED_TREC / "train_5500.label").is_file(), reason="../shared/data/trec is absent")
def test_shared_trec_trains_a_few_steps(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", SHARED_TREC, "--out", out, "--train-limit",
                            "300", "--epochs", "1", "--batch-size", "64", "--seq-len", "32"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"] and results["test_images"] == 499  # this copy lacks one (shared README)
    assert "train_5500.label:4451" in err  # the malformed fine label is reported


def test_time_budget_sizes_a_text_run(trec_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", trec_dir, "--out", out, "--time-budget",
                            "0.05", "--seq-len", "8", "--precision", "fp32"], capsys)
    assert code == 0 and "time budget 0.05 min" in err
    assert json.loads((out / "results.json").read_text())["steps"] >= 1


# ---------------------------------------------------------------------- token dropout
def test_token_dropout_replaces_real_tokens_only():
    from cct.kinds import TextAugmentConfig, augment_tokens
    from cct.tokenizer import UNK_ID
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 50, (64, 40), generator=g)
    mask = torch.arange(40) < torch.randint(1, 41, (64, 1), generator=g)
    ids = ids.masked_fill(~mask, 1)
    cfg = TextAugmentConfig(token_dropout=0.3)
    (got, got_mask), labels = augment_tokens(TokenBatch(ids, mask), torch.zeros(64, dtype=torch.long), g, cfg,
                                             num_classes=2)
    width = got.shape[1]  # cut to the longest text
    ids, mask = ids[:, :width], mask[:, :width]
    changed = got != ids
    assert torch.equal(got_mask, mask) and not changed[~mask].any()  # padding stays padding
    assert (got[changed] == UNK_ID).all()
    assert 0.25 < changed.sum() / mask.sum() < 0.35
    (same, _), _ = augment_tokens(TokenBatch(ids, mask), labels, g, TextAugmentConfig(), num_classes=2)
    assert torch.equal(same, ids)  # off by default


# ---------------------------------------------------------------------- word mixup
def test_word_mixup_augmentation_gives_lambda_and_soft_targets():
    from cct.kinds import TextAugmentConfig, augment_tokens
    ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 1], [5, 9, 6, 7]])
    batch = TokenBatch(ids, ids != 1)
    labels = torch.tensor([0, 1, 2])
    cfg = TextAugmentConfig(mixup_alpha=0.4, label_smoothing=0.1)
    (got_ids, got_mask, lam), targets = augment_tokens(batch, labels, torch.Generator().manual_seed(0), cfg,
                                                       num_classes=3)
    assert torch.equal(got_ids, ids) and torch.equal(got_mask, ids != 1)  # the model mixes, not the augmenter
    lam = float(lam)
    assert 0.0 <= lam <= 1.0 and targets.shape == (3, 3)
    torch.testing.assert_close(targets.sum(1), torch.ones(3))
    smooth = torch.full((3, 3), 0.1 / 3) + torch.eye(3)[labels] * 0.9
    torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth.flip(0))
    (_, _), plain = augment_tokens(batch, labels, torch.Generator(), cfg, num_classes=3, mix=False)  # mix off
    assert torch.equal(plain, labels)


def test_word_mixup_in_the_model_mixes_word_vectors_and_masks():
    torch.manual_seed(0)
    model = cct.create_model("text_cct_2", vocab_size=50, seq_len=8, kernel_size=2).eval()
    ids = torch.randint(2, 50, (4, 6))
    mask = torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(model(ids, mask, torch.tensor(1.0)), model(ids, mask))
    torch.testing.assert_close(model(ids, mask, torch.tensor(0.0)), model(ids.flip(0), mask))
    # halfway: the features of the averaged word vectors; a position is real where either text has a token
    short = mask.clone()
    short[0, 3:] = False
    x = model.embedding(ids) * short.unsqueeze(-1)
    mixed_x, mixed_mask = 0.3 * x + 0.7 * x.flip(0), short | short.flip(0)
    feats, token_mask = model.forward_features(ids, short, torch.tensor(0.3))
    x2, m2 = model.conv_tokenizer(mixed_x, mixed_mask)
    x2 = model._position(x2)
    for blk in model.blocks:
        x2 = blk(x2, m2)
    torch.testing.assert_close(feats, model.norm(x2))
    assert torch.equal(token_mask, m2)


def test_train_with_word_mixup_and_image_flags_refused(trec_dir, tmp_path, capsys):
    out = tmp_path / "mix"
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", trec_dir, "--out", out, "--mixup-alpha", "0.4",
                            *FAST], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["mixup_alpha"] == 0.4
    for flag in (["--cutmix-alpha", "1"], ["--translate", "2"], ["--rand-augment", "rand-m9-mstd0.5"],
                 ["--tta-translate", "1"], ["--alternate-flip"], ["--hflip"], ["--img-size", "64"],
                 ["--normalize", "cifar"]):
        code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", trec_dir, "--out", tmp_path / "bad",
                                *flag, *FAST], capsys)
        assert code != 0 and f"{flag[0]} is for image models, and text_cct_2 is a text model" in err and not (tmp_path / "bad").exists()


def test_text_without_spaces_warns_that_it_is_mostly_unknown_words(tmp_path, capsys, caplog):
    """A word vocabulary makes one word of a Chinese sentence, seen once: [UNK]. The run says so and names the
    tokenizer that splits such text; ordinary text does not get the warning."""
    rng = random.Random(0)
    chars = {"pos": "丽心秀欢优喜开", "neg": "丑坏难糟陋悲苦"}
    rows = [(label, "".join(rng.choice(chars[label]) for _ in range(9)) + "。") for label in chars for _ in range(20)]
    data = tmp_path / "cjk.csv"
    data.write_text("label,text\n" + "".join(f"{label},{text}\n" for label, text in rows), encoding="utf-8")
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", data, "--out", tmp_path / "out", *FAST],
                           capsys)
    assert code == 0, err
    assert "of the training tokens are [UNK]" in err + caplog.text and "--tokenizer bpe" in err + caplog.text
    caplog.clear()
    code, _, err = run_cli(["train", "--model", "text_cct_2", "--data", write_corpus(tmp_path / "plain", "csv"),
                            "--out", tmp_path / "out2", *FAST], capsys)
    assert code == 0, err
    assert "[UNK]" not in err + caplog.text
