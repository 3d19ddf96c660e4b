"""``python -m normablate.sweep --config SPEC ...`` (the same as ``normablate sweep``)."""
import argparse
import sys

from ..errors import NormablateError
from .cli import add_sweep_arguments, cmd_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normablate.sweep", description="Run an ablation sweep.")
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_sweep(args)
    except NormablateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
