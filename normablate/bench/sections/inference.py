"""Section ``inference``: eval-mode throughput of a ResNet-20 per norm, BN also folded into its convs
(``fold.py``)."""
from __future__ import annotations

import statistics

import torch
from torch import nn

from ..settings import Settings
from ..timing import Row, interleaved, paired_ratio
from . import register

TEXT = ("Eval-mode ResNet-20 forward, images per second; ratio = time relative to BN folded into the "
        "convs (> 1 = slower than folded BN).")


def sizes(s: Settings) -> str:
    return (f"batch {s.infer_batch}, {s.repeats} interleaved repeats")


@register("inference", text=TEXT, sizes=sizes)
def run(s: Settings) -> list[Row]:
    """Eval-mode ResNet-20 images/s per norm; BN also folded into its convs (as deployed)."""
    from ...fold import fold_batchnorm
    from ...models import create as create_model

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
