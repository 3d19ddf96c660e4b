"""The held-out test split, and evaluating a saved run on any split.

Three splits (README "Metric definitions"): everything a study *chooses* (best LR, best configuration, early
stopping, pruning, steps-to-target, the ``search`` objective) looks at the validation split; the test split is
looked at once, at the end of a run, and only reported. So:

- ``BestWeights`` keeps the model weights of the best validation so far (``trainer.select_metric``) in
  ``best.pt`` beside ``last.ckpt``; its best value and step travel in the checkpoint, so a resumed run keeps them.
- ``test_at_end`` evaluates the final model on the test split (``RunResult.test``) and, when the best validation
  came earlier, the best weights too (``RunResult.test_at_best``): the numbers a ``metric_at: best`` selection
  would report.
- ``evaluate_run`` / ``normablate evaluate RUN_DIR [--split val|test] [--stats running|batch|precise]``
  evaluates a run folder's checkpoint, also one written before the three splits existed, and writes the result
  beside it (``eval/<checkpoint>-<split>-<stats>.json``).

Evaluation runs through Lightning's test loop (``NormTask.test_step``), so precision, device and data-parallel
reduction are those of validation.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, RunFileError

SPLITS = ("val", "test")
STATS = ("running", "batch", "precise")


def better(direction: str, new: float, old: float | None) -> bool:
    """Is ``new`` an improvement on ``old`` for a metric of ``direction`` (``"maximize"``: higher, else lower;
    ``tasks.get(task).direction(metric)``)?"""
    if not math.isfinite(new):
        return False
    return old is None or (new > old if direction == "maximize" else new < old)


# --------------------------------------------------------------------------------------------- during a run
try:
    import lightning as L

    _Callback = L.Callback
except ImportError:  # pragma: no cover
    _Callback = object


class BestWeights(_Callback):
    """Keep the weights of the best validation so far (by ``metric``) in ``<run_dir>/best.pt`` (global rank 0
    writes it, atomically). Must run before the callback that writes ``last.ckpt`` at the same validation, so the
    checkpoint records this validation's best (train() puts it first)."""

    def __init__(self, run_dir: Path, metric: str, direction: str) -> None:
        self.path = Path(run_dir) / "best.pt"
        self.metric, self.direction = metric, direction  # direction: the task's (tasks.get(task).direction(metric))
        self.best: float | None = None
        self.best_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "metric": self.metric}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        v = float(trainer.callback_metrics[self.metric])
        if not better(self.direction, v, self.best):
            return
        self.best, self.best_step = v, int(trainer.global_step)
        if trainer.is_global_zero:
            state = {k: t.detach().to("cpu", copy=True) for k, t in pl_module.model.state_dict().items()}
            tmp = self.path.with_suffix(".pt.tmp")
            torch.save({"state_dict": state, "step": self.best_step, "metric": self.metric, "value": v}, tmp)
            os.replace(tmp, self.path)


def evaluate_split(trainer, task, datamodule, split: str = "test", stats: str = "running",
                   prefix: str | None = None) -> dict[str, float]:
    """Metrics of ``task.model`` on ``split`` through Lightning's test loop: ``{f"{prefix}/loss": ..}``."""
    datamodule.eval_split = split
    task.eval_prefix, task.eval_stats = prefix or split, stats
    out = trainer.test(task, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in (out[0] if out else {}).items()}


def test_at_end(trainer, task, datamodule, best: BestWeights | None, final_step: int
                ) -> tuple[dict[str, float], dict[str, float]]:
    """(test metrics of the final model, test metrics of the best-validation weights or {} when those are the
    final ones). The final weights are back in the model afterwards. A run that measures the train/eval gap
    (``trainer.batchstat_gap`` on, batch-statistics norms in the model) measures it on the test split too:
    ``test/loss_batchstats``, ``test/train_eval_gap`` and, with PreciseBN, ``test/train_eval_gap_precise``."""
    task.test_gap = task.test_gap_measured()
    try:
        test = evaluate_split(trainer, task, datamodule, "test")
        at_best: dict[str, float] = {}
        if best is not None and best.best_step is not None and best.best_step != final_step:
            trainer.strategy.barrier()  # rank 0 wrote best.pt; every rank reads it
            saved = {k: t.detach().clone() for k, t in task.model.state_dict().items()}
            state = torch.load(best.path, map_location="cpu", weights_only=True)["state_dict"]
            task.model.load_state_dict(state)
            try:
                at_best = {k.replace("test_at_best/", "test/"): v for k, v in
                           evaluate_split(trainer, task, datamodule, "test", prefix="test_at_best").items()}
            finally:
                task.model.load_state_dict(saved)
    finally:
        task.test_gap = False
    if getattr(task, "gap_requested", False) and not task.test_gap_measured():
        # no batch-statistics norm (LN, GN, none...): eval and train mode compute the same function, so the gap a
        # hypothesis may contrast against a BN run's is exactly 0 (normablate.measures), recorded as such
        for metrics in (test, at_best):
            if metrics:
                metrics["test/train_eval_gap"] = 0.0
                if trainer_has_precise(trainer):
                    metrics["test/train_eval_gap_precise"] = 0.0
    return test, at_best


def trainer_has_precise(trainer) -> bool:
    from .precise_bn import PreciseBN

    return any(isinstance(c, PreciseBN) for c in trainer.callbacks)


# --------------------------------------------------------------------------------------------- a saved run
def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunFileError(f"no checkpoint {str(path)!r}: the run has not validated yet, or this is no run "
                           f"folder") from None
    except Exception as e:  # noqa: BLE001  a refused pickle, a truncated file
        raise RunFileError(f"checkpoint {str(path)!r} cannot be read safely (weights only): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def evaluate_run(run_dir: str | Path, split: str = "test", stats: str = "running", checkpoint: str = "last",
                 precise_batches: int | None = None, write: bool = True) -> dict[str, Any]:
    """Evaluate a run folder's checkpoint (``last``: ``last.ckpt``; ``best``: ``best.pt``) on ``split`` with
    ``stats`` statistics. Returns (and writes to ``eval/<checkpoint>-<split>-<stats>.json``) a record with the
    metrics, the step of the weights and, for runs written before the three splits, a note of what that means."""
    from . import yamlsafe
    from .config import from_dict
    from .data import build_datamodule
    from .build import build_model, build_task, quiet_lightning

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}; valid: {', '.join(SPLITS)}")
    if stats not in STATS:
        raise ConfigError(f"--stats {stats!r}; valid: {', '.join(STATS)}")
    if checkpoint not in ("last", "best"):
        raise ConfigError(f"--checkpoint {checkpoint!r}; valid: last, best")
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError(f"{str(run_dir)!r} is no run folder (no config.yaml)")
    quiet_lightning()
    raw = yamlsafe.load(cfg_file.read_text(), str(cfg_file)) or {}
    data = raw.setdefault("data", {})
    note = None
    if "test_split" not in data:  # written before the three splits: it validated (and selected) on val_split
        old_val = data.get("val_split", "test")
        if split == "val":
            raise ConfigError(f"run {str(run_dir)!r} was written before the three-split protocol: it trained on the "
                              f"whole training split and validated on {old_val!r}, so it has no untouched validation "
                              f"set; evaluate --split test")
        data.update({"val_split": None, "test_split": old_val})
        note = (f"written before the three-split protocol: this run chose (best LR, early stop) on split {old_val!r}, "
                f"the split evaluated here, so these test numbers are not held out from selection")
    raw.setdefault("trainer", {})["progress"] = False
    cfg = from_dict(raw)
    dm = build_datamodule(cfg.data, cfg.task, cfg.seed)
    dm.prepare_data()
    dm.setup("fit")
    model = build_model(cfg, dm)
    task = build_task(cfg, model, dm)
    if checkpoint == "last":
        ckpt = _load_checkpoint(run_dir / "last.ckpt")
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        step = int(ckpt.get("global_step", 0))
    else:
        ckpt = _load_checkpoint(run_dir / "best.pt")
        state, step = ckpt["state_dict"], int(ckpt.get("step", 0))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RunFileError(f"the checkpoint of {str(run_dir)!r} does not fit the model its config.yaml builds: "
                           f"{str(e).splitlines()[0]}") from None
    if stats == "precise":
        from .precise_bn import bn_layers, population_stats, recent_steps

        if not bn_layers(model):
            raise ConfigError(f"--stats precise: the model of {str(run_dir)!r} has no BatchNorm-family layer")
        n = precise_batches or cfg.trainer.precise_bn or 100
        task.precise_stats = population_stats(task, (dm.train_batch(s) for s in recent_steps(step, n)), task.loss)
    import lightning as L

    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    t0 = time.perf_counter()
    metrics = evaluate_split(trainer, task, dm, split, stats)
    record = {"run_dir": str(run_dir), "checkpoint": checkpoint, "step": step, "split": split, "stats": stats,
              "metrics": metrics, "seconds": round(time.perf_counter() - t0, 3),
              "examples": getattr(dm, f"num_{split}"), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if stats == "precise":
        record["precise_batches"] = n
    if note:
        record["note"] = note
    if write:
        out = run_dir / "eval" / f"{checkpoint}-{split}-{stats}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
        record["file"] = str(out)
    return record


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a run folder (lightning_logs/<experiment>/<run>/)")
    p.add_argument("--split", default="test", choices=SPLITS, help="which split to evaluate (default: test)")
    p.add_argument("--stats", default="running", choices=STATS,
                   help="BN statistics: running (eval mode), batch (the batch's own), precise (PreciseBN)")
    p.add_argument("--checkpoint", default="last", choices=("last", "best"),
                   help="last.ckpt, or best.pt (the best validation's weights)")
    p.add_argument("--precise-batches", type=int, default=None,
                   help="--stats precise: training batches for the population statistics (default: the run's "
                        "trainer.precise_bn, else 100)")


def cmd_evaluate(args) -> int:
    if args.precise_batches is not None and args.precise_batches < 1:
        raise ConfigError(f"--precise-batches={args.precise_batches} must be >= 1")
    rec = evaluate_run(args.run_dir, args.split, args.stats, args.checkpoint, args.precise_batches)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in rec["metrics"].items())
    print(f"{rec['run_dir']} step {rec['step']} ({rec['checkpoint']}), {rec['split']} split, {rec['stats']} "
          f"statistics: {shown}")
    if rec.get("note"):
        print(f"note: {rec['note']}")
    print(f"written: {rec['file']}")
    return 0
