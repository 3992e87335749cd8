"""The scheduler's questions to remote tiers, asked off its step.

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
answers again (a hanging remote must not cost every scheduler call `wait`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout


class RemoteLookups:
    """`contains(keys) -> [bool]` asks the remote tiers (one round trip per tier)."""

    def __init__(self, contains: Callable[[list[str]], list[bool]], timeout: float, wait: float = 0.005) -> None:
        self.contains = contains
        self.timeout = timeout
        self.wait = wait
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
            if not self._stalled:
                try:
                    future.result(timeout=self.wait)
                except FutureTimeout:
                    pass
                except Exception:  # answered below
                    pass
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

    def forget(self, req_id: str) -> None:
        self._jobs.pop(req_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
