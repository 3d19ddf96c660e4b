"""A stand-in for ``normablate.train.train`` that trains nothing: instant, deterministic, fake curves.

``normablate sweep --dry-run`` uses it to check a sweep spec, the storage, the workers and the report in
seconds before spending GPU hours; the sweep tests use it where real training is not the point. The numbers
are made up, in a plausible shape: each norm has a largest stable LR (``LR_MAX``; the run diverges above it),
accuracy peaks a decade below it, BN loses accuracy at small batches, and every seed adds a little noise.

Same contract as the real one: writes ``result.json`` and a ``last.ckpt`` (JSON, step only) under
``<log_dir>/<experiment>/<run>/``, continues from ``last.ckpt`` with ``resume=True``, calls the callbacks'
``on_validation_end`` after each validation (so Optuna pruning works), returns a ``RunResult``.
``NORMABLATE_DRYRUN_DELAY`` (seconds per run, default 0) makes runs take time, e.g. to test killing a worker.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

from .. import tasks
from ..config import RunConfig, epochs_to_steps, from_dict, to_dict, validated
from ..errors import ConfigError
from ..provenance import git_state
from ..result import RunResult

LR_MAX = {"bn": 3.0, "noisy_bn": 2.0, "masked_bn": 2.0, "gn": 1.0, "ln": 1.0, "rms": 1.0, "none": 0.3}
TRAIN_SIZE = 1000  # the made-up training set a trainer.max_epochs budget resolves against (data.train_limit if set)


def _noise(*key: object) -> float:
    """Deterministic uniform noise in [-1, 1] from ``key``."""
    h = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**63 - 1.0


def curves(cfg: RunConfig) -> dict:
    """The made-up run: final accuracy, time constant, divergence step."""
    norm = cfg.model.norm if isinstance(cfg.model.norm, str) else cfg.model.norm.get("name", "?")
    lr, bs, steps = cfg.optim.lr, cfg.data.batch_size, cfg.trainer.max_steps
    lr_max = LR_MAX.get(norm, 1.0)
    lr_opt = lr_max / 10
    quality = math.exp(-0.5 * (math.log10(lr / lr_opt) / 0.8) ** 2)
    if norm in ("bn", "noisy_bn", "masked_bn") and bs < 32:
        quality *= 1 - 0.15 * math.log2(32 / bs)
    quality *= min(1.0, 0.5 + steps / 400)
    acc = 0.1 + 0.8 * max(0.0, quality) + 0.01 * _noise(cfg.seed, norm, lr, bs, "acc")
    tau = max(5.0, steps / 5 * (1 + lr_opt / lr) / 2 * (1.5 if norm == "none" else 1.0))
    diverged = lr > lr_max
    div_step = max(2, int(steps * lr_max / lr / 3)) if diverged else None
    return {"acc": acc, "tau": tau, "div_step": div_step, "norm": norm}


def train(cfg: RunConfig | dict, callbacks: list | None = None, resume: bool = False) -> RunResult:
    cfg = from_dict(cfg) if isinstance(cfg, dict) else validated(cfg)
    if cfg.trainer.max_epochs is not None:  # as train() does once the data is loaded, against a made-up size
        cfg.trainer.max_steps = epochs_to_steps(cfg.trainer.max_epochs, cfg.data.train_limit or TRAIN_SIZE,
                                                cfg.data.batch_size)
    run = cfg.run or f"dryrun-s{cfg.seed}"
    run_dir = Path(cfg.trainer.log_dir) / cfg.experiment / run
    ckpt, result_file = run_dir / "last.ckpt", run_dir / "result.json"
    if resume and result_file.exists():
        return RunResult.load(result_file)
    if not resume and (ckpt.exists() or result_file.exists()):
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; pass resume=True")
    run_dir.mkdir(parents=True, exist_ok=True)
    c = curves(cfg)
    t, task = cfg.trainer, tasks.get(cfg.task)
    start = json.loads(ckpt.read_text())["step"] if resume and ckpt.exists() else 0
    delay = float(os.environ.get("NORMABLATE_DRYRUN_DELAY", "0"))
    history: dict[str, list] = json.loads(ckpt.read_text()).get("history", {}) if start else {}
    t0 = time.perf_counter()
    status, steps_to_target, time_to_target = "completed", None, None
    last = cfg.trainer.max_steps if c["div_step"] is None else c["div_step"]
    monitor = SimpleNamespace(history=history)
    step = start
    for step in range(start + 1, last + 1):
        frac = 1 - math.exp(-step / c["tau"])
        loss = 2.3 * (1 - 0.85 * frac * (c["acc"] - 0.1) / 0.8) * (1 + 0.02 * _noise(cfg.seed, step, c["norm"]))
        if c["div_step"] is not None:
            loss *= math.exp(6 * step / c["div_step"])
        history.setdefault("train/loss", []).append([step, loss])
        if step % t.val_every == 0 or step == last:
            if delay:
                time.sleep(delay * min(t.val_every, last) / last)
            acc = 0.1 + (c["acc"] - 0.1) * frac if c["div_step"] is None else 0.1
            vloss = 2.3 * (1 - 0.85 * (acc - 0.1) / 0.8)
            fake_value = {"loss": vloss, "acc": acc, "ppl": math.exp(vloss)}  # by the task's metric names
            metrics = {m: fake_value[m.split("/", 1)[1]] for m in sorted(task.metrics, key=lambda m: m != "val/loss")}
            for k, v in metrics.items():
                history.setdefault(k, []).append([step, v])
            if t.target_metric and steps_to_target is None:
                v = metrics[t.target_metric]
                if (v >= t.target_value) if task.direction(t.target_metric) == "maximize" else \
                        (v <= t.target_value):
                    steps_to_target, time_to_target = step, time.perf_counter() - t0
            fake = SimpleNamespace(callback_metrics=metrics, global_step=step, sanity_checking=False,
                                   callbacks=[monitor], max_steps=t.max_steps)
            for cb in callbacks or []:
                cb.on_validation_end(fake, None)
            ckpt.write_text(json.dumps({"step": step, "history": history}))
    if c["div_step"] is not None:
        status = "diverged"
    wall = time.perf_counter() - t0
    final = {k: v[-1][1] for k, v in history.items() if k.startswith("val/")}
    best = {k: (max if task.direction(k) == "maximize" else min)(x[1] for x in v) for k, v in history.items()
            if k.startswith("val/")}
    losses = [v for _, v in history.get("train/loss", []) if math.isfinite(v)]
    test = {}  # the held-out test split: validation's numbers plus a little split noise (a generalization gap)
    if status == "completed":
        test = {k.replace("val/", "test/"): v + (0.01 if k.endswith("acc") else 0.02) * _noise(cfg.seed, k, "test")
                for k, v in final.items() if k in ("val/acc", "val/loss")}
        # the run measures a hypothesis may contrast (normablate.measures), when the config turns them on: fake
        # but plausible numbers, so `sweep --dry-run` exercises a spec's measure hypotheses end to end
        if cfg.trainer.batchstat_gap != "off":
            test["test/train_eval_gap"] = 0.05 + 0.02 * _noise(cfg.seed, repr(cfg.model.norm), "gap")
            if cfg.trainer.precise_bn:
                test["test/train_eval_gap_precise"] = 0.01 * _noise(cfg.seed, repr(cfg.model.norm), "gap_precise")
    probes = {}
    if cfg.probes.enabled and status == "completed":
        if cfg.probes.landscape:
            probes.update({f"probe/{k}": base * (1.2 + 0.1 * _noise(cfg.seed, repr(cfg.model.norm), k))
                           for k, base in (("loss_range", 0.3), ("grad_pred", 3.0), ("beta", 20.0))})
        if cfg.probes.ics:
            probes.update({"probe/ics_l2/first": 0.0, "probe/ics_cos/first": 1.0,
                           "probe/ics_l2/second": 0.2 + 0.02 * _noise(cfg.seed, repr(cfg.model.norm), "ics"),
                           "probe/ics_cos/second": 0.95 + 0.01 * _noise(cfg.seed, repr(cfg.model.norm), "cos")})
    commit, dirty = git_state()
    result = RunResult(
        run_dir=str(run_dir), status=status, steps=step, final=final, best=best, diverged_step=c["div_step"],
        steps_to_target=steps_to_target, time_to_target=time_to_target,
        train_loss_auc=sum(losses) / len(losses) if losses else None, wall_time=wall,
        throughput=step * cfg.data.batch_size / max(wall, 1e-6), history=history, config=to_dict(cfg), test=test,
        probes=probes, versions={"git_commit": commit, "git_dirty": str(dirty)})  # (the record's git part, as train's)
    result.save(result_file)
    return result
