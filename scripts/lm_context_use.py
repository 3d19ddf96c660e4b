"""How much do the trained LMs of a study use earlier positions? For every finished run: the validation loss as
trained, and again with every attention layer restricted to the query's own position (each position then
attends to itself only: its attention output is its own value vector, so the model sees the current byte and
its position but no earlier byte). The difference, ``context_gain`` = loss(self only) - loss(as trained) in nats
per byte, is what the model gets from attending to earlier bytes: ~0 for a model that predicts from the current
byte alone (the order-1 n-gram level, `findings/lm_ngram_baselines.md`).

It reads each run's ``config.yaml`` and ``last.ckpt`` under ``<logs>/<study>/`` (the run folders the sweep
wrote; git-ignored, so re-run the study to get them) and the runs listed as complete in the study's committed
``docs/findings/<study>/trials.csv``. Evaluation is the run's own validation: the same batches, eval mode (BN
variants with their running statistics), loss over real tokens only.

    python scripts/lm_context_use.py lm_norms [--logs lightning_logs] \\
        --csv docs/findings/context_use/lm_norms.csv > docs/findings/context_use/lm_norms.md

The measure is of dependence, not of what the context is worth: a network with its attention cut is off the
distribution it was trained on, so its self-only loss can be far above what a model trained without context
reaches (the order-1 level); compare norms with care (a BN network's running statistics no longer fit either).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from normablate.analysis.stats import fmt_ci, mean_ci
from normablate.config import load_config
from normablate.data import build_datamodule
from normablate.data.text import IGNORE
from normablate.train import build_model

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ROOT / "docs" / "findings"


@contextlib.contextmanager
def self_only_attention():
    """Within the block, ``F.scaled_dot_product_attention`` returns the value vectors: each query attends to its
    own position only (softmax over a single key is 1), whatever mask the model passes."""
    original = F.scaled_dot_product_attention

    def own_value(q, k, v, *args, **kwargs):  # noqa: ARG001
        return v

    F.scaled_dot_product_attention = own_value
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def load_run(run_dir: Path) -> tuple[torch.nn.Module, object]:
    """The trained model of a run folder (eval mode, CPU) and its validation data module."""
    cfg = load_config(run_dir / "config.yaml")
    dm = build_datamodule(cfg.data, cfg.task, cfg.seed)
    dm.setup()
    model = build_model(cfg, dm)
    state = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model.eval(), (dm, cfg.trainer.val_batches)


@torch.no_grad()
def val_nats(model: torch.nn.Module, data) -> float:
    """Token-weighted mean validation cross-entropy (nats per byte), as the run's ``val/loss``."""
    dm, limit = data
    specs = dm.val_specs()
    specs = specs if limit is None else specs[:limit]
    total, n = 0.0, 0
    for spec in specs:
        idx, targets, mask = dm._build(spec)
        logits = model(idx, mask) if mask is not None else model(idx)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        n += int((targets != IGNORE).sum())
    return total / n


def measure(study: str, trials: pd.DataFrame, runs: Path) -> pd.DataFrame:
    """One row per complete, non-diverged trial of ``trials`` (a report's trials.csv) whose run folder is in
    ``runs``: its loss as trained, with self-only attention, and the difference."""
    trials = trials[(trials["state"] == "complete") & (~trials["diverged"].astype(bool))]
    rows = []
    for t in trials.itertuples():
        run_dir = runs / Path(t.run_dir).name
        if not (run_dir / "last.ckpt").exists():
            print(f"_(skipped {run_dir}: no last.ckpt)_", file=sys.stderr)
            continue
        model, data = load_run(run_dir)
        full = val_nats(model, data)
        with self_only_attention():
            own = val_nats(model, data)
        rows.append({"study": study, "run": run_dir.name, "norm": t.norm, "lr": t.lr, "seed": t.seed,
                     "final_val_loss": t.final_val_loss, "val_nats": full, "val_nats_self_only": own,
                     "context_gain": own - full})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+")
    ap.add_argument("--logs", type=Path, default=ROOT / "lightning_logs")
    ap.add_argument("--csv", type=Path, help="write the per-run table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    df = pd.concat([measure(s, pd.read_csv(FINDINGS / s / "trials.csv"), args.logs / s) for s in args.studies],
                   ignore_index=True)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.csv, index=False)
    worst = (df["val_nats"] - df["final_val_loss"]).abs().max()
    print("# Context use of the trained LMs (generated by `python scripts/lm_context_use.py`; do not edit)\n")
    print(f"Studies: {', '.join(args.studies)}; {len(df)} runs. Validation loss (nats per byte) as trained and with "
          "every attention layer restricted to the query's own position; context gain = the difference, what "
          "attending to earlier bytes is worth. Mean ± 95% CI over seeds. The re-evaluated loss matches each "
          f"run's logged final `val/loss` to {worst:.1e} nats.\n")
    print("| study | norm | lr | n | val nats | self-only nats | context gain |")
    print("|---|---|---|---|---|---|---|")
    for (study, norm, lr), g in df.groupby(["study", "norm", "lr"], sort=False):
        cells = [fmt_ci(*mean_ci(list(g[c]))[:2]) for c in ("val_nats", "val_nats_self_only", "context_gain")]
        print(f"| {study} | {norm} | {lr:g} | {len(g)} | " + " | ".join(cells) + " |")
    if not math.isfinite(worst) or worst > 1e-3:
        sys.exit(f"re-evaluation differs from the logged val/loss by {worst:.3g} nats: the runs' checkpoints do not "
                 "belong to these trials (re-run the study)")


if __name__ == "__main__":
    main()
