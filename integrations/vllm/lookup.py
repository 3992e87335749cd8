"""The scheduler's view of what is stored: the workers' reports, and remote tiers asked off its step.

`WorkerIndex`: when the worker runs in another process (vLLM's default layout)
its CPU and disk tiers are invisible to the scheduler, so the worker reports
what they hold (everything at start, then each step what it stored and what
they evicted) and the scheduler keeps that set, bounded, to answer the local
part of a lookup. A chunk the index still lists after the worker lost it is
promised, fails to load and is recomputed: never wrong KV, only lost time.

`RemoteLookups`:
vLLM's scheduler asks `get_num_new_matched_tokens` for every waiting request on
its own thread, between model steps. Local tiers (the CPU tier's index, the disk
tier's in-memory index, the workers' reports) answer in microseconds; a remote
tier (Redis, a kvmw server) costs a round trip, and up to its socket timeout when
it hangs. So the remote part of a lookup runs on a thread of its own:

- a healthy remote answers within `wait` (a loopback round trip is ~0.1 ms) and
  the request is admitted in the same scheduler call;
- otherwise the lookup answers "not yet" (vLLM's ``None``: the request stays
  waiting, others are scheduled) and is asked again on later steps;
- past `timeout` it answers "no remote hit": the request goes on with what the
  local tiers hold, so a dead or slow remote costs it at most `timeout`.

After a lookup timed out, later lookups do not wait synchronously until one
answers again (a hanging remote must not cost every scheduler call `wait`), and
the synchronous waits of one scheduler step together never pass `wait`
(`new_step` starts a step's budget): many new requests cost a step at most one
wait, not one each.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout


#: keys the scheduler remembers of the workers' reports (~45 MB of index at most)
INDEX_MAX_KEYS = 1 << 18


class WorkerIndex:
    """Keys a worker's own tiers hold, as it reported them; the least recently
    reported or found go first past `max_keys`."""

    def __init__(self, max_keys: int = INDEX_MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add(self, keys: Iterable[str]) -> None:
        for k in keys:
            self._keys[k] = None
            self._keys.move_to_end(k)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def discard(self, keys: Iterable[str]) -> None:
        for k in keys:
            self._keys.pop(k, None)

    def leading(self, keys: list[str]) -> int:
        """How many leading `keys` are listed (those found count as recently used)."""
        n = 0
        for k in keys:
            if k not in self._keys:
                break
            self._keys.move_to_end(k)
            n += 1
        return n


class RemoteLookups:
    """`contains(keys) -> [bool]` asks the remote tiers (one round trip per tier)."""

    def __init__(self, contains: Callable[[list[str]], list[bool]], timeout: float, wait: float = 0.005) -> None:
        self.contains = contains
        self.timeout = timeout
        self.wait = wait
        self._budget = wait
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvmw-lookup")
        self._jobs: dict[str, tuple[Future[list[bool]], float]] = {}
        self._stalled = False
        #: lookups answered in time / given up on at their deadline
        self.answered = self.timed_out = 0

    def leading(self, req_id: str, keys: list[str]) -> int | None:
        """How many leading `keys` the remote tiers hold, or None while they have not
        answered and the deadline has not passed."""
        job = self._jobs.get(req_id)
        if job is None:
            future = self._pool.submit(self.contains, keys)
            job = self._jobs[req_id] = (future, time.monotonic() + self.timeout)
            if not self._stalled and self._budget > 0:
                t0 = time.monotonic()
                try:
                    future.result(timeout=self._budget)
                except FutureTimeout:
                    pass
                except Exception:  # answered below
                    pass
                self._budget -= time.monotonic() - t0
        future, deadline = job
        if future.done():
            del self._jobs[req_id]
            self._stalled = False
            self.answered += 1
            try:
                present = future.result()
            except Exception:  # the store already turns tier failures into misses
                return 0
            n = 0
            for p in present:
                if not p:
                    break
                n += 1
            return n
        if time.monotonic() >= deadline:
            del self._jobs[req_id]
            self._stalled = True
            self.timed_out += 1
            return 0
        return None

    def wait_any(self, timeout: float) -> None:
        """Block up to `timeout` until a pending lookup is answered (vLLM's idle steps:
        see `AsyncLoader.wait`)."""
        if self._jobs:
            wait([f for f, _ in self._jobs.values()], timeout=timeout, return_when=FIRST_COMPLETED)

    def new_step(self) -> None:
        """A scheduler step begins: its synchronous waits may total `wait` again."""
        self._budget = self.wait

    def forget(self, req_id: str) -> None:
        self._jobs.pop(req_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
