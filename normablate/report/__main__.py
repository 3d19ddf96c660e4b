"""``python -m normablate.report --study S ...`` (the same as ``normablate report``)."""
import argparse
import sys

from ..errors import NormablateError
from . import add_report_arguments, cmd_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normablate.report", description="Report of a sweep.")
    add_report_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_report(args)
    except NormablateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
