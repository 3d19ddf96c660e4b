"""``trainer.speed``: each run at the fastest setting that keeps its math, chosen once and recorded.

``trainer.speed: auto`` (the default) resolves ``trainer.channels_last`` and ``trainer.compile`` that the config
leaves unset (null) from a small rule table (``RULES``); ``trainer.speed: eager`` leaves both off (the plain path).
A ``true``/``false`` given for either key is an explicit override and always wins.

Why a rule table, not a measurement at run time: a measurement inside a run costs seconds of every run, and on a
shared machine its noise could flip the choice between two seeds of one study, so that they no longer differ in
the seed alone. The table is read off the committed bench (``normablate bench --only models``, rows "auto vs
eager", and ``docs/benchmarks.md``), measured interleaved on the machines named there:

- channels-last memory for CNNs (image-layout backbones) on CPU: the same math, not the same bits (tests compare
  it with the default within float tolerance). VGG-11 (width 0.25, batch 128, 1 thread, 2-core AVX2 EPYC) steps
  take 0.64-0.94x the NCHW time with every image norm but ``batch_renorm``, which measured 1.31x (its
  per-channel corrections are elementwise ops that PyTorch runs slower on NHWC): it stays NCHW. So does ghost BN
  (``ghost_batch_size``): its fused kernel is NCHW-only, channels-last runs composed ops at 2-2.7x.
- ``torch.compile``: never chosen. It costs 9-30 s per process (and recompiles for variable lengths), needs a C++
  compiler, and measured both faster and slower by model and norm (issue 29: VGG bn 0.82x, VGG none 1.26x,
  Transformers ~1.0x): at the studies' 1,000-step runs it does not pay reliably. ``trainer.compile: true`` still
  turns it on.
- threads: left as configured (a sweep gives each worker one thread, which measured faster than one process
  with two threads on this 2-core machine: ``normablate bench --only sweep``).
- GPUs: eager (nothing measured there).

The choice never changes under a run or a study:
- a resumed run keeps the setting its first start recorded in its ``config.yaml``;
- every run under ``<log_dir>/<experiment>/`` (a sweep study's folder) with the same model signature (backbone,
  norm, accelerator) takes the setting the experiment's first such run pinned in
  ``<log_dir>/<experiment>/.speed/<signature hash>.json``: seeds appended to a study later, even by a newer version
  of this table, run exactly as the first ones. Without a pin (a study run before trainer.speed existed), the
  setting recorded in the config.yaml of an earlier run of the same signature there is adopted and pinned (runs from
  before recorded channels_last/compile false: NCHW, no compile).
The resolved values are written back into the config (so ``config.yaml``, ``RunResult.config`` and HPARAMS show
``trainer.channels_last`` / ``trainer.compile``), and ``RunResult.versions["speed"]`` says where they came from.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

RULES_VERSION = 1
# image norms whose train step measured slower in channels-last memory (VGG-11 w0.25 b128, 1 thread, 1.31x)
CHANNELS_LAST_SLOWER = frozenset({"batch_renorm"})
KNOBS = ("channels_last", "compile")


def norm_name(norm: Any) -> str:
    return str(norm.get("name", "") if isinstance(norm, dict) else norm)


def signature(cfg) -> str:
    """What the choice depends on: backbone, norm spec (with its options) and accelerator."""
    return json.dumps({"backbone": cfg.model.backbone, "norm": cfg.model.norm,
                       "accelerator": cfg.trainer.accelerator}, sort_keys=True, default=str)


def rule(cfg) -> tuple[dict[str, bool], str]:
    """The rule table: ({knob: value}, why) for this config (see the module docstring)."""
    from . import models

    t = cfg.trainer
    if t.accelerator not in ("cpu",):
        return {"channels_last": False, "compile": False}, f"rules v{RULES_VERSION}: not CPU, eager"
    cnn = models.layout(cfg.model.backbone) == "image"
    # ghost BN's fused image kernel takes NCHW only; in channels-last it runs composed ops (2-2.7x, norms/batch.py)
    ghost = isinstance(cfg.model.norm, dict) and bool(cfg.model.norm.get("ghost_batch_size"))
    slower = norm_name(cfg.model.norm) in CHANNELS_LAST_SLOWER or ghost
    why = ("CNN: channels-last" if cnn and not slower else
           "CNN, but this norm measured slower in channels-last: NCHW" if cnn else "not a CNN: eager")
    return {"channels_last": cnn and not slower, "compile": False}, f"rules v{RULES_VERSION}: {why}, no compile"


def _pin_path(cfg) -> Path:
    digest = hashlib.sha1(signature(cfg).encode()).hexdigest()[:16]
    return Path(cfg.trainer.log_dir) / cfg.experiment / ".speed" / f"{digest}.json"


def _read_json(path: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        d = json.loads(path.read_text())
        if isinstance(d, dict) and all(isinstance(d.get(k), bool) for k in KNOBS):
            return d
    return None


def _pin(cfg, chosen: dict[str, bool], why: str, write: bool) -> tuple[dict[str, bool], str]:
    """The experiment's pinned choice for this signature; the first run of the signature writes ``chosen``
    (created exclusively, so concurrent first runs agree on one file)."""
    path = _pin_path(cfg)
    pinned = _read_json(path)
    if pinned is not None:
        return {k: pinned[k] for k in KNOBS}, f"pinned by {path} ({pinned.get('why', '')})"
    earlier = _earlier_run(cfg)  # a study run before pins existed: its runs' recorded setting is the pin
    if earlier is not None:
        chosen, why = earlier
    if write:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**chosen, "why": why, "signature": json.loads(signature(cfg))}, indent=1))
            try:
                os.link(tmp, path)  # atomic and exclusive: the first writer wins
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            pinned = _read_json(path)
            if pinned is not None:
                return {k: pinned[k] for k in KNOBS}, f"pinned by {path} ({pinned.get('why', '')})"
    return chosen, why


def _earlier_run(cfg) -> tuple[dict[str, bool], str] | None:
    """The setting recorded by a run of the same signature already in the experiment folder (its config.yaml; runs
    from before trainer.speed recorded false/false), or None."""
    import yaml

    root = Path(cfg.trainer.log_dir) / cfg.experiment
    want = json.loads(signature(cfg))
    with contextlib.suppress(OSError):
        for conf in sorted(root.glob("*/config.yaml")):
            with contextlib.suppress(OSError, ValueError, AttributeError, yaml.YAMLError):
                d = yaml.safe_load(conf.read_text()) or {}
                m, t = d.get("model", {}) or {}, d.get("trainer", {}) or {}
                got = {"backbone": m.get("backbone"), "norm": m.get("norm"), "accelerator": t.get("accelerator", "cpu")}
                if json.loads(json.dumps(got, sort_keys=True, default=str)) == want and all(
                        t.get(k) is None or isinstance(t.get(k), bool) for k in KNOBS):
                    return {k: bool(t.get(k)) for k in KNOBS}, f"as the experiment's earlier run {conf.parent.name}"
    return None


def resolve(cfg, run_dir: Path, resuming: bool, write: bool = True) -> str:
    """Set ``cfg.trainer.channels_last`` and ``cfg.trainer.compile`` (in place) to booleans and return where they
    came from (recorded as ``RunResult.versions["speed"]``). ``write``: this process may create the experiment's pin
    file (global rank 0)."""
    t = cfg.trainer
    if resuming:  # the run's own record wins over everything: a run never changes its setting mid-way
        recorded = {}
        with contextlib.suppress(OSError, ValueError, AttributeError):
            import yaml

            recorded = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("trainer", {}) or {}
        # a run started before trainer.speed existed recorded booleans (default false): it keeps them
        old = {k: bool(recorded.get(k)) for k in KNOBS}
        asked = {k: getattr(t, k) for k in KNOBS if getattr(t, k) is not None and getattr(t, k) != old[k]}
        for k in KNOBS:
            setattr(t, k, old[k])
        return "resumed: as recorded in the run's config.yaml" + (
            f" (overrides {asked} ignored: a run keeps its setting)" if asked else "")
    explicit = {k: getattr(t, k) for k in KNOBS if getattr(t, k) is not None}
    if t.speed == "eager":
        chosen, why = {"channels_last": False, "compile": False}, "eager"
    else:
        chosen, why = rule(cfg)
        if len(explicit) < len(KNOBS):  # something left to choose: the experiment's pin, if any, decides it
            chosen, why = _pin(cfg, chosen, why, write)
    for k in KNOBS:
        setattr(t, k, explicit.get(k, chosen[k]))
    if explicit:
        why += f"; explicit {', '.join(f'trainer.{k}={v}' for k, v in explicit.items())}"
    return f"{t.speed}: " + setting(t) + f" ({why})"


def setting(t) -> str:
    """A short name of a resolved setting: 'channels_last+compile', 'channels_last', 'compile' or 'eager'."""
    on = [k for k in KNOBS if getattr(t, k)]
    return "+".join(on) or "eager"


def _channels_last_inputs(module: torch.nn.Module, args: tuple) -> tuple:  # noqa: ARG001
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


def apply(model: torch.nn.Module, t) -> torch.nn.Module:
    """Apply a resolved ``trainer.channels_last`` / ``trainer.compile`` to a built model; neither changes its math."""
    if t.channels_last:  # NHWC weights and inputs (a pre-hook converts 4-D inputs, e.g. image batches)
        model = model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(_channels_last_inputs)
    if t.compile:
        model.compile()  # in place (nn.Module.compile): state_dict keys and checkpoints stay as without it
    return model
