"""Ablation sweeps as Optuna studies: a sweep spec -> trials (one ``train(cfg)`` each) -> trial attributes.

    from normablate.sweep import run_sweep, load_spec
    res = run_sweep("configs/sweeps/quick.yaml", workers=2)   # SweepResult
    res.study()                                               # the optuna.Study

``spec.py``: the spec format; ``runner.py``: how workers share a study (and the modules it composes); study
kinds are plug-ins in ``normablate.studies``.
"""
from .cli import add_sweep_arguments, cmd_sweep
from .runner import Counts, Sweep, SweepResult, run_sweep
from .spec import KINDS, SweepSpec, load_spec

__all__ = ["KINDS", "Counts", "Sweep", "SweepResult", "add_sweep_arguments", "cmd_sweep", "load_spec",
           "run_sweep"]
