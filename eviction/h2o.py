"""H2O: heavy hitters by accumulated attention, plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmw.eviction.base import Policy, ScoreInputs


@dataclass
class H2O(Policy):
    """Keep the tokens with the largest attention summed over every query so far
    ("heavy hitters") and the most recent ones, `recent` of the budget each way
    (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
    Inference of Large Language Models", arXiv:2306.14048).

    Needs every attention row: during prefill the hooks recompute all T rows in
    blocks (one extra eager-attention pass per layer, see
    `kvmw.eviction.attention.accumulate_attention`); during generation one row
    per step, which keeps a bounded cache up to date.
    """

    recent: float = 0.5
    name: ClassVar[str] = "h2o"
    accumulates: ClassVar[bool] = True

    def protected_recent(self, n_keep: int) -> int:
        return max(self.window, int(n_keep * self.recent))

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        if inputs.mass is None:
            raise ValueError("H2O needs the accumulated attention (attach the eviction hooks)")
        return inputs.mass.float()
