"""Scheduler-side bookkeeping of RAG blending beneath vLLM, free of vLLM imports.

A request asks for blending through its ``kv_transfer_params``::

    {"kvmw": {"documents": [ids or text, ...], "strategy": "query_aware",
              "recompute_ratio": 0.15, "document_context": "stand_in"}}

(`kvmw.integrations.vllm.rag_request` builds it). Each document must appear in
the prompt's token ids, in order; everything before the first is the preamble,
everything after the last the question. A document's key is the HF hook's
chunk key of its tokens after its context (preamble + stand-in document by
default), so documents stored by either engine are hits for the other.

The scheduler looks the documents' keys up in order and reports the tokens up
to the end of the last document of the leading run the worker's own tiers hold
as computed by the connector (after vLLM's own prefix-cache hit, which holds
exact KV). Documents found only on a remote tier are read into the worker's
memory off the step, for the next prompt: a step never waits on the network. The worker
fills them in the step the request is first scheduled (`BlendSpec`): the
documents' KV re-rotated to their offsets, then the strategy's recomputation
with vLLM's model. vLLM then computes the rest (the question) in its forward.
Documents not stored yet are computed after their context and stored by the
worker in that same step, so the next prompt reuses them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvmw.blending.blend import DOCUMENT_CONTEXTS
from kvmw.blending.strategy import STRATEGIES
from kvmw.errors import KVMWError

#: the key of kvmw's part in a request's kv_transfer_params
PARAMS_KEY = "kvmw"


class BlendRequestError(KVMWError, ValueError):
    """A request's kvmw blending parameters are malformed or its documents are not in its prompt."""


@dataclass
class BlendRequest:
    """What a request asks: its documents (token ids) and how to blend them."""

    documents: list[list[int]]
    strategy: str = "query_aware"
    recompute_ratio: float = 0.15
    document_context: str = "stand_in"
    #: the stand-in document's ids (None: kvmw.blending.stand_in's text)
    stand_in: list[int] | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any] | None, tokenize: Callable[[str], list[int]]
                    ) -> "BlendRequest | None":
        """The request's blending ask, None when it makes none; `tokenize` turns a text
        document into ids (no special tokens)."""
        import kvmw.blending  # noqa: F401  (registers every strategy)

        ask = (params or {}).get(PARAMS_KEY)
        if not isinstance(ask, dict) or "documents" not in ask:
            return None
        docs = ask["documents"]
        if not isinstance(docs, list) or not docs:
            raise BlendRequestError("kvmw.documents must be a non-empty list of texts or token-id lists")
        ids = [_token_ids(d, tokenize, "each kvmw document") for d in docs]
        stand_in = ask.get("stand_in")
        stand_in = None if stand_in is None else _token_ids(stand_in, tokenize, "kvmw.stand_in")
        strategy = ask.get("strategy", cls.strategy)
        if strategy not in STRATEGIES:
            raise BlendRequestError(f"unknown kvmw strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        ratio = ask.get("recompute_ratio", cls.recompute_ratio)
        if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
            raise BlendRequestError(f"kvmw.recompute_ratio must be a number in [0, 1]; got {ratio!r}")
        context = ask.get("document_context", cls.document_context)
        if context not in DOCUMENT_CONTEXTS:
            raise BlendRequestError(f"kvmw.document_context must be one of {DOCUMENT_CONTEXTS}; got {context!r}")
        return cls(ids, strategy, float(ratio), context, stand_in)


def _token_ids(part: Any, tokenize: Callable[[str], list[int]], what: str) -> list[int]:
    if isinstance(part, str):
        return list(tokenize(part))
    if isinstance(part, list) and part and all(isinstance(t, int) and not isinstance(t, bool) for t in part):
        return list(part)
    raise BlendRequestError(f"{what} is a text or a non-empty list of token ids")


def find_spans(prompt: Sequence[int], documents: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Each document's (start, end) in the prompt, in order, none overlapping the one before."""
    p = np.asarray(prompt, dtype=np.int64)
    spans: list[tuple[int, int]] = []
    at = 0
    for j, doc in enumerate(documents):
        d = np.asarray(doc, dtype=np.int64)
        n = len(d)
        found = -1
        if 0 < n <= len(p) - at:
            windows = np.lib.stride_tricks.sliding_window_view(p[at:], n)
            starts = np.flatnonzero(windows[:, 0] == d[0])
            hits = starts[(windows[starts] == d).all(axis=1)] if starts.size else starts
            if hits.size:
                found = at + int(hits[0])
        if found < 0:
            raise BlendRequestError(f"kvmw document {j} ({n} tokens) is not in the prompt after token {at} "
                                    "(build the prompt from the documents' own token ids: rag_request)")
        spans.append((found, found + n))
        at = found + n
    return spans


@dataclass
class BlendSpec:
    """Scheduler -> worker, in the step the request is first scheduled: fill the tokens
    ``[held, end)`` (the documents ``0..loaded-1`` among them, re-rotated, then the
    strategy's recomputation), then compute and store the documents not held."""

    req_id: str
    prompt: list[int]
    spans: list[tuple[int, int]]
    keys: list[str]
    context: list[int]
    loaded: int
    held: int
    end: int
    block_ids: list[int]
    strategy: str
    recompute_ratio: float
    #: documents only a remote tier holds: read into the worker's memory off the step (a
    #: hit for the next prompt), neither loaded nor computed now
    prefetch: list[int] = field(default_factory=list)

    def unfilled(self, start: int, block_size: int) -> list[int]:
        """The blocks of tokens ``[start, end)`` (`start` block-aligned or `held`): what vLLM
        recomputes when the blend fills nothing from `start` on."""
        return self.block_ids[start // block_size: -(-self.end // block_size)] if self.end > start else []


@dataclass
class _Blend:
    request: BlendRequest
    prompt: list[int]
    spans: list[tuple[int, int]]
    keys: list[str]
    context: list[int]
    num_tokens: int
    loaded: int = 0
    prefetch: list[int] = field(default_factory=list)
    held: int = 0
    end: int = 0
    block_ids: list[int] = field(default_factory=list)
    #: the spec goes out at the next scheduling of the request
    pending: bool = False
    #: what the worker reported (tokens recomputed, documents per tier)
    outcome: dict[str, Any] = field(default_factory=dict)
    #: a blend of this request did not load all it was promised: it is not blended again
    failed: bool = False


class BlendPlanner:
    """The blending requests of one scheduler. `lookup(req_id, keys)` answers how many
    leading keys kvmw holds (None: ask again later)."""

    def __init__(self, block_size: int, lookup: Callable[[str, list[str]], tuple[int, int] | None]) -> None:
        self.block_size = block_size
        self.lookup = lookup
        self.requests: dict[str, _Blend] = {}

    def add(self, req_id: str, prompt: Sequence[int], request: BlendRequest, keys: list[str],
            context: list[int], spans: list[tuple[int, int]]) -> None:
        self.requests[req_id] = _Blend(request, list(prompt), spans, keys, context, len(prompt))

    # ---- vLLM: get_num_new_matched_tokens ---------------------------------------------------
    def matched_tokens(self, req_id: str, num_computed: int) -> int | None:
        """Tokens past vLLM's own hit that the blend fills (never the last prompt token)."""
        b = self.requests[req_id]
        hits = self.lookup(req_id, b.keys)
        if hits is None:
            return None
        found, n = hits  # a document only on a remote tier is read off the step, for the next prompt
        if b.failed:  # vLLM recomputes it: never promise the same documents twice
            found = n = 0
        b.prefetch = list(range(n, found))
        end = min(b.spans[n - 1][1], b.num_tokens - 1) if n else 0
        b.held, b.block_ids, b.pending = num_computed, [], True
        b.loaded = n if end > num_computed else 0
        b.end = max(end, num_computed)
        return b.end - num_computed

    # ---- vLLM: update_state_after_alloc / build_connector_meta -----------------------------------
    def allocated(self, req_id: str, block_ids: Sequence[int]) -> None:
        b = self.requests.get(req_id)
        if b is not None:
            b.block_ids = list(block_ids)

    def scheduled(self, req_id: str, block_ids: Sequence[int] | None, replace: bool) -> BlendSpec | None:
        """The request runs this step with `block_ids` (all of them with `replace`, else the
        new ones): its spec when the blend is still to do."""
        b = self.requests.get(req_id)
        if b is None:
            return None
        if replace:
            b.block_ids = list(block_ids or [])
        elif block_ids:
            b.block_ids.extend(block_ids)
        if not b.pending:
            return None
        b.pending = False
        r = b.request
        return BlendSpec(req_id, b.prompt, b.spans, b.keys, b.context, b.loaded, b.held, b.end, list(b.block_ids),
                         r.strategy, r.recompute_ratio, b.prefetch)

    def blended_blocks(self, req_id: str) -> list[int]:
        """The request's blocks whose KV is not an exact prefix (from the first that holds a
        reused document token): vLLM's prefix cache must never serve them. The blocks
        before hold the preamble, computed over the preamble alone, as vLLM would."""
        b = self.requests.get(req_id)
        if b is None or b.end <= b.held:
            return []
        return b.block_ids[max(b.held, b.spans[0][0]) // self.block_size:]

    def load_failed(self, req_id: str) -> None:
        """The worker could not fill all the blend promised (vLLM recomputes the rest)."""
        b = self.requests.get(req_id)
        if b is not None:
            b.failed = True

    def finished(self, req_id: str) -> dict[str, Any] | None:
        """What the request's response tells of the blend (kv_transfer_params)."""
        b = self.requests.pop(req_id, None)
        if b is None:
            return None
        return {"documents": len(b.keys), "documents_reused": b.loaded, "reused_tokens": b.end - b.held,
                "vllm_cached_tokens": b.held,
                "strategy": b.request.strategy, "recompute_ratio": b.request.recompute_ratio, **b.outcome}
