"""On-disk cache of decoded tensors: decode once, ``torch.load`` afterwards.

Contract: ``cached(kind, key, build, cache_dir)`` returns ``build()``'s dict of tensors (and plain values), reading
it from ``<cache_dir>/<kind>-<hash(key)>.pt`` when present and writing it there atomically (temp file + rename)
otherwise. ``key`` is a JSON-able dict naming everything the content depends on: the source fingerprint
(resolved path + file sizes/mtimes, or the hub name), the split, the column names and the limit. A cache file
that cannot be read is rebuilt, never trusted.

Integrity: beside each ``X.pt`` lies ``X.pt.sha256``, the SHA-256 of the file's bytes, written before the data file
is renamed into place. ``load`` hashes the file (about 1 s per GB) and rebuilds it when the hash is missing or
differs: a byte flipped on disk, without any change of size, would otherwise train silently on garbage.

Cache directory: ``cfg.cache_dir``, else ``$NORMABLATE_CACHE``, else ``~/.cache/normablate``.

In-process memo (off by default; a sweep worker turns it on with ``keep_in_memory(2)`` for its trials):
``cached`` then also keeps each payload in memory under its cache file, and a later data set-up of the same
process that asks for the same key gets the same tensors without reading (and hashing) the file again;
``derived`` keeps values computed from a kept payload (channel statistics, a hold-out gather) with it.
Memory is bounded by data set-ups, not files: a payload is dropped once ``keep`` later set-ups
(``StepDataModule.setup``, each inside ``data_setup()``) did not use it, so a worker holds the tensors of
at most its last ``keep`` data configs (CIFAR-10: ~180 MB each, mostly the page cache of the memory-mapped
file). The kept tensors are shared by the runs: nothing may write into them in place (the data modules only
index, which copies). Results are bit-identical with the memo on or off: the same file gives the same tensors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout of cached payloads changes: old files are then simply not found


def cache_root(cache_dir: str | None = None) -> Path:
    """Where decoded tensors live: the argument, ``$NORMABLATE_CACHE`` or ``~/.cache/normablate``."""
    root = cache_dir or os.environ.get("NORMABLATE_CACHE") or Path.home() / ".cache" / "normablate"
    return Path(root).expanduser()


def fingerprint(path: Path) -> dict[str, Any]:
    """Identity of a local file or directory: absolute path + (relative name, size, mtime) of every file."""
    path = path.expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return {"path": str(path), "files": len(files), "stat": h.hexdigest()}


def key_file(kind: str, key: dict[str, Any], cache_dir: str | None = None) -> Path:
    blob = json.dumps({"format": FORMAT, "kind": kind, **key}, sort_keys=True, default=str)
    return cache_root(cache_dir) / f"{kind}-{hashlib.sha1(blob.encode()).hexdigest()[:20]}.pt"


def hash_file(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def hash_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load(path: Path) -> dict[str, Any] | None:
    """The cached payload at ``path``, or None when absent, unreadable or not matching its stored hash."""
    if not path.is_file():
        return None
    try:
        expected = hash_path(path).read_text().strip()
    except OSError:
        log.warning("ignoring data cache file %s: no integrity hash beside it (rebuilding)", path)
        return None
    if hash_file(path) != expected:
        log.warning("ignoring data cache file %s: its content does not match its SHA-256 (corrupt; rebuilding)", path)
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or from an incompatible version: rebuild
        log.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old file, no file, or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        digest = hash_file(Path(tmp))
        hfd, htmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".sha.tmp")
        with os.fdopen(hfd, "w") as f:
            f.write(digest + "\n")
        os.replace(htmp, hash_path(path))  # the hash first: a data file never appears without its hash
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Memo:
    """Payloads kept in this process, by cache file, with the number of the data set-up that last used each."""

    def __init__(self) -> None:
        self.keep = 0  # data set-ups whose payloads are kept; 0: off
        self.setup = 0  # number of the current (or last) data set-up
        self.entries: dict[str, dict[str, Any]] = {}  # file -> {"payload", "derived", "used"}

    def prune(self) -> None:
        for f in [f for f, e in self.entries.items() if e["used"] <= self.setup - self.keep]:
            del self.entries[f]


_MEMO = _Memo()


def keep_in_memory(setups: int) -> int:
    """Keep the payloads of the last ``setups`` data set-ups of this process in memory (0: off, the default, and
    drop what is kept). Returns the previous value, to restore it."""
    previous, _MEMO.keep = _MEMO.keep, max(0, int(setups))
    _MEMO.prune()
    return previous


def memo_files() -> list[str]:
    """The cache files whose payloads this process keeps in memory now (oldest use first)."""
    return sorted(_MEMO.entries, key=lambda f: _MEMO.entries[f]["used"])


@contextmanager
def data_setup() -> Iterator[None]:
    """One data set-up (``StepDataModule.setup``): the payloads it uses count as used now; afterwards those not
    used by the last ``keep`` set-ups are dropped."""
    _MEMO.setup += 1
    try:
        yield
    finally:
        _MEMO.prune()


def derived(cache_file: str, key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept with the in-memory payload of ``cache_file`` under ``key`` (a tuple naming everything
    else the value depends on) while that payload is kept; just ``compute()`` when it is not."""
    entry = _MEMO.entries.get(cache_file)
    if entry is None:
        return compute()
    if key not in entry["derived"]:
        entry["derived"][key] = compute()
    return entry["derived"][key]


def cached(kind: str, key: dict[str, Any], build: Callable[[], dict[str, Any]],
           cache_dir: str | None = None) -> dict[str, Any]:
    """``build()`` memoized on disk under ``key``; ``payload["_cache_hit"]`` tells whether the file (or, with
    ``keep_in_memory``, this process's copy of it: then ``payload["_memo_hit"]`` is True) was used."""
    path = key_file(kind, key, cache_dir)
    file = str(path)
    entry = _MEMO.entries.get(file) if _MEMO.keep else None
    if entry is not None:
        entry["used"] = _MEMO.setup
        log.debug("data cache hit in memory %s", path)
        return {**entry["payload"], "_cache_hit": True, "_memo_hit": True, "_cache_file": file}
    payload = load(path)
    hit = payload is not None
    if hit:
        log.debug("data cache hit %s", path)
    else:
        payload = build()
        try:
            save(path, {**payload, "_key": json.dumps(key, sort_keys=True, default=str)})
        except OSError as e:  # a read-only cache must not stop a run
            log.warning("could not write data cache %s (%s)", path, e)
    if _MEMO.keep:
        _MEMO.entries[file] = {"payload": payload, "derived": {}, "used": _MEMO.setup}
    return {**payload, "_cache_hit": hit, "_memo_hit": False, "_cache_file": file}
