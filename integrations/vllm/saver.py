"""Encoding and storing chunks on a thread of the worker's own, off vLLM's step.

The model runner calls `KVMWConnector.wait_for_save` at the end of every step;
if it encoded there and put into the tiers, a step would wait on the codec, on a
remote tier's round trip (up to its socket timeout when Redis hangs) or on an
fsync. Instead the step only hands over the chunks it gathered (private copies:
vLLM may free or reuse the blocks at once) and this thread does the rest. What it
stored is reported to the scheduler a step or more later (`take_stored`).

Bounded by bytes, never by waiting: a step whose chunks do not fit under
`max_bytes` of queued KV drops them (counted in `dropped`); the next request
that needs them recomputes and stores them again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("kvmw.vllm")


@dataclass
class SaveJob:
    """Chunks ``first_chunk...`` of one request, ``kv[L, 2, n * chunk_size, H, D]``."""

    keys: list[str]
    first_chunk: int
    kv: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class BackgroundSaver:
    """`store_chunk(key, index, kv) -> bool` encodes and stores one chunk (True: a tier took it)."""

    def __init__(self, store_chunk: Callable[[str, int, torch.Tensor], bool], chunk_size: int,
                 max_bytes: int) -> None:
        self.store_chunk = store_chunk
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        self._jobs: deque[SaveJob] = deque()
        self._queued_bytes = 0
        self._busy = False
        self._stored: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        #: chunks stored / dropped because the queue was full / failed to encode or store
        self.stored = self.dropped = self.failed = 0
        #: seconds this thread spent encoding and storing
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="kvmw-vllm-saver", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> bool:
        """Queue `job` unless that would pass `max_bytes` (then it is dropped). Never blocks."""
        with self._cond:
            if self._closed or (self._queued_bytes and self._queued_bytes + job.nbytes > self.max_bytes):
                self.dropped += len(job.keys)
                return False
            self._jobs.append(job)
            self._queued_bytes += job.nbytes
            self._cond.notify()
            return True

    def take_stored(self) -> list[str]:
        """Keys stored since the last call."""
        with self._cond:
            out, self._stored = self._stored, []
            return out

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job is stored; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._jobs or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 0.1)
            return True

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        cs = self.chunk_size
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._busy = True
            t0 = time.perf_counter()
            done: list[str] = []
            for j, key in enumerate(job.keys):
                try:
                    ok = self.store_chunk(key, job.first_chunk + j, job.kv[:, :, j * cs:(j + 1) * cs])
                except Exception as e:  # a codec or tier bug costs this chunk, never the engine
                    log.warning("kvmw: storing chunk %s failed (%s: %s)", key, type(e).__name__, e)
                    ok = False
                if ok:
                    done.append(key)
                else:
                    self.failed += 1
            with self._cond:
                self.seconds += time.perf_counter() - t0
                self.stored += len(done)
                self._stored.extend(done)
                self._queued_bytes -= job.nbytes
                self._busy = False
                self._cond.notify_all()
