"""RAG prompts from separately cached documents through HF `generate`: load, re-position,
blend (kvmw.blending decides what; this module runs it on the HF model), generate.

A prompt is `preamble + documents... + question`. Each document's KV is
computed on its own (positions 0..n-1) and stored under a position-independent
chunk key; a later prompt loads it from whichever tier holds it, moves its keys
to the document's offset in this prompt (`Repositioner`), and a strategy
recomputes a chosen subset of tokens on top (`LlamaLikeAdapter`). Generation
then continues from the blended cache with the model's own `generate`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from kvmw.blending import cacheblend, epic, query_aware  # noqa: F401  (register the strategies)
from kvmw.blending.blend import DOCUMENT_CONTEXTS, blend, document_context, empty_kv, place_documents
from kvmw.blending.rope import Repositioner
from kvmw.blending.stand_in import STAND_IN_TEXT
from kvmw.blending.strategy import BlendPlan, make_strategy
from kvmw.integrations.hf.adapter import LlamaLikeAdapter

log = logging.getLogger("kvmw.blending")


@dataclass
class RAGResult:
    sequences: torch.Tensor  # prompt + generated ids, [1, N + new]
    prompt_tokens: int
    text: str | None = None
    strategy: str = ""
    recompute_ratio: float = 0.0
    recomputed_tokens: int = 0  # tokens that ran in the last layers (question included)
    recomputed: list[int] = field(default_factory=list)  # their positions
    token_layers: int = 0  # (token, layer) pairs computed: the prefill work, full prefill's = N * layers
    full_layers: int = 0  # leading layers that ran for every token
    documents_loaded: dict[str, int] = field(default_factory=dict)  # tier -> documents
    documents_prefilled: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds: lookup, load, prefill, recompute, ttft
    cache: Any = None  # the generation's DynamicCache, with keep_cache=True


class _FirstTokenClock:
    """A generate streamer that notes when the first new token exists (and forwards to another)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner, self.calls, self.first = inner, 0, None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


class RAGBlender:
    """Blending for one model over the hook's store, keys and codec."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook
        self.model = hook.model
        self.adapter = LlamaLikeAdapter(self.model)
        self.repositioner = Repositioner(self.model)
        self._context: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, KV) of the last document context

    def context_kv(self, context: torch.Tensor) -> torch.Tensor:
        """The document context's KV, kept for the next document: every document of a prompt
        (and of the next ones) is prefilled after the same context, which then runs once."""
        from kvmw.integrations.hf.capture import capture_kv

        if self._context is None or not torch.equal(self._context[0], context):
            self._context = (context.clone(), capture_kv(self.model, context))
        return self._context[1]

    # ---- inputs ---------------------------------------------------------------------
    def _ids(self, text_or_ids: Any, special: bool = False) -> torch.Tensor:
        if isinstance(text_or_ids, str):
            if self.hook.tokenizer is None:
                raise ValueError("text documents need the tokenizer passed to KVMW(...)")
            return self.hook.tokenizer(text_or_ids, return_tensors="pt",
                                       add_special_tokens=special).input_ids[0]
        ids = torch.as_tensor(text_or_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("empty document or question")
        return ids

    def document_context(self, kind: str, preamble: torch.Tensor | None, stand_in: Any = None
                         ) -> torch.Tensor | None:
        """The tokens documents are computed after (part of their chunk key); see DOCUMENT_CONTEXTS.
        `stand_in`: text or ids of the stand-in document (None: `STAND_IN_TEXT`)."""
        if kind not in DOCUMENT_CONTEXTS:
            raise ValueError(f"document_context must be one of {DOCUMENT_CONTEXTS}; got {kind!r}")
        ids = None
        if kind == "stand_in":
            if stand_in is None and self.hook.tokenizer is None:
                raise ValueError("the default stand-in document is text: pass stand_in= ids, a tokenizer to "
                                 "KVMW(...), or document_context='preamble'")
            ids = self._ids(STAND_IN_TEXT if stand_in is None else stand_in)
        return document_context(kind, preamble, ids)

    def segments(self, documents: Sequence[Any], question: Any, preamble: Any = None
                 ) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor | None]:
        """(prompt ids [N], document spans, preamble ids): documents keep their own tokens."""
        parts: list[torch.Tensor] = []
        pre = None
        if preamble is not None:
            pre = self._ids(preamble, special=True)
            parts.append(pre)
        spans = []
        offset = 0 if pre is None else len(pre)
        for doc in documents:
            ids = self._ids(doc)
            parts.append(ids)
            spans.append((offset, offset + len(ids)))
            offset += len(ids)
        parts.append(self._ids(question))
        return torch.cat(parts), spans, pre

    # ---- documents ------------------------------------------------------------------
    def document_kv(self, ids: torch.Tensor, result: RAGResult, stored: bool = True,
                    context: torch.Tensor | None = None) -> torch.Tensor:
        """The document's canonical KV, computed after `context` (the shared preamble; None:
        alone) at positions len(context).., from the store (when the lookup found it there:
        `stored`) or prefilled and stored."""
        from kvmw.integrations.hf.capture import capture_kv

        hook, key = self.hook, self.hook.keyspace.chunk_key(ids, context)
        first = 0 if context is None else len(context)
        positions = torch.arange(first, first + len(ids))
        param = next(self.model.parameters())
        t0 = time.perf_counter()
        if stored:
            chunk = hook._load_chunk(key)  # a blob that does not decode is deleted there
            if chunk is not None:
                kv, meta, tier, _ = chunk
                if kv.shape[2] == len(ids) and (torch.as_tensor(meta.positions) == positions).all():
                    result.documents_loaded[tier] = result.documents_loaded.get(tier, 0) + 1
                    result.timings["load"] += time.perf_counter() - t0
                    return kv.to(param.dtype)
                log.warning("kvmw: document %s holds other positions; prefilling it again", key)
                hook.store.delete(key)
        result.timings["load"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        kv = capture_kv(self.model, ids, None if context is None else self.context_kv(context))
        blob = hook.codec.encode(kv.contiguous(), hook.fingerprint.digest, positions=positions,
                                 extra={"kind": "document"})
        hook.store.put(key, blob, cost=float(len(ids)))
        result.documents_prefilled += 1
        result.timings["prefill"] += time.perf_counter() - t0
        return kv

    # ---- the blend ------------------------------------------------------------------
    @torch.inference_mode()
    def blend(self, ids: torch.Tensor, spans: list[tuple[int, int]], doc_kvs: list[torch.Tensor],
              strategy: Any, result: RAGResult, first_position: int = 0
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer KV [1, H, N, D] of the whole prompt after selective recomputation
        (`kvmw.blending.blend`); each document's cached KV starts at `first_position`."""
        n, device = len(ids), self.model.device
        dtype = next(self.model.parameters()).dtype
        first = doc_kvs[0] if doc_kvs else None
        heads, dim = (first.shape[3], first.shape[4]) if first is not None else _kv_geometry(self.model)
        keys, values = empty_kv(self.adapter.num_layers, n, heads, dim, dtype, device)
        t0 = time.perf_counter()
        cached = place_documents(keys, values, spans, doc_kvs, self.repositioner.rotate, first_position)
        result.timings["load"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        work = blend(self.adapter, ids, BlendPlan(cached=cached, spans=spans), keys, values, strategy)
        result.timings["recompute"] = time.perf_counter() - t0
        result.recomputed_tokens = int(work.index.numel())
        result.recomputed = work.index.cpu().tolist()
        result.token_layers = work.token_layers
        result.full_layers = work.full_layers
        return keys, values


def _kv_geometry(model: Any) -> tuple[int, int]:
    cfg = model.config
    return cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def generate_rag(hook: Any, documents: Sequence[Any], question: Any, strategy: Any = "query_aware",
                 recompute_ratio: float = 0.15, preamble: Any = None, keep_cache: bool = False,
                 document_context: str = "stand_in", stand_in: Any = None, **generate_kwargs: Any) -> RAGResult:
    """See `KVMW.generate_rag`. `strategy` is a name (with `recompute_ratio`) or a `BlendStrategy`."""
    from transformers import DynamicCache

    t_start = time.perf_counter()
    blender = hook._blender()
    ids, spans, pre = blender.segments(documents, question, preamble)
    context = blender.document_context(document_context, pre, stand_in)
    plan = None
    if not isinstance(strategy, str):
        plan, strategy, recompute_ratio = strategy, strategy.name, strategy.recompute_ratio
    result = RAGResult(sequences=ids[None], prompt_tokens=len(ids), strategy=strategy,
                       recompute_ratio=recompute_ratio,
                       timings={"lookup": 0.0, "load": 0.0, "prefill": 0.0, "recompute": 0.0})
    clock = _FirstTokenClock(generate_kwargs.pop("streamer", None))
    generate = hook._generate_fn()
    device = hook.model.device
    if keep_cache:
        generate_kwargs["return_dict_in_generate"] = True
    if strategy == "full_prefill":
        result.recomputed_tokens, result.full_layers = len(ids), blender.adapter.num_layers
        result.token_layers = len(ids) * blender.adapter.num_layers
        out = generate(ids[None].to(device), streamer=clock, **generate_kwargs)
    else:
        plan = plan or make_strategy(strategy, recompute_ratio)
        doc_ids = [ids[s:e] for s, e in spans]
        t0 = time.perf_counter()
        stored = hook.store.contains([hook.keyspace.chunk_key(d, context) for d in doc_ids])  # one batched lookup
        result.timings["lookup"] = time.perf_counter() - t0
        kvs = [blender.document_kv(d, result, present, context) for d, present in zip(doc_ids, stored)]
        keys, values = blender.blend(ids, spans, kvs, plan, result, 0 if context is None else len(context))
        cache = DynamicCache(config=hook.model.config)
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.update(k[:, :, :-1], v[:, :, :-1], i)  # generate computes the last prompt token
        out = generate(ids[None].to(device), past_key_values=cache, streamer=clock, **generate_kwargs)
    result.sequences = out if isinstance(out, torch.Tensor) else out.sequences
    if keep_cache:
        result.cache = out.past_key_values
    result.timings["ttft"] = (clock.first or time.perf_counter()) - t_start
    result.timings["total"] = time.perf_counter() - t_start
    if hook.tokenizer is not None:
        result.text = hook.tokenizer.decode(result.sequences[0, len(ids):], skip_special_tokens=True)
    return result
