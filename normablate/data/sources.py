"""Where data comes from: a hub name, a local path, and the tables behind each split.

Contract: ``locate(source, modality)`` (``"images"`` or ``"text"``) turns ``cfg.source`` into a ``Source`` cheaply (no data read): it checks that a
local path exists (``ConfigError`` naming it and listing what the nearest existing directory holds) and computes
the cache identity ``Source.key``. ``Source.splits()`` opens it (this may read or download) and returns
``{split: Split}``; a ``Split`` lists its columns and reads them into a ``pyarrow.Table``.

Kinds of source (checked in this order):
- an existing ``*.parquet`` file                     -> one split, "train"
- a directory written by ``save_to_disk``            -> ``datasets.load_from_disk``
- a directory holding ``*.parquet`` files            -> splits from the file names, HF rules (train.parquet,
                                                       test-00000-of-00001.parquet, validation/0.parquet, ...)
- a directory holding ``*.txt`` files (text)         -> the same split rules
- a directory holding images (vision)                -> ``load_dataset("imagefolder", data_dir=...)``
- an existing text file (text)                       -> read by ``text.py`` (one split)
- anything else that does not look like a path       -> ``datasets.load_dataset(name[, cfg.hub_config])`` from
                                                       the hub (cached tensors are keyed by name and config, so
                                                       a cached run never contacts the hub)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError, did_you_mean
from .cache import cache_root, fingerprint

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PATH_EXTS = {".parquet", ".txt", ".arrow", ".json", ".jsonl", ".csv", ".md"}


def listing(path: Path, limit: int = 20) -> str:
    """A short listing of a directory for error messages."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "(empty)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else with a path shape is a (missing) local path."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
            or Path(source).suffix.lower() in PATH_EXTS)


def missing_path(source: str) -> ConfigError:
    p = Path(source).expanduser().absolute()
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    names = [c.name for c in parent.iterdir()] if parent.is_dir() else []
    return ConfigError(f"data.source path {source!r} does not exist; {str(parent)!r} holds: {listing(parent)}"
                       + did_you_mean(p.name, names, lambda h: repr(str(parent / h))))


# ------------------------------------------------------------------------------------------ splits
@dataclass
class Split:
    """One split of a table-like source."""
    name: str
    columns: list[str]
    num_rows: int
    class_names: dict[str, list[str]]  # column -> ClassLabel names, where the source declares them
    _read: Any = field(repr=False)  # (columns, limit) -> pa.Table

    def read(self, columns: list[str], limit: int | None = None) -> pa.Table:
        return self._read(columns, limit)


def _parquet_split(name: str, files: list[str]) -> Split:
    schema = pq.read_schema(files[0])
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    class_names = {}
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:  # datasets writes its Features (ClassLabel names) into the parquet metadata
        feats = json.loads(meta).get("info", {}).get("features", {})
        class_names = {k: v["names"] for k, v in feats.items()
                       if isinstance(v, dict) and v.get("_type") == "ClassLabel" and "names" in v}

    def read(columns: list[str], limit: int | None) -> pa.Table:
        batches, left = [], limit
        for f in files:
            pf = pq.ParquetFile(f)
            if left is None:
                batches.extend(pf.read(columns=columns).to_batches())
                continue
            for b in pf.iter_batches(batch_size=min(max(left, 1), 65536), columns=columns):
                batches.append(b.slice(0, left))
                left -= batches[-1].num_rows
                if left <= 0:
                    break
            if left <= 0:
                break
        return pa.Table.from_batches(batches) if batches else schema.empty_table().select(columns)

    return Split(name, list(schema.names), rows, class_names, read)


def _dataset_split(name: str, ds) -> Split:
    from datasets import ClassLabel

    class_names = {k: v.names for k, v in ds.features.items() if isinstance(v, ClassLabel)}

    def read(columns: list[str], limit: int | None) -> pa.Table:
        sub = ds.select_columns(columns).with_format("arrow")
        return sub[: len(ds) if limit is None else min(limit, len(ds))]

    return Split(name, list(ds.column_names), len(ds), class_names, read)


def files_by_split(path: Path, exts: set[str]) -> dict[str, list[str]]:
    """HF's split-from-file-name rules (``datasets.data_files.get_data_patterns``), restricted to ``exts``."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    patterns = get_data_patterns(str(path))
    out = {}
    for split, files in DataFilesDict.from_patterns(patterns, base_path=str(path)).items():
        files = sorted(str(f) for f in files if Path(str(f)).suffix.lower() in exts)
        if files:
            out[str(split)] = files
    return out


def _has_files(path: Path, exts: set[str]) -> bool:
    return any(p.suffix.lower() in exts for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ sources
@dataclass
class Source:
    name: str  # cfg.source as given
    kind: str  # parquet_file | disk | parquet_dir | text_dir | imagefolder | text_file | hub
    path: Path | None
    key: dict[str, Any]  # cache identity
    cache_dir: str | None = None
    hub_config: str | None = None  # load_dataset(name, hub_config)
    _splits: dict[str, Split] | None = field(default=None, repr=False)

    def splits(self) -> dict[str, Split]:
        if self._splits is None:
            self._splits = self._open()
        return self._splits

    def split(self, name: str, role: str) -> Split:
        splits = self.splits()
        if name not in splits:
            raise ConfigError(f"data.{role}={name!r}: source {self.name!r} has no split {name!r}; "
                              f"available splits: {', '.join(splits)}" + did_you_mean(name, splits))
        return splits[name]

    def _open(self) -> dict[str, Split]:
        if self.kind == "parquet_file":
            return {"train": _parquet_split("train", [str(self.path)])}
        if self.kind == "parquet_dir":
            return {s: _parquet_split(s, f) for s, f in files_by_split(self.path, {".parquet"}).items()}
        if self.kind in ("text_file", "text_dir"):
            raise TypeError("text files are read by text.py, not as tables")
        import datasets

        if self.kind == "hub":
            check_hub_reachable(self.name)  # offline: one line in seconds, not half a minute of retries
        try:
            if self.kind == "disk":
                ds = datasets.load_from_disk(str(self.path))
            elif self.kind == "imagefolder":
                ds = datasets.load_dataset("imagefolder", data_dir=str(self.path),
                                           cache_dir=str(cache_root(self.cache_dir) / "hf"))
            elif self.hub_config is not None:
                ds = datasets.load_dataset(self.name, self.hub_config)
            else:
                ds = datasets.load_dataset(self.name)
        except ConfigError:
            raise
        except Exception as e:
            what = "the Hugging Face hub" if self.kind == "hub" else f"{self.kind} directory {str(self.path)!r}"
            raise ConfigError(f"data.source {self.name!r} could not be loaded from {what}: "
                              f"{type(e).__name__}: {e}".strip()) from e
        if isinstance(ds, datasets.Dataset):
            ds = datasets.DatasetDict({"train": ds})
        return {str(s): _dataset_split(str(s), d) for s, d in ds.items()}


def check_hub_reachable(name: str, timeout: float = 5.0) -> None:
    """Refuse a hub source at once when the hub cannot be reached (no network, a firewall), with the way out. Skipped
    in Hugging Face offline mode (``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``: the local HF cache serves)."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"data.source {name!r} is a Hugging Face hub name, but the hub ({endpoint}) cannot be reached "
                          f"({e.strerror or e}); download the data where there is network and point data.source at "
                          f"the local copy (a parquet folder, an image folder or a save_to_disk directory), or set "
                          f"HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache") from None


def locate(source: str, modality: str, cache_dir: str | None = None, hub_config: str | None = None) -> Source:
    """Classify ``source`` (see the module docstring) without reading data; ConfigError when it cannot be."""
    p = Path(source).expanduser()
    if p.exists():
        p = p.resolve()
        if p.is_file():
            if p.suffix.lower() == ".parquet":
                kind = "parquet_file"
            elif modality == "text":
                kind = "text_file"
            else:
                raise ConfigError(f"data.source {source!r} is a file but not a .parquet file; for images give a "
                                  "parquet file, a parquet directory, a save_to_disk directory or an image folder")
        elif (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            kind = "disk"
        elif _has_files(p, {".parquet"}):
            kind = "parquet_dir"
        elif modality == "text" and _has_files(p, {".txt"}):
            kind = "text_dir"
        elif modality == "images" and _has_files(p, IMAGE_EXTS):
            kind = "imagefolder"
        else:
            wanted = "*.txt or *.parquet files" if modality == "text" else "*.parquet files or images"
            raise ConfigError(f"data.source directory {source!r} holds no {wanted} and is no save_to_disk "
                              f"directory; it holds: {listing(p)}")
        return Source(source, kind, p, {"source": kind, **fingerprint(p)}, cache_dir)
    if _looks_like_path(source):
        raise missing_path(source)
    return Source(source, "hub", None, {"source": "hub", "name": source, "config": hub_config}, cache_dir, hub_config)


def guess_column(split: Split, given: str | None, candidates: tuple[str, ...], what: str, cfg_key: str,
                 source: str) -> str:
    """``given`` if it is a column, else the first candidate present; ConfigError listing the columns."""
    cols = split.columns
    if given is not None:
        if given not in cols:
            raise ConfigError(f"data.{cfg_key}={given!r}: no column {given!r} in split {split.name!r} of {source!r}; "
                              f"columns: {', '.join(cols)}" + did_you_mean(given, cols))
        return given
    for c in candidates:
        if c in cols:
            return c
    raise ConfigError(f"no {what} column in split {split.name!r} of {source!r} (looked for "
                      f"{', '.join(map(repr, candidates))}); columns: {', '.join(cols)}; set data.{cfg_key}")


def split_rows(src: Source) -> dict[str, int]:
    """``{split: number of rows}`` of a table-like source, memoized on disk so that a run whose tensors are all
    cached never opens the source (no hub access)."""
    from .cache import cached

    payload = cached("splits", src.key, lambda: {"rows": {s: sp.num_rows for s, sp in src.splits().items()}},
                     src.cache_dir)
    return dict(payload["rows"])


ROLES = ("train", "val", "test")


def plan_splits(name: str, rows: dict[str, int], cfg) -> dict[str, tuple[str, int, int]]:
    """Which rows serve as train, validation and test: ``{role: (split, start, stop)}``, positions in the split's
    *hold-out order* (vision: a fixed permutation of the split, the same for every run seed; text: the rows or
    bytes in order, so held-out text is contiguous). ``rows`` is ``{split: size}``.

    - train: ``cfg.train_split``.
    - test: ``cfg.test_split`` when the source has it; a source with a single split holds out its last
      ``cfg.test_fraction`` as test.
    - val: ``cfg.val_split`` when set; ``None`` (the default) holds out ``cfg.val_fraction`` of the training
      split (just before a held-out test part), so selection never sees the test set.
    A role that would share rows with another is refused, naming the keys."""
    def no_split(key: str, value: str) -> ConfigError:
        return ConfigError(f"data.{key}={value!r}: source {name!r} has no split {value!r}; available splits: "
                           f"{', '.join(rows)}" + did_you_mean(value, rows))

    train, val, test = cfg.train_split, cfg.val_split, cfg.test_split
    if train not in rows:
        raise no_split("train_split", train)
    for key, value in (("val_split", val), ("test_split", test)):
        if value is not None and value == train:
            raise ConfigError(f"data.{key}={value!r} is also data.train_split: the model would be judged on its "
                              f"training data" + ("; set data.val_split=null to hold out part of the training "
                                                  "split as validation" if key == "val_split" else ""))
    if val is not None and val == test:
        raise ConfigError(f"data.val_split and data.test_split both name split {val!r}: selection (best LR, early "
                          f"stopping, pruning) and the reported numbers would use the same data; set "
                          f"data.val_split=null to hold out part of the training split as validation")
    if val is not None and val not in rows:
        raise no_split("val_split", val)
    carve_test = test is None or test not in rows
    if carve_test and list(rows) != [train]:
        raise no_split("test_split", test) if test is not None else ConfigError(
            f"data.test_split=null: source {name!r} has several splits ({', '.join(rows)}); name the test split")
    n = rows[train]
    n_test = max(1, round(n * cfg.test_fraction)) if carve_test else 0
    n_val = max(1, round(n * cfg.val_fraction)) if val is None else 0
    if n - n_val - n_test < 1:
        raise ConfigError(f"split {train!r} of {name!r} has {n} rows: too few to hold out data.val_fraction="
                          f"{cfg.val_fraction}" + (f" and data.test_fraction={cfg.test_fraction}" if carve_test else ""))
    plan = {"train": (train, 0, n - n_val - n_test)}
    plan["val"] = (train, n - n_val - n_test, n - n_test) if val is None else (val, 0, rows[val])
    plan["test"] = (train, n - n_test, n) if carve_test else (test, 0, rows[test])
    return plan
