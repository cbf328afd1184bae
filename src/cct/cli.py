"""The `cct` command: subcommands, each a thin layer over a library function.

`train` and `bench` are defined here (their flags, and the functions that run them); `evaluate`,
`predict`, `export` and `explain` register themselves: each of those modules exposes
`add_parser(subparsers)`, which adds its arguments and sets `func` (a function of the parsed args
returning an exit code). Problems with the user's input (`CCTError`, and the `ValueError`s that
library code raises for bad arguments) become one line on stderr and exit status 2; `--debug` shows
the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path

from . import __version__, distributed
from .checkpoint import save_checkpoint
from .cifar import RELEASES
from .errors import CCTError, CheckpointError
from .kernels import KERNELS
from .kinds import detect_kind
from .model import count_macs, num_params
from .recipes import RECIPE_MODELS, RECIPES, RESUME_OVERRIDES, TrainConfig, make_config, validate
from .registry import create_model, from_keras, list_models, model_kind, pretrained_model
from .runlock import hold_run_lock
from .runtime import DEVICES, PRECISIONS, resolve_device
from .text_model import TEXT_VARIANTS

# modules that register their own subcommand, listed by `cct --help` between train and bench
COMMAND_MODULES = ["cct.evaluate", "cct.predict", "cct.export", "cct.explain", "cct.cache"]


def _models(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        raise CCTError(f"no model matches {args.pattern!r}")
    rows = []
    for name in names:
        if model_kind(name) == "text":  # the word embedding (vocabulary × 300) depends on the tokenizer: left out
            model = create_model(name, vocab_size=2)
            params = num_params(model) - model.embedding.weight.numel()
            rows.append((name, f"{params:,}*", "-", f"{model.cfg.seq_len} tokens", model.cfg.positional_embedding))
            continue
        model = create_model(name)
        h, w = model.cfg.img_size
        macs = f"{count_macs(model) / 1e9:.3f}G" if not args.no_macs else "-"
        rows.append((name, f"{num_params(model):,}", macs, f"{h}x{w}", model.cfg.positional_embedding))
    header = ("name", "params", "MACs", "input", "pos. embedding")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for i, row in enumerate([header] + rows):
        print("  ".join(c.ljust(w) if j in (0, 4) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if any(r[1].endswith("*") for r in rows):
        print("* text models: without the word embedding (vocabulary size × 300, set by the tokenizer), "
              "with 6 classes at kernel size 4")
    return 0


def _import_keras(args: argparse.Namespace) -> int:
    model = from_keras(args.weights)  # h5py is imported only when a file is read
    save_checkpoint(model, args.output)
    print(f"wrote {args.output} ({model.name}, from {args.weights})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- cct train
def _flag_type(tp):
    """(argparse type, nargs) of a TrainConfig field annotation."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = args[0]
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0], len(typing.get_args(tp))
    return tp, None


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model", "data", "out", "recipe")) -> None:
    """One flag per TrainConfig field (`--batch-size`, `--hflip/--no-hflip`, ...); unset flags stay None."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("recipe overrides (default: the recipe's value)")
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, nargs = _flag_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, type=kind, nargs=nargs, default=None, choices=f.metadata.get("choices"),
                               metavar=f.name.upper() if nargs is None and "choices" not in f.metadata else None,
                               help=help_text)


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (recipes: keras, paper, fast, finetune, text)",
                              description="Train a model; writes last.pt, best.pt, history.csv, curves.png, "
                                          "config.json and results.json to --out.")
    p.add_argument("--model", help="a name from `cct models` (default: the recipe's own: "
                                   + ", ".join(f"{m} for {r}" for r, m in RECIPE_MODELS.items()) + ")")
    p.add_argument("--data", help="data source (a directory of class folders, an archive, ...; for text models "
                                  "a TREC folder, CSV/TSV, JSON Lines or folders of .txt files)")
    p.add_argument("--out", metavar="DIR", help="output directory")
    p.add_argument("--recipe", choices=tuple(RECIPES), help="default: without --model, fast (text for text data); "
                                                            "with --pretrained, finetune (image models); else keras "
                                                            "for *_keras models, text for text_* models, paper")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    p.add_argument("--quiet", action="store_true", help="nothing on stderr but warnings and errors (results.json "
                                                         "holds the outcome)")
    add_config_flags(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from . import train as train_mod  # the training loop and what it imports: only when it runs
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if f.name not in ("model", "data", "out", "recipe") and getattr(args, f.name) is not None}
    if overrides.get("rrc_scale") is not None:
        overrides["rrc_scale"] = tuple(overrides["rrc_scale"])
    if args.resume:
        extra = [k for k in ("model", "out", "recipe") if getattr(args, k) is not None]
        extra += [k for k in overrides if k not in RESUME_OVERRIDES]
        if extra:
            raise CCTError("--resume takes the run's configuration from its last.pt; drop "
                           + ", ".join("--" + k.replace("_", "-") for k in extra))
        cfg = train_mod.resume_config(args.resume, **overrides, **({"data": args.data} if args.data else {}))
        if not args.data and cfg.data.lower() not in RELEASES and not Path(cfg.data).exists() \
                and not Path(cfg.data).is_absolute():  # recorded as given: relative to where the run started
            raise CCTError(f"the run's data {cfg.data} is not found from here (a path relative to where the run "
                           "started): give it with --data")
    else:
        missing = [k for k in ("data", "out") if not getattr(args, k)]
        if missing:
            raise CCTError("missing " + ", ".join("--" + k for k in missing) + " (or --resume DIR)")
        # without --model or --recipe: minutes on a CPU (fast, or text for text data), never the paper recipe
        recipe = args.recipe or ("finetune" if args.pretrained else None)
        texts = (args.data_kind or "auto") == "text" or ((args.data_kind or "auto") == "auto"
                                                        and detect_kind(args.data) == "text")
        default = "text" if texts else "fast"
        if recipe == "finetune" and not args.pretrained and not args.model:
            raise CCTError("--recipe finetune fine-tunes weights: give --pretrained SOURCE (or, to train its settings "
                           "from scratch, --model NAME and --normalize dataset)")
        try:
            model = args.model or (pretrained_model(args.pretrained) if args.pretrained else
                                   RECIPE_MODELS[recipe or default])
        except CheckpointError as e:
            raise CCTError(f"--pretrained: {e}") from None
        if args.pretrained and not args.model and model_kind(model) != ("text" if texts else "image"):
            raise CCTError(f"--pretrained {args.pretrained} holds the {model_kind(model)} model {model}, and --data "
                           f"{args.data} is {'text' if texts else 'image'} data")
        if recipe == "finetune" and not args.recipe and model_kind(model) == "text":
            recipe = None  # the finetune recipe is made of image settings: a text model keeps its own
        cfg = make_config(model, args.data, args.out, recipe or (None if args.model else default), **overrides)
    validate(cfg)
    if overrides.get("tta_translate") and not cfg.tta:  # a recipe's own shift goes quietly with --no-tta
        raise CCTError(f"--tta-translate {overrides['tta_translate']} shifts the --tta views: it needs --tta")
    if "epochs" in overrides and cfg.time_budget is not None and not args.quiet:
        print(f"cct train: --time-budget sets the run's length; --epochs {cfg.epochs} is the length its warm-up, "
              "cooldown and MixUp/CutMix stop are shares of", file=sys.stderr)
    procs = distributed.resolve_procs(cfg.procs, resolve_device(cfg.device),
                                      batch_sizes={"--batch-size": cfg.batch_size})
    try:
        # one run per --out (the --procs workers share the lock); --procs N: this process becomes rank 0 of N
        # on this machine; without it (or under torchrun) a no-op
        with hold_run_lock(cfg.out, rank=distributed.env_from_environ().rank), \
                distributed.local_workers(procs, args.argv), \
                distributed.process_group(cfg.device, threads=cfg.workers) as job:  # a no-op for one process
            train_mod.train(cfg, resume=bool(args.resume), quiet=args.quiet, rank=job.rank, world_size=job.world_size)
    except train_mod.TrainingInterrupted as e:
        print(f"cct train: {e}", file=sys.stderr)
        return e.exit_code or 130
    return 0


# ---------------------------------------------------------------------- cct bench
def _add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="training and inference throughput of a model on this machine",
                              description="Training and inference images/s, or sequences/s for a text model "
                                          "(median of timed windows), achieved GFLOP/s and their share of a "
                                          "measured GEMM peak, peak memory.")
    p.add_argument("--model", default="cct_2_3x2_32_keras", help="a registered model (see `cct models`), or a "
                                                                  "text model such as text_cct_2 (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (default: %(default)s)")
    p.add_argument("--infer-batch-size", type=int, default=256, help="inference batch (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 where the CPU supports it natively, fp32 elsewhere (a text model: on such a "
                        "CPU, the faster of the two in a trial of a few steps, as cct train decides)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window (default: %(default)s)")
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: %(default)s)")
    p.add_argument("--recipe", default=None, help="training recipe whose augmentation and optimiser are timed "
                                                  "(text models: without it, a plain AdamW step as the official "
                                                  "comparison times; with it, `cct train`'s step, FGM included; "
                                                  "default: the model's, as cct train picks it)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when there is one, else the CPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: one per core, "
                                                             "shared out between --procs processes)")
    p.add_argument("--procs", type=int, default=None,
                   help="data-parallel processes, as `cct train --procs` (default: the recipe's; 0: one per core)")
    p.add_argument("--kernels", default="fast", choices=KERNELS,
                   help="fast: cct.kernels, as training runs (default); native: those and the float32 training "
                        "attention core compiled on first use (cct.native); reference: the plain layers of cct.layers")
    text = p.add_argument_group("text models")
    text.add_argument("--seq-len", type=int, default=None,
                      help="tokens per padded sequence (default: the model's seq_len)")
    text.add_argument("--fixed-length", action="store_true",
                      help="every sequence --seq-len real tokens, no padding (default: random lengths, padded)")
    text.add_argument("--vocab-size", type=int, default=None,
                      help="embedding rows, all updated by AdamW each step (default: the model's, 100,000)")
    p.add_argument("--no-train", action="store_true", help="skip the training measurement")
    p.add_argument("--no-infer", action="store_true", help="skip the inference measurement")
    p.add_argument("--no-peak", action="store_true", help="skip the GEMM peak measurement")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from . import bench  # the benchmark and the training step it times: only when it runs
    for name in ("batch_size", "infer_batch_size", "steps", "windows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be non-negative, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.procs is not None and args.procs < 0:
        raise ValueError(f"--procs must be 0 (one per core) or positive, got {args.procs}")
    if args.model in TEXT_VARIANTS:
        return _run_text_bench(args)
    if args.seq_len is not None or args.fixed_length or args.vocab_size is not None:
        raise CCTError("--seq-len, --fixed-length and --vocab-size are for text models")
    if args.procs is None:  # as `cct train` would run this model and recipe
        args.procs = make_config(args.model, "", "", recipe=args.recipe).procs
    procs = distributed.resolve_procs(args.procs, resolve_device(args.device),
                                      batch_sizes={"--batch-size": args.batch_size,
                                                   "--infer-batch-size": args.infer_batch_size})
    with distributed.local_workers(procs, args.argv), \
            distributed.process_group(args.device, threads=args.threads or 0) as job:
        result = bench.benchmark(args.model, batch_size=args.batch_size, infer_batch_size=args.infer_batch_size,
                                 precision=args.precision, steps=args.steps, windows=args.windows,
                                 warmup=args.warmup, recipe=args.recipe, device=args.device, threads=args.threads,
                                 train=not args.no_train, infer=not args.no_infer, peak=not args.no_peak,
                                 quiet=not job.is_main, world_size=job.world_size, kernels=args.kernels)
    if not job.is_main:
        return 0
    print(json.dumps(result) if args.json else format_bench_result(result))
    return 0


def _run_text_bench(args: argparse.Namespace) -> int:
    from . import text_bench  # as `bench`: only when it runs
    if args.procs not in (None, 1):
        raise CCTError("--procs is not supported for text models yet")
    if args.vocab_size is not None and args.vocab_size < 3:
        raise ValueError(f"--vocab-size must be at least 3, got {args.vocab_size}")
    result = text_bench.benchmark_text(
        args.model, batch_size=args.batch_size, infer_batch_size=args.infer_batch_size, precision=args.precision,
        steps=args.steps, windows=args.windows, warmup=args.warmup, length=args.seq_len,
        fixed_length=args.fixed_length, vocab_size=args.vocab_size, device=args.device, threads=args.threads,
        train=not args.no_train, infer=not args.no_infer, peak=not args.no_peak, quiet=False, kernels=args.kernels,
        recipe=args.recipe)
    print(json.dumps(result) if args.json else format_bench_result(result))
    return 0


def format_bench_result(r: dict) -> str:
    """`cct bench`'s report for a person (`--json` prints the dict itself)."""
    unit = "sequences" if "gflops_per_sequence_forward" in r else "images"
    cost = r.get("gflops_per_sequence_forward", r.get("gflops_per_image_forward"))
    lines = [f"{r['model']} ({r['params']:,} parameters, {cost:.4f} GFLOP/{unit[:-1]} forward), "
             f"{r['precision']} on {r['device']}, " + (f"{r['procs']} processes of " if r.get("procs", 1) > 1 else "")
             + f"{r['threads']} threads"]
    peak = r.get("gemm_peak_gflops")
    for kind, batch in (("train", r["batch_size"]), ("infer", r["infer_batch_size"])):
        if f"{kind}_{unit}_per_second" not in r:
            continue
        shape = f"{batch} × {r['seq_len']} tokens" if unit == "sequences" else f"{batch}"
        line = (f"{'training' if kind == 'train' else 'inference'} batch {shape}: "
                f"{r[f'{kind}_{unit}_per_second']:,.0f} {unit}/s, {r[f'{kind}_gflops']:.0f} GFLOP/s")
        if peak:
            line += f" ({100 * r[f'{kind}_share_of_peak']:.0f}% of the {peak:.0f} GFLOP/s GEMM peak)"
        lines.append(line)
    memory = r["peak_memory_mb"]
    lines.append(f"peak memory {memory:.0f} MB" if memory is not None else "peak memory unknown on this platform")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit status 2, as for every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cct", description="Compact Convolutional Transformers: train, evaluate, export.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"cct {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("models", help="list the registered models with their size and cost")
    p.add_argument("pattern", nargs="?", help="glob on model names, e.g. 'cct_7*'")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count (faster)")
    p.set_defaults(func=_models)

    p = sub.add_parser("import-keras", help="convert the Keras example's .weights.h5 into a cct checkpoint")
    p.add_argument("weights", metavar="WEIGHTS.h5")
    p.add_argument("--output", required=True, metavar="CKPT")
    p.set_defaults(func=_import_keras)

    _add_train_parser(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    _add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv)  # what `--procs` workers are started with
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader gone is then seen here, not in the interpreter's exit
        return code
    except (CCTError, ValueError, FileNotFoundError) as e:
        if debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"cct {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"cct {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader left (`cct eval --json | head`): stop quietly, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a writer its pipe cut off
    except OSError as e:  # a file the commands do not check themselves (permissions, a device): its one line
        if debug:
            raise
        where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
        print(f"cct {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
