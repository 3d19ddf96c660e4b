"""``python -m normablate.sweep.ddp_rank JOB.json``: the command every rank of a sweep's DDP trial runs.

A module of its own (not ``ddp_trial``, which the package imports) so that ``runpy`` executes a module that is
not already in ``sys.modules`` (it warns otherwise). See ``ddp_trial.py`` for what the ranks do.
"""
import sys

from .ddp_trial import main

if __name__ == "__main__":
    sys.exit(main())
