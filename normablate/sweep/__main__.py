"""``python -m normablate.sweep ...`` (the same as ``normablate sweep ...``)."""
import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
