"""Why norms help: loss-landscape probes and internal covariate shift (Santurkar et al. 2018).

    landscape.py  loss variation, gradient predictiveness, effective beta-smoothness along the gradient
    ics.py        internal covariate shift per layer (the paper's Definition 2.1)
    batchstats.py batch-statistics fluctuation per BN-family layer (Shen et al. 2020, PowerNorm)
    callback.py   ProbeCallback: runs both every ``probes.every`` steps, restoring everything training uses

Enabled from the run config: ``probes: {enabled: true, every: 100, step_sizes: [0.5, 1, 2, 4], layers: null,
batchstats: false}``.
"""
from .batchstats import batch_stats, stat_layers
from .callback import ProbeCallback, summarize, weight_layers
from .ics import ics
from .landscape import landscape, loss_and_grad

__all__ = ["ProbeCallback", "batch_stats", "ics", "landscape", "loss_and_grad", "stat_layers", "summarize",
           "weight_layers"]
