"""Query-aware selection: recompute the document text the question reads.

CacheBlend ranks tokens by how far their cached KV is from the fused prompt's,
which is not the same as mattering for the answer: on small models the tokens
that deviate most are often ones the question never reads. Query-aware
recomputation (A^3: Zhou et al., "Attention-Aware Accurate KV Cache Fusion for
Fast Large Language Model Serving", arXiv:2511.17560, 2025) ranks them by the question's own attention
instead: a probe pass runs the question over the reused KV (`BlendStrategy.probes`),
then each document recomputes the `window` tokens either side of the tokens the
question attended to most, a `recompute_ratio` share of its tokens in all. Windows,
not single tokens: a fact is a phrase, and a token's KV carries its neighbours'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kvmw.blending.strategy import BlendPlan, BlendStrategy, register


@register
@dataclass
class QueryAware(BlendStrategy):
    name: ClassVar[str] = "query_aware"
    probes: ClassVar[bool] = True
    recompute_ratio: float = 0.15
    window: int = 6  # tokens either side of each most-attended token

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 0:
            raise ValueError(f"window must be >= 0; got {self.window}")

    def select(self, plan: BlendPlan, deviation: Any) -> torch.Tensor:
        if plan.attention is None:
            raise ValueError("query_aware selects from the probe's attention (plan.attention); none was given")
        chosen = torch.zeros_like(plan.cached)
        width = 2 * self.window + 1
        for start, end in plan.spans:
            budget = round(self.recompute_ratio * (end - start))
            if budget == 0:
                continue
            score = plan.attention[start:end].float().cpu()
            centers = torch.zeros(end - start)
            centers[score.topk(min(math.ceil(budget / width), end - start)).indices] = 1.0
            windows = F.max_pool1d(centers[None, None], width, stride=1, padding=self.window)[0, 0] > 0
            # exactly `budget` tokens: the windows' tokens first (overlaps leave room, a window
            # at a border may overflow), each group by attention
            priority = score + windows.float() * (score.max() - score.min() + 1.0)
            chosen[start + priority.topk(budget).indices] = True
        return chosen & plan.cached
