"""The `cct` command's entry point: a Ctrl-C while torch and the package load (about a second) ends the command
as one during its work does, "interrupted" and exit status 130, instead of a traceback."""
import sys


def main() -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("cct: interrupted", file=sys.stderr)
        return 130
    return cli_main()
