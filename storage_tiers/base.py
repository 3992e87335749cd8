"""The `Tier` interface and the byte-bounded index that local tiers share.

Tiers store opaque, already-framed blobs under string keys. They do not parse
blobs: validation happens once, in `TieredStore.get`, whichever tier answered.
A tier signals failure by raising (`TierError`, `OSError`, client errors); the
store catches, marks the tier unhealthy and treats the call as a miss.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvmw.storage_tiers.policies import ReplacementPolicy, make_policy

BytesLike = Any  # bytes | bytearray | memoryview


@dataclass
class TierCounters:
    """Plain counters a tier keeps; exported by the store's Prometheus collector."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    rejected: int = 0  # blobs larger than the whole tier

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Tier(ABC):
    """One place blobs live. Thread-safe: the engine thread and the store's
    write-through thread call it concurrently."""

    name: str = "tier"
    #: reached over the network (Redis, kvmw server): a call may take up to the socket
    #: timeout, so engines never make it on their step
    remote: bool = False
    #: held in this process's memory (a put costs a dict insert): hits are promoted into
    #: it at once; other tiers get their promoted copy on the write-through thread
    in_memory: bool = False

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.counters = TierCounters()
        self._evict_observers: list[Callable[[list[str]], None]] = []

    @abstractmethod
    def put(self, key: str, blob: BytesLike, cost: float = 1.0) -> bool:
        """Store `blob` (the tier may keep a reference: callers must not mutate it).
        False when it was not stored (too large for the tier)."""

    @abstractmethod
    def get(self, key: str) -> BytesLike | None: ...

    def get_many(self, keys: Sequence[str]) -> list[BytesLike | None]:
        """`get` of each key; remote tiers answer in one round trip."""
        return [self.get(k) for k in keys]

    @abstractmethod
    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Presence of each key, in one round trip for remote tiers."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def entries(self) -> Iterator[tuple[str, int]]:
        """(key, size) of what the tier holds (for `kvmw inspect`)."""

    @abstractmethod
    def used_bytes(self) -> int: ...

    def stats(self) -> dict[str, Any]:
        return {"tier": self.name, "capacity": self.capacity, "used": self.used_bytes(),
                **self.counters.as_dict()}

    def connect(self) -> None:
        """Open what the first call would (imports, a connection) and check it answers;
        raises when it does not. Remote tiers override it; see `TieredStore.connect_remote`."""

    def close(self) -> None:
        """Release connections/handles; the tier is unusable afterwards."""

    def add_eviction_observer(self, fn: Callable[[list[str]], None]) -> None:
        """fn(keys) after the tier evicted `keys` to make room (the vLLM scheduler's
        view of what a worker holds forgets them)."""
        self._evict_observers.append(fn)

    def _evicted(self, keys: list[str]) -> None:
        self.counters.evictions += len(keys)
        for fn in self._evict_observers:
            fn(keys)

    def _hit(self, size: int) -> None:
        self.counters.hits += 1
        self.counters.bytes_read += size

    def _miss(self) -> None:
        self.counters.misses += 1


@dataclass
class CapacityIndex:
    """Sizes of entries plus a replacement policy, bounded to `capacity` bytes.

    Not locked itself: the owning tier holds `lock` around every call.
    """

    capacity: int
    policy: ReplacementPolicy = field(default_factory=lambda: make_policy("lru"))
    sizes: dict[str, int] = field(default_factory=dict)
    used: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __contains__(self, key: str) -> bool:
        return key in self.sizes

    def make_room(self, key: str, size: int) -> list[str] | None:
        """Victims to evict so `size` bytes fit (None: it can never fit).

        The victims are already dropped from the index; the tier frees their data.
        """
        if size > self.capacity:
            return None
        victims = []
        if key in self.sizes:  # overwrite: the old entry's bytes come back
            self.remove(key)
        if self.used + size <= self.capacity:  # the common case: room without a victim
            return victims
        while self.used + size > self.capacity:
            victim = self.policy.victim()
            if victim is None:
                break
            self.used -= self.sizes.pop(victim)
            self.policy.evicted(victim)
            victims.append(victim)
        return victims

    def add(self, key: str, size: int, cost: float = 1.0) -> None:
        if key in self.sizes:
            self.used -= self.sizes[key]
        self.sizes[key] = size
        self.used += size
        self.policy.insert(key, size, cost)

    def touch(self, key: str) -> None:
        self.policy.access(key)

    def remove(self, key: str) -> bool:
        size = self.sizes.pop(key, None)
        if size is None:
            return False
        self.used -= size
        self.policy.remove(key)
        return True
