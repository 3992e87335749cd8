"""The blend itself, engine-free: documents' reused KV in, the prompt's blended KV out.

A prompt's KV is held densely, one ``[1, H, N, D]`` key and value tensor per
layer. Documents' stored KV is placed at their spans, re-rotated to their
offsets (`place_documents`); then `blend` runs the tokens a strategy picks
through every layer over that KV, their fresh K/V written over the reused one
(`ScatterKV`), so the tokens after them attend to a context that has seen the
documents before it.

The engine is reached only through a `LayerRunner` (run one decoder layer for
some tokens at their positions over the dense KV): `kvmw.integrations.hf`
drives a transformers model, `kvmw.integrations.vllm` vLLM's own model. Both
run this loop, so a prompt gets the same selection beneath either engine.

Two bounds make the loop fit an engine that computes part of the prompt itself:
positions before `computed_from` already hold exact KV (vLLM's own prefix
cache) and never run; positions from `computed_to` on (the question) are left to
the engine, which computes them after the blend in its normal forward. The probe
of a query-aware strategy still runs the question: it is how the selection is made.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from kvmw.blending.strategy import BlendPlan, BlendStrategy, Deviation

#: what a document's KV is computed after; see `document_context`
DOCUMENT_CONTEXTS = ("preamble", "stand_in", "none")


@dataclass
class ScatterKV:
    """Per-layer full KV [1, H, N, D]; `update` scatters the running tokens' fresh KV in
    (at `index`, their positions) and hands the whole layer's KV to their attention.

    `deviation`, when a list, receives the layer's `Deviation` (fresh vs previously
    held KV of the `index` tokens) before the fresh KV overwrites the held one.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    index: torch.Tensor
    deviation: list[Deviation] | None = field(default=None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """`key_states`, `value_states`: [1, H, len(index), D] (transformers' Cache.update)."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.deviation is not None:
            old_k, old_v = k[:, :, self.index], v[:, :, self.index]
            self.deviation.append(Deviation((key_states - old_k).float().pow(2).sum(dim=(0, 3)),
                                            (value_states - old_v).float().pow(2).sum(dim=(0, 3))))
        k[:, :, self.index] = key_states.to(k.dtype)
        v[:, :, self.index] = value_states.to(v.dtype)
        return k, v


class LayerRunner(Protocol):
    """One engine's way to run its decoder layers for a subset of a prompt's tokens."""

    num_layers: int

    def embed(self, ids: torch.Tensor) -> Any:
        """The first layer's input state for tokens `ids` [S]."""

    def run_layer(self, i: int, state: Any, positions: torch.Tensor, kv: ScatterKV) -> Any:
        """Layer `i` for the tokens of `state` at `positions` [S] (== ``kv.index``), attending
        causally by position over the whole layer KV `kv` after writing their own into it."""

    def keep(self, state: Any, mask: torch.Tensor) -> Any:
        """`state` narrowed to the tokens where `mask` [S] is true."""

    def probe(self, num_positions: int) -> AbstractContextManager[torch.Tensor]:
        """An [N] fp32 tensor that attention run inside the block adds each position's
        attention to, summed over query rows, heads and layers."""


@dataclass
class BlendWork:
    """What `blend` ran: `index`, the positions that ran in the last layer; `token_layers`,
    the (token, layer) pairs computed (full prefill's: N x layers)."""

    index: torch.Tensor
    token_layers: int
    full_layers: int
    attention: torch.Tensor | None = None


def empty_kv(num_layers: int, num_positions: int, heads: int, dim: int, dtype: torch.dtype,
             device: Any = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed dense per-layer keys and values [1, heads, N, dim]."""
    keys = [torch.zeros(1, heads, num_positions, dim, dtype=dtype, device=device) for _ in range(num_layers)]
    return keys, [torch.zeros_like(k) for k in keys]


def place_documents(keys: list[torch.Tensor], values: list[torch.Tensor], spans: Sequence[tuple[int, int]],
                    doc_kvs: Sequence[torch.Tensor], rotate: Any, first_position: int,
                    start: int = 0) -> torch.Tensor:
    """Write each document's canonical KV [L, 2, n, H, D] (computed at positions
    `first_position`..) into its span, keys moved to the span's offset by `rotate(keys,
    delta)`; positions before `start` are left as they are. The cached mask [N]."""
    n = keys[0].shape[2]
    cached = torch.zeros(n, dtype=torch.bool)
    for (s, e), kv in zip(spans, doc_kvs):
        a = max(s, start)
        if a >= e:
            continue
        moved = rotate(kv[:, 0, a - s:e - s].transpose(1, 2), s - first_position)  # [L, H, T, D]
        plain = kv[:, 1, a - s:e - s].transpose(1, 2)
        for i in range(len(keys)):
            keys[i][0, :, a:e] = moved[i].to(device=keys[i].device, dtype=keys[i].dtype)
            values[i][0, :, a:e] = plain[i].to(device=values[i].device, dtype=values[i].dtype)
        cached[a:e] = True
    return cached


def run_tokens(runner: LayerRunner, ids: torch.Tensor, index: torch.Tensor, keys: list[torch.Tensor],
               values: list[torch.Tensor]) -> None:
    """Plain prefill of the tokens at `index` through every layer over the dense KV (what
    a document's stored KV is: its tokens after its context)."""
    device = keys[0].device
    index = index.to(device)
    state = runner.embed(ids[index.cpu()])
    for i in range(runner.num_layers):
        state = runner.run_layer(i, state, index, ScatterKV(keys, values, index))


def _over_all(dev: Deviation, index: torch.Tensor, n: int) -> Deviation:
    """A deviation measured for the `index` tokens, spread over all N positions (0 elsewhere)."""
    if index.numel() == n:
        return dev
    k = dev.keys.new_zeros(dev.keys.shape[0], n).index_copy_(1, index.cpu(), dev.keys.cpu())
    v = dev.values.new_zeros(dev.values.shape[0], n).index_copy_(1, index.cpu(), dev.values.cpu())
    return Deviation(k, v)


@torch.inference_mode()
def blend(runner: LayerRunner, ids: torch.Tensor, plan: BlendPlan, keys: list[torch.Tensor],
          values: list[torch.Tensor], strategy: BlendStrategy, computed_from: int = 0,
          computed_to: int | None = None) -> BlendWork:
    """Selective recomputation over the dense KV (documents already placed, `plan.cached`
    their tokens): optionally probe, run the strategy's full layers, select, recompute.
    Positions ``[computed_from, computed_to)`` that are not cached always run; cached
    ones run where the strategy selects them."""
    n, device = len(ids), keys[0].device
    computed_to = n if computed_to is None else computed_to
    cached = plan.cached
    positions = torch.arange(n)
    region = (positions >= computed_from) & (positions < computed_to)
    L = runner.num_layers
    full = min(strategy.full_layers, L)
    refine = set(strategy.refine_layers)
    token_layers = 0
    if strategy.probes:  # the uncached tokens alone over the reused KV: where do they look?
        index = (~cached & (positions >= computed_from)).nonzero().squeeze(1).to(device)
        if index.numel():
            with runner.probe(n) as mass:
                state = runner.embed(ids[index.cpu()])
                for i in range(L):
                    state = runner.run_layer(i, state, index, ScatterKV(keys, values, index))
            plan.attention = mass.cpu()
            token_layers += index.numel() * L
        else:
            plan.attention = torch.zeros(n)
    if full:
        index = region.nonzero().squeeze(1)
    else:  # no layer for everyone: the strategy chooses up front
        index = ((strategy.select(plan, None) | ~cached) & region).nonzero().squeeze(1)
    index = index.to(device)
    if index.numel() == 0:
        return BlendWork(index, token_layers, full, plan.attention)
    state = runner.embed(ids[index.cpu()])
    for i in range(L):
        deviation: list[Deviation] | None = [] if i == full - 1 or i in refine else None
        state = runner.run_layer(i, state, index, ScatterKV(keys, values, index, deviation))
        token_layers += index.numel()
        if i == full - 1:  # the check layer: every token ran, keep the chosen ones
            chosen = strategy.select(plan, _over_all(deviation[0], index, n)) | ~cached
            keep = chosen[index.cpu()].to(device)
        elif i in refine and i < L - 1:  # gradual filtering: narrow the set by this layer's deviation
            keep = strategy.refine(plan, i, index, deviation[0]).to(device)
        else:
            continue
        index, state = index[keep], runner.keep(state, keep)
        if index.numel() == 0:
            break
    return BlendWork(index, token_layers, full, plan.attention)


def document_context(kind: str, preamble: Sequence[int] | torch.Tensor | None,
                     stand_in: Sequence[int] | torch.Tensor | None) -> torch.Tensor | None:
    """The tokens documents are computed after (part of their chunk key): "stand_in" the
    preamble then the stand-in document's ids, "preamble" the preamble alone, "none" nothing."""
    pre = None if preamble is None or len(preamble) == 0 else torch.as_tensor(preamble, dtype=torch.long)
    if kind == "none":
        return None
    if kind == "preamble":
        return pre
    if kind == "stand_in":
        if stand_in is None:
            raise ValueError("document_context='stand_in' needs the stand-in document's ids")
        ids = torch.as_tensor(stand_in, dtype=torch.long)
        return ids if pre is None else torch.cat([pre, ids])
    raise ValueError(f"document_context must be one of {DOCUMENT_CONTEXTS}; got {kind!r}")
