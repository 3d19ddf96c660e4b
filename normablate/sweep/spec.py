"""Sweep specs: a base run config, axes (grids over config keys), a study kind and its options.

A spec is YAML (or a dict). Every key is checked; every grid point is turned into a full run config and
validated with ``normablate.config.from_dict`` before any trial runs, so a typo fails in a second, not after
an hour of training. Example (``configs/sweeps/quick.yaml``)::

    kind: lr_sensitivity            # lr_sensitivity | batch_size | convergence | search | grid
    base: ../runs/quick_synthetic.yaml   # run config (path relative to this file) or an inline mapping
    metric: val/acc                 # the objective; direction follows (acc: maximize, loss/ppl: minimize)
    overrides:                      # dotted config keys applied to every trial
      trainer.max_steps: 100
    grid:                           # crossed axes: dotted config key -> list of values
      model.norm: [bn, ln, rms, none]
      optim.lr: {logspace: [0.01, 1.0, 3]}
      seed: [0, 1]
    tolerance: 0.05                 # lr_sensitivity: LRs within 0.05 of the best count as usable
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, from_dict, load_yaml, parse_overrides, set_dotted, to_dict
from ..errors import ConfigError, closest

KINDS = ("lr_sensitivity", "batch_size", "convergence", "search", "grid")

COMMON_KEYS = ("kind", "base", "study_name", "metric", "direction", "metric_at", "overrides", "grid",
               "pruner", "log_dir", "storage", "trainer_fn", "heartbeat", "description")
KIND_KEYS = {
    "lr_sensitivity": ("tolerance", "tolerance_relative"),
    "batch_size": ("lr_scaling", "base_batch_size", "budget"),
    "convergence": ("target",),
    "search": ("search_space", "n_trials", "sampler"),
    "grid": (),
}
PRUNERS = ("none", "median", "percentile", "hyperband", "successive_halving")
SAMPLERS = ("tpe", "random")
DEFAULT_TRAINER = "normablate.train:train"
DRYRUN_TRAINER = "normablate.sweep.dryrun:train"

# Axis column names in tables: the last part of the key, except where that would be ambiguous.
SHORT_NAMES = {"model.norm": "norm", "optim.lr": "lr", "data.batch_size": "batch_size", "seed": "seed",
               "model.backbone": "backbone"}


def short_name(key: str) -> str:
    return SHORT_NAMES.get(key, key.split(".")[-1])


def value_label(v: Any) -> str:
    """Readable label of an axis value: ``bn``, ``0.1``, ``bn(momentum=0.01)``."""
    if isinstance(v, dict):
        v = dict(v)
        name = v.pop("name", "?")
        return f"{name}(" + ",".join(f"{k}={value_label(x)}" for k, x in sorted(v.items())) + ")" if v else str(name)
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(value_label(x) for x in v) + "]"
    return str(v)


def encode(v: Any) -> Any:
    """An axis value as an Optuna categorical choice (None/bool/int/float/str); mappings and lists as JSON."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return "json:" + json.dumps(v, sort_keys=True)


def decode(v: Any) -> Any:
    if isinstance(v, str) and v.startswith("json:"):
        return json.loads(v[5:])
    return v


def norm_label(norm: Any) -> str:
    return value_label(norm)


@dataclass
class Axis:
    key: str  # dotted config key, e.g. "optim.lr"
    values: list  # raw values, in the spec's order
    name: str = ""  # column name in tables ("lr")

    def __post_init__(self) -> None:
        self.name = self.name or short_name(self.key)

    @property
    def choices(self) -> list:
        return [encode(v) for v in self.values]


@dataclass
class Point:
    """One grid point: a value per axis."""

    index: int
    values: dict[str, Any]  # axis key -> raw value

    def labels(self, axes: list[Axis]) -> dict[str, str]:
        return {a.name: value_label(self.values[a.key]) for a in axes}

    def label(self, axes: list[Axis]) -> str:
        return " ".join(f"{k}={v}" for k, v in self.labels(axes).items()) or "all"

    def slug(self, axes: list[Axis]) -> str:
        """Compact file-name-safe label: ``bn-lr0.1-s0``."""
        parts = []
        for a in axes:
            lab = value_label(self.values[a.key])
            prefix = {"norm": "", "seed": "s", "lr": "lr", "batch_size": "bs", "backbone": ""}.get(a.name, a.name)
            parts.append(prefix + lab)
        slug = "-".join(parts) or "run"
        return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in slug)[:80]


@dataclass
class SweepSpec:
    kind: str
    study_name: str
    base: dict[str, Any]  # the resolved base run config (a to_dict-like nested mapping)
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, for every trial
    axes: list[Axis] = field(default_factory=list)
    metric: str = "val/acc"
    direction: str = "maximize"
    metric_at: str = "final"  # "final" or "best" value of the metric over the run's validations
    log_dir: str = "lightning_logs"
    storage: str | None = None
    trainer_fn: str = DEFAULT_TRAINER
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    heartbeat: dict[str, float] = field(default_factory=lambda: {"interval": 10, "grace": 120, "max_retry": 3})
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific keys
    description: str = ""
    source: str | None = None  # the YAML file it came from

    # ------------------------------------------------------------------ grid
    def points(self) -> list[Point]:
        """The crossed grid (for ``search``: the groups, each with its own search)."""
        combos = itertools.product(*[a.values for a in self.axes]) if self.axes else [()]
        return [Point(i, {a.key: copy.deepcopy(v) for a, v in zip(self.axes, combo)})
                for i, combo in enumerate(combos)]

    @property
    def n_trials(self) -> int:
        return int(self.options.get("n_trials", 0))

    @property
    def total(self) -> int:
        """Trials the sweep runs in all."""
        n = len(self.points())
        return n * self.n_trials if self.kind == "search" else n

    def group_study_name(self, point: Point) -> str:
        """``search``: each group (grid point, e.g. each norm) is its own Optuna study with its own sampler."""
        return f"{self.study_name}/{point.label(self.axes).replace(' ', ',')}"

    # ------------------------------------------------------------------ configs
    def trial_dict(self, point: Point, params: dict[str, Any] | None = None, run: str | None = None,
                   runtime: dict[str, Any] | None = None) -> dict[str, Any]:
        """The raw run config of one trial: base + sweep defaults + overrides + grid point + search params,
        then the kind's rule (batch_size: LR scaling and budget; convergence: the target)."""
        d = copy.deepcopy(self.base)
        trainer = d.setdefault("trainer", {})
        trainer.setdefault("progress", False)  # one line per trial instead of bars from every worker
        for key, value in (runtime or {}).items():  # e.g. threads per worker, only where the spec says nothing
            if _get_dotted(d, key) is None and key not in self.overrides:
                set_dotted(d, key, value)
        for key, value in self.overrides.items():
            set_dotted(d, key, copy.deepcopy(value))
        for key, value in point.values.items():
            set_dotted(d, key, copy.deepcopy(value))
        for key, value in (params or {}).items():
            set_dotted(d, key, value)
        d["trainer"]["log_dir"] = self.log_dir
        d["experiment"] = self.study_name
        if run is not None:
            d["run"] = run
        if self.kind == "batch_size":
            self._apply_batch_rule(d)
        if self.kind == "convergence":
            d["trainer"]["target_metric"] = self.options["target"]["metric"]
            d["trainer"]["target_value"] = float(self.options["target"]["value"])
        return d

    def _apply_batch_rule(self, d: dict[str, Any]) -> None:
        base_bs = int(self.options["base_batch_size"])
        bs = int(_value(d, "data.batch_size"))
        ratio = bs / base_bs
        rule = self.options["lr_scaling"]
        lr = float(_value(d, "optim.lr"))
        scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]
        set_dotted(d, "optim.lr", lr * scale)
        budget = self.options["budget"]
        if "samples" in budget:
            steps = max(1, math.ceil(int(budget["samples"]) / bs))
            # validate and warm up after the same number of samples at every batch size
            for key in ("trainer.val_every", "optim.warmup_steps"):  # config defaults included
                v = int(_value(d, key))
                if v:
                    set_dotted(d, key, max(1, round(v * base_bs / bs)))
        else:
            steps = int(budget["steps"])
        set_dotted(d, "trainer.max_steps", steps)

    def search_params_for_validation(self) -> list[dict[str, Any]]:
        """Corners of the search space (all lows, all highs, each categorical choice) to validate up front."""
        space = self.options.get("search_space") or {}
        lows = {k: (s["choices"][0] if "choices" in s else s["low"]) for k, s in space.items()}
        highs = {k: (s["choices"][-1] if "choices" in s else s["high"]) for k, s in space.items()}
        out = [lows, highs]
        for k, s in space.items():
            for c in s.get("choices", []):
                out.append({**lows, k: c})
        return out

    def validate_all(self) -> int:
        """Build and validate the run config of every grid point (and search-space corner). Returns the count."""
        n = 0
        for point in self.points():
            for params in (self.search_params_for_validation() if self.kind == "search" else [None]):
                try:
                    from_dict(self.trial_dict(point, params, run="validate"))
                except ConfigError as e:
                    where = point.label(self.axes) + (f" with {params}" if params else "")
                    raise ConfigError(f"sweep {self.study_name!r}: grid point [{where}]: {e}") from None
                n += 1
        return n

    # ------------------------------------------------------------------ identity
    def to_json(self) -> dict[str, Any]:
        """The normalized spec (what defines the experiment; stored in the study, compared on re-runs)."""
        return {
            "kind": self.kind, "study_name": self.study_name, "base": self.base, "overrides": self.overrides,
            "grid": {a.key: a.values for a in self.axes}, "metric": self.metric, "direction": self.direction,
            "metric_at": self.metric_at, "log_dir": self.log_dir, "trainer_fn": self.trainer_fn,
            "pruner": self.pruner, "options": self.options, "description": self.description,
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, d: dict[str, Any], **extra: Any) -> SweepSpec:
        axes = [Axis(k, list(v)) for k, v in d["grid"].items()]
        return cls(kind=d["kind"], study_name=d["study_name"], base=d["base"], overrides=d["overrides"], axes=axes,
                   metric=d["metric"], direction=d["direction"], metric_at=d["metric_at"], log_dir=d["log_dir"],
                   trainer_fn=d["trainer_fn"], pruner=d["pruner"], options=d["options"],
                   description=d.get("description", ""), **extra)


# ---------------------------------------------------------------------- loading and checking
def _value(d: dict, key: str) -> Any:
    """``key`` from the trial dict, else the run config's default for it."""
    v = _get_dotted(d, key)
    return _get_dotted(to_dict(RunConfig()), key) if v is None else v


def _get_dotted(d: dict, key: str) -> Any:
    cur: Any = d
    for p in key.split("."):
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    hint = closest(key, valid)
    return ConfigError(f"unknown key {key!r} in {where}; valid: {', '.join(valid)}"
                       + (f" (did you mean {hint!r}?)" if hint else ""))


def _axis_values(key: str, raw: Any) -> list:
    """A grid axis: a list, or ``{logspace: [low, high, num]}`` / ``{linspace: [low, high, num]}``."""
    if isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in ("logspace", "linspace"):
        how, args = next(iter(raw.items()))
        if not (isinstance(args, list) and len(args) == 3):
            raise ConfigError(f"grid axis {key!r}: {how} takes [low, high, num], got {args!r}")
        lo, hi, num = float(args[0]), float(args[1]), int(args[2])
        if num < 1 or (how == "logspace" and (lo <= 0 or hi <= 0)):
            raise ConfigError(f"grid axis {key!r}: {how} needs num >= 1" + (" and low, high > 0" if how == "logspace"
                                                                              else ""))
        if num == 1:
            return [lo]
        if how == "logspace":
            vals = [10 ** (math.log10(lo) + i * (math.log10(hi) - math.log10(lo)) / (num - 1)) for i in range(num)]
        else:
            vals = [lo + i * (hi - lo) / (num - 1) for i in range(num)]
        return [float(f"{v:.4g}") for v in vals]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"grid axis {key!r} must be a non-empty list of values (or {{logspace: [low, high, num]}}),"
                          f" got {raw!r}")
    seen = set()
    for v in raw:
        enc = json.dumps(v, sort_keys=True, default=str)
        if enc in seen:
            raise ConfigError(f"grid axis {key!r} lists {v!r} twice")
        seen.add(enc)
    return list(raw)


def _metric_default(task: str) -> str:
    return "val/acc" if task == "classification" else "val/ppl"


def load_spec(spec: str | Path | dict[str, Any], overrides: list[str] | dict[str, Any] | None = None,
              study_name: str | None = None, dry_run: bool = False) -> SweepSpec:
    """Read and check a sweep spec (a YAML path or a mapping); validate every grid point's run config.

    ``overrides`` (``["trainer.max_steps=20", ...]`` or a dict) apply to every trial, after the spec's own.
    ``dry_run`` swaps the trainer for ``normablate.sweep.dryrun:train`` (instant fake runs; study name + "-dryrun").
    """
    source = None
    if isinstance(spec, (str, Path)):
        source = Path(spec)
        raw = load_yaml(source)
    elif isinstance(spec, dict):
        raw = copy.deepcopy(spec)
    else:
        raise ConfigError(f"a sweep spec must be a YAML path or a mapping, got {type(spec).__name__}")
    where = f"sweep spec {str(source)!r}" if source else "sweep spec"

    kind = raw.get("kind")
    if kind not in KINDS:
        hint = closest(str(kind), KINDS)
        raise ConfigError(f"{where}: kind={kind!r} is not a study kind; valid: {', '.join(KINDS)}"
                          + (f" (did you mean {hint!r}?)" if hint else ""))
    valid = list(COMMON_KEYS) + list(KIND_KEYS[kind])
    for key in raw:
        if key not in valid:
            other = [k for k, keys in KIND_KEYS.items() if key in keys]
            if other:
                raise ConfigError(f"{where}: key {key!r} belongs to kind {other[0]!r}, not {kind!r}")
            raise _unknown_key(key, valid, where)

    # base run config
    base_raw = raw.get("base", {})
    if isinstance(base_raw, str):  # relative to the spec file (else to the working directory)
        base_path = Path(base_raw)
        if not base_path.is_absolute() and source is not None and (source.parent / base_path).exists():
            base_path = source.parent / base_path
        base = load_yaml(base_path)
    elif isinstance(base_raw, dict):
        base = copy.deepcopy(base_raw)
    else:
        raise ConfigError(f"{where}: base must be a run-config path or a mapping, got {base_raw!r}")
    base_cfg = from_dict(base)  # a bad base config fails here, with the key named
    task = base_cfg.task or "classification"

    # overrides for every trial
    ov = raw.get("overrides") or {}
    if not isinstance(ov, dict):
        raise ConfigError(f"{where}: overrides must be a mapping of dotted config keys to values")
    ov = dict(ov)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    ov.update(overrides or {})

    grid_raw = raw.get("grid") or {}
    if not isinstance(grid_raw, dict):
        raise ConfigError(f"{where}: grid must be a mapping of dotted config keys to lists of values")
    axes = [Axis(str(k), _axis_values(str(k), v)) for k, v in grid_raw.items()]
    names = [a.name for a in axes]
    for a in axes:  # ambiguous short names fall back to the full key
        if names.count(a.name) > 1:
            a.name = a.key
    for a in axes:
        if a.key in ("experiment", "run") or a.key.startswith("trainer.log_dir"):
            raise ConfigError(f"{where}: grid axis {a.key!r} is set by the sweep itself and cannot be swept")

    metric = raw.get("metric") or _metric_default(task)
    allowed = ("val/acc", "val/loss") if task == "classification" else ("val/ppl", "val/loss")
    if metric not in allowed:
        raise ConfigError(f"{where}: metric={metric!r} is not allowed for task {task!r}; valid: {', '.join(allowed)}")
    direction = raw.get("direction") or ("maximize" if metric.endswith("acc") else "minimize")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"{where}: direction={direction!r}; valid: maximize, minimize")
    metric_at = raw.get("metric_at", "final")
    if metric_at not in ("final", "best"):
        raise ConfigError(f"{where}: metric_at={metric_at!r}; valid: final, best")

    log_dir = str(ov.pop("trainer.log_dir", None) or raw.get("log_dir") or base.get("trainer", {}).get("log_dir")
                  or "lightning_logs")
    name = study_name or raw.get("study_name") or (source.stem if source else None)
    if not name:
        raise ConfigError(f"{where}: no study name; give study_name in the spec or --study-name")
    trainer_fn = raw.get("trainer_fn", DEFAULT_TRAINER)
    if dry_run:
        trainer_fn = DRYRUN_TRAINER
        if not study_name:
            name = f"{name}-dryrun"
    if not isinstance(trainer_fn, str) or ":" not in trainer_fn:
        raise ConfigError(f"{where}: trainer_fn={trainer_fn!r} must be 'package.module:function'")

    pruner = _check_pruner(raw.get("pruner"), where)
    heartbeat = {"interval": 10, "grace": 120, "max_retry": 3}
    hb = raw.get("heartbeat") or {}
    if not isinstance(hb, dict):
        raise ConfigError(f"{where}: heartbeat must be a mapping (interval, grace, max_retry)")
    for k, v in hb.items():
        if k not in heartbeat:
            raise _unknown_key(k, list(heartbeat), f"{where} heartbeat")
        if not isinstance(v, (int, float)) or v < (0 if k == "max_retry" else 1):
            raise ConfigError(f"{where}: heartbeat.{k}={v!r} must be a number >= {0 if k == 'max_retry' else 1}")
        heartbeat[k] = v
    if heartbeat["grace"] <= heartbeat["interval"]:
        raise ConfigError(f"{where}: heartbeat.grace ({heartbeat['grace']}) must exceed heartbeat.interval "
                          f"({heartbeat['interval']})")

    options = _check_kind_options(kind, raw, axes, base, ov, where, task)
    spec_obj = SweepSpec(kind=kind, study_name=str(name), base=base, overrides=ov, axes=axes, metric=metric,
                         direction=direction, metric_at=metric_at, log_dir=log_dir, storage=raw.get("storage"),
                         trainer_fn=trainer_fn, pruner=pruner, heartbeat=heartbeat, options=options,
                         description=str(raw.get("description", "")), source=str(source) if source else None)
    spec_obj.validate_all()
    return spec_obj


def _check_pruner(p: Any, where: str) -> dict[str, Any]:
    if p is None:
        return {"name": "none"}
    if isinstance(p, str):
        p = {"name": p}
    if not isinstance(p, dict) or p.get("name") not in PRUNERS:
        name = p.get("name") if isinstance(p, dict) else p
        hint = closest(str(name), PRUNERS)
        raise ConfigError(f"{where}: pruner {name!r} is not known; valid: {', '.join(PRUNERS)}"
                          + (f" (did you mean {hint!r}?)" if hint else ""))
    try:
        make_pruner(p, max_steps=100)
    except TypeError as e:
        raise ConfigError(f"{where}: pruner {p}: {e}") from None
    return dict(p)


def make_pruner(p: dict[str, Any], max_steps: int):
    """An Optuna pruner from ``{name: median, n_startup_trials: 5, n_warmup_steps: 100, ...}``.

    Pruners compare a trial's validation metric with other trials *at the same step* (steps = optimizer steps).
    """
    import optuna

    kw = {k: v for k, v in p.items() if k != "name"}
    name = p["name"]
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(**kw)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(**kw)
    if name == "hyperband":
        kw.setdefault("max_resource", max_steps)
        return optuna.pruners.HyperbandPruner(**kw)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**kw)
    raise ConfigError(f"unknown pruner {name!r}")


def make_sampler(s: dict[str, Any]):
    import optuna

    kw = {k: v for k, v in s.items() if k != "name"}
    if s["name"] == "tpe":
        return optuna.samplers.TPESampler(**kw)
    return optuna.samplers.RandomSampler(**kw)


def _check_kind_options(kind: str, raw: dict, axes: list[Axis], base: dict, ov: dict, where: str,
                        task: str) -> dict[str, Any]:
    keys = {a.key for a in axes}
    opts: dict[str, Any] = {}
    if kind == "lr_sensitivity":
        if "optim.lr" not in keys:
            raise ConfigError(f"{where}: kind lr_sensitivity needs a grid axis 'optim.lr' "
                              f"(e.g. optim.lr: {{logspace: [0.001, 1.0, 7]}})")
        tol = raw.get("tolerance", 0.05 if task == "classification" else 0.1)
        if not isinstance(tol, (int, float)) or tol < 0:
            raise ConfigError(f"{where}: tolerance={tol!r} must be a number >= 0")
        rel = raw.get("tolerance_relative", False)
        if not isinstance(rel, bool):
            raise ConfigError(f"{where}: tolerance_relative must be true or false")
        opts.update(tolerance=float(tol), tolerance_relative=rel)
    elif kind == "batch_size":
        if "data.batch_size" not in keys:
            raise ConfigError(f"{where}: kind batch_size needs a grid axis 'data.batch_size'")
        rule = raw.get("lr_scaling", "none")
        if rule not in ("none", "linear", "sqrt"):
            hint = closest(str(rule), ["none", "linear", "sqrt"])
            raise ConfigError(f"{where}: lr_scaling={rule!r}; valid: none, linear, sqrt"
                              + (f" (did you mean {hint!r}?)" if hint else ""))
        base_bs = raw.get("base_batch_size", ov.get("data.batch_size", base.get("data", {}).get("batch_size", 128)))
        if not isinstance(base_bs, int) or base_bs < 1:
            raise ConfigError(f"{where}: base_batch_size={base_bs!r} must be an integer >= 1")
        budget = raw.get("budget")
        if budget is None:
            steps = ov.get("trainer.max_steps", base.get("trainer", {}).get("max_steps", 500))
            budget = {"samples": int(steps) * base_bs}
        if not (isinstance(budget, dict) and len(budget) == 1 and next(iter(budget)) in ("samples", "steps")
                and isinstance(next(iter(budget.values())), int) and next(iter(budget.values())) >= 1):
            raise ConfigError(f"{where}: budget must be {{samples: N}} or {{steps: N}} with N >= 1, got {budget!r}")
        opts.update(lr_scaling=rule, base_batch_size=base_bs, budget=dict(budget))
    elif kind == "convergence":
        target = raw.get("target")
        metrics = ("val/acc", "val/loss") if task == "classification" else ("val/ppl", "val/loss")
        if not isinstance(target, dict) or set(target) != {"metric", "value"}:
            raise ConfigError(f"{where}: kind convergence needs target: {{metric: {metrics[0]}, value: ...}}")
        if target["metric"] not in metrics:
            raise ConfigError(f"{where}: target.metric={target['metric']!r}; valid: {', '.join(metrics)}")
        if not isinstance(target["value"], (int, float)):
            raise ConfigError(f"{where}: target.value={target['value']!r} must be a number")
        opts.update(target={"metric": target["metric"], "value": float(target["value"])})
    elif kind == "search":
        space = raw.get("search_space")
        if not isinstance(space, dict) or not space:
            raise ConfigError(f"{where}: kind search needs search_space: {{optim.lr: {{low: 1.0e-3, high: 1.0, "
                              f"log: true}}, ...}}")
        clean = {}
        for key, s in space.items():
            if key in keys:
                raise ConfigError(f"{where}: {key!r} is both a grid axis and in search_space")
            clean[key] = _check_dist(key, s, where)
        n = raw.get("n_trials")
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"{where}: kind search needs n_trials (trials per group, >= 1), got {n!r}")
        sampler = raw.get("sampler") or {"name": "tpe"}
        if isinstance(sampler, str):
            sampler = {"name": sampler}
        if not isinstance(sampler, dict) or sampler.get("name") not in SAMPLERS:
            raise ConfigError(f"{where}: sampler {sampler!r} is not known; valid: {', '.join(SAMPLERS)}")
        sampler = dict(sampler)
        sampler.setdefault("seed", 0)
        if sampler["name"] == "tpe":
            sampler.setdefault("constant_liar", True)  # parallel workers do not all try the same point
        try:
            make_sampler(sampler)
        except TypeError as e:
            raise ConfigError(f"{where}: sampler {sampler}: {e}") from None
        opts.update(search_space=clean, n_trials=n, sampler=sampler)
    return opts


def _check_dist(key: str, s: Any, where: str) -> dict[str, Any]:
    if not isinstance(s, dict):
        raise ConfigError(f"{where}: search_space.{key} must be a mapping ({{low, high, log}} or {{choices}})")
    if "choices" in s:
        if set(s) != {"choices"} or not isinstance(s["choices"], list) or not s["choices"]:
            raise ConfigError(f"{where}: search_space.{key}: a categorical takes only a non-empty 'choices' list")
        return {"choices": list(s["choices"])}
    allowed = {"low", "high", "log", "type", "step"}
    for k in s:
        if k not in allowed:
            raise _unknown_key(k, sorted(allowed | {"choices"}), f"{where} search_space.{key}")
    if "low" not in s or "high" not in s:
        raise ConfigError(f"{where}: search_space.{key} needs low and high")
    typ = s.get("type", "int" if isinstance(s["low"], int) and isinstance(s["high"], int) and not s.get("log")
                else "float")
    if typ not in ("float", "int"):
        raise ConfigError(f"{where}: search_space.{key}.type={typ!r}; valid: float, int")
    try:
        low, high = (float(s["low"]), float(s["high"])) if typ == "float" else (int(s["low"]), int(s["high"]))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: search_space.{key}: low/high must be numbers") from None
    if not low < high or (s.get("log") and low <= 0):
        raise ConfigError(f"{where}: search_space.{key}: need low < high" + (" and low > 0 (log)" if s.get("log")
                                                                               else ""))
    out = {"type": typ, "low": low, "high": high, "log": bool(s.get("log", False))}
    if s.get("step") is not None:
        out["step"] = s["step"]
    return out


def spec_yaml(spec: SweepSpec) -> str:
    return yaml.safe_dump(spec.to_json(), sort_keys=False)
