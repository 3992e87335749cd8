"""The canonical chunk layout and the conversions every integration shares.

    kv: Tensor[num_layers, 2, num_tokens, num_kv_heads, head_dim]   (K then V)

Tokens are the third axis so that a token range of every layer is one strided
slice, and a chunk is contiguous once sliced on tokens and ``.contiguous()``'d.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvmw.errors import LayoutError
from kvmw.fingerprint import ModelFingerprint

TOKEN_AXIS = 2


def check_chunk(kv: torch.Tensor, fingerprint: ModelFingerprint | None = None) -> None:
    """Raise `LayoutError` unless `kv` is [layers, 2, tokens, kv_heads, head_dim]."""
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise LayoutError(f"expected [layers, 2, tokens, kv_heads, head_dim], got {tuple(kv.shape)}")
    if fingerprint is not None:
        want = (fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim)
        got = (kv.shape[0], kv.shape[3], kv.shape[4])
        if want != got:
            raise LayoutError(f"chunk (layers, kv_heads, head_dim)={got} but model has {want}")


def num_tokens(kv: torch.Tensor) -> int:
    return kv.shape[TOKEN_AXIS]


def from_hf_layers(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-layer HF tensors [1, kv_heads, seq, head_dim] -> canonical [L, 2, seq, H, D]."""
    if len(keys) != len(values) or not keys:
        raise LayoutError("need one key and one value tensor per layer")
    if keys[0].dim() != 4 or keys[0].shape[0] != 1:
        raise LayoutError(f"HF layer KV must be [1, heads, seq, dim], got {tuple(keys[0].shape)}")
    kv = torch.stack([torch.stack(keys), torch.stack(values)], dim=1)  # [L, 2, 1, H, T, D]
    return kv.squeeze(2).transpose(2, 3).contiguous()


def to_hf_layers(kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Canonical [L, 2, T, H, D] -> per layer (key, value), each [1, H, T, D] (views)."""
    check_chunk(kv)
    per = kv.transpose(2, 3).unsqueeze(2)  # [L, 2, 1, H, T, D]
    return [(per[i, 0], per[i, 1]) for i in range(kv.shape[0])]


def split_tokens(kv: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Contiguous chunks of `chunk_size` tokens (the last may be shorter)."""
    check_chunk(kv)
    return [c.contiguous() for c in kv.split(chunk_size, dim=TOKEN_AXIS)]
