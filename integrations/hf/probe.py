"""The uncached tokens' attention over a reused prompt: the probe for query-aware selection.

Before any document token is recomputed, the uncached tokens (preamble, question)
run alone through every layer over the documents' reused KV, as full reuse would
compute them. A forward hook on each attention module recomputes their queries
(the model's own projection, norm and RoPE) and adds up the attention each
position gets. Cost: the uncached tokens x layers, plus one [q_heads, S, N]
softmax per layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from kvmw.eviction.attention import window_attention
from kvmw.eviction.hf import attention_modules, recompute_queries


@contextmanager
def attention_probe(model: Any, num_positions: int) -> Iterator[torch.Tensor]:
    """Yields an [N] fp32 tensor that each attention layer run inside the block (over a
    `ScatterKV`) adds its rows' attention to, summed over rows and query heads."""
    device = next(model.parameters()).device
    mass = torch.zeros(num_positions, dtype=torch.float32, device=device)
    key_positions = torch.arange(num_positions, device=device)[None]

    def after(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        kv = kwargs["past_key_values"]  # the ScatterKV: this layer's full KV, already updated
        q = recompute_queries(module, kwargs["hidden_states"], kwargs["position_embeddings"])
        keys = kv.keys[module.layer_idx][0]  # [kv_heads, N, D]
        rows = window_attention(q, keys, kv.index, key_positions.expand(keys.shape[0], -1), module.scaling)
        mass.add_(rows.sum(dim=(0, 1)))

    handles = [m.register_forward_hook(after, with_kwargs=True) for m in attention_modules(model)]
    try:
        yield mass
    finally:
        for h in handles:
            h.remove()
