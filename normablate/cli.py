"""Command line: thin. Parse, validate, call ``train`` / ``sweep`` / ``report`` / ``bench``."""
from __future__ import annotations

import argparse
import sys

from . import models, norms


def cmd_list(args: argparse.Namespace) -> int:
    print("norms:")
    for name in norms.available():
        print(f"  {name:<12} options: {', '.join(norms.options(name)) or '-'}")
    print("backbones:")
    for name in models.available():
        opts = ", ".join(f"{k}={v!r}" for k, v in models.options(name).items())
        print(f"  {name:<15} [{models.layout(name)}] {opts}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normablate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list registered norms and backbones with their options")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
