"""``python -m mcompile.tools.eval [options]``: the same as ``mcompile eval [options]``."""

import argparse
import sys

from .cli import add_commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcompile.tools.eval")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
