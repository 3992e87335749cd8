"""`kvmw inspect`: what a configured store holds, per tier."""

from __future__ import annotations

from kvmw.blob import parse_blob
from kvmw.config import KVMWConfig
from kvmw.errors import BlobError


def inspect_store(config_path: str | None, tiers: str, limit: int) -> int:
    from kvmw.bench.common import print_table
    from kvmw.storage_tiers import build_store

    overrides = {"tiers": tiers} if tiers else {}
    config = KVMWConfig.load(config_path, **overrides)
    store = build_store(config)
    try:
        summary, listing = [], []
        for tier in store.tiers:
            ok, entries = store.guarded(tier, "entries")
            if not ok:
                summary.append([tier.name, "unavailable", "-", "-", store.last_error(tier)])
                continue
            entries = list(entries)
            used = sum(size for _, size in entries)
            cap = tier.capacity or "unbounded"
            summary.append([tier.name, len(entries), used, cap, ""])
            for key, size in entries[:limit]:
                ok, blob = store.guarded(tier, "get", key)
                listing.append([tier.name, key, size, *_describe(blob if ok else None)])
        print_table(["tier", "entries", "bytes", "capacity", "note"], summary)
        print()
        if listing:
            print_table(["tier", "key", "bytes", "codec", "tokens", "dtype", "model", "positions"],
                        listing)
        st = store.stats()
        print(f"\nthis process: hits={st['hits']} misses={st['misses']} corrupt={st['corrupt']} "
              f"(hit counts are per process; a long-running store exports them on /metrics)")
    finally:
        store.close(flush_timeout=1)
    return 0


def _describe(blob) -> list[str]:
    if blob is None:
        return ["?", "?", "?", "?", "?"]
    try:
        meta = parse_blob(blob).meta
    except BlobError as e:
        return [f"BAD: {e}", "-", "-", "-", "-"]
    pos = meta.positions
    span = f"{int(pos[0])}..{int(pos[-1])}" if len(pos) else "-"
    return [meta.codec + ("+" + meta.codec_params["lossless"]["name"] if "lossless" in meta.codec_params else ""),
            str(meta.shape[2]), meta.dtype, meta.fingerprint[:12], span]
