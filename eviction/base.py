"""The interface every eviction policy shares: a budget, per-layer score inputs, and the
scores -> kept indices step with protected sinks and a protected recent window.

A policy scores every cached token of one layer per KV head (`[kv_heads, tokens]`,
higher = keep); `Policy.keep` turns the scores into the sorted indices to keep,
the same count for every head so the layer stays one dense tensor.
`Policy.keep_layers` does it for every layer at once: by default each layer keeps the
same count, while a policy whose scores compare across layers (KVzip) can share one
budget over all of them (`layer_counts`: layers whose scores are high keep more). Tokens are
identified by their index in the layer's cache; their RoPE positions travel
alongside (`ScoreInputs.positions`), since after a first eviction index and
position differ.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from kvmw.eviction.attention import pool_groups, window_attention


@dataclass(frozen=True)
class Budget:
    """How many tokens a sequence keeps: a share of it (`ratio`) or a fixed count (`tokens`)."""

    ratio: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError("Budget needs exactly one of ratio or tokens")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"budget ratio must be in (0, 1], got {self.ratio}")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"budget tokens must be >= 1, got {self.tokens}")

    @classmethod
    def parse(cls, text: str | float | Budget) -> Budget:
        """``"25%"``, ``0.25`` -> a ratio; ``"256"``, ``256`` -> a count."""
        if isinstance(text, Budget):
            return text
        s = str(text).strip()
        if s.endswith("%"):
            return cls(ratio=float(s[:-1]) / 100)
        value = float(s)
        return cls(ratio=value) if value < 1 or "." in s else cls(tokens=int(value))

    def count(self, n: int) -> int:
        """Tokens kept out of `n` (never more than `n`)."""
        if self.tokens is not None:
            return min(n, self.tokens)
        return min(n, max(1, math.ceil(self.ratio * n)))

    @property
    def tag(self) -> str:
        return f"{self.ratio * 100:g}%" if self.ratio is not None else str(self.tokens)


@dataclass
class ScoreInputs:
    """What one layer offers a policy. Tensors of one sequence (no batch axis).

    keys / values: [kv_heads, T, D], post-RoPE as cached. positions: [kv_heads, T] int64.
    queries: [q_heads, W, D] post-RoPE queries of the last W tokens seen (policies that read
    attention rows); query_positions: [W]. mass: [kv_heads, T] attention each cached token
    has received so far, summed over the query heads of its group (H2O). reconstruction:
    [kv_heads, T] the largest attention each token received from the context-reconstruction
    pass (KVzip).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    queries: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    mass: torch.Tensor | None = None
    scaling: float | None = None
    reconstruction: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @cached_property
    def attention(self) -> torch.Tensor:
        """softmax(q K^T * scale) of the stored query rows: [q_heads, W, T] fp32 (causal by position)."""
        if self.queries is None or self.query_positions is None:
            raise ValueError("this policy needs the queries of the last tokens (attach the eviction hooks)")
        return window_attention(self.queries, self.keys, self.query_positions, self.positions, self.scaling)

    def pooled(self, per_query_head: torch.Tensor) -> torch.Tensor:
        """[q_heads, ...] -> [kv_heads, ...]: the mean over each KV head's query group (GQA)."""
        return pool_groups(per_query_head, self.num_kv_heads)


@dataclass
class Policy(ABC):
    """Scores tokens of one layer per KV head; keeps the best within a budget.

    sinks: the first `sinks` cached tokens are never evicted (attention sinks).
    window: the newest `window` cached tokens are never evicted.
    """

    sinks: int = 0
    window: int = 0

    name: ClassVar[str] = "policy"
    #: attention mass over every query row is accumulated (H2O): the hooks compute all rows
    accumulates: ClassVar[bool] = False
    #: scores come from a second pass that repeats the context (KVzip): run
    #: `kvmw.eviction.hf.reconstruct` after the prefill, before compressing
    reconstructs: ClassVar[bool] = False

    @property
    def query_rows(self) -> int:
        """How many of the newest queries per layer the score reads (0: none)."""
        return 0

    @abstractmethod
    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """[kv_heads, T] fp32, higher = more worth keeping."""

    def protected_recent(self, n_keep: int) -> int:
        """Newest tokens kept whatever their score (H2O sizes its window from the budget)."""
        return self.window

    def keep(self, inputs: ScoreInputs, budget: Budget | int) -> torch.Tensor:
        """Sorted indices [kv_heads, k] of the tokens to keep.

        Protected tokens (sinks, recent window) are never dropped, so k is at least
        their count (and at most T)."""
        n = inputs.num_tokens
        n_keep = budget if isinstance(budget, int) else budget.count(n)
        return select(self.score(inputs), n_keep, self.sinks, self.protected_recent(n_keep))

    def keep_layers(self, layers: list[ScoreInputs], budget: Budget | int) -> list[torch.Tensor]:
        """`keep` for every layer of a cache: each layer keeps `budget` of its own tokens."""
        return [self.keep(inputs, budget) for inputs in layers]


def protect(scores: torch.Tensor, sinks: int = 0, recent: int = 0) -> torch.Tensor:
    """fp32 copy of `scores` [..., T] with the first `sinks` and the last `recent` columns at +inf."""
    T = scores.shape[-1]
    s = scores.float().clone()
    s[..., :min(sinks, T)] = math.inf
    if recent:
        s[..., T - min(recent, T):] = math.inf
    return s


def layer_counts(scores: list[torch.Tensor], n_keep: list[int], sinks: int = 0, recent: int = 0) -> torch.Tensor:
    """How many tokens each layer keeps [L] when the layers share one budget of
    `sum(n_keep)` tokens per KV head (`n_keep[l]`: layer l's share of a uniform split).

    Each layer's KV heads keep the same count, so a layer stays one dense tensor: the
    j-th slot of layer l (each of its heads keeps one more token) is worth the largest
    j-th best score among its heads, and the best slots over all layers win, i.e. one
    threshold over every layer's scores (KVzip, Kim et al. 2025, thresholds all heads'
    scores at once; with equal counts per head, a layer gets its count from its best
    head). Protected tokens (sinks, recent) are +inf, so every layer keeps them.
    scores: per layer [H, T_l] (T_l may differ)."""
    L, T = len(scores), max(s.shape[-1] for s in scores)
    slots = torch.full((L, T), -math.inf, device=scores[0].device)
    for i, s in enumerate(scores):
        ranked = protect(s, sinks, recent).sort(-1, descending=True).values  # [H, T_l]
        slots[i, :ranked.shape[-1]] = ranked.amax(0)
    best = slots.reshape(-1).topk(sum(n_keep), sorted=False).indices
    return torch.bincount(best // T, minlength=L)


def select(scores: torch.Tensor, n_keep: int, sinks: int = 0, recent: int = 0) -> torch.Tensor:
    """Top-`n_keep` indices per row of `scores` [H, T], sorted, with the first `sinks` and
    the last `recent` columns always among them."""
    H, T = scores.shape
    sinks, recent = min(sinks, T), min(recent, T)
    n_keep = min(T, max(n_keep, min(T, sinks + recent)))
    if n_keep >= T:
        return torch.arange(T, device=scores.device).expand(H, T).contiguous()
    return protect(scores, sinks, recent).topk(n_keep, dim=-1, sorted=False).indices.sort(dim=-1).values
