"""What several sections share: the repository's files, norm inputs, the framework's run configs and a hand-written
training step built exactly as ``train()`` builds its run, and the model variants of a findings study."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .settings import Settings


def repo_file(*parts: str) -> Path:
    """A file of the source checkout (configs/, docs/): the bench runs from one."""
    return Path(__file__).resolve().parents[2].joinpath(*parts)


def inputs(layout: str, s: Settings, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A seeded input of ``s``'s size for a norm: images (N, C, H, W), or tokens (N, T, C) with a right-padding
    mask (N, T) of about ``s.pad_fraction`` pads."""
    g = torch.Generator().manual_seed(0)
    if layout == "image":
        x = torch.randn(*s.image, generator=g)
        return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), None
    n, t, _ = s.tokens
    x = torch.randn(*s.tokens, generator=g)
    lengths = t - (torch.rand(n, generator=g) * 2 * s.pad_fraction * t).long().clamp(max=t - 2)
    return x, torch.arange(t)[None, :] < lengths[:, None]  # right padding, ~pad_fraction on average


def fwd_bwd(fn: Callable, x: torch.Tensor, mask: torch.Tensor | None) -> Callable[[], None]:
    """A call of ``fn(x, mask)`` forward and backward (a fixed random output gradient), for timing."""
    grad = torch.randn_like(x)

    def run() -> None:
        xx = x.detach().requires_grad_(True)
        y = fn(xx, mask)
        y.backward(grad)

    return run


BACKBONE_CONFIGS = {
    "resnet20": {"model": {"backbone": "resnet20", "norm": "bn"},
                 "data": {"source": "synthetic", "batch_size": 128, "train_limit": 2048, "val_limit": 256,
                          "val_batch_size": 256},
                 "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}},
    "vit": {"model": {"backbone": "vit", "norm": "ln", "embed_dim": 192, "depth": 6, "num_heads": 3},
            "data": {"source": "synthetic", "batch_size": 64, "train_limit": 2048, "val_limit": 256,
                     "val_batch_size": 256},
            "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "grad_clip": 1.0}},
    "transformer_lm": {"model": {"backbone": "transformer_lm", "norm": "ln", "n_layer": 4, "n_head": 4,
                                 "n_embd": 128},
                       "data": {"source": "synthetic", "mode": "blocks", "block_size": 256, "batch_size": 32,
                                "val_batch_size": 32},
                       "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95],
                                 "grad_clip": 1.0}},
}
# tiny sizes (quick and test runs), per backbone: model options, and data options beyond the batch size
TINY_MODEL = {"resnet20": {"width": 4}, "vgg11": {"width": 0.125}, "vit": {"embed_dim": 32, "depth": 1, "num_heads": 2},
              "transformer_lm": {"n_layer": 1, "n_embd": 32, "n_head": 2}}
TINY_STUDY_MODEL = {**TINY_MODEL, "vit": {"embed_dim": 16, "depth": 1, "num_heads": 2}}  # study_variants
TINY_DATA = {"transformer_lm": {"block_size": 32}}


def framework_config(backbone: str, s: Settings, log_dir: str, tiny: bool = False) -> dict:
    cfg = {k: dict(v) for k, v in BACKBONE_CONFIGS[backbone].items()}
    if tiny:
        cfg["model"].update(TINY_MODEL[backbone])
        cfg["data"].update({"batch_size": 8, **TINY_DATA.get(backbone, {})})
    cfg["optim"].update({"schedule": "cosine", "warmup_steps": 2})
    cfg["trainer"] = {"max_steps": s.steps, "val_every": 10 * s.steps, "val_batches": 1, "progress": False,
                      "batchstat_gap": "off", "log_dir": log_dir, "log_every": 10,
                      "speed": "eager"}  # the hand loop's model is plain: both sides eager
    cfg["experiment"] = "bench"
    return cfg


def hand_setup(cfg: dict):
    """What a hand-written loop needs, built as ``train()`` builds it: the config, seeded data (set up for
    fitting), the model in training mode and its optimizer."""
    import lightning as L

    from ..build import build_model
    from ..config import from_dict
    from ..data import build_datamodule
    from ..tasks.optim import build_optimizer

    c = from_dict(cfg)
    L.seed_everything(c.seed, workers=True, verbose=False)
    dm = build_datamodule(c.data, c.task, c.seed)
    dm.prepare_data()
    dm.setup("fit")
    model = build_model(c, dm).train()
    return c, dm, model, build_optimizer(c.optim, model)


def task_loss(c, model: nn.Module, dm) -> Callable[[object], torch.Tensor]:
    """``loss(batch)`` of the run's task (``build.build_task``: the LightningModule ``train()`` fits) around
    ``model``: the hand loop computes its loss exactly as ``train()`` does, for any registered task."""
    from ..build import build_task

    return build_task(c, model, dm).loss


def hand_step(c, model: nn.Module, opt: torch.optim.Optimizer, batch, loss: Callable) -> torch.Tensor:
    """One training step as ``train()`` takes it: forward and ``loss`` (``task_loss``), backward, clipping,
    optimizer step."""
    opt.zero_grad(set_to_none=True)
    value = loss(batch)
    value.backward()
    if c.optim.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.optim.grad_clip)
    opt.step()
    return value


def study_variants(study: str, log_dir: str, tiny: bool = False) -> list[tuple[str, dict]]:
    """The model variants of ``configs/studies/<study>.yaml`` (every grid value but seed and LR; seed 0, the
    first LR) as run configs on the embedded synthetic data of the same shapes (32x32 images; text samples padded
    per batch), labelled by what differs: [(label, config dict)]."""
    from ..analysis.tables import config_label
    from ..labels import value_label
    from ..sweep.spec import load_spec

    spec = load_spec(repo_file("configs", "studies", f"{study}.yaml"),
                     overrides=["data.source=synthetic", "data.val_limit=null"])
    first = {a.key: a.values[0] for a in spec.axes if a.key in ("seed", "optim.lr")}
    varying = [a for a in spec.axes if a.key not in first and len(a.values) > 1]
    out = []
    for point in spec.points():
        if any(point.values[k] != v for k, v in first.items()):
            continue
        cfg = spec.trial_dict(point, run=f"bench-{len(out)}")
        cfg["trainer"].update({"log_dir": log_dir, "progress": False})
        if tiny:
            backbone = cfg["model"]["backbone"]
            cfg["model"].update(TINY_STUDY_MODEL.get(backbone, {}))
            cfg["data"].update({"batch_size": 4, "train_limit": 64, **TINY_DATA.get(backbone, {})})
        label = config_label([value_label(point.values[a.key]) for a in varying],
                             [a.key.split(".")[-1] for a in varying])
        out.append((label, cfg))
    return out


def hand_config(variants: list[tuple[str, dict]], label: str):
    from ..config import from_dict

    return from_dict(dict(variants)[label])

