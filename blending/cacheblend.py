"""CacheBlend: selective KV recomputation for fused RAG contexts.

Yao et al., "CacheBlend: Fast Large Language Model Serving for RAG with Cached
Knowledge Fusion", EuroSys 2025 (arXiv:2405.16444). Documents' KV, each
prefilled alone, lack the cross-attention to the documents before them. The
first layers run for every token; at the check layer the tokens whose fresh KV
deviates most from the cached KV (high-KV-deviation tokens) are chosen, a
`recompute_ratio` share of the cached tokens, and only they (with the question)
run in the later layers, their fresh KV written over the cached one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmw.blending.strategy import BlendPlan, BlendStrategy, register


@register
@dataclass
class CacheBlend(BlendStrategy):
    name: ClassVar[str] = "cacheblend"
    recompute_ratio: float = 0.15
    check_layer: int = 1  # layers 0..check_layer run for every token

    @property
    def full_layers(self) -> int:
        return self.check_layer + 1

    def select(self, plan: BlendPlan, deviation: torch.Tensor | None) -> torch.Tensor:
        chosen = torch.zeros_like(plan.cached)
        budget = round(self.recompute_ratio * plan.num_cached)
        if budget == 0 or deviation is None:
            return chosen
        score = deviation.float().masked_fill(~plan.cached.to(deviation.device), float("-inf"))
        chosen[score.topk(budget).indices.to(chosen.device)] = True
        return chosen
