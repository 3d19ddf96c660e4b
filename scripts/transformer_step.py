"""Transformer training steps at the studies' sizes: the fast paths A/B against the old ones, % of a matmul peak
measured in the same run, and a profile of where a step's time goes (issue 29).

    python scripts/transformer_step.py [--repeats 15] [--threads 1] [--norms ln bn] [--profile]

Models (configs/studies/vit_norms.yaml, v2/yao_vit_bn.yaml, v2/vit_dyt.yaml; lm_norms.yaml, v2/lm_rms_dyt.yaml,
v2/shen_powernorm.yaml): ViT width 64, depth 4, 2 heads, MLP ratio 2, batch 128 of 32x32 images (65 tokens); LM
2 layers of width 64, 4 heads, batch 32 x 128 bytes, right-padded samples (64-128 real tokens, as lm_shakespeare's
samples mode). A step is what ``train()`` runs: forward, cross-entropy, backward, gradient clipping at 1.0 and
AdamW (``tasks/optim.build_optimizer``, foreach).

"old" is the same model with the code before the fast paths: timm's ``Attention.forward`` (ViT: q, k, v by
reshape/permute/unbind) and a boolean attention mask that SDPA converts in every layer (LM). Both sides run
interleaved in one process (old, new, matmul peak, repeated), so load drifts hit them alike; ratios are medians of
per-repeat ratios. FLOPs per step: ``FlopCounterMode`` (it does not count CPU flash attention) plus attention by
hand, 4*B*h*T^2*d forward and twice that backward. The peak: ``torch.mm`` of two 1024x1024 fp32 matrices, timed
between the steps; a step's share is its GFLOP/s over the peak of the same repeat.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from normablate import models  # noqa: E402
from normablate.config import OptimConfig  # noqa: E402
from normablate.tasks.optim import build_optimizer  # noqa: E402

PEAK_N = 1024


def vit_case(norm: str):
    torch.manual_seed(0)
    m = models.create("vit", norm=norm, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=10)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    attn_flops = 12 * 128 * 2 * 65 * 65 * 32 * 4  # (fwd 4 + bwd 8) * B * h * T^2 * d, 4 blocks
    return m, (lambda: F.cross_entropy(m(x), y)), attn_flops


def lm_case(norm: str):
    torch.manual_seed(0)
    m = models.create("transformer_lm", norm=norm, n_layer=2, n_embd=64, n_head=4, block_size=128)
    B, T = 32, 128
    idx = torch.randint(0, 256, (B, T))
    mask = torch.arange(T)[None] < torch.randint(64, T + 1, (B,))[:, None]
    targets = torch.where(mask, torch.randint(0, 256, (B, T)), -100)
    attn_flops = 12 * B * 4 * T * T * 16 * 2

    def loss():
        return F.cross_entropy(m(idx, mask=mask).flatten(0, 1), targets.flatten(), ignore_index=-100)
    return m, loss, attn_flops


@contextlib.contextmanager
def old_path():
    """The code before the fast paths: timm's attention forward (ViT), a boolean mask converted per layer (LM)."""
    from timm.models.vision_transformer import Attention as TimmAttention

    from normablate.models import _vit_block, lm

    fast, additive = _vit_block.Attention.forward, lm.additive_mask
    _vit_block.Attention.forward, lm.additive_mask = TimmAttention.forward, lambda allowed, dtype: allowed
    try:
        yield
    finally:
        _vit_block.Attention.forward, lm.additive_mask = fast, additive


def make_step(m, loss_fn):
    opt = build_optimizer(OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05), m)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        return loss
    return step


def step_flops(m, loss_fn) -> int:
    """FLOPs of forward + backward as ``FlopCounterMode`` counts them (matmuls and convolutions; not CPU flash
    attention, which the cases add by hand)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        loss_fn().backward()
    m.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def peak_gflops(a: torch.Tensor, b: torch.Tensor, tries: int = 3) -> float:
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * PEAK_N ** 3 / best / 1e9


GROUPS = (("attention", ("attention",)), ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "convolution")),
          ("copies", ("aten::copy_", "aten::cat", "aten::stack", "aten::clone", "aten::contiguous")),
          ("norms", ("layer_norm", "batch_norm", "rms_norm", "tanh")), ("gelu", ("gelu",)),
          ("loss", ("softmax", "nll_loss", "log_softmax")), ("optimizer", ("_foreach", "Optimizer")))


def profile_shares(step) -> dict[str, float]:
    """Self CPU time of one step's ops by group (share of the total)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            step()
    by = defaultdict(float)
    for e in p.key_averages():
        if e.key.startswith(("autograd::", "Optimizer.zero_grad")) or "Backward" in e.key and "::" not in e.key:
            continue  # wrappers: their self time is bookkeeping, counted as "other" below through the total
        group = next((g for g, keys in GROUPS if any(k in e.key for k in keys)), "other")
        by[group] += e.self_cpu_time_total
    total = sum(by.values())
    return {g: v / total for g, v in sorted(by.items(), key=lambda kv: -kv[1])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--norms", nargs="+", default=["ln"])
    ap.add_argument("--profile", action="store_true", help="also print each new path's profile by op group")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average before {os.getloadavg()}")
    rows = []
    for name, case in (("vit", vit_case), ("lm", lm_case)):
        for norm in args.norms:
            m, loss_fn, attn = case(norm)
            flops = step_flops(m, loss_fn) + attn
            new = make_step(m, loss_fn)
            with old_path():
                m_old, loss_old, _ = case(norm)
            old = make_step(m_old, loss_old)
            for _ in range(3):  # warm up both (allocator, first-call kernels)
                new()
                with old_path():
                    old()
            t_new, t_old, peaks = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                with old_path():
                    old()
                t1 = time.perf_counter()
                new()
                t2 = time.perf_counter()
                t_old.append(t1 - t0)
                t_new.append(t2 - t1)
                peaks.append(peak_gflops(a, b))
            ratio = statistics.median(n / o for n, o in zip(t_new, t_old, strict=True))
            share_new = statistics.median(flops / t / 1e9 / p for t, p in zip(t_new, peaks, strict=True))
            share_old = statistics.median(flops / t / 1e9 / p for t, p in zip(t_old, peaks, strict=True))
            rows.append((f"{name} {norm}", flops / 1e9, statistics.median(t_old) * 1e3,
                         statistics.median(t_new) * 1e3, ratio, statistics.median(peaks), share_old, share_new))
            if args.profile:
                shares = profile_shares(new)
                step, peak = statistics.median(t_new), statistics.median(peaks)
                gemm = (flops - attn) / (shares["matmul"] * step) / 1e9 / peak
                att = attn / (shares["attention"] * step) / 1e9 / peak
                bound = flops / ((shares["matmul"] + shares["attention"]) * step) / 1e9 / peak
                print(f"{name} {norm} profile (self CPU time, new path): "
                      + ", ".join(f"{g} {v:.0%}" for g, v in shares.items())
                      + f"; GEMMs at {gemm:.0%} of the peak, attention at {att:.0%}; with every other op taking no "
                        f"time the step would reach {bound:.0%}")
    print(f"load average after {os.getloadavg()}\n")
    print("| model | GFLOP/step | old step | new step | new/old | matmul peak | old % of peak | new % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.1f} ms | {r[3]:.1f} ms | **{r[4]:.3f}x** | {r[5]:.1f} GFLOP/s "
              f"| {r[6]:.0%} | {r[7]:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
