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
- **vit_inference** (alone: ``--only vit_inference``): claim 7 (Yao et al. 2021) is inference
  speed: the vit_norms study's ViT in eval mode at batch 128 and 1, 1 thread, LN against BN everywhere,
  LN + BN-in-FFN and BN + BN-in-FFN, each BN variant unfolded and folded into its adjacent Linears (``fold.py``).
- **models**: training-step time (forward, backward, clipping, optimizer step) of every model variant of the
  findings studies, at the studies' sizes (``configs/studies/santurkar_vgg.yaml``: VGG-11 with bn / noisy_bn /
  none; ``vit_norms.yaml``: block norm x BN in the FFN; ``lm_norms.yaml``: 7 norms on padded samples), all
  variants interleaved step by step on one fixed batch, against the study's first variant (LN; BN for VGG): the
  speed half of claims 7, 8 and 12 (the study runs' own wall times share the machine with other work and are not
  comparable). Per variant also the FLOPs of a step (``FlopCounterMode``, CPU flash attention added by hand), the
  achieved GFLOP/s as a share of a matmul peak measured in the same run, and ``trainer.speed: auto`` vs eager.
- **allocator**: minor page faults and time per call with glibc's default malloc thresholds and ours
  (``alloc.py``), toggled in one process.
- **start-up**: ``normablate --help`` / ``--version`` / ``list`` (repeated runs), process start to the first
  training step, and the cost of a second run in the same process (what a sweep worker pays per trial).
- **data**: on real CIFAR-10 (``--cifar10 PATH``), the share of step time spent producing batches for the
  shipped VGG-11 and ResNet-20 configs, in a hand loop and inside ``train()``.
- **sweep** (``--sweep`` or ``--only sweep``; minutes): trials per hour of the README's quick sweep with
  ``--workers 1`` vs ``2`` (the real command, fresh temporary storage and log folder), and each trial's time
  beyond its training steps (set-up, validation, between steps), first trial of a worker vs later ones.

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
import math
import re
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
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
    sections: tuple[str, ...] = ("norms", "allocator", "inference", "vit_inference", "framework", "models", "startup",
                                 "data")
    data_steps: int = 20  # data: training steps per config (the first few are warm-up)
    cifar10: str = field(default_factory=lambda: os.environ.get("NORMABLATE_BENCH_CIFAR10", "cifar10"))
    # sweep: the quick sweep (configs/sweeps/quick.yaml) on part of its grid (None: the spec's own values), so that
    # both sides run twice in minutes on a loaded 2-core machine; every trial is one of the quick sweep's trials
    # but for ``sweep_overrides``
    sweep_seeds: tuple[int, ...] = (0,)
    sweep_lrs: tuple[float, ...] | None = (0.003, 0.01)
    sweep_norms: tuple[str, ...] | None = ("bn", "ln")
    sweep_rounds: int = 2  # runs per side, interleaved A B B A
    sweep_overrides: tuple[str, ...] = ("trainer.max_steps=50",)  # key=value for every trial (one validation)
    compile: bool = False
    norms: tuple[str, ...] | None = None  # norm rows for these names only (None: every registered norm)
    tiny_models: bool = False  # framework: tiny backbones (quick and test runs)
    model_studies: tuple[str, ...] = ("santurkar_vgg", "vit_norms", "lm_norms")  # models: configs/studies/<name>.yaml
    model_repeats: int = 20  # models: interleaved steps per variant (after 2 warm-up steps)
    vit_batches: tuple[int, int] = (128, 1)  # vit_inference: the two batch sizes (study batch, one image)
    vit_repeats: int = 30  # vit_inference: interleaved repeats per variant and batch
    vit_inner_b1: int = 20  # vit_inference: calls per timed repeat at the second batch (a single image is ~1 ms)

    @classmethod
    def make(cls, quick: bool = False, tiny: bool = False, compile: bool = False) -> Settings:
        if tiny:
            return cls(image=(4, 8, 4, 4), tokens=(2, 8, 16), repeats=2, steps=3, runs=1, infer_batch=4,
                       startup_runs=1, backbones=("resnet20", "transformer_lm"), compile=compile, tiny_models=True,
                       data_steps=4, cifar10="synthetic", sweep_rounds=1, sweep_lrs=(0.001, 0.003),
                       sweep_norms=("bn",), sweep_overrides=("trainer.max_steps=4", "trainer.val_every=2"),
                       model_repeats=2, vit_batches=(4, 1), vit_repeats=2, vit_inner_b1=1)
        if quick:
            return cls(image=(32, 32, 16, 16), tokens=(16, 128, 192), repeats=7, steps=12, runs=1,
                       infer_batch=64, startup_runs=2, compile=compile, tiny_models=True, data_steps=8,
                       sweep_rounds=1, model_repeats=3, vit_repeats=7, vit_inner_b1=5)
        return cls(compile=compile)


@dataclass
class Report:
    settings: Settings
    command: str
    rows: list[Row] = field(default_factory=list)


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


def _compiled_rows(name: str, layout: str, label: str, ours: Callable, ref: Callable, x: torch.Tensor,
                   mask: torch.Tensor | None, s: Settings) -> list[Row]:
    """Under ``torch.compile`` (forward and backward, static shapes): ours vs the reference both compiled, ours
    compiled vs ours eager (what compiling buys), and for RMSNorm the claim against LN, compiled and eager."""
    rows = []
    t0 = time.perf_counter()
    # The closures of every norm share code objects: without a reset, dynamo's recompile limit (8 per code object)
    # is reached after a few norms and later "compiled" calls silently run eager.
    torch._dynamo.reset()
    try:
        ours_c = _compiled(ours)
        ref_c = _compiled(ref)
        rows.append(_compare("norms", name, layout, f"{name} compiled", f"{label} compiled",
                             _fwd_bwd(ours_c, x, mask), _fwd_bwd(ref_c, x, mask), s.repeats, variant="compiled"))
        rows.append(_compare("norms", name, layout, f"{name} compiled", f"{name} eager", _fwd_bwd(ours_c, x, mask),
                             _fwd_bwd(ours, x, mask), s.repeats, variant="compiled",
                             note="what torch.compile buys this norm"))
        if name == "rms":
            c = x.shape[1] if layout == "image" else x.shape[-1]
            ln = norms.create("ln", c, layout=layout)

            def ln_fn(xx, m, ln=ln):
                return ln(xx)

            ln_c = _compiled(ln_fn)
            rows.append(_compare("norms", name, layout, "rms compiled", "ln (ours) compiled",
                                 _fwd_bwd(ours_c, x, mask), _fwd_bwd(ln_c, x, mask), s.repeats, variant="compiled",
                                 note="claim: RMSNorm faster than LN, both compiled"))
            rows.append(_compare("norms", name, layout, "rms compiled", "ln (ours) eager", _fwd_bwd(ours_c, x, mask),
                                 _fwd_bwd(ln_fn, x, mask), s.repeats, variant="compiled",
                                 note="claim: compiled RMSNorm vs the fused eager LayerNorm kernel"))
    except Exception as e:  # noqa: BLE001 - a norm torch.compile cannot handle is reported, not fatal
        rows.append(Row("norms", name, layout, "compiled", note=f"torch.compile failed: {type(e).__name__}: "
                                                                  f"{str(e).splitlines()[0][:150] if str(e) else ''}"))
    if rows:
        rows[0].note = (rows[0].note + "; " if rows[0].note else "") + \
            f"compiling and timing this norm's compiled rows took {time.perf_counter() - t0:.0f} s"
    return rows


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
                rows += _compiled_rows(name, layout, label, ours, ref, x, mask, s)
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


def ratio_ci(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap CI of ``paired_ratio(a, b)`` (the median of the per-repeat ratios), resampling the
    interleaved repeats (pairs) with replacement; a fixed seed, so a bench run's CI is reproducible from its times."""
    import numpy as np

    r = np.asarray(a, dtype=float) / np.asarray(b, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(r), (resamples, len(r)))
    meds = np.median(r[idx], axis=1)
    return float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))


def bench_vit_inference(s: Settings) -> list[Row]:
    """Yao et al. (2021)'s claim 7 is inference speed: eval-mode ViT images/s at the vit_norms study's size
    (configs/studies/vit_norms.yaml's model), 1 thread, batches 128 and 1, interleaved; BN folded into the
    adjacent Linear layers (normablate.fold: pre-norm BN -> qkv/fc1, BN-in-FFN fc1 -> BN) against LN, which
    cannot fold. Ratio: the median of per-repeat time ratios against LN (< 1 = faster than LN), with its 95%
    bootstrap CI over the repeats (``ratio_ci``) in the note."""
    from .fold import fold_norms
    from .models import create as create_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = {("ln", None): "ln", ("bn", None): "bn", ("ln", "bn"): "ln + BN-in-FFN", ("bn", "bn"): "bn + BN-in-FFN"}
        models: dict[str, dict] = {}
        for _, cfg in study_variants("vit_norms", tempfile.gettempdir(), tiny=s.tiny_models):
            m = dict(cfg["model"])
            key = (m.get("norm"), m.get("ffn_norm"))
            if key in want:
                models[want[key]] = m
        torch.manual_seed(0)
        warm = torch.randn(64, 3, 32, 32)
        nets: dict[str, nn.Module] = {}
        notes: dict[str, str] = {}
        size = ""
        for label, m in models.items():
            m = dict(m)
            backbone, norm = m.pop("backbone"), m.pop("norm")
            net = create_model(backbone, norm=norm, num_classes=10, **m)
            size = f"embed_dim {m.get('embed_dim')}, depth {m.get('depth')}, heads {m.get('num_heads')}"
            if label != "ln":  # every other variant has BNs
                with torch.no_grad():  # running statistics away from their init values
                    net.train()
                    for _ in range(3):
                        net(warm * 1.5 + 0.3)
                net.eval()
                nets[label + " (unfolded)"] = net
                folded, rep = fold_norms(net)
                nets[label + " folded"] = folded
                notes[label + " folded"] = (f"{len(rep.folded)} BN folded"
                                            + (f"; left: {', '.join(n for n, _ in rep.left)}" if rep.left else ""))
            else:
                nets[label] = net.eval()
        rows = []
        for batch, inner in ((s.vit_batches[0], 1), (s.vit_batches[1], s.vit_inner_b1)):
            x = torch.randn(batch, 3, 32, 32)

            def call(net: nn.Module, x: torch.Tensor = x, inner: int = inner) -> None:
                for _ in range(inner):
                    net(x)
            fns = {k: (lambda net=net: call(net)) for k, net in nets.items()}
            with torch.inference_mode():
                t = interleaved(fns, s.vit_repeats, warmup=2)
            ref = t["ln"]
            for k, v in t.items():
                ips = batch * inner / statistics.median(v)
                ratio = paired_ratio(v, ref)
                ci = "" if k == "ln" else "ratio 95%% CI [%.3f, %.3f] (bootstrap over repeats)" % ratio_ci(v, ref)
                rows.append(Row("vit_inference", f"vit {k} b{batch}", "tokens", "eval", k, "ln", ips,
                                batch * inner / statistics.median(ref), "images/s", ratio,
                                note="; ".join(x for x in (notes.get(k, ""), ci,
                                                           f"{size}; {1 / ratio:.2f}x LN's speed") if x)))
        return rows
    finally:
        torch.set_num_threads(threads)


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
TINY_MODEL = {"resnet20": {"width": 4}, "vgg11": {"width": 0.125}, "vit": {"embed_dim": 32, "depth": 1, "num_heads": 2},
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
                      "batchstat_gap": "off", "log_dir": log_dir, "log_every": 10,
                      "speed": "eager"}  # the hand loop's model is plain: both sides eager
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


def _hand_setup(cfg: dict):
    """What a hand-written loop needs, built as ``train()`` builds it: the config, seeded data (set up for
    fitting), the model in training mode and its optimizer."""
    import lightning as L

    from .config import from_dict
    from .data import build_datamodule
    from .tasks.optim import build_optimizer
    from .train import build_model

    c = from_dict(cfg)
    L.seed_everything(c.seed, workers=True, verbose=False)
    dm = build_datamodule(c.data, c.task, c.seed)
    dm.prepare_data()
    dm.setup("fit")
    model = build_model(c, dm).train()
    return c, dm, model, build_optimizer(c.optim, model)


def _hand_step(c, model: nn.Module, opt: torch.optim.Optimizer, batch) -> torch.Tensor:
    """One training step as ``train()`` takes it: forward, loss, backward, clipping, optimizer step."""
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
    return loss


def run_hand_loop(cfg: dict) -> tuple[list[float], list[float]]:
    """The same run as a plain PyTorch loop: same seed, model, data stream, optimizer, schedule, clipping."""
    from .tasks.optim import build_scheduler

    c, dm, model, opt = _hand_setup(cfg)
    sched = build_scheduler(c.optim, opt, c.trainer.max_steps)
    times, losses = [], []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(c.trainer.deterministic)  # as the Trainer sets it (trainer.deterministic)
    for step in range(c.trainer.max_steps):
        batch = dm.train_batch(step)
        t0 = time.perf_counter()
        loss = _hand_step(c, model, opt, batch)
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


# ------------------------------------------------------------------------------------------ models
def study_variants(study: str, log_dir: str, tiny: bool = False) -> list[tuple[str, dict]]:
    """The model variants of ``configs/studies/<study>.yaml`` (every grid value but seed and LR; seed 0, the
    first LR) as run configs on the embedded synthetic data of the same shapes (32x32 images; text samples padded
    per batch), labelled by what differs: [(label, config dict)]."""
    from .analysis.tables import config_label
    from .sweep.spec import load_spec, value_label

    spec = load_spec(_repo_file("configs", "studies", f"{study}.yaml"),
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
            model, backbone = cfg["model"], cfg["model"]["backbone"]
            model.update(TINY_MODEL.get(backbone, {}))
            if backbone == "vit":
                model["embed_dim"], model["num_heads"] = 16, 2
            cfg["data"].update({"batch_size": 4, "train_limit": 64})
            if backbone == "transformer_lm":
                cfg["data"]["block_size"] = 32
        label = config_label([value_label(point.values[a.key]) for a in varying],
                             [a.key.split(".")[-1] for a in varying])
        out.append((label, cfg))
    return out


PEAK_N = 1024  # the matmul peak: torch.mm of two PEAK_N x PEAK_N fp32 matrices


def _peak_fn() -> Callable[[], object]:
    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    return lambda: a @ b


def gemm_share(m: int, k: int, n: int, repeats: int = 7) -> float:
    """Share of the matmul peak one (m, k) @ (k, n) fp32 GEMM reaches: the two timed in turn, median of the
    per-repeat ratios (what a model's GEMMs of that shape can reach at best)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    t = interleaved({"gemm": lambda: a @ b, "peak": _peak_fn()}, repeats)
    return statistics.median((2 * m * k * n / g) / (2 * PEAK_N ** 3 / p) for g, p in zip(t["gemm"], t["peak"]))


def step_flops(step: Callable[[], object]) -> tuple[float, float]:
    """(FLOPs of one call of ``step``, of which attention added by hand). ``FlopCounterMode`` counts matmuls and
    convolutions (forward and backward) but not the CPU flash-attention kernel
    (``_scaled_dot_product_flash_attention_for_cpu``): its FLOPs are added by hand with the counter's own rule for
    the other SDPA kernels, forward 4·B·h·Tq·Tk·d (QKᵀ and PV) and backward twice that, the causal mask not
    discounted. Attention kernels the counter does count are not added again."""
    from torch.utils.flop_counter import FlopCounterMode

    shapes: list[tuple[int, ...]] = []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        shapes.append((*q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1]))
        return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        F.scaled_dot_product_attention = original
    counted = counter.get_flop_counts().get("Global", {})
    if any("scaled_dot_product" in str(op) for op in counted):
        return float(counter.get_total_flops()), 0.0
    by_hand = 0.0
    for *batch, tq, tk, d in shapes:
        by_hand += 12 * math.prod(batch) * tq * tk * d  # forward 4, backward 8
    return float(counter.get_total_flops()) + by_hand, by_hand


PROFILE_GROUPS = (  # (group, substrings of aten op names), first match wins
    ("attention", ("scaled_dot_product",)),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("convolution", ("convolution", "mkldnn_conv")),
    ("norms", ("norm", "batch_norm", "rms")),
    ("copies", ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy")),
    ("pooling", ("pool",)),
)


def step_profile(step: Callable[[], object], steps: int = 3) -> tuple[dict[str, float], float]:
    """Where a training step's time goes (torch.profiler, CPU): each group's share of the self CPU time of every op
    over ``steps`` steps ({group: share}, the rest under "other"), and the optimizer step's share (its total, which
    overlaps the elementwise ops it runs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    shares: dict[str, float] = {}
    optimizer = 0.0
    for e in events:
        if e.key.startswith("Optimizer.step"):
            optimizer += e.cpu_time_total
        group = next((g for g, keys in PROFILE_GROUPS if any(k in e.key for k in keys)), "other")
        shares[group] = shares.get(group, 0.0) + e.self_cpu_time_total / total
    return shares, optimizer / total


def _widest_gemm(c) -> tuple[int, int, int]:
    """A model's typical GEMM (the QKV or first conv-as-GEMM is not modelled: the FFN's first linear for the
    Transformers at the study sizes, (tokens, C) @ (C, hidden)); None for CNNs."""
    m, d = c.model.options, c.data
    if c.model.backbone == "transformer_lm":
        c_ = m.get("n_embd", 128)
        return d.batch_size * d.block_size, c_, 4 * c_
    if c.model.backbone == "vit":
        c_ = m.get("embed_dim", 192)
        tokens = d.batch_size * ((m.get("img_size", 32) // m.get("patch_size", 4)) ** 2 + 1)
        return tokens, c_, int(c_ * m.get("mlp_ratio", 2.0))
    return None


def bench_models(s: Settings) -> list[Row]:
    """Training-step time of each study variant, all variants interleaved step by step on the same batch, as
    ratios against the study's first variant (LN for the Transformer studies, BN for santurkar_vgg); per variant
    the FLOPs of a step, the achieved GFLOP/s and its share of a matmul peak measured in the same run, and where
    ``trainer.speed: auto`` chooses another setting than eager (CNNs: channels-last), the step time of auto vs
    eager, interleaved too."""
    from . import speed

    rows = []
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for study in s.model_studies:
            variants = study_variants(study, tmp, s.tiny_models)
            fns, info, autos = {"matmul peak": _peak_fn()}, {}, {}
            for label, cfg in variants:
                c, dm, model, opt = _hand_setup(cfg)
                batch = dm.train_batch(0)
                units = batch[2].sum().item() if c.task == "lm" else len(batch[0])
                fns[label] = (lambda c=c, m=model, o=opt, b=batch: _hand_step(c, m, o, b))
                flops, by_hand = step_flops(fns[label])
                info[label] = (c.model.backbone, units, sum(p.numel() for p in model.parameters()), flops, by_hand,
                               _widest_gemm(c))
                chosen, why = speed.rule(c)
                if any(chosen.values()):  # auto differs from eager: the same model (same seed) with auto's setting
                    from .tasks.optim import build_optimizer

                    c2, dm2, model2, _ = _hand_setup(cfg)
                    model2 = speed.apply(model2, types.SimpleNamespace(**chosen))
                    opt2 = build_optimizer(c2.optim, model2)
                    fns[f"{label} [auto]"] = (lambda c=c2, m=model2, o=opt2, b=batch: _hand_step(c, m, o, b))
                    autos[label] = (f"{label} [auto]", speed.setting(types.SimpleNamespace(**chosen)), why)
            t = interleaved(fns, s.model_repeats, warmup=2)  # the matmul peak timed in turn with the steps
            peak_t = t.pop("matmul peak")
            peaks += [2 * PEAK_N ** 3 / x / 1e9 for x in peak_t]
            ref = variants[0][0]
            shares, opt_share = step_profile(fns[ref], steps=2 if s.tiny_models else 3)
            order = sorted(shares.items(), key=lambda kv: -kv[1])
            rows.append(Row("models", f"{study}: {ref}", "", "profile", "self CPU time by op group", "",
                            note=", ".join(f"{g} {v:.0%}" for g, v in order)
                            + f"; optimizer step {opt_share:.0%} (its total, overlapping the groups)"))
            for label, _ in variants:
                times = t[label]
                backbone, units, n_params, flops, by_hand, gemm = info[label]
                unit = "real tokens" if backbone == "transformer_lm" else "images"
                med = statistics.median(times)
                rows.append(Row("models", f"{study}: {label}", "tokens" if backbone != "vgg11" else "image", "eager",
                                label, ref, med * 1e3, statistics.median(t[ref]) * 1e3, "ms",
                                paired_ratio(times, t[ref]),
                                note=f"{backbone}, {n_params / 1e6:.3f} M params, {units:.0f} {unit}/step, "
                                     f"{units / med:,.0f} {unit}/s"))
                # share of the peak per repeat (step i against the matmul timed right after it), then the median
                share = statistics.median((flops / x) / (2 * PEAK_N ** 3 / p) for x, p in zip(times, peak_t))
                peak = statistics.median(2 * PEAK_N ** 3 / p / 1e9 for p in peak_t)
                rows.append(Row("models", f"{study}: {label}", "", "GFLOP/s", "achieved", "matmul peak",
                                flops / med / 1e9, peak, "GFLOP/s", 1 / share,
                                note=f"{share:.0%} of the matmul peak (median of per-repeat shares); "
                                     f"{flops / 1e9:.3f} GFLOP per step (FlopCounterMode"
                                     + (f"; attention {by_hand / 1e9:.3f} GFLOP added by hand: CPU flash attention "
                                        f"is not counted" if by_hand else "") + ")"
                                     + (f"; its FFN GEMM {gemm[0]}x{gemm[1]} @ {gemm[1]}x{gemm[2]} alone reaches "
                                        f"{gemm_share(*gemm):.0%} of the peak" if gemm and label == ref else "")))
                if label in autos:
                    name, setting, why = autos[label]
                    a = t[name]
                    rows.append(Row("models", f"{study}: {label}", "", "auto vs eager", f"auto ({setting})", "eager",
                                    statistics.median(a) * 1e3, med * 1e3, "ms", paired_ratio(a, times),
                                    note=f"trainer.speed=auto: {why}"))
                else:
                    rows.append(Row("models", f"{study}: {label}", "", "auto vs eager", "auto (eager)", "eager",
                                    note=f"auto = eager here ({speed.rule(_hand_config(variants, label))[1]}): "
                                         f"not timed"))
    rows.append(Row("models", "matmul peak", "", "GFLOP/s", f"torch.mm {PEAK_N}x{PEAK_N} fp32", "",
                    statistics.median(peaks), None, "GFLOP/s",
                    note=f"timed in turn with every step of every variant at {torch.get_num_threads()} thread(s): "
                         f"median; min {min(peaks):.1f}, max {max(peaks):.1f} over {len(peaks)} calls (the spread "
                         f"is the load: the shares above are taken per repeat)"))
    return rows


def _hand_config(variants: list[tuple[str, dict]], label: str):
    from .config import from_dict

    return from_dict(dict(variants)[label])


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


# ------------------------------------------------------------------------------------------ data wait
CIFAR_CONFIGS = ("vgg11_cifar10", "resnet20_cifar10")  # configs/runs/<name>.yaml


def _repo_file(*parts: str) -> Path:
    return Path(__file__).resolve().parents[1].joinpath(*parts)


def data_config(name: str, s: Settings, source: str, log_dir: str) -> dict:
    """The shipped run config ``configs/runs/<name>.yaml`` on ``source``, ``s.data_steps`` steps, no validation."""
    from .config import load_yaml

    cfg = load_yaml(_repo_file("configs", "runs", f"{name}.yaml"))
    cfg["data"]["source"] = source
    cfg["trainer"] = {**cfg.get("trainer", {}), "max_steps": s.data_steps, "val_every": 10 * s.data_steps,
                      "val_batches": 1, "progress": False, "batchstat_gap": "off", "speed": "eager", "log_dir": log_dir,
                      "accelerator": "cpu", "log_every": 10}
    cfg["experiment"] = "bench"
    if s.tiny_models:
        cfg["data"].update({"batch_size": 8, "train_limit": 64, "val_limit": 16, "val_batch_size": 16})
        cfg["model"]["width"] = 0.125 if cfg["model"]["backbone"] == "vgg11" else 4
    return cfg


def hand_loop_split(cfg: dict) -> tuple[list[float], list[float]]:
    """Per step of a hand-written loop on ``cfg``: seconds building the batch (``train_batch``: indices, crop +
    flip, normalization, as ``train()`` does on the device) and seconds of the model step (forward, backward,
    optimizer)."""
    c, dm, model, opt = _hand_setup(cfg)
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


def bench_data(s: Settings) -> list[Row]:
    """Share of step time spent producing batches on real CIFAR-10, for the shipped VGG-11 and ResNet-20 configs:
    in a hand loop (batch building vs model step, timed in turn every step) and inside ``train()`` (time between
    steps vs time in steps)."""
    from .errors import ConfigError
    from .train import train

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


# ------------------------------------------------------------------------------------------ sweep throughput
QUICK_SWEEP = ("configs", "sweeps", "quick.yaml")
TRIAL_TIMES_ENV = "NORMABLATE_BENCH_TRIAL_TIMES"


def _process_start() -> float | None:
    """Wall-clock time (epoch seconds) this process started, from /proc (Linux); None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def timed_train(cfg, callbacks: list | None = None, resume: bool = False):
    """A sweep ``trainer_fn`` for the bench: ``train()`` plus one JSON line per trial appended to the file named by
    ``$NORMABLATE_BENCH_TRIAL_TIMES``: process id and start, call and return times, and the seconds spent in
    training steps, in validation and between steps."""
    import json

    import lightning as L

    from .train import train

    call = time.time()

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.steps = self.val = self.between = 0.0
            self.n = 0
            self.first = self.last_end = None
            self.end_perf = None  # perf_counter at the last step's end
            self.val_since_end = 0.0  # validation time since then

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()
            if self.first is None:
                self.first = time.time()
            if self.end_perf is not None:  # fetch + build of this batch and the loop's bookkeeping
                self.between += self.t0 - self.end_perf - self.val_since_end

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.end_perf = time.perf_counter()
            self.val_since_end = 0.0
            self.steps += self.end_perf - self.t0
            self.n += 1
            self.last_end = time.time()

        def on_validation_start(self, trainer, pl_module):
            self.v0 = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            dt = time.perf_counter() - self.v0
            self.val += dt
            self.val_since_end += dt

    timer = Timer()
    result = train(cfg, callbacks=[*(callbacks or []), timer], resume=resume)
    rec = {"pid": os.getpid(), "process_start": _process_start(), "call": call, "end": time.time(),
           "first_step": timer.first, "last_step_end": timer.last_end, "steps": timer.n,
           "steps_time": timer.steps, "val_time": timer.val, "between_time": timer.between}
    path = os.environ.get(TRIAL_TIMES_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return result


def sweep_spec(s: Settings, workers: int, rnd: int, tmp: Path) -> Path:
    """The README's quick sweep (configs/sweeps/quick.yaml) as a spec file under ``tmp``: its own log folder and
    storage there, the timing ``trainer_fn``, seeds ``s.sweep_seeds`` (tiny: one norm and 2 learning rates)."""
    import yaml

    from .config import load_yaml

    src = _repo_file(*QUICK_SWEEP)
    raw = load_yaml(src)
    raw["base"] = str((src.parent / raw["base"]).resolve())
    raw["grid"]["seed"] = list(s.sweep_seeds)
    if s.sweep_lrs is not None:
        raw["grid"]["optim.lr"] = list(s.sweep_lrs)
    if s.sweep_norms is not None:
        raw["grid"]["model.norm"] = list(s.sweep_norms)
    raw.pop("hypotheses", None)  # timing trials, not judging them (a tiny grid leaves a contrast side without runs)
    raw["trainer_fn"] = "normablate.bench:timed_train"
    raw["study_name"] = f"bench-w{workers}-r{rnd}"
    raw["log_dir"] = str(tmp / "logs")
    path = tmp / f"w{workers}-r{rnd}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _trial_rows(records: list[dict]) -> dict[str, list[float]]:
    """Per-trial seconds: wall (trainer_fn call to return), steps, overhead (wall - steps) and its parts; and per
    worker process: start -> first trial (imports, paid once)."""
    out: dict[str, list[float]] = {k: [] for k in ("wall", "steps", "overhead", "setup", "val", "between", "after",
                                                   "first_setup", "later_setup", "worker_start")}
    by_pid: dict[int, list[dict]] = {}
    for r in records:
        by_pid.setdefault(r["pid"], []).append(r)
    for recs in by_pid.values():
        recs.sort(key=lambda r: r["call"])
        if recs[0]["process_start"] is not None:
            out["worker_start"].append(recs[0]["call"] - recs[0]["process_start"])
        for i, r in enumerate(recs):
            wall = r["end"] - r["call"]
            setup = (r["first_step"] or r["end"]) - r["call"]
            out["wall"].append(wall)
            out["steps"].append(r["steps_time"])
            out["overhead"].append(wall - r["steps_time"])
            out["setup"].append(setup)
            out["val"].append(r["val_time"])
            out["between"].append(r["between_time"])
            # the rest: after the last step and its validation (result, TensorBoard, files) and timer slack
            out["after"].append(wall - setup - r["steps_time"] - r["val_time"] - r["between_time"])
            out["first_setup" if i == 0 else "later_setup"].append(setup)
    return out


def bench_sweep(s: Settings) -> list[Row]:
    """Trials per hour of the quick sweep with ``--workers 1`` and ``--workers 2`` (the real CLI, in fresh
    processes, fresh storage and log folder in a temporary directory), interleaved A B B A ..., and where a
    trial's time goes beyond its training steps."""
    import json

    src = _repo_file(*QUICK_SWEEP)
    if not src.is_file():
        return [Row("sweep", "quick sweep", note=f"not run: {src} not found (a source checkout is needed)")]
    order = []
    for r in range(s.sweep_rounds):  # A B B A: a slow drift of the load hits both sides alike
        order += [(1, r), (2, r)] if r % 2 == 0 else [(2, r), (1, r)]
    walls: dict[int, list[float]] = {1: [], 2: []}
    trials: dict[int, list[int]] = {1: [], 2: []}
    outside: dict[int, list[float]] = {1: [], 2: []}
    records: dict[int, list[dict]] = {1: [], 2: []}
    failures = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for workers, rnd in order:
            spec = sweep_spec(s, workers, rnd, tmp)
            times = tmp / f"times-w{workers}-r{rnd}.jsonl"
            env = {**os.environ, TRIAL_TIMES_ENV: str(times)}
            argv = [sys.executable, "-m", "normablate", "sweep", "--config", str(spec), "--workers", str(workers),
                    "--no-report", *s.sweep_overrides]
            print(f"bench: sweep --workers {workers} (round {rnd + 1}/{s.sweep_rounds}) ...", file=sys.stderr,
                  flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, cwd=tmp)
            wall = time.perf_counter() - t0
            recs = [json.loads(line) for line in times.read_text().splitlines()] if times.exists() else []
            if proc.returncode != 0 or not recs:
                failures.append(f"--workers {workers}: exit {proc.returncode}: "
                                + (proc.stderr.strip().splitlines() or ["no output"])[-1][:200])
                continue
            walls[workers].append(wall)
            busy: dict[int, float] = {}
            for r in recs:
                busy[r["pid"]] = busy.get(r["pid"], 0.0) + r["end"] - r["call"]
            outside[workers].append(wall - max(busy.values()))  # start, imports, storage: the busiest worker idle
            trials[workers].append(len(recs))
            records[workers] += recs
    if failures:
        return [Row("sweep", "quick sweep", note="failed: " + "; ".join(failures))]
    n = trials[1][0]
    per_h = {w: [t / x * 3600 for t, x in zip(trials[w], walls[w], strict=True)] for w in (1, 2)}
    tph1, tph2 = statistics.median(per_h[1]), statistics.median(per_h[2])
    rows = [Row("sweep", f"quick sweep ({n} trials per run)", "", "trials/hour", "--workers 2", "--workers 1", tph2,
                tph1, "trials/h", paired_ratio(walls[2], walls[1]),
                note=f"speed-up {tph2 / tph1:.2f}x; whole command (spawn, imports, storage, trials), no report; "
                     f"{len(walls[1])} run(s) per side, wall {statistics.median(walls[1]):.0f} s (workers 1) vs "
                     f"{statistics.median(walls[2]):.0f} s (workers 2), of which outside any trial (start, imports, "
                     f"storage; busiest worker) {statistics.median(outside[1]):.1f} s vs "
                     f"{statistics.median(outside[2]):.1f} s")]
    for w in (1, 2):
        parts = _trial_rows(records[w])
        med = {k: statistics.median(v) if v else None for k, v in parts.items()}
        share = sum(parts["overhead"]) / sum(parts["wall"])
        rows.append(Row("sweep", f"per-trial overhead, --workers {w}", "", "per trial", "trial wall - steps time",
                        "trial wall", med["overhead"], med["wall"], "s", None,
                        note=f"{share:.1%} of trial time; medians: set-up (call -> first step) {med['setup']:.2f} s, "
                             f"validation {med['val']:.2f} s, between steps (batches, loop) {med['between']:.2f} s, "
                             f"the rest (after the last step: result, files) {med['after']:.2f} s; steps "
                             f"{med['steps']:.2f} s; {len(parts['wall'])} trials"))
        later = med["later_setup"]
        rows.append(Row("sweep", f"trial set-up, --workers {w}", "", "per trial", "later trials of a worker",
                        "first trial of a worker", later, med["first_setup"], "s",
                        later / med["first_setup"] if later and med["first_setup"] else None,
                        note=f"worker process start -> first trial (imports, once per worker): "
                             f"{med['worker_start']:.2f} s" if med["worker_start"] is not None else ""))
    return rows


# ------------------------------------------------------------------------------------------ report
def machine() -> dict[str, str]:
    import lightning
    import timm

    from .train import cpu_model

    return {"cpu": cpu_model(), "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
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
    "models": "One training step (forward, backward, clipping, optimizer) per variant, every variant of a study "
              "interleaved on one fixed batch at the study's sizes (synthetic data of the same shapes). Rows per "
              "variant: eager = step time, ratio against the study's first variant (> 1 = slower); GFLOP/s = "
              "FLOPs per step (FlopCounterMode; the CPU flash-attention kernel is not counted by it, so attention "
              "FLOPs are added by hand, 12·B·h·T²·d per step, causal mask not discounted) / step time, ratio = matmul "
              "peak / achieved (the peak: a torch.mm of 1024² fp32 timed in turn with every step, so that both see "
              "the same load; the share is taken per repeat, median); profile = self CPU time of the study's first "
              "variant by op group (torch.profiler); auto vs eager = the same model with trainer.speed=auto's setting, interleaved, ratio = "
              "auto / eager (timed only where auto differs from eager).",
    "data": "Real CIFAR-10, the shipped VGG-11 and ResNet-20 configs (configs/runs/*_cifar10.yaml): time producing "
            "each training batch (indices, crop + flip, normalization: the batch builder train() runs on the "
            "device) against the model step, timed in turn every step of a hand loop (ratio = data / model step), "
            "and inside train() the time between steps (fetch, build, Lightning's loop) against the time in steps.",
    "sweep": "The README's quick sweep (configs/sweeps/quick.yaml; the part of its grid and the overrides named in "
             "the Run line) run by the real command `normablate sweep --workers N --no-report` in fresh processes "
             "with a fresh log folder and storage in a temporary directory, --workers 1 and 2 interleaved (A B B A); "
             "as the command does, --workers 1 trains with torch's default threads (one per core) and --workers 2 "
             "with one thread per worker. Ratio = wall time of workers 2 / workers 1 (< 1 = more trials per hour). "
             "Per trial (trainer_fn timed inside the workers): overhead = trial wall time (train() call to return) "
             "- time in training steps.",
}


# (section, name, layout, reference label or "" for any, limit on the ratio, goal) - issue 11's goals
GOALS = [
    ("norms", "bn", "tokens", "", 1.05, "bn tokens at BatchNorm1d-on-(N*T, C) speed"),
    ("norms", "rms", "tokens", "ln (ours)", 1.0, "rms <= ln (tokens)"),
    ("norms", "rms", "image", "ln (ours)", 1.0, "rms <= ln (image)"),
    ("norms", "ln", "image", "", 1.05, "ln image within 1.05x of nn.LayerNorm on channels-last x"),
    ("framework", "resnet20", "", "", 1.03, "train() <= 1.03x a hand loop (ResNet-20)"),
    ("framework", "vit", "", "", 1.03, "train() <= 1.03x a hand loop (ViT)"),
    ("framework", "transformer_lm", "", "", 1.03, "train() <= 1.03x a hand loop (LM)"),
]


# (name, layout, reference label, limit, goal): the goals again with torch.compile as the opt-in path (--compile)
COMPILED_GOALS = [
    ("rms", "tokens", "ln (ours) compiled", 1.0, "rms compiled <= ln compiled (tokens)"),
    ("rms", "tokens", "ln (ours) eager", 1.0, "rms compiled <= ln eager, the fastest LN here (tokens)"),
]


def summary(rows: list[Row]) -> list[str]:
    """One line per goal found among ``rows``: the measured ratio and whether it is met."""
    lines, compiled = [], []
    for name, layout, ref, limit, goal in COMPILED_GOALS:
        hit = [r for r in rows if r.section == "norms" and r.name == name and r.layout == layout
               and r.variant == "compiled" and r.reference == ref and r.ratio is not None]
        if hit:
            compiled.append(f"- {goal}: **{hit[0].ratio:.2f}×** — {'met' if hit[0].ratio <= limit else 'NOT met'}")
    for section, name, layout, ref, limit, goal in GOALS:
        hit = [r for r in rows if r.section == section and r.name == name and r.layout == layout
               and r.variant == "eager" and r.ratio is not None and (not ref or r.reference == ref)
               and (ref or r.reference != "ln (ours)")]
        if hit:
            ratio = hit[0].ratio
            met = ratio <= limit
            why = "" if met else WHY_NOT.get((name, layout), "")
            lines.append(f"- {goal}: **{ratio:.2f}×** — {'met' if met else 'NOT met'}" + (f" ({why})" if why else ""))
    lines += compiled
    for r in rows:
        if r.section == "startup" and r.name in ("normablate --help", "normablate --version", "normablate list") \
                and r.ours_value:
            met = r.ours_value < 1.5
            why = "" if met or r.name != "normablate list" else f" ({WHY_NOT[('list', '')]})"
            lines.append(f"- `{r.name}` under 1.5 s: {r.ours_value:.2f} s — {'met' if met else 'NOT met'}{why}")
        if r.section == "startup" and r.name == "process start -> first training step" and r.ours_value:
            met = r.ours_value < 2.5
            lines.append(f"- process start -> first training step under 2.5 s: {r.ours_value:.2f} s — "
                         f"{'met' if met else 'NOT met (' + WHY_NOT[('startup', '')] + ')'}")
    return lines + models_summary(rows)


# Measured and rejected (or measured and already so): written into benchmarks.md so that nobody tries them again
# blind. Each says who measured it, where and how; none is re-measured by `normablate bench`.
DEAD_ENDS = [
    "Seeds as a batch dimension (several seeds' models trained as one: `torch.func.vmap` over stacked parameters, "
    "or grouped convolutions holding each seed's CNN as a group): 1.24-1.35x (vmap) and 1.05-1.21x (grouped convs) "
    "the time of running the seeds one after another. Measured by issue 29's author on a 2-core AMD EPYC with "
    "AVX-512 (Zen 4), 1 thread, interleaved; not re-measured here. Rejected: not a lever on CPU.",
    "`torch.compile` as part of `trainer.speed: auto`: issue 29 measured VGG bn 0.82x, VGG none 1.26x, LM powernorm "
    "0.79x, LM masked_bn 0.94x, LM ln/dyt and ViT ~1.0x, at 9-30 s of compiling per process (and recompiles for "
    "variable lengths; a C++ compiler needed). At the studies' 1,000-step runs it does not pay reliably: auto never "
    "compiles; `trainer.compile: true` still does.",
    "SDPA's math path instead of CPU flash attention at the studies' shapes (forward + backward, 1 thread, 15 "
    "interleaved repeats, AVX2 EPYC under load ~10): math 1.53x (ViT, 128 x 2 heads x 65 tokens x 32), 2.13x (LM, "
    "32 x 4 x 128 x 16 with the padding mask), 2.83x (LM shape, causal only). Flash (PyTorch's default) kept.",
    "Causal-only attention (no padding mask) for right-padded LM samples: a real token never sees a later pad under "
    "a causal mask, and flash with `is_causal` took 0.75x the masked time; but the pads' own outputs change, and "
    "plain BN's statistics include them: not math-preserving for `bn`. Not taken.",
    "Fused QKV: both Transformers already project q, k, v with one Linear (`CausalSelfAttention.qkv`, timm's "
    "`Attention.qkv`); nothing to fuse, no checkpoint conversion needed.",
    "AdamW `fused=True` on CPU: the optimizer step 0.26-0.31x the default loop at the LM/ViT study sizes, but not "
    "bit-identical (2e-8 after one step): left off so that new runs of a study stay bitwise comparable with its "
    "earlier seeds. `foreach=True` (bitwise equal, 0.82-0.97x) is on (tasks/optim.py).",
    "channels-last for `batch_renorm` (image): VGG-11 w0.25 b128 step 1.31x NCHW (1 thread, 8 interleaved pairs, "
    "AVX2 EPYC under load): `trainer.speed: auto` leaves it NCHW.",
]


MODEL_STEP_LIMIT = 1.10  # issue 29: every study variant's step <= 1.10x its reference variant at the same settings
# Why a variant's step is above the limit, where the reason is known: (study, start of the variant label) -> reason
MODEL_WHY_NOT: dict[tuple[str, str], str] = {
    ("vit_norms", "norm=dyt"): "DyT has no fused CPU kernel: gamma * tanh(alpha * x) + beta is several elementwise "
                               "passes forward and more backward, 4.8x nn.LayerNorm's fused kernel per call (norms "
                               "section, tokens); the norms are ~7% of the LN step (profile row), so the step pays "
                               "the difference. The lever is a fused DyT kernel (torch.compile of the norm, or a C++ "
                               "op); compiling the whole ViT measured ~1.0x (issue 29)",
    ("lm_norms", "masked_bn"): "masked statistics over real tokens only: 1.8x BatchNorm1d per call (norms section; "
                               "zeroing the pads, mean, centring, sum of squares, scaling and the masked bias forward, "
                               "the fused BN backward plus two masked corrections: every pass a PyTorch kernel at "
                               "memory speed, no fused masked kernel exists); issue 29 measured this step at 1.08x LN on "
                               "Zen 4, and torch.compile at 0.94x of it",
    ("lm_norms", "powernorm"): "PowerNorm's masked running quadratic mean and the paper's approximate backward are a "
                               "hand-written autograd function of elementwise passes (4.2x BatchNorm1d per call, "
                               "norms section); issue 29 measured torch.compile at 0.79x of this step",
    ("santurkar_vgg", "noisy_bn"): "eager NCHW: the noise is redrawn every step and the backward keeps one extra "
                                   "pass (g * s); the studies run auto (channels-last), where the auto rows compare "
                                   "it with BN's auto step",
}


def models_summary(rows: list[Row]) -> list[str]:
    """The model-level goals (issue 29, replacing the per-kernel masked_bn / noisy_bn goals of issue 11): every
    study variant's training step <= 1.10x its study's reference variant (LN; BN for santurkar_vgg) at the same
    settings, or the reason why not; and the share of the matmul peak each variant reaches."""
    eager = [r for r in rows if r.section == "models" and r.variant == "eager" and r.ratio is not None
             and r.ours != r.reference]
    if not eager:
        return []
    over = [r for r in eager if r.ratio > MODEL_STEP_LIMIT]
    lines = [f"- model level: every study variant's step <= {MODEL_STEP_LIMIT:.2f}x its study's reference variant "
             f"(first variant: LN, BN for santurkar_vgg): {len(eager) - len(over)} of {len(eager)} met"]
    for r in over:
        study, label = r.name.split(": ", 1)
        why = next((v for (st, start), v in MODEL_WHY_NOT.items() if st == study and label.startswith(start)), "")
        lines.append(f"  - {r.name}: **{r.ratio:.2f}×** — NOT met" + (f" ({why})" if why else ""))
    share = [(r.name, 1 / r.ratio) for r in rows if r.section == "models" and r.variant == "GFLOP/s" and r.ratio]
    if share:
        lo, hi = min(share, key=lambda x: x[1]), max(share, key=lambda x: x[1])
        lines.append(f"- model steps reach {lo[1]:.0%} ({lo[0]}) to {hi[1]:.0%} ({hi[0]}) of the matmul peak "
                     f"measured in the same run")
        tf = [x for x in share if x[0].startswith(("vit_norms", "lm_norms"))]
        gemm = [re.search(r"alone reaches (\d+%)", r.note) for r in rows if r.section == "models"
                and r.variant == "GFLOP/s" and "alone reaches" in r.note]
        if tf:
            met = all(x[1] >= 0.65 for x in tf)
            lines.append(f"- Transformers (vit_norms, lm_norms) >= 65% of the matmul peak: "
                         f"{min(x[1] for x in tf):.0%}-{max(x[1] for x in tf):.0%} — "
                         + ("met" if met else "NOT met (the bound, from the profile rows: matmuls are only 39-44% "
                            "of the step's self CPU time; attention (CPU flash attention, head dim 16-32) takes 26-31% "
                            "and elementwise ops, norms and copies the rest, all far below matmul speed at width 64; "
                            "so even with every GEMM at the rate of the FFN GEMM alone ("
                            + " / ".join(g.group(1) for g in gemm if g) + " of the peak, GFLOP/s rows) the step "
                            "stays far below 65%. The SDPA math path measured 1.5-2.8x slower than flash (dead ends); "
                            "no math-preserving change found moves the non-GEMM time into GEMMs)"))
    auto = [r for r in rows if r.section == "models" and r.variant == "auto vs eager" and r.ratio is not None]
    if auto:
        lines.append(f"- trainer.speed=auto vs eager (CNN study variants, channels-last): "
                     + ", ".join(f"{r.name.split(': ', 1)[1]} **{r.ratio:.2f}×**" for r in auto))
        first = {}  # each study's first variant's auto step: the same goal at the setting the studies run (auto)
        for r in auto:
            study = r.name.split(": ", 1)[0]
            first.setdefault(study, r)
        lines.append("- at auto's setting (ratio of median auto steps, against the study's first variant): "
                     + ", ".join(f"{r.name.split(': ', 1)[1]} **{r.ours_value / first[r.name.split(': ', 1)[0]].ours_value:.2f}×**"
                                 for r in auto if r is not first[r.name.split(": ", 1)[0]]))
    return lines


# Why a goal is not met, where the reason is known (measured with the profiler and -X importtime on this CPU).
WHY_NOT = {
    ("masked_bn", "tokens"): "measured per op, (8192 tokens, 384), threads 1: BatchNorm1d is ~4 ms forward + ~5 ms "
                             "backward; masked_bn needs, forward, zeroing the pads (bitwise AND, so that inf/NaN at "
                             "pads never enter) 2.1 ms, the mean 1.7, centring 1.1, sum of squares 1.6, scaling 1.8 "
                             "and the bias on real tokens only 1.1; backward, zeroing the pads' gradient 2.1, the "
                             "fused BN kernel 4.0 and the two masked correction terms 2.9 - every one a PyTorch "
                             "kernel at memory speed, no fused masked kernel exists. Compacting the real tokens "
                             "(index_select, nn.BatchNorm1d, index_copy_) measured 1.86x: the gathers and scatters "
                             "cost as much as BN itself; under torch.compile it measured ~1.05x",
    ("noisy_bn", "image"): "the forward folds the noise into BN's per-channel affine (BN's passes); the backward "
                           "keeps one pass for g * s",
    ("noisy_bn", "tokens"): "the forward folds the noise into BN's per-channel affine (BN's passes); the backward "
                            "keeps one extra pass, g * s (~2 ms of ~10): BN's backward kernel takes one weight per "
                            "channel, and tokens (N, T, C) have no view whose channels are (sample, channel) pairs "
                            "(images do: (1, N*C, H*W)); a loop over samples for the reductions measured ~10% "
                            "faster on the backward alone but costs one call per sample (slow for short sequences): "
                            "not taken",
    ("rms", "tokens"): "a finding, not a bug we could fix: PyTorch has no fused CPU RMSNorm kernel; the fastest exact "
                       "formulation found (one vector_norm + two elementwise passes forward, LayerNorm's fused "
                       "backward with mean 0 + one correction) is still slower than the fused LayerNorm kernel, and "
                       "torch.compile does not give a faster one: see the compiled rows (--compile)",
    ("startup", ""): "floor, shown by `python -X importtime -c 'import normablate.train'`: import torch (~1.5 s) + "
                     "Lightning, which imports torchmetrics at import time (lightning.fabric.utilities.imports: "
                     "compare_version imports a package to read its version); torchmetrics imports torchvision "
                     "whenever it is installed (functional.image.arniqa) and torchvision.ops imports torch._dynamo "
                     "(~2.4 s together on the issue's Zen 4). No run needs them, but they cannot be skipped without "
                     "patching those libraries' imports, which we do not do; timm is not imported unless a timm "
                     "model (vit, resnet18) is built. A sweep worker pays it once, later trials start in the time "
                     "of the 'second run' row",
    ("list", ""): "floor: `normablate list` reads the norm and backbone registries, which are torch modules: it "
                  "imports torch (~1.5 s, `python -X importtime -m normablate list`) and nothing heavier (no "
                  "Lightning, no timm)",
}


def _sizes(section: str, s: Settings) -> str:
    """The settings a section's numbers depend on, for its provenance line."""
    return {
        "norms": f"image x {s.image}, tokens x {s.tokens} ({s.pad_fraction:.0%} padding on average for masked norms), "
                 f"{s.repeats} interleaved repeats" + (", norms " + " ".join(s.norms) if s.norms else "")
                 + ("; eager and torch.compile" if s.compile else ""),
        "allocator": f"tokens x {s.tokens}, eval batch {s.infer_batch}, {max(3, s.repeats // 2)} repeats per mode",
        "inference": f"batch {s.infer_batch}, {s.repeats} interleaved repeats",
        "vit_inference": f"vit_norms study model, batches {s.vit_batches[0]} and {s.vit_batches[1]} "
                         f"({s.vit_inner_b1} calls per timed repeat), {s.vit_repeats} interleaved repeats, 1 thread"
                         + (", tiny models" if s.tiny_models else ""),
        "framework": f"{s.steps} steps x {s.runs} run(s) per side" + (", tiny backbones" if s.tiny_models else ""),
        "models": f"studies {', '.join(s.model_studies)} at their sizes on synthetic data of the same shapes, "
                  f"{s.model_repeats} interleaved steps per variant" + (", tiny models" if s.tiny_models else ""),
        "startup": f"{s.startup_runs} runs per command",
        "data": f"{s.data_steps} steps per config on {s.cifar10}" + (", tiny models" if s.tiny_models else ""),
        "sweep": f"grid seed {list(s.sweep_seeds)}"
                 + (f" x optim.lr {list(s.sweep_lrs)}" if s.sweep_lrs is not None else " x the spec's lrs")
                 + (f" x model.norm {list(s.sweep_norms)}" if s.sweep_norms is not None else " x the spec's norms")
                 + f", {s.sweep_rounds} run(s) per side"
                 + (", overrides " + " ".join(s.sweep_overrides) if s.sweep_overrides else ""),
    }.get(section, "")


def _row_from_csv(d: dict[str, str]) -> Row:
    num = {k: (float(d[k]) if d.get(k) else None) for k in ("ours_value", "reference_value", "ratio")}
    return Row(**{k: d.get(k, "") for k in FIELDS if k not in num}, **num)


def previous(out: Path) -> tuple[list[Row], dict[str, str], dict[str, str]]:
    """What an earlier bench left in ``out``: its rows (CSV), each section's provenance line and run time (md).
    Files written before sections had their own provenance line give the header's command, date and load."""
    csv_path, md_path = out / "benchmarks.csv", out / "benchmarks.md"
    if not csv_path.is_file() or not md_path.is_file():
        return [], {}, {}
    try:
        rows = [_row_from_csv(d) for d in csv.DictReader(csv_path.open())]
    except (ValueError, TypeError, csv.Error):
        return [], {}, {}
    md = md_path.read_text().splitlines()
    header = {k: line.split(": ", 1)[1].strip() for line in md for k in ("Command", "Date", "Load average", "Sizes")
              if line.startswith(k) and ": " in line}
    fallback = ""
    if "Command" in header:
        fallback = (f"Run: {header['Command']}; {header.get('Date', '')}; load average (1, 5, 15 min) "
                    + header.get("Load average", "")
                    + (f"; {header['Sizes'].split('. Absolute')[0]}" if "Sizes" in header else ""))
    prov, runtimes, section = {}, {}, None
    for line in md:
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("Run: ") and section:
            prov[section] = line
        elif line.startswith("Other norms' rows: ") and section in prov:
            prov[section] += "  \n" + line
        elif line.startswith("Section run times: "):
            for part in line.split(": ", 1)[1].split(", "):
                name, _, t = part.partition(": ")
                runtimes[name] = t
    for r in rows:
        prov.setdefault(r.section, fallback)
    return rows, prov, runtimes


def write(report: Report, out: Path, provenance: dict[str, str], runtimes: dict[str, str],
          keep: bool = True) -> tuple[Path, Path]:
    """Write ``benchmarks.csv`` and ``benchmarks.md`` under ``out``. With ``keep``, the sections of an earlier
    bench in ``out`` that this run did not measure are kept (rows, provenance line, run time)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "benchmarks.csv", out / "benchmarks.md"
    ran = set(report.settings.sections)
    old_rows, old_prov, old_times = previous(out) if keep else ([], {}, {})
    some = set(report.settings.norms or ())  # --norms: the other norms' rows of the norms section are kept too

    def measured(r: Row) -> bool:
        return r.section in ran and not (r.section == "norms" and some and r.name not in some)

    kept = [r for r in old_rows if not measured(r)]
    prov = {k: v for k, v in old_prov.items() if k not in ran}
    if some and "norms" in ran and any(r.section == "norms" for r in kept) and old_prov.get("norms"):
        tag = "Other norms' rows: "
        earlier = [x.removeprefix(tag) for x in old_prov["norms"].split("  \n")]
        provenance = {**provenance, "norms": "  \n".join([provenance.get("norms", ""),
                                                          *dict.fromkeys(tag + x for x in earlier)])}
    prov.update(provenance)
    times = {**{k: v for k, v in old_times.items() if k not in ran}, **runtimes}
    order = {name: i for i, name in enumerate(SECTIONS)}
    rows = sorted([*kept, *report.rows], key=lambda r: order.get(r.section, len(order)))  # stable within a section
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r.as_dict())
    csv_path.write_text(buf.getvalue())
    info = machine()
    lines = ["# normablate benchmarks", "",
             f"Last command: `{report.command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})  ",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), "",
             "Each section says the command that measured it, when, the load average before and after, and its "
             "sizes; a run of some sections (`--only`) keeps the others from the previous file. Absolute times on a "
             "shared, loaded machine are noisy; read the ratios (every comparison is interleaved).", ""]
    goals = summary(rows)
    if goals:
        lines += ["## Goals (issues 11 and 29), from the rows below", "", *goals, ""]
    lines += ["## Measured and rejected (dead ends)", "", *[f"- {x}" for x in DEAD_ENDS], ""]
    lines += ["Section run times: " + ", ".join(f"{k}: {times[k]}" for k in sorted(times, key=lambda k: order.get(k, 99)))]
    for section in sorted({r.section for r in rows}, key=lambda k: order.get(k, len(order))):
        srows = [r for r in rows if r.section == section]
        lines += ["", f"## {section}", ""]
        if prov.get(section):
            lines += [prov[section], ""]
        lines += [SECTION_TEXT.get(section, ""), "", _md_table(srows)]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def run_bench(out: Path | str = "docs", quick: bool = False, tiny: bool = False, compile: bool = False,
              sections: list[str] | None = None, command: str | None = None,
              threads: int | None = None, norm_names: list[str] | None = None, sweep: bool = False,
              cifar10: str | None = None, keep: bool = True) -> tuple[Path, Path]:
    """Run the benchmark and write ``benchmarks.md`` / ``benchmarks.csv`` under ``out``; returns their paths.
    ``sections``: a subset of ``SECTIONS`` (default: all but ``sweep``, which takes minutes; ``sweep=True`` adds
    it). ``cifar10``: the CIFAR-10 source of the data section (a local copy; default ``$NORMABLATE_BENCH_CIFAR10``
    or the hub name). ``keep``: keep the sections of an earlier bench in ``out`` that this run does not measure."""
    s = Settings.make(quick=quick, tiny=tiny, compile=compile)
    if threads:
        torch.set_num_threads(threads)
    if norm_names:
        s.norms = tuple(norm_names)
    if cifar10:
        s.cifar10 = cifar10
    if sweep:
        s.sections = (*s.sections, "sweep")
    if sections:
        s.sections = tuple(x for x in SECTIONS if x in sections)
    report = Report(s, command or "normablate bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    provenance: dict[str, str] = {}
    runtimes: dict[str, str] = {}
    steps: dict[str, Callable[[], list[Row]]] = {
        "norms": lambda: bench_norms(s), "allocator": lambda: bench_allocator(s),
        "inference": lambda: bench_inference(s), "vit_inference": lambda: bench_vit_inference(s), "framework": lambda: bench_framework(s, tiny),
        "models": lambda: bench_models(s),
        "startup": lambda: bench_startup(s, tiny), "data": lambda: bench_data(s), "sweep": lambda: bench_sweep(s)}
    for name in s.sections:
        t0 = time.perf_counter()
        load_before = load_average()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        report.rows += steps[name]()
        runtimes[name] = f"{time.perf_counter() - t0:.0f} s"
        provenance[name] = (f"Run: `{report.command}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load "
                            f"average (1, 5, 15 min) before {load_before}, after {load_average()}; torch threads "
                            f"{torch.get_num_threads()}; {_sizes(name, s)}")
    return write(report, Path(out), provenance, runtimes, keep=keep)


SECTIONS = ("norms", "allocator", "inference", "vit_inference", "framework", "models", "startup", "data", "sweep")


def cmd_bench(args: argparse.Namespace) -> int:
    md, csv_path = run_bench(args.out, quick=args.quick, compile=args.compile, sections=args.only,
                             threads=args.threads, norm_names=getattr(args, "norms", None),
                             sweep=getattr(args, "sweep", False), cifar10=getattr(args, "cifar10", None))
    print(f"wrote {md} and {csv_path}")
    return 0


__all__ = ["SECTIONS", "Row", "Settings", "cmd_bench", "interleaved", "run_bench"]
