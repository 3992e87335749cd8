"""`TieredStore`: ordered tiers, promotion on hit, background write-through.

- `get` asks tiers top-down; the first valid blob is returned and promoted
  into the tiers above it: at once into in-memory tiers, through the
  write-through queue into the others (a hit never waits on a disk write or a
  network put). `fetch_many` does the same for many keys with one batched
  call per tier. Every blob is validated (header, lengths, checksum,
  model fingerprint) whichever tier it came from; a bad one is deleted from
  that tier, counted, and the search goes on (so a corrupt disk copy can still
  be answered from Redis).
- `put` writes to the top tier synchronously and queues the write to the lower
  tiers on a queue drained by one thread, bounded by blobs and by bytes (queued
  blobs stay pinned in memory after the memory tier let them go). A full queue
  drops the write and counts it: the engine never waits on disk or network.
- A write-through that was dropped (full queue) or failed (a tier down or
  refusing) leaves its key in `unwritten`; `sync` writes those keys again from
  the top tier and says which are still not in every lower tier, so a caller
  promising durability (`kvmw serve`'s KVMW.SYNC) can tell the truth. `has_room`
  lets a caller that must not drop wait for the queue instead.
- A tier that raises is marked unhealthy and skipped for a backoff that doubles
  per consecutive failure (up to 60 s); after the backoff exactly one caller
  probes it (the others keep skipping it until the probe answered). The caller
  sees a miss, never the exception. A `KeyRejectedError` (one key the tier cannot
  hold: a name too long, a value over a limit) is counted per key and leaves the
  tier healthy: one bad key must not take a tier away from every other key.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvmw.blob import parse_blob
from kvmw.errors import BlobError, ForeignModelError, KeyRejectedError
from kvmw.storage_tiers.base import BytesLike, Tier

log = logging.getLogger("kvmw.store")

MAX_BACKOFF = 60.0
#: keys remembered as not written through; past it only their count is kept (`sync` fails)
MAX_UNWRITTEN = 1 << 17
#: metrics label of a tier call (a batched read is a get)
_OP_LABEL = {"get_many": "get"}


@dataclass
class _Health:
    healthy: bool = True
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    probing: bool = False  # one caller is probing the unhealthy tier now


class TieredStore:
    def __init__(self, tiers: Sequence[Tier], write_queue: int = 64, retry_backoff: float = 1.0,
                 validate: bool = True, write_queue_bytes: int = 256 << 20,
                 track_unwritten: bool = False) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self.retry_backoff = retry_backoff
        self.validate = validate
        self._health = {id(t): _Health() for t in self.tiers}
        self.counts = {"hits": 0, "misses": 0, "corrupt": 0, "foreign": 0, "tier_errors": 0,
                       "key_errors": 0, "dropped_writes": 0, "queued_writes": 0, "superseded_writes": 0}
        self.corrupt_by_tier = {t.name: 0 for t in self.tiers}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(write_queue, 1))
        self.write_queue_bytes = write_queue_bytes
        self._queued_bytes = 0  # bytes of the blobs in the queue (under _lock)
        # key -> [newest event (put seq, or -1 after a delete), queued writes]: a queued write
        # that a newer put or a delete superseded is skipped (never resurrects a deleted key)
        self._pending: dict[str, list[int]] = {}
        self._seq = 0
        # key -> lower tiers it is not in although a put of it was acknowledged (kept only
        # with track_unwritten: a server that promises durability; engines do not need it)
        self.track_unwritten = track_unwritten
        self.unwritten: dict[str, list[Tier]] = {}
        self.unwritten_overflow = 0
        self._writer = threading.Thread(target=self._drain, name="kvmw-write-through", daemon=True)
        self._closed = False
        self._observers: list[Any] = []
        self._writer.start()

    # ---- health -----------------------------------------------------------------------
    def _available(self, tier: Tier) -> bool:
        """Healthy, or past its backoff with no probe running (this caller becomes the probe)."""
        h = self._health[id(tier)]
        if h.healthy:
            return True
        with self._lock:
            if h.healthy:
                return True
            if h.probing or time.monotonic() < h.retry_at:
                return False
            h.probing = True
            return True

    def guarded(self, tier: Tier, op: str, *args: Any) -> tuple[bool, Any]:
        """Run tier.op(*args) under the health rules: (False, None) when the tier
        is being skipped, just failed or rejected this key, else (True, result)."""
        h = self._health[id(tier)]
        if not h.healthy and not self._available(tier):
            return False, None
        t0 = time.perf_counter() if self._observers else None
        try:
            result = getattr(tier, op)(*args)
        except KeyRejectedError as e:  # the tier answered: it is up, this key is not for it
            log.debug("kvmw tier %s rejected a key: %s", tier.name, e)
            with self._lock:
                self.counts["key_errors"] += 1
            self._up(tier, h)
            return False, None
        except Exception as e:  # any tier failure is a miss, never the engine's problem
            with self._lock:
                self.counts["tier_errors"] += 1
                h.failures += 1
                backoff = min(self.retry_backoff * 2 ** (h.failures - 1), MAX_BACKOFF)
                h.retry_at = time.monotonic() + backoff
                if h.healthy:
                    log.warning("kvmw tier %s failed (%s: %s); skipping it for %.1fs",
                                tier.name, type(e).__name__, e, backoff)
                h.healthy, h.probing, h.last_error = False, False, f"{type(e).__name__}: {e}"
            return False, None
        if not h.healthy:
            self._up(tier, h)
        if t0 is not None:
            seconds = time.perf_counter() - t0
            for obs in self._observers:
                obs(tier.name, _OP_LABEL.get(op, op), seconds)
        return True, result

    def _up(self, tier: Tier, h: _Health) -> None:
        if not h.healthy:
            log.warning("kvmw tier %s is healthy again", tier.name)
            with self._lock:
                h.healthy, h.failures, h.probing = True, 0, False

    def last_error(self, tier: Tier) -> str:
        return self._health[id(tier)].last_error

    def healthy(self) -> dict[str, bool]:
        return {t.name: self._health[id(t)].healthy for t in self.tiers}

    def add_eviction_observer(self, fn: Any) -> None:
        """fn(keys) when a tier of this process (memory, disk) evicted `keys`."""
        for tier in self.tiers:
            if not tier.remote:
                tier.add_eviction_observer(fn)

    def add_latency_observer(self, fn: Any) -> None:
        """fn(tier_name, op, seconds) after each successful tier call (metrics hook)."""
        self._observers.append(fn)

    # ---- reads ------------------------------------------------------------------------
    def get(self, key: str, expected_fingerprint: str | None = None) -> BytesLike | None:
        """The blob under `key` from the fastest tier that has a valid copy, or None."""
        return self.fetch(key, expected_fingerprint)[0]

    def fetch(self, key: str, expected_fingerprint: str | None = None) -> tuple[BytesLike | None, str | None]:
        """Like `get`, plus the name of the tier that answered."""
        return self.fetch_many([key], expected_fingerprint)[0]

    def fetch_many(self, keys: Sequence[str], expected_fingerprint: str | None = None,
                   remote: bool = True) -> list[tuple[BytesLike | None, str | None]]:
        """(blob, tier name) or (None, None) per key: each tier is asked once, for the
        keys the tiers above it did not answer (one round trip for a remote tier; none
        with ``remote=False``)."""
        out: list[tuple[BytesLike | None, str | None]] = [(None, None)] * len(keys)
        todo = list(range(len(keys)))
        for i, tier in enumerate(self.tiers):
            if not todo:
                break
            if tier.remote and not remote:
                continue
            ok, blobs = self.guarded(tier, "get_many", [keys[j] for j in todo])
            if not ok:
                continue
            missing = []
            for j, blob in zip(todo, blobs):
                if blob is None or (self.validate and not self._valid(tier, keys[j], blob, expected_fingerprint)):
                    missing.append(j)
                    continue
                out[j] = (blob, tier.name)
                self._promote(keys[j], blob, self.tiers[:i])
            todo = missing
        with self._lock:
            self.counts["hits"] += len(keys) - len(todo)
            self.counts["misses"] += len(todo)
        return out

    def _promote(self, key: str, blob: BytesLike, upper: list[Tier]) -> None:
        later = []
        for tier in upper:
            if tier.in_memory:
                self.guarded(tier, "put", key, blob)
            else:
                later.append(tier)
        self._enqueue(key, blob, 1.0, later, acknowledged=False)

    def _valid(self, tier: Tier, key: str, blob: BytesLike, fingerprint: str | None) -> bool:
        try:
            parse_blob(blob, fingerprint)
            return True
        except BlobError as e:
            log.warning("kvmw dropped a bad blob %s from tier %s: %s", key, tier.name, e)
            with self._lock:
                self.counts["foreign" if isinstance(e, ForeignModelError) else "corrupt"] += 1
                self.corrupt_by_tier[tier.name] += 1
            self.guarded(tier, "delete", key)
            return False

    def contains(self, keys: Sequence[str], remote: bool | None = None) -> list[bool]:
        """Presence in any tier; one batched call (one round trip) per tier.
        `remote`: True asks only the remote tiers, False only the others, None all."""
        present = [False] * len(keys)
        for tier in self.tiers:
            if remote is not None and tier.remote != remote:
                continue
            todo = [i for i, p in enumerate(present) if not p]
            if not todo:
                break
            ok, found = self.guarded(tier, "contains", [keys[i] for i in todo])
            if ok:
                for i, f in zip(todo, found):
                    present[i] = present[i] or bool(f)
        return present

    @property
    def has_remote(self) -> bool:
        return any(t.remote for t in self.tiers)

    def prefix_hits(self, keys: Sequence[str], remote: bool | None = None) -> int:
        """How many leading keys of a prefix chain are stored somewhere (`remote` as in `contains`)."""
        n = 0
        for p in self.contains(keys, remote):
            if not p:
                break
            n += 1
        return n

    # ---- writes -----------------------------------------------------------------------
    def put(self, key: str, blob: BytesLike, cost: float = 1.0) -> bool:
        """Store in the highest healthy tier now and in the tiers below it in the
        background. False when that tier refused it and no lower write was queued,
        or every tier is down: nothing to do, the next request recomputes."""
        for i, tier in enumerate(self.tiers):
            ok, took = self.guarded(tier, "put", key, blob, cost)
            if ok:
                below = self.tiers[i + 1:]
                queued = self._enqueue(key, blob, cost, below) if below else False
                return took is not False or queued
        return False

    def _enqueue(self, key: str, blob: BytesLike, cost: float, tiers: list[Tier],
                 acknowledged: bool = True) -> bool:
        """Queue a write-through; `acknowledged`: a put's (a promotion's copy is not)."""
        if not tiers or self._closed:
            return False
        nbytes = memoryview(blob).nbytes
        with self._lock:
            # bounded by bytes too: queued blobs stay pinned after the memory tier let them go
            if not self._fits(nbytes):
                self.counts["dropped_writes"] += 1
                if acknowledged:
                    self._note_unwritten(key, tiers)
                return False
            self._queued_bytes += nbytes
            # noted before queueing, so the writer always finds the entry
            self._seq += 1
            seq = self._seq
            entry = self._pending.setdefault(key, [seq, 0])
            previous = entry[0]
            entry[0], entry[1] = seq, entry[1] + 1
        try:
            self._queue.put_nowait((key, blob, cost, tiers, seq, acknowledged))
        except queue.Full:
            with self._lock:
                self.counts["dropped_writes"] += 1
                self._queued_bytes -= nbytes
                if acknowledged:
                    self._note_unwritten(key, tiers)
                entry[1] -= 1
                if entry[0] == seq:
                    entry[0] = previous
                if entry[1] <= 0:
                    self._pending.pop(key, None)
            return False
        with self._lock:
            self.counts["queued_writes"] += 1
        return True

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                key, blob, cost, tiers, seq, acknowledged = item
                with self._lock:
                    entry = self._pending.get(key)
                    current = entry is None or entry[0] == seq
                    if not current:
                        self.counts["superseded_writes"] += 1
                failed = self._put_lower(key, blob, cost, tiers) if current else []
                with self._lock:
                    entry = self._pending.get(key)
                    deleted = entry is not None and entry[0] == -1
                    if entry is not None:
                        entry[1] -= 1
                        if entry[1] <= 0:
                            del self._pending[key]
                    if current and acknowledged and not deleted:  # a deleted key owes nothing
                        self._settle_unwritten(key, failed)
                if current and deleted:  # deleted while being written: undo the write
                    for tier in tiers:
                        self.guarded(tier, "delete", key)
                with self._lock:
                    self._queued_bytes -= memoryview(blob).nbytes
            finally:
                self._queue.task_done()

    def _put_lower(self, key: str, blob: BytesLike, cost: float, tiers: list[Tier]) -> list[Tier]:
        """Write `blob` into each tier; the tiers that did not take it."""
        return [t for t in tiers if self.guarded(t, "put", key, blob, cost) != (True, True)]

    def _settle_unwritten(self, key: str, failed: list[Tier]) -> None:
        """Under _lock: after a write-through of an acknowledged put."""
        if failed:
            self._note_unwritten(key, failed)
        else:
            self.unwritten.pop(key, None)

    def _note_unwritten(self, key: str, tiers: list[Tier]) -> None:
        """Under _lock."""
        if not self.track_unwritten:
            return
        if key in self.unwritten or len(self.unwritten) < MAX_UNWRITTEN:
            self.unwritten[key] = tiers
        else:
            self.unwritten_overflow += 1

    def _fits(self, nbytes: int) -> bool:
        """Under _lock: the byte bound has room (one blob always fits an empty queue)."""
        return not self._queued_bytes or self._queued_bytes + nbytes <= self.write_queue_bytes

    def has_room(self, nbytes: int = 0) -> bool:
        """Whether a write-through of `nbytes` would be queued now rather than dropped."""
        with self._lock:
            fits = self._fits(nbytes)
        return fits and not self._queue.full()

    def sync(self, timeout: float | None = None) -> tuple[list[str], int]:
        """Drain the queue, then write every acknowledged-but-unwritten key again from the
        top tier, now and on this thread. Returns the keys still missing from a lower tier
        (its tier down, the key refused, or the blob gone from the top tier before it was
        written) and how many more were not even remembered; these are forgotten once
        reported unless still retryable (the blob is still in the top tier)."""
        self.flush(timeout)
        with self._lock:
            todo, overflow = dict(self.unwritten), self.unwritten_overflow
            self.unwritten_overflow = 0
        failed = []
        for key, tiers in todo.items():
            ok, blob = self.guarded(self.tiers[0], "get", key)
            if not ok or blob is None:
                with self._lock:
                    if self.unwritten.get(key) is tiers:
                        del self.unwritten[key]  # lost for good: reported once
                failed.append(key)
                continue
            still = self._put_lower(key, blob, 1.0, tiers)
            with self._lock:
                if self.unwritten.get(key) is not tiers:  # deleted or written anew meanwhile
                    continue
                self._settle_unwritten(key, still)
                if still:
                    failed.append(key)
        return failed, overflow

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued write-throughs are done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def delete(self, key: str) -> None:
        with self._lock:
            if key in self._pending:
                self._pending[key][0] = -1
            self.unwritten.pop(key, None)
        for tier in self.tiers:
            self.guarded(tier, "delete", key)

    # ---- lifecycle / introspection -----------------------------------------------------
    def stats(self) -> dict[str, Any]:
        tiers = {}
        for t in self.tiers:
            h = self._health[id(t)]
            tiers[t.name] = {**t.stats(), "healthy": h.healthy,
                             "last_error": h.last_error, "corrupt": self.corrupt_by_tier[t.name]}
        return {**self.counts, "write_queue_depth": self._queue.qsize(), "write_queue_bytes": self._queued_bytes,
                "tiers": tiers}

    def connect_remote(self) -> threading.Thread | None:
        """Connect the remote tiers on a thread of their own, now: the first lookup or
        load would otherwise pay redis-py's import and a connect (tenths of a second
        on a busy machine: past the scheduler's `lookup_timeout`). A tier that does
        not answer is marked unhealthy as any failed call marks it."""
        remote = [t for t in self.tiers if t.remote]
        if not remote:
            return None
        thread = threading.Thread(target=lambda: [self.guarded(t, "connect") for t in remote],
                                  name="kvmw-connect", daemon=True)
        thread.start()
        return thread

    def close(self, flush_timeout: float = 10.0) -> None:
        if self._closed:
            return
        self.flush(flush_timeout)
        self._closed = True
        self._queue.put(None)
        self._writer.join(timeout=flush_timeout)
        for t in self.tiers:
            try:
                t.close()
            except Exception:  # closing is best effort
                pass

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
