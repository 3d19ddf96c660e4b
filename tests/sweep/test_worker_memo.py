"""A sweep worker keeps the decoded data of its last data set-ups in memory (``normablate.data.cache``): a later
trial on the same data reads no cache file and computes no channel statistics again, trains bit-identically, and
never writes into the shared tensors; memory stays bounded; off by default (``normablate train`` is unaffected)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from normablate.config import DataConfig, load_config
from normablate.data import cache, vision
from normablate.sweep import runner
from normablate.sweep.dryrun import train as dry_train
from support.helpers import dm_for, png


@pytest.fixture(autouse=True)
def _memo_off():
    """Every test starts and ends with the memo off and empty (it is process-wide)."""
    cache.keep_in_memory(0)
    yield
    cache.keep_in_memory(0)


@pytest.fixture
def counted(monkeypatch):
    """Counts of cache-file reads (``cache.load``) and channel-statistics computations."""
    n = {"load": 0, "stats": 0}
    load, stats = cache.load, vision.channel_stats

    def counting_load(path):
        n["load"] += 1
        return load(path)

    def counting_stats(x):
        n["stats"] += 1
        return stats(x)

    monkeypatch.setattr(cache, "load", counting_load)
    monkeypatch.setattr(vision, "channel_stats", counting_stats)
    return n


def _table(n: int, seed: int, size: int = 16) -> pa.Table:
    rng = np.random.default_rng(seed)
    imgs = [png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return pa.table({"img": pa.array(imgs, pa.binary()), "label": pa.array(np.arange(n) % 4, pa.int64())})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A tiny parquet image source with train and test splits (16x16 RGB, 4 classes)."""
    root = tmp_path_factory.mktemp("images")
    pq.write_table(_table(96, 0), root / "train.parquet")
    pq.write_table(_table(32, 1), root / "test.parquet")
    return root


@pytest.fixture(scope="module")
def one_split(tmp_path_factory) -> Path:
    """A single parquet file: validation is a held-out random subset."""
    path = tmp_path_factory.mktemp("one") / "rows.parquet"
    pq.write_table(_table(60, 2), path)
    return path


def same_batches(a, b, steps=(0, 1, 7)) -> bool:
    pairs = [(a.train_batch(s), b.train_batch(s)) for s in steps] + list(zip(a.val_batches(), b.val_batches()))
    return all(torch.equal(x, y) for p, q in pairs for x, y in zip(p, q) if x is not None)


# ------------------------------------------------------------------------------------------ the data layer
def test_off_by_default_every_setup_reads_the_file(images, tmp_path, counted):
    cfg = DataConfig(source=str(images), batch_size=8, val_batch_size=16, cache_dir=str(tmp_path))
    dm_for(cfg)  # decodes and writes the cache files
    reads = counted["load"]
    dm_for(cfg)
    assert counted["load"] == 2 * reads and counted["stats"] == 2 and cache.memo_files() == []


def test_second_setup_reads_no_file_and_gives_the_same_data(images, tmp_path, counted):
    cfg = DataConfig(source=str(images), batch_size=8, val_batch_size=16, augment=True, cache_dir=str(tmp_path))
    off = dm_for(cfg, seed=3)  # the reference: memo off
    cache.keep_in_memory(2)
    first = dm_for(cfg, seed=3)
    reads, stats = counted["load"], counted["stats"]
    again = dm_for(cfg, seed=3)
    assert (counted["load"], counted["stats"]) == (reads, stats)  # no file read, no statistics computed
    assert again.cache_hits == {"train": True, "val": True, "test": True}
    assert again.train_x is first.train_x  # the same tensors, shared
    assert torch.equal(again.mean, off.mean) and torch.equal(again.std, off.std) and again.mean is not first.mean
    assert torch.equal(again.train_x, off.train_x) and torch.equal(again.val_y, off.val_y)
    assert same_batches(again, off)  # crop + flip + normalization: bit-identical
    # a different seed or batch size on the same data still hits (the key is the cache file's)
    other = dm_for(replace(cfg, batch_size=4), seed=5)
    assert counted["load"] == reads and other.train_x is first.train_x


def test_holdout_and_synthetic_limits_are_kept_per_subset(one_split, tmp_path, counted):
    cfg = DataConfig(source=str(one_split), batch_size=8, val_batch_size=8, val_fraction=0.25, cache_dir=str(tmp_path))
    off = dm_for(cfg)
    cache.keep_in_memory(2)
    first = dm_for(cfg)
    reads, stats = counted["load"], counted["stats"]
    again = dm_for(cfg)
    assert (counted["load"], counted["stats"]) == (reads, stats) and again.train_x is first.train_x
    assert torch.equal(again.train_x, off.train_x) and torch.equal(again.val_x, off.val_x)
    assert torch.equal(again.mean, off.mean) and same_batches(again, off)
    # another subset of the training rows: its own cache entry (only those rows are decoded) and statistics
    limited = dm_for(replace(cfg, train_limit=20))
    assert counted["load"] == reads + 1 and counted["stats"] == stats + 1
    assert torch.equal(limited.train_x, off.train_x[:20])
    assert torch.equal(limited.mean, vision.channel_stats(off.train_x[:20])[0])


def test_memory_is_bounded_by_data_setups(images, tmp_path, counted):
    base = DataConfig(source=str(images), batch_size=8, val_batch_size=16, cache_dir=str(tmp_path))
    cfgs = [replace(base, train_limit=n) for n in (40, 50, 60)]  # three data configs: three train cache files
    cache.keep_in_memory(1)
    dm_for(cfgs[0])
    files_0 = set(cache.memo_files())
    assert len(files_0) == 4  # split sizes, train rows, validation rows (held out of train), test rows
    dm_for(cfgs[1])
    assert len(cache.memo_files()) == 4 and files_0 - set(cache.memo_files())  # the first train file dropped
    cache.keep_in_memory(2)
    dm_for(cfgs[2])
    assert len(cache.memo_files()) == 5  # the last two set-ups: 2 train files + the shared val, test and split files
    reads = counted["load"]
    dm_for(cfgs[1])
    assert counted["load"] == reads  # still kept
    dm_for(cfgs[0])
    assert counted["load"] == reads + 1  # was dropped: its train file is read again
    cache.keep_in_memory(0)
    assert cache.memo_files() == []


def test_text_is_kept_too(tmp_path, counted):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"paragraph {i}: " + "some words " * (i % 7 + 1) for i in range(200)))
    cfg = DataConfig(source=str(path), mode="samples", batch_size=8, val_batch_size=8, block_size=32,
                     cache_dir=str(tmp_path / "cache"))
    off = dm_for(cfg, "lm")
    cache.keep_in_memory(2)
    dm_for(cfg, "lm")
    reads = counted["load"]
    again = dm_for(cfg, "lm")
    assert counted["load"] == reads and again.cache_hits["train"]
    assert torch.equal(again.train_data, off.train_data) and again.pad_fraction == off.pad_fraction
    assert same_batches(again, off)
    blocks = dm_for(replace(cfg, mode="blocks"), "lm")  # the same file in another mode: still no read
    assert counted["load"] == reads and torch.equal(blocks.train_data, off.train_data)


# ------------------------------------------------------------------------------------------ training runs
def _run_cfg(tmp_path: Path, images: Path, run: str):
    return load_config(None, [
        "model.backbone=resnet20", "model.width=8", "model.norm=bn", f"data.source={images}", "data.batch_size=16",
        "data.val_batch_size=16", "data.augment=true", f"data.cache_dir={tmp_path / 'cache'}", "optim.name=adamw",
        "optim.lr=3e-3", "trainer.max_steps=6", "trainer.val_every=3", "trainer.progress=false",
        f"trainer.log_dir={tmp_path / 'logs'}", "experiment=memo", f"run={run}"])


def test_second_run_in_a_process_is_bit_identical_and_reads_no_file(images, tmp_path, counted):
    from normablate.train import train

    ref = train(_run_cfg(tmp_path, images, "r0"))  # memo off: what `normablate train` does
    cache.keep_in_memory(2)
    first = train(_run_cfg(tmp_path, images, "r1"))
    reads, stats = counted["load"], counted["stats"]
    kept = {f: cache._MEMO.entries[f]["payload"] for f in cache.memo_files()}
    snapshot = {f: {k: v.clone() for k, v in p.items() if isinstance(v, torch.Tensor)} for f, p in kept.items()}
    second = train(_run_cfg(tmp_path, images, "r2"))
    assert (counted["load"], counted["stats"]) == (reads, stats)  # the second run read no cache file
    for r in (first, second):
        assert r.final == ref.final and r.best == ref.best
        assert r.history["train/loss"] == ref.history["train/loss"]
    for f, p in kept.items():  # the shared tensors are unchanged after two runs used them (nothing writes in place)
        assert all(torch.equal(p[k], v) for k, v in snapshot[f].items())
        assert all(torch.equal(v, torch.load(f, weights_only=True)[k]) for k, v in snapshot[f].items())


def test_sweep_worker_keeps_data_while_it_works(images, tmp_path, counted, monkeypatch):
    """``Sweep.work`` turns the memo on for its trials and off (emptied) afterwards."""
    seen = []

    def trainer(cfg, callbacks=None, resume=False):
        dm_for(cfg.data)
        seen.append((cache._MEMO.keep, counted["load"]))
        return dry_train(cfg, callbacks=callbacks, resume=resume)

    monkeypatch.setattr(runner, "load_trainer", lambda path: trainer)
    spec = {"kind": "grid", "study_name": "memo", "log_dir": str(tmp_path / "logs"),
            "trainer_fn": "normablate.sweep.dryrun:train", "heartbeat": {"interval": 1, "grace": 6},
            "base": {"model": {"backbone": "resnet20", "width": 8},
                     "data": {"source": str(images), "batch_size": 16, "cache_dir": str(tmp_path / "cache")},
                     "trainer": {"max_steps": 4, "val_every": 2}},
            "grid": {"seed": [0, 1, 2]}}
    res = runner.run_sweep(spec, verbose=False)
    assert res.exit_code == 0 and res.counts.done == 3
    assert [keep for keep, _ in seen] == [runner.DATA_MEMO] * 3
    reads = [n for _, n in seen]
    assert reads[0] > 0 and reads[1] == reads[2] == reads[0]  # only the first trial read the cache files
    assert cache._MEMO.keep == 0 and cache.memo_files() == []
