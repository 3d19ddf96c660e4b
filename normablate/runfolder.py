"""The run folder: where a run lives, whether it may start or continue there, and what it writes first.

``prepare(cfg, resume)`` makes every decision about ``<log_dir>/<experiment>/<run>/`` before anything in it is
written: a fresh run refuses a folder that already holds one; ``--resume`` of a finished run returns its record
(or refuses a different config); ``--resume`` from ``last.ckpt`` checks the checkpoint's CRCs and its *identity*:

- The checkpoint stores the resolved config it was trained with and the torch thread count (``RunIdentity``, a
  Lightning callback: ``checkpoint["normablate"]``). A resume whose config differs in any key that can change
  what the run computes or records is refused (``ConfigError``, exit 2) with every differing key, old -> new.
- Keys that cannot change the run (``FREE_KEYS``, each with its reason) may differ, and ``trainer.max_steps`` /
  ``trainer.max_epochs`` may grow; such changes are written to ``resumes.jsonl`` in the run folder.
- Threads: with ``trainer.threads`` unset the resumed run restores the count of the run it continues; a different
  explicit count is refused unless ``trainer.allow_thread_change=true``. ``resumes.jsonl`` says which, either way.
- A checkpoint written before identity was stored resumes as before, with one warning line.

Only then does ``start(folder, cfg, versions)`` create the folder and write ``config.yaml``, ``versions.json``
and (resuming) one ``resumes.jsonl`` line; ``train()`` calls the two around nothing else.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from .config import RunConfig, to_dict, to_yaml
from .dotted import flatten
from .errors import ConfigError, RunFileError
from .result import RunResult

log = logging.getLogger(__name__)

IDENTITY_KEY = "normablate"  # the checkpoint's top-level key holding {"config", "torch_threads", "format"}
RESUMES = "resumes.jsonl"

# Keys that may differ between a run and its resume: none can change the numbers a run computes or records.
# Anything not listed here (and not a budget or thread key below) is refused when it differs; a key added to
# the config later is refused by default too, until someone argues it onto this list.
FREE_KEYS: dict[str, str] = {
    "trainer.progress": "a progress bar on the terminal; nothing is computed differently",
    "trainer.log_every": "how often training scalars are sent to TensorBoard; the run's history records every "
                         "step regardless, and the gradient norm it logs is read-only",
    "trainer.log_dir": "where the run folder lives (a moved folder still resumes)",
    "trainer.loggers": "which logger backends receive the scalars; the run's own record (history, result) is the same",
    "experiment": "the run folder's parent name",
    "run": "the run folder's name",
    "data.cache_dir": "where decoded tensors are cached; the tensors themselves are the same",
    "plugins": "which files register norms/backbones; the names the config uses are compared themselves",
    "trainer.allow_thread_change": "a permission for this resume (below), not a setting of the run",
}
# Refused on purpose though they look harmless (reason, for the error message):
REFUSED_REASONS: dict[str, str] = {
    "trainer.val_every": "which steps are validated (and steps-to-target, best-of-validations)",
    "trainer.val_batches": "the validation set the run's metrics are measured on",
    "data.val_batch_size": "the batch size of the train/eval-gap validation",
    "trainer.divergence_factor": "when the run is judged diverged",
    "trainer.target_metric": "the target record (steps before the resume were judged against the old one)",
    "trainer.target_value": "the target record (steps before the resume were judged against the old one)",
}
BUDGET_KEYS = ("trainer.max_steps", "trainer.max_epochs")  # may grow on resume (recorded), never shrink
THREAD_KEYS = ("trainer.threads",)  # the thread rule below, not a plain comparison
# Settled by their own module on resume: normablate/speed.py gives a resumed run the channels_last / compile of
# its config.yaml whatever is asked now (and records an ignored ask in versions.json "speed").
OWN_RULE_KEYS = ("trainer.speed", "trainer.channels_last", "trainer.compile")


def default_run_name(cfg: RunConfig) -> str:
    """``<backbone>-<norm>-lr<lr>-bs<batch>-s<seed>``. A norm given with options gets them in its part
    (``bn_momentum=0.01``), or a short hash of them when they do not fit a folder name; a plain norm name (or
    ``{name: bn}`` alone) keeps the name it always had, so older run folders still resume."""
    norm = cfg.model.norm
    if isinstance(norm, dict):
        opts = {k: v for k, v in norm.items() if k != "name"}
        name = str(norm.get("name", "norm"))
    else:
        opts, name = {}, str(norm)
    part = name.replace(":", "_").replace(".", "_")
    if opts:
        readable = "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(opts.items()))
        scalar = all(isinstance(v, (int, float, str, bool)) or v is None for v in opts.values())
        if scalar and len(readable) <= 40 and re.fullmatch(r"[A-Za-z0-9_.=+-]+", readable):
            part += "_" + readable
        else:
            digest = hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:8]
            part += "_h" + digest
    backbone = cfg.model.backbone.replace("/", "_")  # timm/resnet18 -> timm_resnet18: one folder, not two
    return f"{backbone}-{part}-lr{cfg.optim.lr:g}-bs{cfg.data.batch_size}-s{cfg.seed}"


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.trainer.log_dir) / cfg.experiment / (cfg.run or default_run_name(cfg))


def check_checkpoint(path: Path) -> None:
    """Refuse a checkpoint that cannot be read (truncated copy, disk error): every member's CRC is checked (a torch
    checkpoint is a zip archive). The file is left as it is."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            problem = f"member {bad!r} fails its CRC check" if bad else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        problem = str(e) or type(e).__name__
    if problem:
        raise RunFileError(f"checkpoint {str(path)!r} is unreadable ({problem}: truncated or corrupt); it is left as "
                           f"is. Move it away to start this run over from step 0 (or restore a good copy), then run "
                           f"the command again")


def check_writable(run_dir: Path) -> None:
    """Create the run folder and prove it writable before any compute; otherwise one line naming it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        where = e.filename or run_dir
        raise RunFileError(f"cannot write the run folder {str(run_dir)!r} ({e.strerror or e}: {str(where)!r}); make "
                           f"it writable or set trainer.log_dir to a writable folder") from None


# ------------------------------------------------------------------------------------------ identity
class RunIdentity(L.Callback):
    """Stores the run's resolved config and torch thread count in every checkpoint (``checkpoint["normablate"]``),
    read back by ``prepare`` before a resume loads any state. A callback rather than a LightningModule hook: the
    task does not know the whole config, and this keeps the record next to the code that reads it."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg  # the object itself: trainer.max_steps resolved from max_epochs after data is read is seen

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[IDENTITY_KEY] = {"format": 1, "config": to_dict(self.cfg), "torch_threads": torch.get_num_threads()}


def read_identity(ckpt: Path) -> tuple[dict | None, int | None]:
    """(the stored identity or None for an older checkpoint, the checkpoint's global step). Loaded with
    ``weights_only=True`` and memory-mapped, so no tensor is read and no code in the file can run."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFileError(f"checkpoint {str(ckpt)!r} cannot be loaded safely (weights_only=True refused it: "
                           f"{first[:200]}); only resume run folders you or your sweeps wrote. Move it away to start "
                           f"this run over from step 0") from None
    ident = state.get(IDENTITY_KEY) if isinstance(state, dict) else None
    step = state.get("global_step") if isinstance(state, dict) else None
    return (ident if isinstance(ident, dict) and isinstance(ident.get("config"), dict) else None), step


def _flat(d: dict) -> dict[str, Any]:
    """``{"model": {"width": 8}}`` -> ``{"model.width": 8}``: one level below the sections; values inside a key
    (a norm dict, a list) stay whole."""
    return flatten(d, descend=lambda key: key in ("model", "data", "optim", "trainer", "probes"))


def _same(a: Any, b: Any) -> bool:
    """Equal as the config records them (tuple == list, 1 == 1.0 as YAML/JSON would store them)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str) or a == b


def _normalized(old: dict) -> dict:
    """A stored config as this code's validation writes it: older spellings of a key (an alias folded into its new
    name) compare equal to the new ones. The stored form as is when it no longer validates (a removed key, a
    plug-in not loaded here)."""
    from .config import from_dict

    d = json.loads(json.dumps(old, default=str))
    trainer = d.get("trainer")
    if isinstance(trainer, dict) and trainer.get("max_epochs") is not None:
        trainer["max_steps"] = None  # the recorded steps are what max_epochs resolved to: not a second budget
    try:
        return to_dict(from_dict(d))
    except (ConfigError, TypeError, ValueError, KeyError):
        return old


def _defaults(backbone: str) -> dict[str, Any]:
    """What an absent key means: the dataclass default, or (model options) the backbone builder's default."""
    from . import models

    d = _flat(to_dict(RunConfig()))
    try:
        d.update({f"model.{k}": v for k, v in models.options(backbone).items()})
    except (KeyError, ConfigError):
        pass
    return d


@dataclass
class Diff:
    refused: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (old, new)
    allowed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # keys the stored config has and this code no longer knows


MISSING = "(absent)"


def compare(old: dict, new: dict) -> Diff:
    """Classify every key whose value differs between a stored config (``old``) and this one (``new``), both in
    ``to_dict`` form. A key absent on one side counts as its default (a key added to the config since the run
    started is the same run when it keeps its default)."""
    a, b = _flat(_normalized(old)), _flat(new)
    dflt = _defaults(str(b.get("model.backbone", "")))
    diff = Diff()
    for key in sorted(set(a) | set(b)):
        if key in THREAD_KEYS or key in OWN_RULE_KEYS:
            continue
        if key not in b and key not in dflt:  # the stored config has a key this code does not know
            diff.dropped.append(key)
            continue
        va, vb = a.get(key, dflt.get(key, MISSING)), b.get(key, dflt.get(key, MISSING))
        if _same(va, vb):
            continue
        if key in FREE_KEYS:
            diff.allowed[key] = (va, vb)
        elif key in BUDGET_KEYS:
            if vb is None or va is None:  # a budget in epochs given for one in steps, or back: recorded
                diff.allowed[key] = (va, vb)
                continue
            (diff.allowed if isinstance(va, int) and isinstance(vb, int) and vb > va else diff.refused)[key] = (va, vb)
        else:
            diff.refused[key] = (va, vb)
    return diff


def _listing(changes: dict[str, tuple[Any, Any]]) -> str:
    def show(v: Any) -> str:
        return v if v is MISSING else json.dumps(v, default=str)

    return "; ".join(f"{k}: {show(o)} -> {show(n)}" + (f" ({REFUSED_REASONS[k]})" if k in REFUSED_REASONS else "")
                     for k, (o, n) in changes.items())


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class RunFolder:
    """What ``prepare`` decided. ``finished``: return this record, nothing runs. ``resuming``: load ``ckpt``."""

    run_dir: Path
    ckpt: Path
    result_file: Path
    resuming: bool = False
    finished: RunResult | None = None
    step: int | None = None  # the checkpoint's step
    identity: str = ""  # "checked" | "unchecked (...)" when resuming
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # allowed differences, old -> new
    threads: dict[str, Any] = field(default_factory=dict)  # the thread record of a resume
    unknown: list[str] = field(default_factory=list)  # stored keys this code no longer has (not compared)

    def resume_record(self) -> dict[str, Any]:
        return {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "step": self.step,
                "identity": self.identity, "changed": {k: [o, n] for k, (o, n) in self.changes.items()},
                "threads": self.threads, **({"unknown_keys": self.unknown} if self.unknown else {})}


def prepare(cfg: RunConfig, resume: bool, is_zero: bool = True) -> RunFolder:
    """Every check on the run folder, before anything in it is written. May set ``cfg.trainer.threads`` (a
    restored thread count). Raises ConfigError / RunFileError (exit 2) naming the folder and what to do."""
    if cfg.run is None:
        cfg.run = default_run_name(cfg)
    run_dir = run_dir_of(cfg)
    folder = RunFolder(run_dir, run_dir / "last.ckpt", run_dir / "result.json")
    here = to_dict(cfg)
    if resume and folder.result_file.exists():
        done = RunResult.load(folder.result_file)
        if done.status in ("completed", "diverged"):
            if done.config:
                diff = compare(done.config, here)
                budget = {k: v for k, v in diff.allowed.items() if k in BUDGET_KEYS}
                if diff.refused or budget:
                    raise ConfigError(
                        f"run {str(run_dir)!r} already finished ({done.status}, {done.steps} steps) with another "
                        f"config: {_listing({**diff.refused, **budget})}. A finished run is not continued or "
                        f"changed; give this config its own run name (run=...) or drop the differences")
            log.info("run %s already finished (%s); not repeating it", run_dir, done.status)
            folder.finished = done
            return folder
    if not resume and (folder.ckpt.exists() or folder.result_file.exists()):
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue it "
                          f"or choose another run name (run=...)")
    if not (resume and folder.ckpt.exists()):
        return folder
    check_checkpoint(folder.ckpt)  # a damaged file: one clear line now, not a traceback from deep inside Lightning
    folder.resuming = True
    ident, folder.step = read_identity(folder.ckpt)
    if ident is None:
        folder.identity = "unchecked (checkpoint written before identity was stored)"
        if is_zero:
            log.warning("warning: %s was written before checkpoints stored their config; the identity of this "
                        "resume (same config, same threads) cannot be checked", folder.ckpt)
        folder.threads = {"now": cfg.trainer.threads, "how": "unknown (not stored)"}
        return folder
    diff = compare(ident["config"], here)
    if diff.refused:
        raise ConfigError(f"--resume of {str(run_dir)!r} (step {folder.step}) with a config that changes the run: "
                          f"{_listing(diff.refused)}. Resume with the run's own config (its config is stored in the "
                          f"checkpoint), or start a new run under another name (run=...)")
    folder.identity = "checked"
    folder.changes, folder.unknown = diff.allowed, diff.dropped
    folder.threads = _thread_rule(cfg, ident, run_dir)
    return folder


def _thread_rule(cfg: RunConfig, ident: dict, run_dir: Path) -> dict[str, Any]:
    """Restore the thread count of the run being continued when ``trainer.threads`` is unset; refuse a different
    explicit count unless ``trainer.allow_thread_change``. The count is what changes float rounding (reduction
    order in matmuls and convolutions), so a continuation with another count is not the uninterrupted run."""
    before = ident.get("torch_threads")
    old_cfg = (ident["config"].get("trainer") or {}).get("threads")
    asked = cfg.trainer.threads
    record: dict[str, Any] = {"before": before, "before_config": old_cfg, "asked": asked}
    if before is None:
        record.update(now=asked, how="unknown (not stored)")
    elif asked is None or asked == before:
        cfg.trainer.threads = before
        record.update(now=before, how="restored" if asked is None else "same")
    elif getattr(cfg.trainer, "allow_thread_change", False):
        record.update(now=asked, how="changed (trainer.allow_thread_change=true)")
    else:
        raise ConfigError(
            f"trainer.threads={asked}: the run {str(run_dir)!r} ran with {before} torch thread(s) (trainer.threads="
            f"{old_cfg}); another count changes float rounding, so the continuation would not equal the "
            f"uninterrupted run. Leave trainer.threads unset (the run's count is restored), set trainer.threads="
            f"{before}, or pass trainer.allow_thread_change=true to continue with {asked} (recorded in {RESUMES})")
    return record


def start(folder: RunFolder, cfg: RunConfig, versions: dict[str, str]) -> None:
    """After ``prepare`` passed (global rank 0 only): create the folder, prove it writable, write ``config.yaml``,
    ``versions.json`` and, for a resume, one line of ``resumes.jsonl``."""
    check_writable(folder.run_dir)
    (folder.run_dir / "config.yaml").write_text(to_yaml(cfg))
    (folder.run_dir / "versions.json").write_text(json.dumps(versions, indent=1))
    if folder.resuming:
        with open(folder.run_dir / RESUMES, "a") as f:
            f.write(json.dumps(folder.resume_record(), default=str) + "\n")
