"""Replacement policies for bounded tiers: which entry to evict next.

All three are O(log n) per operation (heaps with lazy invalidation, or an
ordered dict for LRU), so a tier holding a million small entries stays cheap.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict


class ReplacementPolicy(ABC):
    """Tracks entries of one tier; the tier calls these under its own lock."""

    @abstractmethod
    def insert(self, key: str, size: int, cost: float = 1.0) -> None: ...

    @abstractmethod
    def access(self, key: str) -> None: ...

    @abstractmethod
    def remove(self, key: str) -> None: ...

    @abstractmethod
    def victim(self) -> str | None:
        """The entry to evict next (not removed; the tier calls `evicted`)."""

    def evicted(self, key: str) -> None:
        """`key` left because of capacity pressure (vs `remove`: deleted on purpose)."""
        self.remove(key)


class LRU(ReplacementPolicy):
    """Least recently used: the default; right for prefix chains, whose reuse is recency-driven."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def insert(self, key: str, size: int, cost: float = 1.0) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self) -> str | None:
        return next(iter(self._order), None)


class _HeapPolicy(ReplacementPolicy):
    """Min-heap of (priority, tick, key) with lazy deletion of stale rows."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._current: dict[str, tuple[float, int]] = {}
        self._freq: dict[str, int] = {}
        self._meta: dict[str, tuple[int, float]] = {}  # size, cost
        self._tick = itertools.count()

    @abstractmethod
    def _priority(self, key: str) -> float: ...

    def _push(self, key: str) -> None:
        entry = (self._priority(key), next(self._tick))
        self._current[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        if len(self._heap) > 4 * len(self._current) + 64:  # compact stale rows
            self._heap = [(p, t, k) for k, (p, t) in self._current.items()]
            heapq.heapify(self._heap)

    def insert(self, key: str, size: int, cost: float = 1.0) -> None:
        self._freq[key] = self._freq.get(key, 0) + 1
        self._meta[key] = (max(size, 1), cost)
        self._push(key)

    def access(self, key: str) -> None:
        if key in self._current:
            self._freq[key] += 1
            self._push(key)

    def remove(self, key: str) -> None:
        self._current.pop(key, None)
        self._freq.pop(key, None)
        self._meta.pop(key, None)

    def victim(self) -> str | None:
        while self._heap:
            p, t, key = self._heap[0]
            if self._current.get(key) == (p, t):
                return key
            heapq.heappop(self._heap)
        return None


class LFU(_HeapPolicy):
    """Least frequently used, oldest first among equals."""

    def _priority(self, key: str) -> float:
        return float(self._freq[key])


class PGDSF(_HeapPolicy):
    """Prefix-aware Greedy-Dual-Size-Frequency (RAGCache, Jin et al. 2024, arXiv:2404.12457).

    priority = clock + frequency * recompute_cost / size; evicting an entry
    advances the clock to its priority, so long-idle entries age out even when
    they were once hot. `cost` is what a miss would cost to recompute (e.g.
    prefill seconds or tokens); without it the policy is GDSF by size.
    """

    def __init__(self) -> None:
        super().__init__()
        self._clock = 0.0

    def _priority(self, key: str) -> float:
        size, cost = self._meta[key]
        return self._clock + self._freq[key] * cost / size

    def evicted(self, key: str) -> None:
        entry = self._current.get(key)
        if entry is not None:
            self._clock = max(self._clock, entry[0])
        self.remove(key)


POLICIES: dict[str, type[ReplacementPolicy]] = {"lru": LRU, "lfu": LFU, "pgdsf": PGDSF}


def make_policy(name: str) -> ReplacementPolicy:
    try:
        return POLICIES[name.lower()]()
    except KeyError:
        from kvmw.errors import ConfigError

        raise ConfigError(f"unknown replacement policy {name!r}; known {sorted(POLICIES)}") from None
