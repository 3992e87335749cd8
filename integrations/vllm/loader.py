"""Loads that finish in a later step: reading remote tiers off vLLM's step.

A chunk the scheduler found only on a remote tier (Redis, a kvmw server) costs a
network round trip to read, and up to the tier's socket timeout when it hangs.
For such requests the connector answers vLLM's lookup with ``load_kv_async``:
vLLM allocates the blocks, parks the request in ``WAITING_FOR_REMOTE_KVS`` and
goes on stepping the others; the worker reads, decodes and writes the pages here,
on threads of its own, and reports the request in ``get_finished`` once its
pages are written (vLLM schedules it on the next step).

A job has two parts: `fetch` (tier reads; may hang, so it can be given up) and
`write` (decode into the request's pages; local and short, never interrupted). A
job still fetching at its deadline is given up: the request is reported at once
with nothing loaded (vLLM recomputes it) and whatever the fetch returns later is
dropped without touching the pages, which vLLM may have handed out again by then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger("kvmw.vllm")

R = TypeVar("R")

_FETCHING, _WRITING, _DONE, _GIVEN_UP = range(4)


@dataclass
class _Job(Generic[R]):
    deadline: float
    size: int
    state: int = _FETCHING
    result: R | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class AsyncLoader(Generic[R]):
    """Runs ``write(fetch())`` per request on `threads` threads; `poll` hands back
    ``(req_id, write's result)`` for finished jobs, ``(req_id, None)`` for jobs
    given up at their deadline or that raised."""

    def __init__(self, timeout: float, threads: int = 2) -> None:
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvmw-load")
        self._jobs: dict[str, _Job[R]] = {}
        self._finished = threading.Event()
        #: jobs given up at their deadline
        self.given_up = 0
        #: seconds the jobs' fetches took (those given up: until given up)
        self.fetch_seconds = 0.0

    def submit(self, req_id: str, fetch: Callable[[], Any], write: Callable[[Any], R], size: int = 1) -> None:
        """`size`: what the job reads (chunks), for the log line of a job given up."""
        job: _Job[R] = _Job(deadline=time.monotonic() + self.timeout, size=size)
        self._jobs[req_id] = job
        self._pool.submit(self._run, job, fetch, write)

    def _run(self, job: _Job[R], fetch: Callable[[], Any], write: Callable[[Any], R]) -> None:
        t0 = time.monotonic()
        try:
            fetched = fetch()
            with job.lock:
                if job.state == _GIVEN_UP:
                    return
                job.state = _WRITING
                self.fetch_seconds += time.monotonic() - t0
            result = write(fetched)
        except Exception as e:  # a tier or codec bug costs this load, never the engine
            log.warning("kvmw: an asynchronous load failed (%s: %s); vLLM recomputes it", type(e).__name__, e)
            result = None
        with job.lock:
            if job.state != _GIVEN_UP:
                job.result, job.state = result, _DONE
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

    def poll(self) -> list[tuple[str, R | None]]:
        """Jobs done or given up since the last call. Never waits, except on a job
        past its deadline that is writing pages (it finishes within the call)."""
        now = time.monotonic()
        out: list[tuple[str, R | None]] = []
        for req_id, job in list(self._jobs.items()):
            with job.lock:
                if job.state == _FETCHING and now >= job.deadline:
                    job.state = _GIVEN_UP
                    self.given_up += 1
                    self.fetch_seconds += self.timeout
                    log.warning("kvmw: an asynchronous load (%d chunks) was still reading after %.2f s "
                                "(load_timeout); vLLM recomputes it", job.size, self.timeout)
                state = job.state
            if state == _WRITING and now >= job.deadline:
                state = self._wait_written(job)
            if state in (_DONE, _GIVEN_UP):
                del self._jobs[req_id]
                out.append((req_id, job.result if state == _DONE else None))
        return out

    @staticmethod
    def _wait_written(job: _Job[R]) -> int:
        while True:
            with job.lock:
                if job.state != _WRITING:
                    return job.state
            time.sleep(0.0005)

    def drain(self, timeout: float) -> list[tuple[str, R | None]]:
        """Wait up to `timeout` for every job (tests, shutdown); returns what `poll` would."""
        deadline = time.monotonic() + timeout
        out = self.poll()
        while self._jobs and time.monotonic() < deadline:
            time.sleep(0.002)
            out += self.poll()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
