"""Query-aware selection: recompute the document text the question reads.

CacheBlend ranks tokens by how far their cached KV is from the fused prompt's,
which is not the same as mattering for the answer: on small models the tokens
that deviate most are often ones the question never reads. Query-aware
recomputation (A^3: Zhou et al., "Attention-Aware Accurate KV Cache Fusion for
Fast Large Language Model Serving", arXiv:2511.17560, 2025) ranks them by the
question's own attention instead: a probe pass runs the question over the reused
KV (`BlendStrategy.probes`), then each document recomputes the `window` tokens
either side of the tokens the question attended to most. Windows, not single
tokens: a fact is a phrase, and a token's KV carries its neighbours'.

The budget, a `recompute_ratio` share of all document tokens, is split across
documents part by length and part (`attention_share`) by the attention each
document drew, so the documents the question reads get more of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kvmw.blending.strategy import BlendPlan, BlendStrategy, register


def split_budget(total: int, lengths: list[int], weights: torch.Tensor) -> list[int]:
    """`total` tokens over documents in proportion to `weights`, none above its length,
    exactly `total` in all when they fit (largest remainders; a full document's excess
    goes to the others)."""
    budgets = [0] * len(lengths)
    open_ = [i for i, n in enumerate(lengths) if n > 0]
    while open_ and total - sum(budgets) > 0:
        left = total - sum(budgets)
        w = weights[open_].double().clamp_min(0)
        w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(open_))
        raw = w * left
        take = raw.floor().long()
        for j in (raw - take).argsort(descending=True)[: left - int(take.sum())].tolist():
            take[j] += 1
        for j, i in enumerate(open_):
            budgets[i] = min(lengths[i], budgets[i] + int(take[j]))
        open_ = [i for i in open_ if budgets[i] < lengths[i]]
    return budgets


@register
@dataclass
class QueryAware(BlendStrategy):
    name: ClassVar[str] = "query_aware"
    probes: ClassVar[bool] = True
    recompute_ratio: float = 0.15
    window: int = 10  # tokens either side of each most-attended token
    attention_share: float = 0.5  # of the budget split by each document's attention (the rest by length)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 0:
            raise ValueError(f"window must be >= 0; got {self.window}")
        if not 0.0 <= self.attention_share <= 1.0:
            raise ValueError(f"attention_share must be in [0, 1]; got {self.attention_share}")

    def select(self, plan: BlendPlan, deviation: Any) -> torch.Tensor:
        if plan.attention is None:
            raise ValueError("query_aware selects from the probe's attention (plan.attention); none was given")
        attention = plan.attention.float().cpu()
        lengths = [end - start for start, end in plan.spans]
        mass = torch.tensor([float(attention[s:e].sum()) for s, e in plan.spans])
        share = torch.tensor(lengths, dtype=torch.float64) / max(sum(lengths), 1)
        if float(mass.sum()) > 0:
            share = (1 - self.attention_share) * share + self.attention_share * mass.double() / mass.sum()
        budgets = split_budget(round(self.recompute_ratio * sum(lengths)), lengths, share)
        chosen = torch.zeros_like(plan.cached)
        for (start, end), budget in zip(plan.spans, budgets):
            if budget:
                chosen[start:end] = self._windows(attention[start:end], budget)
        return chosen & plan.cached

    def _windows(self, score: torch.Tensor, budget: int) -> torch.Tensor:
        """Exactly `budget` tokens of one document: windows around its most-attended tokens
        first (overlaps leave room, a window at a border may overflow), each group by attention."""
        width = 2 * self.window + 1
        centers = torch.zeros(len(score))
        centers[score.topk(min(math.ceil(budget / width), len(score))).indices] = 1.0
        windows = F.max_pool1d(centers[None, None], width, stride=1, padding=self.window)[0, 0] > 0
        priority = score + windows.float() * (score.max() - score.min() + 1.0)
        chosen = torch.zeros(len(score), dtype=torch.bool)
        chosen[priority.topk(budget).indices] = True
        return chosen
