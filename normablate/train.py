"""``train(cfg) -> RunResult``: one configured run, end to end. The CLI, the tests and the sweeps all call it.

``train`` reads as its four stages: ``prepare`` (the config validated once, this machine's checks, the run folder,
seeds and data), ``build`` (the model, built once, and its task), ``fit`` (Lightning, then the test split once) and
``record`` (the RunResult, the loggers' final metrics, result.json). The run directory
``<log_dir>/<experiment>/<run>/`` holds the TensorBoard events, ``config.yaml`` (resolved), ``versions.json``
(libraries, git commit: provenance.py), ``last.ckpt`` and, once finished, ``result.json``.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from . import footprint, runfolder, speed, tasks
from .build import build_model, build_task, quiet_lightning
from .callbacks import RunInterrupted, RunMonitor
from .config import RunConfig, check_hardware, epochs_to_steps, from_dict, to_dict, validated
from .dotted import flatten
from .errors import ConfigError
from .evaluate import BestWeights, test_at_end
from .norms import sync
from .precise_bn import PreciseBN
from .probes.callback import summarize as summarize_probes
from .progress import plain_progress, step_progress_bar
from .provenance import versions
from .result import RunResult
from .runfolder import RunIdentity
from .signals import stop_on_signals
from .tblog import final_metrics, finish, log_final, log_hparams, make_loggers, tensorboard_of

log = logging.getLogger(__name__)


def _flat(d: dict) -> dict[str, object]:
    """Hyperparameters for the loggers: every level opened but a ``norm`` mapping; a value that is not a scalar
    (a norm dict, a list, None) as JSON."""
    flat = flatten(d, descend=lambda key: key.rsplit(".", 1)[-1] != "norm")
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat.items()}


def speed_options(model: torch.nn.Module, t) -> torch.nn.Module:
    """``trainer.channels_last`` and ``trainer.compile`` (resolved by ``speed.resolve``) applied to a built model;
    neither changes its math (normablate/speed.py)."""
    return speed.apply(model, t)


def _make_trainer(**kwargs) -> L.Trainer:
    """``L.Trainer(**kwargs)``; Lightning's refusal of a setting (precision, accelerator, devices, strategy on this
    machine) becomes a ConfigError naming the trainer keys, before any training step."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        trainer = L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        keys = ", ".join(f"trainer.{k}={kwargs[k]!r}" for k in ("accelerator", "devices", "strategy", "precision"))
        raise ConfigError(f"Lightning refuses the trainer settings ({keys}): {str(e).splitlines()[0]}") from e
    # Ours alone decide where a signal stops a run (signals.stop_on_signals, callbacks.RunMonitor: at a step boundary,
    # checkpointed, every rank together). Lightning's, installed at each fit/test, raise SIGTERMException wherever
    # they land and, under DDP, signal the other ranks and broadcast from inside the handler. (Private: Lightning has
    # no switch for it; a version without the attribute keeps its handlers, and RunMonitor still replaces them.)
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and hasattr(connector, "register_signal_handlers"):
        connector.register_signal_handlers = lambda: None
    return trainer


@dataclass
class Prepared:
    """What ``prepare`` hands on: the validated config, its run folder and data, and this process's part."""

    cfg: RunConfig
    folder: Any  # runfolder.Folder
    datamodule: Any  # set up for "fit"
    is_zero: bool  # global rank 0 (writes every file)
    resuming: bool  # a checkpoint exists and is resumed
    versions: dict = field(default_factory=dict)  # provenance (rank 0), with trainer.speed's choice


@dataclass
class Fitted:
    """What ``fit`` hands on to ``record``."""

    trainer: L.Trainer
    loggers: list
    monitor: RunMonitor
    probe: Any  # ProbeCallback or None
    best_weights: BestWeights
    status: str  # completed | diverged | interrupted
    wall_start: float  # perf_counter at the start of fit
    test: dict = field(default_factory=dict)
    test_at_best: dict = field(default_factory=dict)


def prepare(cfg: RunConfig | dict, resume: bool) -> Prepared | RunResult:
    """The config validated (once: a config validated before and unchanged is not validated again), the checks of
    this machine (hardware, memory for the parameters), the run folder (a finished run's RunResult is returned as
    is), provenance, seeds and the data, set up."""
    from .alloc import configure as configure_malloc
    from .data import build_datamodule

    configure_malloc()  # glibc thresholds: large tensors are reused, not faulted in again every step (alloc.py)
    # a mapping is validated into a RunConfig; a RunConfig travels as is (a copy, re-checked only if changed since)
    cfg = from_dict(cfg) if isinstance(cfg, dict) else validated(cfg)
    check_hardware(cfg)  # a GPU asked for and absent: refused before any data is read
    footprint.check_fits(cfg)  # parameters x (weights, grads, optimizer state) fit this machine's memory
    quiet_lightning()
    is_zero = rank_zero_only.rank == 0  # set by Lightning from the launcher's environment (RANK, LOCAL_RANK, ...)
    # every check on the run folder (already a run there? finished? the checkpoint's identity and threads) before
    # anything in it is written (runfolder.py); a resume may restore cfg.trainer.threads here
    folder = runfolder.prepare(cfg, resume, is_zero)
    if folder.finished is not None:
        return folder.finished
    t = cfg.trainer
    world = t.devices * t.num_nodes  # ranks; data.batch_size is the global batch, each rank gets 1/world of it
    run_versions = versions() if is_zero else {}  # (rank 0's result is the one kept)
    resuming = resume and folder.ckpt.exists()
    # trainer.speed: channels_last / compile resolved now (a resumed run keeps its own), recorded below
    speed_choice = speed.resolve(cfg, folder.run_dir, resuming=resuming, write=is_zero)
    if is_zero:  # only global rank 0 writes files: config.yaml, versions.json, a resume's resumes.jsonl line
        run_versions["speed"] = speed_choice
        runfolder.start(folder, cfg, run_versions)
    if world > 1:
        log.info("data parallel: %d ranks x %d samples = global batch %d per step (data.batch_size is global)",
                 world, cfg.data.batch_size // world, cfg.data.batch_size)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.progress and is_zero:  # decoding a dataset the first time takes a while: say so
        print(f"loading data: {cfg.data.source} (decoded once, then cached)", file=sys.stderr, flush=True)
    datamodule = build_datamodule(cfg.data, cfg.task, cfg.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if t.max_epochs is not None:  # the budget in epochs becomes steps now that the training set's size is known;
        # recorded in the hparams and result.json (config.yaml keeps max_epochs alone: it reloads as it was asked)
        t.max_steps = epochs_to_steps(t.max_epochs, datamodule.num_train, cfg.data.batch_size)
    return Prepared(cfg, folder, datamodule, is_zero, resuming, run_versions)


def build(run: Prepared, callbacks: list | None) -> tuple[torch.nn.Module, L.LightningModule, list]:
    """The model (built once; its activations for one batch checked against this machine's memory on a meta-device
    twin before any step), the speed options and data-parallel norms applied, its task around it, and the run's
    extra callbacks (PreciseBN)."""
    cfg, t = run.cfg, run.cfg.trainer
    model = build_model(cfg, run.datamodule)
    footprint.check_fits(cfg, run.datamodule, model)  # and one batch's activations (footprint.meta_twin)
    model = speed_options(model, t)
    if t.sync_batchnorm:
        try:
            sync.enable(model)
        except ValueError as e:
            raise ConfigError(f"trainer.sync_batchnorm: {e}") from e
    callbacks = list(callbacks or [])
    if t.precise_bn:
        callbacks.append(PreciseBN(t.precise_bn))
    task = build_task(cfg, model, run.datamodule)
    task.run_label = cfg.run
    return model, task, callbacks


def fit(run: Prepared, model: torch.nn.Module, task: L.LightningModule, callbacks: list) -> Fitted:
    """Lightning's fit (resumed from the checkpoint when there is one), stopped at a step boundary by a signal or
    divergence; then the test split, once (evaluate.py), unless the run was interrupted."""
    cfg, t, datamodule = run.cfg, run.cfg.trainer, run.datamodule
    world = t.devices * t.num_nodes
    loggers = make_loggers(t.loggers, t.log_dir, cfg.experiment, cfg.run, resume=run.resuming)  # (tblog.py)
    if not run.resuming and run.is_zero:  # rank 0 alone writes the loggers' files
        hparams = {**_flat(to_dict(cfg)), "world_size": world, "batch_size_per_device": cfg.data.batch_size // world,
                   "speed_setting": speed.setting(t)}  # trainer.speed's choice (channels_last, compile: above)
        log_hparams(loggers, hparams)  # TensorBoard: an HPARAMS session of values only (tblog.py); others: their own

    info = tasks.get(cfg.task)
    with stop_on_signals() as stop:
        monitor = RunMonitor(run.folder.run_dir, t.max_steps, t.val_every, float(datamodule.samples_per_step),
                             t.divergence_factor, t.target_metric, t.target_value, stop,
                             target_direction=info.direction(t.target_metric) if t.target_metric else "minimize")
        probe = None
        if cfg.probes.enabled:  # after the monitor, so its step timing (throughput) leaves the probes out
            from .probes import ProbeCallback

            probe = ProbeCallback(model, cfg.probes)
        # best.pt: the best validation's weights (selection's pick), tested at the end; before the monitor, whose
        # last.ckpt must record this validation's best
        select = t.select_metric or info.select
        best_weights = BestWeights(run.folder.run_dir, select, info.direction(select))
        cbs = [best_weights, monitor, RunIdentity(cfg), *([probe] if probe else []), *callbacks]
        tty = sys.stdout.isatty()  # trainer.progress: a refreshed bar on a terminal, else a plain line every 30 s
        if t.progress and tty:  # or tenth of the run (progress.py), never carriage-return frames in a log
            cbs.append(step_progress_bar(t.max_steps))
        elif t.progress and run.is_zero:
            cbs.append(plain_progress(cfg.run, info.primary))
        trainer = _make_trainer(
            max_steps=t.max_steps, val_check_interval=t.val_every, check_val_every_n_epoch=None,
            limit_val_batches=t.val_batches if t.val_batches is not None else 1.0, num_sanity_val_steps=0,
            logger=loggers or False, callbacks=cbs, enable_checkpointing=False, enable_progress_bar=t.progress and tty,
            enable_model_summary=False, deterministic=t.deterministic, accelerator=t.accelerator,
            devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
            use_distributed_sampler=False,  # the data module gives each rank its slice (data/common.py)
            precision=t.precision, log_every_n_steps=t.log_every, gradient_clip_val=cfg.optim.grad_clip,
        )
        out = Fitted(trainer, loggers, monitor, probe, best_weights, "completed", time.perf_counter())
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=str(run.folder.ckpt) if run.resuming else None,
                        weights_only=True)  # no code in a checkpoint runs (runfolder.read_identity checked it)
        except RunInterrupted as e:
            log.warning(str(e))
            out.status = "interrupted"
            monitor.elapsed = monitor.now_elapsed()
            monitor.fold_cpu()
        if monitor.diverged_step is not None:
            out.status = "diverged"
        # the test split, once, never used to choose anything (evaluate.py); a diverged run is tested as it stopped
        # (what training at that setting produced: e.g. chance accuracy), an interrupted one not yet
        if out.status in ("completed", "diverged"):
            out.test, out.test_at_best = test_at_end(trainer, task, datamodule, best_weights, int(trainer.global_step))
    return out


def record(run: Prepared, done: Fitted) -> RunResult:
    """The run's RunResult (final and best validation metrics, test, timing, provenance), its final metrics in the
    loggers and, on rank 0, result.json (not for an interrupted run: it resumes)."""
    cfg, monitor, probe, trainer = run.cfg, done.monitor, done.probe, done.trainer
    info = tasks.get(cfg.task)
    hist = {**monitor.history, **(probe.history if probe else {})}  # probe series: "probe/..." keys
    final = {k: v[-1][1] for k, v in hist.items() if k.startswith("val/")}
    best = {}  # best over validations: max accuracy, min loss / perplexity (the task's directions)
    for k, v in hist.items():
        vals = [x[1] for x in v if math.isfinite(x[1])]
        if k.startswith("val/") and vals and "gap" not in k:
            best[k] = max(vals) if info.direction(k, default="minimize") == "maximize" else min(vals)
    result = RunResult(
        run_dir=str(run.folder.run_dir), status=done.status, steps=int(trainer.global_step), final=final, best=best,
        diverged_step=monitor.diverged_step, steps_to_target=monitor.steps_to_target,
        time_to_target=monitor.time_to_target,
        train_loss_auc=monitor.loss_sum / monitor.loss_count if monitor.loss_count else None,
        wall_time=monitor.elapsed if monitor.elapsed else time.perf_counter() - done.wall_start,
        cpu_time=None if monitor.cpu_partial else monitor.cpu_time, versions=run.versions,
        throughput=monitor.samples / monitor.train_time if monitor.train_time else 0.0,
        history=hist, config=to_dict(cfg), probes=summarize_probes(hist) if probe else {},
        test=done.test, test_at_best=done.test_at_best, best_step=done.best_weights.best_step,
        num_classes=getattr(run.datamodule, "num_classes", None),
    )
    if done.status != "interrupted":
        tb = tensorboard_of(done.loggers)  # final metrics at the step of the last val/* (tblog.py: names, order)
        if run.is_zero:
            log_final(done.loggers, final_metrics(result, cfg.task), tb.hp_step(result.steps) if tb else result.steps)
            result.save(run.folder.result_file)
    finish(done.loggers, "success" if done.status != "interrupted" else "interrupted")  # (tblog.py)
    return result


def train(cfg: RunConfig | dict, callbacks: list | None = None, resume: bool = False) -> RunResult:
    """Run one training run to completion (or divergence, or interruption) and return its record."""
    run = prepare(cfg, resume)
    if isinstance(run, RunResult):  # already finished: its record, as saved
        return run
    model, task, callbacks = build(run, callbacks)
    return record(run, fit(run, model, task, callbacks))
