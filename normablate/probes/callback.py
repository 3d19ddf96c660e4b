"""``ProbeCallback``: runs the landscape and ICS probes every k training steps without changing training.

On a probed step t (steps 1, 1 + k, 1 + 2k, ...; numbered like ``train/loss``, i.e. by the step count after the
update) the callback snapshots, before the step: the parameters x_t, the buffers (BN running statistics and
``num_batches_tracked``), the torch RNG state (noisy-BN noise, dropout) and the LR. After the optimizer step it
evaluates, on the same batch, with the model in training mode:

* g = grad L(x_t) (one forward/backward; every probe forward first restores the pre-step buffers and RNG state,
  so it sees exactly the training step's batch statistics and noise draw: L(x_t) equals the logged train loss);
* the landscape along -g over ``probes.step_sizes`` (times the LR of step t by default);
* ICS per layer from x_t, x_{t+1} (the optimizer's actual update) and g;
* with ``probes.batchstats``, per BN-family layer at x_t: the batch statistics' distance from the running ones
  and the gradient norms w.r.t. them (``probe/bstat_{mean_dist,var_dist,grad_mean,grad_var}/<layer>``,
  probes/batchstats.py).

Then it puts back x_{t+1}, the post-step buffers, the post-step RNG state and every ``.grad``; the optimizer and
its state are never touched, so a probed run follows the same trajectory as an unprobed one (tested: identical
metrics step for step). Values go to TensorBoard as ``probe/...`` and into the run's history (``RunResult``).
"""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn

from ..errors import ConfigError
from .batchstats import batch_stats, stat_layers
from .ics import ics, weight_layers
from .landscape import _set, landscape, loss_and_grad

def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class ProbeCallback(L.Callback):
    """Landscape and ICS probes (see the module doc). ``model``: the network (``pl_module.model``);
    ``cfg``: a ``ProbeConfig``. The loss is ``pl_module.loss(batch)``."""

    def __init__(self, model: nn.Module, cfg) -> None:
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]  # registration order, tied ones once
        index = {id(p): i for i, p in enumerate(self.params)}
        layers = [(n, index[id(w)]) for n, w in weight_layers(model) if id(w) in index]
        if cfg.layers is not None:
            known = dict(layers)
            bad = [n for n in cfg.layers if n not in known]
            if bad:
                raise ConfigError(f"probes.layers: {bad} are not weight layers of the model; valid: "
                                  f"{', '.join(known)}")
            layers = [(n, known[n]) for n in cfg.layers]
        self.layers = layers  # [(name, index into self.params)]
        self.stat_layers = stat_layers(model) if getattr(cfg, "batchstats", False) else []  # BN-family layers
        self.history: dict[str, list[list[float]]] = {}  # "probe/..." -> [[step, value], ...] (checkpointed)
        self._pre: dict[str, Any] | None = None

    # ------------------------------------------------------------------ schedule and state
    def due(self, step_after: int) -> bool:
        return (step_after - 1) % self.cfg.every == 0

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = state.get("history", {})

    @staticmethod
    def _buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(b, b.detach().clone()) for b in model.buffers()]

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._pre = None
        if not self.due(trainer.global_step + 1):
            return
        device = self.params[0].device if self.params else torch.device("cpu")
        self._pre = {"x": [p.detach().clone() for p in self.params], "buffers": self._buffers(pl_module.model),
                     "rng": _rng_state(device), "lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
                     "device": device}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pre, self._pre = self._pre, None
        if pre is None:
            return
        step = int(trainer.global_step)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or not math.isfinite(float(loss)):
            return  # a diverging step: nothing meaningful to measure
        values = self.measure(pl_module, batch, pre)
        for k, v in values.items():
            self.history.setdefault(k, []).append([step, v])
        for logger in trainer.loggers:  # (every one of trainer.loggers, as self.log does)
            logger.log_metrics(values, step=step)

    # ------------------------------------------------------------------ the measurement
    def measure(self, pl_module, batch, pre: dict[str, Any]) -> dict[str, float]:
        model, params, device = pl_module.model, self.params, pre["device"]
        after = [p.detach().clone() for p in params]
        post_buffers = self._buffers(model)
        post_rng = _rng_state(device)
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]

        def loss_fn() -> torch.Tensor:  # the training step's loss function: same buffers, same noise draw
            for b, v in pre["buffers"]:
                b.copy_(v)
            _set_rng_state(pre["rng"], device)
            return pl_module.loss(batch)

        out: dict[str, float] = {}
        try:
            with torch.no_grad():
                _set(params, pre["x"])
            loss0, g = loss_and_grad(loss_fn, params)
            out["probe/loss"] = loss0
            if self.stat_layers:  # at x_t, before the landscape moves anything (probes/batchstats.py)
                for name, vals in batch_stats(loss_fn, self.stat_layers).items():
                    for k, v in vals.items():
                        out[f"probe/bstat_{k}/{name}"] = v
            if self.cfg.landscape:
                scale = pre["lr"] if self.cfg.relative_to_lr else 1.0
                etas = [float(e) * scale for e in self.cfg.step_sizes]
                land = landscape(loss_fn, params, g, etas)
                for k in ("loss_min", "loss_max", "loss_range", "grad_pred", "beta", "grad_norm"):
                    out[f"probe/{k}"] = land[k]
            if self.cfg.ics and self.layers:
                res = ics(loss_fn, params, [i for _, i in self.layers], pre["x"], after, g)
                for (name, _), r in zip(self.layers, res):
                    out[f"probe/ics_l2/{name}"] = r["l2"]
                    out[f"probe/ics_cos/{name}"] = r["cos"]
        finally:
            with torch.no_grad():
                _set(params, after)
                for b, v in post_buffers:
                    b.copy_(v)
                for p, gr in zip(params, grads):
                    p.grad = gr
            _set_rng_state(post_rng, device)
        return out


def summarize(history: dict[str, list]) -> dict[str, float]:
    """A run's probe record in a few numbers: the mean over probed steps of each ``probe/...`` series."""
    out = {}
    for k, pts in history.items():
        vals = [float(v) for _, v in pts if v is not None and math.isfinite(float(v))]
        if k.startswith("probe/") and vals:
            out[k] = sum(vals) / len(vals)
    return out
