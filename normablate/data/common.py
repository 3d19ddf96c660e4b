"""What vision and text share: step-indexed batches, the infinite step stream, device-side batch building.

Contract of a ``StepDataModule``:

- The training batch of global step ``s`` is a pure function of ``(seed, s)``. The train dataloader is an
  infinite ``IterableDataset`` that yields small *batch specs* ``{"kind": "train", "step": s, "index": (B,)}``
  starting at ``trainer.global_step`` when its iterator is created (Lightning restores ``global_step`` from a
  checkpoint before it creates the iterator, see ``FitLoop.setup_data``), so ``--resume`` continues with exactly
  the batch the interrupted run would have seen next.
- Lightning moves the spec's index tensor to the device; ``on_after_batch_transfer`` turns it into the real
  batch there, gathering from uint8/int tensors that were moved to that device once (no per-sample Python).
- Validation and test batches are fixed, ordered lists of specs ``{"kind": "val" | "test", "index": ...}``
  (``eval_specs(split)``); selection uses validation only, the test split is evaluated once at the end.
- Without a trainer (tests, probes) ``train_batch(step, device)`` / ``val_batches(device)`` run the same path;
  ``start_step`` sets where a fresh train iterator begins.
- Data parallel: ``cfg.batch_size`` is the global batch of a step. Under a trainer with ``world_size`` W > 1,
  rank r receives rows ``[r*B/W, (r+1)*B/W)`` of every training batch spec (``shard``), so the ranks' slices,
  concatenated in rank order, are exactly the one-process batch of that step. Validation batches are split the
  same way (``tensor_split``: sizes differ by at most one), every rank sees every validation batch, and metrics
  are reduced across ranks. A text batch keeps its global padding width.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from . import cache


def mix(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``mix(seed, "perm", epoch)``): stable across runs and platforms."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by ``mix(*parts)``; random numbers are drawn on the CPU so that every device
    (CPU, CUDA, MPS) sees the same batches, then moved."""
    return torch.Generator().manual_seed(mix(*parts))


class EpochSampler:
    """Indices of training step ``s``: positions ``[s*B, (s+1)*B)`` of the endless sequence
    ``perm(0) ++ perm(1) ++ ...`` where ``perm(e) = randperm(N, generator=mix(seed, "perm", e))``. A batch that
    crosses an epoch boundary takes the tail of one permutation and the head of the next, so every epoch visits
    each example exactly once."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ValueError("cannot sample from an empty training set")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: OrderedDict[int, torch.Tensor] = OrderedDict()

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms[epoch] = torch.randperm(self.n, generator=generator(self.seed, "perm", epoch))
            while len(self._perms) > 2:  # a batch spans at most a few epochs; keep memory flat
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def __call__(self, step: int) -> torch.Tensor:  # (B,) int64
        pos, end = step * self.batch_size, (step + 1) * self.batch_size
        parts = []
        while pos < end:
            epoch, off = divmod(pos, self.n)
            take = min(self.n - off, end - pos)
            parts.append(self.perm(epoch)[off:off + take])
            pos += take
        return torch.cat(parts)


class StepStream(IterableDataset):
    """Infinite stream of training batch specs ``make(s)`` for s = start, start+1, ...; ``start()`` is read when
    the iterator is created (not at the first ``next``), which is when Lightning has restored ``global_step``."""

    def __init__(self, start: Callable[[], int], make: Callable[[int], dict[str, Any]]):
        self.start, self.make = start, make

    def __iter__(self) -> Iterator[dict[str, Any]]:
        first = int(self.start())

        def steps() -> Iterator[dict[str, Any]]:
            s = first
            while True:
                yield self.make(s)
                s += 1

        return steps()


def shard(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Rank ``rank``'s contiguous slice of a batch spec: every tensor whose first dim is the batch is split."""
    if world == 1:
        return spec
    rows = spec["index"] if "index" in spec else spec["offset"]
    b = len(rows)
    return {k: v.tensor_split(world)[rank] if isinstance(v, torch.Tensor) and v.dim() and len(v) == b else v
            for k, v in spec.items()}


class StepDataModule(L.LightningDataModule):
    """Base of the vision and text modules (see the module docstring for the contract)."""

    def __init__(self, cfg, seed: int = 0, start_step: int = 0):
        super().__init__()
        self.cfg, self.seed = cfg, int(seed)
        self.start_step = start_step  # where a train iterator starts when no trainer is attached
        self.samples_per_step: float = float(cfg.batch_size)
        self._ready = False
        self._on_device: dict[tuple[str, str], torch.Tensor] = {}

    # ---------------------------------------------------------------- subclasses implement these
    def _load(self) -> None:  # fill the CPU tensors and the public attributes
        raise NotImplementedError

    def train_spec(self, step: int) -> dict[str, Any]:
        """The batch spec of training step ``step`` (CPU tensors: indices/offsets and augmentation draws)."""
        raise NotImplementedError

    def eval_specs(self, split: str = "val") -> list[dict[str, Any]]:
        """The batch specs of the validation (``"val"``) or test (``"test"``) split, in order."""
        raise NotImplementedError

    def val_specs(self) -> list[dict[str, Any]]:
        """The validation batch specs, in order."""
        return self.eval_specs("val")

    def _build(self, spec: dict[str, Any]) -> Any:  # spec on device -> batch on device
        raise NotImplementedError

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if not self._ready:  # idempotent: train() calls it before the Trainer does
            with cache.data_setup():  # a sweep worker keeps the tensors of its last data set-ups (cache.py)
                self._load()
            self._check_batch_size()
            self._ready = True

    def _check_batch_size(self) -> None:
        """A batch drawn without replacement (``EpochSampler``) larger than the training set would repeat examples
        within one batch: refuse it before training, naming the sizes."""
        n = getattr(self, "num_train", None)
        if getattr(self, "sampler", None) is not None and n is not None and self.cfg.batch_size > n:
            from ..errors import ConfigError

            raise ConfigError(f"data.batch_size={self.cfg.batch_size} is larger than the {n} training examples of "
                              f"data.source={self.cfg.source!r} (data.train_limit={self.cfg.train_limit}); each batch "
                              f"would repeat examples: lower data.batch_size or use more data")

    def _start(self) -> int:
        trainer = self.trainer
        return trainer.global_step if trainer is not None else self.start_step

    def ranks(self) -> tuple[int, int]:
        """(this rank, number of ranks) of the attached trainer; (0, 1) without one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def rank_train_spec(self, step: int) -> dict[str, Any]:
        """This rank's slice of the training batch spec of ``step``."""
        return shard(self.train_spec(step), *self.ranks())

    def train_dataloader(self) -> DataLoader:
        self.setup()
        # A private generator: a DataLoader iterator otherwise draws its base seed from the global RNG, so
        # creating one on resume (or at each validation) would shift dropout/noise draws -> inexact resume.
        return DataLoader(StepStream(self._start, self.rank_train_spec), batch_size=None, num_workers=0,
                          generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self.ranks()
        return DataLoader([shard(s, rank, world) for s in self.val_specs()], batch_size=None, shuffle=False,
                          num_workers=0)

    eval_split = "test"  # the split Lightning's test loop evaluates (normablate.evaluate may set "val")

    def test_dataloader(self) -> DataLoader:
        """The test split's batches (evaluated once, at the end of a run: ``normablate.evaluate``)."""
        self.setup()
        rank, world = self.ranks()
        return DataLoader([shard(s, rank, world) for s in self.eval_specs(self.eval_split)], batch_size=None,
                          shuffle=False, num_workers=0)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        if isinstance(batch, dict) and batch.get("kind") in ("train", "val", "test"):
            return self._build(batch)
        return batch

    # ---------------------------------------------------------------- without a trainer
    def train_batch(self, step: int, device: str | torch.device = "cpu") -> Any:
        """The training batch of global step ``step`` on ``device`` (what ``training_step`` receives)."""
        self.setup()
        return self._build(_to(self.train_spec(step), device))

    def rank_train_batch(self, step: int, device: str | torch.device = "cpu") -> Any:
        """This rank's slice of the training batch of ``step`` (what ``training_step`` receives under DDP)."""
        self.setup()
        return self._build(_to(self.rank_train_spec(step), device))

    def val_batches(self, device: str | torch.device = "cpu", split: str = "val") -> Iterator[Any]:
        """The validation (or ``split="test"``) batches, in order, on ``device``."""
        self.setup()
        for spec in self.eval_specs(split):
            yield self._build(_to(spec, device))

    # ---------------------------------------------------------------- helpers
    def on_device(self, name: str, device: torch.device) -> torch.Tensor:
        """CPU tensor ``self.<name>`` moved to ``device`` once and memoized."""
        key = (name, str(device))
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(device)
        return self._on_device[key]


def _to(spec: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in spec.items()}
