"""fp8 (e4m3) with a per-token or per-head absmax scale.

The format of FP8 KV caches in vLLM/TensorRT-LLM (Micikevicius et al. 2022,
"FP8 Formats for Deep Learning", arXiv:2209.05433). Values are scaled so each
token's (or head's) absmax maps to 448, the e4m3 maximum. Decoding goes through
a 256-entry lookup table (numpy take), ~2x faster here than torch's fp8 cast.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvmw.quantizers.base import Quantizer, register_quantizer, tensor_bytes, tensor_from_bytes
from kvmw.quantizers.common import Workspace, split_payload

E4M3_MAX = 448.0


def _lut(dtype: torch.dtype) -> np.ndarray:
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    table = torch.nan_to_num(table, nan=0.0)  # 0x7f/0xff are NaN in e4m3fn; never produced
    return table.to(dtype).view(torch.int16 if dtype != torch.float32 else torch.int32).numpy()


@register_quantizer
class FP8(Quantizer):
    name = "fp8"
    options = frozenset({"token", "head"})
    decodes_on_device = True

    def __init__(self, scale: str = "token") -> None:
        if scale not in ("token", "head"):
            raise ValueError(f"fp8 scale granularity is token or head, got {scale!r}")
        self.scale = scale
        self._ws = Workspace()
        self._luts: dict[torch.dtype, np.ndarray] = {}

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}

    @classmethod
    def from_spec(cls, opts: dict[str, str]) -> "FP8":
        return cls(scale="head" if "head" in opts else "token")

    def _rows(self, shape: tuple[int, ...]) -> tuple[int, int]:
        L, two, T, H, D = shape
        return (L * two * T, H * D) if self.scale == "token" else (L * two * T * H, D)

    def encode(self, kv: torch.Tensor, positions: np.ndarray | None = None) -> list[Any]:
        rows, cols = self._rows(tuple(kv.shape))
        x = self._ws.get("x", (rows, cols), torch.float32)
        x.copy_(kv.reshape(rows, cols))
        amax = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_())
        scale = (amax / E4M3_MAX).to(torch.float16)
        s = scale.float()
        s.masked_fill_(s == 0, 1.0)
        x.div_(s[:, None]).clamp_(-E4M3_MAX, E4M3_MAX)
        codes = self._ws.get("codes", (rows, cols), torch.float8_e4m3fn)
        codes.copy_(x)
        return [tensor_bytes(codes.view(torch.uint8)), tensor_bytes(scale)]

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | None = None) -> torch.Tensor:
        rows, cols = self._rows(shape)
        cb, sb = split_payload(payload, [rows * cols, rows * 2])
        scale = tensor_from_bytes(sb, torch.float16, (rows, 1))
        if device is not None:  # on the GPU: upload the 1-byte codes, convert there (exact: e4m3 fits fp16/bf16)
            codes = tensor_from_bytes(cb, torch.uint8, (rows, cols)).to(device).view(torch.float8_e4m3fn)
            out = codes.to(dtype).nan_to_num_(nan=0.0)  # as the table: NaN codes are never written
            return out.mul_(scale.to(device)).view(shape)
        codes = np.frombuffer(cb, dtype=np.uint8)
        lut = self._luts.get(dtype)
        if lut is None:
            lut = self._luts[dtype] = _lut(dtype)
        out = torch.empty((rows, cols), dtype=dtype)
        np.take(lut, codes, out=out.view(torch.int16 if dtype != torch.float32 else torch.int32)
                .numpy().reshape(-1))
        out.mul_(scale)
        return out.view(shape)
