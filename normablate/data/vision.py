"""Image classification data: decoded once to uint8 tensors, cached, batched and augmented on the device.

Contract (``VisionDataModule``, see ``common.py`` for the step-indexed batching):

- ``setup()`` fills, for the train, val and test splits, ``train_x``/``val_x``/``test_x`` uint8 ``(N, 3, H, W)``
  and ``train_y``/``val_y``/``test_y`` int64 ``(N,)`` (CPU), and the attributes ``num_classes``, ``class_names``,
  ``in_chans`` (3: every image is converted to RGB), ``image_size`` (H, or (H, W) when not square), ``num_train``,
  ``num_val``, ``num_test``, ``samples_per_step`` (= batch_size), ``mean``/``std`` (3,) per-channel statistics of the train
  split in [0, 1] pixel units.
- Training batch of step s: ``(x float32 (B, 3, H, W), y int64 (B,))``; indices from the per-epoch permutation
  seeded by (seed, epoch); with ``cfg.augment`` a random crop from the image zero-padded by 4 pixels (black, as
  torchvision's ``RandomCrop(32, padding=4)`` before ``Normalize``) and a random horizontal flip, drawn from a
  generator seeded by (seed, s); then ``(x / 255 - mean) / std``. All of it with tensor ops on the device.
- Validation and test: ordered, unaugmented batches of ``cfg.val_batch_size``.

Sources: ``"synthetic"`` (``synthetic.py``), a hub name or a local path (``sources.py``). Image and label columns
are ``cfg.image_key``/``cfg.label_key`` or guessed (``img``/``image``, ``label``/``labels``). Which rows are train,
validation and test: ``sources.plan_splits`` (by default validation is a fixed 10% of the training split and test
is the source's test split).
"""
from __future__ import annotations

import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import cache, synthetic
from .common import EpochSampler, StepDataModule, generator
from .sources import guess_column, locate, plan_splits, split_rows

log = logging.getLogger(__name__)

IMAGE_KEYS = ("img", "image")
LABEL_KEYS = ("label", "labels")
PAD = 4  # random-crop padding in pixels


# ------------------------------------------------------------------------------------------ decoding
def _image_bytes(col: pa.ChunkedArray | pa.Array, name: str) -> list[bytes]:
    """Encoded bytes of each image of an HF ``Image`` column (struct{bytes, path}) or a binary column."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
        data = col.field("bytes").to_pylist()
        if any(b is None for b in data):  # e.g. imagefolder stores paths only
            paths = col.field("path").to_pylist() if col.type.get_field_index("path") >= 0 else [None] * len(data)
            data = [b if b is not None else Path(p).read_bytes() for b, p in zip(data, paths)]
        return data
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        return col.to_pylist()
    raise ConfigError(f"column {name!r} holds {col.type}, not encoded images (an HF Image feature or bytes)")


def _decode_chunk(blobs: list[bytes]) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    if all(b[:2] == b"\xff\xd8" for b in blobs):  # all JPEG: torchvision's batched libjpeg-turbo decoder
        return decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], mode=ImageReadMode.RGB)
    from PIL import Image

    return [torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1) for b in blobs]


def decode_images(blobs: list[bytes], threads: int | None = None) -> torch.Tensor:
    """Encoded images -> uint8 (N, 3, H, W). JPEG via torchvision (batched, threads), anything else via PIL."""
    if not blobs:
        raise ConfigError("no images to decode (empty split)")
    threads = threads or min(8, os.cpu_count() or 1)
    size = -(-len(blobs) // (threads * 4))
    chunks = [blobs[i:i + size] for i in range(0, len(blobs), size)]
    with ThreadPoolExecutor(threads) as ex:  # the decoders release the GIL
        images = [im for part in ex.map(_decode_chunk, chunks) for im in part]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ConfigError(f"images have different sizes {sorted(shapes)[:5]}; resize them to one size first")
    return torch.stack(images)


def _labels(col: pa.ChunkedArray, name: str) -> tuple[torch.Tensor, list[str] | None]:
    """int64 labels and, for string labels, the names (codes index the sorted unique strings)."""
    if pa.types.is_integer(col.type):
        y = torch.from_numpy(col.to_numpy().astype(np.int64))
        if len(y) and y.min() < 0:
            raise ConfigError(f"label column {name!r} has negative labels (unlabelled examples?); pick another split")
        return y, None
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        values = col.to_pylist()
        names = sorted(set(values))
        code = {n: i for i, n in enumerate(names)}
        return torch.tensor([code[v] for v in values], dtype=torch.int64), names
    raise ConfigError(f"label column {name!r} holds {col.type}; expected integers or strings")


# ------------------------------------------------------------------------------------------ loading
def holdout_order(n: int) -> torch.Tensor:
    """The fixed order in which a split's rows are handed out to train / val / test when one split serves several
    roles (``sources.plan_splits``): a permutation seeded independently of the run seed, so every run, seed and
    machine holds out the same images (not the tail: tables and image folders are often sorted by class)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


def _select(plan: dict[str, tuple[str, int, int]], rows: dict[str, int], limits: dict[str, int | None]
            ) -> dict[str, tuple[str, Any]]:
    """Per role: (split, rows) where rows is ``("range", start, stop)`` for a role that has its split to itself
    (read in order) or ``("holdout", n, start, stop)`` for a part of a split shared by several roles (positions
    ``[start, stop)`` of ``holdout_order(n)``); limits applied."""
    shared = {s for s in (p[0] for p in plan.values()) if sum(q[0] == s for q in plan.values()) > 1}
    out = {}
    for role, (split, start, stop) in plan.items():
        if limits[role] is not None:
            stop = min(stop, start + limits[role])
        out[role] = (split, ("holdout", rows[split], start, stop) if split in shared else ("range", start, stop))
    return out


def _indices(how: tuple) -> torch.Tensor:
    if how[0] == "range":
        return torch.arange(how[1], how[2])
    _, n, start, stop = how
    return holdout_order(n)[start:stop]


def _load_table_rows(src, role: str, split: str, how: tuple, cfg) -> dict[str, Any]:
    """Decode the rows ``how`` (see ``_select``) of ``split``: only the selected images are decoded."""
    sp = src.split(split, f"{role}_split")
    img_key = guess_column(sp, cfg.image_key, IMAGE_KEYS, "image", "image_key", src.name)
    lab_key = guess_column(sp, cfg.label_key, LABEL_KEYS, "label", "label_key", src.name)
    t0 = time.perf_counter()
    idx = _indices(how)
    if how[0] == "range":
        table = sp.read([img_key, lab_key], how[2]).slice(how[1])
    else:
        table = sp.read([img_key, lab_key], None).take(pa.array(idx.numpy()))
    x = decode_images(_image_bytes(table.column(img_key), img_key))
    y, names = _labels(table.column(lab_key), lab_key)
    log.info("decoded %d images of %s[%s] in %.1fs", len(y), src.name, split, time.perf_counter() - t0)
    return {"x": x, "y": y, "label_names": names or sp.class_names.get(lab_key) or []}


def load_splits(cfg) -> dict[str, dict[str, Any]]:
    """``{"train": payload, "val": payload, "test": payload}`` with payload ``{x, y, label_names, _cache_hit,
    _from}``, limits applied; ``_from`` = (cache file, how x and y were taken from it): the key of values derived
    from them (``cache.derived``). Which rows serve which role: ``sources.plan_splits``."""
    limits = {"train": cfg.train_limit, "val": cfg.val_limit, "test": cfg.test_limit}
    if cfg.source == "synthetic":
        rows = {"train": synthetic.TRAIN_SIZE, "test": synthetic.VAL_SIZE}
        select = _select(plan_splits("synthetic", rows, cfg), rows, limits)
        key = {"source": "synthetic-images", "seed": synthetic.IMAGE_SEED, "code": synthetic.CODE_HASH, "train": synthetic.TRAIN_SIZE,
               "test": synthetic.VAL_SIZE}
        payload = cache.cached("synthetic", key, lambda: {
            f"{s}_{k}": v for s, (x, y) in synthetic.image_splits().items() for k, v in (("x", x), ("y", y))
        }, cfg.cache_dir)
        out = {}
        for role, (split, how) in select.items():
            def gather(split=split, how=how) -> tuple[torch.Tensor, torch.Tensor]:
                i = _indices(how)
                return payload[f"{split}_x"][i], payload[f"{split}_y"][i]

            x, y = cache.derived(payload["_cache_file"], (split, *how), gather)  # a sweep worker keeps the gather
            out[role] = {"x": x, "y": y, "label_names": synthetic.CLASS_NAMES, "_cache_hit": payload["_cache_hit"],
                         "_from": (payload["_cache_file"], split, *how)}
        return out
    src = locate(cfg.source, "images", cfg.cache_dir, cfg.hub_config)
    rows = split_rows(src)
    select = _select(plan_splits(src.name, rows, cfg), rows, limits)
    out = {}
    for role, (split, how) in select.items():
        rows_key = {"rows": [how[1], how[2]]} if how[0] == "range" else {"holdout": list(how[1:])}
        key = {**src.key, "split": split, **rows_key, "image_key": cfg.image_key, "label_key": cfg.label_key}
        out[role] = cache.cached("images", key, lambda role=role, split=split, how=how:
                                 _load_table_rows(src, role, split, how, cfg), cfg.cache_dir)
        out[role]["_from"] = (out[role]["_cache_file"],)
    return out


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 (N, C, H, W) images in [0, 1] units, exact, from 256-bin histograms."""
    # bincount reads uint8 directly: no int32 copy of the images (CIFAR-10 train: 0.87 s -> 0.30 s, paid per run)
    hist = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])])
    hist = hist.double()  # (C, 256)
    v = torch.arange(256, dtype=torch.float64) / 255
    n = hist.sum(1)
    mean = (hist * v).sum(1) / n
    std = ((hist * v * v).sum(1) / n - mean**2).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


# ------------------------------------------------------------------------------------------ module
class VisionDataModule(StepDataModule):
    """CIFAR-style classification data; see the module docstring."""

    def _load(self) -> None:
        cfg = self.cfg
        splits = load_splits(cfg)
        tr = splits["train"]
        self.cache_hits = {role: bool(p.get("_cache_hit")) for role, p in splits.items()}
        self.train_x, self.train_y = tr["x"], tr["y"]  # (N, 3, H, W) uint8, (N,) int64
        names = list(tr["label_names"] or [])
        for role in ("val", "test"):
            p = splits[role]
            x, y = p["x"], p["y"]
            if p["label_names"] and p["label_names"] != names:  # string labels: map codes onto train's names
                code = {n: i for i, n in enumerate(names)}
                unknown = sorted(set(p["label_names"]) - set(code))
                if unknown:
                    raise ConfigError(f"{role} labels {unknown[:5]} do not occur in the training split")
                y = torch.tensor([code[n] for n in p["label_names"]])[y]
            if self.train_x.shape[1:] != x.shape[1:]:
                raise ConfigError(f"train images are {tuple(self.train_x.shape[1:])} but {role} images "
                                  f"{tuple(x.shape[1:])}")
            setattr(self, f"{role}_x", x)
            setattr(self, f"{role}_y", y)
        self.num_classes = len(names) or int(max(self.train_y.max(), self.val_y.max(), self.test_y.max())) + 1
        self.class_names = names or [str(i) for i in range(self.num_classes)]
        self.in_chans = 3
        h, w = self.train_x.shape[2:]
        self.image_size = h if h == w else (h, w)
        self.num_train, self.num_val, self.num_test = len(self.train_y), len(self.val_y), len(self.test_y)
        self.samples_per_step = float(cfg.batch_size)
        # (3,), (3,); a sweep worker computes them once per data config (kept with the payload: cache.derived)
        mean, std = cache.derived(tr["_from"][0], ("channel_stats", *tr["_from"][1:]),
                                  lambda: channel_stats(self.train_x))
        self.mean, self.std = mean.clone(), std.clone()  # (tiny) copies: a kept value is never handed out to write to
        self.sampler = EpochSampler(self.num_train, cfg.batch_size, self.seed)

    def train_spec(self, step: int) -> dict[str, Any]:
        spec = {"kind": "train", "step": step, "index": self.sampler(step)}
        if self.cfg.augment:
            g = generator(self.seed, "augment", step)
            b = len(spec["index"])
            spec["shift"] = torch.randint(0, 2 * PAD + 1, (b, 2), generator=g)  # (B, 2) crop offsets (dy, dx)
            spec["flip"] = torch.rand(b, generator=g) < 0.5  # (B,)
        return spec

    def eval_specs(self, split: str = "val") -> list[dict[str, Any]]:
        """Fixed batches over a fixed permutation of the validation (or test) set, the same for every run and seed:
        class-sorted splits still give mixed batches, which the batch-statistics evaluation (train/eval gap)
        needs. A short remainder is merged into the previous batch rather than evaluated alone."""
        bs, n = self.cfg.val_batch_size, getattr(self, f"num_{split}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        bounds = list(range(0, n, bs)) + [n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < bs // 2:
            del bounds[-2]
        return [{"kind": split, "index": order[a:b]} for a, b in zip(bounds[:-1], bounds[1:])]

    def _build(self, spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = spec["index"]
        dev = idx.device
        split = spec["kind"]  # train | val | test
        x = self.on_device(f"{split}_x", dev)[idx]  # (B, 3, H, W) uint8
        y = self.on_device(f"{split}_y", dev)[idx]  # (B,)
        if "shift" in spec:
            x = crop_flip(x, spec["shift"], spec["flip"])
        mean, std = self.on_device("mean", dev), self.on_device("std", dev)
        x = (x.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return x, y


def crop_flip(x: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Batched random crop of the zero-padded image + horizontal flip, one gather on the device.
    x: (B, C, H, W); shift: (B, 2) offsets in [0, 2*pad] into the padded image; flip: (B,) bool."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zeros
    rows = shift[:, 0:1] + torch.arange(H, device=x.device)  # (B, H)
    cols = shift[:, 1:2] + torch.arange(W, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    c = torch.arange(C, device=x.device).view(1, C, 1, 1)
    return xp[b, c, rows.view(B, 1, H, 1), cols.view(B, 1, 1, W)]  # (B, C, H, W)
