"""``python -m normablate.report ...`` (the same as ``normablate report ...``)."""
import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
