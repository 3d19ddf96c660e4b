"""``hypotheses:`` in a sweep spec: the claims a study is run to test, written before its first trial.

    hypotheses:
      - id: bn_beats_none
        claim: '"BatchNorm ... enables faster convergence and a wider range of learning rates" (Santurkar et al.
          2018, Sec. 1, Fig. 1)'
        contrast:
          a: {model.norm: bn}           # grid-axis values naming side A
          b: {model.norm: none}
          metric: test/acc              # reported on the test split; selection on the matching val metric; or a
                                        # run measure (normablate.measures: test/train_eval_gap, probe/beta, ...)
          at: best_lr                   # | {fixed: {optim.lr: 0.01}} | {over: data.batch_size}
        type: superiority               # | non_inferiority | equivalence
        margin: 0.02                    # δ, in the metric's units: required for non_inferiority/equivalence
        alpha: 0.05                     # one-sided level of each test (default 0.05; the same for all)

``check`` validates every entry against the grid (a side that matches no grid point, an axis left open, a
margin missing...) with an error naming the key (that the compared runs measure a run measure is checked per
grid point by ``SweepSpec.validate_all``), and returns the normalized list the study stores: it is part
of the spec's fingerprint, so a changed hypothesis is refused for an existing study (a new study is needed).
The statistics are ``normablate.analysis.verdicts``.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from .. import measures, tasks
from ..errors import ConfigError, did_you_mean

TYPES = ("superiority", "non_inferiority", "equivalence")  # (= analysis.verdicts.TYPES; no import: no numpy here)
KEYS = ("id", "claim", "contrast", "type", "margin", "alpha")
CONTRAST_KEYS = ("a", "b", "metric", "at")
LR_KEY = "optim.lr"


def _label(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _in_axis(key: str, value: Any, axes: dict[str, list], where: str) -> Any:
    """``value`` as the grid spells it (an int 1 for 1.0 and so on), or an error listing the axis's values."""
    if key not in axes:
        raise ConfigError(f"{where}: {key!r} is not a grid axis; a contrast names grid-axis values (axes: "
                          f"{', '.join(axes) or 'none'})" + did_you_mean(key, axes))
    for v in axes[key]:
        if _label(v) == _label(value) or (isinstance(v, (int, float)) and isinstance(value, (int, float))
                                          and not isinstance(v, bool) and not isinstance(value, bool)
                                          and math.isclose(float(v), float(value), rel_tol=1e-9)):
            return v
    raise ConfigError(f"{where}: {key}={value!r} matches no grid point; the axis has {axes[key]!r}")


def _side(raw: Any, axes: dict[str, list], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where} must be a non-empty mapping of grid axes to values, e.g. {{model.norm: bn}}")
    return {str(k): _in_axis(str(k), v, axes, f"{where}.{k}") for k, v in raw.items()}


def check(raw: Any, axes: dict[str, list], task: str, grouped: bool, where: str) -> list[dict[str, Any]]:
    """Validate a spec's ``hypotheses`` (``axes``: grid key -> values) and return them normalized."""
    if raw is None:
        return []
    if grouped:
        raise ConfigError(f"{where}: hypotheses need seeds as replicates of one configuration; this study kind "
                          f"draws its configurations (run the best ones over seeds in a grid or lr_sensitivity "
                          f"study and state the hypotheses there)")
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: hypotheses must be a list of mappings ({', '.join(KEYS)})")
    out, ids = [], set()
    for i, h in enumerate(raw):
        w = f"{where}: hypotheses[{i}]"
        if not isinstance(h, dict):
            raise ConfigError(f"{w} must be a mapping with keys {', '.join(KEYS)}")
        for k in h:
            if k not in KEYS:
                raise ConfigError(f"{w}: unknown key {k!r}; valid: {', '.join(KEYS)}" + did_you_mean(k, KEYS))
        hid = h.get("id")
        if not isinstance(hid, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", hid):
            raise ConfigError(f"{w}.id={hid!r} must be a name of letters, digits, '_', '.', '-'")
        if hid in ids:
            raise ConfigError(f"{w}.id={hid!r} is used twice")
        ids.add(hid)
        w = f"{where}: hypothesis {hid!r}"
        claim = h.get("claim")
        if not isinstance(claim, str) or len(claim.strip()) < 10:
            raise ConfigError(f"{w}: claim must quote the claim and name its source (e.g. '\"...\" (Author year, "
                              f"Sec. 3)'), got {claim!r}")
        kind = h.get("type")
        if kind not in TYPES:
            raise ConfigError(f"{w}: type={kind!r}; valid: {', '.join(TYPES)}" + did_you_mean(kind, TYPES))
        margin = h.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not math.isfinite(margin) or margin < 0):
            raise ConfigError(f"{w}: margin={margin!r} must be a number >= 0 (in the metric's units)")
        if kind != "superiority" and not margin:
            what = "no worse" if kind == "non_inferiority" else "equal"
            raise ConfigError(f"{w}: type {kind} needs a margin > 0 (δ in the metric's units: the largest "
                              f"difference that still counts as {what})")
        alpha = h.get("alpha", 0.05)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
            raise ConfigError(f"{w}: alpha={alpha!r} must be a number in (0, 0.5)")
        out.append({"id": hid, "claim": claim.strip(), "type": kind,
                    "margin": float(margin) if margin is not None else None, "alpha": float(alpha),
                    "contrast": _contrast(h.get("contrast"), axes, task, f"{w}: contrast")})
    alphas = sorted({h["alpha"] for h in out})
    if len(alphas) > 1:
        raise ConfigError(f"{where}: hypotheses use alpha {', '.join(f'{a:g}' for a in alphas)}; Holm's adjustment "
                          f"controls the family-wise error at one level, so give them all the same alpha")
    return out


def _contrast(c: Any, axes: dict[str, list], task: str, w: str) -> dict[str, Any]:
    if not isinstance(c, dict):
        raise ConfigError(f"{w} must be a mapping with keys {', '.join(CONTRAST_KEYS)}")
    for k in c:
        if k not in CONTRAST_KEYS:
            raise ConfigError(f"{w}: unknown key {k!r}; valid: {', '.join(CONTRAST_KEYS)}"
                              + did_you_mean(k, CONTRAST_KEYS))
    for k in ("a", "b", "at"):
        if k not in c:
            raise ConfigError(f"{w}.{k} is missing")
    a, b = _side(c["a"], axes, f"{w}.a"), _side(c["b"], axes, f"{w}.b")
    if "seed" in a or "seed" in b:
        raise ConfigError(f"{w}: a side cannot fix 'seed' (seeds are the replicates a contrast is over)")
    if _label(a) == _label(b):
        raise ConfigError(f"{w}: a and b name the same configuration {a!r}")
    allowed = tasks.get(task).test_metrics  # the primary one first
    metric = c.get("metric", allowed[0])
    if metric not in allowed and measures.get(metric) is None:
        raise ConfigError(f"{w}.metric={metric!r}; valid for task {task!r}: {', '.join(allowed)} (reported on the "
                          f"test split; the best LR is chosen on the matching val/ metric), or a run measure: "
                          f"{', '.join(measures.MEASURES)} (normablate.measures)"
                          + did_you_mean(str(metric), [*allowed, *measures.MEASURES]))
    at_raw = c["at"]
    fixed: dict[str, Any] = {}
    over = None
    if at_raw == "best_lr":
        if LR_KEY not in axes:
            raise ConfigError(f"{w}.at=best_lr needs a grid axis {LR_KEY!r}")
        if LR_KEY in a or LR_KEY in b:
            raise ConfigError(f"{w}: at=best_lr chooses {LR_KEY}; a and b cannot fix it")
        at: Any = "best_lr"
    elif isinstance(at_raw, dict) and list(at_raw) == ["fixed"]:
        fixed = _side(at_raw["fixed"], axes, f"{w}.at.fixed")
        if "seed" in fixed:
            raise ConfigError(f"{w}.at.fixed cannot fix 'seed'")
        both = [k for k in fixed if k in a or k in b]
        if both:  # the fixed value would override both sides: A and B would be the same runs
            raise ConfigError(f"{w}.at.fixed fixes {', '.join(map(repr, both))}, which a or b already fix; an axis "
                              f"is fixed either per side (a, b) or for both (at.fixed), not both ways")
        at = {"fixed": fixed}
    elif isinstance(at_raw, dict) and list(at_raw) == ["over"]:
        over = at_raw["over"]
        if over not in axes or over == "seed":
            raise ConfigError(f"{w}.at.over={over!r} must be a grid axis other than seed; axes: {', '.join(axes)}")
        if over in a or over in b:
            raise ConfigError(f"{w}.at.over={over!r}: a and b cannot also fix it")
        at = {"over": over}
    else:
        raise ConfigError(f"{w}.at={at_raw!r}; valid: best_lr, {{fixed: {{axis: value, ...}}}}, {{over: axis}}")
    for name, side in (("a", a), ("b", b)):
        for key, values in axes.items():
            if key == "seed" or len(values) < 2 or key in side or key in fixed or key == over \
                    or (at == "best_lr" and key == LR_KEY):
                continue
            raise ConfigError(f"{w}.{name} leaves grid axis {key!r} open (values {values!r}); fix it in a and b, "
                              f"or in at: {{fixed: {{{key}: ...}}}}")
    return {"a": a, "b": b, "metric": metric, "at": at}


def digest(hypotheses: list[dict[str, Any]]) -> str:
    """A short hash of the normalized hypotheses (stored in the study beside the spec's fingerprint)."""
    return hashlib.sha256(json.dumps(hypotheses, sort_keys=True, default=str).encode()).hexdigest()[:16]
