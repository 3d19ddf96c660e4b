"""Section ``models``: training-step time (forward, backward, clipping, optimizer step) of every model variant of
the findings studies, at the studies' sizes (``configs/studies/santurkar_vgg.yaml``: VGG-11 with bn / noisy_bn /
none; ``vit_norms.yaml``: block norm x BN in the FFN; ``lm_norms.yaml``: 7 norms on padded samples), all variants
interleaved step by step on one fixed batch, against the study's first variant (LN; BN for VGG): the speed half of
claims 7, 8 and 12 (the study runs' own wall times share the machine with other work and are not comparable). Per
variant also the FLOPs of a step (``FlopCounterMode``, CPU flash attention added by hand), the achieved GFLOP/s as a
share of a matmul peak measured in the same run, and ``trainer.speed: auto`` vs eager (issue 29)."""
from __future__ import annotations

import math
import statistics
import tempfile
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ... import models, tasks
from ..harness import hand_config, hand_setup, hand_step, study_variants, task_loss
from ..settings import Settings
from ..timing import Row, interleaved, paired_ratio
from . import register

TEXT = ("One training step (forward, backward, clipping, optimizer) per variant, every variant of a study "
        "interleaved on one fixed batch at the study's sizes (synthetic data of the same shapes). Rows per "
        "variant: eager = step time, ratio against the study's first variant (> 1 = slower); GFLOP/s = "
        "FLOPs per step (FlopCounterMode; the CPU flash-attention kernel is not counted by it, so attention "
        "FLOPs are added by hand, 12·B·h·T²·d per step, causal mask not discounted) / step time, ratio = matmul "
        "peak / achieved (the peak: a torch.mm of 1024² fp32 timed in turn with every step, so that both see "
        "the same load; the share is taken per repeat, median); profile = self CPU time of the study's first "
        "variant by op group (torch.profiler); auto vs eager = the same model with trainer.speed=auto's setting, "
        "interleaved, ratio = auto / eager (timed only where auto differs from eager).")


def sizes(s: Settings) -> str:
    return (f"studies {', '.join(s.model_studies)} at their sizes on synthetic data of the same shapes, "
            f"{s.model_repeats} interleaved steps per variant" + (", tiny models" if s.tiny_models else ""))


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


def ffn_gemm(model: nn.Module, step: Callable[[], object]) -> tuple[int, int, int] | None:
    """The shape (tokens, C) @ (C, hidden) of a Transformer's first FFN GEMM, read off the model: the first Linear
    inside its first module named ``mlp`` (the LM's blocks and timm's ViT blocks), its input recorded by a forward
    hook during one call of ``step``; None for a model without one (the CNNs). The QKV projection and the other
    GEMMs are not modelled."""
    mlp = next((m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "mlp"), None)
    linear = next((m for m in mlp.modules() if isinstance(m, nn.Linear)), None) if mlp is not None else None
    if linear is None:
        return None
    shapes: list[torch.Size] = []
    handle = linear.register_forward_hook(lambda mod, args, out: shapes.append(args[0].shape))
    try:
        step()
    finally:
        handle.remove()
    return math.prod(shapes[0][:-1]), linear.in_features, linear.out_features


@register("models", text=TEXT, sizes=sizes)
def run(s: Settings) -> list[Row]:
    """Training-step time of each study variant, all variants interleaved step by step on the same batch, as
    ratios against the study's first variant (LN for the Transformer studies, BN for santurkar_vgg); per variant
    the FLOPs of a step, the achieved GFLOP/s and its share of a matmul peak measured in the same run, and where
    ``trainer.speed: auto`` chooses another setting than eager (CNNs: channels-last), the step time of auto vs
    eager, interleaved too."""
    from ... import speed

    rows = []
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for study in s.model_studies:
            variants = study_variants(study, tmp, s.tiny_models)
            fns, info, autos = {"matmul peak": _peak_fn()}, {}, {}
            for label, cfg in variants:
                c, dm, model, opt = hand_setup(cfg)
                batch = dm.train_batch(0)
                unit = tasks.get(c.task).unit  # "real tokens": counted by the batch's mask of real tokens
                units = batch[2].sum().item() if unit == "real tokens" else len(batch[0])
                loss = task_loss(c, model, dm)
                fns[label] = (lambda c=c, m=model, o=opt, b=batch, f=loss: hand_step(c, m, o, b, f))
                flops, by_hand = step_flops(fns[label])
                gemm = ffn_gemm(model, fns[label]) if label == variants[0][0] else None  # the reference's only
                info[label] = (c.model.backbone, unit, units, sum(p.numel() for p in model.parameters()), flops, by_hand,
                               gemm)
                chosen, why = speed.rule(c)
                if any(chosen.values()):  # auto differs from eager: the same model (same seed) with auto's setting
                    from ...tasks.optim import build_optimizer

                    c2, dm2, model2, _ = hand_setup(cfg)
                    model2 = speed.apply(model2, types.SimpleNamespace(**chosen))
                    opt2 = build_optimizer(c2.optim, model2)
                    loss2 = task_loss(c2, model2, dm2)
                    fns[f"{label} [auto]"] = (lambda c=c2, m=model2, o=opt2, b=batch, f=loss2: hand_step(c, m, o, b, f))
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
                backbone, unit, units, n_params, flops, by_hand, gemm = info[label]
                med = statistics.median(times)
                rows.append(Row("models", f"{study}: {label}", models.info(backbone).layout, "eager",
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
                                    note=f"auto = eager here ({speed.rule(hand_config(variants, label))[1]}): "
                                         f"not timed"))
    rows.append(Row("models", "matmul peak", "", "GFLOP/s", f"torch.mm {PEAK_N}x{PEAK_N} fp32", "",
                    statistics.median(peaks), None, "GFLOP/s",
                    note=f"timed in turn with every step of every variant at {torch.get_num_threads()} thread(s): "
                         f"median; min {min(peaks):.1f}, max {max(peaks):.1f} over {len(peaks)} calls (the spread "
                         f"is the load: the shares above are taken per repeat)"))
    return rows
