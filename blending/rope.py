"""Exact re-positioning of cached keys with the model's own rotary embedding.

RoPE rotates each (i, i + d/2) pair of a key by the angle `theta_i * position`
(times a constant attention factor for YaRN), so a key cached at position p
moves to position p + delta by one more rotation of `theta_i * delta`: no
un-rotation, no precision lost to a divide. `theta_i` is the model's own
`inv_freq`, which already carries linear, llama3 and YaRN scaling. Rotary types
whose frequencies depend on the sequence length (dynamic NTK, LongRoPE) cannot
be moved exactly and are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from kvmw.errors import KVMWError

POSITION_ONLY_ROPE = ("default", "linear", "llama3", "yarn")


class UnsupportedRotaryError(KVMWError, ValueError):
    """The model's rotary embedding cannot be re-positioned exactly."""


class Repositioner:
    """Moves cached keys by whole positions. Built from a transformers model (`model`,
    its rotary module's `inv_freq`) or from the frequencies themselves (`from_inv_freq`,
    what an engine that keeps only a cos/sin table hands over)."""

    def __init__(self, model: Any) -> None:
        rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise UnsupportedRotaryError(f"{type(model).__name__} has no rotary embedding kvmw can read")
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type not in POSITION_ONLY_ROPE:
            raise UnsupportedRotaryError(
                f"rope_type {rope_type!r}: its frequencies depend on the sequence length, so cached keys "
                f"cannot be moved exactly (supported: {', '.join(POSITION_ONLY_ROPE)})")
        if getattr(model.config, "partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedRotaryError("partial rotary embeddings are not supported")
        self.inv_freq = rotary.inv_freq.detach().float().cpu().clone()

    @classmethod
    def from_inv_freq(cls, inv_freq: torch.Tensor) -> "Repositioner":
        """From the rotary frequencies [D/2] (scaling already applied)."""
        self = cls.__new__(cls)
        self.inv_freq = inv_freq.detach().float().cpu().clone()
        return self

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor | int) -> torch.Tensor:
        """Keys [..., T, D] moved by `delta` positions (an int, or [T] per token)."""
        delta = torch.as_tensor(delta, dtype=torch.float64, device="cpu").reshape(-1, 1)  # [T or 1, 1]
        angles = delta * self.inv_freq.to(torch.float64)  # float64: positions up to 1e6 stay exact
        angles = torch.cat((angles, angles), dim=-1)
        cos = angles.cos().to(device=keys.device, dtype=torch.float32)
        sin = angles.sin().to(device=keys.device, dtype=torch.float32)
        k = keys.float()
        half = k.shape[-1] // 2
        rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        return (k * cos + rotated * sin).to(keys.dtype)
