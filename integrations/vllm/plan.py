"""Scheduler-side bookkeeping of the vLLM connector, free of vLLM imports (unit-testable).

Per request the planner keeps the prompt's chunk keys, the block ids vLLM gave
it, and how many leading chunks are known to be in kvmw. Each scheduler step it
turns vLLM's scheduling decisions into a `StepPlan`: which stored chunks the
workers write into which blocks (`LoadSpec`), and which chunks became complete
this step and must be encoded and stored (`SaveSpec`).

A load is synchronous (written before the layers run, in the step that computes
the rest of the prompt) when the worker can read every chunk of it from its own
process's tiers. When some chunk is only on a remote tier it is asynchronous:
vLLM parks the request until the worker reports the pages written, and the
load's spec goes out in the plan of the step that allocated its blocks although
the request is not scheduled in it. A request whose load failed is promised only local chunks
afterwards, so a slow remote tier cannot keep it waiting again and again.

Chunk ``i`` of a request covers prompt tokens ``[i * C, (i + 1) * C)``; since the
chunk size C is a multiple of vLLM's block size, it is a whole number of the
request's blocks, ``block_ids[i * C / B : (i + 1) * C / B]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class LoadSpec:
    """Write stored chunks ``first_chunk...`` (keys) into the request's tokens
    ``[start, end)``. ``block_ids[0]`` is the request's block number ``first_block``."""

    req_id: str
    keys: list[str]
    first_chunk: int
    start: int
    end: int
    first_block: int
    block_ids: list[int]
    #: finished in a later step, off the model runner's thread (some chunk is remote)
    asynchronous: bool = False

    def after_failure(self, loaded_chunks: int, chunk_size: int, block_size: int) -> tuple[int, list[int]]:
        """When only the first `loaded_chunks` chunks loaded: (the end of the tokens that
        may be written, from `start`; the blocks vLLM must recompute). A block the
        loaded KV covers only in part is recomputed whole. The load may begin inside
        its first chunk (vLLM's own prefix cache held the blocks before `start`): a
        failure there still reports every block of this load, never one before it."""
        loaded_end = min(self.end, (self.first_chunk + loaded_chunks) * chunk_size)
        if loaded_end >= self.end:
            return self.end, []
        first_bad = max(loaded_end // block_size, self.first_block)
        return max(self.start, first_bad * block_size), self.block_ids[first_bad - self.first_block:]


@dataclass
class SaveSpec:
    """Store the request's chunks ``first_chunk...`` (one key each), complete after
    this step; ``block_ids`` cover exactly those chunks, in order."""

    req_id: str
    keys: list[str]
    first_chunk: int
    block_ids: list[int]


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Request:
    keys: list[str]
    num_tokens: int
    block_ids: list[int] = field(default_factory=list)
    #: chunks 0..stored-1 are in kvmw (found by the lookup or saved by us)
    stored: int = 0
    #: local (vLLM-cached) tokens at the last lookup: the external range starts there
    local: int = 0
    #: token range to load at the next step, set once blocks are allocated
    load: tuple[int, int] | None = None
    #: the lookup's hits reach past the chunks the worker's own tiers hold
    remote: bool = False
    #: loads of this request that failed (then only local chunks are promised)
    failures: int = 0


class Planner:
    """`lookup(req_id, keys) -> (n, local)` answers how many leading keys kvmw holds
    and how many of those the worker's own tiers hold (the rest are remote), or None
    while it cannot tell yet (a remote tier has not answered): vLLM asks again later."""

    def __init__(self, chunk_size: int, block_size: int,
                 lookup: Callable[[str, list[str]], tuple[int, int] | None]) -> None:
        if chunk_size % block_size:
            raise ValueError(f"chunk_size {chunk_size} is not a multiple of vLLM's block size {block_size}")
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.lookup = lookup
        self.requests: dict[str, _Request] = {}
        #: lookups for requests that already held blocks (preempted, then re-admitted)
        self.readmitted = 0
        #: requests whose asynchronous load goes out with the next plan
        self._async_ready: list[str] = []

    # ---- vLLM: get_num_new_matched_tokens ---------------------------------------------------
    def matched_tokens(self, req_id: str, keys: Callable[[], list[str]], num_tokens: int,
                       num_computed: int) -> tuple[int, bool] | None:
        """(tokens beyond `num_computed` (vLLM's own hit) that kvmw can fill, whether
        that load is asynchronous), or None for "ask again". At most
        ``num_tokens - 1`` tokens: vLLM must compute at least one to sample from."""
        state = self.requests.get(req_id)
        if state is None:
            state = self.requests[req_id] = _Request(keys=keys(), num_tokens=num_tokens)
        elif state.block_ids:
            self.readmitted += 1
            state.block_ids = []
        state.num_tokens = num_tokens
        hits = self.lookup(req_id, state.keys) if state.keys else (0, 0)
        if hits is None:
            return None
        total, local = hits
        if state.failures:
            total = local
        state.stored = total  # anything past the hits is saved again once computed
        state.local = num_computed
        state.load = None
        hit_tokens = min(total * self.chunk_size, num_tokens - 1)
        n = max(0, hit_tokens - num_computed)
        state.remote = n > 0 and hit_tokens > local * self.chunk_size
        return n, state.remote

    # ---- vLLM: update_state_after_alloc -----------------------------------------------------
    def allocated(self, req_id: str, block_ids: Sequence[int], num_external: int) -> None:
        state = self.requests.get(req_id)
        if state is None:
            return
        state.block_ids = list(block_ids)
        if num_external > 0:
            state.load = (state.local, state.local + num_external)
            if state.remote:
                self._async_ready.append(req_id)

    # ---- vLLM: build_connector_meta -----------------------------------------------------------
    def async_loads(self, plan: StepPlan) -> None:
        """The asynchronous loads allocated since the last plan (their requests wait,
        unscheduled, until the worker reports them)."""
        ready, self._async_ready = self._async_ready, []
        for req_id in ready:
            state = self.requests.get(req_id)
            if state is not None and state.load is not None:
                self._plan(req_id, state, 0, plan)

    def new_request(self, req_id: str, keys: Callable[[], list[str]], num_tokens: int,
                    block_ids: Sequence[int], num_computed: int, num_scheduled: int, plan: StepPlan) -> None:
        """A request scheduled for the first time (or resumed with all its blocks)."""
        state = self.requests.get(req_id)
        if state is None:  # never looked up (e.g. the connector came up mid-flight)
            state = self.requests[req_id] = _Request(keys=keys(), num_tokens=num_tokens)
        state.block_ids = list(block_ids)
        self._plan(req_id, state, num_computed + num_scheduled, plan)

    def running_request(self, req_id: str, new_block_ids: Sequence[int] | None, resumed: bool,
                        num_computed: int, num_scheduled: int, plan: StepPlan) -> None:
        state = self.requests.get(req_id)
        if state is None:
            return
        if resumed:
            state.block_ids = list(new_block_ids or [])
        elif new_block_ids:
            state.block_ids.extend(new_block_ids)
        self._plan(req_id, state, num_computed + num_scheduled, plan)

    def _plan(self, req_id: str, state: _Request, computed_after: int, plan: StepPlan) -> None:
        cs, bs = self.chunk_size, self.block_size
        per_chunk = cs // bs
        if state.load is not None:
            start, end = state.load
            first, last = start // cs, -(-end // cs)
            first_block = start // bs
            plan.loads.append(LoadSpec(req_id, state.keys[first:last], first, start, end, first_block,
                                       state.block_ids[first_block: -(-end // bs)], state.remote))
            state.load = None
        complete = min(len(state.keys), computed_after // cs)
        if complete > state.stored and len(state.block_ids) >= complete * per_chunk:
            first = state.stored
            plan.saves.append(SaveSpec(req_id, state.keys[first:complete], first,
                                       state.block_ids[first * per_chunk: complete * per_chunk]))
            state.stored = complete

    # ---- worker feedback, end of request ----------------------------------------------------------
    def load_failed(self, req_id: str, first_bad_chunk: int) -> None:
        """Chunks from `first_bad_chunk` did not load: vLLM recomputes them; store them again."""
        state = self.requests.get(req_id)
        if state is not None:
            state.stored = min(state.stored, first_bad_chunk)
            state.failures += 1

    def finished(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
