"""Loads that finish in a later step: reading remote tiers off vLLM's step.

A chunk the scheduler found only on a remote tier (Redis, a kvmw server) costs a
network round trip to read, and up to the tier's socket timeout when it hangs.
For such requests the connector answers vLLM's lookup with ``load_kv_async``:
vLLM allocates the blocks, parks the request in ``WAITING_FOR_REMOTE_KVS`` and
goes on stepping the others; the worker reads, decodes and writes the pages here,
on threads of its own, and reports the request in ``get_finished`` once its
pages are written (vLLM schedules it on the next step).

A job is a sequence of parts (a few MiB of chunks each), and each part has two
steps: `fetch` (tier reads; may hang, so it can be given up) and `write` (decode
into the request's pages; local and short, never interrupted). The deadline is
per fetch: each part must arrive within `timeout` of its fetch starting, so a
hanging or slow tier costs a request at most `timeout`, while a large load that
keeps arriving on a busy machine is never cut for its size. A job still fetching at its deadline is given up and reported at once; the
parts written before stay (the connector counts them), and whatever the fetch
returns later is dropped without touching the pages, which vLLM may have handed
out again by then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger("kvmw.vllm")

P = TypeVar("P")

_QUEUED, _FETCHING, _WRITING, _DONE, _GIVEN_UP = range(5)


@dataclass
class _Job:
    deadline: float
    size: int
    state: int = _QUEUED
    parts_done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class AsyncLoader(Generic[P]):
    """Runs, per request and part, ``write(part, fetch(part))`` on `threads` threads, the
    parts in order until a write returns False; `poll` hands back the requests whose
    jobs finished, raised or were given up (what was written is the writer's to count)."""

    def __init__(self, timeout: float, threads: int = 2) -> None:
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvmw-load")
        self._jobs: dict[str, _Job] = {}
        self._finished = threading.Event()
        #: jobs given up at a deadline
        self.given_up = 0
        #: seconds the jobs' fetches took (those given up: until given up)
        self.fetch_seconds = 0.0
        self._last_part = 0.0  # when a part last arrived, of any job

    def submit(self, req_id: str, parts: Sequence[P], fetch: Callable[[P], Any],
               write: Callable[[P, Any], bool]) -> None:
        job = _Job(deadline=time.monotonic() + self.timeout, size=len(parts))
        self._jobs[req_id] = job
        self._pool.submit(self._run, job, parts, fetch, write)

    def _run(self, job: _Job, parts: Sequence[P], fetch: Callable[[P], Any],
             write: Callable[[P, Any], bool]) -> None:
        try:
            for part in parts:
                with job.lock:
                    if job.state == _GIVEN_UP:
                        return
                    job.state = _FETCHING
                    t0 = time.monotonic()
                    job.deadline = t0 + self.timeout
                fetched = fetch(part)
                with job.lock:
                    if job.state == _GIVEN_UP:
                        return
                    job.state = _WRITING
                    self._last_part = time.monotonic()
                    self.fetch_seconds += self._last_part - t0
                if not write(part, fetched):
                    break
                job.parts_done += 1
        except Exception as e:  # a tier or codec bug costs the rest of this load, never the engine
            log.warning("kvmw: an asynchronous load failed (%s: %s); vLLM recomputes what it did not "
                        "write", type(e).__name__, e)
        finally:
            with job.lock:
                if job.state != _GIVEN_UP:
                    job.state = _DONE
            self._finished.set()

    def wait(self, timeout: float) -> None:
        """Block up to `timeout` until some job finishes. vLLM steps without pause while
        requests wait on loads and nothing else runs; in that idle step the connector
        waits here instead, so the loader's threads are not starved of the GIL."""
        if self._jobs:
            self._finished.wait(min(timeout, max(0.0, min(j.deadline for j in self._jobs.values())
                                                  - time.monotonic())))
        self._finished.clear()

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def poll(self) -> list[str]:
        """Requests whose jobs are done or given up since the last call. Never waits: a
        job writing a part is not done yet, whatever the time (its part arrived in time).
        A job still waiting for a thread is given up only when no part of any job arrived
        for `timeout` either (the threads are stuck on a hanging tier, not busy)."""
        now = time.monotonic()
        out: list[str] = []
        for req_id, job in list(self._jobs.items()):
            with job.lock:
                late = now >= job.deadline and (job.state == _FETCHING or (
                    job.state == _QUEUED and now >= self._last_part + self.timeout))
                if late:
                    job.state = _GIVEN_UP
                    self.given_up += 1
                    self.fetch_seconds += self.timeout
                    log.warning("kvmw: an asynchronous load (part %d of %d) was still reading after %.2f s "
                                "(load_timeout); vLLM recomputes the rest", job.parts_done + 1, job.size,
                                self.timeout)
                state = job.state
            if state in (_DONE, _GIVEN_UP):
                del self._jobs[req_id]
                out.append(req_id)
        return out

    def drain(self, timeout: float) -> list[str]:
        """Wait up to `timeout` for every job (tests, shutdown); returns what `poll` would."""
        deadline = time.monotonic() + timeout
        out = self.poll()
        while self._jobs and time.monotonic() < deadline:
            time.sleep(0.002)
            out += self.poll()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
