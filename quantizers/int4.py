"""int4, grouped asymmetric: min and step per group of G consecutive channels, two codes a byte.

The weight/activation group quantization of e.g. GPTQ/AWQ (Frantar et al. 2022,
arXiv:2210.17323) applied to each token's KV row: per group of G values a
min and a step (fp16), codes 0..15. At G=64 that is 4.5 bits per value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvmw.quantizers import triton_kernels
from kvmw.quantizers.base import Quantizer, register_quantizer, tensor_bytes, tensor_from_bytes
from kvmw.quantizers.common import (
    Workspace,
    int_opt,
    pack_bits,
    round_half_up_,
    split_payload,
    unpack_bits,
)

GROUPS = (16, 32, 64, 128)


def quantize_groups(x: torch.Tensor, bits: int, dim: int = 1, codes: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of fp32 `x` (modified in place) in groups along `dim`.

    Returns (codes uint8 shaped like x, min fp16, step fp16), min/step with `dim` kept
    as size 1; `codes` may be a reusable buffer. Shared by int4, KIVI and the KIVI cache.
    """
    levels = (1 << bits) - 1
    mn = x.amin(dim=dim, keepdim=True).to(torch.float16)
    step = ((x.amax(dim=dim, keepdim=True) - mn.float()) / levels).to(torch.float16)
    s = step.float().masked_fill_(step == 0, 1.0)
    x.sub_(mn.float()).div_(s)
    round_half_up_(x).clamp_(0, levels)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device) if codes is None else codes
    codes.copy_(x)
    return codes, mn, step


def dequantize_groups(codes: torch.Tensor, mn: torch.Tensor, step: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[N, G] = code * step + min in fp32 (a multiply then an add, no FMA: the
    Triton kernel does the same), written in out's dtype."""
    if out.dtype == torch.float32:
        out.copy_(codes)
        return out.mul_(step.float()[:, None]).add_(mn.float()[:, None])
    return out.copy_(codes.float().mul_(step.float()[:, None]).add_(mn.float()[:, None]))


@register_quantizer
class Int4(Quantizer):
    name = "int4"
    options = frozenset({"g"})

    def __init__(self, group: int = 64) -> None:
        if group not in GROUPS:
            raise ValueError(f"int4 group must be one of {GROUPS}")
        self.group = group
        self._ws = Workspace()

    def params(self) -> dict[str, Any]:
        return {"group": self.group}

    @classmethod
    def from_spec(cls, opts: dict[str, str]) -> "Int4":
        return cls(group=int_opt(opts, "g", 64, GROUPS))

    def _groups(self, shape: tuple[int, ...]) -> int:
        n = 1
        for s in shape:
            n *= s
        if (shape[3] * shape[4]) % self.group:
            raise ValueError(f"kv_heads*head_dim={shape[3] * shape[4]} not a multiple of group {self.group}")
        return n // self.group

    def encode(self, kv: torch.Tensor, positions: np.ndarray | None = None) -> list[Any]:
        n = self._groups(tuple(kv.shape))
        if triton_kernels.use_triton(kv):
            packed, mn, step = triton_kernels.group_quantize(kv.reshape(n, self.group), 4)
            return [tensor_bytes(packed), tensor_bytes(mn), tensor_bytes(step)]
        x = self._ws.get("x", (n, self.group), torch.float32)
        x.copy_(kv.reshape(n, self.group))
        codes, mn, step = quantize_groups(x, 4, codes=self._ws.get("codes", tuple(x.shape), torch.uint8))
        return [tensor_bytes(pack_bits(codes, 4)), tensor_bytes(mn), tensor_bytes(step)]

    decodes_on_device = True

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | None = None) -> torch.Tensor:
        n = self._groups(shape)
        pb, mb, sb = split_payload(payload, [n * self.group // 2, n * 2, n * 2])
        packed = tensor_from_bytes(pb, torch.uint8, (n * self.group // 2,))
        mn, step = tensor_from_bytes(mb, torch.float16, (n,)), tensor_from_bytes(sb, torch.float16, (n,))
        if device is not None or triton_kernels.use_triton(packed):
            target = device or packed.device
            return triton_kernels.group_dequantize(packed.to(target), mn.to(target), step.to(target), 4,
                                                   self.group, dtype).view(shape)
        codes = unpack_bits(packed, 4, n * self.group)
        out = torch.empty((n, self.group), dtype=dtype)
        dequantize_groups(codes.view(n, self.group), mn, step, out)
        return out.view(shape)
