"""Data layer: real CIFAR-10 / Tiny Shakespeare from ../shared/data, embedded synthetic data, local formats, errors.

Everything runs on the CPU without a Trainer, through the same hooks Lightning calls
(``train_dataloader`` -> ``on_after_batch_transfer``); ``train_batch(step)`` is that path for one step.
"""
from __future__ import annotations

import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from normablate.config import DataConfig
from normablate.data import TextDataModule, VisionDataModule, build_datamodule, synthetic, vision
from normablate.data.vision import crop_flip
from normablate.errors import ConfigError
from support.helpers import dm_for, png

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # as conftest.SHARED_DATA


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def first_spec(dm, start: int):
    dm.start_step = start
    return next(iter(dm.train_dataloader()))


def same(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ CIFAR-10
@pytest.fixture(scope="module")
def cifar_cfg(cache_dir):
    if not (SHARED / "cifar10").exists():  # every CIFAR test goes through here, so all of them skip cleanly
        pytest.skip("../shared/data/cifar10 is absent")
    return DataConfig(source=str(SHARED / "cifar10"), batch_size=100, val_batch_size=100, train_limit=512, val_limit=256, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def cifar(cifar_cfg):
    if not SHARED.exists():
        pytest.skip("../shared/data is absent")
    return dm_for(cifar_cfg)


def test_cifar_matches_parquet(shared_data, cifar):
    """Three splits: train and validation are disjoint parts of the training split (positions [0, 45000) and
    [45000, 50000) of a fixed, seed-independent permutation); test is the source's test split, in order."""
    dm = cifar
    assert dm.train_x.shape == (512, 3, 32, 32) and dm.train_x.dtype == torch.uint8
    assert dm.val_x.shape == (256, 3, 32, 32) and dm.train_y.dtype == torch.int64
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.num_train, dm.num_val) == (10, 3, 32, 512, 256)
    assert dm.num_test == 10_000  # no test_limit
    assert dm.class_names[:2] == ["airplane", "automobile"] and dm.samples_per_step == 100
    order = vision.holdout_order(50_000)
    train_table = pq.read_table(shared_data / "cifar10" / "train.parquet")
    test_table = pq.read_table(shared_data / "cifar10" / "test.parquet")
    rows = {"train": (train_table, order[:512]), "val": (train_table, order[45_000:45_256]),
            "test": (test_table, torch.arange(10_000))}
    for role, (table, idx) in rows.items():
        x, y = getattr(dm, f"{role}_x"), getattr(dm, f"{role}_y")
        assert y.tolist() == table.column("label").take(idx.numpy()).to_pylist(), role
        for i in (0, 17, len(y) - 1):
            ref = np.array(Image.open(io.BytesIO(table.column("img")[int(idx[i])]["bytes"].as_py())).convert("RGB"))
            assert torch.equal(x[i].permute(1, 2, 0), torch.from_numpy(ref)), (role, i)
    # the validation images never reach training, whatever the limit: the held-out positions are disjoint
    assert not set(order[:45_000].tolist()) & set(order[45_000:].tolist())
    assert len(set(order.tolist())) == 50_000 and torch.equal(order, vision.holdout_order(50_000))


def test_cifar_second_load_uses_cache(cifar, cifar_cfg, monkeypatch):
    assert {p.name.split("-")[0] for p in Path(cifar_cfg.cache_dir).glob("*.pt")} >= {"images", "splits"}
    monkeypatch.setattr(vision, "decode_images", lambda *a, **k: pytest.fail("decoded again"))
    dm = dm_for(cifar_cfg)
    assert dm.cache_hits == {"train": True, "val": True, "test": True}
    assert torch.equal(dm.train_x, cifar.train_x) and torch.equal(dm.val_y, cifar.val_y)


def test_crop_flip_semantics():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).view(2, 3, 32, 32) % 250 + 1  # no zero pixel
    centre = torch.full((2, 2), 4)
    assert torch.equal(crop_flip(x, centre, torch.tensor([False, False])), x)
    assert torch.equal(crop_flip(x, centre, torch.tensor([True, False]))[0], x[0].flip(-1))
    out = crop_flip(x, torch.tensor([[0, 8], [8, 0]]), torch.tensor([False, False]))
    assert (out[0, :, :4] == 0).all() and (out[0, :, :, -4:] == 0).all()  # shifted down / left: zero borders
    assert torch.equal(out[0, :, 4:, :-4], x[0, :, :-4, 4:])
    assert torch.equal(out[1, :, :-4, 4:], x[1, :, 4:, :-4])


def test_cifar_augmentation_on_device_batches(cifar, cifar_cfg):
    plain = dm_for(replace(cifar_cfg, augment=False))
    x5, y5 = cifar.train_batch(5)
    assert x5.shape == (100, 3, 32, 32) and x5.dtype == torch.float32 and y5.dtype == torch.int64
    assert same(cifar.train_batch(5), (x5, y5))  # a function of (seed, step)
    assert not torch.equal(cifar.train_batch(6)[0], x5)
    px5, py5 = plain.train_batch(5)
    assert torch.equal(py5, y5)  # augmentation never changes which examples
    changed = (px5 != x5).flatten(1).any(1).float().mean()
    assert changed > 0.8  # crops (P = 80/81) and flips happen
    spec = cifar.train_spec(5)
    flipped_only = ((spec["shift"] == 4).all(1) & spec["flip"]).nonzero().flatten()
    for i in flipped_only:
        assert torch.equal(x5[i], px5[i].flip(-1))
    assert not torch.equal(build_datamodule(cifar_cfg, "classification", 1).train_batch(5)[0], x5)  # seed


def test_cifar_resume_and_epoch(cifar):
    dm = cifar
    it = iter(dm.train_dataloader())  # start_step 0
    specs = [next(it) for _ in range(7)]
    batches = [dm.on_after_batch_transfer(s, 0) for s in specs]
    resumed = dm.on_after_batch_transfer(first_spec(dm, 5), 0)  # what a resumed run at global_step 5 sees
    dm.start_step = 0
    assert same(resumed, batches[5]) and same(batches[5], dm.train_batch(5))
    # 512 examples, batches of 100: steps 0..4 + 12 of step 5 are epoch 0, a permutation of all examples
    idx = torch.cat([s["index"] for s in specs])
    assert sorted(idx[:512].tolist()) == list(range(512))
    assert sorted(idx[512:700].tolist()) == sorted(set(idx[512:700].tolist()))  # epoch 1 repeats nothing yet
    assert not torch.equal(idx[:188], idx[512:700])  # a new permutation per epoch


def test_cifar_validation_and_normalisation(cifar, cifar_cfg):
    vb = list(cifar.val_batches())
    assert [len(y) for _, y in vb] == [100, 100, 56]
    assert same(vb[0], next(iter(cifar.val_batches())))
    order = torch.cat([s["index"] for s in cifar.val_specs()])
    assert sorted(order.tolist()) == list(range(len(cifar.val_y)))  # every example once, in a fixed mixed order
    assert not torch.equal(order, torch.arange(len(order)))
    assert torch.equal(torch.cat([y for _, y in vb]), cifar.val_y[order])
    full = dm_for(replace(cifar_cfg, augment=False, batch_size=512))
    x, _ = full.train_batch(0)  # one batch = the whole (limited) train split
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-3)


def test_cifar_errors(cifar_cfg):
    with pytest.raises(ConfigError, match=r"'validation'.*available splits: train, test"):
        dm_for(replace(cifar_cfg, val_split="validation"))
    with pytest.raises(ConfigError, match=r"'pixels'.*columns: img, label"):
        dm_for(replace(cifar_cfg, image_key="pixels", train_limit=7))
    with pytest.raises(ConfigError, match=r"cifar100' does not exist.*cifar10/.*did you mean"):
        dm_for(replace(cifar_cfg, source=cifar_cfg.source + "0"))


# ------------------------------------------------------------------------------------------ local formats
def _tiny_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def test_imagefolder(tmp_path, cache_dir):
    root = tmp_path / "folder"
    want = {}
    for split, n in (("train", 6), ("test", 4)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i, arr in enumerate(_tiny_images(n // 2, len(want.get(split, ())) + n)):
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
                want.setdefault(split, set()).add((arr.tobytes(), c))
    dm = dm_for(DataConfig(source=str(root), batch_size=4, val_batch_size=3, cache_dir=cache_dir))
    # validation: 10% of the 6 training images (at least 1), held out; test: the test folder
    assert (dm.num_classes, dm.class_names, dm.image_size) == (2, ["cat", "dog"], 8)
    assert (dm.num_train, dm.num_val, dm.num_test) == (5, 1, 4)

    def images(role):
        x, y = getattr(dm, f"{role}_x"), getattr(dm, f"{role}_y")
        return {(x[i].permute(1, 2, 0).numpy().tobytes(), dm.class_names[y[i]]) for i in range(len(y))}

    assert images("train") | images("val") == want["train"] and not images("train") & images("val")
    assert images("test") == want["test"]
    assert dm.train_batch(3)[0].shape == (4, 3, 8, 8)


def test_save_to_disk_single_parquet_and_hub(tmp_path, cache_dir, monkeypatch):
    import datasets

    arrays = _tiny_images(10, 0)
    feats = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "labels": [i % 3 for i in range(10)]},
                                    features=feats)
    dd = datasets.DatasetDict({"train": ds.select(range(7)), "validation": ds.select(range(7, 10))})
    dd.save_to_disk(str(tmp_path / "disk"))
    cfg = DataConfig(source=str(tmp_path / "disk"), test_split="validation", batch_size=4, cache_dir=cache_dir)
    dm = dm_for(cfg)  # no split named "test": the "validation" split is the test set, validation is held out
    assert (dm.num_train, dm.num_val, dm.num_test, dm.num_classes, dm.class_names) == (6, 1, 3, 3, ["a", "b", "c"])
    assert torch.equal(dm.test_x[0].permute(1, 2, 0), torch.from_numpy(arrays[7]))
    assert sorted(dm.train_y.tolist() + dm.val_y.tolist()) == sorted(i % 3 for i in range(7))
    with pytest.raises(ConfigError, match=r"data.test_split='test'.*no split 'test'.*train, validation"):
        dm_for(replace(cfg, test_split="test"))
    with pytest.raises(ConfigError, match=r"data.val_split and data.test_split both name split 'validation'"):
        dm_for(replace(cfg, val_split="validation"))

    # one parquet file, sorted by label: fixed random val_fraction and test_fraction parts are held out (not the
    # tail, whose classes the training split would never see); the three partition the rows, images keep labels
    pq.write_table(pa.table({"img": [{"bytes": png(a), "path": None} for a in arrays], "label": list(range(10))}),
                   tmp_path / "one.parquet")
    one = replace(cfg, source=str(tmp_path / "one.parquet"), test_split="test", val_fraction=0.2, test_fraction=0.3)
    dm = dm_for(one)
    assert (len(dm.val_y), len(dm.test_y)) == (2, 3)
    assert sorted(dm.train_y.tolist() + dm.val_y.tolist() + dm.test_y.tolist()) == list(range(10))
    assert dm.test_y.tolist() != [7, 8, 9]
    for role in ("val", "test"):
        for j, label in enumerate(getattr(dm, f"{role}_y").tolist()):
            assert torch.equal(getattr(dm, f"{role}_x")[j].permute(1, 2, 0), torch.from_numpy(arrays[label]))
    again = dm_for(one)
    assert again.val_y.tolist() == dm.val_y.tolist() and again.test_y.tolist() == dm.test_y.tolist()  # fixed

    # a hub name goes to datasets.load_dataset(name)
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: calls.append(name) or dd)
    from normablate.data import sources

    monkeypatch.setattr(sources, "check_hub_reachable", lambda name: None)  # the simulated hub is always reachable
    dm = dm_for(replace(cfg, source="someone/tiny-images"))
    assert calls == ["someone/tiny-images"] and (dm.num_val, dm.num_test) == (1, 3)

    text = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["= Title =", "", "a line", "x"] * 5}),
                                 "test": datasets.Dataset.from_dict({"text": ["one more line", "and another"]})})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: calls.append((name, *a)) or text)
    dm = dm_for(replace(cfg, source="wikitext", hub_config="wikitext-2-raw-v1", mode="samples", test_split="test",
                        block_size=8), "lm")
    # validation: the last 2 of the 20 training rows ("a line", "x"); samples under 2 bytes ("", "x") dropped
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1") and (dm.num_train, dm.num_val, dm.num_test) == (9, 1, 2)
    idx, targets, mask = list(dm.val_batches(split="test"))[0]
    assert bytes(idx[0, :8].tolist()) == b"one more" and bytes(targets[0, :8].tolist()) == b"ne more "

    def offline(name, *a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"'cifar10'.*hub.*no network"):
        dm_for(replace(cfg, source="cifar10"))


# ------------------------------------------------------------------------------------------ text
@pytest.fixture(scope="module")
def shakespeare(cache_dir):
    path = SHARED / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip("../shared/data is absent")
    return path, DataConfig(source=str(path), batch_size=16, val_batch_size=64, block_size=64, cache_dir=cache_dir)


def test_shakespeare_blocks(shared_data, shakespeare):
    path, cfg = shakespeare
    raw = path.read_bytes()
    dm = dm_for(cfg, "lm")
    assert dm.vocab_size == 256 and dm.samples_per_step == 16 * 64 and dm.pad_fraction == 0
    train, val, test = (bytes(getattr(dm, f"{r}_data").tolist()) for r in ("train", "val", "test"))
    # three contiguous segments train | val | test, each about 10% held out, cut at paragraph boundaries
    assert raw.startswith(train) and raw.endswith(test) and 0.09 < len(test) / len(raw) < 0.11
    v0 = raw.find(val, len(train))
    assert v0 > len(train) and v0 + len(val) < len(raw) - len(test) and 0.09 < len(val) / len(raw) < 0.11
    assert b"\n\n" in raw[len(train):v0].replace(b" ", b"")  # cut at a paragraph boundary
    assert b"\n\n" in raw[v0 + len(val):len(raw) - len(test)].replace(b" ", b"")
    idx, targets, mask = dm.train_batch(3)
    assert idx.shape == targets.shape == (16, 64) and idx.dtype == targets.dtype == torch.int64 and mask is None
    assert torch.equal(idx[:, 1:], targets[:, :-1])
    for row in range(3):  # each row is a window of the training text, targets one byte ahead
        start = train.find(bytes(idx[row].tolist()))
        assert start >= 0 and train[start + 1:start + 65] == bytes(targets[row].tolist())
    vb = list(dm.val_batches())
    assert sum(len(b[0]) for b in vb) == dm.num_val == (len(val) - 1) // 64
    assert bytes(vb[0][0][1].tolist()) == val[64:128] and bytes(vb[0][1][1].tolist()) == val[65:129]
    resumed = dm.on_after_batch_transfer(first_spec(dm, 9), 0)
    assert same(resumed, dm.train_batch(9)) and not same(dm.train_batch(10), dm.train_batch(9))
    capped = dm_for(replace(cfg, val_limit=10), "lm")
    assert capped.num_val == 10 and sum(len(b[0]) for b in capped.val_batches()) == 10


def test_shakespeare_samples(shared_data, shakespeare):
    path, cfg = shakespeare
    dm = dm_for(replace(cfg, mode="samples"), "lm")
    paras = [p.strip() for p in re.split(r"\n\s*\n", path.read_text()) if p.strip()]
    first = bytes(dm.train_data[dm.train_starts[0]:dm.train_starts[0] + dm.train_lens[0]].tolist())
    assert first == paras[0].encode()[:65] and first.startswith(b"First Citizen:\nBefore we proceed")
    assert dm.num_train + dm.num_val + dm.num_test == len([p for p in paras if len(p) >= 2])
    idx, targets, mask = dm.train_batch(4)
    B, T = idx.shape
    assert B == 16 and T <= 64 and mask.dtype == torch.bool and targets.shape == mask.shape == (B, T)
    n = mask.sum(1)
    assert len(set(n.tolist())) > 3 and n.max() == T  # lengths vary; padded to the longest
    assert torch.equal(mask, torch.arange(T)[None] < n[:, None])  # right padding: mask is a prefix
    assert torch.equal(targets == -100, ~mask) and (idx[~mask] == 0).all()
    spec = dm.train_spec(4)
    for b in range(B):  # every row is its sample: inputs = bytes[:-1], targets = bytes[1:]
        s, L = dm.train_starts[spec["index"][b]], dm.train_lens[spec["index"][b]]
        sample = dm.train_data[s:s + L].long()
        assert L == n[b] + 1 and torch.equal(idx[b, :L - 1], sample[:-1]) and torch.equal(targets[b, :L - 1], sample[1:])
    assert 0.1 < dm.pad_fraction < 0.9 and dm.samples_per_step < 16 * 64
    assert same(dm.on_after_batch_transfer(first_spec(dm, 4), 0), (idx, targets, mask))
    vb = list(dm.val_batches())
    assert sum(len(b[0]) for b in vb) == dm.num_val and same(vb[0], next(iter(dm.val_batches())))
    assert torch.equal(vb[0][2][0, : dm.val_lens[0] - 1], torch.ones(dm.val_lens[0] - 1, dtype=torch.bool))
    with pytest.raises(ConfigError, match=r"'training'.*available splits: train"):
        dm_for(replace(cfg, train_split="training"), "lm")


# ------------------------------------------------------------------------------------------ synthetic
def test_synthetic_images(cache_dir, tmp_path):
    a, b = synthetic.images(300, seed=5), synthetic.images(300, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(synthetic.images(300, seed=6)[0], a[0])
    dm = dm_for(DataConfig(source="synthetic", batch_size=64, cache_dir=cache_dir))
    # validation: a fixed 10% of the 20,000 training images; test: the embedded test split
    assert (dm.num_train, dm.num_val, dm.num_test, dm.num_classes, dm.image_size) == (18_000, 2_000, 2_000, 10, 32)
    assert dm.test_y.bincount().tolist() == [200] * 10
    assert (dm.train_y.bincount() + dm.val_y.bincount()).tolist() == [2000] * 10
    assert dm.train_x.min() == 0 and dm.train_x.max() == 255
    per_image = dm.train_x[:2000].float()
    assert per_image.std((1, 2, 3)).max() / per_image.std((1, 2, 3)).min() > 5  # contrast varies a lot
    assert per_image.mean((1, 2, 3)).std() > 30  # so does brightness
    again = dm_for(DataConfig(source="synthetic", batch_size=64, train_limit=100, cache_dir=cache_dir))
    assert again.cache_hits["train"] and torch.equal(again.train_x, dm.train_x[:100])


def test_synthetic_text(cache_dir):
    assert synthetic.text(num_bytes=20_000) == synthetic.text(num_bytes=20_000)
    assert synthetic.text().startswith(synthetic.text(num_bytes=20_000).rstrip("\n"))
    cfg = DataConfig(source="synthetic", mode="samples", batch_size=32, block_size=128, cache_dir=cache_dir)
    dm = dm_for(cfg, "lm")
    assert isinstance(dm, TextDataModule) and 1_000_000 < dm.num_train_tokens + dm.num_val_tokens < 2_000_000
    lens = dm.train_lens
    assert lens.min() < 20 and lens.max() == 129 and (lens == 129).float().mean() < 0.5
    assert dm.pad_fraction > 0.3
    assert dm.train_data.max() < 128  # ASCII
    assert same(dm.train_batch(2), dm_for(cfg, "lm").train_batch(2))
    idx, targets, _ = dm_for(replace(cfg, mode="blocks"), "lm").train_batch(0)
    assert idx.shape == (32, 128) and torch.equal(idx[:, 1:], targets[:, :-1])


def test_bad_inputs(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"unknown task 'segmentation'; valid: classification, lm"):
        build_datamodule(DataConfig(), "segmentation", 0)
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(ConfigError, match=r"does not exist.*holds: notes\.md"):
        dm_for(DataConfig(source=str(tmp_path / "missing" / "data.parquet"), cache_dir=cache_dir))
    with pytest.raises(ConfigError, match=r"holds no \*\.parquet files or images.*notes\.md"):
        dm_for(DataConfig(source=str(tmp_path), cache_dir=cache_dir))
    with pytest.raises(ConfigError, match=r"data.val_split='valid'.*synthetic.*train, test"):
        dm_for(DataConfig(source="synthetic", val_split="valid", cache_dir=cache_dir))
    (tmp_path / "rows.parquet").write_bytes(b"")
    pq.write_table(pa.table({"content": ["a b c", "d e f"] * 10}), tmp_path / "rows.parquet")
    with pytest.raises(ConfigError, match=r"no text column.*columns: content; set data.text_key"):
        dm_for(DataConfig(source=str(tmp_path / "rows.parquet"), cache_dir=cache_dir), "lm")
    dm = dm_for(DataConfig(source=str(tmp_path / "rows.parquet"), text_key="content", mode="samples",
                           cache_dir=cache_dir, val_fraction=0.1, batch_size=8), "lm")  # a batch fits in 18 rows
    assert (dm.num_train, dm.num_val, dm.num_test) == (16, 2, 2)  # contiguous rows: train | val | test
    assert isinstance(build_datamodule(DataConfig(), "classification", 0), VisionDataModule)
