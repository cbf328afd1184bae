"""The `cct` command's entry point, and `python -m cct`'s: a Ctrl-C while torch and the package load (about a
second) ends the command as one during its work does, "interrupted" and exit status 130, instead of a traceback."""
import os
import sys


def main() -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("cct: interrupted", file=sys.stderr)
        return 130
    code = cli_main()
    from .distributed import LOCAL_WORKER_ENV
    if os.environ.get(LOCAL_WORKER_ENV) == "1":
        # a process `--procs` started (cct.distributed.local_workers): its work is done and its output
        # flushed; skip the interpreter's teardown, in which gloo's threads can abort the process
        # ("terminate called without an active exception") after a perfectly good run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
