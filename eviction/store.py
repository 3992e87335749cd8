"""Eviction before store: a chunk is stored with only its kept tokens, and their RoPE
positions in the blob (blob v1 positions need not be contiguous).

A stored chunk is one dense [L, 2, k, H, D] tensor with one position list, so the
tokens kept are the same for every layer and KV head: per-(layer, head) scores
are turned into ranks (scales differ across layers and policies) and averaged.
The blob's `extra["eviction"]` records the policy, the budget and how many tokens
the chunk covered, so a reader knows the next position (`tokens`) and that the
chunk is pruned. Pruned chunks live under their own key namespace
(`StoreEviction.salt`), never beside full ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvmw.eviction.base import Budget, Policy, select


@dataclass(frozen=True)
class StoreEviction:
    """Prune each stored chunk to `budget` of its tokens with `policy`."""

    policy: Policy
    budget: Budget

    def __post_init__(self) -> None:
        if self.policy.reconstructs:
            raise ValueError(f"{self.policy.name}: chunks are pruned from the prefill's own scores; "
                             "its context-reconstruction pass is not run before store")

    @property
    def salt(self) -> str:
        """Mixed into the key namespace: chunks pruned differently never collide."""
        return f"|evict:{self.policy!r}:{self.budget.tag}"


def uniform_keep(scores: torch.Tensor, n_keep: int, sinks: int = 0, recent: int = 0) -> torch.Tensor:
    """Sorted token indices [k] kept by every layer and head, from scores [L, H, T]:
    each row's scores become ranks in [0, 1], averaged over layers and heads."""
    T = scores.shape[-1]
    flat = scores.reshape(-1, T).float()
    ranks = flat.argsort(dim=-1).argsort(dim=-1).float() / max(T - 1, 1)
    return select(ranks.mean(0, keepdim=True), n_keep, sinks, recent)[0]


def prune_chunk(kv: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Canonical chunk [L, 2, T, H, D] -> its tokens at `keep` ([k] indices), contiguous."""
    return kv.index_select(2, keep.to(kv.device)).contiguous()


def encode_pruned(codec: Any, kv: torch.Tensor, keep: torch.Tensor, first_position: int,
                  fingerprint: str, info: dict[str, Any] | None = None) -> bytearray:
    """Blob of the kept tokens of a chunk whose first token sits at `first_position`."""
    positions = (keep.cpu().long() + first_position).numpy().astype(np.int32)
    extra = {"eviction": {"tokens": int(kv.shape[2]), "first": int(first_position), **(info or {})}}
    return codec.encode(prune_chunk(kv, keep), fingerprint, positions=positions, extra=extra)


def chunk_span(meta: Any) -> tuple[int, int]:
    """(first position, tokens covered) of a decoded blob's chunk, pruned or not."""
    ev = meta.extra.get("eviction") if isinstance(meta.extra, dict) else None
    if isinstance(ev, dict) and isinstance(ev.get("tokens"), int) and isinstance(ev.get("first"), int):
        return ev["first"], ev["tokens"]
    pos = meta.positions
    return (int(pos[0]) if len(pos) else 0), len(pos)

