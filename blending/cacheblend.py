"""CacheBlend: selective KV recomputation for fused RAG contexts.

Yao et al., "CacheBlend: Fast Large Language Model Serving for RAG with Cached
Knowledge Fusion", EuroSys 2025 (arXiv:2405.16444). Documents' KV, each
prefilled alone, lack the cross-attention to the documents before them. The
first layers run for every token; at the check layer the tokens whose fresh KV
deviates most from the cached KV (high-KV-deviation tokens) are chosen, a
`recompute_ratio` share of the cached tokens, and only they (with the question)
run in the later layers, their fresh KV written over the cached one.

Gradual filtering (the paper's section 4.3): with `gradual=(m1, m2, ...)` the
check layer keeps `m1 * recompute_ratio` of the cached tokens, the next layer
narrows them to `m2 * recompute_ratio` by its own deviation, and so on, down to
`recompute_ratio` for the remaining layers. `sink_tokens` first tokens of every
document are always recomputed (inside the budget): each was the first token of
its own prefill, an attention sink whose cached KV a fused prompt does not want.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvmw.blending.strategy import BlendPlan, BlendStrategy, register

DEVIATIONS = ("kv", "keys", "values")


@register
@dataclass
class CacheBlend(BlendStrategy):
    name: ClassVar[str] = "cacheblend"
    recompute_ratio: float = 0.15
    check_layer: int = 0  # layers 0..check_layer run for every token
    gradual: tuple[float, ...] = (3.0, 2.0, 1.5)  # budget multipliers at check_layer, check_layer + 1, ...
    sink_tokens: int = 0  # each document's first tokens, always recomputed (within the budget)
    deviation: str = "kv"  # what deviates: "kv" (keys + values), "keys" or "values"
    head_max: bool = False  # score = max over heads of mean-normalized deviation (else the sum)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.deviation not in DEVIATIONS:
            raise ValueError(f"deviation must be one of {DEVIATIONS}; got {self.deviation!r}")
        if any(m < 1.0 for m in self.gradual):
            raise ValueError(f"gradual multipliers narrow the set down to the budget: >= 1; got {self.gradual}")

    @property
    def full_layers(self) -> int:
        return self.check_layer + 1

    @property
    def refine_layers(self) -> tuple[int, ...]:
        return tuple(range(self.full_layers, self.full_layers + len(self.gradual)))

    def budget(self, plan: BlendPlan, step: int = -1) -> int:
        """Cached tokens kept after selection step `step` (0: the check layer; -1: the last)."""
        m = self.gradual[step] if 0 <= step < len(self.gradual) else 1.0
        return min(plan.num_cached, round(m * self.recompute_ratio * plan.num_cached))

    def score(self, deviation: Any) -> torch.Tensor:
        """One score per token from a `Deviation` (a 1-D tensor is taken as already scored)."""
        if isinstance(deviation, torch.Tensor):
            return deviation.float()
        parts = {"kv": (deviation.keys, deviation.values), "keys": (deviation.keys,),
                 "values": (deviation.values,)}[self.deviation]
        if self.head_max:  # each head's deviation relative to its own mean, the largest one
            return torch.stack([p / p.mean(dim=1, keepdim=True).clamp_min(1e-12) for p in parts]).sum(0).amax(0)
        return sum(p.float().sum(0) for p in parts)

    def sinks(self, plan: BlendPlan) -> torch.Tensor:
        forced = torch.zeros_like(plan.cached)
        for start, end in plan.spans:
            forced[start:min(end, start + self.sink_tokens)] = True
        return forced & plan.cached

    def _top(self, score: torch.Tensor, candidates: torch.Tensor, forced: torch.Tensor, budget: int) -> torch.Tensor:
        """Bool mask: `forced` plus the highest-scoring other `candidates`, `budget` in all
        (none forced when they alone exceed it: fewer than one sink token per document fits)."""
        if int(forced.sum()) > budget:
            forced = torch.zeros_like(forced)
        chosen, open_ = forced.clone(), candidates & ~forced
        rest = min(budget - int(forced.sum()), int(open_.sum()))
        if rest > 0:
            chosen[score.float().cpu().masked_fill(~open_, float("-inf")).topk(rest).indices] = True
        return chosen

    def select(self, plan: BlendPlan, deviation: Any) -> torch.Tensor:
        budget = self.budget(plan, 0)
        if budget == 0 or deviation is None:
            return torch.zeros_like(plan.cached)
        return self._top(self.score(deviation), plan.cached, self.sinks(plan), budget)

    def refine(self, plan: BlendPlan, layer: int, index: torch.Tensor, deviation: Any) -> torch.Tensor:
        cached = plan.cached[index.cpu()]
        forced = self.sinks(plan)[index.cpu()]
        return self._top(self.score(deviation), cached, forced, self.budget(plan, layer - self.full_layers + 1)) | ~cached
