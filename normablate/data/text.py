"""Byte-level language-modelling data (vocab 256, no tokenizer), batched on the device.

Contract (``TextDataModule``, see ``common.py`` for the step-indexed batching):

- Each split is stored as ``<split>_data`` uint8 (N,) (the UTF-8 bytes) plus sample spans ``<split>_starts`` /
  ``<split>_lens`` int64 (K,): paragraphs (text split on blank lines) for plain-text sources, rows for
  table-like sources (rows joined by ``\\n`` in ``data``). Samples shorter than 2 bytes are dropped; a sample is
  truncated to ``block_size + 1`` bytes.
- ``mode: blocks`` (nanoGPT): training batch of step s = B windows at offsets drawn from a generator seeded by
  (seed, s): ``(idx int64 (B, T), targets int64 (B, T), None)`` with targets = idx shifted by one byte.
  Validation (and test): the non-overlapping windows ``[k*T, k*T + T]`` of the val (test) text in order (at most
  ``val_limit`` / ``test_limit``).
- ``mode: samples``: training batch of step s = B samples from the per-epoch permutation seeded by (seed, epoch),
  right-padded to the longest sample of the batch. A sample of n bytes gives n-1 input tokens (its bytes but
  the last) and n-1 targets (its bytes but the first): ``(idx int64 (B, T), targets int64 (B, T), mask bool
  (B, T))`` with ``T = max n - 1``, ``mask`` True at real input tokens (a prefix of each row); wherever ``mask``
  is False, ``idx`` is 0 (pad) and ``targets`` is -100 (and ``targets`` is -100 nowhere else).
  Validation: the val samples in order, padded per batch.
- Attributes after ``setup()``: ``vocab_size`` (256), ``block_size``, ``mode``, ``num_train``/``num_val``
  (samples in samples mode; non-overlapping windows in blocks mode), ``num_train_tokens``/``num_val_tokens``
  (bytes), ``samples_per_step`` (tokens per step: B*T in blocks mode; in samples mode the expected number of
  real target tokens per batch, B * mean(n - 1), i.e. without padding), ``pad_fraction`` (samples mode: mean
  fraction of padded positions over the first 100 training batches; 0 in blocks mode).

Limits: ``train_limit`` = first N samples (samples mode) or the first N*T+1 bytes (blocks mode);
``val_limit`` = first N samples / windows. Sources: ``"synthetic"`` (``synthetic.text``), a text file or a
directory of ``*.txt`` (splits from file names), parquet / ``save_to_disk`` / hub (column ``cfg.text_key`` or
``text``). Train, validation and test follow ``sources.plan_splits``; parts held out of one split are contiguous:
train | val | test (cut at a paragraph boundary for plain text, at a row boundary for tables).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from ..errors import ConfigError
from . import cache, synthetic
from .common import EpochSampler, StepDataModule, generator
from .sources import ROLES, files_by_split, guess_column, locate, plan_splits, split_rows

VOCAB_SIZE = 256
PAD_ID = 0
IGNORE = -100  # cross_entropy's ignore_index
PARAGRAPH_SEP = re.compile(rb"\n[ \t\r]*\n\s*")  # a blank line (and any whitespace after it)
PAD_STAT_STEPS = 100


# ------------------------------------------------------------------------------------------ encoding
def paragraphs(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte spans (starts, ends) of the blank-line separated paragraphs of ``data`` (whitespace-only skipped)."""
    starts, ends, pos = [], [], 0
    for m in [*PARAGRAPH_SEP.finditer(data), None]:
        end = len(data) if m is None else m.start()
        chunk = data[pos:end]
        if chunk.strip():
            lead = len(chunk) - len(chunk.lstrip())
            starts.append(pos + lead)
            ends.append(pos + len(chunk.rstrip()))
        pos = end if m is None else m.end()
    return torch.tensor(starts, dtype=torch.int64), torch.tensor(ends, dtype=torch.int64)


def _as_u8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def from_text(data: bytes) -> dict[str, torch.Tensor]:
    """Plain text -> {data, starts, ends}, samples = paragraphs."""
    starts, ends = paragraphs(data)
    return {"data": _as_u8(data), "starts": starts, "ends": ends}


def from_rows(rows: list[str]) -> dict[str, torch.Tensor]:
    """Per-row text -> {data (rows joined by \\n), starts, ends}, samples = rows."""
    enc = [(r or "").encode("utf-8") for r in rows]
    lens = torch.tensor([len(b) for b in enc], dtype=torch.int64)
    starts = torch.cumsum(lens + 1, 0) - lens - 1  # each row is followed by one "\n"
    return {"data": _as_u8(b"\n".join(enc)), "starts": starts, "ends": starts + lens}


def holdout(data: bytes, fraction: float) -> tuple[bytes, bytes]:
    """Split plain text into (head, tail) with the tail about ``fraction`` of it, cut at the next blank line
    (else the next newline) after the nominal cut."""
    cut = int(len(data) * (1 - fraction))
    m = PARAGRAPH_SEP.search(data, cut)
    if m is not None and m.start() < len(data):
        return data[:m.start()], data[m.end():]
    nl = data.find(b"\n", cut)
    if nl >= 0:
        return data[:nl], data[nl + 1:]
    return data[:cut], data[cut:]


# ------------------------------------------------------------------------------------------ loading
def _plain_text_splits(cfg, splits: dict[str, bytes], name: str) -> dict[str, Any]:
    """Plain-text splits -> payload {train_*, val_*, test_*}. Roles follow ``sources.plan_splits``; parts held out of
    one split are contiguous: train | val | test, each cut at a paragraph boundary (``holdout``)."""
    plan = plan_splits(name, {s: len(d) for s, d in splits.items()}, cfg)
    train = splits[cfg.train_split]
    parts = {}
    if plan["test"][0] == cfg.train_split:  # a single split: the test set is its tail
        train, parts["test"] = holdout(train, cfg.test_fraction)
    else:
        parts["test"] = splits[plan["test"][0]]
    if plan["val"][0] == cfg.train_split:  # val_fraction of the whole split, just before the test part
        kept = 1 - (cfg.test_fraction if "test" in parts and plan["test"][0] == cfg.train_split else 0)
        train, parts["val"] = holdout(train, cfg.val_fraction / kept)
    else:
        parts["val"] = splits[plan["val"][0]]
    parts["train"] = train
    return {f"{role}_{k}": v for role in ROLES for k, v in from_text(parts[role]).items()}


def load_splits(cfg) -> dict[str, Any]:
    """Payload ``{train_data, train_starts, train_ends, val_data, ..., test_data, ...}`` (cached), limits not yet
    applied."""
    holdout_key = {"train_split": cfg.train_split, "val_split": cfg.val_split, "val_fraction": cfg.val_fraction,
                   "test_split": cfg.test_split, "test_fraction": cfg.test_fraction}
    if cfg.source == "synthetic":
        key = {"source": "synthetic-text", "seed": synthetic.TEXT_SEED, "code": synthetic.CODE_HASH, **holdout_key}
        return cache.cached("text", key, lambda: _plain_text_splits(
            cfg, {"train": synthetic.text().encode()}, "synthetic"), cfg.cache_dir)
    src = locate(cfg.source, "text", cfg.cache_dir, cfg.hub_config)
    if src.kind == "text_file":
        return cache.cached("text", {**src.key, **holdout_key}, lambda: _plain_text_splits(
            cfg, {"train": src.path.read_bytes()}, src.name), cfg.cache_dir)
    if src.kind == "text_dir":
        def build() -> dict[str, Any]:
            files = files_by_split(src.path, {".txt"})
            return _plain_text_splits(cfg, {s: b"\n\n".join(Path(f).read_bytes() for f in fs)
                                            for s, fs in files.items()}, src.name)
        return cache.cached("text", {**src.key, **holdout_key}, build, cfg.cache_dir)
    # table-like: parquet, save_to_disk, hub; held-out parts are contiguous rows
    plan = plan_splits(src.name, split_rows(src), cfg)

    def build() -> dict[str, Any]:
        out = {}
        for role, (split, start, stop) in plan.items():
            sp = src.split(split, f"{role}_split")
            col = guess_column(sp, cfg.text_key, ("text",), "text", "text_key", src.name)
            column = sp.read([col], stop).slice(start).column(col)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise ConfigError(f"column {col!r} of {src.name!r} holds {column.type}, not text; set data.text_key")
            out.update({f"{role}_{k}": v for k, v in from_rows(column.to_pylist()).items()})
        return out

    return cache.cached("text", {**src.key, "plan": plan, "text_key": cfg.text_key}, build, cfg.cache_dir)


# ------------------------------------------------------------------------------------------ module
class TextDataModule(StepDataModule):
    """Byte-level LM data; see the module docstring."""

    vocab_size = VOCAB_SIZE

    def _load(self) -> None:
        cfg = self.cfg
        self.mode, self.block_size = cfg.mode, cfg.block_size
        T = cfg.block_size
        p = load_splits(cfg)
        self.cache_hits = {role: bool(p.get("_cache_hit")) for role in ROLES}
        for role, limit in (("train", cfg.train_limit), ("val", cfg.val_limit), ("test", cfg.test_limit)):
            data, starts, ends = p[f"{role}_data"], p[f"{role}_starts"], p[f"{role}_ends"]
            keep = ends - starts >= 2  # a sample needs one input and one target
            starts, lens = starts[keep], (ends - starts)[keep].clamp(max=T + 1)
            if cfg.mode == "samples" and limit is not None:
                starts, lens = starts[:limit], lens[:limit]
            if cfg.mode == "blocks" and role == "train" and limit is not None:
                data = data[: limit * T + 1]
            setattr(self, f"{role}_data", data)  # (N,) uint8
            setattr(self, f"{role}_starts", starts)  # (K,) int64
            setattr(self, f"{role}_lens", lens)  # (K,) int64, in [2, T + 1]
        self.num_train_tokens, self.num_val_tokens = len(self.train_data), len(self.val_data)
        self.num_test_tokens = len(self.test_data)
        B = cfg.batch_size
        if cfg.mode == "blocks":
            for role in ROLES:
                if len(getattr(self, f"{role}_data")) < T + 1:
                    raise ConfigError(f"the {role} text has {len(getattr(self, f'{role}_data'))} bytes, fewer than "
                                      f"data.block_size + 1 = {T + 1}")
            self.num_train = (self.num_train_tokens - 1) // T
            for role, limit in (("val", cfg.val_limit), ("test", cfg.test_limit)):
                n = (len(getattr(self, f"{role}_data")) - 1) // T
                setattr(self, f"num_{role}", n if limit is None else min(n, limit))
            self.samples_per_step = float(B * T)
            self.pad_fraction = 0.0
        else:
            for role in ROLES:
                if len(getattr(self, f"{role}_lens")) == 0:
                    raise ConfigError(f"the {role} split has no sample of 2 bytes or more")
            self.num_train, self.num_val, self.num_test = len(self.train_lens), len(self.val_lens), len(self.test_lens)
            self.sampler = EpochSampler(self.num_train, B, self.seed)
            real = self.train_lens - 1  # (K,) real target tokens per sample
            self.samples_per_step = float(B * real.double().mean())
            fracs = []
            for s in range(PAD_STAT_STEPS):
                r = real[self.sampler(s)]
                fracs.append(1 - r.sum().item() / (len(r) * r.max().item()))
            self.pad_fraction = float(sum(fracs) / len(fracs))

    def train_spec(self, step: int) -> dict[str, Any]:
        if self.mode == "blocks":
            g = generator(self.seed, "blocks", step)
            high = self.num_train_tokens - self.block_size  # offsets o with o + T <= N - 1
            return {"kind": "train", "step": step,
                    "offset": torch.randint(0, high, (self.cfg.batch_size,), generator=g)}
        idx = self.sampler(step)
        return {"kind": "train", "step": step, "index": idx, "width": int(self.train_lens[idx].max())}

    def eval_specs(self, split: str = "val") -> list[dict[str, Any]]:
        bs, T, n = self.cfg.val_batch_size, self.block_size, getattr(self, f"num_{split}")
        if self.mode == "blocks":
            return [{"kind": split, "offset": torch.arange(i, min(i + bs, n)) * T} for i in range(0, n, bs)]
        lens = getattr(self, f"{split}_lens")
        specs = []
        for i in range(0, n, bs):
            idx = torch.arange(i, min(i + bs, n))
            specs.append({"kind": split, "index": idx, "width": int(lens[idx].max())})
        return specs

    def _build(self, spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        split = spec["kind"]  # train | val | test
        if "offset" in spec:  # blocks
            off = spec["offset"]
            data = self.on_device(f"{split}_data", off.device)
            pos = off[:, None] + torch.arange(self.block_size + 1, device=off.device)  # (B, T+1)
            tok = data[pos].long()
            return tok[:, :-1], tok[:, 1:], None  # (B, T), (B, T)
        idx = spec["index"]
        dev = idx.device
        data = self.on_device(f"{split}_data", dev)
        start = self.on_device(f"{split}_starts", dev)[idx]  # (B,)
        n = self.on_device(f"{split}_lens", dev)[idx]  # (B,)
        ar = torch.arange(spec["width"], device=dev)  # (L,)
        real = ar[None, :] < n[:, None]  # (B, L) True on the sample's bytes
        pos = (start[:, None] + ar[None, :]).clamp(max=len(data) - 1)
        tok = data[pos].long() * real  # (B, L), padded with PAD_ID = 0
        mask = real[:, 1:]  # (B, T): input j is real iff byte j+1 exists
        idx = tok[:, :-1] * mask  # the last byte of a sample is only a target: pad it in the input
        targets = tok[:, 1:].masked_fill(~mask, IGNORE)
        return idx, targets, mask
