"""Lightning callbacks that turn a training run into a measurement.

``RunMonitor`` records the curves, stops diverged runs (a result, not a crash), times the run, detects when a
target metric is first reached, checkpoints ``last.ckpt`` after each validation, and stops cleanly on
Ctrl-C / SIGTERM. Its state is saved in the checkpoint, so a resumed run yields the same record as an
uninterrupted one.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from .signals import StopRequest  # noqa: F401  (the flag RunMonitor reads; callbacks.StopRequest: older imports)


class RunInterrupted(Exception):
    """Raised (after saving a checkpoint) when the run received SIGINT/SIGTERM."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"interrupted by signal {signum} at step {step}; resume with --resume")
        self.signum, self.step = signum, step


def save_checkpoint_atomic(trainer: L.Trainer, path: Path) -> None:
    """Write ``path`` through a temporary file and a rename: a reader sees the previous checkpoint or the new one. A
    folder that became unwritable (or vanished) mid-run ends the run with one clear line; the old file is kept."""
    try:
        _save_checkpoint_atomic(trainer, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e.__cause__ or e.__context__, OSError) \
                and "cannot be opened" not in str(e) and "Parent directory" not in str(e):
            raise
        from .errors import RunFileError

        kept = f"the last good checkpoint {str(path)!r} is kept" if path.exists() else "no earlier checkpoint exists"
        raise RunFileError(f"cannot write checkpoint {str(path)!r} at step {trainer.global_step}: "
                           f"{getattr(e, 'strerror', None) or e}; {kept}. Make {str(path.parent)!r} writable (and "
                           f"check free disk space), then continue with --resume") from e


def _save_checkpoint_atomic(trainer: L.Trainer, path: Path) -> None:
    tmp = path.with_suffix(".ckpt.tmp")
    trainer.save_checkpoint(tmp)  # every rank calls it (a barrier); only global rank 0 writes
    if trainer.is_global_zero:
        os.replace(tmp, path)


class RunMonitor(L.Callback):
    def __init__(self, run_dir: Path, max_steps: int, val_every: int, samples_per_step: float,
                 divergence_factor: float = 10.0,
                 target_metric: str | None = None, target_value: float | None = None,
                 stop_request: StopRequest | None = None, ema: float = 0.9,
                 target_direction: str = "minimize") -> None:
        self.run_dir = Path(run_dir)
        self.max_steps = max_steps
        self.val_every = val_every
        self.samples_per_step = samples_per_step
        self.divergence_factor = divergence_factor
        self.target_metric, self.target_value = target_metric, target_value
        self.target_direction = target_direction  # the task's, of target_metric ("maximize": reach >= value)
        self.stop_request = stop_request
        self.ema_beta = ema
        # state (saved in checkpoints)
        self.history: dict[str, list[list[float]]] = {}
        self.loss_start: float | None = None
        self.loss_ema: float | None = None
        self.diverged_step: int | None = None
        self.diverged_reason: str | None = None
        self.steps_to_target: int | None = None
        self.time_to_target: float | None = None
        self.elapsed = 0.0  # wall-clock seconds of fit so far (training + validation), summed over resumes
        # CPU seconds of this process during fit (all its threads; data loading runs in it too: num_workers=0),
        # summed over resumes. With several processes (DDP) each rank counts its own; rank 0's is reported.
        self.cpu_time = 0.0
        self.train_time = 0.0  # seconds spent in training steps only
        self.samples = 0.0
        self.loss_sum = 0.0
        self.loss_count = 0
        self._t_fit = self._t_step = 0.0
        self._elapsed_at_fit_start = 0.0
        self._c_fit = None
        self._cpu_at_fit_start = 0.0
        self.cpu_partial = False  # resumed from a checkpoint that did not record CPU time: the total is unknown

    # -------------------------------------------------------------- state for resume
    def state_dict(self) -> dict[str, Any]:
        keys = ("history", "loss_start", "loss_ema", "diverged_step", "diverged_reason", "steps_to_target",
                "time_to_target", "train_time", "samples", "loss_sum", "loss_count")
        d = {k: getattr(self, k) for k in keys}
        d["elapsed"] = self.now_elapsed()
        d["cpu_time"] = self.now_cpu()
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.cpu_partial = "cpu_time" not in state
        self._elapsed_at_fit_start = self.elapsed
        self._cpu_at_fit_start = self.cpu_time

    def now_elapsed(self) -> float:
        return self._elapsed_at_fit_start + (time.perf_counter() - self._t_fit if self._t_fit else 0.0)

    def now_cpu(self) -> float:
        return self._cpu_at_fit_start + (time.process_time() - self._c_fit if self._c_fit is not None else 0.0)

    def _record(self, name: str, step: int, value: float) -> None:
        self.history.setdefault(name, []).append([int(step), float(value)])

    # -------------------------------------------------------------- hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        self._elapsed_at_fit_start = self.elapsed
        self._t_fit = time.perf_counter()
        self._cpu_at_fit_start = self.cpu_time
        self._c_fit = time.process_time()

    def on_train_start(self, trainer, pl_module) -> None:
        self._own_signals(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        # the test after training (evaluate.test_at_end): a signal now lets the test finish (the run is complete)
        # and stops the caller after it (signals.stop_on_signals hands it to a sweep worker's flag)
        self._own_signals(trainer)

    def _own_signals(self, trainer) -> None:
        """Ours alone from here: stop at the next step boundary. ``train._make_trainer`` keeps Lightning from
        installing its handlers at all; this covers a trainer made elsewhere (or a Lightning without that switch),
        whose handlers are installed at each fit/test just before these hooks and raise SIGTERMException wherever
        the signal lands (mid-validation, without a checkpoint)."""
        if self.stop_request is not None and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, self.stop_request)
            # a SIGTERM Lightning's handler already took (it calls ours too) is ours now: its flag, left set, would
            # raise at the next check (private: Lightning has no public way to clear it)
            connector = getattr(trainer, "_signal_connector", None)
            if getattr(connector, "received_sigterm", False):
                if self.stop_request.signum is None:
                    self.stop_request.signum = signal.SIGTERM
                connector.received_sigterm = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t_step = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_time += time.perf_counter() - self._t_step
        self.samples += self.samples_per_step
        step = trainer.global_step  # steps completed
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        stop = self.stop_request is not None and self.stop_request.signum is not None
        if trainer.world_size > 1:
            # Every rank decides on the same numbers: the mean loss over ranks (divergence, record) and whether
            # any rank got a signal (all stop at this step boundary together).
            both = torch.stack([loss.detach().float().reshape(()), torch.tensor(float(stop), device=loss.device)])
            both = trainer.strategy.reduce(both, reduce_op="sum")
            loss, stop = both[0] / trainer.world_size, bool(both[1] > 0)
            if stop and self.stop_request is not None and self.stop_request.signum is None:
                self.stop_request.signum = signal.SIGTERM  # another rank was signalled
        loss = float(loss)
        self._record("train/loss", step, loss)
        if math.isfinite(loss):
            self.loss_sum += loss
            self.loss_count += 1
        if step % max(1, trainer.log_every_n_steps) == 0 and self.train_time > 0:
            pl_module.log("throughput", self.samples / self.train_time, on_step=True, on_epoch=False)
        self._check_divergence(trainer, step, loss)
        if step >= self.max_steps:
            trainer.should_stop = True  # triggers a final validation at the last step (a stop request waits)
        elif stop and step % self.val_every:
            # Between validations: checkpoint now. On a validation step, Lightning would skip the due
            # validation on resume, so we stop in on_validation_end instead, after its checkpoint.
            save_checkpoint_atomic(trainer, self.run_dir / "last.ckpt")
            raise RunInterrupted(self.stop_request.signum, step)

    def _check_divergence(self, trainer, step: int, loss: float) -> None:
        if self.diverged_step is not None:
            return
        if not math.isfinite(loss):
            self.diverged_step, self.diverged_reason = step, f"non-finite training loss ({loss})"
        else:
            if self.loss_start is None:
                self.loss_start = loss
            self.loss_ema = loss if self.loss_ema is None else self.ema_beta * self.loss_ema + (1 - self.ema_beta) * loss
            limit = self.divergence_factor * max(self.loss_start, 1e-8)
            if self.loss_ema > limit:
                self.diverged_step = step
                self.diverged_reason = (f"smoothed training loss {self.loss_ema:.4g} exceeded "
                                        f"{self.divergence_factor:g} x its start ({self.loss_start:.4g})")
        if self.diverged_step is not None:
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        for k, v in metrics.items():
            self._record(k, step, v)
        if self.target_metric and self.steps_to_target is None and self.target_metric in metrics:
            v = metrics[self.target_metric]
            better = v >= self.target_value if self.target_direction == "maximize" else v <= self.target_value
            if better:
                self.steps_to_target, self.time_to_target = step, self.now_elapsed()
        if self.diverged_step is None:
            save_checkpoint_atomic(trainer, self.run_dir / "last.ckpt")
            stop = self.stop_request is not None and self.stop_request.signum is not None
            if trainer.world_size > 1:  # a signal that reached one rank during validation stops them all
                stop = bool(trainer.strategy.reduce(torch.tensor(float(stop), device=pl_module.device),
                                                    reduce_op="sum") > 0)
                if stop and self.stop_request.signum is None:
                    self.stop_request.signum = signal.SIGTERM
            if stop and step < self.max_steps:
                raise RunInterrupted(self.stop_request.signum, step)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.elapsed = self.now_elapsed()
        self._t_fit = 0.0
        self._elapsed_at_fit_start = self.elapsed
        self.fold_cpu()

    def fold_cpu(self) -> None:
        """Fold the running CPU clock into ``cpu_time`` (at fit end, or when a run is interrupted)."""
        self.cpu_time = self.now_cpu()
        self._c_fit = None
        self._cpu_at_fit_start = self.cpu_time
