"""Section ``transformer_steps``: the Transformers' fast paths (issue 29) against the code they replaced, and where a
step's time goes, at the studies' sizes (configs/studies/vit_norms.yaml, v2/yao_vit_bn.yaml, v2/vit_dyt.yaml: ViT
width 64, depth 4, 2 heads, MLP ratio 2, batch 128 of 32x32 images, 65 tokens; lm_norms.yaml, v2/lm_rms_dyt.yaml,
v2/shen_powernorm.yaml: LM 2 layers of width 64, 4 heads, batch 32 x 128 bytes, right-padded samples with 64-128
real tokens). ``python scripts/transformer_step.py`` runs the same outside the bench (``--norms``, ``--repeats``).

"old" is the same model with the code before the fast paths: timm's ``Attention.forward`` (q, k, v by
reshape/permute/unbind) in the ViT, and a boolean attention mask that SDPA converts in every layer in the LM
(``old_path``). Both give bitwise the same outputs and gradients (tests/test_models_fast_paths.py)."""
from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ... import models
from ...config import OptimConfig
from ...tasks.optim import build_optimizer
from ..settings import Settings
from ..timing import Row, interleaved, paired_ratio
from . import register

TEXT = ("One training step (forward, cross-entropy, backward, clipping at 1.0, AdamW as tasks/optim.py builds it) of "
        "the ViT and the LM at the studies' sizes on a fixed synthetic batch, the fast path (new) and the code it "
        "replaced (old: timm's attention forward; a boolean mask converted by SDPA in every layer) interleaved with a "
        "matmul peak (torch.mm of 1024² fp32) in one process; ratio = new / old (median of per-repeat ratios). "
        "GFLOP/s rows: FLOPs per step (FlopCounterMode, plus attention by hand, 12·B·h·T²·d per layer, since it does "
        "not count CPU flash attention) / step time; ratio = peak / achieved; the share is taken per repeat "
        "(median). Profile rows: self CPU time by op group (torch.profiler, 3 steps of the new path), the rates of "
        "the GEMMs and of attention as shares of the peak, and the share the step would reach if every other op "
        "took no time: the bound of the Transformers' 65% goal.")
PEAK_N = 1024
NORMS = ("ln",)


def sizes(s: Settings) -> str:
    return (f"norms {', '.join(NORMS)}, {2 if s.tiny else s.model_repeats} interleaved repeats"
            + (", tiny models" if s.tiny else ""))


def vit_case(norm: str, tiny: bool = False):
    """(model, loss closure, attention FLOPs per step) of the studies' ViT on a fixed batch."""
    torch.manual_seed(0)
    B, width, depth, heads = (4, 16, 1, 2) if tiny else (128, 64, 4, 2)
    m = models.create("vit", norm=norm, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=2.0, num_classes=10)
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, 10, (B,))
    T = 65  # 8x8 patches of 4x4 + the class token
    return m, (lambda: F.cross_entropy(m(x), y)), 12 * B * heads * T * T * (width // heads) * depth


def lm_case(norm: str, tiny: bool = False):
    """(model, loss closure, attention FLOPs per step) of the studies' LM on a fixed right-padded batch."""
    torch.manual_seed(0)
    B, T, width, layers, heads = (2, 16, 16, 1, 4) if tiny else (32, 128, 64, 2, 4)
    m = models.create("transformer_lm", norm=norm, n_layer=layers, n_embd=width, n_head=heads, block_size=T)
    idx = torch.randint(0, 256, (B, T))
    mask = torch.arange(T)[None] < torch.randint(T // 2, T + 1, (B,))[:, None]
    targets = torch.where(mask, torch.randint(0, 256, (B, T)), -100)

    def loss():
        return F.cross_entropy(m(idx, mask=mask).flatten(0, 1), targets.flatten(), ignore_index=-100)
    return m, loss, 12 * B * heads * T * T * (width // heads) * layers


CASES = {"vit": vit_case, "lm": lm_case}


@contextlib.contextmanager
def old_path():
    """The code before the fast paths: timm's attention forward (ViT), a boolean mask converted per layer (LM)."""
    from timm.models.vision_transformer import Attention as TimmAttention

    from ...models import _vit_block, lm

    fast, additive = _vit_block.Attention.forward, lm.additive_mask
    _vit_block.Attention.forward, lm.additive_mask = TimmAttention.forward, lambda allowed, dtype: allowed
    try:
        yield
    finally:
        _vit_block.Attention.forward, lm.additive_mask = fast, additive


def make_step(m: torch.nn.Module, loss_fn: Callable) -> Callable:
    opt = build_optimizer(OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05), m)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    return step


def step_flops(m: torch.nn.Module, loss_fn: Callable) -> int:
    """FLOPs of forward + backward as ``FlopCounterMode`` counts them (matmuls, convolutions; not CPU flash
    attention, which the cases add by hand)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        loss_fn().backward()
    m.zero_grad(set_to_none=True)
    return fc.get_total_flops()


GROUPS = (("attention", ("attention",)), ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "convolution")),
          ("copies", ("aten::copy_", "aten::cat", "aten::stack", "aten::clone", "aten::contiguous")),
          ("norms", ("layer_norm", "batch_norm", "rms_norm", "tanh")), ("gelu", ("gelu",)),
          ("loss", ("softmax", "nll_loss")), ("optimizer", ("_foreach", "Optimizer")))


def profile_shares(step: Callable) -> dict[str, float]:
    """Self CPU time of the ops of 3 steps by group, as shares of their total (autograd's wrapper events, whose self
    time is bookkeeping, are left out)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            step()
    by: dict[str, float] = defaultdict(float)
    for e in p.key_averages():
        if e.key.startswith(("autograd::", "Optimizer.zero_grad")) or ("Backward" in e.key and "::" not in e.key):
            continue
        by[next((g for g, keys in GROUPS if any(k in e.key for k in keys)), "other")] += e.self_cpu_time_total
    total = sum(by.values()) or 1.0
    return {g: v / total for g, v in sorted(by.items(), key=lambda kv: -kv[1])}


def measure(name: str, norm: str, repeats: int, tiny: bool = False) -> dict:
    """Old and new steps and the matmul peak, interleaved; FLOPs; the new path's profile and its bound."""
    m, loss_fn, attn = CASES[name](norm, tiny)
    flops = step_flops(m, loss_fn) + attn
    new = make_step(m, loss_fn)
    m_old, loss_old, _ = CASES[name](norm, tiny)
    old_step = make_step(m_old, loss_old)
    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)

    def old():
        with old_path():
            old_step()
    t = interleaved({"old": old, "new": new, "peak": lambda: torch.mm(a, b)}, repeats, warmup=2)
    peaks = [2 * PEAK_N ** 3 / x / 1e9 for x in t["peak"]]
    shares = profile_shares(new)
    step, peak = statistics.median(t["new"]), statistics.median(peaks)
    return {"flops": flops, "attn_flops": attn, "old": t["old"], "new": t["new"], "peaks": peaks, "shares": shares,
            "ratio": paired_ratio(t["new"], t["old"]),
            "share_new": statistics.median(flops / x / 1e9 / p for x, p in zip(t["new"], peaks, strict=True)),
            "share_old": statistics.median(flops / x / 1e9 / p for x, p in zip(t["old"], peaks, strict=True)),
            "gemm": (flops - attn) / max(shares.get("matmul", 0) * step, 1e-12) / 1e9 / peak,
            "attention": attn / max(shares.get("attention", 0) * step, 1e-12) / 1e9 / peak,
            "bound": flops / max((shares.get("matmul", 0) + shares.get("attention", 0)) * step, 1e-12) / 1e9 / peak}


@register("transformer_steps", text=TEXT, sizes=sizes)
def run(s: Settings) -> list[Row]:
    rows = []
    for name in CASES:
        for norm in NORMS:
            r = measure(name, norm, 2 if s.tiny else s.model_repeats, tiny=s.tiny)
            label = f"{name} {norm}"
            rows.append(Row("transformer_steps", label, "tokens", "fast path", "new", "old",
                            statistics.median(r["new"]) * 1e3, statistics.median(r["old"]) * 1e3, "ms", r["ratio"],
                            note="bitwise the same outputs and gradients (tests/test_models_fast_paths.py)"))
            achieved = r["flops"] / statistics.median(r["new"]) / 1e9
            peak = statistics.median(r["peaks"])
            rows.append(Row("transformer_steps", label, "", "GFLOP/s", "achieved (new)", "matmul peak", achieved, peak,
                            "GFLOP/s", peak / achieved,
                            note=f"{r['share_new']:.0%} of the matmul peak (old path {r['share_old']:.0%}); "
                                 f"{r['flops'] / 1e9:.3g} GFLOP per step, of which attention "
                                 f"{r['attn_flops'] / 1e9:.3g} (by hand)"))
            rows.append(Row("transformer_steps", label, "", "profile", "self CPU time by op group",
                            note=", ".join(f"{g} {v:.0%}" for g, v in r["shares"].items())
                            + f"; GEMMs at {r['gemm']:.0%} of the peak, attention at {r['attention']:.0%}; with "
                              f"every other op taking no time the step would reach {r['bound']:.0%}"))
    return rows
