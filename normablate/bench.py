"""``normablate bench``: how fast each norm, the framework and the tool itself are, on this machine.

Writes ``<out>/benchmarks.md`` and ``<out>/benchmarks.csv`` with the machine, library versions, the exact
command and the load average, and these sections:

- **norms**: every registered norm (the registry is iterated, so new norms appear by themselves) in both layouts,
  forward + backward, against its reference: the PyTorch layer computing the same math in its fastest exact
  formulation (``nn.BatchNorm1d`` on ``(N*T, C)`` for tokens BN, ``nn.LayerNorm`` on a channels-last tensor for
  per-pixel LN, ...); RMSNorm also against ``ln`` (the claim "RMSNorm is faster than LN"). With ``--compile``,
  both also under ``torch.compile``.
- **framework**: training-step time of ``train()`` against a hand-written PyTorch loop on the same model, data,
  optimizer and seed (losses compared), for ResNet-20, the ViT and the LM.
- **inference**: eval-mode throughput of a ResNet-20 per norm, BN also folded into its convs (``fold.py``).
- **allocator**: minor page faults and time per call with glibc's default malloc thresholds and ours
  (``alloc.py``), toggled in one process.
- **start-up**: ``normablate --help`` / ``--version`` / ``list`` (repeated runs), process start to the first
  training step, and the cost of a second run in the same process (what a sweep worker pays per trial).

Timing: every comparison is interleaved (A, B, A, B, ...) and reported as medians and as the median of the
per-repeat ratios, so a loaded machine slows both sides alike; absolute times on a shared machine are noisy,
ratios much less. Nothing here is asserted by the tests: they only check that a tiny bench runs and writes
well-formed results.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__, norms
from .alloc import GLIBC_DEFAULT, MMAP_THRESHOLD, TRIM_THRESHOLD, set_thresholds

FIELDS = ["section", "name", "layout", "variant", "ours", "reference", "ours_value", "reference_value", "unit",
          "ratio", "note"]


@dataclass
class Row:
    section: str
    name: str
    layout: str = ""
    variant: str = "eager"
    ours: str = ""  # what was measured
    reference: str = ""  # what it is compared with
    ours_value: float | None = None
    reference_value: float | None = None
    unit: str = "ms"
    ratio: float | None = None  # ours / reference (time) or reference / ours (throughput): > 1 = ours slower
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        def fmt(v):
            return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
        return {k: fmt(getattr(self, k)) for k in FIELDS}


@dataclass
class Settings:
    """Sizes and repeats of one bench run (``quick`` < 1 min; ``tiny`` only for the tests)."""

    image: tuple[int, int, int, int] = (64, 64, 32, 32)  # (N, C, H, W)
    tokens: tuple[int, int, int] = (32, 256, 384)  # (N, T, C)
    pad_fraction: float = 0.2  # masked norms: share of padded tokens
    repeats: int = 25
    steps: int = 20  # framework: training steps per run (the first few are warm-up)
    runs: int = 2  # framework: interleaved runs per side
    infer_batch: int = 256
    startup_runs: int = 5
    backbones: tuple[str, ...] = ("resnet20", "vit", "transformer_lm")
    sections: tuple[str, ...] = ("norms", "allocator", "inference", "framework", "startup")
    compile: bool = False
    norms: tuple[str, ...] | None = None  # norm rows for these names only (None: every registered norm)
    tiny_models: bool = False  # framework: tiny backbones (quick and test runs)

    @classmethod
    def make(cls, quick: bool = False, tiny: bool = False, compile: bool = False) -> Settings:
        if tiny:
            return cls(image=(4, 8, 4, 4), tokens=(2, 8, 16), repeats=2, steps=3, runs=1, infer_batch=4,
                       startup_runs=1, backbones=("resnet20", "transformer_lm"), compile=compile, tiny_models=True)
        if quick:
            return cls(image=(32, 32, 16, 16), tokens=(16, 128, 192), repeats=7, steps=12, runs=1,
                       infer_batch=64, startup_runs=2, compile=compile, tiny_models=True)
        return cls(compile=compile)


@dataclass
class Report:
    settings: Settings
    command: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ timing
def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (A, B, A, B, ...) ``repeats`` times after warm-up."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-repeat ratios a_i / b_i (robust to load that changes between repeats)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True) if y > 0)


def _compare(section: str, name: str, layout: str, ours_label: str, ref_label: str, ours: Callable,
             ref: Callable, repeats: int, variant: str = "eager", note: str = "") -> Row:
    t = interleaved({"ours": ours, "ref": ref}, repeats)
    return Row(section, name, layout, variant, ours_label, ref_label, statistics.median(t["ours"]) * 1e3,
               statistics.median(t["ref"]) * 1e3, "ms", paired_ratio(t["ours"], t["ref"]), note)


# ------------------------------------------------------------------------------------------ norms
def _reference(name: str, layout: str, c: int) -> tuple[str, Callable]:
    """The PyTorch formulation a norm is compared with: (label, fn(x, mask)). Norms without an entry in
    ``_REFS`` (the BN family, new norms) are compared with PyTorch's BatchNorm in its fastest layout."""
    if name in _REFS:
        return _REFS[name](layout, c)
    if layout == "image":
        ref = nn.BatchNorm2d(c)
        return "nn.BatchNorm2d", lambda x, m: ref(x)
    ref1 = nn.BatchNorm1d(c)
    return "nn.BatchNorm1d on all (N*T, C) tokens", lambda x, m: ref1(x.reshape(-1, c)).view(x.shape)


def _ln_ref(layout: str, c: int):
    ref = nn.LayerNorm(c)
    if layout == "image":  # per pixel over C: nn.LayerNorm on a channels-last tensor (no copy)
        return ("nn.LayerNorm on channels-last x",
                lambda x, m: ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    return "nn.LayerNorm", lambda x, m: ref(x)


def _gn_ref(layout: str, c: int):
    ref = nn.GroupNorm(norms.group.default_groups(c), c)
    if layout == "image":
        return "nn.GroupNorm", lambda x, m: ref(x)
    return "nn.GroupNorm on (N*T, C)", lambda x, m: ref(x.reshape(-1, c)).view(x.shape)


def _rms_ref(layout: str, c: int):
    ref = nn.RMSNorm(c, eps=1e-6)
    if layout == "image":
        return ("nn.RMSNorm (F.rms_norm) on channels-last x",
                lambda x, m: ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    return "nn.RMSNorm (F.rms_norm)", lambda x, m: ref(x)


def _dyt_ref(layout: str, c: int):
    return _ln_ref(layout, c)  # DyT replaces LN: LN is its yardstick


_REFS: dict[str, Callable] = {"ln": _ln_ref, "gn": _gn_ref, "rms": _rms_ref, "dyt": _dyt_ref,
                              "none": lambda layout, c: ("nothing (x returned)", lambda x, m: x * 1.0)}


def _inputs(layout: str, s: Settings, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    if layout == "image":
        x = torch.randn(*s.image, generator=g)
        return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), None
    n, t, _ = s.tokens
    x = torch.randn(*s.tokens, generator=g)
    lengths = t - (torch.rand(n, generator=g) * 2 * s.pad_fraction * t).long().clamp(max=t - 2)
    return x, torch.arange(t)[None, :] < lengths[:, None]  # right padding, ~pad_fraction on average


def _fwd_bwd(fn: Callable, x: torch.Tensor, mask: torch.Tensor | None) -> Callable[[], None]:
    grad = torch.randn_like(x)

    def run() -> None:
        xx = x.detach().requires_grad_(True)
        y = fn(xx, mask)
        y.backward(grad)

    return run


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def bench_norms(s: Settings) -> list[Row]:
    rows = []
    for name in s.norms or norms.available():
        for layout in norms.LAYOUTS:
            try:
                c = s.image[1] if layout == "image" else s.tokens[2]
                ours_mod = norms.create(name, c, layout=layout)
            except Exception as e:  # noqa: BLE001 - a norm that does not support a layout is reported, not fatal
                rows.append(Row("norms", name, layout, note=f"not built: {e}"))
                continue
            label, ref = _reference(name, layout, c)
            x, mask = _inputs(layout, s, channels_last=False)
            takes_mask = mask is not None

            def ours(xx, m, mod=ours_mod, takes_mask=takes_mask):
                return mod(xx, mask=m) if takes_mask else mod(xx)

            note = f"{mask.float().mean():.0%} real tokens" if takes_mask else ""
            rows.append(_compare("norms", name, layout, name, label, _fwd_bwd(ours, x, mask),
                                 _fwd_bwd(ref, x, mask), s.repeats, note=note))
            if name == "rms":  # the claim: RMSNorm faster than LN
                ln = norms.create("ln", c, layout=layout)
                rows.append(_compare("norms", name, layout, "rms", "ln (ours)", _fwd_bwd(ours, x, mask),
                                     _fwd_bwd(lambda xx, m, ln=ln: ln(xx), x, mask), s.repeats,
                                     note="claim: RMSNorm faster than LN"))
            if layout == "image" and name in ("ln", "rms"):
                xcl, _ = _inputs(layout, s, channels_last=True)
                rows.append(_compare("norms", name, layout, f"{name} on channels-last x", label,
                                     _fwd_bwd(ours, xcl, None), _fwd_bwd(ref, xcl, None), s.repeats,
                                     variant="channels_last"))
            if s.compile:
                try:
                    rows.append(_compare("norms", name, layout, name, label, _fwd_bwd(_compiled(ours), x, mask),
                                         _fwd_bwd(_compiled(ref), x, mask), s.repeats, variant="compiled"))
                except Exception as e:  # noqa: BLE001
                    rows.append(Row("norms", name, layout, "compiled", note=f"torch.compile failed: {type(e).__name__}"))
    return rows


# ------------------------------------------------------------------------------------------ allocator
def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_allocator(s: Settings) -> list[Row]:
    """The same calls with glibc's default thresholds and with ours, toggled in one process (interleaved)."""
    from .models import create as create_model

    c = s.tokens[2]
    mbn = norms.create("masked_bn", c, layout="tokens")
    x, mask = _inputs("tokens", s, channels_last=False)
    net = create_model("resnet20", norm="ln", num_classes=10).eval()
    xi = torch.randn(s.infer_batch, 3, 32, 32)
    cases = {"masked_bn fwd+bwd (tokens)": _fwd_bwd(lambda xx, m: mbn(xx, mask=m), x, mask),
             "ResNet-20 (ln) eval forward": lambda: net(xi)}
    rows = []
    for label, fn in cases.items():
        stats = {"default": ([], []), "tuned": ([], [])}
        for _ in range(max(3, s.repeats // 2)):
            for mode in ("default", "tuned"):
                if mode == "default":
                    set_thresholds(GLIBC_DEFAULT, GLIBC_DEFAULT)
                else:
                    set_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)
                with torch.no_grad() if "eval" in label else contextlib.nullcontext():
                    fn()  # first call after the switch settles the heap
                    f0, t0 = _minflt(), time.perf_counter()
                    fn()
                    stats[mode][0].append(time.perf_counter() - t0)
                    stats[mode][1].append(_minflt() - f0)
        set_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)
        (td, fd), (tt, ft) = stats["default"], stats["tuned"]
        rows.append(Row("allocator", label, "", "time", "tuned thresholds", "glibc default thresholds",
                        statistics.median(tt) * 1e3, statistics.median(td) * 1e3, "ms", paired_ratio(tt, td)))
        rows.append(Row("allocator", label, "", "page faults", "tuned thresholds", "glibc default thresholds",
                        float(statistics.median(ft)), float(statistics.median(fd)), "minor faults/call"))
    return rows


# ------------------------------------------------------------------------------------------ inference
def bench_inference(s: Settings) -> list[Row]:
    """Eval-mode ResNet-20 images/s per norm; BN also folded into its convs (as deployed)."""
    from .fold import fold_batchnorm
    from .models import create as create_model

    x = torch.randn(s.infer_batch, 3, 32, 32)
    nets: dict[str, nn.Module] = {}
    for name in ("bn", "ln", "rms", "gn", "none"):
        net = create_model("resnet20", norm=name, num_classes=10)
        with torch.no_grad():
            net.train()
            net(x[: min(16, len(x))])  # running statistics that are not the init values
        nets[name] = net.eval()
    folded, count = fold_batchnorm(nets["bn"])
    nets["bn folded"] = folded
    fns = {k: (lambda m=m: m(x)) for k, m in nets.items()}
    with torch.inference_mode():
        t = interleaved(fns, s.repeats)
    ref = t["bn folded"]
    rows = []
    for k, v in t.items():
        ips = len(x) / statistics.median(v)
        rows.append(Row("inference", f"resnet20 {k}", "image", "eval", k, "bn folded", ips,
                        len(x) / statistics.median(ref), "images/s", paired_ratio(v, ref),
                        note=f"{count} conv+BN pairs folded" if k == "bn folded" else ""))
    return rows


# ------------------------------------------------------------------------------------------ framework
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
TINY_MODEL = {"resnet20": {"width": 4}, "vit": {"embed_dim": 32, "depth": 1, "num_heads": 2},
              "transformer_lm": {"n_layer": 1, "n_embd": 32, "n_head": 2}}


def framework_config(backbone: str, s: Settings, log_dir: str, tiny: bool = False) -> dict:
    cfg = {k: dict(v) for k, v in BACKBONE_CONFIGS[backbone].items()}
    if tiny:
        cfg["model"].update(TINY_MODEL[backbone])
        cfg["data"]["batch_size"] = 8
        if backbone == "transformer_lm":
            cfg["data"]["block_size"] = 32
    cfg["optim"].update({"schedule": "cosine", "warmup_steps": 2})
    cfg["trainer"] = {"max_steps": s.steps, "val_every": 10 * s.steps, "val_batches": 1, "progress": False,
                      "track_batchstat_gap": False, "log_dir": log_dir, "log_every": 10}
    cfg["experiment"] = "bench"
    return cfg


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
    from .train import train

    timer = _StepTimer()
    result = train(cfg, callbacks=[timer.callback])
    losses = [v for _, v in result.history.get("train/loss", [])]
    return timer.times, losses


def run_hand_loop(cfg: dict) -> tuple[list[float], list[float]]:
    """The same run as a plain PyTorch loop: same seed, model, data stream, optimizer, schedule, clipping."""
    import lightning as L

    from .config import from_dict
    from .data import build_datamodule
    from .tasks.optim import build_optimizer, build_scheduler
    from .train import build_model

    c = from_dict(cfg)
    L.seed_everything(c.seed, workers=True, verbose=False)
    dm = build_datamodule(c.data, c.task, c.seed)
    dm.prepare_data()
    dm.setup("fit")
    model = build_model(c, dm).train()
    opt = build_optimizer(c.optim, model)
    sched = build_scheduler(c.optim, opt, c.trainer.max_steps)
    times, losses = [], []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(c.trainer.deterministic)  # as the Trainer sets it (trainer.deterministic)
    for step in range(c.trainer.max_steps):
        batch = dm.train_batch(step)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if c.task == "classification":
            x, y = batch
            loss = F.cross_entropy(model(x), y)
        else:
            idx, targets, mask = batch
            logits = model(idx, mask=mask)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        if c.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.optim.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    torch.use_deterministic_algorithms(previous)
    return times, losses


def bench_framework(s: Settings, tiny: bool = False) -> list[Row]:
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


# ------------------------------------------------------------------------------------------ start-up
def _timed_process(argv: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        out.append(time.perf_counter() - t0)
    return out


_FIRST_STEP = """
import sys, time, json
t_start = float(sys.argv[1])
import lightning as L
from normablate.train import train
cfg = json.loads(sys.argv[2])
class First(L.Callback):
    def on_train_batch_start(self, *a):
        if not hasattr(self, "t"):
            self.t = time.time() - t_start
first = First()
t1 = time.perf_counter(); train(cfg, callbacks=[first]); t2 = time.perf_counter()
first2 = First(); cfg["run"] = cfg["run"] + "-again"
t_second = time.time(); train(cfg, callbacks=[first2])
print(json.dumps({"first_step": first.t, "second_first_step": first2.t - (t_second - t_start)}))
"""


def bench_startup(s: Settings, tiny: bool = False) -> list[Row]:
    import json

    exe = [sys.executable, "-m", "normablate"]
    rows = []
    base = _timed_process([sys.executable, "-c", "pass"], s.startup_runs)
    torch_t = _timed_process([sys.executable, "-c", "import torch"], s.startup_runs)
    for args in ([["--version"]] if tiny else (["--help"], ["--version"], ["list"])):
        t = _timed_process(exe + args, s.startup_runs)
        rows.append(Row("startup", "normablate " + " ".join(args), "", "process", "whole process",
                        "python -c 'import torch'", statistics.median(t), statistics.median(torch_t), "s",
                        statistics.median(t) / statistics.median(torch_t),
                        note=f"min {min(t):.2f} s, max {max(t):.2f} s over {len(t)} runs; bare python "
                             f"{statistics.median(base):.2f} s"))
    if tiny:
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        cfg = framework_config("resnet20", s, tmp, tiny=True)
        cfg["trainer"]["max_steps"] = 2
        cfg["run"] = "startup"
        proc = subprocess.run([sys.executable, "-c", _FIRST_STEP, repr(time.time()), json.dumps(cfg)],
                              capture_output=True, text=True, check=False)
        try:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(Row("startup", "process start -> first training step", "", "process", "train()", "",
                            res["first_step"], None, "s", note="tiny ResNet-20, data cache warm"))
            rows.append(Row("startup", "second run in the same process -> first step", "", "in-process",
                            "train() again", "", res["second_first_step"], None, "s",
                            note="what a sweep worker pays per trial after the first"))
        except (IndexError, ValueError, KeyError):
            rows.append(Row("startup", "process start -> first training step", note="failed: "
                            + (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]))
    return rows


# ------------------------------------------------------------------------------------------ report
def machine() -> dict[str, str]:
    import lightning
    import timm

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__, "timm": timm.__version__, "normablate": __version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else "no GPU"}


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _md_table(rows: list[Row]) -> str:
    head = "| name | layout | variant | ours | reference | ours | reference | ratio | note |\n|---|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        d = r.as_dict()
        unit = f" {r.unit}" if r.ours_value is not None else ""
        ref_unit = f" {r.unit}" if r.reference_value is not None else ""
        ratio = f"**{d['ratio']}×**" if d["ratio"] else ""
        lines.append(f"| {r.name} | {r.layout} | {r.variant} | {r.ours} | {r.reference} | {d['ours_value']}{unit} | "
                     f"{d['reference_value']}{ref_unit} | {ratio} | {r.note} |")
    return "\n".join(lines)


SECTION_TEXT = {
    "norms": "Forward + backward per call, median of interleaved repeats; ratio = ours / reference (median of "
             "per-repeat ratios; > 1 = ours slower).",
    "allocator": "Same process, glibc malloc thresholds switched between glibc's defaults (128 KiB) and "
                 "normablate's (mmap 32 MiB, trim 1 GiB, applied by the CLI and train()); ratio = tuned / default.",
    "inference": "Eval-mode ResNet-20 forward, images per second; ratio = time relative to BN folded into the "
                 "convs (> 1 = slower than folded BN).",
    "framework": "Training-step time of train() (Lightning, logging, monitors) against a hand-written PyTorch loop "
                 "on the same model, data stream, optimizer, schedule and seed; losses compared step by step.",
    "startup": "Wall time of whole processes (repeated) and of the first training step after process start.",
}


# (section, name, layout, reference label or "" for any, limit on the ratio, goal) - issue 11's goals
GOALS = [
    ("norms", "bn", "tokens", "", 1.05, "bn tokens at BatchNorm1d-on-(N*T, C) speed"),
    ("norms", "masked_bn", "tokens", "", 1.5, "masked_bn <= 1.5x BatchNorm1d on all tokens"),
    ("norms", "noisy_bn", "image", "", 1.2, "noisy_bn <= 1.2x BN (image)"),
    ("norms", "noisy_bn", "tokens", "", 1.2, "noisy_bn <= 1.2x BN (tokens)"),
    ("norms", "rms", "tokens", "ln (ours)", 1.0, "rms <= ln (tokens)"),
    ("norms", "rms", "image", "ln (ours)", 1.0, "rms <= ln (image)"),
    ("norms", "ln", "image", "", 1.05, "ln image within 1.05x of nn.LayerNorm on channels-last x"),
    ("framework", "resnet20", "", "", 1.03, "train() <= 1.03x a hand loop (ResNet-20)"),
    ("framework", "vit", "", "", 1.03, "train() <= 1.03x a hand loop (ViT)"),
    ("framework", "transformer_lm", "", "", 1.03, "train() <= 1.03x a hand loop (LM)"),
]


def summary(rows: list[Row]) -> list[str]:
    """One line per goal found among ``rows``: the measured ratio and whether it is met."""
    lines = []
    for section, name, layout, ref, limit, goal in GOALS:
        hit = [r for r in rows if r.section == section and r.name == name and r.layout == layout
               and r.variant == "eager" and r.ratio is not None and (not ref or r.reference == ref)
               and (ref or r.reference != "ln (ours)")]
        if hit:
            ratio = hit[0].ratio
            met = ratio <= limit
            why = "" if met else WHY_NOT.get((name, layout), "")
            lines.append(f"- {goal}: **{ratio:.2f}×** — {'met' if met else 'NOT met'}" + (f" ({why})" if why else ""))
    for r in rows:
        if r.section == "startup" and r.name in ("normablate --help", "normablate --version", "normablate list") \
                and r.ours_value:
            lines.append(f"- `{r.name}` under 1.5 s: {r.ours_value:.2f} s — {'met' if r.ours_value < 1.5 else 'NOT met'}")
        if r.section == "startup" and r.name == "process start -> first training step" and r.ours_value:
            met = r.ours_value < 2.0
            lines.append(f"- process start -> first training step under 2 s: {r.ours_value:.2f} s — "
                         f"{'met' if met else 'NOT met (' + WHY_NOT[('startup', '')] + ')'}")
    return lines


# Why a goal is not met, where the reason is known (measured with the profiler and -X importtime on this CPU).
WHY_NOT = {
    ("masked_bn", "tokens"): "eager CPU ops: masking, centring and the two masked correction terms cost ~4 more "
                             "passes over the activations than PyTorch's fused BN kernel; under torch.compile it "
                             "measured ~1.5x",
    ("noisy_bn", "image"): "the per-sample noise is one extra pass forward and one backward over the activations; "
                           "no fused PyTorch kernel takes a per-(sample, channel) affine",
    ("noisy_bn", "tokens"): "as for images: one extra pass each way for the per-sample noise",
    ("rms", "tokens"): "a finding, not a bug we could fix: PyTorch has no fused CPU RMSNorm kernel; the fastest exact "
                       "formulation found (one vector_norm + two elementwise passes forward, LayerNorm's fused "
                       "backward with mean 0 + one correction) is still slower than the fused LayerNorm kernel",
    ("startup", ""): "floor: import torch ~1.5 s + Lightning ~2.4 s (torchmetrics imports torchvision and dynamo); "
                     "a sweep worker pays it once, later trials start in the time of the 'second run' row",
}


def write(report: Report, out: Path, load_before: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "benchmarks.csv", out / "benchmarks.md"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for r in report.rows:
        w.writerow(r.as_dict())
    csv_path.write_text(buf.getvalue())
    s = report.settings
    info = machine()
    lines = ["# normablate benchmarks", "",
             f"Command: `{report.command}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
             f"Load average (1, 5, 15 min): before {load_before}, after {load_average()}  ",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), "",
             f"Sizes: image x {s.image}, tokens x {s.tokens} ({s.pad_fraction:.0%} padding on average for masked "
             f"norms), {s.repeats} interleaved repeats; framework {s.steps} steps x {s.runs} run(s) per side. "
             "Absolute times on a shared, loaded machine are noisy; read the ratios.", ""]
    goals = summary(report.rows)
    if goals:
        lines += ["## Goals (issue 11), from the rows below", "", *goals, ""]
    lines += ["Section run times: " + ", ".join(report.notes)]
    for section in s.sections:
        rows = [r for r in report.rows if r.section == section]
        if not rows:
            continue
        lines += ["", f"## {section}", "", SECTION_TEXT.get(section, ""), "", _md_table(rows)]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def run_bench(out: Path | str = "docs", quick: bool = False, tiny: bool = False, compile: bool = False,
              sections: list[str] | None = None, command: str | None = None,
              threads: int | None = None, norm_names: list[str] | None = None) -> tuple[Path, Path]:
    """Run the benchmark (``sections``: a subset of ``SECTIONS``) and write ``benchmarks.md`` / ``benchmarks.csv`` under ``out``; returns their paths."""
    s = Settings.make(quick=quick, tiny=tiny, compile=compile)
    if threads:
        torch.set_num_threads(threads)
    if norm_names:
        s.norms = tuple(norm_names)
    if sections:
        s.sections = tuple(x for x in s.sections if x in sections)
    report = Report(s, command or "normablate bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    load_before = load_average()
    steps: dict[str, Callable[[], list[Row]]] = {
        "norms": lambda: bench_norms(s), "allocator": lambda: bench_allocator(s),
        "inference": lambda: bench_inference(s), "framework": lambda: bench_framework(s, tiny),
        "startup": lambda: bench_startup(s, tiny)}
    for name in s.sections:
        t0 = time.perf_counter()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        report.rows += steps[name]()
        report.notes.append(f"{name}: {time.perf_counter() - t0:.0f} s")
    return write(report, Path(out), load_before)


SECTIONS = ("norms", "allocator", "inference", "framework", "startup")


def cmd_bench(args: argparse.Namespace) -> int:
    md, csv_path = run_bench(args.out, quick=args.quick, compile=args.compile, sections=args.only,
                             threads=args.threads, norm_names=getattr(args, "norms", None))
    print(f"wrote {md} and {csv_path}")
    return 0


__all__ = ["SECTIONS", "Row", "Settings", "cmd_bench", "interleaved", "run_bench"]
