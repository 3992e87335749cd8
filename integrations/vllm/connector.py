"""`KVMWConnector`: vLLM v1 KV connector over kvmw's tiers (prefix reuse, compressed KV).

Switch it on with ``--kv-transfer-config '{"kv_connector":"KVMWConnector","kv_role":"kv_both"}'``
(the ``vllm.general_plugins`` entry point registers the name) or, without the
plugin, add ``"kv_connector_module_path":"kvmw.integrations.vllm"``. Settings
come from the usual `KVMWConfig` (YAML / ``KVMW_*`` env); ``kv_connector_extra_config``
may add ``{"kvmw": {field: value}}`` overrides or ``{"kvmw_config": "file.yaml"}``.

Requests that carry RAG documents (``kv_transfer_params["kvmw"]``, built by
`rag_request`) are blended instead of prefix-matched: blend_plan.py (scheduler),
blend_worker.py and blend_runner.py (worker, on vLLM's own model) say how.

vLLM builds two instances: one in the scheduler process (role SCHEDULER), one
in each worker (role WORKER). They share nothing but the metadata object the
scheduler builds each step and the worker metadata sent back.

Scheduler side (called by vLLM's scheduler, in this order for a request):
    get_num_new_matched_tokens()  on admission: hash the prompt's full chunks
        into a prefix chain (fingerprint + chunk size + cache salt), ask how
        many leading chunks exist (the worker's own tiers from its reports at
        once, remote tiers off the step: "not yet" until they answer); return
        the tokens past vLLM's own hit that kvmw can fill (never the whole
        prompt: one token is always computed). The load is synchronous when
        the worker's own tiers hold every chunk of it, else asynchronous
        (``True``: the request waits while other requests run).
    update_state_after_alloc()  the request's blocks; remember the load range.
    build_connector_meta()  every step: a `KVMWConnectorMetadata` with the
        loads (keys -> blocks; asynchronous ones for requests not scheduled
        this step) and the saves (chunks that become complete this step,
        whether the prefill is split over steps or not).
    set_xfer_handshake_metadata()  once at start: what the worker's tiers hold.
    update_connector_output()  the workers' report: keys their tiers now hold
        or lost (the bounded `WorkerIndex`), loads that failed (those chunks
        are saved again once recomputed).
    request_finished()  forget the request; blocks are freed at once (saves
        are copies taken inside the step; an asynchronous load in flight keeps
        its blocks until the worker reports it, vLLM's own rule).

Worker side (called by vLLM's model runner / attention layers, per step):
    register_kv_caches()  once: the per-layer paged tensors; pick the page
        layout of the attention backend (checked against vLLM's own CPU write
        kernel at start).
    get_handshake_metadata()  once, after that: the keys its tiers hold.
    start_load_kv()  before the forward: fetch (one batched read per tier) and
        decode the synchronous loads' chunks; hand the asynchronous ones to the
        `AsyncLoader` (read, decode and page writes on its threads, given up
        past `load_timeout`). A chunk that is missing, corrupt or on a tier
        that died ends the load there; its blocks are reported through
        get_block_ids_with_load_errors() so vLLM recomputes them (the
        connector sets ``kv_load_failure_policy="recompute"``).
    wait_for_layer_load(layer)  inside the forward, before that layer's
        attention: scatter the decoded KV of that layer only (layer-wise).
    save_kv_layer(layer, ...)  after that layer's attention: copy the
        completed chunks' KV of that layer out of the pages (a gather).
    wait_for_save()  after the forward: hand the gathered chunks to the
        `BackgroundSaver` (encoding and puts off the step).
    get_finished()  after the step: the asynchronous loads whose pages are
        written (or given up), for vLLM to schedule those requests.
    build_connector_worker_meta()  what the tiers stored and evicted, failed loads.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvmw.blending.blend import document_context
from kvmw.blending.stand_in import STAND_IN_TEXT
from kvmw.config import KVMWConfig
from kvmw.errors import BlobError, ConfigError
from kvmw.integrations.vllm.blend_plan import BlendPlanner, BlendRequest, BlendRequestError, BlendSpec, find_spans
from kvmw.integrations.vllm.model_identity import fingerprint_for_vllm
from kvmw.integrations.vllm.paged_layout import (CPUPagedLayout, PagedLayout, layout_for, probe_cpu_offsets,
                                                  slots_for_tokens)
from kvmw.integrations.vllm.blend_runner import find_model_runner
from kvmw.integrations.vllm.blend_worker import BlendWorker
from kvmw.integrations.vllm.loader import AsyncLoader
from kvmw.integrations.vllm.lookup import INDEX_MAX_KEYS, RemoteLookups, WorkerIndex
from kvmw.integrations.vllm.plan import LoadSpec, Planner, SaveSpec, StepPlan
from kvmw.integrations.vllm.saver import BackgroundSaver, SaveJob
from kvmw.integrations.vllm.stats import TIER_COUNTERS, TIER_SECONDS, Increments, KVMWConnectorStats, KVMWPromMetrics
from kvmw.keys import KeySpace
from kvmw.quantizers.common import Workspace

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvmw.vllm")

#: the load buffer is kept between steps up to this size (a larger one is freed after its step)
LOAD_BUFFER_KEEP = 512 << 20
#: in a step with nothing scheduled, the connector waits this long for a pending lookup or
#: load rather than let vLLM spin (its threads would wait on the GIL behind the spinning)
IDLE_WAIT = 0.01
#: an asynchronous load reads its chunks in parts of about this many bytes of KV, each
#: read given `load_timeout` of its own: a stalled tier is given up within one wait, a
#: large load that keeps arriving on a busy machine is not (see loader.py)
LOAD_PART_BYTES = 8 << 20

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


# ---- metadata crossing processes ------------------------------------------------------------
@dataclass
class KVMWConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> workers, one per step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    #: RAG blends to run before this step's forward (blend_plan.py)
    blends: list[BlendSpec] = field(default_factory=list)
    #: nothing is scheduled this step (vLLM runs no forward, only the connector)
    idle: bool = False


@dataclass
class KVMWWorkerMetadata(KVConnectorWorkerMetadata):
    """Workers -> scheduler, one per step: keys the worker's own tiers now hold
    and keys they no longer hold, and per request the first chunk whose load failed."""

    stored: list[str] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)
    evicted: list[str] = field(default_factory=list)
    #: per blended request, what the blend did (the response's kv_transfer_params)
    blends: dict[str, dict[str, Any]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVMWWorkerMetadata):
            # a key counts as stored only if every worker (tensor-parallel rank) stored it
            mine = set(self.stored)
            self.stored = [k for k in other.stored if k in mine]
            self.evicted = list(set(self.evicted) | set(other.evicted))
            for rid, chunk in other.failed.items():
                self.failed[rid] = min(chunk, self.failed.get(rid, chunk))
            self.blends.update(other.blends)
        return self


@dataclass
class KVMWHoldings(KVConnectorHandshakeMetadata):
    """Worker -> scheduler once, at engine start (vLLM's handshake): the keys the
    worker's own tiers hold already (a disk tier kept from an earlier run), newest last."""

    keys: list[str] = field(default_factory=list)


# ---- one store per process and configuration ------------------------------------------------
_STORES: dict[str, dict[str, Any]] = {}
_STORES_LOCK = threading.Lock()

#: the connectors alive in this process, by role (tests and `kvmw bench vllm` read stats here)
ACTIVE: dict[str, "KVMWConnector"] = {}


def _shared_store(config: KVMWConfig, role: str):
    """The scheduler and the worker of one engine share a store when they share a
    process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni executor): then the
    scheduler's lookup sees exactly what the worker stored. Returns (entry, shared)."""
    from kvmw.storage_tiers import build_store

    key = repr(config)
    with _STORES_LOCK:
        entry = _STORES.get(key)
        if entry is None or entry["store"]._closed:
            entry = _STORES[key] = {"store": build_store(config), "roles": set()}
            entry["store"].connect_remote()
        entry["roles"].add(role)
        return entry


def load_config(extra: dict[str, Any] | None) -> KVMWConfig:
    extra = dict(extra or {})
    overrides = dict(extra.get("kvmw") or {})
    return KVMWConfig.load(extra.get("kvmw_config"), **overrides)


@dataclass
class _AsyncLoad:
    """An asynchronous load's progress, written by its loader thread: the leading chunks
    written into the pages and their bytes per tier; `chunk`, the one buffer its parts
    decode into [L, 2, chunk_size, H, D], made on the loader thread (one made on the
    step, under vLLM's inference mode, could not be written there)."""

    spec: LoadSpec
    chunk_shape: tuple[int, ...]
    dtype: torch.dtype
    chunk: torch.Tensor | None = None
    chunks: int = 0
    nbytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class ConnectorStats:
    lookups: int = 0
    #: lookups whose remote tiers had not answered by `lookup_timeout` (counted as misses there)
    lookup_timeouts: int = 0
    hit_tokens: int = 0
    chunks_loaded: int = 0
    tokens_loaded: int = 0
    load_failures: int = 0
    #: loads finished in a later step (some chunk on a remote tier), and those given up
    #: at `load_timeout`
    async_loads: int = 0
    loads_given_up: int = 0
    #: seconds asynchronous loads spent reading the tiers (off the step)
    async_fetch_seconds: float = 0.0
    #: blocks reported to vLLM as not loaded (it recomputes them)
    blocks_recomputed: int = 0
    chunks_stored: int = 0
    #: chunks not stored because the saver's queue was full
    dropped_saves: int = 0
    save_steps: int = 0
    readmitted: int = 0
    load_seconds: float = 0.0
    save_seconds: float = 0.0
    #: seconds the background saver spent encoding and storing (off the step)
    store_seconds: float = 0.0
    bytes_loaded: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: RAG blends run, documents they reused per tier, tokens they recomputed, documents
    #: computed and stored for later prompts, blends whose documents did not all load
    blends: int = 0
    blend_documents_loaded: int = 0
    blend_tokens_recomputed: int = 0
    documents_computed: int = 0
    blend_failures: int = 0
    blend_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["bytes_loaded"] = dict(self.bytes_loaded)
        return d


class KVMWConnector(KVConnectorBase_V1):
    """kvmw tiers behind vLLM's paged KV cache. See the module docstring for who calls what."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        from kvmw.quantizers import make_codec

        ktc = vllm_config.kv_transfer_config
        self.config = load_config(ktc.kv_connector_extra_config)
        #: scatter each layer's KV just before that layer runs (False: all layers in start_load_kv)
        self.layerwise = bool((ktc.kv_connector_extra_config or {}).get("kvmw_layerwise", True))
        self.block_size = vllm_config.cache_config.block_size
        if self.config.chunk_size % self.block_size:
            raise ConfigError(f"kvmw chunk_size {self.config.chunk_size} must be a multiple of vLLM's "
                              f"block_size {self.block_size} (set KVMW_CHUNK_SIZE)")
        par = vllm_config.parallel_config
        if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
            raise ConfigError("KVMWConnector handles one worker holding every layer and KV head "
                              "(tensor/pipeline parallel size 1)")
        cache_dtype = str(vllm_config.cache_config.cache_dtype)
        if cache_dtype not in ("auto", str(vllm_config.model_config.dtype).removeprefix("torch.")):
            raise ConfigError(f"KVMWConnector stores KV in the model dtype; kv_cache_dtype={cache_dtype}")
        mc = vllm_config.model_config
        self.dtype = mc.dtype
        self.fingerprint = fingerprint_for_vllm(mc.model, mc.dtype, getattr(mc, "revision", None),
                                                bool(getattr(mc, "trust_remote_code", False)))
        self.codec = make_codec(self.config.codec)
        role_name = "scheduler" if role == KVConnectorRole.SCHEDULER else "worker"
        self._entry = _shared_store(self.config, role_name)
        self.store = self._entry["store"]
        self._keyspaces: dict[str, KeySpace] = {}
        self.stats = ConnectorStats()
        ACTIVE[role_name] = self
        self._increments = Increments()
        self._tier_seconds: dict[str, float] = defaultdict(float)
        if role == KVConnectorRole.SCHEDULER:
            if ktc.kv_load_failure_policy != "recompute":
                # kvmw is a cache: a chunk that does not load is recomputed, never a failed request
                ktc.kv_load_failure_policy = "recompute"
            self.planner = Planner(self.config.chunk_size, self.block_size, self._lookup)
            self.blends = BlendPlanner(self.block_size, self._lookup)
            self._tokenizer: Any = None
            self._model_config = mc
            self._remote = RemoteLookups(lambda keys: self.store.contains(keys, remote=True),
                                         self.config.lookup_timeout)
            #: what the worker's tiers hold, as it reported (invisible from here when it is
            #: another process)
            self._index = WorkerIndex()
        else:
            self._kv_caches: dict[str, torch.Tensor] = {}
            self._layer_index: dict[str, int] = {}
            self._layout: PagedLayout | None = None
            self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (slots, kv[L, 2, T, H, D])
            self._load_buffer = Workspace()
            self._save_bufs: list[tuple[SaveSpec, torch.Tensor, torch.Tensor]] = []
            self._failed_reqs: dict[str, int] = {}
            self._invalid_blocks: set[int] = set()
            self._stored_keys: list[str] = []
            #: keys the local tiers evicted (appended on the saver's and loaders' threads)
            self._evicted: list[str] = []
            self._evicted_lock = threading.Lock()
            self._load_started = False
            self.store.add_latency_observer(self._observe_tier_call)
            self.store.add_eviction_observer(self._on_evicted)
            self.saver = BackgroundSaver(self._store_chunk, self.config.chunk_size, self.config.save_queue_bytes)
            self.loader: AsyncLoader[range] = AsyncLoader(self.config.load_timeout)
            self._async_loads: dict[str, _AsyncLoad] = {}
            #: vLLM's model (register_model) or the model runner that registered the caches
            self._model: Any = None
            self._model_runner: Any = None
            self._blender: BlendWorker | None = None
            self._blend_outcomes: dict[str, dict[str, Any]] = {}
            #: the last blend's outcome with its recomputed positions (tests read it)
            self.last_blend: dict[str, Any] | None = None
        log.info("kvmw connector (%s): chunk %d, codec %s, tiers %s, model %s", role_name,
                 self.config.chunk_size, self.config.codec, self.config.tiers, self.fingerprint.digest)

    # ---- keys ------------------------------------------------------------------------------
    def _keyspace(self, request_salt: str | None) -> KeySpace:
        # With no request salt the keys are the HF hook's (same config salt): entries are shared.
        salt = self.config.cache_salt + (f"\x1f{request_salt}" if request_salt else "")
        ks = self._keyspaces.get(salt)
        if ks is None:
            ks = self._keyspaces[salt] = KeySpace(self.fingerprint, self.config.chunk_size, salt)
        return ks

    # ---- stats (vLLM's log line and /metrics; see stats.py) -----------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVMWConnectorStats:
        return KVMWConnectorStats(dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVMWPromMetrics:
        return KVMWPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def _observe_tier_call(self, tier: str, op: str, seconds: float) -> None:
        self._tier_seconds[f"{TIER_SECONDS}|{tier}|{op}"] += seconds

    def get_kv_connector_stats(self) -> KVMWConnectorStats | None:
        """What this side counted since its last report (the scheduler its lookups,
        the worker its loads, stores and tier traffic)."""
        self._sync_stats()
        s = self.stats
        if self._role == KVConnectorRole.SCHEDULER:
            return self._increments.take({"lookups": s.lookups, "lookup_timeouts": s.lookup_timeouts,
                                          "hit_tokens": s.hit_tokens})
        now: dict[str, float] = {name: getattr(s, name) for name in (
            "chunks_loaded", "tokens_loaded", "load_failures", "async_loads", "loads_given_up", "async_fetch_seconds",
            "blocks_recomputed", "chunks_stored",
            "dropped_saves", "load_seconds", "save_seconds", "store_seconds", "blends", "blend_documents_loaded",
            "blend_tokens_recomputed", "documents_computed", "blend_failures", "blend_seconds")}
        for tier in self.store.tiers:
            counters = tier.counters.as_dict()
            for name in TIER_COUNTERS:
                now[f"{name}|{tier.name}"] = counters[name.removeprefix("tier_")]
        now.update(self._tier_seconds)
        return self._increments.take(now)

    # ==== scheduler side =========================================================================
    def _lookup(self, req_id: str, keys: list[str]) -> tuple[int, int] | None:
        """(leading keys stored, of which the worker's own tiers hold). Those answer at
        once: the store itself when the worker shares this process, else its
        reports. The remote tiers answer on `RemoteLookups`' thread (None: not yet)."""
        if "worker" in self._entry["roles"]:
            local = self.store.prefix_hits(keys, remote=False)
        else:
            local = self._index.leading(keys)
        n = local
        if n < len(keys) and self.store.has_remote:
            more = self._remote.leading(req_id, keys[n:])
            if more is None:
                return None
            n += more
        self.stats.lookups += 1
        return n, local

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        prompt = request.prompt_token_ids
        if prompt is None:  # prompt embeddings: no token ids to key on
            return 0, False
        if request.request_id in self.blends.requests or self._asks_blend(request):
            n = self.blends.matched_tokens(request.request_id, num_computed_tokens)
            if n is None:
                return None, False
            self.stats.hit_tokens += n
            return n, False
        ks = self._keyspace(getattr(request, "cache_salt", None))
        matched = self.planner.matched_tokens(request.request_id, lambda: ks.prefix_keys(prompt),
                                              request.num_tokens, num_computed_tokens)
        if matched is None:  # a remote tier has not answered yet: vLLM asks again next step
            return None, False
        self.stats.hit_tokens += matched[0]
        self.stats.readmitted = self.planner.readmitted
        return matched

    def _asks_blend(self, request: "Request") -> bool:
        """Register a request that asks for RAG blending (kv_transfer_params["kvmw"]); a
        malformed ask is logged and the request runs as a plain one."""
        params = getattr(request, "kv_transfer_params", None)
        if not params or "kvmw" not in params:
            return False
        prompt = request.prompt_token_ids
        try:
            ask = BlendRequest.from_params(params, self._tokenize)
            if ask is None:
                return False
            spans = find_spans(prompt, ask.documents)
            stand_in = None
            if ask.document_context == "stand_in":
                stand_in = ask.stand_in if ask.stand_in is not None else self._tokenize(STAND_IN_TEXT)
            context = document_context(ask.document_context, prompt[:spans[0][0]], stand_in)
        except BlendRequestError as e:
            log.warning("kvmw: request %s: %s; no blending", request.request_id, e)
            return False
        ks = self._keyspace(getattr(request, "cache_salt", None))
        ctx = None if context is None else context.tolist()
        keys = [ks.chunk_key(prompt[s:e], ctx) for s, e in spans]
        self.blends.add(request.request_id, prompt, ask, keys, ctx or [], spans)
        return True

    def _tokenize(self, text: str) -> list[int]:
        """Text -> ids (no special tokens) with the model's tokenizer, loaded when first needed
        (the engine may run with skip_tokenizer_init)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            mc = self._model_config
            self._tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer or mc.model,
                                                            revision=getattr(mc, "tokenizer_revision", None),
                                                            trust_remote_code=bool(mc.trust_remote_code))
        return list(self._tokenizer(text, add_special_tokens=False).input_ids)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        if request.request_id in self.blends.requests:
            self.blends.allocated(request.request_id, blocks.get_block_ids()[0])
            return
        self.planner.allocated(request.request_id, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        plan = StepPlan()
        idle = scheduler_output.total_num_scheduled_tokens == 0
        if idle:
            self._remote.wait_any(IDLE_WAIT)
        self._remote.new_step()
        self.planner.async_loads(plan)
        sched = scheduler_output.num_scheduled_tokens
        blends: list[BlendSpec] = []
        blended: list[str] = []
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self.blends.requests:
                spec = self.blends.scheduled(new.req_id, new.block_ids[0], replace=True)
                blends += [spec] if spec is not None else []
                blended.append(new.req_id)
                continue
            # Every request is keyed at its lookup, with its cache salt. One never looked up
            # has no salt here (NewRequestData carries none): it gets no keys rather than
            # another tenant's.
            self.planner.new_request(new.req_id, list, len(new.prompt_token_ids or []),
                                     new.block_ids[0], new.num_computed_tokens, sched.get(new.req_id, 0), plan)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            nb = cached.new_block_ids[i]
            if rid in self.blends.requests:
                spec = self.blends.scheduled(rid, nb[0] if nb else None, replace=rid in cached.resumed_req_ids)
                blends += [spec] if spec is not None else []
                blended.append(rid)
                continue
            self.planner.running_request(rid, nb[0] if nb else None, rid in cached.resumed_req_ids,
                                         cached.num_computed_tokens[i], sched.get(rid, 0), plan)
        self._evict_blended(blended)
        return KVMWConnectorMetadata(plan.loads, plan.saves, blends, idle)

    def _evict_blended(self, req_ids: list[str]) -> None:
        """Take the blocks of blended requests out of vLLM's prefix cache (its supported
        eviction: vLLM cached them at allocation, under exact-prefix hashes, and blended KV
        must never be served as an exact prefix). A prefix-cache lookup walks from the first
        block, so none past the first evicted one is ever reached either."""
        manager = getattr(self, "_kv_cache_manager", None)
        if manager is None or not req_ids:
            return
        blocks = {b for rid in req_ids for b in self.blends.blended_blocks(rid)}
        if blocks:
            manager.block_pool.evict_blocks(blocks)

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        for holdings in metadata.values():
            if isinstance(holdings, KVMWHoldings):
                self._index.add(holdings.keys)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, KVMWWorkerMetadata):
            return
        if "worker" not in self._entry["roles"]:
            self._index.add(meta.stored)
            self._index.discard(meta.evicted)
        for rid, chunk in meta.failed.items():
            self.planner.load_failed(rid, chunk)
            self.blends.load_failed(rid)
        for rid, outcome in meta.blends.items():
            if rid in self.blends.requests:
                self.blends.requests[rid].outcome = outcome

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """The response's kv_transfer_params tell a blended request what kvmw did: documents
        reused, tokens reused; the worker's own figures (recomputed tokens, documents per
        tier) once its report arrived (not before a request's first output: see the stats)."""
        self.planner.finished(request.request_id)
        self._remote.forget(request.request_id)
        blend = self.blends.finished(request.request_id)
        return False, None if blend is None else {"kvmw": blend}

    # ==== worker side ============================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)
        for name in kv_caches:
            m = _LAYER_INDEX.search(name)
            if m is None:
                raise ConfigError(f"kvmw cannot tell the layer number of {name!r}")
            self._layer_index[name] = int(m.group(1))
        fp = self.fingerprint
        if sorted(self._layer_index.values()) != list(range(fp.num_layers)):
            raise ConfigError(f"vLLM has attention layers {sorted(self._layer_index.values())}, "
                              f"the model {fp.num_layers}: kvmw handles one cache per layer")
        sample = next(iter(kv_caches.values()))
        backend = "CPU_ATTN" if sample.device.type == "cpu" else "gpu"
        self._layout = layout_for(backend, self.block_size, fp.num_kv_heads, fp.head_dim)
        if isinstance(self._layout, CPUPagedLayout):
            self._layout = _checked_cpu_layout(self._layout, sample.dtype)
        # vLLM hands connectors no model: the runner calling us has it (blending needs it)
        self._model_runner = find_model_runner()
        log.info("kvmw: %d layers, page layout %s, cache %s %s", len(kv_caches), self._layout.name,
                 tuple(sample.shape), sample.dtype)

    def register_model(self, model: Any) -> None:
        """vLLM's hook handing connectors the model (where vLLM has it): blending runs on it."""
        self._model = model

    def _get_model(self) -> Any:
        if self._model is None and self._model_runner is not None:
            self._model = self._model_runner.get_model()
        return self._model

    def _blend_worker(self) -> BlendWorker:
        if self._blender is None:
            layers = [(self._kv_caches[name], i) for name, i in self._layer_index.items()]
            self._blender = BlendWorker(self.store, self.codec, self.fingerprint, self._layout, layers,
                                        self.block_size, self._get_model)
        return self._blender

    def _run_blends(self, specs: list[BlendSpec]) -> None:
        """Before the forward: fill each blended request's pages (blend_worker.py)."""
        worker = self._blend_worker()
        for spec in specs:
            try:
                out = worker.run(spec)
            except Exception:  # never fail the step: vLLM recomputes what the blend would have written
                log.exception("kvmw: blending request %s failed; vLLM computes it whole", spec.req_id)
                out = None
            bad = spec.unfilled(spec.held, self.block_size) if out is None else out.failed_blocks
            if bad:
                self.stats.blend_failures += 1
                self.stats.blocks_recomputed += len(bad)
                self._invalid_blocks.update(bad)
                self._failed_reqs[spec.req_id] = 0  # the scheduler promises it nothing again
            if out is None:
                continue
            self.stats.blends += 1
            self.stats.blend_documents_loaded += sum(out.documents_loaded.values())
            self.stats.blend_tokens_recomputed += len(out.recomputed)
            self.stats.documents_computed += out.documents_computed
            self.stats.blend_seconds += out.seconds
            self._blend_outcomes[spec.req_id] = out.as_params()
            self.last_blend = {"req_id": spec.req_id, "recomputed": out.recomputed, "held": spec.held,
                               "end": spec.end, "block_ids": spec.block_ids, **out.as_params()}

    def get_handshake_metadata(self) -> KVMWHoldings:
        """What the local tiers hold at start (at most what the scheduler's index keeps)."""
        held = [k for tier in reversed(self.store.tiers) if not tier.remote for k, _ in tier.entries()]
        return KVMWHoldings(held[-INDEX_MAX_KEYS:])

    def _index_of(self, layer_name: str) -> int | None:
        return self._layer_index.get(layer_name)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Fetch and decode this step's synchronous loads (the per-layer writes happen in
        wait_for_layer_load so each layer's pages are filled just before it runs); hand
        the asynchronous ones to the loader's threads."""
        self._pending = []
        self._load_started = True
        if self._layout is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVMWConnectorMetadata)
        if meta.blends:
            self._run_blends(meta.blends)
        sync = [spec for spec in meta.loads if not spec.asynchronous]
        for spec in meta.loads:
            if spec.asynchronous:
                self._start_async(spec)
        if sync:
            fp, cs = self.fingerprint, self.config.chunk_size
            total = sum(len(spec.keys) for spec in sync) * cs
            dtype = next(iter(self._kv_caches.values())).dtype
            # one buffer reused across steps: chunks decode into it (a fresh tensor per load
            # page-faults at 2-5 GB/s here); released after a load larger than the cap
            buf = self._load_buffer.get("kv", (fp.num_layers, 2, total, fp.num_kv_heads, fp.head_dim), dtype)
            fetched = self.store.fetch_many([k for spec in sync for k in spec.keys], fp.digest)
            offset = 0
            for spec in sync:
                n = len(spec.keys)
                self._load_sync(spec, fetched[:n], buf[:, :, offset * cs:(offset + n) * cs])
                fetched, offset = fetched[n:], offset + n
        if not self.layerwise:  # fill every layer now instead of just before each runs
            for name in list(self._kv_caches):
                self.wait_for_layer_load(name)
            self._pending = []

    def _decode(self, keys: list[str], fetched: list[tuple[Any, str | None]], out: Callable[[int], torch.Tensor],
                decoded: Callable[[int], None] | None = None) -> tuple[int, dict[str, int]]:
        """Decode the chunks of `keys`, in order, into ``out(j)`` [L, 2, chunk_size, H, D] up to
        the first that is missing or does not decode, calling ``decoded(j)`` after each:
        (chunks decoded, bytes per tier)."""
        from kvmw.quantizers import decode_blob

        nbytes: dict[str, int] = defaultdict(int)
        digest = self.fingerprint.digest
        checked = self.store.validate  # the store checksummed what it returned: once is enough
        for j, (key, (blob, tier)) in enumerate(zip(keys, fetched)):
            if blob is None:
                return j, nbytes
            try:
                decode_blob(blob, digest, out=out(j), verify=not checked)
            except BlobError as e:
                log.warning("kvmw: chunk %s did not decode (%s); vLLM recomputes from there", key, e)
                self.store.delete(key)
                self._on_evicted([key])
                return j, nbytes
            nbytes[tier] += memoryview(blob).nbytes
            if decoded is not None:
                decoded(j)
        return len(keys), nbytes

    def _settle(self, spec: LoadSpec, n_loaded: int, nbytes: dict[str, int]) -> int:
        """Count a finished load and report the blocks it did not fill (vLLM recomputes
        them); the end of the tokens it may write."""
        cs = self.config.chunk_size
        loaded_end, bad_blocks = spec.after_failure(n_loaded, cs, self.block_size)
        if bad_blocks:
            self.stats.load_failures += 1
            self.stats.blocks_recomputed += len(bad_blocks)
            self._invalid_blocks.update(bad_blocks)
            self._failed_reqs[spec.req_id] = min(self._failed_reqs.get(spec.req_id, 1 << 30),
                                                 spec.first_chunk + n_loaded)
        if loaded_end > spec.start:
            self.stats.chunks_loaded += n_loaded
            self.stats.tokens_loaded += loaded_end - spec.start
        for tier, n in nbytes.items():
            self.stats.bytes_loaded[tier] += n
        return loaded_end

    def _load_sync(self, spec: LoadSpec, fetched: list[tuple[Any, str | None]], buf: torch.Tensor) -> None:
        """Decode into `buf` [L, 2, chunks * chunk_size, H, D]; queue the loaded tokens' page writes."""
        t0 = time.perf_counter()
        cs = self.config.chunk_size
        n_loaded, nbytes = self._decode(spec.keys, fetched, lambda j: buf[:, :, j * cs:(j + 1) * cs])
        loaded_end = self._settle(spec, n_loaded, nbytes)
        if loaded_end > spec.start:
            base = spec.first_chunk * cs
            slots = slots_for_tokens(spec.block_ids, spec.first_block, spec.start, loaded_end, self.block_size)
            self._pending.append((slots, buf[:, :, spec.start - base: loaded_end - base]))
        self.stats.load_seconds += time.perf_counter() - t0

    def _start_async(self, spec: LoadSpec) -> None:
        """Read the chunks in parts of about `LOAD_PART_BYTES` (each part's read has its own
        `load_timeout`) and write each part's pages as it arrives."""
        fp, cs = self.fingerprint, self.config.chunk_size
        self.stats.async_loads += 1
        dtype = next(iter(self._kv_caches.values())).dtype
        done = _AsyncLoad(spec, (fp.num_layers, 2, cs, fp.num_kv_heads, fp.head_dim), dtype)
        self._async_loads[spec.req_id] = done
        per_part = max(1, LOAD_PART_BYTES // (math.prod(done.chunk_shape) * dtype.itemsize))
        parts = [range(a, min(a + per_part, len(spec.keys))) for a in range(0, len(spec.keys), per_part)]
        self.loader.submit(spec.req_id, parts,
                           lambda part: self.store.fetch_many([spec.keys[j] for j in part], fp.digest),
                           lambda part, fetched: self._write_async(done, part, fetched))

    def _write_async(self, load: "_AsyncLoad", part: range, fetched: list[tuple[Any, str | None]]) -> bool:
        """On a loader thread: decode a part's chunks one by one and write each into the
        request's pages, every layer (vLLM runs nothing on these blocks until it is
        reported). False when one did not load: the rest is recomputed."""
        if load.chunk is None:
            load.chunk = torch.empty(load.chunk_shape, dtype=load.dtype)
        spec, chunk, cs, bs = load.spec, load.chunk, self.config.chunk_size, self.block_size
        layers = [(self._kv_caches[name], i) for name, i in self._layer_index.items()]

        def write(j: int) -> None:
            c0 = (spec.first_chunk + part[j]) * cs
            a, b = max(c0, spec.start), min(c0 + cs, spec.end)
            slots = slots_for_tokens(spec.block_ids, spec.first_block, a, b, bs)
            for layer, i in layers:
                self._layout.scatter(layer, slots, chunk[i, :, a - c0: b - c0])
            load.chunks += 1

        n, nbytes = self._decode([spec.keys[j] for j in part], fetched, lambda j: chunk, write)
        for tier, size in nbytes.items():
            load.nbytes[tier] += size
        return n == len(part)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """The asynchronous loads done or given up; their failed blocks are reported in the
        same step (get_block_ids_with_load_errors is asked right after)."""
        if self.loader.in_flight and self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, KVMWConnectorMetadata) and meta.idle and not meta.loads:
                self.loader.wait(IDLE_WAIT)
        done = self.loader.poll()
        if not done:
            return None, None
        t0 = time.perf_counter()
        for req_id in done:  # its job is over: no thread writes to it any more
            load = self._async_loads.pop(req_id)
            self._settle(load.spec, load.chunks, load.nbytes)
        self.stats.load_seconds += time.perf_counter() - t0
        return None, set(done)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._pending:
            return
        i = self._index_of(layer_name)
        if i is None:
            return
        t0 = time.perf_counter()
        layer = self._kv_caches[layer_name]
        for slots, kv in self._pending:
            self._layout.scatter(layer, slots, kv[i])
        self.stats.load_seconds += time.perf_counter() - t0

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        """Copy the layer's part of every chunk completed this step (runs after the
        layer's attention, so this step's tokens are in the pages)."""
        if self._layout is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVMWConnectorMetadata) or not meta.saves:
            return
        i = self._index_of(layer_name)
        if i is None:
            return
        if not self._save_bufs:
            fp, cs = self.fingerprint, self.config.chunk_size
            for spec in meta.saves:
                n = len(spec.keys) * cs
                slots = slots_for_tokens(spec.block_ids, spec.first_chunk * cs // self.block_size,
                                         spec.first_chunk * cs, spec.first_chunk * cs + n, self.block_size)
                buf = torch.empty(fp.num_layers, 2, n, fp.num_kv_heads, fp.head_dim, dtype=kv_layer.dtype)
                self._save_bufs.append((spec, slots, buf))
        t0 = time.perf_counter()
        for _, slots, buf in self._save_bufs:
            buf[i].copy_(self._layout.gather(kv_layer, slots))
        self.stats.save_seconds += time.perf_counter() - t0

    def wait_for_save(self) -> None:
        """Hand the chunks gathered this step to the background saver (encoding and
        the tiers' puts happen there, never on the step)."""
        bufs, self._save_bufs = self._save_bufs, []
        self._load_started = False
        self._pending = []
        if sum(b.numel() * b.element_size() for b in self._load_buffer.buffers.values()) > LOAD_BUFFER_KEEP:
            self._load_buffer.buffers.clear()
        submitted = False
        for spec, _, buf in bufs:
            if spec.req_id in self._failed_reqs:
                continue  # computed over KV that did not load: never store it
            submitted |= self.saver.submit(SaveJob(spec.keys, spec.first_chunk, buf))
        self.stats.save_steps += submitted

    def _store_chunk(self, key: str, index: int, chunk: torch.Tensor) -> bool:
        """On the saver's thread: encode chunk `index` (its positions recorded) and store it."""
        cs = self.config.chunk_size
        blob = self.codec.encode(chunk, self.fingerprint.digest, positions=torch.arange(index * cs, (index + 1) * cs))
        return self.store.put(key, blob, cost=float((index + 1) * cs))

    def stats_dict(self) -> dict[str, Any]:
        """This side's counters, the saver's and the remote lookups' included."""
        self._sync_stats()
        return self.stats.as_dict()

    def _sync_stats(self) -> None:
        remote = getattr(self, "_remote", None)
        if remote is not None:
            self.stats.lookup_timeouts = remote.timed_out
        loader = getattr(self, "loader", None)
        if loader is not None:
            self.stats.loads_given_up, self.stats.async_fetch_seconds = loader.given_up, loader.fetch_seconds
        saver = getattr(self, "saver", None)
        if saver is not None:
            self.stats.chunks_stored, self.stats.dropped_saves = saver.stored, saver.dropped
            self.stats.store_seconds = saver.seconds

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._invalid_blocks = self._invalid_blocks, set()
        return out

    def _on_evicted(self, keys: list[str]) -> None:
        with self._evicted_lock:
            self._evicted.extend(keys)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """Keys the local tiers hold now and keys they lost."""
        self._stored_keys.extend(self.saver.take_stored())
        if self._blender is not None:
            self._stored_keys.extend(self._blender.take_stored())
        with self._evicted_lock:
            lost, self._evicted = self._evicted, []
        if lost:  # an entry evicted from one local tier may still be in another
            lost = [k for k, held in zip(lost, self.store.contains(lost, remote=False)) if not held]
        if not self._stored_keys and not self._failed_reqs and not lost and not self._blend_outcomes:
            return None
        meta = KVMWWorkerMetadata(self._stored_keys, self._failed_reqs, lost, self._blend_outcomes)
        self._stored_keys, self._failed_reqs, self._blend_outcomes = [], {}, {}
        return meta

    def shutdown(self) -> None:
        try:
            if self._role == KVConnectorRole.WORKER:
                if self._blender is not None:
                    self._blender.close()
                self.loader.drain(10)
                self.loader.close()
                self.saver.close(10)
            self.store.flush(10)
        except Exception:  # best effort at exit
            pass


def _checked_cpu_layout(layout: CPUPagedLayout, dtype: torch.dtype) -> CPUPagedLayout:
    """The CPU page layout vLLM's own cache-write kernel really writes, with that kernel
    set for the scatters. Known K/V are written into a scratch cache and read back with
    the layout; where that fails (another ISA: AMX packs bf16 pages otherwise) the
    layout is read off the kernel (`probe_cpu_offsets`) and checked the same way, and a
    page no table describes is refused at start rather than served as wrong KV.
    Not a CPU build of vLLM: the layout as it was, no kernel."""
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError:  # not a CPU build
        return layout
    bs, h, d = layout.block_size, layout.num_kv_heads, layout.head_dim
    isa = _get_attn_isa(dtype, bs, d, "auto")

    def write(key, value, k_cache, v_cache, slots):
        ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, slots, isa)

    def reads_back(candidate: CPUPagedLayout) -> bool:
        scratch = torch.zeros(3, h, bs, 2 * d, dtype=dtype)
        t = bs + bs // 2 + 1
        g = torch.Generator().manual_seed(0)
        key = torch.randn(t, h, d, generator=g).to(dtype)
        value = torch.randn(t, h, d, generator=g).to(dtype)
        slots = torch.cat([torch.arange(bs, 2 * bs), torch.arange(0, t - bs)])  # block 1 whole, then block 0
        write(key, value, *scratch.view(3, h, 2 * bs, d).chunk(2, dim=2), slots)
        got = candidate.gather(scratch, slots)
        return torch.equal(got[0], key) and torch.equal(got[1], value)

    if not reads_back(layout):
        offsets = probe_cpu_offsets(write, bs, h, d, dtype)
        layout = CPUPagedLayout(bs, h, d, offsets=offsets)
        if offsets is None or not reads_back(layout):
            raise ConfigError(f"vLLM's CPU KV page layout (isa {isa}) is not one kvmw can read; "
                              "refusing to load or store KV")
        log.info("kvmw: vLLM's CPU page layout (isa %s) read off its write kernel", isa)
    layout.write_kernel = write
    return layout
