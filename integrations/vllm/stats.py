"""kvmw's figures where vLLM reports connector stats: its log line and its ``/metrics``.

vLLM asks each connector for `get_kv_connector_stats()` every step, in the worker
process (sent back with the model output) and in the scheduler process; it
aggregates the two, ships the payload to the API server process, and there
rebuilds it with `KVMWConnector.build_kv_connector_stats` (for the periodic
"KV Transfer metrics" log line) and feeds it to the `KVMWPromMetrics` that
`build_prom_metrics` made (for ``/metrics``).

The payload is a flat ``{name: number}`` dict of increments since the previous
report (plain str keys and numbers: it crosses processes through vLLM's
serializer). Per-tier figures are named ``name|tier`` (``tier_seconds|tier|op``
for time spent in tier calls). Each process reports only what it counts:
lookups in the scheduler, loads, stores and tier traffic in the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

#: unlabelled counters: payload name -> help text
COUNTERS = {
    "lookups": "Prompt lookups kvmw answered (scheduler)",
    "lookup_timeouts": "Lookups whose remote tiers did not answer within lookup_timeout (scheduler)",
    "hit_tokens": "Prompt tokens kvmw reported as cached beyond vLLM's own hit (scheduler)",
    "chunks_loaded": "Chunks kvmw wrote into vLLM's pages",
    "tokens_loaded": "Tokens kvmw wrote into vLLM's pages",
    "load_failures": "Loads that ended early (missing, corrupt or unreachable chunk); vLLM recomputed the rest",
    "async_loads": "Loads read off the step, finished in a later one (some chunk only on a remote tier)",
    "loads_given_up": "Asynchronous loads still reading at load_timeout; vLLM recomputed them",
    "async_fetch_seconds": "Seconds asynchronous loads spent reading the tiers (off the step)",
    "blocks_recomputed": "Blocks reported to vLLM as not loaded",
    "chunks_stored": "Chunks kvmw encoded and stored",
    "dropped_saves": "Chunks not stored because the background saver's queue was full",
    "load_seconds": "Seconds the worker's steps spent fetching, decoding and writing chunks (synchronous loads)",
    "save_seconds": "Seconds the worker's steps spent copying completed chunks out of the pages",
    "store_seconds": "Seconds the background saver spent encoding and storing chunks (off the step)",
    "blends": "RAG prompts whose documents kvmw blended into vLLM's pages",
    "blend_documents_loaded": "Stored documents the blends reused",
    "blend_tokens_recomputed": "Tokens the blends ran through every layer (selected document tokens, text between)",
    "documents_computed": "Documents seen for the first time, computed after their context and stored",
    "blend_failures": "Blends whose documents did not all load (vLLM recomputed from the first that did not)",
    "blend_seconds": "Seconds the worker's steps spent blending (load, probe, recompute, page writes, new documents)",
}
#: counters labelled by tier: payload name -> help text
TIER_COUNTERS = {
    "tier_hits": "Blobs a tier returned",
    "tier_misses": "Reads a tier could not answer",
    "tier_puts": "Blobs written to a tier",
    "tier_bytes_read": "Bytes a tier returned",
    "tier_bytes_written": "Bytes written to a tier",
}
TIER_SECONDS = "tier_seconds"


@dataclass
class KVMWConnectorStats(KVConnectorStats):
    """Increments since the last report; `aggregate` sums them."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class Increments:
    """Turns cumulative counters into what changed since the last `take`."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def take(self, current: dict[str, float]) -> KVMWConnectorStats | None:
        delta = {k: v - self._last.get(k, 0) for k, v in current.items() if v != self._last.get(k, 0)}
        self._last = dict(current)
        return KVMWConnectorStats(delta) if delta else None


class KVMWPromMetrics(KVConnectorPromMetrics):
    """``kvmw:*`` counters in vLLM's ``/metrics``, with vLLM's engine labels
    (``kvmw:tier_hits_total{engine="0",model_name=...,tier="disk"}``)."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._plain = {name: self._counter_cls(name=f"kvmw:{name}", documentation=doc, labelnames=labelnames)
                       for name, doc in COUNTERS.items()}
        self._tier = {name: self._counter_cls(name=f"kvmw:{name}", documentation=doc,
                                              labelnames=labelnames + ["tier"])
                      for name, doc in TIER_COUNTERS.items()}
        for engine in per_engine_labelvalues.values():  # exported at 0 from the start
            for counter in self._plain.values():
                counter.labels(*engine)
        self._seconds = self._counter_cls(name=f"kvmw:{TIER_SECONDS}",
                                          documentation="Seconds spent in successful tier calls",
                                          labelnames=labelnames + ["tier", "op"])

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        engine = self.per_engine_labelvalues[engine_idx]
        for key, value in transfer_stats_data.items():
            if value <= 0:
                continue
            name, *labels = key.split("|")
            if name in self._plain and not labels:
                self._plain[name].labels(*engine).inc(value)
            elif name in self._tier and len(labels) == 1:
                self._tier[name].labels(*engine, *labels).inc(value)
            elif name == TIER_SECONDS and len(labels) == 2:
                self._seconds.labels(*engine, *labels).inc(value)
