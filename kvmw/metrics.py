"""Prometheus metrics of a store, in a registry of its own.

Each store gets its own `CollectorRegistry` (two engines in one process never
share counters). Counters are read from the store's and tiers' plain counters
at scrape time (one source of truth, no double bookkeeping on the hot path);
only latency is observed as it happens, into a histogram.
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_TIER_COUNTERS = {
    "hits": "Blobs a tier returned",
    "misses": "Lookups a tier could not answer",
    "puts": "Blobs written to a tier",
    "bytes_read": "Bytes a tier returned",
    "bytes_written": "Bytes written to a tier",
    "evictions": "Blobs a tier evicted for capacity",
    "rejected": "Blobs larger than the whole tier",
    "corrupt": "Corrupt or foreign blobs dropped from a tier",
}
_STORE_COUNTERS = {
    "hits": "Lookups answered by some tier",
    "misses": "Lookups no tier answered",
    "corrupt": "Corrupt blobs dropped",
    "foreign": "Blobs of another model dropped",
    "tier_errors": "Tier calls that failed",
    "key_errors": "Tier calls refused for one key (the tier stayed in use)",
    "dropped_writes": "Write-throughs dropped because the queue was full",
}


class HasStats(Protocol):
    def stats(self) -> dict[str, Any]: ...

    def add_latency_observer(self, fn: Any) -> None: ...


class _StoreCollector:
    def __init__(self, store: HasStats) -> None:
        self.store = store

    def collect(self):  # type: ignore[no-untyped-def]
        st = self.store.stats()
        for name, doc in _STORE_COUNTERS.items():
            c = CounterMetricFamily(f"kvmw_store_{name}", doc)
            c.add_metric([], st.get(name, 0))
            yield c
        depth = GaugeMetricFamily("kvmw_write_queue_depth", "Write-throughs waiting")
        depth.add_metric([], st.get("write_queue_depth", 0))
        yield depth
        tiers = st.get("tiers", {})
        for name, doc in _TIER_COUNTERS.items():
            c = CounterMetricFamily(f"kvmw_tier_{name}", doc, labels=["tier"])
            for tier, ts in tiers.items():
                c.add_metric([tier], ts.get(name, 0))
            yield c
        used = GaugeMetricFamily("kvmw_tier_bytes", "Bytes a tier holds", labels=["tier"])
        cap = GaugeMetricFamily("kvmw_tier_capacity_bytes", "Capacity of a tier (0: unbounded)",
                                labels=["tier"])
        healthy = GaugeMetricFamily("kvmw_tier_healthy", "1 while a tier answers", labels=["tier"])
        for tier, ts in tiers.items():
            used.add_metric([tier], ts.get("used", 0))
            cap.add_metric([tier], ts.get("capacity", 0))
            healthy.add_metric([tier], 1.0 if ts.get("healthy", True) else 0.0)
        yield used
        yield cap
        yield healthy


def counters_collector(prefix: str, counts: dict[str, int], doc: str) -> Any:
    """A collector exporting a live ``{name: count}`` dict as ``<prefix>_<name>_total``."""

    class _Counts:
        def collect(self):  # type: ignore[no-untyped-def]
            for name, value in list(counts.items()):
                c = CounterMetricFamily(f"{prefix}_{name}", f"{doc}: {name}")
                c.add_metric([], value)
                yield c

    return _Counts()


class StoreMetrics:
    """Registry + latency histogram for one store. ``text()`` is the /metrics body."""

    def __init__(self, store: HasStats) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StoreCollector(store))
        self.latency = Histogram(
            "kvmw_tier_op_seconds", "Latency of successful tier operations",
            ["tier", "op"], registry=self.registry,
            buckets=(1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
        )
        store.add_latency_observer(lambda tier, op, s: self.latency.labels(tier, op).observe(s))

    def text(self) -> bytes:
        return generate_latest(self.registry)
