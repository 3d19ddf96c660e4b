"""glibc malloc settings that stop large CPU tensors from being mapped and unmapped at every step.

PyTorch's CPU allocator is plain ``malloc``. glibc serves a block above ``M_MMAP_THRESHOLD`` (128 KiB at start,
raised dynamically up to 32 MiB) with a fresh ``mmap`` and returns freed heap tops above ``M_TRIM_THRESHOLD`` to
the OS, so an activation of a few MiB allocated and freed every step is faulted in page by page again every step
(``resource.getrusage().ru_minflt``: thousands of minor page faults per norm call, 5-30% of a norm's time and up
to a quarter of eval throughput; ``normablate bench`` measures it). Fixing both thresholds keeps those blocks in
the heap for reuse: ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's maximum on 64-bit), ``M_TRIM_THRESHOLD`` = 1 GiB. The
cost is that up to that much freed memory stays with the process (its peak working set, needed again next step).

Applied by the CLI and by ``train()`` on Linux with glibc; a no-op elsewhere, when the user set any
``MALLOC_*_`` variable themselves (theirs wins), or with ``NORMABLATE_MALLOC=0``. Written by hand (ctypes,
``mallopt``) because the alternative, preloading jemalloc/tcmalloc, needs a system library and a re-exec.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1024 * 1024 * 1024
GLIBC_DEFAULT = 128 * 1024  # both thresholds' start values in glibc

_state = {"applied": None}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds (bytes); returns False where glibc is absent or refuses."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    if trim_threshold <= GLIBC_DEFAULT and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # back to a small heap, as a process with default settings would have
    return ok


def configure() -> bool:
    """Apply the tuned thresholds once per process (see the module docstring); returns whether they are on."""
    if _state["applied"] is None:
        user_set = any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)
        disabled = os.environ.get("NORMABLATE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off")
        _state["applied"] = False if user_set or disabled else set_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)
    return bool(_state["applied"])


__all__ = ["configure", "set_thresholds"]
