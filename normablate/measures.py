"""Run measures a pre-registered hypothesis may contrast besides a task's test metrics (torch-free).

A hypothesis names a metric (``contrast.metric`` in a sweep spec; ``normablate.sweep.hypotheses``). Besides the
task's own test-split metrics (``test/acc``, ``test/loss``, ``test/ppl``) it may name one of these, each measured
by every run whose config turns its instrument on (checked for every grid point before any run starts):

==============================  =========  =================================================================
measure                         direction  what it is (per run)
==============================  =========  =================================================================
``test/train_eval_gap``         minimize   test-split loss with BN's running statistics − with batch statistics
                                           (eval mode vs train-mode BN on the same weights; needs
                                           ``trainer.batchstat_gap`` every or final)
``test/train_eval_gap_precise`` minimize   the same gap once the running statistics are recomputed exactly
                                           (PreciseBN; needs also ``trainer.precise_bn`` > 0)
``probe/loss_range``            minimize   loss variation along the gradient (Santurkar et al. 2018, Sec. 3.1,
                                           Fig. 4a), mean over the run's probed steps (``probes.landscape``)
``probe/grad_pred``             minimize   gradient predictiveness ||grad(x - eta g) - g|| (ibid., Fig. 4b)
``probe/beta``                  minimize   effective beta-smoothness (ibid., Fig. 4c)
``probe/ics_l2``                minimize   internal covariate shift, ||G - G'|| (ibid., Def. 2.1), mean over the
                                           probed layers (but the first: 0 by construction) and steps
                                           (``probes.ics``)
``probe/ics_cos``               maximize   cos(G, G') of the same (1: no shift)
==============================  =========  =================================================================

The gaps are measured on the test split at the end of a run, like every test metric (and on the validation split at
each validation, ``val/train_eval_gap``). A run whose model has no batch-statistics norm (LN, GN, none...) records
a test gap of exactly 0 when its ``trainer.batchstat_gap`` is on: eval and train mode compute the same function.
The probe measures are statistics of the training trajectory (the loss landscape *at the training batches*, as
the source measures it), not of held-out data. For every measure a best-LR choice is made on the study's own
metric (validation), never on the measure. A run stopped as diverged counts with its test gap (the model as it
stopped, like every test metric at a fixed configuration) but is left out of a probe measure: its probe mean
covers only the steps before it diverged, not comparable with a whole run's. The ICS layer mean leaves out the
layers whose ICS is 0 by construction (``ics_layers``: the first weight layer).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Measure:
    name: str
    direction: str  # "maximize" | "minimize": which way is the "improvement" of a contrast
    source: str  # "test": the run's test metrics; "probes": the mean of its probe series (layer mean for per-layer)
    needs: tuple[tuple[str, Callable[[Any], bool], str], ...]  # (config key, test of its value, what it must be)
    what: str  # one line, for the list of valid metrics in an error


def _on(v: Any) -> bool:
    return bool(v)


def _gap_on(v: Any) -> bool:
    return v in ("every", "final")


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


_GAP = (("trainer.batchstat_gap", _gap_on, "every or final"),)
_LAND = (("probes.enabled", _on, "true"), ("probes.landscape", _on, "true"))
_ICS = (("probes.enabled", _on, "true"), ("probes.ics", _on, "true"))

MEASURES: dict[str, Measure] = {m.name: m for m in (
    Measure("test/train_eval_gap", "minimize", "test", _GAP, "test loss with running − with batch statistics"),
    Measure("test/train_eval_gap_precise", "minimize", "test",
            _GAP + (("trainer.precise_bn", _positive, "> 0"),), "the same gap after PreciseBN"),
    Measure("probe/loss_range", "minimize", "probes", _LAND, "loss variation along the gradient"),
    Measure("probe/grad_pred", "minimize", "probes", _LAND, "gradient predictiveness ||Δ∇L||"),
    Measure("probe/beta", "minimize", "probes", _LAND, "effective β-smoothness"),
    Measure("probe/ics_l2", "minimize", "probes", _ICS, "internal covariate shift ||G − G'||, layer mean"),
    Measure("probe/ics_cos", "maximize", "probes", _ICS, "cos(G, G'), layer mean"),
)}


def get(name: str) -> Measure | None:
    return MEASURES.get(name)


def unmet(measure: Measure, value_of: Callable[[str], Any]) -> list[str]:
    """The requirements of ``measure`` a run config does not meet (``value_of``: dotted key -> the config's
    value), each as ``key=value (must be ...)``; empty when the run measures it."""
    out = []
    for key, ok, want in measure.needs:
        v = value_of(key)
        if not ok(v):
            out.append(f"{key}={v!r} (must be {want})")
    return out


def ics_layers(summary: Mapping[str, Any]) -> list[str]:
    """The probed layers whose ICS carries information: every layer with a ``probe/ics_l2/<layer>`` mean but those
    at exactly 0, i.e. a layer with no parameter before it (the first), whose ICS is 0 and cosine 1 by
    construction (``probes/ics.py``): averaging it in would shrink every contrast of the layer mean."""
    pre = "probe/ics_l2/"
    return [k[len(pre):] for k, v in summary.items() if k.startswith(pre) and v is not None and float(v) != 0.0]


def probe_value(name: str, summary: Mapping[str, Any]) -> float | None:
    """A run's value of probe measure ``name`` from its probe summary (``RunResult.probes``: the mean over probed
    steps of each ``probe/...`` series): the series itself, or for the per-layer ICS series (``probe/ics_l2/<layer>``,
    ``probe/ics_cos/<layer>``) the mean over ``ics_layers``; None when the run has none (or a non-finite one)."""
    if name in summary:
        return None if summary[name] is None else float(summary[name])
    vals = [summary.get(f"{name}/{layer}") for layer in ics_layers(summary)]
    vals = [float(v) for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


__all__ = ["MEASURES", "Measure", "get", "ics_layers", "probe_value", "unmet"]
