"""Serving text models: predict (--text, --text-file, --json), ONNX/TorchScript export, explain, bench, errors.

Checkpoints are written by hand in the text format the training side writes: `save_checkpoint(model,
path, eval={"kind": "text", ...}, tokenizer=tok.to_json())`.
"""
import copy
import json

import pytest
import torch

import cct
from cct.cli import main
from cct.errors import CCTError
from cct.kernels import FastTextConvTokenizer, use_kernels
from cct.text_explain import explain_texts, receptive_fields, word_weights
from cct.text_model import create_text_model
from cct.text_predict import load_text_model, predict_texts
from cct.tokenizer import TextTokenizer
from helpers import benchmark_script

CORPUS = ["what is the capital of peru ?", "who wrote hamlet ?", "how many legs does a spider have ?",
          "where is the eiffel tower ?", "when did the war end ?", "what does nasa stand for ?"]
CLASSES = ["DESC", "HUM", "LOC", "NUM"]
SEQ_LEN = 8


def _model(name="text_cct_2", **overrides):
    torch.manual_seed(0)
    tok = TextTokenizer.train(CORPUS, vocab_size=200)
    model = create_text_model(name, vocab_size=tok.vocab_size, num_classes=len(CLASSES), seq_len=SEQ_LEN,
                              word_embedding_dim=16, **overrides).eval()
    model.tokenizer, model.class_names = tok, list(CLASSES)
    return model


def _checkpoint(tmp_path, name="text_cct_2", **overrides):
    model = _model(name, **overrides)
    record = {"kind": "text", "seq_len": SEQ_LEN, "precision": "fp32", "batch_size": 4}
    return cct.save_checkpoint(model, tmp_path / "text.pt", eval=record, tokenizer=model.tokenizer.to_json())


def _image_checkpoint(tmp_path):
    torch.manual_seed(0)
    return cct.save_checkpoint(cct.create_model("cct_2_3x2_32", num_classes=3), tmp_path / "image.pt")


# ---------------------------------------------------------------------- predict
def test_three_lines_classify_a_string_and_match_predict_texts(tmp_path):
    ckpt = _checkpoint(tmp_path)
    model = load_text_model(ckpt)
    encoded = model.tokenizer.encode(["What is the capital of Peru ?"])  # the spec's (ids, mask), cut to seq_len
    assert len(encoded) == 2
    ids, mask = encoded
    probs = model(ids, mask).softmax(-1)[0]
    top = predict_texts(ckpt, ["What is the capital of Peru ?"], topk=4)[0]["predictions"]
    assert [p["class"] for p in top] == [CLASSES[i] for i in probs.argsort(descending=True).tolist()]
    assert top[0]["probability"] == pytest.approx(probs.max().item(), abs=1e-6)


def test_predict_texts_batches_pads_and_counts_truncation():
    model = _model()
    long = " ".join(["what"] * (SEQ_LEN + 5))
    alone = [predict_texts(model, [t], topk=2)[0] for t in ("who wrote hamlet ?", long)]
    together = predict_texts(model, ["who wrote hamlet ?", long], topk=2, batch_size=2)
    for a, b in zip(alone, together):  # padding to the batch's longest text changes nothing
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        assert a["predictions"][0]["probability"] == pytest.approx(b["predictions"][0]["probability"], abs=1e-5)
    assert [r["truncated"] for r in together] == [False, True]
    with pytest.raises(CCTError, match="topk"):
        predict_texts(model, ["x"], topk=0)


def test_cli_predict_text_text_file_and_json(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    lines = tmp_path / "texts.txt"
    lines.write_text("who wrote hamlet ?\n\n" + " ".join(["where"] * 20) + "\n", encoding="utf-8")
    assert main(["predict", str(ckpt), "--text", "What is the capital of Peru ?", "--text-file", str(lines),
                 "--json", "--topk", "2"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert [r["text"] for r in data["results"]] == ["What is the capital of Peru ?", "who wrote hamlet ?",
                                                   " ".join(["where"] * 20)]
    assert all(len(r["predictions"]) == 2 for r in data["results"]) and data["truncated"] == 1
    assert "1 of 3 text(s) longer than 8 tokens were truncated" in err
    assert main(["predict", str(ckpt), "--text", "who wrote hamlet ?"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "who wrote hamlet ?" and "%" in out.splitlines()[1]


def test_one_line_errors_for_the_wrong_kind_and_empty_input(tmp_path, capsys):
    text_ckpt, image_ckpt = _checkpoint(tmp_path), _image_checkpoint(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    image = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(image)
    cases = [(["predict", str(image_ckpt), "--text", "hello"], "is an image model"),
             (["predict", str(text_ckpt), str(image)], "is a text model"),
             (["predict", str(text_ckpt), "--text-file", str(empty)], "holds no text"),
             (["predict", str(text_ckpt), "--text", "who ?", "--text", "  "], "text 2 of 2 is empty"),
             (["explain", str(image_ckpt), "--text", "hello"], "is an image model"),
             (["explain", str(text_ckpt), str(image), "--output", str(tmp_path / "x.png")], "is a text model")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------------- export
def test_onnx_export_of_a_one_token_model(tmp_path):
    """--seq-len 1 trains; its graph has no length to vary (a Dim of min = max = 1 is refused by torch.export)."""
    pytest.importorskip("onnxruntime")
    from cct.text_export import export_text_onnx
    torch.manual_seed(0)
    tok = TextTokenizer.train(CORPUS, vocab_size=200)
    model = create_text_model("text_cct_2", vocab_size=tok.vocab_size, num_classes=len(CLASSES), seq_len=1,
                              word_embedding_dim=16, kernel_size=1).eval()
    model.tokenizer, model.class_names = tok, list(CLASSES)
    diff, _, opset = export_text_onnx(model, tmp_path / "one.onnx", opset=18, tolerance=1e-4)
    assert diff <= 1e-4 and opset == 18 and (tmp_path / "one.onnx").is_file()


# plain, and with a second head that votes (`--fine-vote`: its 5 classes summed into the 4)
@pytest.mark.parametrize("overrides", [{}, dict(aux_classes=5, aux_vote=2.0, aux_parent=[0, 1, 1, 2, 3])])
def test_onnx_export_parity_dynamic_length_and_predict_without_a_torch_model(overrides, tmp_path, capsys,
                                                                             monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ckpt = _checkpoint(tmp_path, **overrides)
    onnx_path = tmp_path / "text.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--output", str(onnx_path)]) == 0
    assert "max |diff| against PyTorch" in capsys.readouterr().out
    from cct.onnxrt import onnx_session
    session = onnx_session(onnx_path)
    assert [i.name for i in session.get_inputs()] == ["token_ids", "mask"]
    model = load_text_model(ckpt)
    for texts in (["who wrote hamlet ?"], ["a", "what is the capital of peru ?", " ".join(["x"] * 30)]):
        ids, mask = model.tokenizer.encode(texts, seq_len=SEQ_LEN)
        got = session.run(None, {"token_ids": ids.numpy(), "mask": mask.numpy()})[0]
        assert (torch.from_numpy(got) - model(ids, mask)).abs().max().item() <= 1e-4
    # classifying through the .onnx never builds a PyTorch model
    monkeypatch.setattr("cct.text_model.TextCCT.__init__", lambda *a, **k: pytest.fail("built a TextCCT"))
    texts = ["who wrote hamlet ?", "where is the eiffel tower ?"]
    assert main(["predict", str(onnx_path), "--json"] + [a for t in texts for a in ("--text", t)]) == 0
    onnx_results = json.loads(capsys.readouterr().out)["results"]
    monkeypatch.undo()
    expected = predict_texts(ckpt, texts)
    for a, b in zip(onnx_results, expected):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]


def test_export_refuses_a_graph_that_differs(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from cct import text_export
    model = _model()
    monkeypatch.setattr(text_export, "check_parity", lambda *a, **k: (_ for _ in ()).throw(CCTError("differs")))
    with pytest.raises(CCTError, match="differs"):
        text_export.export_text_onnx(model, tmp_path / "m.onnx", opset=18, tolerance=1e-4)
    assert not (tmp_path / "m.onnx").exists()


def test_torchscript_export_carries_the_tokenizer(tmp_path):
    ckpt = _checkpoint(tmp_path)
    from cct.export import export_checkpoint
    report = export_checkpoint(ckpt, tmp_path / "text.ts", "torchscript")
    assert report.max_abs_diff <= 1e-4
    extra = {"text_tokenizer.json": "", "class_names.json": ""}
    loaded = torch.jit.load(str(tmp_path / "text.ts"), _extra_files=extra)
    tok = TextTokenizer.from_json(extra["text_tokenizer.json"])
    ids, mask = tok.encode(["who wrote hamlet ?", "what ?"], seq_len=SEQ_LEN)
    assert torch.allclose(loaded(ids, mask), load_text_model(ckpt)(ids, mask), atol=1e-5)
    assert json.loads(extra["class_names.json"]) == CLASSES
    with pytest.raises(CCTError, match="text.ts is a TorchScript export, for torch.jit.load"):  # not cct's to read
        predict_texts(tmp_path / "text.ts", ["who ?"])


# ---------------------------------------------------------------------- explain
@pytest.mark.parametrize("kernel_size", [1, 2, 4])
def test_word_weights_sum_to_one_and_follow_the_receptive_fields(kernel_size):
    model = _model(kernel_size=kernel_size)
    texts = ["who wrote hamlet ?", "what is the capital of peru ?", "x"]
    words, weights, _ = word_weights(model, texts)
    assert [len(w) for w in words] == [4, 7, 1]
    for w in weights:
        assert w.sum().item() == pytest.approx(1.0, abs=1e-5) and (w >= 0).all()
    cover = receptive_fields(model, 6)
    assert cover.shape == (model.conv_tokenizer.num_tokens(6), 6)
    # every pooled token covers at most pool_kernel windows of kernel_size words, contiguously
    for row in cover:
        covered = row.nonzero().flatten().tolist()
        assert covered == list(range(covered[0], covered[-1] + 1)) if covered else True
        assert row.sum() <= model.cfg.pool_kernel * kernel_size


def test_word_weight_is_the_pooled_weight_when_a_token_is_one_word():
    model = _model(kernel_size=1, stride=1, padding=0, pool_kernel=1, pool_stride=1, pool_padding=0)
    words, weights, _ = word_weights(model, ["who wrote hamlet ?"])
    ids, mask = model.tokenizer.encode(["who wrote hamlet ?"], seq_len=SEQ_LEN)
    features, token_mask = model.forward_features(ids, mask)
    assert torch.allclose(weights[0], model.pool_weights(features, token_mask)[0], atol=1e-6)


def test_cli_explain_prints_words_and_writes_a_png(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    png = tmp_path / "strip.png"
    assert main(["explain", str(ckpt), "--text", "who wrote hamlet ?", "--text", "where is peru ?",
                 "--output", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("who wrote hamlet ?  →") and out[1].split()[-1] == "who"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = explain_texts(ckpt, ["who wrote hamlet ?"])
    assert [w["word"] for w in results[0]["words"]] == ["who", "wrote", "hamlet", "?"]
    assert results[0]["truncated"] is False


def test_cli_explain_reports_truncated_texts(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    long = " ".join(["where"] * (SEQ_LEN + 3))
    assert main(["explain", str(ckpt), "--text", long, "--text", "who ?", "--json"]) == 0
    out, err = capsys.readouterr()
    results = json.loads(out)["results"]
    assert [r["truncated"] for r in results] == [True, False] and len(results[0]["words"]) == SEQ_LEN
    assert "1 of 2 text(s) longer than the model's seq_len tokens were truncated" in err


def test_explain_refuses_class_token_models():
    with pytest.raises(CCTError, match="class token"):
        word_weights(_model("text_vit_2"), ["who wrote hamlet ?"])


# ---------------------------------------------------------------------- kernels and bench
@pytest.mark.parametrize("name,kernel_size", [("text_cct_2", 1), ("text_cct_2", 2), ("text_cct_2", 4),
                                              ("text_cvt_2", 4)])
def test_fast_text_tokenizer_matches_the_reference(name, kernel_size):
    reference = _model(name, kernel_size=kernel_size, attn_drop_rate=0.0, drop_path_rate=0.0).double()
    fast = use_kernels(copy.deepcopy(reference), "fast")
    assert isinstance(fast.conv_tokenizer, FastTextConvTokenizer)
    ids, mask = reference.tokenizer.encode(CORPUS, seq_len=SEQ_LEN)
    a, b = reference(ids, mask), fast(ids, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name_a, p), q in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name_a)


def test_bench_text_model(capsys):
    assert main(["bench", "--model", "text_cct_2", "--json", "--batch-size", "4", "--infer-batch-size", "4",
                 "--steps", "1", "--windows", "1", "--warmup", "1", "--no-peak", "--vocab-size", "50",
                 "--seq-len", "12", "--precision", "fp32"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["train_sequences_per_second"] > 0 and r["infer_sequences_per_second"] > 0
    assert r["seq_len"] == 12 and r["vocab_size"] == 50 and r["gflops_per_sequence_forward"] > 0
    assert main(["bench", "--model", "cct_2_3x2_32", "--seq-len", "12"]) == 2
    assert "for text models" in capsys.readouterr().err
    assert main(["bench", "--model", "text_cct_2", "--seq-len", "0"]) == 2  # not the default length in disguise
    assert "--seq-len must be at least 1, got 0" in capsys.readouterr().err


def test_bench_text_recipe_times_the_training_step(capsys, monkeypatch):
    import cct.text_bench
    import cct.text_run
    from cct.step import TrainStep
    # a CPU with native bf16, where the trial finds fp32 faster: the recipe's "auto" must follow the trial
    monkeypatch.setattr(cct.text_bench, "resolve_precision", lambda p, d: "bf16" if p == "auto" else p)
    monkeypatch.setattr(cct.text_run, "faster_precision", lambda step: ("fp32", {"fp32": 1.0, "bf16": 2.0}))
    passes = []
    original = TrainStep.adversarial_backward
    monkeypatch.setattr(TrainStep, "adversarial_backward", lambda self, *a: passes.append(1) or original(self, *a))
    built = []
    create = cct.text_bench.create_text_model
    monkeypatch.setattr(cct.text_bench, "create_text_model", lambda name, **kw: built.append(
        {k: kw[k] for k in ("kernel_size", "attn_drop_rate") if k in kw}) or create(name, **kw))
    common = ["bench", "--model", "text_cct_2", "--json", "--batch-size", "4", "--steps", "1", "--windows", "1",
              "--warmup", "1", "--no-peak", "--no-infer", "--vocab-size", "50", "--seq-len", "12"]
    assert main(common + ["--precision", "fp32"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert not passes and plain["recipe"] is None
    assert main(common + ["--recipe", "text"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(passes) == 2 and r["recipe"] == "text"  # the warm-up step and the timed one, each with FGM
    assert r["precision"] == "fp32" and r["precision_trial_ms"] == {"fp32": 1.0, "bf16": 2.0}  # the trial's
    assert r["threads"] == 1 and plain["precision_trial_ms"] is None  # the recipe's threads; fp32 asked: no trial
    # the model as `cct train` builds it for the recipe: its kernel (the official 4) and dropout rates
    assert built[0] == {} and built[1]["kernel_size"] == 4 and built[1]["attn_drop_rate"] == 0.0
    assert r["gflops_per_sequence_forward"] == plain["gflops_per_sequence_forward"]


# ---------------------------------------------------------------------- benchmark scripts
def test_time_to_accuracy_trec_runs_each_budget_and_seed_and_plots(tmp_path, monkeypatch):
    tta = benchmark_script("time_to_accuracy_trec")
    calls = []

    def fake_run(model, data, out, *, seed, budget, epochs, val_split, extra):
        calls.append((seed, budget, epochs, extra))
        return {"seed": seed, "budget_minutes": budget, "epochs_asked": epochs, "out": str(out), "model": model,
                "epochs": 3, "steps": 10, "train_minutes": budget or epochs / 10, "test_top1": 0.9, "test_top5": 1.0}

    monkeypatch.setattr(tta, "run", fake_run)
    rows = tta.main(["--budgets", "0.5", "1", "--seeds", "0", "1", "--out", str(tmp_path), "--", "--kernel-size", "2"])
    assert [(c[0], c[1]) for c in calls] == [(0, 0.5), (0, 1.0), (1, 0.5), (1, 1.0)]
    assert all(c[3] == ["--kernel-size", "2"] and c[2] is None for c in calls) and len(rows) == 4
    assert (tmp_path / "time_to_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    calls.clear()
    tta.main(["--epochs-list", "5", "10", "--out", str(tmp_path)])
    assert [(c[1], c[2]) for c in calls] == [(None, 5), (None, 10)]


def test_fast_masked_attention_matches_the_reference_in_inference_and_with_empty_texts():
    reference = _model(attn_drop_rate=0.0, drop_path_rate=0.0).double().eval()
    fast = use_kernels(copy.deepcopy(reference), "fast")
    ids, mask = reference.tokenizer.encode(CORPUS + [""], seq_len=SEQ_LEN)
    with torch.inference_mode():  # the SDPA path
        torch.testing.assert_close(fast(ids, mask), reference(ids, mask), rtol=0, atol=1e-12)
    fast.train()  # dropout on: finite, and a different draw each call
    fast.blocks[0].attn.attn_drop = 0.5
    a, b = fast(ids, mask), fast(ids, mask)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_fast_masked_attention_drops_at_the_models_rates(monkeypatch):
    from cct import kernels
    model = use_kernels(_model(attn_drop_rate=0.3, drop_rate=0.2, drop_path_rate=0.0), "fast").train()
    rates, real = [], kernels.dropout
    monkeypatch.setattr(kernels, "dropout", lambda x, p, training: rates.append((tuple(x.shape[-2:]), p, training))
                        or real(x, p, training))
    ids, mask = model.tokenizer.encode(CORPUS, seq_len=SEQ_LEN)
    model(ids, mask)
    width = model.cfg.embed_dim  # the projection's output is (B, tokens, width); the attention map (B·heads, N, N)
    assert {p for shape, p, _ in rates if shape[-1] != width} == {0.3}  # attn_drop_rate on the attention map
    assert {p for shape, p, _ in rates if shape[-1] == width} == {0.2} and all(t for *_, t in rates)
