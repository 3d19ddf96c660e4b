"""Section ``data``: on real CIFAR-10 (``--cifar10 PATH``), the share of step time spent producing batches for the
shipped VGG-11 and ResNet-20 configs, in a hand loop and inside ``train()``."""
from __future__ import annotations

import statistics
import tempfile
import time

import torch.nn.functional as F

from ..harness import TINY_MODEL, hand_setup, repo_file
from ..settings import Settings
from ..timing import Row, paired_ratio
from . import register

TEXT = ("Real CIFAR-10, the shipped VGG-11 and ResNet-20 configs (configs/runs/*_cifar10.yaml): time producing "
        "each training batch (indices, crop + flip, normalization: the batch builder train() runs on the "
        "device) against the model step, timed in turn every step of a hand loop (ratio = data / model step), "
        "and inside train() the time between steps (fetch, build, Lightning's loop) against the time in steps.")


def sizes(s: Settings) -> str:
    return (f"{s.data_steps} steps per config on {s.cifar10}" + (", tiny models" if s.tiny_models else ""))


CIFAR_CONFIGS = ("vgg11_cifar10", "resnet20_cifar10")  # configs/runs/<name>.yaml


def data_config(name: str, s: Settings, source: str, log_dir: str) -> dict:
    """The shipped run config ``configs/runs/<name>.yaml`` on ``source``, ``s.data_steps`` steps, no validation."""
    from ...config import load_yaml

    cfg = load_yaml(repo_file("configs", "runs", f"{name}.yaml"))
    cfg["data"]["source"] = source
    cfg["trainer"] = {**cfg.get("trainer", {}), "max_steps": s.data_steps, "val_every": 10 * s.data_steps,
                      "val_batches": 1, "progress": False, "batchstat_gap": "off", "speed": "eager", "log_dir": log_dir,
                      "accelerator": "cpu", "log_every": 10}
    cfg["experiment"] = "bench"
    if s.tiny_models:
        cfg["data"].update({"batch_size": 8, "train_limit": 64, "val_limit": 16, "val_batch_size": 16})
        cfg["model"].update(TINY_MODEL[cfg["model"]["backbone"]])
    return cfg


def hand_loop_split(cfg: dict) -> tuple[list[float], list[float]]:
    """Per step of a hand-written loop on ``cfg``: seconds building the batch (``train_batch``: indices, crop +
    flip, normalization, as ``train()`` does on the device) and seconds of the model step (forward, backward,
    optimizer)."""
    c, dm, model, opt = hand_setup(cfg)
    data_t, model_t = [], []
    for step in range(c.trainer.max_steps):
        t0 = time.perf_counter()
        x, y = dm.train_batch(step)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        t2 = time.perf_counter()
        data_t.append(t1 - t0)
        model_t.append(t2 - t1)
    return data_t, model_t


class _GapTimer:
    """Lightning callback: seconds inside each training step and between steps (the loop fetching and building the
    next batch: the data wait as ``train()`` sees it, with Lightning's own per-step bookkeeping)."""

    def __init__(self) -> None:
        import lightning as L

        class CB(L.Callback):
            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx):  # noqa: N805
                now = time.perf_counter()
                if getattr(cb, "t_end", None) is not None:
                    self.gaps.append(now - cb.t_end)
                cb.t0 = now

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):  # noqa: N805
                cb.t_end = time.perf_counter()
                self.steps.append(cb.t_end - cb.t0)

        self.steps: list[float] = []
        self.gaps: list[float] = []
        self.callback = CB()


@register("data", text=TEXT, sizes=sizes)
def run(s: Settings) -> list[Row]:
    """Share of step time spent producing batches on real CIFAR-10, for the shipped VGG-11 and ResNet-20 configs:
    in a hand loop (batch building vs model step, timed in turn every step) and inside ``train()`` (time between
    steps vs time in steps)."""
    from ...errors import ConfigError
    from ...train import train

    rows = []
    warm = min(3, s.data_steps // 3)
    source = s.cifar10
    with tempfile.TemporaryDirectory() as tmp:
        for name in CIFAR_CONFIGS:
            cfg = data_config(name, s, source, tmp)
            label = f"{name} (batch {cfg['data']['batch_size']})"
            try:
                data_t, model_t = hand_loop_split(cfg)
            except (ConfigError, OSError) as e:
                rows.append(Row("data", label, note=f"not run: CIFAR-10 source {source!r}: {str(e)[:200]}"))
                continue
            d, m = data_t[warm:], model_t[warm:]
            share = sum(d) / (sum(d) + sum(m))
            rows.append(Row("data", label, "image", "hand loop", "batch building (crop+flip, normalize)",
                            "model step (fwd+bwd+optimizer)", statistics.median(d) * 1e3, statistics.median(m) * 1e3,
                            "ms", paired_ratio(d, m),
                            note=f"data {share:.1%} of step time; {len(d)} steps; source {source}"))
            timer = _GapTimer()
            cfg["run"] = f"{name}-data"
            train(cfg, callbacks=[timer.callback])
            g, st = timer.gaps[warm:], timer.steps[warm + 1:]
            share = sum(g) / (sum(g) + sum(st)) if g else float("nan")
            rows.append(Row("data", label, "image", "train()", "between steps (fetch + build + loop)",
                            "inside a step", statistics.median(g) * 1e3 if g else None,
                            statistics.median(st) * 1e3 if st else None, "ms",
                            paired_ratio(g, st[: len(g)]) if g else None,
                            note=f"between steps {share:.1%} of step time; {len(g)} steps"))
    return rows
