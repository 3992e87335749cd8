"""`KVMW`: prefix reuse for `model.generate` through the tiered store.

On each call: hash the prompt's full chunks into a prefix chain, ask the store
how many leading chunks it holds (one batched lookup per tier), load and decode
them into a transformers `DynamicCache`, let `generate` compute only the rest
of the prompt, then encode and store the prompt chunks that were computed.

Anything that goes wrong while loading (a corrupt or foreign blob, a tier that
dies mid-load) shortens the reused prefix to the chunks that did load; the
rest is recomputed, so the answer never depends on the cache's health.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from kvmw.config import KVMWConfig
from kvmw.errors import BlobError, KVMWError
from kvmw.fingerprint import ModelFingerprint
from kvmw.keys import KeySpace
from kvmw.layout import from_hf_layers, split_tokens, to_hf_layers

log = logging.getLogger("kvmw.hf")


class UnsupportedInputError(KVMWError, ValueError):
    """The hook serves one sequence at a time, without padding."""


@dataclass
class HookStats:
    requests: int = 0
    chunk_hits: int = 0
    chunk_misses: int = 0
    tokens_reused: int = 0
    tokens_computed: int = 0
    chunks_stored: int = 0
    load_failures: int = 0
    load_seconds: float = 0.0
    store_seconds: float = 0.0
    bytes_loaded: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["bytes_loaded"] = dict(self.bytes_loaded)
        return d


class KVMW:
    """Prefix reuse for a transformers causal LM (Llama, Qwen2, Mistral families).

    `generate(prompt, **kw)` takes text (needs `tokenizer`), a list of ids, or a
    [T] / [1, T] tensor, plus any `generate` keyword arguments; `attach()` makes
    a plain `model.generate(...)` go through it. Batch size 1 only.
    """

    def __init__(self, model: Any, tokenizer: Any = None, config: KVMWConfig | None = None,
                 store: Any = None, evict: Any = None) -> None:
        from kvmw.quantizers import make_codec
        from kvmw.storage_tiers import build_store

        self.model = model
        self.tokenizer = tokenizer
        self.config = config or KVMWConfig.load()
        self.fingerprint = ModelFingerprint.from_hf(model)
        # evict: a `kvmw.eviction.store.StoreEviction`: chunks are stored pruned (own key namespace)
        self.evict = evict
        salt = self.config.cache_salt + (evict.salt if evict is not None else "")
        self.keyspace = KeySpace(self.fingerprint, self.config.chunk_size, salt)
        self.codec = make_codec(self.config.codec)
        self.store = store if store is not None else build_store(self.config)
        self._stats = HookStats()
        self._original_generate = None

    # ---- wiring ---------------------------------------------------------------------
    def attach(self) -> "KVMW":
        """Route `model.generate` through kvmw (undo with `detach`)."""
        if self._original_generate is None:
            self._original_generate = self.model.generate
            self.model.generate = self.generate
        return self

    def detach(self) -> None:
        if self._original_generate is not None:
            self.model.generate = self._original_generate
            self._original_generate = None

    def _generate_fn(self):
        return self._original_generate or self.model.generate

    def stats(self) -> dict[str, Any]:
        return self._stats.as_dict()

    def close(self) -> None:
        self.detach()
        self.store.close()

    # ---- RAG: position-independent documents (kvmw.blending) ----------------------------
    def generate_rag(self, documents: Any, question: Any, strategy: str = "query_aware",
                     recompute_ratio: float = 0.15, preamble: Any = None, keep_cache: bool = False,
                     document_context: str = "stand_in", stand_in: Any = None, **generate_kwargs: Any) -> Any:
        """Answer `question` over `documents` (strings or token lists), reusing each
        document's stored KV at whatever offset and order it has in this prompt.

        Strategies: "query_aware" (the default: recompute the `recompute_ratio`
        share of document tokens in windows around those the question attends to
        in a probe pass), "cacheblend" (those whose KV deviates most at the check
        layer), "epic" (each document's first tokens), "full_reuse" (no
        recomputation) and "full_prefill" (no reuse, the baseline).

        Unseen documents are prefilled and stored, computed after
        (`document_context`): the preamble then a stand-in document ("stand_in",
        the default: `stand_in` text or ids, default `kvmw.blending.stand_in`,
        better one document of your corpus formatted as the others; the KV of a
        document that follows another, as all but the first do), the `preamble`
        alone ("preamble": the first document's KV is then exactly the full
        prompt's), or nothing ("none": shared across preambles). The context is part of the
        document's key. Returns a `kvmw.blending.RAGResult` (ids, text, the number
        of recomputed tokens, documents per tier, timings; the generation's cache
        with `keep_cache=True`).
        """
        from kvmw.integrations.hf.rag import generate_rag

        return generate_rag(self, documents, question, strategy, recompute_ratio, preamble, keep_cache,
                            document_context, stand_in, **generate_kwargs)

    def _blender(self) -> Any:
        if getattr(self, "_rag", None) is None:
            from kvmw.integrations.hf.rag import RAGBlender

            self._rag = RAGBlender(self)
        return self._rag

    # ---- the call -------------------------------------------------------------------
    def generate(self, inputs: Any = None, **kwargs: Any) -> Any:
        ids = self._input_ids(inputs, kwargs)
        if "past_key_values" in kwargs:  # the caller manages its own cache: stay out of the way
            return self._generate_fn()(ids, **kwargs)
        self._stats.requests += 1
        n_tokens = ids.shape[1]
        keys = self.keyspace.prefix_keys(ids[0])
        if self.evict is not None:
            return self._generate_pruned(ids, keys, kwargs)
        cache, reused, n_loaded = self._load_prefix(keys, n_tokens)
        self._stats.tokens_reused += reused
        self._stats.tokens_computed += n_tokens - reused
        out = self._generate_fn()(ids.to(self.model.device), past_key_values=cache, **kwargs)
        self._store_new_chunks(cache, keys, n_loaded)
        return out

    def _input_ids(self, inputs: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        mask = kwargs.pop("attention_mask", None)
        if isinstance(inputs, str):
            if self.tokenizer is None:
                raise UnsupportedInputError("text input needs the tokenizer passed to KVMW(...)")
            inputs = self.tokenizer(inputs, return_tensors="pt").input_ids
        ids = torch.as_tensor(inputs)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise UnsupportedInputError(f"kvmw serves batch size 1; got input of shape {tuple(ids.shape)} "
                                        "(call once per sequence)")
        if mask is not None and not bool(torch.as_tensor(mask).all()):
            raise UnsupportedInputError("padded input (attention_mask with zeros) is not supported; "
                                        "pass the unpadded sequence")
        if ids.shape[1] == 0:
            raise UnsupportedInputError("empty prompt")
        return ids.long()

    def _load_chunk(self, key: str) -> tuple[torch.Tensor, Any, str, int] | None:
        """(canonical KV on the model's device, blob meta, tier, blob bytes) of one stored
        chunk; None (counted as a load failure) when no tier returns a blob that decodes."""
        from kvmw.quantizers import decode_blob

        blob, tier = self.store.fetch(key, self.fingerprint.digest)
        if blob is None:
            self._stats.load_failures += 1
            return None
        try:
            param = next(self.model.parameters())
            kv, meta = decode_blob(blob, self.fingerprint.digest, device=param.device, dtype=param.dtype,
                                   verify=not getattr(self.store, "validate", False))
        except BlobError as e:  # the store checked the frame; the payload can still be bad
            log.warning("kvmw: chunk %s did not decode (%s); recomputing it", key, e)
            self.store.delete(key)
            self._stats.load_failures += 1
            return None
        return kv, meta, tier, memoryview(blob).nbytes

    def _load_prefix(self, keys: list[str], n_tokens: int) -> tuple[Any, int, int]:
        """A DynamicCache holding the longest loadable stored prefix, its length in
        tokens (at most n_tokens - 1: generate must compute one prompt token) and
        the number of chunks loaded."""
        from transformers import DynamicCache


        t0 = time.perf_counter()
        cache = DynamicCache(config=self.model.config)
        hits = self.store.prefix_hits(keys)
        self._stats.chunk_misses += len(keys) - hits
        loaded: list[torch.Tensor] = []
        param = next(self.model.parameters())
        for key in keys[:hits]:
            chunk = self._load_chunk(key)
            if chunk is None:
                break
            kv, _, tier, nbytes = chunk
            loaded.append(kv)
            self._stats.bytes_loaded[tier] += nbytes
        self._stats.chunk_hits += len(loaded)
        reused = 0
        if loaded:
            kv = torch.cat(loaded, dim=2).to(param.dtype)
            reused = min(kv.shape[2], n_tokens - 1)
            for i, (k, v) in enumerate(to_hf_layers(kv[:, :, :reused])):
                cache.update(k.contiguous(), v.contiguous(), i)
        self._stats.load_seconds += time.perf_counter() - t0
        return cache, reused, len(loaded)

    def _store_new_chunks(self, cache: Any, keys: list[str], first_new: int) -> None:
        """Encode and store the prompt's full chunks this call computed."""
        if first_new >= len(keys):
            return
        t0 = time.perf_counter()
        cs = self.config.chunk_size
        start, end = first_new * cs, len(keys) * cs
        layers = cache.layers
        kv = from_hf_layers([layer.keys[:, :, start:end] for layer in layers],
                            [layer.values[:, :, start:end] for layer in layers])
        for i, chunk in enumerate(split_tokens(kv, cs)):
            index = first_new + i
            positions = torch.arange(index * cs, (index + 1) * cs)
            blob = self.codec.encode(chunk, self.fingerprint.digest, positions=positions)
            self.store.put(keys[index], blob, cost=float((index + 1) * cs))
            self._stats.chunks_stored += 1
        self._stats.store_seconds += time.perf_counter() - t0

    # ---- eviction before store (evict=StoreEviction(...)) ------------------------------
    def _generate_pruned(self, ids: torch.Tensor, keys: list[str], kwargs: dict[str, Any]) -> Any:
        """Load pruned chunks into an `EvictionCache`, prefill the rest but the last token
        under the scoring hooks, store the new full chunks pruned, then generate. The
        request itself keeps its computed tokens unpruned."""
        from kvmw.eviction.hf import eviction_hooks

        n_tokens = ids.shape[1]
        cache, reused, n_loaded = self._load_pruned_prefix(keys, n_tokens)
        self._stats.tokens_reused += reused
        self._stats.tokens_computed += n_tokens - reused
        device = self.model.device
        if n_tokens - 1 > reused:
            with torch.inference_mode(), eviction_hooks(self.model):
                self.model(ids[:, reused:n_tokens - 1].to(device), past_key_values=cache, use_cache=True,
                           logits_to_keep=1)
            self._store_pruned_chunks(cache, keys, n_loaded, n_tokens - 1)
        return self._generate_fn()(ids.to(device), past_key_values=cache, **kwargs)

    def _load_pruned_prefix(self, keys: list[str], n_tokens: int) -> tuple[Any, int, int]:
        from kvmw.eviction.hf import EvictionCache
        from kvmw.eviction.store import chunk_span

        t0 = time.perf_counter()
        hits = self.store.prefix_hits(keys)
        self._stats.chunk_misses += len(keys) - hits
        param = next(self.model.parameters())
        kvs, positions, seen = [], [], 0
        for key in keys[:hits]:
            chunk = self._load_chunk(key)
            if chunk is None:
                break
            kv, meta, tier, nbytes = chunk
            first, covered = chunk_span(meta)
            if first != seen or seen + covered > n_tokens - 1:  # generate must compute >= 1 token
                break
            kvs.append(kv)
            positions.append(torch.from_numpy(meta.positions.astype("int64")))
            seen += covered
            self._stats.bytes_loaded[tier] += nbytes
        self._stats.chunk_hits += len(kvs)
        policy = self.evict.policy
        if kvs:
            cache = EvictionCache.from_kv(self.model.config, torch.cat(kvs, dim=2).to(param.dtype),
                                          torch.cat(positions), seen, policy=policy)
        else:
            cache = EvictionCache(self.model.config, policy)
        self._stats.load_seconds += time.perf_counter() - t0
        return cache, seen, len(kvs)

    def _store_pruned_chunks(self, cache: Any, keys: list[str], first_new: int, end: int) -> None:
        """Score the computed tokens in context, prune each new full chunk, store it."""
        from kvmw.eviction.store import encode_pruned, uniform_keep

        cs = self.config.chunk_size
        last = min(len(keys), end // cs)
        if first_new >= last:
            return
        t0 = time.perf_counter()
        policy, budget = self.evict.policy, self.evict.budget
        layers = cache.layers
        offset = layers[0].stored - layers[0].seen  # computed tokens sit unpruned at position + offset
        scores = torch.stack([policy.score(layer.inputs()) for layer in layers])  # [L, H, stored]
        n_keep = budget.count(cs)
        recent = policy.protected_recent(n_keep)
        info = {"policy": policy.name, "budget": budget.tag}
        for index in range(first_new, last):
            start = index * cs
            s = start + offset
            kv = from_hf_layers([layer.keys[:, :, s:s + cs] for layer in layers],
                                [layer.values[:, :, s:s + cs] for layer in layers])
            keep = uniform_keep(scores[:, :, s:s + cs], n_keep, sinks=max(0, policy.sinks - start),
                                recent=max(0, recent - (end - start - cs)))
            blob = encode_pruned(self.codec, kv, keep, start, self.fingerprint.digest, info)
            self.store.put(keys[index], blob, cost=float((index + 1) * cs))
            self._stats.chunks_stored += 1
        self._stats.store_seconds += time.perf_counter() - t0
