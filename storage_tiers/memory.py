"""CPU tier (host memory) and GPU tier (device memory), bounded in bytes.

The CPU tier keeps a reference to the blob it is given (no copy on put or get):
blobs are immutable once framed, so sharing is safe and a hit costs nothing but
the index update. The GPU tier copies blobs into device memory so hot chunks
can be decoded on the device without a host round trip.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from kvmw.storage_tiers.base import BytesLike, CapacityIndex, Tier
from kvmw.storage_tiers.policies import make_policy


class CPUTier(Tier):
    name = "cpu"
    in_memory = True

    def __init__(self, capacity: int, policy: str = "lru") -> None:
        super().__init__(capacity)
        self._index = CapacityIndex(capacity, make_policy(policy))
        self._data: dict[str, Any] = {}

    def put(self, key: str, blob: BytesLike, cost: float = 1.0) -> bool:
        return self._put(key, blob, len(blob) if type(blob) is bytes else memoryview(blob).nbytes, cost)

    def _put(self, key: str, stored: Any, size: int, cost: float) -> bool:
        """Holds `stored` (the blob itself here; the GPU tier's device copy) as `size` bytes."""
        index = self._index
        with index.lock:
            victims = index.make_room(key, size)
            if victims is None:
                self.counters.rejected += 1
                return False
            data = self._data
            for v in victims:
                del data[v]
            data[key] = stored
            index.add(key, size, cost)
            counters = self.counters
            counters.puts += 1
            counters.bytes_written += size
        if victims:
            self._evicted(victims)
        return True

    def get(self, key: str) -> BytesLike | None:
        # the hot path of every hit (kvmw serve's GET): the index's and counters' updates
        # are written out here rather than through touch/_hit (a call each)
        index = self._index
        with index.lock:
            stored = self._data.get(key)
            if stored is None:
                self.counters.misses += 1
                return None
            index.policy.access(key)
            counters = self.counters
            counters.hits += 1
            counters.bytes_read += index.sizes[key]
        return stored

    def contains(self, keys: Sequence[str]) -> list[bool]:
        with self._index.lock:
            return [k in self._data for k in keys]

    def delete(self, key: str) -> None:
        with self._index.lock:
            if self._index.remove(key):
                del self._data[key]

    def entries(self) -> Iterator[tuple[str, int]]:
        with self._index.lock:
            return iter(list(self._index.sizes.items()))

    def used_bytes(self) -> int:
        return self._index.used

    def close(self) -> None:
        with self._index.lock:
            self._data.clear()
            self._index = CapacityIndex(self.capacity, self._index.policy.__class__())


class GPUTier(CPUTier):
    """Device-memory tier. `get` returns host bytes; `get_device` the device buffer."""

    name = "gpu"

    def __init__(self, capacity: int, policy: str = "lru", device: str = "cuda") -> None:
        import torch

        if not torch.cuda.is_available():
            from kvmw.errors import TierError

            raise TierError("GPU tier needs CUDA; none is available on this machine")
        super().__init__(capacity, policy)
        self.device = torch.device(device)

    def put(self, key: str, blob: BytesLike, cost: float = 1.0) -> bool:
        import torch

        view = memoryview(blob)
        host = torch.frombuffer(bytearray(blob) if view.readonly else blob, dtype=torch.uint8)
        return self._put(key, host.to(self.device, non_blocking=False), view.nbytes, cost)

    def get(self, key: str) -> BytesLike | None:
        stored = super().get(key)
        return None if stored is None else memoryview(stored.cpu().numpy())

    def get_device(self, key: str) -> Any:
        with self._index.lock:
            stored = self._data.get(key)
            if stored is not None:
                self._index.touch(key)
            return stored
