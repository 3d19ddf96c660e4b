"""Run configuration: dataclasses with a reason per field, loaded from YAML plus ``key=value`` overrides.

Everything is validated before anything is built: an unknown key, a wrong type or a bad value raises
``ConfigError`` naming the key, what is allowed and, for a typo, the closest valid key.

Hand-written rather than jsonargparse/LightningCLI because (a) the valid keys under ``model`` depend on the
chosen backbone (its builder's signature) and the norm options on the chosen norm, which a static schema
cannot express, and (b) we want "did you mean" hints for typos. YAML parsing is PyYAML's.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from . import yamlsafe
from .dotted import set_dotted
from .errors import ConfigError, did_you_mean


@dataclass
class ModelConfig:
    backbone: str = "resnet20"  # a name in nb.models.available()
    norm: Any = "bn"  # a norm name, "pkg.mod:Class", or {name: ..., **options}
    # any further key is an option of the backbone's builder (e.g. width, ffn_norm, norm_position)
    options: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic" (embedded, no files), a hub name ("cifar10"), or a local path
    batch_size: int = 128  # training batch size (the batch-size study varies this)
    val_batch_size: int = 500  # evaluation batch size; BN train/eval gap is measured at this size
    train_limit: int | None = None  # use only the first N training examples (None: all)
    val_limit: int | None = None  # use only the first N validation examples (None: all)
    test_limit: int | None = None  # use only the first N test examples (None: all)
    augment: bool = True  # vision: random crop (pad 4) + horizontal flip, done on the device in batch
    # Three splits (README "Metric definitions"): selection (best LR, best config, early stopping, pruning,
    # steps-to-target) sees only validation; reported numbers come from test, evaluated once at the end.
    train_split: str = "train"  # the source split training draws from
    val_split: str | None = None  # validation: None holds out val_fraction of the training split (a fixed
    #                               permutation for images, the text's tail); or a split of the source
    test_split: str | None = "test"  # test: this split of the source; a single-split source holds out its last
    #                                  test_fraction instead (images: fixed permutation; text: contiguous tail)
    image_key: str | None = None  # column of images (None: guess "img"/"image")
    label_key: str | None = None  # column of labels (None: guess "label"/"labels")
    text_key: str | None = None  # column of text (None: guess "text")
    mode: Literal["blocks", "samples"] = "blocks"  # text: contiguous windows, or one padded sample per line
    block_size: int = 128  # text: window length / maximum sample length in tokens (bytes)
    val_fraction: float = 0.1  # val_split None: this fraction of the training split is validation (CIFAR-10: 5,000)
    test_fraction: float = 0.1  # single-split sources: this fraction is held out as the test set
    cache_dir: str | None = None  # decoded tensors are cached here (None: $NORMABLATE_CACHE or ~/.cache/normablate)
    hub_config: str | None = None  # hub sources: the dataset configuration, load_dataset(source, hub_config)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw", "lion"] = "sgd"  # lion: the optional extra .[lion] (tasks/optim.py)
    lr: float = 0.1  # peak learning rate (after warmup)
    momentum: float = 0.9  # SGD momentum (heavy ball)
    nesterov: bool = False  # SGD: Nesterov momentum instead of heavy ball (needs momentum > 0)
    betas: tuple[float, float] = (0.9, 0.95)  # Adam, AdamW and Lion (Lion's paper uses (0.9, 0.99))
    weight_decay: float = 5e-4  # applied only to tensors with dim >= 2: norm gains and biases never decayed
    schedule: Literal["cosine", "constant", "linear", "step"] = "cosine"  # after warmup, over trainer.max_steps
    warmup_steps: int = 0  # linear warmup from 0
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at lr * min_lr_ratio
    # schedule step: the LR is multiplied by gamma at each milestone, a fraction of trainer.max_steps in (0, 1),
    # increasing (e.g. [0.5, 0.75]: x0.1 at 50% and 75% of the run, the CIFAR ResNet recipe of He et al. 2016)
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    grad_clip: float | None = None  # clip the global gradient norm to this value (None: no clipping)


@dataclass
class TrainerConfig:
    max_steps: int | None = 500  # optimizer steps; the budget of one run (null when max_epochs is set)
    # the budget in epochs instead: resolved to max_steps = ceil(max_epochs * N_train / data.batch_size) once the data
    # is loaded (an epoch is N_train examples; hparams and result.json hold both). Setting it unsets max_steps.
    max_epochs: int | None = None
    val_every: int = 100  # validate (and checkpoint) every N steps, and at the end
    val_batches: int | None = None  # limit validation to N batches (None: the whole split)
    log_every: int = 10  # log training scalars every N steps
    accelerator: str = "cpu"  # "cpu", "gpu", "auto"
    precision: str = "32-true"  # Lightning precision string
    deterministic: bool = True  # same config + seed -> same metrics (on CPU)
    threads: int | None = None  # torch intra-op threads (None: leave as is; a resumed run restores its own count)
    # --resume with a trainer.threads other than the run's own count: refused (float rounding changes) unless true;
    # recorded in the run's resumes.jsonl either way (normablate/runfolder.py)
    allow_thread_change: bool = False
    divergence_factor: float = 10.0  # stop as diverged when the smoothed train loss exceeds factor * its start
    select_metric: str | None = None  # the validation metric whose best step's weights are kept (best.pt) and also
    #                                   evaluated on test (RunResult.test_at_best); None: val/acc, LM val/loss
    target_metric: str | None = None  # e.g. "val/acc": record the first step and time it reaches target_value
    target_value: float | None = None
    progress: bool = True  # a progress bar on a terminal; elsewhere a plain line every 30 s or tenth of the run
    # BN family: also validate with batch statistics (val/loss_batchstats, val/train_eval_gap) at every validation,
    # at the final one only (the curve is lost, the end point kept; ~half the validation time), or never (README)
    batchstat_gap: Literal["every", "final", "off"] = "every"
    track_batchstat_gap: bool | None = None  # older name: true = batchstat_gap every, false = off (null: unset)
    log_dir: str = "lightning_logs"  # runs go to <log_dir>/<experiment>/<run>/
    # Lightning loggers, any of tensorboard, csv, mlflow (pip install 'normablate[mlflow]'), wandb ('[wandb]');
    # each gets the config as hyperparameters and the final metrics (normablate/tblog.py, README "Loggers")
    loggers: list = field(default_factory=lambda: ["tensorboard"])
    # Data parallel (Lightning's names). data.batch_size is the GLOBAL batch of one optimizer step: each of the
    # devices * num_nodes ranks gets its own contiguous slice, so a run means the same at any scale.
    devices: int = 1  # processes per machine (CPU: gloo) or GPUs per machine (NCCL); > 1 runs DDP
    num_nodes: int = 1  # machines; each runs `devices` ranks (launch with srun/torchrun, as Lightning expects)
    strategy: str = "auto"  # "auto" (DDP when more than one rank), "ddp", "ddp_find_unused_parameters_true"
    sync_batchnorm: bool = False  # synchronize every BN-family norm's batch statistics across ranks (norms/sync.py)
    precise_bn: int = 0  # > 0: before each validation, also evaluate with running stats recomputed as the exact
    #                      population statistics of this many training batches (PreciseBN; val/*_precise)
    # Speed options; none changes a norm's math (tests compare each with the default within float tolerance).
    # auto: channels_last / compile left null are chosen per model by normablate/speed.py's rule table, pinned per
    # experiment and kept on resume; eager: both off. The resolved values are recorded (config.yaml, HPARAMS).
    speed: Literal["auto", "eager"] = "auto"
    channels_last: bool | None = None  # CNNs: NHWC memory, faster convs and per-pixel LN/RMS without a copy on CPU
    compile: bool | None = None  # torch.compile the model (first steps pay the compile; needs a C++ compiler on CPU)


def epochs_to_steps(max_epochs: int, num_train: int, batch_size: int) -> int:
    """``trainer.max_epochs`` as optimizer steps: ``ceil(max_epochs * num_train / batch_size)``.

    Training draws batches from the endless sequence of per-epoch permutations (``data.common.EpochSampler``: a
    batch that crosses an epoch boundary takes the tail of one epoch and the head of the next), so steps are not
    aligned with epochs; counting samples, not ``max_epochs * ceil(N / B)`` batches, keeps "every epoch visits
    each example exactly once": the run visits each example exactly ``max_epochs`` times, and its last step takes
    fewer than one batch (``< batch_size`` examples) of the next epoch. ``batch_size`` is the global batch."""
    return max(1, math.ceil(max_epochs * num_train / batch_size))


@dataclass
class ProbeConfig:
    """Loss-landscape and ICS probes (Santurkar et al. 2018); see normablate/probes. Off by default."""

    enabled: bool = False  # probe during training (the run's trajectory is unchanged; probed steps cost more)
    every: int = 100  # probe at step 1 and every N steps after; 100 keeps the cost to a few % (README)
    step_sizes: list = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # eta grid along -grad: the paper's range
    relative_to_lr: bool = True  # step sizes are multiples of the current LR (False: absolute step sizes)
    landscape: bool = True  # loss variation, gradient predictiveness, effective beta-smoothness
    ics: bool = True  # internal covariate shift per layer (one extra forward/backward per layer)
    layers: list | None = None  # ICS layers: module names with a weight (None: every Conv/Linear/Embedding)
    # batch-statistics fluctuation per BN-family layer (Shen et al. 2020): distance of the batch mean/variance from
    # the running ones and ||dL/dmu_B||, ||dL/dsigma_B^2|| (probes/batchstats.py); one extra forward/backward
    batchstats: bool = False


@dataclass
class RunConfig:
    experiment: str = "default"  # folder under log_dir grouping runs (a sweep uses its study name)
    run: str | None = None  # run folder name (None: derived from backbone, norm, lr, batch size and seed)
    seed: int = 0  # seeds model init, data order and augmentation
    task: str | None = None  # a name in normablate.tasks ("classification", "lm"); None: the backbone's own task
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    # plug-in files (.py, relative to the working directory) or module names imported before validation, so the
    # norms/backbones they register can be named; sweep trials inherit them. Code: trust the config (README).
    plugins: list = field(default_factory=list)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "trainer": TrainerConfig,
            "probes": ProbeConfig}


# ------------------------------------------------------------------------------------------ helpers
def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (model options flattened into ``model``), the form YAML files use."""
    d = dataclasses.asdict(cfg)
    options = d["model"].pop("options")
    d["model"].update(options)
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return d


def parse_value(text: str) -> Any:
    """A CLI override value: YAML scalar/list/dict syntax (``0.1``, ``null``, ``[1, 2]``, ``{name: bn}``)."""
    try:
        return yamlsafe.load(text, what=f"override value {text[:40]!r}")  # (alias expansion bounded)
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.05)")
        key, _, value = item.partition("=")
        out[key.strip()] = parse_value(value)
    return out


BUDGET_KEYS = ("trainer.max_steps", "trainer.max_epochs")


def budget_layer(layer: dict[str, Any]) -> dict[str, Any]:
    """A layer of dotted overrides (CLI, sweep overrides, a grid point) that sets one budget key to a value and
    not the other also clears the other: ``trainer.max_epochs=3`` over a config file with ``max_steps: 6000``
    means "train 3 epochs", not a contradiction. Both set in one layer stays an error (from_dict)."""
    out = dict(layer)
    for a, b in (BUDGET_KEYS, BUDGET_KEYS[::-1]):
        if out.get(a) is not None and b not in out:
            out[b] = None
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "norm":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce: int -> float, list -> tuple) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        args = typing.get_args(tp)
        word = {False: "off", True: "on"}.get(value) if isinstance(value, bool) else None
        if word in args:  # YAML 1.1 reads an unquoted off/on (trainer.batchstat_gap=off) as false/true
            return True, word
        return value in args, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            coerced = []
            for v, a in zip(value, args):
                ok, cv = _type_ok(v, a)
                if not ok:
                    return False, value
                coerced.append(cv)
            return True, tuple(coerced)
        return False, value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def build_section(cls: type, values: dict, prefix: str = "", where: str = "") -> Any:
    """The dataclass ``cls`` from a mapping, every key checked against its fields' annotations (``_type_ok``):
    an unknown key, a wrong type, a value outside a ``Literal`` or a non-finite number is a ``ConfigError`` naming
    the key (``prefix`` + key) and what is allowed. The one typed loader of run-config sections and sweep specs
    (``sweep.spec.SpecKeys``); ``where`` (e.g. "sweep spec 'x.yaml'") starts every message."""
    head = f"{where}: " if where else ""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"{head}unknown config key '{prefix}{key}'; valid keys in {prefix.rstrip('.') or 'the top level'}: "
                f"{', '.join(names)}" + did_you_mean(key, names, (lambda h: prefix + h) if prefix else repr)
            )
        ok, coerced = _type_ok(value, hints[key])
        if not ok and typing.get_origin(hints[key]) is Literal:
            allowed = [str(a) for a in typing.get_args(hints[key])]
            hint = (" (YAML reads an unquoted yes/no/on/true as a boolean: quote the word)"
                    if isinstance(value, bool) else "")
            raise ConfigError(f"{head}config key {prefix}{key}={value!r} is not allowed; valid: {', '.join(allowed)}"
                              + hint + did_you_mean(value, allowed))
        if not ok:
            raise ConfigError(f"{head}config key {prefix}{key}={value!r} has the wrong type; expected "
                              f"{_describe(hints[key])}")
        if isinstance(coerced, float) and not math.isfinite(coerced):
            raise ConfigError(f"{head}config key {prefix}{key}={value!r} must be a finite number")
        kwargs[key] = coerced
    return cls(**kwargs)


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a RunConfig (types, choices, ranges, backbone and norm options)."""
    if not isinstance(d, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(d).__name__}")
    d = copy.deepcopy(d)
    _check_finite(d, "")
    from . import plugins

    plugins.load(d.get("plugins"))  # before any name is looked up: they register norms, backbones, ...
    top_fields = [f.name for f in dataclasses.fields(RunConfig)]
    for key in d:
        if key not in top_fields:
            raise ConfigError(f"unknown config key {key!r}; valid top-level keys: {', '.join(top_fields)}"
                              + did_you_mean(key, top_fields))
    sections = {}
    for name, cls in SECTIONS.items():
        values = d.pop(name, None) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config key {name!r} must be a mapping, got {values!r}")
        if name == "model":
            values = dict(values)
            options = {k: values.pop(k) for k in list(values) if k not in ("backbone", "norm", "options")}
            options.update(values.pop("options", None) or {})
            values["options"] = options
        if name == "trainer" and values.get("max_epochs") is not None:  # the budget in epochs replaces the default
            values = dict(values)  # max_steps; both given is a contradiction (which budget?)
            if values.get("max_steps") is not None:
                raise ConfigError(f"trainer.max_steps={values['max_steps']!r} and trainer.max_epochs="
                                  f"{values['max_epochs']!r} are both set; set exactly one of them (a run's result.json "
                                  f"config holds both: there max_steps is what max_epochs resolved to)")
            values["max_steps"] = None
        sections[name] = build_section(cls, values, f"{name}.")
    top = build_section(RunConfig, {k: v for k, v in d.items()}, "")
    cfg = dataclasses.replace(top, **sections)
    validate(cfg)
    return cfg


def _check_finite(value: Any, key: str) -> None:
    """No NaN or infinity anywhere in a config (model and norm options included): a non-finite number is always a
    typo or an overflow, and it trains to NaN instead of failing."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key}={value!r} must be a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")


# Lightning's precision strings (lightning.fabric.connector._PRECISION_INPUT_STR, and its short aliases)
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "32", "16", "bf16", "64",
              "transformer-engine", "transformer-engine-float16")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# Ranges of the numbers that size memory, count work or seed an RNG: (low, high), both allowed; None where the type
# allows null. Checked before anything is built, so a typo never reaches an allocation, a thread pool or the RNG.
# The bounds are sanity limits; whether a model fits this machine's memory is footprint.py's check at train time.
RANGES: dict[str, tuple[int, int]] = {
    "seed": (0, 2**32 - 1),  # Lightning's seed_everything (numpy's seed range); outside it, Lightning raises
    "trainer.threads": (1, 1024),  # torch intra-op threads (0 or negative: torch ignores or fails)
    "trainer.max_steps": (1, 10**9),
    "trainer.max_epochs": (1, 10**6),
    "trainer.val_every": (1, 10**9),
    "trainer.val_batches": (1, 10**9),
    "trainer.log_every": (1, 10**9),
    "trainer.precise_bn": (0, 10**6),  # batches per recomputation
    "trainer.devices": (1, 1024),  # processes or GPUs per machine
    "trainer.num_nodes": (1, 100_000),
    "data.batch_size": (1, 2**24),
    "data.val_batch_size": (1, 2**24),
    "data.block_size": (2, 2**20),  # tokens per sequence
    "data.train_limit": (1, 2**40),
    "data.val_limit": (1, 2**40),
    "data.test_limit": (1, 2**40),
    "optim.warmup_steps": (0, 10**9),
    "probes.every": (1, 10**9),
}
# Backbone options, by option name, for any backbone whose builder takes one of them (its signature decides which
# exist; this table only bounds the numbers). (low, high, low_open): low_open means the value must exceed low.
MODEL_OPTION_RANGES: dict[str, tuple[float, float, bool]] = {
    "width": (0, 2**16, True),  # channels (ResNet) or a channel multiplier (VGG)
    "num_classes": (1, 2**24, False),
    "in_chans": (1, 4096, False),
    "img_size": (1, 2**16, False),
    "patch_size": (1, 2**16, False),
    "embed_dim": (1, 2**16, False),
    "n_embd": (1, 2**16, False),
    "depth": (1, 4096, False),
    "n_layer": (1, 4096, False),
    "num_heads": (1, 4096, False),
    "n_head": (1, 4096, False),
    "vocab_size": (1, 2**24, False),
    "block_size": (1, 2**20, False),
    "mlp_ratio": (0, 1024, True),
    "dropout": (0, 0.999, False),
    "drop_path_rate": (0, 0.999, False),
}


def _in_range(key: str, value: Any, low: float, high: float, low_open: bool = False, nullable: bool = False) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # null where allowed, and wrong types, are the type check's business
    allowed = (f"allowed: > {low} and <= {high}" if low_open else f"allowed: {low} to {high}") + \
        (", or null" if nullable else "")
    if value < low or (low_open and value == low):
        raise ConfigError(f"{key}={value} must be {'>' if low_open else '>='} {low} ({allowed})")
    if value > high:
        raise ConfigError(f"{key}={value} must be <= {high} ({allowed})")


def check_ranges(cfg: RunConfig) -> None:
    """``RANGES`` and ``MODEL_OPTION_RANGES``: a value outside is a ConfigError naming the key and the range."""
    for key, (low, high) in RANGES.items():
        section, _, name = key.rpartition(".")
        obj = getattr(cfg, section) if section else cfg
        if not hasattr(obj, name):
            continue
        hint = typing.get_type_hints(type(obj))[name]
        _in_range(key, getattr(obj, name), low, high, nullable=type(None) in typing.get_args(hint))
    for name, value in cfg.model.options.items():
        if name in MODEL_OPTION_RANGES:
            low, high, low_open = MODEL_OPTION_RANGES[name]
            _in_range(f"model.{name}", value, low, high, low_open)


LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")  # trainer.loggers (normablate/tblog.py builds them)
LOGGER_EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}  # optional logger -> its module (= its pip extra)


def _check_loggers(names: Any) -> None:
    """``trainer.loggers``: known names, each one's package installed (else the extra to install), no repeats."""
    import importlib.util

    _check(isinstance(names, list), f"trainer.loggers={names!r} must be a list, e.g. [tensorboard, csv]; valid "
           f"names: {', '.join(LOGGERS)}")
    for name in names:
        _check(name in LOGGERS, f"trainer.loggers: unknown logger {name!r}; valid: {', '.join(LOGGERS)}")
        module = LOGGER_EXTRAS.get(name)
        _check(module is None or importlib.util.find_spec(module) is not None,
               f"trainer.loggers includes {name!r} but the {module} package is not installed: pip install "
               f"'normablate[{module}]' (or drop {name!r} from trainer.loggers)")
    _check(len(set(names)) == len(names), f"trainer.loggers={names!r} names a logger twice")


def validate(cfg: RunConfig) -> None:
    """Values and cross-field rules; backbone/norm options against the registries."""
    from . import models, tasks

    m, dc, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    check_ranges(cfg)  # sizes, counts and seeds first: nothing below may allocate with a typo
    backbone = models.info(m.backbone)  # unknown backbone -> lists valid
    models.check_options(m.backbone, m.options)
    _check(backbone.task in tasks.REGISTRY,  # the backbone's registration first: the config may not name a task
           f"backbone {m.backbone!r} is registered with task={backbone.task!r} (models.register({m.backbone!r}, ..., "
           f"task={backbone.task!r})), which is not a registered task; valid: {', '.join(tasks.available())}"
           + did_you_mean(backbone.task, tasks.available()))
    if cfg.task is None:  # the backbone's own task (models.register(..., task=...))
        cfg.task = backbone.task
    _check(cfg.task in tasks.REGISTRY, f"config key task={cfg.task!r} is not allowed; valid: "
           f"{', '.join(tasks.available())}" + did_you_mean(cfg.task, tasks.available()))
    _check(cfg.task == backbone.task,
           f"task={cfg.task!r} does not fit backbone {m.backbone!r}; use task={backbone.task!r}")
    task = tasks.get(cfg.task)
    opts = dict(m.options)
    # a capacity the config's data already fixes (the LM's context and byte vocabulary); the rest once data is read
    task.check_inputs(backbone.input_options(task.facts), opts, task.config_facts(dc))
    try:  # build once on the meta device (no memory, no init cost): bad option values, unknown norms or norm
        # options fail here, not mid-run
        with torch.device("meta"):
            net = models.create(m.backbone, norm=m.norm, **opts)
    except ConfigError:
        raise
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"model {m.backbone!r} cannot be built with norm={m.norm!r} and options {opts}: {e}") from e
    if cfg.probes.enabled and cfg.probes.layers:  # ICS layers must be weight layers of this model
        from .probes.ics import weight_layers

        known = [n for n, _ in weight_layers(net)]
        bad = [n for n in cfg.probes.layers if n not in known]
        _check(not bad, f"probes.layers: {bad} are not weight layers of {m.backbone!r}; valid: {', '.join(known)}")
    _check(dc.batch_size >= 1, f"data.batch_size={dc.batch_size} must be >= 1")
    _check(dc.val_batch_size >= 1, f"data.val_batch_size={dc.val_batch_size} must be >= 1")
    _check(dc.block_size >= 2, f"data.block_size={dc.block_size} must be >= 2")
    _check(0.0 < dc.val_fraction < 1.0, f"data.val_fraction={dc.val_fraction} must be in (0, 1)")
    _check(0.0 < dc.test_fraction < 1.0, f"data.test_fraction={dc.test_fraction} must be in (0, 1)")
    _check(dc.val_fraction + dc.test_fraction < 1.0, f"data.val_fraction={dc.val_fraction} + data.test_fraction="
           f"{dc.test_fraction} must leave some training data (sum < 1)")
    for k in ("val_split", "test_split"):
        v = getattr(dc, k)
        _check(v is None or v != dc.train_split, f"data.{k}={v!r} is also data.train_split: the model would be "
               f"judged on its training data (data.val_split=null holds out part of the training split)")
    _check(dc.val_split is None or dc.val_split != dc.test_split,
           f"data.val_split and data.test_split both name split {dc.val_split!r}: selection and the reported numbers "
           f"would use the same data; set data.val_split=null to hold out part of the training split as validation")
    for k in ("train_limit", "val_limit", "test_limit"):
        v = getattr(dc, k)
        _check(v is None or v >= 1, f"data.{k}={v} must be >= 1 or null")
    _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _check(0 <= o.momentum < 1, f"optim.momentum={o.momentum} must be in [0, 1)")
    _check(all(0 <= b < 1 for b in o.betas), f"optim.betas={list(o.betas)} must each be in [0, 1)")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    ms = o.milestones
    _check(isinstance(ms, list) and all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < 1
                                        for m in ms) and all(a < b for a, b in zip(ms, ms[1:])),
           f"optim.milestones={ms!r} must be an increasing list of fractions of trainer.max_steps, each in (0, 1), "
           f"e.g. [0.5, 0.75]")
    _check(o.schedule == "step" or not ms, f"optim.milestones={ms!r} applies to optim.schedule='step' only (got "
                                           f"optim.schedule={o.schedule!r})")
    _check(o.schedule != "step" or bool(ms), "optim.schedule='step' needs optim.milestones, e.g. [0.5, 0.75] "
                                             "(fractions of trainer.max_steps)")
    _check(0 < o.gamma <= 1, f"optim.gamma={o.gamma} must be in (0, 1] (the LR factor at each milestone)")
    _check(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip={o.grad_clip} must be > 0 or null")
    _check(t.max_steps is None or t.max_steps >= 1, f"trainer.max_steps={t.max_steps} must be >= 1")
    _check(t.max_epochs is None or t.max_epochs >= 1, f"trainer.max_epochs={t.max_epochs} must be >= 1 or null")
    _check((t.max_epochs is None) != (t.max_steps is None),
           f"trainer.max_steps={t.max_steps} and trainer.max_epochs={t.max_epochs}: set exactly one of them (the "
           f"budget of the run; the other null)")
    _check(o.name == "sgd" or not o.nesterov,
           f"optim.nesterov=true applies to optim.name='sgd' only (got optim.name={o.name!r})")
    _check(not o.nesterov or o.momentum > 0, "optim.nesterov=true needs optim.momentum > 0")
    if o.name == "lion":
        import importlib.util

        _check(importlib.util.find_spec("lion_pytorch") is not None,
               "optim.name='lion' needs the lion-pytorch package (torch has no Lion): pip install 'normablate[lion]' "
               "(or: pip install lion-pytorch)")
    _check(t.val_every >= 1, f"trainer.val_every={t.val_every} must be >= 1")
    _check(t.log_every >= 1, f"trainer.log_every={t.log_every} must be >= 1")
    _check_loggers(t.loggers)
    _check(t.val_batches is None or t.val_batches >= 1, f"trainer.val_batches={t.val_batches} must be >= 1 or null")
    _check(t.divergence_factor > 1, f"trainer.divergence_factor={t.divergence_factor} must be > 1")
    _check(t.devices >= 1, f"trainer.devices={t.devices} must be >= 1")
    _check(t.num_nodes >= 1, f"trainer.num_nodes={t.num_nodes} must be >= 1")
    strategies = ("auto", "ddp", "ddp_find_unused_parameters_true")
    _check(t.strategy in strategies, f"trainer.strategy={t.strategy!r} is not allowed; valid: {', '.join(strategies)} "
                                     f"(spawn-based and sharded strategies would lose the run record)")
    world = t.devices * t.num_nodes
    _check(dc.batch_size % world == 0,
           f"data.batch_size={dc.batch_size} (the global batch) must be divisible by trainer.devices x "
           f"trainer.num_nodes = {world}, so every rank gets an equal slice")
    _check(dc.val_batch_size >= world, f"data.val_batch_size={dc.val_batch_size} must be >= the {world} ranks")
    for k in sorted({g for g in (getattr(mod, "ghost_batch_size", None) for mod in net.modules()) if g}):
        # Ghost BN (norms/batch.py): groups of k consecutive samples of each rank's batch, none partial in training
        _check(dc.batch_size // world % k == 0,
               f"ghost_batch_size={k} (a norm option in model.*) must divide the training batch per rank, "
               f"data.batch_size={dc.batch_size} / {world} rank(s) = {dc.batch_size // world}: each step's batch is "
               f"cut into groups of {k} consecutive samples")
        _check(not t.sync_batchnorm,
               f"trainer.sync_batchnorm=true cannot be combined with ghost_batch_size={k} (model.*): ghost groups are "
               f"parts of one rank's batch, a synchronized BN pools every rank's batch")
    _check(t.precise_bn >= 0, f"trainer.precise_bn={t.precise_bn} must be >= 0 (0: off)")
    if t.track_batchstat_gap is not None:  # the older boolean key: folded into batchstat_gap
        _check(t.track_batchstat_gap or t.batchstat_gap in ("every", "off"),
               f"trainer.track_batchstat_gap=false contradicts trainer.batchstat_gap={t.batchstat_gap!r}; "
               f"give only trainer.batchstat_gap (every, final or off)")
        _check(not t.track_batchstat_gap or t.batchstat_gap != "off",
               "trainer.track_batchstat_gap=true contradicts trainer.batchstat_gap='off'; give only "
               "trainer.batchstat_gap (every, final or off)")
        if not t.track_batchstat_gap:
            t.batchstat_gap = "off"
        t.track_batchstat_gap = None
    _check(t.accelerator in ("cpu", "gpu", "cuda", "mps", "auto"),
           f"trainer.accelerator={t.accelerator!r} is not allowed; valid: cpu, gpu, cuda, mps, auto")
    _check(str(t.precision) in PRECISIONS,
           f"trainer.precision={t.precision!r} is not allowed; valid (Lightning): {', '.join(PRECISIONS[:6])}"
           + did_you_mean(t.precision, PRECISIONS))
    _check(not (t.accelerator == "cpu" and str(t.precision) in ("16-mixed", "16")),
           f"trainer.precision={t.precision!r} needs a GPU; on trainer.accelerator='cpu' use bf16-mixed or 32-true")
    metrics = task.metrics
    _check((t.target_metric is None) == (t.target_value is None),
           "trainer.target_metric and trainer.target_value must be given together")
    _check(t.target_metric is None or t.target_metric in metrics,
           f"trainer.target_metric={t.target_metric!r} is not allowed for task {cfg.task!r}; valid: {', '.join(metrics)}")
    _check(t.select_metric is None or t.select_metric in metrics,
           f"trainer.select_metric={t.select_metric!r} is not allowed for task {cfg.task!r}; valid: "
           f"{', '.join(metrics)} (selection uses the validation split only)")
    pr = cfg.probes
    _check(pr.every >= 1, f"probes.every={pr.every} must be >= 1")
    _check(bool(pr.step_sizes) and all(isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0
                                       for e in pr.step_sizes),
           f"probes.step_sizes={pr.step_sizes!r} must be a non-empty list of numbers > 0")
    _check(pr.layers is None or (bool(pr.layers) and all(isinstance(n, str) for n in pr.layers)),
           f"probes.layers={pr.layers!r} must be null or a non-empty list of module names")
    _check(not pr.batchstats or pr.enabled,
           "probes.batchstats=true needs probes.enabled=true (it runs inside the probe callback; set "
           "probes.landscape=false and probes.ics=false to measure batch statistics alone)")
    check_path_name("experiment", cfg.experiment, nested=True)
    if cfg.run is not None:
        check_path_name("run", cfg.run)
    _remember_valid(cfg, net)


_VALID = "_normablate_valid"  # a validated RunConfig's record: (values' fingerprint, model's fingerprint, params)


def _fingerprint(d: Any) -> str:
    return json.dumps(d, sort_keys=True, default=repr)


def _remember_valid(cfg: RunConfig, net: torch.nn.Module) -> None:
    """Record on ``cfg`` that it passed ``validate`` with its values as they are now, and the parameter count of
    the model validate built on the meta device, so ``train`` neither validates nor builds it again to learn either.
    Any later change to the config's values voids the record (``is_validated``, ``validated_params``)."""
    d = to_dict(cfg)
    setattr(cfg, _VALID, (_fingerprint(d), _fingerprint(d["model"]), sum(p.numel() for p in net.parameters())))


def is_validated(cfg: RunConfig) -> bool:
    """Did ``cfg`` pass ``validate`` with the values it holds now?"""
    record = getattr(cfg, _VALID, None)
    return record is not None and record[0] == _fingerprint(to_dict(cfg))


def validated_params(cfg: RunConfig) -> int | None:
    """The parameter count of ``cfg``'s model (config options, before data facts fill any) found by ``validate``;
    None when cfg was not validated or its model section changed since."""
    record = getattr(cfg, _VALID, None)
    return record[2] if record is not None and record[1] == _fingerprint(to_dict(cfg)["model"]) else None


def check_path_name(key: str, value: str, nested: bool = False) -> None:
    """A name that becomes a folder under the log folder (experiment, run, study name) must stay inside it: relative,
    no ``..`` or ``.`` component, no backslash, drive or NUL; ``nested`` allows ``a/b`` sub-folders."""
    parts = value.split("/") if nested else [value]
    bad = (not value or value.startswith(("/", "~")) or "\\" in value or "\0" in value or ":" in value[:2]
           or any(p in ("", ".", "..") or (not nested and "/" in p) for p in parts))
    if bad:
        what = "a relative folder name (letters, digits, -_.=, and / between parts)" if nested else \
            "a plain folder name (no /)"
        raise ConfigError(f"{key}={value!r} must be {what} that stays inside the log folder; no '..', '.', absolute "
                          f"paths or empty parts")


def check_hardware(cfg: RunConfig) -> None:
    """What the config asks of this machine (a GPU, enough of them). Called by ``train`` before any data is read or
    model built; not part of ``validate``, so a GPU sweep can be ``--check``ed on a machine without one."""
    t = cfg.trainer
    if t.accelerator in ("gpu", "cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _check(n > 0, f"trainer.accelerator={t.accelerator!r} but this machine has no usable CUDA GPU "
                      f"(torch.cuda.is_available() is False); use trainer.accelerator=cpu or auto")
        _check(t.devices <= n, f"trainer.devices={t.devices} but this machine has {n} CUDA GPU(s)")
    if t.accelerator == "mps":
        _check(torch.backends.mps.is_available(),
               "trainer.accelerator='mps' but MPS is not available here; use trainer.accelerator=cpu or auto")


def validated(cfg: RunConfig) -> RunConfig:
    """A checked copy of a RunConfig (what ``train`` does with a config object: no dict round trip). A config
    validated before and unchanged since is not validated again (``is_validated``)."""
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"a run config must be a RunConfig or a mapping, got {type(cfg).__name__}")
    cfg = copy.deepcopy(cfg)
    if not is_validated(cfg):
        validate(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``. A syntax error names the file and line; an empty file is refused (it would
    silently train the built-in defaults: omit ``--config`` for that)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        with open(p) as f:
            data = yamlsafe.load(f, what=f"config file {str(p)!r}")  # (alias expansion bounded: yamlsafe.py)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {where}: YAML syntax error: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e}") from None
    if data is None:
        raise ConfigError(f"config file {str(p)!r} is empty; give at least one key (e.g. model.backbone), or omit "
                          f"--config to train the built-in defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                plugins: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + overrides (``["optim.lr=0.05", ...]`` or ``{"optim.lr": 0.05}``) -> RunConfig.
    ``plugins`` (``--plugin``) are appended to the config's ``plugins`` list."""
    d = load_yaml(path) if path is not None else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in budget_layer(overrides or {}).items():
        set_dotted(d, key, value)
    if plugins:
        have = d.get("plugins") or []
        if not isinstance(have, list):
            raise ConfigError(f"plugins={have!r} must be a list of file paths or module names")
        d["plugins"] = have + [p for p in plugins if p not in have]
    return from_dict(d)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
