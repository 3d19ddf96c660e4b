"""Will a run fit this machine's memory? An estimate from the model built on the meta device, before anything real.

``check_fits(cfg)`` (before the data is read) counts parameters; ``check_fits(cfg, datamodule)`` (after) adds
activations: a forward pass of meta tensors shaped like one training batch per rank, summing every leaf module's
output (``train`` passes its model, built once, and the pass runs on its ``meta_twin``; a sweep's preflight builds
one on the meta device). Both refuse (``ConfigError``, exit 2, with the numbers) a run whose estimate
exceeds the memory available now: on CPU the machine's (``MemAvailable``, or the cgroup's limit when lower), on a
GPU the device's total.

The estimate is a lower bound on purpose, so a refusal is always right: weights + gradients + the optimizer's state
(SGD with momentum 1 slot, Adam/AdamW 2, Lion 1) + the outputs of every leaf module, which autograd keeps (or keeps
tensors of that size) for the backward pass. It leaves out the allocator's slack, temporaries, the data and
Python; a run just under the limit can still fail. Hand-written because psutil (not a dependency) only replaces
the /proc read, and no library estimates a training step's memory without running it.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig, validated_params
from .errors import ConfigError

OPTIMIZER_SLOTS = {"sgd": 1, "adam": 2, "adamw": 2, "lion": 1}  # state tensors per parameter (SGD: momentum)


def _bytes_per_value(precision: str) -> int:
    p = str(precision)
    if p.startswith("64"):
        return 8
    if p in ("16-true", "bf16-true"):
        return 2
    return 4  # 32-true, and mixed precision keeps fp32 weights (its fp16 activations are not counted lower)


def available_memory() -> tuple[int | None, str]:
    """(bytes this process may still use, where the number comes from); None when nothing says."""
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages"))
        except (ValueError, OSError, AttributeError):
            pass
    try:  # a container's limit (cgroup v2) is what the kernel enforces, whatever the host has free
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append((max(0, int(limit) - used), "cgroup memory.max - memory.current"))
    except (OSError, ValueError):
        pass
    return min(found) if found else (None, "unknown")


@dataclass
class Footprint:
    params: int
    state_bytes: int  # weights + gradients + optimizer state, one rank
    activation_bytes: int | None  # one rank's training batch; None: not estimated
    ranks_here: int  # processes on this machine holding a copy

    @property
    def total(self) -> int:
        return self.ranks_here * (self.state_bytes + (self.activation_bytes or 0))


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GB" if n >= 2**28 else f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} KB"


def _meta_model(cfg: RunConfig, datamodule=None) -> torch.nn.Module:
    from . import models

    with torch.device("meta"):
        if datamodule is None:
            return models.create(cfg.model.backbone, norm=cfg.model.norm, **dict(cfg.model.options))
        from .build import build_model

        return build_model(cfg, datamodule)


def _activations(cfg: RunConfig, net: torch.nn.Module, datamodule, per_rank: int, nbytes: int) -> int | None:
    """Sum of leaf-module outputs for one training batch, from a forward on meta tensors; None when the model's
    forward cannot run on meta tensors (a data-dependent branch)."""
    total = 0
    seen: dict[int, torch.Tensor] = {}  # an output that is its input (Identity, in-place ReLU) counts once

    def hook(_m, _inp, out) -> None:
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in seen:
                seen[id(t)] = t
                total += t.numel() * nbytes

    from . import tasks

    handles = [m.register_forward_hook(hook) for m in net.modules() if not any(True for _ in m.children())]
    try:
        with torch.device("meta"):  # one training batch's inputs, shaped by the task (tasks/: example_inputs)
            args, kwargs = tasks.get(cfg.task).module.example_inputs(cfg, datamodule, per_rank)
            net(*args, **kwargs)
    except (RuntimeError, NotImplementedError, ValueError, TypeError, AttributeError):
        return None
    finally:
        for h in handles:
            h.remove()
    return total


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors of the same shapes (tied ones stay tied): no
    memory, nothing built or initialised again. ``train`` builds its model once and estimates activations on this."""
    memo: dict[int, torch.Tensor] = {}
    for t in (*model.parameters(), *model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) \
            else meta
    return copy.deepcopy(model, memo)


def estimate(cfg: RunConfig, datamodule=None, model: torch.nn.Module | None = None) -> Footprint:
    """The footprint of run ``cfg``: parameters always, activations when ``datamodule`` (set up) gives the batch's
    shape. ``model``: the run's network, already built (its parameters counted, its activations estimated on a
    ``meta_twin``); without it a meta-device build, or before the data (no ``datamodule``) the parameter count that
    validation found (``config.validated_params``)."""
    t = cfg.trainer
    known = validated_params(cfg) if model is None and datamodule is None else None
    if model is not None:
        net, params = meta_twin(model) if datamodule is not None else None, sum(p.numel() for p in model.parameters())
    elif known is not None:
        net, params = None, known
    else:
        net = _meta_model(cfg, datamodule)
        params = sum(p.numel() for p in net.parameters())
    nbytes = _bytes_per_value(t.precision)
    slots = OPTIMIZER_SLOTS.get(cfg.optim.name, 2)
    if cfg.optim.name == "sgd" and cfg.optim.momentum == 0:
        slots = 0
    world = t.devices * t.num_nodes
    per_rank = max(1, cfg.data.batch_size // world)
    acts = _activations(cfg, net, datamodule, per_rank, nbytes) if datamodule is not None else None
    on_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
    return Footprint(params, (2 + slots) * params * nbytes, acts, 1 if on_gpu else t.devices)


def check_fits(cfg: RunConfig, datamodule=None, model: torch.nn.Module | None = None) -> Footprint:
    """Refuse a run whose estimated memory exceeds what is available (see the module docstring; ``estimate`` for
    ``datamodule`` and ``model``)."""
    t = cfg.trainer
    fp = estimate(cfg, datamodule, model)
    on_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and torch.cuda.is_available():
        have, where = torch.cuda.mem_get_info(0)[1], "GPU 0's total memory"
    else:
        have, where = available_memory()
    if have is None or fp.total <= have:
        return fp
    acts = (f" + at least {_gb(fp.activation_bytes)} of activations for a batch of {cfg.data.batch_size // (t.devices * t.num_nodes)}"
            if fp.activation_bytes else "")
    ranks = f" x {fp.ranks_here} ranks on this machine" if fp.ranks_here > 1 else ""
    raise ConfigError(
        f"model {cfg.model.backbone!r} with options {dict(cfg.model.options)} has {fp.params:,} parameters: "
        f"{_gb(fp.state_bytes)} of weights, gradients and {cfg.optim.name} state{acts}{ranks} = at least "
        f"{_gb(fp.total)}, but {_gb(have)} is available ({where}); make the model smaller (model.width, depth, ...) "
        f"or data.batch_size smaller, or run on a machine with more memory")
