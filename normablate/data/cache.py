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
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
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


def cached(kind: str, key: dict[str, Any], build: Callable[[], dict[str, Any]],
           cache_dir: str | None = None) -> dict[str, Any]:
    """``build()`` memoized on disk under ``key``; ``payload["_cache_hit"]`` tells whether the file was used."""
    path = key_file(kind, key, cache_dir)
    payload = load(path)
    if payload is not None:
        log.debug("data cache hit %s", path)
        return {**payload, "_cache_hit": True, "_cache_file": str(path)}
    payload = build()
    try:
        save(path, {**payload, "_key": json.dumps(key, sort_keys=True, default=str)})
    except OSError as e:  # a read-only cache must not stop a run
        log.warning("could not write data cache %s (%s)", path, e)
    return {**payload, "_cache_hit": False, "_cache_file": str(path)}
