"""Host allocator tuning for processes kvmw owns (bench, demo, server).

With glibc defaults every buffer >= 32 MiB is a fresh mmap, and filling it
page-faults at ~1.2-2 GB/s on our machines, several times slower than memcpy.
Raising the mmap and trim thresholds lets freed big buffers be reused from the
heap (~8-12 GB/s). This is process-wide, so the library never does it on import:
entry points call `tune_allocator()`, and engines can opt in the same way or
with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_state = {"tuned": False}


def tune_allocator(threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap/trim thresholds; False where glibc is not the allocator."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, min(threshold, 1 << 30))) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
    _state["tuned"] = _state["tuned"] or ok
    return ok


def allocator_setting() -> str:
    """What the benches print so every figure says which allocator it ran under."""
    if _state["tuned"]:
        return "glibc mmap/trim thresholds raised (kvmw.memory.tune_allocator)"
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
    return "glibc defaults (fresh >=32 MiB buffers page-fault)"
