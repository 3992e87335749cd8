"""What every bench shares: timing, tables, JSON output, real KV to measure with."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def median_seconds(fn: Callable[[], Any], repeat: int, setup: Callable[[], Any] | None = None,
                   warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeat` runs (`setup` runs untimed before each)."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def drop_page_cache(path: str | os.PathLike) -> None:
    """Evict a file, or every file under a folder, from the page cache (cold reads)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def machine() -> dict[str, Any]:
    """What a result was measured on (every bench's JSON and figure carry it)."""
    return {"cpus": len(os.sched_getaffinity(0)), "cpu_model": _cpu_model(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_json(path: str | os.PathLike | None, data: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True))
    print(f"wrote {path}")


def real_kv(model_name: str, num_tokens: int = 0, nbytes: int = 0,
            dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, str]:
    """KV of essay text from a real model (canonical layout, `dtype`) and its fingerprint.

    Give `num_tokens`, or `nbytes` to get just enough tokens for that many KV bytes.
    """
    from kvmw.fingerprint import ModelFingerprint
    from kvmw.integrations.hf.capture import capture_kv
    from kvmw.integrations.hf.models import load
    from kvmw.text_data import essay_text

    model, tok = load(model_name)
    fp = ModelFingerprint.from_hf(model)
    if nbytes:
        per_token = fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim * torch.empty((), dtype=dtype).element_size()
        num_tokens = -(-nbytes // per_token)
    ids = tok(essay_text(num_tokens * 8), return_tensors="pt").input_ids[0, :num_tokens]
    return capture_kv(model, ids).to(dtype), fp.digest
