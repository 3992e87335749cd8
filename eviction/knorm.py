"""KNorm: keep the keys of smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmw.eviction.base import Policy, ScoreInputs


@dataclass
class KNorm(Policy):
    """Evict the keys of largest L2 norm (Devoto et al. 2024, "A Simple and Effective
    L2 Norm-Based Strategy for KV Cache Compression", arXiv:2406.11430).

    Key norm anti-correlates with the attention a key receives, so the norm alone
    predicts importance: no queries, no attention rows, cost one norm per key.
    """

    name: ClassVar[str] = "knorm"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)
