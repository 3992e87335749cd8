"""StreamingLLM: attention sinks plus a window of the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmw.eviction.base import Policy, ScoreInputs


@dataclass
class StreamingLLM(Policy):
    """Keep the first `sinks` tokens and the newest ones (Xiao et al. 2023, "Efficient
    Streaming Language Models with Attention Sinks", arXiv:2309.17453).

    The initial tokens collect attention whatever their content (sinks): dropping
    them breaks a sliding window, keeping four restores it. The score is the
    position, so the rest of the budget goes to the newest tokens. Needs no
    attention, so it bounds a generation cache at no scoring cost.
    """

    sinks: int = 4
    name: ClassVar[str] = "streaming_llm"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.positions.float()
