"""Transformer training steps at the studies' sizes: the fast paths A/B against the old code, % of a matmul peak
measured in the same run, and where a step's time goes (issue 29).

    python scripts/transformer_step.py [--repeats 15] [--threads 1] [--norms ln bn] [--profile]

The measurement is the bench section ``transformer_steps`` (normablate/bench/sections/transformer_steps.py, which
says what "old" is, how FLOPs and the peak are taken, and the studies' sizes); ``normablate bench --only
transformer_steps`` writes it into docs/benchmarks.md. This script runs it for any norms and prints a table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from normablate.bench.sections.transformer_steps import CASES, measure  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--norms", nargs="+", default=["ln"])
    ap.add_argument("--profile", action="store_true", help="also print each new path's profile and its bound")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average before {os.getloadavg()}")
    rows = []
    for name in CASES:
        for norm in args.norms:
            r = measure(name, norm, args.repeats)
            rows.append((f"{name} {norm}", r))
            if args.profile:
                print(f"{name} {norm} profile (self CPU time, new path): "
                      + ", ".join(f"{g} {v:.0%}" for g, v in r["shares"].items())
                      + f"; GEMMs at {r['gemm']:.0%} of the peak, attention at {r['attention']:.0%}; with every "
                        f"other op taking no time the step would reach {r['bound']:.0%}")
    print(f"load average after {os.getloadavg()}\n")
    print("| model | GFLOP/step | old step | new step | new/old | matmul peak | old % of peak | new % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['flops'] / 1e9:.2f} | {statistics.median(r['old']) * 1e3:.1f} ms | "
              f"{statistics.median(r['new']) * 1e3:.1f} ms | **{r['ratio']:.3f}x** | "
              f"{statistics.median(r['peaks']):.1f} GFLOP/s | {r['share_old']:.0%} | {r['share_new']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
