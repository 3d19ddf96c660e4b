"""Section ``allocator``: minor page faults and time per call with glibc's default malloc thresholds and ours
(``alloc.py``), toggled in one process."""
from __future__ import annotations

import contextlib
import resource
import statistics
import time

import torch

from ... import norms
from ...alloc import GLIBC_DEFAULT, MMAP_THRESHOLD, TRIM_THRESHOLD, set_thresholds
from ..harness import fwd_bwd, inputs
from ..settings import Settings
from ..timing import Row, paired_ratio
from . import register

TEXT = ("Same process, glibc malloc thresholds switched between glibc's defaults (128 KiB) and "
        "normablate's (mmap 32 MiB, trim 1 GiB, applied by the CLI and train()); ratio = tuned / default.")


def sizes(s: Settings) -> str:
    return (f"tokens x {s.tokens}, eval batch {s.infer_batch}, {max(3, s.repeats // 2)} repeats per mode")


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@register("allocator", text=TEXT, sizes=sizes)
def run(s: Settings) -> list[Row]:
    """The same calls with glibc's default thresholds and with ours, toggled in one process (interleaved)."""
    from ...models import create as create_model

    c = s.tokens[2]
    mbn = norms.create("masked_bn", c, layout="tokens")
    x, mask = inputs("tokens", s, channels_last=False)
    net = create_model("resnet20", norm="ln", num_classes=10).eval()
    xi = torch.randn(s.infer_batch, 3, 32, 32)
    cases = {"masked_bn fwd+bwd (tokens)": fwd_bwd(lambda xx, m: mbn(xx, mask=m), x, mask),
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
