"""The `cct` command: subcommands, each a thin layer over a library function.

Each module that owns a subcommand exposes `add_parser(subparsers)`, which registers its
arguments and sets `func` (a function of the parsed args returning an exit code). Problems with
the user's input (`CCTError`, and the `ValueError`s that library code raises for bad
arguments) become one line on stderr and exit status 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import CCTError

# subcommand modules, in the order `cct --help` lists them
COMMAND_MODULES = ["cct.train", "cct.evaluate", "cct.predict", "cct.export", "cct.explain", "cct.bench"]


def _models(args: argparse.Namespace) -> int:
    from .model import count_macs, num_params
    from .registry import create_model, list_models
    names = list_models(args.pattern)
    if not names:
        raise CCTError(f"no model matches {args.pattern!r}")
    rows = []
    for name in names:
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
    return 0


def _import_keras(args: argparse.Namespace) -> int:
    from .checkpoint import save_checkpoint
    from .interop.keras import from_keras
    model = from_keras(args.weights)
    save_checkpoint(model, args.output)
    print(f"wrote {args.output} ({model.name}, from {args.weights})", file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit status 2, as for every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cct", description="Compact Convolutional Transformers: train, evaluate, export.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    from . import __version__
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

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # a subcommand not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv)  # what `--procs` workers are started with
    try:
        return int(args.func(args) or 0)
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


if __name__ == "__main__":
    sys.exit(main())
