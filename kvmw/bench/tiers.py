"""`kvmw bench tiers`: put/get GB/s of each tier beside the raw limit, in one process.

Blobs are real SmolLM2 KV (fp16, `none` codec) cut to ~3 MiB and ~32 MiB.
kvmw is measured the way an engine uses it: through a `TieredStore` holding the
one tier, so every get includes blob validation (header + xxh3 checksum).
Raw limits, measured on the same bytes in the same run:
- cpu: memcpy into a preallocated buffer;
- disk: write+fsync of one file / read of it with the page cache dropped
  (posix_fadvise DONTNEED) before each read, as the tier's reads are;
- redis: one redis-py SET / GET of the whole value on the same server.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from kvmw.bench.common import drop_page_cache, gbps, machine, median_seconds, print_table, real_kv, write_json
from kvmw.memory import allocator_setting, tune_allocator

SIZES = {"3MiB": 3 << 20, "32MiB": 32 << 20}


def _blobs(model: str) -> dict[str, Any]:
    from kvmw.quantizers import make_codec

    kv, fingerprint = real_kv(model, nbytes=max(SIZES.values()))
    per_token = kv[:, :, :1].numel() * kv.element_size()
    codec = make_codec("none")
    return {name: codec.encode(kv[:, :, : size // per_token].contiguous(), fingerprint)
            for name, size in SIZES.items()}


def bench_cpu(blob: Any, repeat: int) -> dict[str, float]:
    from kvmw.storage_tiers import CPUTier, TieredStore

    n = len(blob)
    dst = memoryview(bytearray(n))
    raw = median_seconds(lambda: dst.__setitem__(slice(None), blob), repeat)
    store = TieredStore([CPUTier(1 << 34)])
    put = median_seconds(lambda: store.put("k" * 32, blob), repeat)
    get = median_seconds(lambda: store.get("k" * 32), repeat)
    store.close()
    return {"put_gbps": gbps(n, put), "get_gbps": gbps(n, get), "raw_put_gbps": gbps(n, raw),
            "raw_get_gbps": gbps(n, raw)}


def bench_disk(blob: Any, repeat: int, root: Path) -> dict[str, float]:
    from kvmw.storage_tiers import DiskTier, TieredStore

    n = len(blob)
    raw_path = root / "raw.bin"

    def raw_write() -> None:
        with open(raw_path, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

    def raw_read() -> None:
        with open(raw_path, "rb", buffering=0) as f:
            f.read()

    raw_put = median_seconds(raw_write, repeat)
    raw_get = median_seconds(raw_read, repeat, setup=lambda: drop_page_cache(raw_path))
    tier = DiskTier(root / "tier", 1 << 36)
    store = TieredStore([tier])
    key = uuid.uuid4().hex
    put = median_seconds(lambda: store.put(key, blob), repeat)
    get = median_seconds(lambda: store.get(key), repeat, setup=lambda: drop_page_cache(tier.path(key)))
    store.close()
    return {"put_gbps": gbps(n, put), "get_gbps": gbps(n, get),
            "raw_put_gbps": gbps(n, raw_put), "raw_get_gbps": gbps(n, raw_get)}


def bench_redis(blob: Any, repeat: int, url: str) -> dict[str, float]:
    import redis

    from kvmw.storage_tiers import RedisTier, TieredStore

    n = len(blob)
    client = redis.Redis.from_url(url)
    raw_key = f"kvmw-bench:{uuid.uuid4().hex}"
    value = memoryview(blob)
    raw_put = median_seconds(lambda: client.set(raw_key, value), repeat)
    raw_get = median_seconds(lambda: client.get(raw_key), repeat)
    client.delete(raw_key)
    prefix = f"kvmw-bench:{uuid.uuid4().hex[:8]}:"
    tier = RedisTier(url, prefix=prefix)
    store = TieredStore([tier])
    key = uuid.uuid4().hex
    put = median_seconds(lambda: store.put(key, blob), repeat)
    get = median_seconds(lambda: store.get(key), repeat)
    tier.delete(key)
    store.close()
    client.close()
    return {"put_gbps": gbps(n, put), "get_gbps": gbps(n, get),
            "raw_put_gbps": gbps(n, raw_put), "raw_get_gbps": gbps(n, raw_get)}


TARGETS = {("cpu", "get"): 0.5, ("disk", "put"): 0.7, ("disk", "get"): 0.7,
           ("redis", "3MiB"): 0.8, ("redis", "32MiB"): 1.0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.default_allocator:
        tune_allocator()
    from kvmw.testing.redis_process import default_url

    url = args.redis_url or default_url()
    print(f"blobs: real {args.model} KV (fp16, codec none); allocator: {allocator_setting()}")
    blobs = _blobs(args.model)
    results: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvmw-bench-", dir=args.disk_dir) as tmp:
        for size, blob in blobs.items():
            repeat = args.repeat or (30 if len(blob) < 8 << 20 else 8)
            for tier in args.tiers:
                if tier == "cpu":
                    r = bench_cpu(blob, repeat)
                elif tier == "disk":
                    r = bench_disk(blob, repeat, Path(tmp))
                elif tier == "redis":
                    r = bench_redis(blob, repeat, url)
                else:
                    raise SystemExit(f"unknown tier {tier}")
                r["put_ratio"] = r["put_gbps"] / r["raw_put_gbps"]
                r["get_ratio"] = r["get_gbps"] / r["raw_get_gbps"]
                r["ratio_to_raw"] = min(r["put_ratio"], r["get_ratio"]) if tier != "cpu" else r["get_ratio"]
                r["bytes"] = len(blob)
                results.setdefault(tier, {})[size] = r
                rows.append([tier, size, r["put_gbps"], r["raw_put_gbps"], r["put_ratio"],
                             r["get_gbps"], r["raw_get_gbps"], r["get_ratio"]])
    print_table(["tier", "blob", "put GB/s", "raw put", "put x", "get GB/s", "raw get", "get x"], rows)
    print("raw: cpu=memcpy into a preallocated buffer, disk=write+fsync / cold read of one file, "
          "redis=one redis-py SET/GET; kvmw gets include checksum validation")
    out = {"tiers": results, "allocator": allocator_setting(), "model": args.model,
           "machine": machine()}
    write_json(args.json, out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="installed model (python -m kvmw.integrations.hf.models install NAME)")
    p.add_argument("--tiers", nargs="+", default=["cpu", "disk", "redis"], help="tiers measured")
    p.add_argument("--repeat", type=int, default=0, help="timed runs per cell (default 30 / 8)")
    p.add_argument("--redis-url", default="", help="Redis to measure (default: KVMW_REDIS_URL or redis://127.0.0.1:6379/0; make redis starts one)")
    p.add_argument("--disk-dir", default=None, help="folder for the disk runs (default: /tmp)")
    p.add_argument("--default-allocator", action="store_true",
                   help="keep glibc's default mmap threshold (fresh 32 MiB buffers page-fault)")
    p.add_argument("--json", default="", help="write the results here (JSON)")
