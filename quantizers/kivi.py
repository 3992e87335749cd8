"""KIVI: keys quantized per channel over groups of G tokens, values per token over G channels.

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", arXiv:2402.02750. Key outliers live in fixed channels, so grouping keys
along tokens (one min/step per channel per G tokens) keeps outlier channels
from stretching everyone's range; values have no such channels and are grouped
per token. Asymmetric min/step per group (fp16), bit-packed codes. For a stored
chunk whose length is not a multiple of G, the key tokens are padded by
repeating the last token (it cannot widen any range) and cropped on decode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvmw.quantizers import triton_kernels
from kvmw.errors import CorruptBlobError
from kvmw.quantizers.base import Quantizer, register_quantizer, tensor_bytes, tensor_from_bytes
from kvmw.quantizers.common import Workspace, int_opt, pack_bits, packed_len, split_payload, unpack_bits
from kvmw.quantizers.int4 import dequantize_groups, quantize_groups

GROUPS = (16, 32, 64, 128)


class Kivi(Quantizer):
    bits: int
    #: 2-bit codes need smaller groups to stay usable (Qwen-0.5B, +zstd: g64 7.7x at +12%
    #: perplexity, g32 6.1x at +5.4%); at 4 bits g64 costs nothing and reaches 3.5x.
    default_group: int
    options = frozenset({"g", "s"})

    def __init__(self, group: int | None = None, sinks: int = 4) -> None:
        group = group or self.default_group
        if group not in GROUPS:
            raise ValueError(f"kivi group must be one of {GROUPS}")
        if not 0 <= sinks <= 64:
            raise ValueError(f"kivi sinks must be 0..64, got {sinks}")
        self.group, self.sinks = group, sinks
        self._ws = Workspace()

    def params(self) -> dict[str, Any]:
        return {"group": self.group, "sinks": self.sinks}

    @classmethod
    def from_spec(cls, opts: dict[str, str]) -> "Kivi":
        return cls(group=int_opt(opts, "g", cls.default_group, GROUPS), sinks=int_opt(opts, "s", 4))

    def encode(self, kv: torch.Tensor, positions: np.ndarray | None = None) -> list[Any]:
        """Attention-sink tokens (positions < `sinks`, which lead the first chunk of a
        sequence) are stored exact: at 2 bits they carry most of the damage (Qwen-0.5B,
        kivi2:g32+zstd: +11.6% perplexity with the sink quantized, +5.2% without). In the
        quantized body they are replaced by the first non-sink token, so their large
        values neither stretch a group's range nor break the group alignment."""
        keep = 0
        if positions is not None and self.sinks:
            keep = min(int(np.argmin(np.append(positions < self.sinks, False))), kv.shape[2])
        head = np.array([keep], dtype="<u2")
        body = kv
        if 0 < keep < kv.shape[2]:
            body = kv.clone()
            body[:, :, :keep] = kv[:, :, keep:keep + 1]
        return [head, tensor_bytes(kv[:, :, :keep]), *self._encode_quantized(body)]

    def _dims(self, shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        L, _, T, H, D = shape
        C = H * D
        if C % self.group:
            raise ValueError(f"kv_heads*head_dim={C} not a multiple of group {self.group}")
        tp = -(-T // self.group) * self.group
        return L, T, C, tp, self.group

    def _sizes(self, shape: tuple[int, ...]) -> list[int]:
        L, T, C, tp, G = self._dims(shape)
        nk, nv = L * (tp // G) * C, L * T * C // G
        return [packed_len(nk * G, self.bits), nk * 2, nk * 2, packed_len(nv * G, self.bits), nv * 2, nv * 2]

    def key_rows(self, k: torch.Tensor) -> torch.Tensor:
        """[L, T, C] keys -> fp32 rows [L*(Tp/G)*C, G] of G consecutive tokens per channel."""
        L, T, C = k.shape
        G = self.group
        tp = -(-T // G) * G
        x = self._ws.get("k", (L, tp // G, C, G), torch.float32)
        x[:, : T // G].copy_(k[:, : T // G * G].reshape(L, T // G, G, C).transpose(2, 3))
        if tp != T:  # partial last group: pad with the last token
            tail = torch.cat([k[:, T // G * G:], k[:, -1:].expand(L, tp - T, C)], dim=1)
            x[:, -1].copy_(tail.transpose(1, 2))
        return x.view(-1, G)

    def _encode_quantized(self, kv: torch.Tensor) -> list[Any]:
        L, T, C, tp, G = self._dims(tuple(kv.shape))
        k = kv[:, 0].reshape(L, T, C)
        v = kv[:, 1].reshape(L * T * C // G, G)
        if triton_kernels.use_triton(kv):
            pad = k[:, -1:].expand(L, tp - T, C)
            krows = torch.cat([k, pad], dim=1).view(L, tp // G, G, C).transpose(2, 3).reshape(-1, G)
            kq = triton_kernels.group_quantize(krows, self.bits)
            vq = triton_kernels.group_quantize(v, self.bits)
            return [tensor_bytes(t) for t in (*kq, *vq)]
        out: list[Any] = []
        for tag, rows in (("kc", self.key_rows(k)), ("vc", None)):
            if rows is None:
                rows = self._ws.get("v", tuple(v.shape), torch.float32)
                rows.copy_(v)
            codes, mn, step = quantize_groups(rows, self.bits, codes=self._ws.get(tag, tuple(rows.shape), torch.uint8))
            out += [tensor_bytes(pack_bits(codes, self.bits)), tensor_bytes(mn), tensor_bytes(step)]
        return out

    decodes_on_device = True

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | None = None) -> torch.Tensor:
        if payload.nbytes < 2:
            raise CorruptBlobError("kivi payload too short")
        keep = int(np.frombuffer(payload[:2], dtype="<u2")[0])
        L, _, T, H, D = shape
        if keep > T:
            raise CorruptBlobError(f"kivi keeps {keep} exact tokens of {T}")
        raw = keep * L * 2 * H * D * torch.empty((), dtype=dtype).element_size()
        if payload.nbytes < 2 + raw:
            raise CorruptBlobError("kivi payload too short for its exact tokens")
        out = self._decode_quantized(payload[2 + raw:], shape, dtype, device)
        if keep:
            out[:, :, :keep] = tensor_from_bytes(payload[2:2 + raw], dtype, (L, 2, keep, H, D)).to(out.device)
        return out

    def _decode_quantized(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
                          device: torch.device | None) -> torch.Tensor:
        L, T, C, tp, G = self._dims(shape)
        kp, kmn, kst, vp, vmn, vst = split_payload(payload, self._sizes(shape))
        nk, nv = L * (tp // G) * C, L * T * C // G
        kparts = (tensor_from_bytes(kp, torch.uint8, (kp.nbytes,)), tensor_from_bytes(kmn, torch.float16, (nk,)),
                  tensor_from_bytes(kst, torch.float16, (nk,)))
        vparts = (tensor_from_bytes(vp, torch.uint8, (vp.nbytes,)), tensor_from_bytes(vmn, torch.float16, (nv,)),
                  tensor_from_bytes(vst, torch.float16, (nv,)))
        on_kernel = device is not None or triton_kernels.use_triton(kparts[0])
        target = device or torch.device("cpu")
        out = torch.empty(shape, dtype=dtype, device=target)
        if on_kernel:
            krows = triton_kernels.group_dequantize(*(t.to(target) for t in kparts), self.bits, G, torch.float32)
            vrows = triton_kernels.group_dequantize(*(t.to(target) for t in vparts), self.bits, G, torch.float32)
        else:
            kc = unpack_bits(kparts[0], self.bits, nk * G).view(nk, G)
            krows = dequantize_groups(kc, kparts[1], kparts[2], self._ws.get("kd", (nk, G), torch.float32))
            vc = unpack_bits(vparts[0], self.bits, nv * G).view(nv, G)
            vrows = dequantize_groups(vc, vparts[1], vparts[2], self._ws.get("vd", (nv, G), torch.float32))
        out[:, 0].copy_(krows.view(L, tp // G, C, G).transpose(2, 3).reshape(L, tp, *shape[3:])[:, :T])
        out[:, 1].copy_(vrows.view(L, T, *shape[3:]))
        return out


@register_quantizer
class Kivi2(Kivi):
    name = "kivi2"
    bits = 2
    default_group = 32


@register_quantizer
class Kivi4(Kivi):
    name = "kivi4"
    bits = 4
    default_group = 64
