"""Section ``framework``: training-step time of ``train()`` against a hand-written PyTorch loop on the same model,
data, optimizer and seed (losses compared), for ResNet-20, the ViT and the LM."""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

from ..harness import framework_config, hand_setup, hand_step, task_loss
from ..settings import Settings
from ..timing import Row
from . import register

TEXT = ("Training-step time of train() (Lightning, logging, monitors) against a hand-written PyTorch loop "
        "on the same model, data stream, optimizer, schedule and seed; losses compared step by step.")


def sizes(s: Settings) -> str:
    return (f"{s.steps} steps x {s.runs} run(s) per side" + (", tiny backbones" if s.tiny_models else ""))


class _StepTimer:
    """Lightning callback: wall time of each training step (batch start to batch end)."""

    def __init__(self) -> None:
        import lightning as L

        class CB(L.Callback):
            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx):  # noqa: N805
                cb.t0 = time.perf_counter()

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):  # noqa: N805
                self.times.append(time.perf_counter() - cb.t0)

        self.times: list[float] = []
        self.callback = CB()


def run_framework(cfg: dict) -> tuple[list[float], list[float]]:
    """Step times and training losses of ``train(cfg)``."""
    from ...train import train

    timer = _StepTimer()
    result = train(cfg, callbacks=[timer.callback])
    losses = [v for _, v in result.history.get("train/loss", [])]
    return timer.times, losses


def run_hand_loop(cfg: dict) -> tuple[list[float], list[float]]:
    """The same run as a plain PyTorch loop: same seed, model, data stream, optimizer, schedule, clipping."""
    from ...tasks.optim import build_scheduler

    c, dm, model, opt = hand_setup(cfg)
    loss_fn = task_loss(c, model, dm)
    sched = build_scheduler(c.optim, opt, c.trainer.max_steps)
    times, losses = [], []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(c.trainer.deterministic)  # as the Trainer sets it (trainer.deterministic)
    for step in range(c.trainer.max_steps):
        batch = dm.train_batch(step)
        t0 = time.perf_counter()
        loss = hand_step(c, model, opt, batch, loss_fn)
        sched.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    torch.use_deterministic_algorithms(previous)
    return times, losses


@register("framework", text=TEXT, sizes=sizes)
def run(s: Settings) -> list[Row]:
    rows = []
    warm = min(5, s.steps // 3)
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in s.backbones:
            fw_t, hand_t, fw_loss, hand_loss = [], [], [], []
            for r in range(s.runs):  # interleaved: framework, hand, framework, hand
                cfg = framework_config(backbone, s, tmp, s.tiny_models)
                cfg["run"] = f"{backbone}-{r}"
                t, fw_loss = run_framework(cfg)
                fw_t += t[warm:]
                t, hand_loss = run_hand_loop(cfg)
                hand_t += t[warm:]
            diff = max((abs(a - b) for a, b in zip(fw_loss, hand_loss, strict=False)), default=float("nan"))
            same = len(fw_loss) == len(hand_loss)
            fw, hd = statistics.median(fw_t), statistics.median(hand_t)
            rows.append(Row("framework", backbone, "", "eager", "train() step", "hand-written loop step",
                            fw * 1e3, hd * 1e3, "ms", fw / hd,
                            note=f"{len(fw_t)} steps/side; max |loss diff| {diff:.2e} over {len(fw_loss)} steps"
                                 + ("" if same else " (step counts differ)")))
    return rows
