"""The LightningModule shared by both tasks: thin; it receives its network and only knows losses and metrics."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import nn

from ..config import OptimConfig
from .optim import build_optimizer, build_scheduler


def batch_stat_norms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm-family layers that keep running statistics (their eval differs from their training)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def using_batch_statistics(model: nn.Module) -> Iterator[None]:
    """Evaluate with batch statistics (BN in train mode) without touching running stats or adding noise."""
    layers = batch_stat_norms(model)
    saved = [(m, m.training, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in layers]
    noisy = [(m, m.noise_enabled) for m in layers if hasattr(m, "noise_enabled")]
    try:
        for m in layers:
            m.train()
            if hasattr(m, "allow_partial_ghost_group"):  # ghost BN: a last val batch may not divide into groups
                m.allow_partial_ghost_group = True
        for m, _ in noisy:
            m.noise_enabled = False
        yield
    finally:
        for m, training, buffers in saved:
            m.train(training)
            if hasattr(m, "allow_partial_ghost_group"):
                m.allow_partial_ghost_group = False
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
        for m, enabled in noisy:
            m.noise_enabled = enabled


class NormTask(L.LightningModule):
    """Subclasses define ``loss_and_outputs(batch)`` and the metric objects."""

    def __init__(self, model: nn.Module, optim: OptimConfig, max_steps: int, track_batchstat_gap: bool | str = True):
        super().__init__()
        self.model = model
        self.optim_cfg = optim
        self.max_steps = max_steps
        # trainer.batchstat_gap: "every" validation, the "final" one only, or "off" (True / False: every / off)
        when = {True: "every", False: "off"}.get(track_batchstat_gap, track_batchstat_gap)
        if when not in ("every", "final", "off"):
            raise ValueError(f"batchstat_gap={track_batchstat_gap!r}: expected every, final or off")
        self.batchstat_gap = when if batch_stat_norms(model) else "off"
        self.gap_requested = when != "off"  # (a model without batch-statistics norms: its test gap is 0 by definition)
        self.has_batch_stats = self.batchstat_gap == "every"  # this validation: set at each validation's start
        self.precise_stats = None  # set by the PreciseBN callback for one validation (normablate.precise_bn)

    @classmethod
    def for_run(cls, model: nn.Module, cfg, datamodule) -> NormTask:
        """This task around ``model`` for the run ``cfg`` (a RunConfig) on ``datamodule`` (set up)."""
        t = cfg.trainer
        return cls(model, cfg.optim, t.max_steps, t.batchstat_gap)

    @staticmethod
    def example_inputs(cfg, datamodule, n: int) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the model's forward for a batch of ``n``, shaped like the training data, made in
        the current default device (the memory estimate passes them on the meta device: footprint.py)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = build_optimizer(self.optim_cfg, self.model)
        scheduler = build_scheduler(self.optim_cfg, optimizer, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        # The gradient norm (before clipping) is computed only when it is logged (every trainer.log_every steps)
        # or needed for clipping, and stays a tensor: no pass over the gradients and no host sync otherwise.
        self._grad_norm = None
        logging_now = self.trainer is not None and self.trainer._logger_connector.should_update_logs
        if logging_now or self.optim_cfg.grad_clip is not None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            if logging_now:
                self.log("grad_norm", self._grad_norm, on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.optim_cfg.grad_clip is not None:  # Lightning calls this right after on_before_optimizer_step
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = getattr(self, "_grad_norm", None)
            if norm is None:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
            torch.nn.utils.clip_grads_with_norm_(params, self.optim_cfg.grad_clip, norm)  # = clip_grad_norm_

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True,
                 sync_dist=self.trainer.world_size > 1)  # DDP: the mean over ranks (= the global batch's loss)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        final = self.trainer.global_step >= self.max_steps or self.trainer.should_stop  # the run's last validation
        self.has_batch_stats = self.batchstat_gap == "every" or (self.batchstat_gap == "final" and final)

    def validation_step(self, batch, batch_idx):
        self._measure(batch, self.has_batch_stats)

    def _measure(self, batch, batch_stats: bool) -> None:
        """Validation metrics of ``batch`` with running statistics, and (``batch_stats``) with batch statistics and
        (while they are set) PreciseBN's."""
        self.update_val_metrics(batch, prefix="val")
        if batch_stats:
            with using_batch_statistics(self.model):
                self.update_val_metrics(batch, prefix="val_batchstats")
        if self.precise_stats:
            from ..precise_bn import swapped

            with swapped(self.precise_stats):
                self.update_val_metrics(batch, prefix="val_precise")

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self._with_gaps(self.compute_val_metrics()), prog_bar=False)

    @staticmethod
    def _with_gaps(metrics: dict[str, Any]) -> dict[str, Any]:
        """``val/...`` metrics with the batch-statistics and PreciseBN passes renamed (``val/loss_batchstats``,
        ``val/acc_precise``) and the train/eval gaps added: loss with running − with batch statistics
        (``val/train_eval_gap``), and the same after PreciseBN (``val/train_eval_gap_precise``)."""
        if "val_batchstats/loss" in metrics:
            metrics["val/loss_batchstats"] = metrics.pop("val_batchstats/loss")
            metrics["val/train_eval_gap"] = metrics["val/loss"] - metrics["val/loss_batchstats"]
            for k in [k for k in metrics if k.startswith("val_batchstats/")]:
                metrics[k.replace("val_batchstats/", "val/") + "_batchstats"] = metrics.pop(k)
        if "val_precise/loss" in metrics:  # PreciseBN: the gap left once running stats are recalibrated
            for k in [k for k in metrics if k.startswith("val_precise/")]:
                metrics[k.replace("val_precise/", "val/") + "_precise"] = metrics.pop(k)
            if "val/loss_batchstats" in metrics:
                metrics["val/train_eval_gap_precise"] = metrics["val/loss_precise"] - metrics["val/loss_batchstats"]
        return metrics

    # ------------------------------------------------------------------ one-off evaluation (normablate.evaluate)
    # Lightning's test loop evaluates a split once: the test split at the end of a run, or any split of a saved
    # run (``normablate evaluate``). ``eval_prefix`` names the metrics ("test" -> test/loss, test/acc);
    # ``eval_stats``: "running" (eval mode), "batch" (batch statistics, as the train/eval gap's second pass) or
    # "precise" (``precise_stats`` swapped in: PreciseBN's population statistics).
    # ``test_gap``: with running statistics, also measure the train/eval gap as validation does (test/loss_batchstats,
    # test/train_eval_gap and, while PreciseBN statistics are set, test/train_eval_gap_precise): test_at_end sets it
    # for a run whose trainer.batchstat_gap is on (normablate.measures).
    eval_prefix = "test"
    eval_stats = "running"
    test_gap = False

    def test_gap_measured(self) -> bool:
        """Does the end-of-run test pass measure the train/eval gap (the gap on, batch-statistics norms present)?"""
        return self.batchstat_gap != "off"

    def test_step(self, batch, batch_idx):
        if self.eval_stats == "running" and self.test_gap:
            self._measure(batch, batch_stats=True)
        elif self.eval_stats == "batch":
            with using_batch_statistics(self.model):
                self.update_val_metrics(batch, prefix="val")
        elif self.eval_stats == "precise" and self.precise_stats:
            from ..precise_bn import swapped

            with swapped(self.precise_stats):
                self.update_val_metrics(batch, prefix="val")
        else:
            self.update_val_metrics(batch, prefix="val")

    def on_test_epoch_end(self) -> None:
        metrics = self.compute_val_metrics()
        if self.eval_stats == "running" and self.test_gap:
            metrics = self._with_gaps(metrics)
        metrics = {f"{self.eval_prefix}/{k.split('/', 1)[1]}": v for k, v in metrics.items()}
        self.log_dict(metrics, prog_bar=False)

    # ------------------------------------------------------------------ RNG state for exact resume
    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["rng_torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint["rng_cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint) -> None:
        if "rng_torch" in checkpoint:
            torch.set_rng_state(checkpoint["rng_torch"])
        if "rng_cuda" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])

    # ------------------------------------------------------------------ to implement
    def loss(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def update_val_metrics(self, batch, prefix: str) -> None:
        raise NotImplementedError

    def compute_val_metrics(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError
