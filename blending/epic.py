"""EPIC: position-independent context caching with chunk-head recomputation.

Hu et al., "EPIC: Efficient Position-Independent Context Caching for Serving
Large Language Models", ICML 2025 (arXiv:2410.15332), the LegoLink scheme: the
first tokens of every separately prefilled chunk act as attention sinks that a
fused context does not want, so those tokens (and the question) are recomputed
in every layer, with no full layer to pick them. Here the head length is a
`recompute_ratio` share of each document, so EPIC and CacheBlend can be compared
at the same number of recomputed tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmw.blending.strategy import BlendPlan, BlendStrategy, register


@register
@dataclass
class EPIC(BlendStrategy):
    name: ClassVar[str] = "epic"
    recompute_ratio: float = 0.15

    def select(self, plan: BlendPlan, deviation: torch.Tensor | None) -> torch.Tensor:
        chosen = torch.zeros_like(plan.cached)
        for start, end in plan.spans:
            chosen[start:start + math.ceil(self.recompute_ratio * (end - start))] = True
        return chosen
