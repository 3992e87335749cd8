"""Attention rows for scoring, computed apart from the model's own (SDPA) pass.

Only the rows a policy reads are computed: the last W queries (SnapKV, TOVA) cost
W x T per head, nothing next to the prefill. H2O needs the column sums of every
row; `accumulate_attention` gets them in query blocks of `block` rows, so the
memory stays at q_heads x block x T floats and the cost is one extra
eager-attention pass (about 2 * q_heads * T^2 * D flops per layer; measured by
`kvmw bench eviction` as the prefill overhead).
"""

from __future__ import annotations

import torch


def pool_groups(x: torch.Tensor, num_kv_heads: int, reduce: str = "mean") -> torch.Tensor:
    """[q_heads, ...] -> [kv_heads, ...] over each KV head's group of query heads (GQA)."""
    q_heads = x.shape[0]
    if q_heads % num_kv_heads:
        raise ValueError(f"{q_heads} query heads do not split into {num_kv_heads} KV groups")
    grouped = x.reshape(num_kv_heads, q_heads // num_kv_heads, *x.shape[1:])
    return grouped.mean(1) if reduce == "mean" else grouped.sum(1)


def window_attention(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                     key_positions: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """softmax(q K^T * scaling) for a few query rows: [q_heads, W, T] fp32.

    queries [q_heads, W, D] and keys [kv_heads, T, D] post-RoPE; a query sees the
    keys whose position is <= its own (causal, correct after eviction too).
    """
    hq, hk = queries.shape[0], keys.shape[0]
    scaling = scaling if scaling is not None else queries.shape[-1] ** -0.5
    q = queries.float().reshape(hk, hq // hk, queries.shape[1], -1)  # [hk, g, W, D]
    logits = torch.einsum("hgwd,htd->hgwt", q, keys.float()) * scaling
    visible = key_positions[:, None, None, :] <= query_positions[None, None, :, None]  # [hk, 1, W, T]
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1).reshape(hq, queries.shape[1], -1)


def accumulate_attention(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                         key_positions: torch.Tensor, scaling: float | None = None,
                         block: int = 256) -> torch.Tensor:
    """Attention each key receives, summed over all query rows and over its group's
    query heads: [kv_heads, T] fp32 (H2O's accumulated score)."""
    out = torch.zeros(keys.shape[0], keys.shape[1], dtype=torch.float32, device=keys.device)
    for start in range(0, queries.shape[1], block):
        rows = window_attention(queries[:, start:start + block], keys,
                                query_positions[start:start + block], key_positions, scaling)
        out += pool_groups(rows.sum(1), keys.shape[0], reduce="sum")
    return out
