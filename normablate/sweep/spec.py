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
    hypotheses: [...]               # pre-registered claims and their tests (normablate.sweep.hypotheses)
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .. import measures, studies, tasks
from .. import yamlsafe
from ..config import (RunConfig, budget_layer, build_section, check_path_name, from_dict, load_yaml, parse_overrides,
                      to_dict)
from ..dotted import get_dotted, set_dotted
from ..errors import ConfigError, did_you_mean
from ..labels import value_label
from ..studies.base import SpecContext, StudyKind, encode
from . import hypotheses
from .pruners import check_pruner

KINDS = tuple(studies.available())  # the built-in study kinds (more can be registered: normablate.studies)

DEFAULT_TRAINER = "normablate.train:train"
DRYRUN_TRAINER = "normablate.sweep.dryrun:train"

# Axis column names in tables: the last part of the key, except where that would be ambiguous.
SHORT_NAMES = {"model.norm": "norm", "optim.lr": "lr", "data.batch_size": "batch_size", "seed": "seed",
               "model.backbone": "backbone"}


def short_name(key: str) -> str:
    return SHORT_NAMES.get(key, key.split(".")[-1])


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
    options: dict[str, Any] = field(default_factory=dict)  # the kind's own keys, as its check() normalized them
    description: str = ""
    source: str | None = None  # the YAML file it came from
    hypotheses: list[dict[str, Any]] = field(default_factory=list)  # pre-registered (sweep.hypotheses.check)

    @functools.cached_property
    def task(self) -> str:
        """The study's task: its base config's (``validate_all`` refuses a trial of another); validated once."""
        return from_dict(copy.deepcopy(self.base)).task

    @property
    def study(self) -> StudyKind:
        """The study kind (a ``normablate.studies`` plug-in) that owns ``options``."""
        return studies.get(self.kind)

    # ------------------------------------------------------------------ grid
    def points(self) -> list[Point]:
        """The crossed grid (for ``search``: the groups, each with its own search)."""
        combos = itertools.product(*[a.values for a in self.axes]) if self.axes else [()]
        return [Point(i, {a.key: copy.deepcopy(v) for a, v in zip(self.axes, combo)})
                for i, combo in enumerate(combos)]

    @property
    def trials_per_point(self) -> int:
        """1, or for a grouped kind (search) the trials each group's study runs."""
        return self.study.trials_per_point(self.options)

    @property
    def total(self) -> int:
        """Trials the sweep runs in all."""
        return len(self.points()) * self.trials_per_point

    def group_study_name(self, point: Point) -> str:
        """``search``: each group (grid point, e.g. each norm) is its own Optuna study with its own sampler."""
        return f"{self.study_name}/{point.label(self.axes).replace(' ', ',')}"

    # ------------------------------------------------------------------ configs
    def trial_dict(self, point: Point, params: dict[str, Any] | None = None, run: str | None = None,
                   runtime: dict[str, Any] | None = None) -> dict[str, Any]:
        """The raw run config of one trial: base + sweep defaults + overrides + grid point + search params,
        then the study kind's rule (``StudyKind.shape``: e.g. batch_size's LR scaling and budget)."""
        d = copy.deepcopy(self.base)
        trainer = d.setdefault("trainer", {})
        trainer.setdefault("progress", False)  # one line per trial instead of bars from every worker
        for key, value in (runtime or {}).items():  # e.g. threads per worker, only where the spec says nothing
            if get_dotted(d, key) is None and key not in self.overrides:
                set_dotted(d, key, value)
        for key, value in budget_layer(self.overrides).items():  # max_epochs here clears the base's max_steps
            set_dotted(d, key, copy.deepcopy(value))
        for key, value in budget_layer(point.values).items():
            set_dotted(d, key, copy.deepcopy(value))
        for key, value in (params or {}).items():
            set_dotted(d, key, value)
        d["trainer"]["log_dir"] = self.log_dir
        if self.metric in tasks.get(self.task).metrics:  # tested as test_at_best: the study's pick
            d["trainer"].setdefault("select_metric", self.metric)
        d["experiment"] = self.study_name
        if run is not None:
            d["run"] = run
        self.study.shape(d, self.options)
        return d

    def trial_config(self, point: Point, params: dict[str, Any] | None = None, run: str | None = None,
                     runtime: dict[str, Any] | None = None) -> RunConfig:
        """The validated run config of one trial: built once, then handed as this object to the trainer."""
        return from_dict(self.trial_dict(point, params, run, runtime))

    def search_params_for_validation(self) -> list[dict[str, Any] | None]:
        """Parameter sets to validate each grid point with (search: the corners of the search space)."""
        return self.study.validation_params(self.options)

    def validate_all(self) -> int:
        """Build and validate the run config of every grid point (and search-space corner). Returns the count."""
        n, task = 0, self.task
        for point in self.points():
            for params in self.search_params_for_validation():
                where = point.label(self.axes) + (f" with {params}" if params else "")
                try:
                    d = self.trial_dict(point, params, run="validate")
                    named = _named_task(d)  # before validation, whose errors would be the other task's symptoms
                    cfg = from_dict(d) if named in (None, task) else None
                    trial_task = named if cfg is None else cfg.task
                except ConfigError as e:
                    raise ConfigError(f"sweep {self.study_name!r}: grid point [{where}]: {e}") from None
                if trial_task != task:  # one study, one task: its metric, direction and reports are that task's
                    keys = [k for k in (*point.values, *self.overrides, *(params or {}))
                            if k == "task" or k.startswith("model.backbone")]
                    raise ConfigError(f"sweep {self.study_name!r}: grid point [{where}]: its trial's task "
                                      f"{trial_task!r} differs from the study's {task!r} (its base config's)"
                                      + (f", set by {', '.join(dict.fromkeys(keys))}" if keys else "")
                                      + "; a study runs one task: make it a separate study")
                if cfg is not None:
                    self._check_measured(cfg, point, where)
                n += 1
        return n

    def _check_measured(self, cfg: Any, point: Point, where: str) -> None:
        """A hypothesis on a run measure (``normablate.measures``: the test-split train/eval gap, a probe
        statistic) needs every grid point it compares to measure it: a ConfigError naming the point and the
        config key, before any run, instead of a verdict without data after them."""
        if not self.hypotheses:
            return
        flat = to_dict(cfg)
        for h in self.hypotheses:
            m = measures.get(h["contrast"]["metric"])
            if m is None or not self._compares(h["contrast"], point):
                continue
            bad = measures.unmet(m, lambda key: get_dotted(flat, key))
            if bad:
                raise ConfigError(f"sweep {self.study_name!r}: grid point [{where}]: hypothesis {h['id']!r} "
                                  f"contrasts {m.name} ({m.what}), which this run would not measure: "
                                  f"{'; '.join(bad)} (set it in the base config or overrides)")

    @staticmethod
    def _compares(contrast: dict[str, Any], point: Point) -> bool:
        """Is ``point`` on either side of ``contrast`` (at its fixed values, if any)?"""
        fixed = (contrast["at"].get("fixed") or {}) if isinstance(contrast["at"], dict) else {}

        def on(side: dict[str, Any]) -> bool:
            return all(value_label(point.values.get(k)) == value_label(v) for k, v in {**side, **fixed}.items())

        return on(contrast["a"]) or on(contrast["b"])

    # ------------------------------------------------------------------ identity
    def to_json(self) -> dict[str, Any]:
        """The normalized spec (what defines the experiment; stored in the study, compared on re-runs)."""
        return {
            "kind": self.kind, "study_name": self.study_name, "base": self.base, "overrides": self.overrides,
            "grid": {a.key: a.values for a in self.axes}, "metric": self.metric, "direction": self.direction,
            "metric_at": self.metric_at, "log_dir": self.log_dir, "trainer_fn": self.trainer_fn,
            "pruner": self.pruner, "options": self.options, "description": self.description,
            # only when there are any: the fingerprints of studies made before hypotheses existed stay the same
            **({"hypotheses": self.hypotheses} if self.hypotheses else {}),
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, d: dict[str, Any], **extra: Any) -> SweepSpec:
        axes = [Axis(k, list(v)) for k, v in d["grid"].items()]
        return cls(kind=d["kind"], study_name=d["study_name"], base=d["base"], overrides=d["overrides"], axes=axes,
                   metric=d["metric"], direction=d["direction"], metric_at=d["metric_at"], log_dir=d["log_dir"],
                   trainer_fn=d["trainer_fn"], pruner=d["pruner"], options=d["options"],
                   description=d.get("description", ""), hypotheses=d.get("hypotheses") or [], **extra)


def _named_task(d: dict[str, Any]) -> str | None:
    """The task a raw run config names, or its backbone's registered one; None when it names neither (validation
    then says what is wrong)."""
    from .. import models

    task, backbone = d.get("task"), (d.get("model") or {}).get("backbone")
    if task is not None:
        return task if isinstance(task, str) else None
    return models.info(backbone).task if isinstance(backbone, str) and backbone in models.REGISTRY else None


# ---------------------------------------------------------------------- loading and checking
@dataclass
class SpecKeys:
    """The keys every sweep spec may have, typed; checked by ``config.build_section``, the run config's own checker
    (a study kind adds keys of its own: ``StudyKind.keys``, checked by its ``check``)."""

    kind: str = ""  # the study kind (normablate.studies): lr_sensitivity, batch_size, convergence, search, grid, ...
    base: str | dict = field(default_factory=dict)  # the trials' run config: a path (relative to the spec) or a mapping
    study_name: str | None = None  # default: the spec file's stem; runs go to <log_dir>/<study_name>/
    metric: str | None = None  # the objective, a validation metric (default: the task's primary one)
    direction: Literal["maximize", "minimize"] | None = None  # default: maximize accuracy, minimize loss/ppl
    metric_at: Literal["final", "best"] = "final"  # the metric's final value or its best over the run's validations
    overrides: dict | None = None  # dotted run-config keys -> values, for every trial
    grid: dict | None = None  # crossed axes: dotted key -> list of values, or {logspace|linspace: [low, high, num]}
    pruner: str | dict | None = None  # a name in sweep.pruners.PRUNERS, or {name: ..., **that class's arguments}
    log_dir: str | None = None  # default: the base config's trainer.log_dir
    storage: str | None = None  # an Optuna storage URL (default: sqlite:///<log_dir>/optuna.db)
    trainer_fn: str = DEFAULT_TRAINER  # package.module:function with the contract of normablate.train:train
    heartbeat: dict | None = None  # liveness of running trials: HeartbeatKeys
    description: Any = ""  # free text, shown in the report
    hypotheses: list | None = None  # pre-registered claims and their tests (normablate.sweep.hypotheses)


@dataclass
class HeartbeatKeys:
    """A spec's ``heartbeat`` mapping, typed like ``SpecKeys``."""

    interval: float = 10  # seconds between a running trial's heartbeats (>= 1)
    grace: float = 120  # seconds without a heartbeat after which a trial's worker counts as dead (> interval)
    max_retry: int = 3  # re-runs of a trial whose worker died before it is left failed (>= 0)


COMMON_KEYS = tuple(f.name for f in fields(SpecKeys))


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


def _read(spec: str | Path | dict[str, Any]) -> tuple[dict[str, Any], Path | None, str]:
    """The raw spec mapping, the file it came from (or None) and how messages name it."""
    if isinstance(spec, (str, Path)):
        source = Path(spec)
        return load_yaml(source), source, f"sweep spec {str(source)!r}"
    if isinstance(spec, dict):
        return copy.deepcopy(spec), None, "sweep spec"
    raise ConfigError(f"a sweep spec must be a YAML path or a mapping, got {type(spec).__name__}")


def _study_and_keys(raw: dict[str, Any], where: str) -> tuple[StudyKind, SpecKeys]:
    """The study kind, and the common keys typed; a key neither common nor the kind's is refused (naming the kind
    it belongs to, or the closest valid key)."""
    kind = raw.get("kind")
    if not isinstance(kind, str):
        raise ConfigError(f"{where}: kind={kind!r} is not a study kind; valid: {', '.join(studies.available())}")
    try:
        study = studies.get(kind)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    valid = list(COMMON_KEYS) + list(study.keys)
    for key in raw:
        if key not in valid:
            other = studies.owner_of(key)
            if other:
                raise ConfigError(f"{where}: key {key!r} belongs to kind {other!r}, not {kind!r}")
            raise ConfigError(f"unknown key {key!r} in {where}; valid: {', '.join(valid)}" + did_you_mean(key, valid))
    return study, build_section(SpecKeys, {k: v for k, v in raw.items() if k in COMMON_KEYS}, where=where)


def _base(keys: SpecKeys, source: Path | None) -> dict[str, Any]:
    """The base run config as a mapping: a path is read relative to the spec file (else the working directory)."""
    if isinstance(keys.base, dict):
        return copy.deepcopy(keys.base)
    base_path = Path(keys.base)
    if not base_path.is_absolute() and source is not None and (source.parent / base_path).exists():
        base_path = source.parent / base_path
    return load_yaml(base_path)


def _overrides(keys: SpecKeys, cli: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """The spec's overrides, then the command line's; a budget key on the command line replaces the spec's other
    one (``trainer.max_epochs=3`` clears a spec's ``trainer.max_steps``)."""
    ov = dict(keys.overrides or {})
    cli = parse_overrides(cli) if isinstance(cli, list) else (cli or {})
    for key in budget_layer(cli):
        if key not in cli:
            ov.pop(key, None)
    ov.update(cli)
    return ov


def _axes(grid: dict[str, Any], where: str) -> list[Axis]:
    axes = [Axis(str(k), _axis_values(str(k), v)) for k, v in grid.items()]
    names = [a.name for a in axes]
    for a in axes:  # ambiguous short names fall back to the full key
        if names.count(a.name) > 1:
            a.name = a.key
    for a in axes:
        if a.key in ("experiment", "run") or a.key.startswith("trainer.log_dir"):
            raise ConfigError(f"{where}: grid axis {a.key!r} is set by the sweep itself and cannot be swept")
    return axes


def _objective(keys: SpecKeys, task: str, where: str) -> tuple[str, str]:
    """(metric, direction): the metric must be one the task's runs record on validation (``tasks.get(task)``:
    its primary metric by default, and that metric's direction)."""
    info = tasks.get(task)
    metric = keys.metric or info.primary
    if metric not in info.metrics:
        raise ConfigError(f"{where}: metric={metric!r} is not allowed for task {task!r}; valid: "
                          f"{', '.join(info.metrics)}")
    return metric, keys.direction or info.direction(metric)


def _heartbeat(raw: dict | None, where: str) -> dict[str, float]:
    hb = build_section(HeartbeatKeys, raw or {}, "heartbeat.", where)
    for k in ("interval", "grace", "max_retry"):
        low = 0 if k == "max_retry" else 1
        if getattr(hb, k) < low:
            raise ConfigError(f"{where}: heartbeat.{k}={getattr(hb, k)!r} must be a number >= {low}")
    if hb.grace <= hb.interval:
        raise ConfigError(f"{where}: heartbeat.grace ({hb.grace}) must exceed heartbeat.interval ({hb.interval})")
    return dataclasses.asdict(hb)


def load_spec(spec: str | Path | dict[str, Any], overrides: list[str] | dict[str, Any] | None = None,
              study_name: str | None = None, dry_run: bool = False) -> SweepSpec:
    """Read and check a sweep spec (a YAML path or a mapping); validate every grid point's run config.

    ``overrides`` (``["trainer.max_steps=20", ...]`` or a dict) apply to every trial, after the spec's own.
    ``dry_run`` swaps the trainer for ``normablate.sweep.dryrun:train`` (instant fake runs; study name + "-dryrun").
    """
    raw, source, where = _read(spec)
    study, keys = _study_and_keys(raw, where)
    base = _base(keys, source)
    task = from_dict(base).task  # a bad base config fails here, with the key named (validation sets the task)
    ov = _overrides(keys, overrides)
    axes = _axes(keys.grid or {}, where)
    metric, direction = _objective(keys, task, where)
    log_dir = str(ov.pop("trainer.log_dir", None) or keys.log_dir or base.get("trainer", {}).get("log_dir")
                  or "lightning_logs")
    name = study_name or keys.study_name or (source.stem if source else None)
    if not name:
        raise ConfigError(f"{where}: no study name; give study_name in the spec or --study-name")
    check_path_name("study name", str(name), nested=True)  # becomes <log_dir>/<study>/: must stay inside it
    trainer_fn = keys.trainer_fn
    if dry_run:
        trainer_fn = DRYRUN_TRAINER
        if not study_name:
            name = f"{name}-dryrun"
    if ":" not in trainer_fn:
        raise ConfigError(f"{where}: trainer_fn={trainer_fn!r} must be 'package.module:function'")

    pruner, heartbeat = check_pruner(keys.pruner, where), _heartbeat(keys.heartbeat, where)
    options = study.check(raw, SpecContext(where, task, [a.key for a in axes], base, ov))
    hyps = hypotheses.check(keys.hypotheses, {a.key: a.values for a in axes}, task, study.grouped, where)
    spec_obj = SweepSpec(kind=keys.kind, study_name=str(name), base=base, overrides=ov, axes=axes, metric=metric,
                         direction=direction, metric_at=keys.metric_at, log_dir=log_dir, storage=keys.storage,
                         trainer_fn=trainer_fn, pruner=pruner, heartbeat=heartbeat, options=options,
                         description=str(keys.description), source=str(source) if source else None,
                         hypotheses=hyps)
    yamlsafe.check_strings(spec_obj.to_json(), where)  # it is stored in the study: every string is bounded
    spec_obj.validate_all()
    return spec_obj


def spec_yaml(spec: SweepSpec) -> str:
    return yaml.safe_dump(spec.to_json(), sort_keys=False)
