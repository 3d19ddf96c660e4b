"""Reference levels for the LM studies' validation and test perplexity: byte n-gram models fit on the same training
speeches and scored on exactly the targets the LM is scored on (lm_norms' data: Tiny Shakespeare, one speech
per sample, truncated at block_size + 1 = 129 bytes, every held-out speech).

An order-k model predicts a byte from the k bytes before it in the same speech (fewer at a speech's start:
it backs off to the context there is). Order 0 uses no input at all (byte frequencies), order 1 only the
current input byte, which a Transformer can use without attention (the token's own embedding through the MLPs);
order 2 and up need at least one earlier position, i.e. attention. So a curve that stalls at the order-0 or
order-1 level says which of these the model has learnt.

Estimator: Witten-Bell interpolation (no parameter to tune): P(w | h) = (c(h, w) + T(h) P(w | h')) / (c(h) +
T(h)), with T(h) the number of distinct bytes seen after h, h' = h without its oldest byte, and the order-0 model
interpolated the same way with the uniform distribution over 256 bytes.

    python scripts/lm_ngram_baselines.py > docs/findings/lm_ngram_baselines.md
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

V = 256
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
ORDERS = (0, 1, 2, 3)


def contexts(samples: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(context id, context length, target) for every target of every sample: the target at position j >= 1
    of a sample has the min(k, j) bytes before it as context; ids are base-256 numbers of the context bytes."""
    ids, lens, tgt = [], [], []
    for s in samples:
        s = s.astype(np.int64)
        n = len(s)
        for j in range(1, n):
            m = min(k, j)
            h = 0
            for b in s[j - m:j]:
                h = h * V + int(b)
            ids.append(h)
            lens.append(m)
            tgt.append(int(s[j]))
    return np.array(ids, dtype=np.int64), np.array(lens, dtype=np.int64), np.array(tgt, dtype=np.int64)


class WittenBell:
    """Byte n-gram model of order ``k`` with Witten-Bell interpolation down to the uniform distribution."""

    def __init__(self, samples: list[np.ndarray], k: int):
        self.k = k
        self.tables: list[dict[int, tuple[np.ndarray, float, int]]] = []  # per order m: ctx -> (counts, c(h), T(h))
        for m in range(k + 1):
            ids, lens, tgt = contexts(samples, m)
            sel = lens == m  # a context of length m counts only where m bytes precede the target
            table: dict[int, tuple[np.ndarray, float, int]] = {}
            ids, tgt = ids[sel], tgt[sel]
            order = np.argsort(ids, kind="stable")
            ids, tgt = ids[order], tgt[order]
            bounds = np.flatnonzero(np.diff(ids)) + 1
            for chunk_ids, chunk_tgt in zip(np.split(ids, bounds), np.split(tgt, bounds)):
                if len(chunk_ids):
                    counts = np.bincount(chunk_tgt, minlength=V).astype(np.float64)
                    table[int(chunk_ids[0])] = (counts, float(counts.sum()), int((counts > 0).sum()))
            self.tables.append(table)

    def dist(self, history: list[int], order: int | None = None) -> np.ndarray:
        """P(. | the last min(order, len(history)) bytes of ``history``), order defaulting to the model's own: a
        distribution over the 256 bytes."""
        p = np.full(V, 1.0 / V)
        k = self.k if order is None else min(order, self.k)
        for m in range(min(k, len(history)) + 1):
            h = 0
            for b in history[len(history) - m:]:
                h = h * V + b
            entry = self.tables[m].get(h)
            if entry is None:
                continue  # unseen context: keep the lower order's distribution
            counts, total, types = entry
            p = (counts + types * p) / (total + types)
        return p

    def nll(self, samples: list[np.ndarray], order: int | None = None) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of every target of ``samples`` and the number of targets, under
        the model cut to ``order`` (default: its own; the tables of orders 0..order are the same either way)."""
        k = self.k if order is None else min(order, self.k)
        cache: dict[tuple[int, ...], np.ndarray] = {}
        total, n = 0.0, 0
        for s in samples:
            s = [int(b) for b in s]
            for j in range(1, len(s)):
                key = tuple(s[max(0, j - k):j])
                p = cache.get(key)
                if p is None:
                    p = cache[key] = self.dist(list(key))
                total -= math.log(p[s[j]])
                n += 1
        return total, n


def speeches(block_size: int = 128) -> dict[str, list[np.ndarray]]:
    """The train, validation and test samples of the LM studies' data module (same splits, same truncation)."""
    from normablate.config import load_config
    from normablate.data import build_datamodule
    cfg = load_config(ROOT / "configs" / "runs" / "lm_shakespeare.yaml",
                      {"data.source": str(DATA), "data.block_size": block_size})
    dm = build_datamodule(cfg.data, "lm", seed=0)
    dm.setup()
    out = {}
    for role in ("train", "val", "test"):
        data = getattr(dm, f"{role}_data").numpy()
        out[role] = [data[s:s + n] for s, n in zip(getattr(dm, f"{role}_starts").tolist(),
                                                   getattr(dm, f"{role}_lens").tolist())]
    return out


def main() -> None:
    if not DATA.exists():
        sys.exit(f"{DATA} not found: the LM baselines need ../shared/data (see its README)")
    sp = speeches()
    train, val, test = sp["train"], sp["val"], sp["test"]
    print("# Byte n-gram reference levels for the LM studies (generated by `python scripts/lm_ngram_baselines.py`; "
          "do not edit)\n")
    targets = {k: sum(len(s) - 1 for s in v) for k, v in (("val", val), ("test", test))}
    print(f"Tiny Shakespeare, one speech per sample truncated at 129 bytes (the LM studies' data, three contiguous "
          f"splits): {len(train)} training speeches, {len(val)} validation speeches ({targets['val']} targets), "
          f"{len(test)} test speeches ({targets['test']} targets). Witten-Bell interpolated n-gram models fit on the "
          "training speeches; perplexity over every target of a split, as the LM's `val/ppl` and `test/ppl`. (The "
          "v1 findings' levels were computed on the v1 split, training on the first 90% and validating on the last "
          "10%, which is now the test split: git show 7244798:docs/findings/lm_ngram_baselines.md.)\n")
    print("| order (context bytes) | needs | val nats/byte | val perplexity | test nats/byte | test perplexity |")
    print("|---|---|---|---|---|---|")
    needs = {0: "no input", 1: "the current byte only", 2: "attention to 1 earlier byte",
             3: "attention to 2 earlier bytes"}
    model = WittenBell(train, max(ORDERS))  # one fit: the order-k model is its tables 0..k
    for k in ORDERS:
        cells = []
        for split in (val, test):
            nll, n = model.nll(split, order=k)
            cells += [f"{nll / n:.3f}", f"{math.exp(nll / n):.2f}"]
        print(f"| {k} | {needs[k]} | " + " | ".join(cells) + " |")
    print(f"\nUniform over 256 bytes: {math.log(V):.3f} nats, perplexity {V}.")


if __name__ == "__main__":
    main()
