"""SnapKV: attention from an observation window of the last prompt tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvmw.eviction.base import Policy, ScoreInputs


@dataclass
class SnapKV(Policy):
    """Score each token by the attention the last `window` prompt tokens pay it,
    smoothed by average pooling over `kernel` neighbours, averaged over each KV
    head's query group, top-k per KV head; the window itself is always kept
    (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before
    Generation", arXiv:2404.14469).

    The end of the prompt already attends to what generation will need; pooling
    keeps the neighbours of a selected token, so facts are kept whole.
    """

    window: int = 64
    kernel: int = 5
    name: ClassVar[str] = "snapkv"

    @property
    def query_rows(self) -> int:
        return self.window

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        rows = inputs.attention.mean(1)  # [q_heads, T]
        if self.kernel > 1:
            rows = F.avg_pool1d(rows[:, None], self.kernel, stride=1, padding=self.kernel // 2,
                                count_include_pad=False)[:, 0, : rows.shape[-1]]
        return inputs.pooled(rows)
