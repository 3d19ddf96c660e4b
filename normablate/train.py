"""``train(cfg) -> RunResult``: one configured run, end to end. The CLI, the tests and the sweeps all call it.

The run directory ``<log_dir>/<experiment>/<run>/`` holds the TensorBoard events, ``config.yaml`` (resolved),
``versions.json`` (libraries, git commit), ``last.ckpt`` and, once finished, ``result.json``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

from . import __version__, footprint, runfolder
from .callbacks import RunInterrupted, RunMonitor
from .config import RunConfig, check_hardware, epochs_to_steps, from_dict, to_dict, validated
from .errors import ConfigError
from .build import build_model, build_task, quiet_lightning as _quiet_lightning  # noqa: F401  (older imports)
from .evaluate import BestWeights, default_select_metric, test_at_end
from .norms import sync
from .precise_bn import PreciseBN
from .probes.callback import summarize as summarize_probes
from .result import RunResult
from .signals import stop_on_signals
from .runfolder import RunIdentity, check_checkpoint, check_writable, default_run_name, run_dir_of  # noqa: F401
from .progress import plain_progress
from .tblog import final_metrics, finish, log_final, log_hparams, make_loggers, tensorboard_of

log = logging.getLogger(__name__)


@functools.cache
def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout this process imported normablate from, asked of git once per process: the
    code a process runs is the code it imported, so a sweep worker records the same state for every trial and
    pays the two git calls once, not per trial."""
    commit, dirty = "unknown", None
    repo = Path(__file__).resolve().parents[1]
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    return commit, dirty


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what ``platform`` knows), for the record of a run."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def versions() -> dict[str, str]:
    """Library versions, git state and machine (CPU model, usable CPUs) of a run. The libraries a run may not
    import itself (timm, datasets, optuna, torchmetrics) are read from their installed metadata: importing them
    only to ask took ~4 s of every run's start."""
    from importlib import metadata

    def installed(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    commit, dirty = git_state()
    return {
        "normablate": __version__, "git_commit": commit, "git_dirty": str(dirty), "python": sys.version.split()[0],
        "platform": platform.platform(), "torch": torch.__version__, "lightning": L.__version__,
        "cpu": cpu_model(), "cpus": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                        else os.cpu_count()),
        **{dist: installed(dist) for dist in ("torchmetrics", "timm", "datasets", "optuna")},
    }


class StepProgressBar(TQDMProgressBar):
    """Progress over optimizer steps (the training stream is infinite, so Lightning knows no total)."""

    def __init__(self, max_steps: int) -> None:
        super().__init__(refresh_rate=10)
        self._max_steps = max_steps

    @property
    def total_train_batches(self):
        return self._max_steps

    def init_train_tqdm(self):
        """The one bar of the run, created with its final description, total and start (a resumed run starts at its
        step), so no 'Training 0/?' or 'Epoch 0' bar is printed first."""
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        trainer = self.trainer
        step = trainer.global_step
        if step > 0:
            print(f"resuming from step {step} of {self._max_steps}", file=sys.stderr, flush=True)
        return Tqdm(desc=f"train {trainer.lightning_module.run_label}", total=self._max_steps, initial=step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def init_validation_tqdm(self):
        """Disabled from the start (one bar per run; a disabled-after-creation bar still prints its first line).
        While it runs, the training bar says so."""
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        return Tqdm(disable=True)

    def init_test_tqdm(self):
        """The end-of-run test evaluation (evaluate.py) prints no bar of its own."""
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        return Tqdm(disable=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        if self._train_progress_bar is not None:
            self.train_progress_bar.set_description(f"validate {pl_module.run_label}")

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._train_progress_bar is not None:
            self.train_progress_bar.set_description(f"train {pl_module.run_label}")

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_epoch_start(self, trainer, *args) -> None:
        pass  # Lightning's resets the bar to "Epoch 0", 0/?: ours is one endless epoch, set up in init_train_tqdm


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "norm":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def speed_options(model: torch.nn.Module, t) -> torch.nn.Module:
    """``trainer.channels_last`` and ``trainer.compile`` (resolved by ``speed.resolve``) applied to a built model;
    neither changes its math (normablate/speed.py)."""
    from . import speed

    return speed.apply(model, t)


def _make_trainer(**kwargs) -> L.Trainer:
    """``L.Trainer(**kwargs)``; Lightning's refusal of a setting (precision, accelerator, devices, strategy on this
    machine) becomes a ConfigError naming the trainer keys, before any training step."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        keys = ", ".join(f"trainer.{k}={kwargs[k]!r}" for k in ("accelerator", "devices", "strategy", "precision"))
        raise ConfigError(f"Lightning refuses the trainer settings ({keys}): {str(e).splitlines()[0]}") from e


def train(cfg: RunConfig | dict, callbacks: list | None = None, resume: bool = False) -> RunResult:
    """Run one training run to completion (or divergence, or interruption) and return its record."""
    from .alloc import configure as configure_malloc
    from .data import build_datamodule
    configure_malloc()  # glibc thresholds: large tensors are reused, not faulted in again every step (alloc.py)
    # a mapping is validated into a RunConfig; a RunConfig travels as is (a copy, re-checked: no dict round trip)
    cfg = from_dict(cfg) if isinstance(cfg, dict) else validated(cfg)
    check_hardware(cfg)  # a GPU asked for and absent: refused before any data is read
    footprint.check_fits(cfg)  # parameters x (weights, grads, optimizer state) fit this machine's memory
    _quiet_lightning()
    is_zero = rank_zero_only.rank == 0  # set by Lightning from the launcher's environment (RANK, LOCAL_RANK, ...)
    # every check on the run folder (already a run there? finished? the checkpoint's identity and threads) before
    # anything in it is written (runfolder.py); a resume may restore cfg.trainer.threads here
    folder = runfolder.prepare(cfg, resume, is_zero)
    if folder.finished is not None:
        return folder.finished
    run_dir, ckpt, result_file = folder.run_dir, folder.ckpt, folder.result_file
    t = cfg.trainer
    world = t.devices * t.num_nodes  # ranks; data.batch_size is the global batch, each rank gets 1/world of it
    run_versions = versions() if is_zero else {}  # (rank 0's result is the one kept)
    from . import speed

    # trainer.speed: channels_last / compile resolved now (a resumed run keeps its own), recorded below
    speed_choice = speed.resolve(cfg, run_dir, resuming=resume and ckpt.exists(), write=is_zero)
    if is_zero:
        run_versions["speed"] = speed_choice
    if is_zero:  # only global rank 0 writes files: config.yaml, versions.json, a resume's resumes.jsonl line
        runfolder.start(folder, cfg, run_versions)
    if world > 1:
        log.info("data parallel: %d ranks x %d samples = global batch %d per step (data.batch_size is global)",
                 world, cfg.data.batch_size // world, cfg.data.batch_size)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    if t.progress and rank_zero_only.rank == 0:  # decoding a dataset the first time takes a while: say so
        print(f"loading data: {cfg.data.source} (decoded once, then cached)", file=sys.stderr, flush=True)
    datamodule = build_datamodule(cfg.data, cfg.task, cfg.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if t.max_epochs is not None:  # the budget in epochs becomes steps now that the training set's size is known;
        # recorded in the hparams and result.json (config.yaml keeps max_epochs alone: it reloads as it was asked)
        t.max_steps = epochs_to_steps(t.max_epochs, datamodule.num_train, cfg.data.batch_size)
    footprint.check_fits(cfg, datamodule)  # and one batch's activations (meta-device forward), before the real build
    model = speed_options(build_model(cfg, datamodule), cfg.trainer)
    if t.sync_batchnorm:
        try:
            sync.enable(model)
        except ValueError as e:
            raise ConfigError(f"trainer.sync_batchnorm: {e}") from e
    if t.precise_bn:
        callbacks = [*(callbacks or []), PreciseBN(t.precise_bn)]
    task = build_task(cfg, model, datamodule)
    task.run_label = cfg.run

    resuming = resume and ckpt.exists()
    loggers = make_loggers(t.loggers, t.log_dir, cfg.experiment, cfg.run, resume=resuming)  # (tblog.py)
    if not resuming and is_zero:  # rank 0 alone writes the loggers' files
        hparams = {**_flat(to_dict(cfg)), "world_size": world, "batch_size_per_device": cfg.data.batch_size // world,
                   "speed_setting": speed.setting(t)}  # trainer.speed's choice (channels_last, compile: above)
        log_hparams(loggers, hparams)  # TensorBoard: an HPARAMS session of values only (tblog.py); others: their own

    with stop_on_signals() as stop:
        monitor = RunMonitor(run_dir, t.max_steps, t.val_every, float(datamodule.samples_per_step),
                             t.divergence_factor,
                             t.target_metric, t.target_value, stop)
        probe = None
        if cfg.probes.enabled:  # after the monitor, so its step timing (throughput) leaves the probes out
            from .probes import ProbeCallback

            probe = ProbeCallback(model, cfg.probes)
        # best.pt: the best validation's weights (selection's pick), tested at the end; before the monitor, whose
        # last.ckpt must record this validation's best
        best_weights = BestWeights(run_dir, t.select_metric or default_select_metric(cfg.task))
        cbs = [best_weights, monitor, RunIdentity(cfg), *([probe] if probe else []), *(callbacks or [])]
        tty = sys.stdout.isatty()  # trainer.progress: a refreshed bar on a terminal, else a plain line every 30 s
        if t.progress and tty:  # or tenth of the run (progress.py), never carriage-return frames in a log
            cbs.append(StepProgressBar(t.max_steps))
        elif t.progress and is_zero:
            cbs.append(plain_progress(cfg.run, "val/acc" if cfg.task == "classification" else "val/ppl"))
        trainer = _make_trainer(
            max_steps=t.max_steps, val_check_interval=t.val_every, check_val_every_n_epoch=None,
            limit_val_batches=t.val_batches if t.val_batches is not None else 1.0, num_sanity_val_steps=0,
            logger=loggers or False, callbacks=cbs, enable_checkpointing=False, enable_progress_bar=t.progress and tty,
            enable_model_summary=False, deterministic=t.deterministic, accelerator=t.accelerator,
            devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
            use_distributed_sampler=False,  # the data module gives each rank its slice (data/common.py)
            precision=t.precision, log_every_n_steps=t.log_every, gradient_clip_val=cfg.optim.grad_clip,
        )
        status = "completed"
        t0 = time.perf_counter()
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=str(ckpt) if resuming else None,
                        weights_only=True)  # no code in a checkpoint runs (runfolder.read_identity checked it)
        except RunInterrupted as e:
            log.warning(str(e))
            status = "interrupted"
            monitor.elapsed = monitor.now_elapsed()
            monitor.fold_cpu()
        if monitor.diverged_step is not None:
            status = "diverged"
        test, test_at_best = {}, {}
        # the test split, once, never used to choose anything (evaluate.py); a diverged run is tested as it stopped
        # (what training at that setting produced: e.g. chance accuracy), an interrupted one not yet
        if status in ("completed", "diverged"):
            test, test_at_best = test_at_end(trainer, task, datamodule, best_weights, int(trainer.global_step))

    hist = {**monitor.history, **(probe.history if probe else {})}  # probe series: "probe/..." keys
    final = {k: v[-1][1] for k, v in hist.items() if k.startswith("val/")}
    best = {}  # best over validations: max accuracy, min loss / perplexity
    for k, v in hist.items():
        vals = [x[1] for x in v if math.isfinite(x[1])]
        if k.startswith("val/") and vals and "gap" not in k:
            best[k] = max(vals) if "acc" in k else min(vals)
    result = RunResult(
        run_dir=str(run_dir), status=status, steps=int(trainer.global_step), final=final, best=best,
        diverged_step=monitor.diverged_step, steps_to_target=monitor.steps_to_target,
        time_to_target=monitor.time_to_target,
        train_loss_auc=monitor.loss_sum / monitor.loss_count if monitor.loss_count else None,
        wall_time=monitor.elapsed if monitor.elapsed else time.perf_counter() - t0,
        cpu_time=None if monitor.cpu_partial else monitor.cpu_time, versions=run_versions,
        throughput=monitor.samples / monitor.train_time if monitor.train_time else 0.0,
        history=hist, config=to_dict(cfg), probes=summarize_probes(hist) if probe else {},
        test=test, test_at_best=test_at_best, best_step=best_weights.best_step,
    )
    if status != "interrupted":
        tb = tensorboard_of(loggers)  # final metrics at the step of the last val/* (tblog.py: names, order)
        if is_zero:
            log_final(loggers, final_metrics(result, cfg.task), tb.hp_step(result.steps) if tb else result.steps)
        if is_zero:
            result.save(result_file)
    finish(loggers, "success" if status != "interrupted" else "interrupted")  # (tblog.py)
    return result
