"""Choose the text recipe on validation splits of TREC's training file, never on its test file.

For each seed: the seeded, stratified 10% validation split of `train_5500.label` that `cct train --val-split
0.1 --seed S` draws (`cct.data.split_set`), a word-level tokenizer trained on the other 90%, and a text model
from the registry with the fast kernels, trained by the text recipe's loop written out here in a few lines
(`cct.step.make_optimizer`: AdamW, or Muon with `--optimizer muon`; the learning rate of `cct.step.lr_at`, label
smoothing, token dropout, and the options below) so that variants the recipe does not have (an EMA or an average of
the last epochs' weights, fine labels summed into coarse ones) can be tried too. It prints the validation top-1 of the last epoch
(`last`), of the best epoch (`best`: optimistic, the same split chooses it), of the EMA (`ema`) and of the
weight average (`swa`) per seed, and their means over seeds. The test file's texts are never tokenized,
scored or printed. One thread per process, so two variants can run side by side on two cores.

The defaults are the text recipe's as of its eighth round (FGM 2.0, no token dropout), in fp32; `--precision bf16`
trains as the recipe does where its trial picks bf16 (ninth round). Since the fifteenth round the recipe is those
defaults plus `--unk-shapes --kernel-size 4 --attn-drop-rate 0 --label-smoothing 0.2`, and since the sixteenth
`--fine-aux 0.5` as well (a second head on the fine labels, trained beside the first); the seventeenth round tried
FGM's move measured per text (`--fgm-norm text --fgm E`) instead of over the table, and the recipe has been those
flags plus `--fgm-norm text --fgm 1.0` since; the eighteenth tried a move per word (`--fgm-norm word`), PGD and
FreeLB in the per-text norm (`--adv-steps K [--adv-average]`); the nineteenth virtual adversarial training
(`--vat E`, beside FGM or with `--fgm 0` instead of it) and a KL term at FGM's point (`--adv-kl W`); the twentieth
scored the second head's vote on the same weights: whenever `--fine-aux` trains that head, each split also prints
`fine_sum` (its probabilities alone, each fine class's summed into its coarse one), `heads` (those plus the first
head's) and `heads_log` (their log-probabilities added), and `--save-heads FILE` keeps both heads' validation
probabilities for other weights (the recipe's `--fine-vote 2` came from them). Earlier rounds in
benchmarks/README.md ran with the defaults of their time (token dropout 0.1, no FGM): their flags are on top of those.

    .venv/bin/python benchmarks/trec_validation.py --tag recipe
    .venv/bin/python benchmarks/trec_validation.py --tag nomix --mix 0 --ema 0.995 --swa 10
    .venv/bin/python benchmarks/trec_validation.py --tag fgm1 --fgm 1.0 --seeds 5,6,7,8,9
    .venv/bin/python benchmarks/trec_validation.py --tag ngrams --precision bf16 --char-ngrams 16384 --fgm-ngrams
    .venv/bin/python benchmarks/trec_validation.py --tag mlm --precision bf16 --mlm-epochs 30
    .venv/bin/python benchmarks/trec_validation.py --tag ens --precision bf16 --ensemble 3
    .venv/bin/python benchmarks/trec_validation.py --tag unk --precision bf16 --min-frequency 1 --unk-alpha 0.25
    .venv/bin/python benchmarks/trec_validation.py --tag recipe15 --precision bf16 --unk-shapes --kernel-size 4 \
        --attn-drop-rate 0 --label-smoothing 0.2 --seeds 0,1,2,3,4,5,6,7,8,9
    .venv/bin/python benchmarks/trec_validation.py --tag recipe16 --precision bf16 --unk-shapes --kernel-size 4 \
        --attn-drop-rate 0 --label-smoothing 0.2 --fine-aux 0.5 --seeds 0,1,2,3,4,5,6,7,8,9
    .venv/bin/python benchmarks/trec_validation.py --tag text1 --precision bf16 --unk-shapes --kernel-size 4 \
        --attn-drop-rate 0 --label-smoothing 0.2 --fine-aux 0.5 --fgm-norm text --fgm 1.0 --seeds 0,1,2,3,4
    .venv/bin/python benchmarks/trec_validation.py --tag freelb --precision bf16 --unk-shapes --kernel-size 4 \
        --attn-drop-rate 0 --label-smoothing 0.2 --fine-aux 0.5 --fgm-norm text --fgm 1.0 --adv-steps 2 --adv-average
    .venv/bin/python benchmarks/trec_validation.py --tag vat --precision bf16 --unk-shapes --kernel-size 4 \
        --attn-drop-rate 0 --label-smoothing 0.2 --fine-aux 0.5 --fgm-norm text --fgm 1.0 --vat 1.0

Results and the choices they led to: benchmarks/README.md ("Text: TREC-6").
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from cct import data as data_mod
from cct.kernels import fuse, use_kernels
from cct.registry import create_model
from cct.runtime import autocast
from cct.recipes import make_config
from cct.step import lr_at, make_optimizer, per_text_shift, word_embedding, word_embedding_module, word_outputs
from cct.text_data import load_text
from cct.text_run import RawTexts
from cct.tokenizer import UNK_ID, TextTokenizer

TREC = Path(__file__).resolve().parents[2] / "shared" / "data" / "trec"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(TREC), help="a TREC folder (train_5500.label is all this reads from)")
    p.add_argument("--model", default="text_cct_2")
    p.add_argument("--kernel-size", type=int, default=2)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-epochs", type=float, default=3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "muon"))
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--token-dropout", type=float, default=0.0)
    p.add_argument("--embedding-std", type=float, default=0.1)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--tokenizer", default="word", choices=("word", "wordpiece", "bpe"))
    p.add_argument("--vocab-size", type=int, default=30_000, help="most token ids (subword tokenizers: their size)")
    p.add_argument("--word-embedding-dim", type=int, default=300)
    p.add_argument("--positional-embedding", default="sine", choices=("sine", "learnable", "none"))
    p.add_argument("--drop-rate", type=float, default=None, help="dropout (default: the model's)")
    p.add_argument("--attn-drop-rate", type=float, default=None, help="attention dropout (default: the model's)")
    p.add_argument("--drop-path-rate", type=float, default=None, help="stochastic depth (default: the model's)")
    p.add_argument("--mix", type=float, default=0.4, help="word mixup alpha (0: off)")
    p.add_argument("--mix-off-epochs", type=int, default=0, help="no word mixup in the last N epochs (as timm's "
                   "mixup_off_epoch)")
    p.add_argument("--fine", action="store_true", help="train on the fine labels; predict a coarse one by summing "
                                                       "its fine classes' probabilities")
    p.add_argument("--fgm", type=float, default=2.0, help="FGM (Miyato et al. 2017): also train on the loss with the "
                                                           "word-embedding table moved this far along its gradient")
    p.add_argument("--adv-steps", type=int, default=1, help="with --fgm: 1 is FGM; K > 1 is PGD (Madry et al. "
                   "2018): K moves of fgm/K, each along the gradient at the last point, projected to within fgm; the "
                   "last point's gradient is added to the clean one")
    p.add_argument("--fgm-norm", default="table", choices=("table", "text", "word"),
                   help="with --fgm: table moves the word-vector table by fgm along its gradient, normalised over "
                        "the whole table; text moves each text's word vectors (each occurrence apart) by fgm along "
                        "their own gradient (Miyato et al. 2017's form; the recipe's `--fgm-norm`); word moves each "
                        "word vector of each text by fgm along its own gradient. With text or word, --adv-steps K "
                        "is PGD in that norm")
    p.add_argument("--adv-average", action="store_true", help="with --adv-steps K > 1 and --fgm-norm text or word: "
                   "add the mean of all K points' gradients to the clean one (FreeLB, Zhu et al. 2020), not the "
                   "last point's alone")
    p.add_argument("--adv-kl", type=float, default=0.0, help="with --fgm-norm text: at FGM's moved point, also "
                   "W x KL(clean || moved) of the first head's predictions, the clean ones held fixed (TRADES, Zhang "
                   "et al. 2019; 0: off)")
    p.add_argument("--vat", type=float, default=0.0, help="with --fgm-norm text: virtual adversarial training "
                   "(Miyato et al. 2017): also W x KL(clean || moved) at each text's word vectors moved this far in "
                   "the direction one power iteration finds from a random start, no labels involved (0: off; two more "
                   "passes a step)")
    p.add_argument("--vat-xi", type=float, default=0.1, help="with --vat: the power iteration's probe length per text")
    p.add_argument("--vat-weight", type=float, default=1.0, help="with --vat: W")
    p.add_argument("--ema", type=float, default=0.0, help="also score an EMA of the weights with this decay per step")
    p.add_argument("--swa", type=int, default=0, help="also score the average of the last N epochs' weights")
    p.add_argument("--char-ngrams", type=int, default=0, help="fastText-style: add to each word's vector the mean of "
                   "its 3-5-character n-grams' vectors, hashed into this many rows (0: off)")
    p.add_argument("--fgm-ngrams", action="store_true", help="with --char-ngrams: FGM moves the n-gram table too "
                   "(one move over both tables, of size --fgm)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: the forward under bf16 autocast, as `cct train --precision bf16` (loss in fp32)")
    p.add_argument("--mlm-epochs", type=int, default=0, help="masked-word pretraining on the training split's own "
                   "texts for this many epochs before the recipe (0: off; kernel 2 only)")
    p.add_argument("--mlm-prob", type=float, default=0.15, help="with --mlm-epochs: the share of real words masked")
    p.add_argument("--mlm-lr", type=float, default=2e-3, help="with --mlm-epochs: its AdamW learning rate")
    p.add_argument("--unk-alpha", type=float, default=0.0, help="each step, a real word seen c times in the training "
                   "split becomes [UNK] with probability A / (A + c) (Kiperwasser & Goldberg 2016; 0: off)")
    p.add_argument("--ensemble", type=int, default=1, help="train K models on the split (the first as without this "
                   "flag, the others from other initial seeds and batch orders) and also score the mean of the first "
                   "k models' probabilities, k = 2..K (`ens2`, ...)")
    p.add_argument("--unk-backoff", default="none", choices=("none", "rules", "snowball"),
                   help="a word outside the vocabulary (in training too) becomes a vocabulary word it inflects: by "
                        "stripping a suffix (rules: -s, -es, -ies→-y, -ed, -ing, ...), or the most frequent word "
                        "with its Snowball stem (snowball; needs the snowballstemmer package)")
    p.add_argument("--unk-shapes", action="store_true", help="an unknown word becomes one of three [UNK]s by its "
                   "shape: with a digit, capitalised (not first), or other (the recipe's `--unk-shapes`)")
    p.add_argument("--fine-aux", type=float, default=0.0, help="also train the model's second head on the fine "
                   "labels, loss weight W (the recipe's `--fine-aux`; 0: off)")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--tag", default="")
    p.add_argument("--save-heads", default="", help="with --fine-aux: save the last epoch's validation probabilities "
                   "of both heads to this file ({seed} is replaced by the split's seed)")
    a = p.parse_args()
    if a.mlm_epochs and a.kernel_size != 2:
        p.error("--mlm-epochs maps words to tokens for --kernel-size 2 only")
    if a.fgm_ngrams and not (a.char_ngrams and a.fgm > 0 and a.adv_steps == 1):
        p.error("--fgm-ngrams needs --char-ngrams and FGM (--fgm > 0, --adv-steps 1)")
    if a.fine_aux and a.fine:
        p.error("--fine trains on the fine labels already; --fine-aux adds a head for them beside the coarse one")
    if a.fgm_norm != "table" and not ((a.fgm > 0 or a.vat > 0) and not a.char_ngrams):
        p.error(f"--fgm-norm {a.fgm_norm} needs FGM (--fgm > 0) or --vat, and no --char-ngrams")
    if (a.vat or a.adv_kl) and a.fgm_norm != "text":
        p.error("--vat and --adv-kl need --fgm-norm text")
    if a.adv_kl and not (a.fgm > 0 and a.adv_steps == 1):
        p.error("--adv-kl needs FGM (--fgm > 0, --adv-steps 1)")
    if a.adv_average and not (a.adv_steps > 1 and a.fgm_norm != "table"):
        p.error("--adv-average needs --adv-steps K > 1 and --fgm-norm text or word")
    if a.unk_backoff != "none" and a.unk_shapes:
        p.error("--unk-backoff rewrites texts lower-cased, so --unk-shapes would see no capitals")
    return a


def run_seed(a: argparse.Namespace, ds, seed: int, fine: tuple[dict, torch.Tensor] | None) -> dict:
    torch.manual_seed(seed)
    train, val = data_mod.split_set(RawTexts(ds.train_texts, ds.train_labels, ds.train_fine if a.fine_aux else None),
                                    num_classes=ds.num_classes, train_limit=None, val_split=0.1, seed=seed)
    tokenizer = TextTokenizer.train(train.texts, kind=a.tokenizer, lowercase=True, vocab_size=a.vocab_size,
                                    min_frequency=a.min_frequency, unk_shapes=a.unk_shapes)
    train_texts, val_texts = train.texts, val.texts
    if a.unk_backoff != "none":
        backoff = unk_backoff(tokenizer, train.texts, a.unk_backoff)
        train_texts, val_texts = [backoff(t) for t in train.texts], [backoff(t) for t in val.texts]
    ids, mask = tokenizer.encode(train_texts, seq_len=64)
    labels = train.labels
    val_ids, val_mask = tokenizer.encode(val_texts, seq_len=64)
    num_classes = ds.num_classes
    if fine is not None:  # the training texts with a well-formed fine label, and that label
        text_to_fine, parent = fine
        keep = torch.tensor([t in text_to_fine for t in train.texts])
        ids, mask = ids[keep], mask[keep]
        labels = torch.tensor([text_to_fine[t] for t in train.texts if t in text_to_fine])
        num_classes = len(parent)
    grams = val_grams = None
    if a.char_ngrams:
        grams, val_grams = char_ngrams(tokenizer, train.texts, ids.shape[1], a.char_ngrams), \
            char_ngrams(tokenizer, val.texts, val_ids.shape[1], a.char_ngrams)
        if fine is not None:
            grams = grams[keep]
    counts = torch.bincount(ids[mask], minlength=tokenizer.vocab_size).float() if a.unk_alpha > 0 else None
    results, probs = [], []
    for member in range(a.ensemble):
        member_seed = seed + 7919 * member  # another initialisation and batch order on the same split
        if member:
            torch.manual_seed(member_seed)
        result, p = train_one(a, tokenizer, ids, mask, labels, num_classes, val, val_ids, val_mask, grams, val_grams,
                              fine, ds.num_classes, counts, member_seed,
                              (train.aux, len(ds.fine_classes), torch.tensor(ds.fine_parent)) if a.fine_aux else None)
        results.append(result)
        probs.append(p)
    result = results[0]
    for k in range(2, a.ensemble + 1):
        result[f"ens{k}"] = accuracy(torch.stack(probs[:k]).mean(0), val.labels)
    result["seconds"] = sum(r["seconds"] for r in results)
    return result


SUFFIXES = (("'s", ""), ("ies", "y"), ("es", ""), ("s", ""), ("ed", ""), ("ed", "e"), ("ing", ""), ("ing", "e"),
            ("ly", ""), ("er", ""), ("est", ""))


def unk_backoff(tokenizer: TextTokenizer, texts, kind: str):
    """text -> the text as the tokenizer's words, each unknown word replaced by a known one it inflects, if any."""
    norm, pre = tokenizer.backend.normalizer, tokenizer.backend.pre_tokenizer
    words = lambda t: [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))]
    known = lambda w: tokenizer.token_to_id(w) not in (None, UNK_ID)
    if kind == "snowball":
        import collections
        import snowballstemmer
        stem = snowballstemmer.stemmer("english").stemWord
        counts = collections.Counter(w for t in texts for w in words(t) if known(w))
        by_stem = {}
        for w, _ in counts.most_common():
            by_stem.setdefault(stem(w), w)
        find = lambda w: by_stem.get(stem(w))
    else:
        def find(w):
            for suffix, repl in SUFFIXES:
                if w.endswith(suffix) and len(w) - len(suffix) >= 3 and known(w[:-len(suffix)] + repl):
                    return w[:-len(suffix)] + repl
            return None
    return lambda t: " ".join(w if known(w) else (find(w) or w) for w in words(t))


def train_one(a: argparse.Namespace, tokenizer, ids, mask, labels, num_classes, val, val_ids, val_mask, grams,
              val_grams, fine, coarse_classes, counts, seed: int,
              fine_aux: tuple[torch.Tensor, int, torch.Tensor] | None = None) -> tuple[dict, torch.Tensor]:
    """One model trained on the split; its result and its last epoch's validation probabilities."""
    aux, aux_classes, aux_parent = fine_aux if fine_aux is not None else (None, 0, None)
    model = use_kernels(create_model(a.model, num_classes=num_classes, vocab_size=tokenizer.vocab_size, seq_len=64,
                                     kernel_size=a.kernel_size, embedding_std=a.embedding_std,
                                     word_embedding_dim=a.word_embedding_dim,
                                     positional_embedding=a.positional_embedding,
                                     aux_classes=aux_classes,
                                     **{k: getattr(a, k) for k in ("drop_rate", "attn_drop_rate", "drop_path_rate")
                                        if getattr(a, k) is not None}), "fast")
    if a.char_ngrams:
        model.embedding = NgramEmbedding(model.embedding, a.char_ngrams, a.embedding_std)
    if a.mlm_epochs:
        mlm_pretrain(a, model, ids, mask, seed)
    opt = make_optimizer(model, make_config(a.model, "", "", "text", lr=a.lr, weight_decay=a.weight_decay,
                                            optimizer=a.optimizer))
    n = len(labels)
    steps_per_epoch = math.ceil(n / a.batch_size)
    schedule = dict(lr=a.lr, total_steps=steps_per_epoch * a.epochs, warmup_lr=1e-5, min_lr=1e-5, schedule="cosine",
                    warmup_steps=int(a.warmup_epochs * steps_per_epoch))

    def val_probs(m) -> torch.Tensor:
        """(len(val), coarse classes): with --fine, the coarse class's probability is the sum of its fine ones'."""
        m.eval()
        if a.char_ngrams:
            m.embedding.grams = val_grams
        with torch.no_grad(), autocast(a.precision):
            probs = fuse(m)(val_ids, val_mask).float().softmax(1)
        m.train()
        if fine is not None:
            probs = torch.zeros(len(probs), coarse_classes).index_add_(1, fine[1], probs)
        return probs

    table = word_embedding(model)  # FGM moves it
    words = word_embedding_module(model) if a.fgm_norm != "table" else None  # or its outputs, text by text
    if a.fgm_norm == "word":  # each position's own move, of length fgm (padding: no gradient, no move)
        move = lambda grad, length: length * grad / (grad.norm(dim=-1, keepdim=True) + 1e-12)
        project = lambda s, length: s * (length / (s.norm(dim=-1, keepdim=True) + 1e-12)).clamp(max=1)
    else:
        move = per_text_shift
        project = lambda s, length: s * (length / (s.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-12)).clamp(max=1)
    ema = copy.deepcopy(model) if a.ema else None
    averaged, n_averaged = None, 0
    g = torch.Generator().manual_seed(seed)
    g_vat = torch.Generator().manual_seed(seed + 10_000)  # apart, so the batch order stays the recipe's
    step, t0, history = 0, time.time(), []
    model.train()
    for epoch in range(a.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, a.batch_size):
            idx = order[i:i + a.batch_size]
            length = int(mask[idx].sum(1).max())
            x, m, y = ids[idx, :length].clone(), mask[idx, :length], labels[idx]
            y_fine = aux[idx] if aux is not None else None
            if a.char_ngrams:
                model.embedding.grams = grams[idx, :length]
            if a.token_dropout > 0:
                x[(torch.rand(x.shape, generator=g) < a.token_dropout) & m] = UNK_ID
            if counts is not None:
                x[(torch.rand(x.shape, generator=g) < a.unk_alpha / (a.unk_alpha + counts[x])) & m] = UNK_ID
            for group in opt.param_groups:
                group["lr"] = lr_at(step, **schedule)
            lam = float(torch.distributions.Beta(a.mix, a.mix).sample()) \
                if a.mix > 0 and epoch < a.epochs - a.mix_off_epochs else None

            outs: list[torch.Tensor] = []  # each pass's first-head logits, for --adv-kl

            def forward() -> tuple[torch.Tensor, torch.Tensor | None]:
                with autocast(a.precision):
                    out = model(x, m, None if lam is None else torch.tensor(lam), with_aux=y_fine is not None)
                return (out[0].float(), out[1].float()) if y_fine is not None else (out.float(), None)

            def batch_loss() -> torch.Tensor:
                out, out_fine = forward()
                outs.append(out)
                ce = lambda o, t: F.cross_entropy(o, t, label_smoothing=a.label_smoothing, ignore_index=-1)

                def loss(t: torch.Tensor, t_fine: torch.Tensor | None) -> torch.Tensor:
                    # plus the second head's on the fine labels (-1: none), where it trains
                    return ce(out, t) if out_fine is None else ce(out, t) + a.fine_aux * ce(out_fine, t_fine)

                if lam is None:
                    return loss(y, y_fine)
                # word mixup with the reversed batch, as the recipe
                return lam * loss(y, y_fine) + (1 - lam) * loss(y.flip(0), None if y_fine is None else y_fine.flip(0))

            opt.zero_grad(set_to_none=True)
            with word_outputs(words) as kept:
                batch_loss().backward()
            clean = outs[0].detach().log_softmax(1)
            kl = lambda o: F.kl_div(o.log_softmax(1), clean, log_target=True, reduction="batchmean")
            if a.vat > 0:  # one power iteration from a random direction, then the loss at the point it finds
                probe = per_text_shift(torch.randn(kept[0].shape, generator=g_vat) * m.unsqueeze(-1), a.vat_xi)
                probe.requires_grad_()
                with word_outputs(words, probe):
                    grad, = torch.autograd.grad(kl(forward()[0]), probe)
                with word_outputs(words, per_text_shift(grad, a.vat)):
                    (a.vat_weight * kl(forward()[0])).backward()
            if a.fgm == 0:  # VAT alone, or no adversary
                pass
            elif words is not None and a.adv_steps == 1:  # each text's own word vectors, moved per text (as
                with word_outputs(words, move(kept[0].grad, a.fgm)):  # cct.step.TrainStep) or per word
                    loss = batch_loss()
                    (loss + a.adv_kl * kl(outs[-1]) if a.adv_kl else loss).backward()
            elif words is not None:  # PGD (or FreeLB) on the word vectors' outputs, in the per-text/word norm
                grad, shift = kept[0].grad, torch.zeros_like(kept[0])
                for k in range(a.adv_steps):
                    shift = project(shift + move(grad, a.fgm / a.adv_steps), a.fgm).detach().requires_grad_()
                    with word_outputs(words, shift):
                        loss = batch_loss()
                    if a.adv_average or k == a.adv_steps - 1:  # onto the clean gradients (FreeLB: a K-th each)
                        (loss / (a.adv_steps if a.adv_average else 1)).backward()
                        grad = shift.grad
                    else:  # PGD's inner points only steer the move
                        grad, = torch.autograd.grad(loss, shift)
            elif a.fgm > 0 and a.adv_steps == 1:  # the table's gradient is nonzero only in the batch's rows
                tables = [table] + ([model.embedding.table] if a.char_ngrams and a.fgm_ngrams else [])
                norm = torch.stack([t.grad.norm() for t in tables]).norm() + 1e-12
                shifts = [a.fgm * t.grad / norm for t in tables]
                with torch.no_grad():
                    torch._foreach_add_(tables, shifts)
                batch_loss().backward()
                with torch.no_grad():
                    torch._foreach_sub_(tables, shifts)
            elif a.fgm > 0:  # PGD: steps of fgm / K along each new gradient, kept within fgm of the table
                clean = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
                saved = table.detach().clone()
                for k in range(a.adv_steps):
                    with torch.no_grad():
                        table.add_(table.grad, alpha=a.fgm / a.adv_steps / (float(table.grad.norm()) + 1e-12))
                        moved = table - saved
                        norm = float(moved.norm())
                        if norm > a.fgm:
                            table.copy_(saved + moved * (a.fgm / norm))
                    if k == a.adv_steps - 1:  # the last point's gradient is added to the clean one
                        for p in model.parameters():
                            p.grad = clean.get(p)
                    else:
                        model.zero_grad(set_to_none=False)
                    batch_loss().backward()
                with torch.no_grad():
                    table.copy_(saved)
            opt.step()
            step += 1
            if ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1 - a.ema)
        if a.swa and epoch >= a.epochs - a.swa:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if averaged is None:
                averaged = state
            else:
                for k, v in averaged.items():
                    if v.is_floating_point():
                        v.mul_(n_averaged / (n_averaged + 1)).add_(state[k] / (n_averaged + 1))
            n_averaged += 1
        history.append(val_probs(model))
    scores = [accuracy(probs, val.labels) for probs in history]
    result = dict(seed=seed, last=scores[-1], best=max(scores), seconds=round(time.time() - t0))
    if aux is not None:  # inference only, on the same weights: the fine head summed into coarse, and both heads
        result.update(head_scores(a, model, val_ids, val_mask, val.labels, aux_parent, coarse_classes, seed))
    if ema is not None:
        result["ema"] = accuracy(val_probs(ema), val.labels)
    if averaged is not None:
        copy_ = copy.deepcopy(model)
        copy_.load_state_dict(averaged)
        result["swa"] = accuracy(val_probs(copy_), val.labels)
    return result, history[-1]


def head_scores(a: argparse.Namespace, model, ids, mask, labels, parent: torch.Tensor, coarse_classes: int,
                seed: int) -> dict:
    """Validation top-1 of the second (fine) head, its probabilities summed into the coarse classes, and of the two
    heads together: the mean of their coarse probabilities (`heads`) and of their log-probabilities (`heads_log`)."""
    model.eval()
    with torch.no_grad(), autocast(a.precision):
        out, out_fine = model(ids, mask, with_aux=True)
    model.train()
    p = out.float().softmax(1)
    p_fine = torch.zeros(len(p), coarse_classes).index_add_(1, parent, out_fine.float().softmax(1))
    if a.save_heads:  # for combinations scored afterwards
        torch.save(dict(probs=p, fine_probs=out_fine.float().softmax(1), parent=parent, labels=labels),
                   a.save_heads.format(seed=seed))
    return dict(fine_sum=accuracy(p_fine, labels), heads=accuracy(p + p_fine, labels),
                heads_log=accuracy(p.log() + p_fine.clamp_min(1e-12).log(), labels))


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(1) == labels).float().mean().item()


def mlm_pretrain(a: argparse.Namespace, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                 seed: int) -> None:
    """Masked-word pretraining on the training split's own texts (`--mlm-epochs`; twelfth round): a share of the
    real words become [UNK], and each is predicted from the token whose window covers it (at kernel 2, token j
    pools words 2j-2..2j) plus a learned vector for the word's place in that window, through a small head and the
    word-embedding table itself as the output layer. The head is dropped; the recipe then trains the model."""
    D, table = model.cfg.embed_dim, word_embedding(model)
    head = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.GELU(), torch.nn.LayerNorm(D),
                               torch.nn.Linear(D, table.shape[1]))
    place = torch.nn.Parameter(torch.zeros(3, D))
    bias = torch.nn.Parameter(torch.zeros(table.shape[0]))
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters(), place, bias], lr=a.mlm_lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed + 1000)
    n = len(ids)
    steps_per_epoch = math.ceil(n / a.batch_size)
    schedule = dict(lr=a.mlm_lr, total_steps=steps_per_epoch * a.mlm_epochs, warmup_lr=1e-5, min_lr=1e-5,
                    schedule="cosine", warmup_steps=steps_per_epoch)
    step, t0 = 0, time.time()
    model.train()
    for epoch in range(a.mlm_epochs):
        order = torch.randperm(n, generator=g)
        total, count = 0.0, 0
        for i in range(0, n, a.batch_size):
            idx = order[i:i + a.batch_size]
            length = int(mask[idx].sum(1).max())
            x, m = ids[idx, :length].clone(), mask[idx, :length]
            pick = (torch.rand(x.shape, generator=g) < a.mlm_prob) & m
            if not pick.any():
                continue
            target = x[pick]
            x[pick] = UNK_ID
            for group in opt.param_groups:
                group["lr"] = lr_at(step, **schedule)
            with autocast(a.precision):
                feats, _ = model.forward_features(x, m)  # (B, N, D)
            b, pos = pick.nonzero(as_tuple=True)
            j = ((pos + 2) // 2).clamp(max=feats.shape[1] - 1)  # the token whose window holds word `pos`
            logits = head(feats.float()[b, j] + place[(pos - (2 * j - 2)).clamp(0, 2)]) @ table.t() + bias
            loss = F.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total, count = total + float(loss.detach()) * len(target), count + len(target)
        if epoch % 5 == 4 or epoch == a.mlm_epochs - 1:
            print(f"  mlm epoch {epoch + 1}: loss {total / max(count, 1):.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.zero_grad(set_to_none=True)


MAX_GRAMS = 24  # n-grams kept per word (a 9-letter word has 24 of 3-5 characters with its boundary marks)


def char_ngrams(tokenizer: TextTokenizer, texts, length: int, buckets: int) -> torch.Tensor:
    """(N, length, MAX_GRAMS) hashed ids (1..buckets; 0 pads) of each token's 3-5-character n-grams of "<word>",
    the words as the tokenizer splits them (normalised), aligned with `encode`'s ids."""
    backend = tokenizer.backend
    out = torch.zeros(len(texts), length, MAX_GRAMS, dtype=torch.long)
    for row, text in enumerate(texts):
        words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
        for col, w in enumerate(words[:length]):
            w = f"<{w}>"
            g = [w[i:i + n] for n in (3, 4, 5) for i in range(len(w) - n + 1)][:MAX_GRAMS]
            out[row, col, :len(g)] = torch.tensor([zlib.crc32(x.encode()) % buckets + 1 for x in g], dtype=torch.long)
    return out


class NgramEmbedding(torch.nn.Module):
    """The word vector plus the mean of its character n-grams' vectors (`grams` set before each forward)."""

    def __init__(self, word: torch.nn.Embedding, buckets: int, std: float):
        super().__init__()
        self.word = word
        self.table = torch.nn.Parameter(torch.randn(buckets + 1, word.embedding_dim) * std)
        self.grams: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # the model reads the word table's dtype
        return self.word.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        g = self.grams
        assert g is not None and g.shape[:2] == ids.shape, "set grams to the batch's n-grams first"
        flat = g.reshape(-1, g.shape[-1])
        summed = F.embedding_bag(flat, self.table, mode="sum", padding_idx=0)  # (B·L, D)
        count = (flat > 0).sum(1, keepdim=True).clamp(min=1).to(summed.dtype)
        return self.word(ids) + (summed / count).view(*ids.shape, -1)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)
    ds = load_text(a.data)
    fine = None
    if a.fine:
        fds = load_text(a.data, label_level="fine")
        assert fds.classes == ds.fine_classes  # the fine labels' names are the coarse read's `fine_classes`
        fine = ({t: int(label) for t, label in zip(fds.train_texts, fds.train_labels)}, torch.tensor(ds.fine_parent))
    results = []
    for seed in (int(s) for s in a.seeds.split(",")):
        results.append(run_seed(a, ds, seed, fine))
        print(json.dumps(results[-1]), flush=True)
    means = {k: round(sum(r[k] for r in results) / len(results), 4) for k in results[0] if k != "seed"}
    print("mean", a.tag, json.dumps(means), flush=True)


if __name__ == "__main__":
    import sys
    from cct.errors import CCTError
    try:
        main()
    except CCTError as e:  # a missing or malformed --data: its one line, as `cct` says it
        sys.exit(f"trec_validation: {e}")
