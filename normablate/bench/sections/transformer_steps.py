"""Section ``transformer_steps``: the Transformers' fast paths (issue 29) against the code they replaced, and where a
step's time goes, at the studies' sizes (configs/studies/vit_norms.yaml, v2/yao_vit_bn.yaml, v2/vit_dyt.yaml: ViT
width 64, depth 4, 2 heads, MLP ratio 2, batch 128 of 32x32 images, 65 tokens; lm_norms.yaml, v2/lm_rms_dyt.yaml,
v2/shen_powernorm.yaml: LM 2 layers of width 64, 4 heads, batch 32 x 128 bytes, right-padded samples with 64-128
real tokens). ``python scripts/transformer_step.py`` runs the same outside the bench (``--norms``, ``--repeats``).

"old" is the same model with the code before the fast paths: timm's ``Attention.forward`` (q, k, v by
reshape/permute/unbind) in the ViT, and a boolean attention mask that SDPA converts in every layer in the LM
(``old_path``). Both give bitwise the same outputs and gradients (tests/models/test_fast_paths.py)."""
from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ... import models
from ...config import OptimConfig
from ...tasks.optim import build_optimizer
from ..settings import Settings
from ..timing import Row, interleaved, paired_ratio
from . import register
from .models import PEAK_N, _peak_fn, step_flops, step_profile

TEXT = ("One training step (forward, cross-entropy, backward, clipping at 1.0, AdamW as tasks/optim.py builds it) of "
        "the ViT and the LM at the studies' sizes on a fixed synthetic batch, the fast path (new) and the code it "
        "replaced (old: timm's attention forward; a boolean mask converted by SDPA in every layer) interleaved with a "
        "matmul peak (torch.mm of 1024² fp32) in one process; ratio = new / old (median of per-repeat ratios). "
        "GFLOP/s rows: FLOPs per step (FlopCounterMode, plus attention by hand, 12·B·h·T²·d per layer, since it "
        "does not count CPU flash attention: the models section's step_flops) / step time; ratio = peak / "
        "achieved; the share is taken per repeat (median). Profile rows: self CPU time by op group (torch.profiler, "
        "3 steps of the new path), the rates of the GEMMs and of attention as shares of the peak, and the share the "
        "step would reach if every other op took no time: the bound of the Transformers' 65% goal.")
NORMS = ("ln",)


def sizes(s: Settings) -> str:
    return (f"norms {', '.join(NORMS)}, {2 if s.tiny else s.model_repeats} interleaved repeats"
            + (", tiny models" if s.tiny else ""))


def vit_case(norm: str, tiny: bool = False):
    """(model, loss closure) of the studies' ViT on a fixed batch."""
    torch.manual_seed(0)
    B, width, depth, heads = (4, 16, 1, 2) if tiny else (128, 64, 4, 2)
    m = models.create("vit", norm=norm, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=2.0, num_classes=10)
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, 10, (B,))
    return m, (lambda: F.cross_entropy(m(x), y))


def lm_case(norm: str, tiny: bool = False):
    """(model, loss closure) of the studies' LM on a fixed right-padded batch."""
    torch.manual_seed(0)
    B, T, width, layers, heads = (2, 16, 16, 1, 4) if tiny else (32, 128, 64, 2, 4)
    m = models.create("transformer_lm", norm=norm, n_layer=layers, n_embd=width, n_head=heads, block_size=T)
    idx = torch.randint(0, 256, (B, T))
    mask = torch.arange(T)[None] < torch.randint(T // 2, T + 1, (B,))[:, None]
    targets = torch.where(mask, torch.randint(0, 256, (B, T)), -100)

    def loss():
        return F.cross_entropy(m(idx, mask=mask).flatten(0, 1), targets.flatten(), ignore_index=-100)
    return m, loss


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


def measure(name: str, norm: str, repeats: int, tiny: bool = False) -> dict:
    """Old and new steps and the matmul peak, interleaved; FLOPs (the models section's ``step_flops``: the counter
    plus attention by hand); the new path's profile (its ``step_profile``) and the bound it implies."""
    m, loss_fn = CASES[name](norm, tiny)
    flops, attn = step_flops(lambda: loss_fn().backward())
    m.zero_grad(set_to_none=True)
    new = make_step(m, loss_fn)
    m_old, loss_old = CASES[name](norm, tiny)
    old_step = make_step(m_old, loss_old)

    def old():
        with old_path():
            old_step()
    t = interleaved({"old": old, "new": new, "peak": _peak_fn()}, repeats, warmup=2)
    peaks = [2 * PEAK_N ** 3 / x / 1e9 for x in t["peak"]]
    shares, optimizer = step_profile(new)
    gemm_time = shares.get("matmul", 0.0) + shares.get("convolution", 0.0)  # the counter's FLOPs: GEMMs and convs
    step, peak = statistics.median(t["new"]), statistics.median(peaks)

    def rate(f: float, share: float) -> float:  # GFLOP/s over the peak of ``f`` FLOPs in ``share`` of the step
        return f / max(share * step, 1e-12) / 1e9 / peak
    return {"flops": flops, "attn_flops": attn, "old": t["old"], "new": t["new"], "peaks": peaks, "shares": shares,
            "optimizer": optimizer, "ratio": paired_ratio(t["new"], t["old"]),
            "share_new": statistics.median(flops / x / 1e9 / p for x, p in zip(t["new"], peaks, strict=True)),
            "share_old": statistics.median(flops / x / 1e9 / p for x, p in zip(t["old"], peaks, strict=True)),
            "gemm": rate(flops - attn, gemm_time), "attention": rate(attn, shares.get("attention", 0.0)),
            "bound": rate(flops, gemm_time + shares.get("attention", 0.0))}


@register("transformer_steps", text=TEXT, sizes=sizes)
def run(s: Settings) -> list[Row]:
    rows = []
    for name in CASES:
        for norm in NORMS:
            r = measure(name, norm, 2 if s.tiny else s.model_repeats, tiny=s.tiny)
            label = f"{name} {norm}"
            rows.append(Row("transformer_steps", label, "tokens", "fast path", "new", "old",
                            statistics.median(r["new"]) * 1e3, statistics.median(r["old"]) * 1e3, "ms", r["ratio"],
                            note="bitwise the same outputs and gradients (tests/models/test_fast_paths.py)"))
            achieved = r["flops"] / statistics.median(r["new"]) / 1e9
            peak = statistics.median(r["peaks"])
            rows.append(Row("transformer_steps", label, "", "GFLOP/s", "achieved (new)", "matmul peak", achieved, peak,
                            "GFLOP/s", peak / achieved,
                            note=f"{r['share_new']:.0%} of the matmul peak (old path {r['share_old']:.0%}); "
                                 f"{r['flops'] / 1e9:.3g} GFLOP per step, of which attention "
                                 f"{r['attn_flops'] / 1e9:.3g} (by hand)"))
            rows.append(Row("transformer_steps", label, "", "profile", "self CPU time by op group",
                            note=", ".join(f"{g} {v:.0%}" for g, v in sorted(r["shares"].items(),
                                                                              key=lambda kv: -kv[1]))
                            + f"; optimizer step {r['optimizer']:.0%} (its total, overlapping the groups); GEMMs at "
                              f"{r['gemm']:.0%} of the peak, attention at {r['attention']:.0%}; with every other op "
                              f"taking no time the step would reach {r['bound']:.0%}"))
    return rows
