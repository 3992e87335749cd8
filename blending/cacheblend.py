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
`recompute_ratio` for the remaining layers.

The check layer is 1, as in the paper and LMCache: layer 0's K/V are a function
of the token and its position alone (its input is the embedding), so the cached
KV, re-rotated, equals the fresh one there and their deviation is rounding noise;
a selection at layer 0 is a random one (measured: docs/benchmarks.md#rag-blending).
The deviation is that of keys and values together, summed over heads: the options
that scored keys or values alone, by their largest head, or forced each document's
first tokens in measured no better and were dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvmw.blending.strategy import BlendPlan, BlendStrategy, register

@register
@dataclass
class CacheBlend(BlendStrategy):
    name: ClassVar[str] = "cacheblend"
    recompute_ratio: float = 0.15
    check_layer: int = 1  # layers 0..check_layer run for every token
    gradual: tuple[float, ...] = (3.0, 2.0, 1.5)  # budget multipliers at check_layer, check_layer + 1, ...

    def __post_init__(self) -> None:
        super().__post_init__()
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

    @staticmethod
    def score(deviation: Any) -> torch.Tensor:
        """One score per token from a `Deviation`, keys' and values' summed over heads (a
        1-D tensor is taken as already scored)."""
        if isinstance(deviation, torch.Tensor):
            return deviation.float()
        return deviation.keys.float().sum(0) + deviation.values.float().sum(0)

    @staticmethod
    def _top(score: torch.Tensor, candidates: torch.Tensor, budget: int) -> torch.Tensor:
        """Bool mask of the `budget` highest-scoring `candidates`."""
        chosen = torch.zeros_like(candidates)
        budget = min(budget, int(candidates.sum()))
        if budget > 0:
            chosen[score.float().cpu().masked_fill(~candidates, float("-inf")).topk(budget).indices] = True
        return chosen

    def select(self, plan: BlendPlan, deviation: Any) -> torch.Tensor:
        budget = self.budget(plan, 0)
        if budget == 0 or deviation is None:
            return torch.zeros_like(plan.cached)
        return self._top(self.score(deviation), plan.cached, budget)

    def refine(self, plan: BlendPlan, layer: int, index: torch.Tensor, deviation: Any) -> torch.Tensor:
        cached = plan.cached[index.cpu()]
        return self._top(self.score(deviation), cached, self.budget(plan, layer - self.full_layers + 1)) | ~cached
