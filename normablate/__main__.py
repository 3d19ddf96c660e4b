"""``python -m normablate`` = the ``normablate`` command."""
import sys

from .cli import main

sys.exit(main())
