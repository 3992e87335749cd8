"""The identity quantizer: the KV bytes as they are (lossless baseline)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvmw.quantizers.base import Quantizer, register_quantizer, tensor_bytes, tensor_from_bytes


@register_quantizer
class NoneQuantizer(Quantizer):
    name = "none"

    def encode(self, kv: torch.Tensor, positions: np.ndarray | None = None) -> list[Any]:
        return [tensor_bytes(kv)]

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | None = None) -> torch.Tensor:
        return tensor_from_bytes(payload, dtype, shape)
