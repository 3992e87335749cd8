"""A transformers `Cache` that keeps KV during generation in the KIVI scheme.

KIVI (Liu et al. 2024, arXiv:2402.02750): keys quantized per channel over
blocks of G tokens, values per token over groups of G channels, asymmetric
min/step per group, and the most recent tokens kept in full precision.

How this layer differs from transformers' `QuantizedCache`:
- keys are quantized only in whole, G-aligned token blocks. Quantizing keys as
  they arrive, one decode token at a time, would make every "group" one token
  wide: min == max, the value is stored exactly and nothing is saved;
- append-only: a block, once quantized, is never dequantized and quantized
  again (transformers' cache re-quantizes its whole history at every flush,
  compounding the error);
- the full-precision residual holds between R and R+G-1 of the newest tokens
  (once more than R exist): when it reaches R+G the oldest G leave as one block;
- the first `sinks` tokens of the sequence (attention sinks, Xiao et al. 2023,
  arXiv:2309.17453) stay in full precision: at 2 bits, quantizing them wrecks
  generation (SmolLM2, 1k-token prompt: 4% greedy agreement with them
  quantized);
- `nbytes()` is the real memory: packed codes, mins, steps, sinks and residual.

Attention still needs dense K/V: each `update` dequantizes the layer's blocks
(one vectorized pass) and appends the residual. That dense copy lives only for
the layer's attention call.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvmw.quantizers.common import Workspace, pack_bits, unpack_bits
from kvmw.quantizers.int4 import quantize_groups


class KIVILayer(DynamicLayer):
    is_croppable = False

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128, sinks: int = 4) -> None:
        super().__init__()
        self.sinks = sinks
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        if bits not in (2, 4, 8) or residual % group:
            raise ValueError(f"KIVI cache: bits in (2, 4, 8) and residual a multiple of group "
                             f"(got bits={bits}, group={group}, residual={residual})")
        self.bits, self.group, self.residual = bits, group, residual
        self.cumulative_length = 0
        self._ws = Workspace()
        self._clear_quantized()

    def _clear_quantized(self) -> None:
        # keys: [blocks, H, D, G*bits/8] codes and [blocks, H, D] min/step (block-major: appends are cats)
        # values: [T, H, D/G, G*bits/8] codes and [T, H, D/G] min/step (token-major)
        self.k_codes = self.k_min = self.k_step = None
        self.v_codes = self.v_min = self.v_step = None
        self.quantized_tokens = 0

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.sink_keys = self.sink_values = None
        self._clear_quantized()

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def _quantize(self, x: torch.Tensor, rows_shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        rows = self._ws.get("rows", (x.numel() // self.group, self.group), torch.float32)
        rows.copy_(x.reshape(-1, self.group))
        codes, mn, step = quantize_groups(rows, self.bits, self._ws, "codes")
        packed = pack_bits(codes, self.bits).view(*rows_shape, self.group * self.bits // 8)
        return packed.clone(), mn.view(rows_shape).clone(), step.view(rows_shape).clone()

    def _flush(self, n_blocks: int) -> None:
        """Quantize the oldest n_blocks*G residual tokens (k/v: [1, H, T, D]) and drop them."""
        G = self.group
        n = n_blocks * G
        k, v = self.keys[0, :, :n], self.values[0, :, :n]  # [H, n, D]
        H, _, D = k.shape
        if D % G:
            raise ValueError(f"KIVI cache: head_dim {D} must be a multiple of group {G}")
        kq = self._quantize(k.view(H, n_blocks, G, D).permute(1, 0, 3, 2), (n_blocks, H, D))
        vq = self._quantize(v.transpose(0, 1), (n, H, D // G))
        if self.k_codes is None:
            self.k_codes, self.k_min, self.k_step = kq
            self.v_codes, self.v_min, self.v_step = vq
        else:  # append-only: earlier blocks are never touched again
            self.k_codes, self.k_min, self.k_step = (torch.cat([a, b]) for a, b in
                                                     zip((self.k_codes, self.k_min, self.k_step), kq))
            self.v_codes, self.v_min, self.v_step = (torch.cat([a, b]) for a, b in
                                                     zip((self.v_codes, self.v_min, self.v_step), vq))
        self.keys = self.keys[:, :, n:].contiguous()
        self.values = self.values[:, :, n:].contiguous()
        self.quantized_tokens += n

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        G, bits = self.group, self.bits
        nb, H, D = self.k_min.shape
        kc = unpack_bits(self.k_codes.reshape(-1), bits, nb * H * D * G).view(nb, H, D, G)
        k = kc.to(self.dtype).mul_(self.k_step[..., None].to(self.dtype)).add_(self.k_min[..., None].to(self.dtype))
        k = k.permute(1, 0, 3, 2).reshape(1, H, nb * G, D)
        T, _, ng = self.v_min.shape
        vc = unpack_bits(self.v_codes.reshape(-1), bits, T * H * ng * G).view(T, H, ng, G)
        v = vc.to(self.dtype).mul_(self.v_step[..., None].to(self.dtype)).add_(self.v_min[..., None].to(self.dtype))
        v = v.view(T, H, D).transpose(0, 1)[None]
        return k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise ValueError("the KIVI cache holds one sequence (batch size 1)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
            self.sink_keys, self.sink_values = self.keys, self.values
        self.cumulative_length += key_states.shape[-2]
        take = min(self.sinks - self.sink_keys.shape[-2], key_states.shape[-2])
        if take > 0:
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :take]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[:, :, :take]], dim=-2)
            key_states, value_states = key_states[:, :, take:], value_states[:, :, take:]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.k_codes is None:
            full_k = torch.cat([self.sink_keys, self.keys], dim=-2)
            full_v = torch.cat([self.sink_values, self.values], dim=-2)
        else:
            qk, qv = self._dequantized()
            full_k = torch.cat([self.sink_keys, qk, self.keys], dim=-2)
            full_v = torch.cat([self.sink_values, qv, self.values], dim=-2)
        overflow = self.keys.shape[-2] - self.residual
        if overflow >= self.group:  # flush whole G-blocks, keep >= R newest tokens in full precision
            self._flush(overflow // self.group)
        return full_k, full_v

    def nbytes(self) -> int:
        parts = [self.sink_keys, self.sink_values, self.keys, self.values, self.k_codes, self.k_min, self.k_step, self.v_codes, self.v_min,
                 self.v_step]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)


class KIVICache(Cache):
    """KIVI-quantized KV for `model.generate(..., past_key_values=KIVICache(model.config))`."""

    def __init__(self, config: Any, bits: int = 2, group: int = 32, residual: int = 128, sinks: int = 4) -> None:
        text = config.get_text_config(decoder=True)
        super().__init__(layers=[KIVILayer(bits, group, residual, sinks) for _ in range(text.num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes the cache holds (quantized blocks, their mins/steps, the fp residual)."""
        return sum(layer.nbytes() for layer in self.layers)
