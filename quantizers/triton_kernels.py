"""Triton kernels for GPU tensors; placeholder until the kernels land (see int8/int4/kivi)."""

from __future__ import annotations

import torch


def use_triton(t: torch.Tensor) -> bool:
    return False
