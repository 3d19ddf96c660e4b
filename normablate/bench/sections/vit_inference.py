"""Section ``vit_inference``: claim 7 (Yao et al. 2021) is inference speed: the vit_norms study's ViT in eval mode
at batch 128 and 1, 1 thread, LN against BN everywhere, LN + BN-in-FFN and BN + BN-in-FFN, each BN variant unfolded
and folded into its adjacent Linears (``fold.py``)."""
from __future__ import annotations

import statistics
import tempfile

import torch
from torch import nn

from ..harness import study_variants
from ..settings import Settings
from ..timing import Row, interleaved, median_ratio, median_ratio_ci, paired_ratio, ratio_ci
from . import register

TEXT = ""


def sizes(s: Settings) -> str:
    return (f"vit_norms study model, batches {s.vit_batches[0]} and {s.vit_batches[1]} "
            f"({s.vit_inner_b1} calls per timed repeat), {s.vit_repeats} interleaved repeats, 1 thread"
            + (", tiny models" if s.tiny_models else ""))


@register("vit_inference", text=TEXT, sizes=sizes)
def run(s: Settings) -> list[Row]:
    """Yao et al. (2021)'s claim 7 is inference speed: eval-mode ViT images/s at the vit_norms study's size
    (configs/studies/vit_norms.yaml's model), 1 thread, batches 128 and 1, interleaved; BN folded into the
    adjacent Linear layers (normablate.fold: pre-norm BN -> qkv/fc1, BN-in-FFN fc1 -> BN) against LN, which
    cannot fold. Ratio: the median of per-repeat time ratios against LN (< 1 = faster than LN), with its 95%
    bootstrap CI over the repeats (``ratio_ci``) in the note; the note also gives the ratio of the medians with its
    bootstrap CI (``median_ratio_ci``), the statistic configs/studies/v2/yao_vit_bn.yaml pre-registers."""
    from ...fold import fold_norms
    from ...models import create as create_model

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
                ci = "" if k == "ln" else ("ratio 95%% CI [%.3f, %.3f] (bootstrap over repeats); ratio of medians "
                                           "%.3f, 95%% CI [%.3f, %.3f] (claim 7's pre-registered statistic)"
                                           % (*ratio_ci(v, ref), median_ratio(v, ref), *median_ratio_ci(v, ref)))
                rows.append(Row("vit_inference", f"vit {k} b{batch}", "tokens", "eval", k, "ln", ips,
                                batch * inner / statistics.median(ref), "images/s", ratio,
                                note="; ".join(x for x in (notes.get(k, ""), ci,
                                                           f"{size}; {1 / ratio:.2f}x LN's speed") if x)))
        return rows
    finally:
        torch.set_num_threads(threads)
