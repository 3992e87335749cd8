"""Worker side of RAG blending beneath vLLM: one `BlendSpec` in, the request's pages filled.

Runs in ``start_load_kv``, before the forward of the step that first schedules
the request (vLLM then computes the question over the pages written here):

1. the prompt's KV is held densely (`kvmw.blending.blend`); the tokens vLLM's
   prefix cache already holds are read from the pages;
2. the stored documents are read (one batched fetch), decoded and placed
   re-rotated at their offsets; one that is missing, corrupt or holds other
   positions ends the reuse there: the blocks from its first one on are reported
   to vLLM, which recomputes them (its failed-block path);
3. `blend` runs the strategy with vLLM's own layers (`VLLMLayerRunner`);
4. the tokens ``[held, end)`` of every layer are written into the pages;
5. documents the worker's tiers do not hold are computed after their context
   (kept for the next document) and stored, as the HF hook stores them (encoding
   and the tiers' puts on kvmw's I/O thread); those a remote tier holds are read
   into memory on that thread instead, for the next prompt (the step never waits
   on the network or a disk).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvmw.blending.blend import blend, empty_kv, place_documents, run_tokens
from kvmw.blending.rope import Repositioner
from kvmw.blending.strategy import BlendPlan, make_strategy
from kvmw.errors import BlobError
from kvmw.integrations.vllm.blend_plan import BlendSpec
from kvmw.integrations.vllm.blend_runner import VLLMLayerRunner
from kvmw.integrations.vllm.paged_layout import PagedLayout, slots_for_tokens

log = logging.getLogger("kvmw.vllm")


@dataclass
class BlendOutcome:
    """What one blend did (reported back to the scheduler and in the response)."""

    documents_loaded: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    documents_computed: int = 0
    #: positions that ran in the last layer (document tokens selected + uncached text)
    recomputed: list[int] = field(default_factory=list)
    #: blocks reported to vLLM as not filled (it recomputes them)
    failed_blocks: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def as_params(self) -> dict[str, Any]:
        return {"documents_loaded": dict(self.documents_loaded), "documents_computed": self.documents_computed,
                "recomputed_tokens": len(self.recomputed), "blend_seconds": round(self.seconds, 4)}


class BlendWorker:
    """Runs `BlendSpec`s on one worker's pages. `model()` returns vLLM's model (None when
    it cannot be found: then nothing is reused and vLLM computes every token)."""

    def __init__(self, store: Any, codec: Any, fingerprint: Any, layout: PagedLayout,
                 layers: list[tuple[torch.Tensor, int]], block_size: int, model: Callable[[], Any]) -> None:
        self.store, self.codec, self.fingerprint = store, codec, fingerprint
        self.layout, self.layers, self.block_size = layout, layers, block_size
        self._model = model
        self._runner: VLLMLayerRunner | None = None
        self._context: tuple[tuple[int, ...], list[torch.Tensor], list[torch.Tensor]] | None = None
        #: keys this worker's tiers took since the last `take_stored` (computed documents, and
        #: prefetched ones: the scheduler learns from these what the worker holds)
        self._stored: list[str] = []
        self._stored_lock = threading.Lock()
        #: kvmw's thread for this worker's blend I/O: prefetches, and encoding and storing
        #: new documents (a tier's put may be a disk write and fsync: never on the step)
        self._io: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._prefetching: set[str] = set()

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0][0].dtype

    def runner(self) -> VLLMLayerRunner | None:
        if self._runner is None:
            model = self._model()
            if model is None:
                return None
            self._runner = VLLMLayerRunner(model)
            self.repositioner = Repositioner.from_inv_freq(self._runner.inv_freq)
        return self._runner

    # ---- one request -------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, spec: BlendSpec) -> BlendOutcome:
        t0 = time.perf_counter()
        out = BlendOutcome()
        bs = self.block_size
        runner = self.runner()
        if runner is None:
            out.failed_blocks = spec.unfilled(spec.held, bs)
            log.warning("kvmw: vLLM's model was not found; request %s is computed whole", spec.req_id)
            return out
        self._prefetch(spec)
        kvs, end = self._load(spec, out)
        out.failed_blocks = spec.unfilled(end, bs)
        if end > spec.held:
            self._blend(spec, runner, kvs, end, out)
        try:  # the pages are written: a document that fails to store costs only a later miss
            with runner.attached():
                self._store_missing(spec, runner, out)
        except Exception:
            log.exception("kvmw: storing the new documents of request %s failed", spec.req_id)
        out.seconds = time.perf_counter() - t0
        return out

    def _load(self, spec: BlendSpec, out: BlendOutcome) -> tuple[list[torch.Tensor], int]:
        """The leading documents that decode, and the end of the tokens the blend may write."""
        from kvmw.quantizers import decode_blob

        if spec.loaded == 0:
            return [], spec.end
        digest, first = self.fingerprint.digest, len(spec.context)
        kvs: list[torch.Tensor] = []
        fetched = self.store.fetch_many(spec.keys[:spec.loaded], digest, remote=False)  # never the network here
        for key, (s, e), (blob, tier) in zip(spec.keys, spec.spans, fetched):
            if blob is None:
                break
            try:
                kv, meta = decode_blob(blob, digest, dtype=self.dtype, verify=not self.store.validate)
            except BlobError as err:
                log.warning("kvmw: document %s did not decode (%s); vLLM recomputes from there", key, err)
                self.store.delete(key)
                break
            positions = torch.as_tensor(meta.positions) if meta.positions is not None else None
            if kv.shape[2] != e - s or positions is None or not torch.equal(
                    positions.long(), torch.arange(first, first + e - s)):
                log.warning("kvmw: document %s holds other positions; vLLM recomputes from there", key)
                break
            kvs.append(kv)
            out.documents_loaded[tier] += 1
        if len(kvs) == spec.loaded:
            return kvs, spec.end
        bad_start = spec.spans[len(kvs)][0]
        return kvs, max(spec.held, bad_start // self.block_size * self.block_size)

    def _blend(self, spec: BlendSpec, runner: VLLMLayerRunner, kvs: list[torch.Tensor], end: int,
               out: BlendOutcome) -> None:
        fp, bs = self.fingerprint, self.block_size
        ids = torch.tensor(spec.prompt, dtype=torch.long)
        keys, values = empty_kv(fp.num_layers, len(ids), fp.num_kv_heads, fp.head_dim, self.dtype,
                                self.layers[0][0].device)
        if spec.held:  # vLLM's prefix cache holds these: exact KV, read from the pages
            slots = slots_for_tokens(spec.block_ids, 0, 0, spec.held, bs)
            for layer, i in self.layers:
                kv = self.layout.gather(layer, slots)
                keys[i][0, :, :spec.held] = kv[0].transpose(0, 1)
                values[i][0, :, :spec.held] = kv[1].transpose(0, 1)
        spans = spec.spans[:len(kvs)]
        cached = place_documents(keys, values, spans, kvs, self.repositioner.rotate, len(spec.context),
                                 start=spec.held)
        strategy = make_strategy(spec.strategy, spec.recompute_ratio)
        with runner.attached():
            work = blend(runner, ids, BlendPlan(cached=cached, spans=spans), keys, values, strategy,
                         computed_from=spec.held, computed_to=end)
        out.recomputed = work.index.cpu().tolist()
        slots = slots_for_tokens(spec.block_ids, 0, spec.held, end, bs)
        for layer, i in self.layers:
            kv = torch.stack([keys[i][0, :, spec.held:end], values[i][0, :, spec.held:end]]).transpose(1, 2)
            self.layout.scatter(layer, slots, kv)

    # ---- documents seen for the first time ---------------------------------------------------------
    def _prefetch(self, spec: BlendSpec) -> None:
        """Read the documents only a remote tier holds into this worker's memory tier, on
        kvmw's own thread (a fetch promotes what it finds)."""
        keys = [spec.keys[j] for j in spec.prefetch if spec.keys[j] not in self._prefetching]
        if not keys:
            return
        self._prefetching.update(keys)

        def fetch() -> None:
            try:
                found = self.store.fetch_many(keys, self.fingerprint.digest)  # promoted into memory
                self._took([k for k, (blob, _) in zip(keys, found) if blob is not None])
            finally:
                self._prefetching.difference_update(keys)

        self._submit(fetch)

    def _submit(self, job: Callable[[], None]) -> None:
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="kvmw-blend-io")
        self._pending = [f for f in self._pending if not f.done()] + [self._io.submit(job)]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the prefetches and stores handed off so far; False when some did not end."""
        done, not_done = wait(self._pending, timeout)
        self._pending = list(not_done)
        return not not_done

    def close(self, timeout: float = 10.0) -> None:
        if self._io is not None:
            self.flush(timeout)
            self._io.shutdown(wait=False, cancel_futures=True)

    def _store_missing(self, spec: BlendSpec, runner: VLLMLayerRunner, out: BlendOutcome) -> None:
        remote = set(spec.prefetch)
        todo = [j for j, held in enumerate(self.store.contains(spec.keys, remote=False))
                if not held and j not in remote]
        for j in todo:
            s, e = spec.spans[j]
            kv = self.document_kv(runner, spec.context, spec.prompt[s:e])
            self._submit(lambda key=spec.keys[j], kv=kv, first=len(spec.context): self._store(key, kv, first))
            out.documents_computed += 1

    def _store(self, key: str, kv: torch.Tensor, first: int) -> None:
        """On kvmw's I/O thread: encode a new document (its positions recorded) and store it."""
        try:
            n = kv.shape[2]
            blob = self.codec.encode(kv, self.fingerprint.digest, positions=torch.arange(first, first + n),
                                     extra={"kind": "document"})
            if self.store.put(key, blob, cost=float(n)):
                self._took([key])
        except Exception:  # a later miss, never a failed step
            log.exception("kvmw: storing document %s failed", key)

    def _took(self, keys: list[str]) -> None:
        with self._stored_lock:
            self._stored.extend(keys)

    def take_stored(self) -> list[str]:
        with self._stored_lock:
            out, self._stored = self._stored, []
        return out

    def document_kv(self, runner: VLLMLayerRunner, context: list[int], doc: list[int]) -> torch.Tensor:
        """A document's canonical KV [L, 2, n, H, D], computed after `context` (whose KV is
        kept for the next document: a prompt's documents share it)."""
        fp, c = self.fingerprint, len(context)
        device = self.layers[0][0].device
        key = tuple(context)
        if self._context is None or self._context[0] != key:
            ck, cv = empty_kv(fp.num_layers, c, fp.num_kv_heads, fp.head_dim, self.dtype, device)
            if c:
                run_tokens(runner, torch.tensor(context), torch.arange(c), ck, cv)
            self._context = (key, ck, cv)
        _, ck, cv = self._context
        n = len(doc)
        keys, values = empty_kv(fp.num_layers, c + n, fp.num_kv_heads, fp.head_dim, self.dtype, device)
        for i in range(fp.num_layers):
            keys[i][:, :, :c], values[i][:, :, :c] = ck[i], cv[i]
        run_tokens(runner, torch.tensor(list(context) + list(doc)), torch.arange(c, c + n), keys, values)
        return torch.stack([torch.stack([k[0, :, c:].transpose(0, 1) for k in keys]),
                            torch.stack([v[0, :, c:].transpose(0, 1) for v in values])], dim=1).contiguous()
