"""TOVA: keep the tokens the newest token attends to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmw.eviction.base import Policy, ScoreInputs


@dataclass
class TOVA(Policy):
    """Score each token by the attention of the newest query, averaged over all heads
    of the layer (Oren et al. 2024, "Transformers are Multi-State RNNs",
    arXiv:2401.06104: Token Omission Via Attention).

    One attention row per layer is the cheapest attention-based score; the
    paper averages heads, so every KV head of a layer keeps the same tokens.
    """

    window: int = 1
    name: ClassVar[str] = "tova"

    @property
    def query_rows(self) -> int:
        return 1

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        last = inputs.attention[:, -1].mean(0)  # [T]
        return last.expand(inputs.num_kv_heads, -1)
