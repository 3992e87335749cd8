"""What a blending strategy decides: which tokens to recompute, from which layer.

A prompt is segments: cached documents (their KV loaded and re-positioned) and
uncached text (preamble, question), which is always computed. A strategy says
how many leading layers run for every token (`full_layers`), then which cached
tokens also run in the remaining layers (`select`, which may use the KV
deviation measured in the last full layer), and may narrow that set again after
some of the later layers (`refine_layers`, `refine`: gradual filtering). A
strategy that `probes` first runs the uncached tokens alone through every layer
over the reused KV and chooses from the attention they paid each position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class Deviation:
    """Per-head squared distance [H, S] between the fresh and the held KV of the tokens a
    layer ran for, keys and values apart (CacheBlend's KV deviation)."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class BlendPlan:
    """Token bookkeeping of one prompt: cached mask [N] and each document's span."""

    cached: torch.Tensor
    spans: list[tuple[int, int]]
    #: [N] fp32, for strategies that probe: attention each position got from the uncached
    #: tokens (question, preamble) run over the reused KV, summed over their rows, heads, layers
    attention: torch.Tensor | None = None

    @property
    def num_cached(self) -> int:
        return int(self.cached.sum())


@dataclass
class BlendStrategy:
    name: ClassVar[str] = ""
    probes: ClassVar[bool] = False  # select() reads plan.attention (costs a pass of the uncached tokens)
    recompute_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be in [0, 1]; got {self.recompute_ratio}")

    @property
    def full_layers(self) -> int:
        return 0

    @property
    def refine_layers(self) -> tuple[int, ...]:
        """Layers after which `refine` narrows the recomputed set (by their KV deviation)."""
        return ()

    def select(self, plan: BlendPlan, deviation: Any) -> torch.Tensor:
        """Bool [N]: cached tokens to recompute after the full layers (uncached ones always are).
        `deviation`: the last full layer's `Deviation` over every token (None without one)."""
        raise NotImplementedError

    def refine(self, plan: BlendPlan, layer: int, index: torch.Tensor, deviation: Any) -> torch.Tensor:
        """Bool [len(index)]: which of the tokens that ran in `layer` (`index`, their
        `Deviation` there) run on (uncached ones always do)."""
        return torch.ones(len(index), dtype=torch.bool)


@dataclass
class FullReuse(BlendStrategy):
    """Every document token keeps its cached KV; only the uncached text is computed."""

    name: ClassVar[str] = "full_reuse"

    def select(self, plan: BlendPlan, deviation: Any) -> torch.Tensor:
        return torch.zeros_like(plan.cached)


STRATEGIES: dict[str, type[BlendStrategy]] = {}


def register(cls: type[BlendStrategy]) -> type[BlendStrategy]:
    STRATEGIES[cls.name] = cls
    return cls


register(FullReuse)


def make_strategy(name: str, recompute_ratio: float) -> BlendStrategy:
    try:
        return STRATEGIES[name](recompute_ratio=recompute_ratio)
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: full_prefill, {', '.join(STRATEGIES)}") from None
