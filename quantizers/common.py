"""What the quantizers share: reusable work buffers, bit packing, payload splitting,
and the rounding rule the torch and Triton paths both use.

Rounding is ``floor(x + 0.5)`` (half up) and division is IEEE fp32, because both
are expressible identically in torch and in Triton (``tl.math.div_rn``), so the
two paths produce the same bytes.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from kvmw.errors import CorruptBlobError


class Workspace(threading.local):
    """Per-thread scratch tensors reused across calls (no fresh multi-MiB buffer
    per encode: with glibc defaults those page-fault at ~1-2 GB/s)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype)
            self.buffers[(name, dtype)] = buf
        return buf[:n].view(shape)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits (numel a multiple of 8 // bits) -> packed uint8, low bits first."""
    if bits == 8:
        return codes.reshape(-1)
    per = 8 // bits
    c = codes.reshape(-1, per)
    out = c[:, 0].clone()
    for i in range(1, per):  # loop over bit lanes (<= 4), not over elements
        out |= c[:, i] << (bits * i)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits == 8:
        return packed[:numel]
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    out = (packed.reshape(-1, 1) >> shifts) & mask
    return out.reshape(-1)[:numel]


def packed_len(numel: int, bits: int) -> int:
    per = 8 // bits
    return -(-numel // per)


def split_payload(payload: memoryview, sizes: list[int]) -> list[memoryview]:
    """Cut a payload into parts of known byte sizes; a length mismatch is corruption."""
    if sum(sizes) != payload.nbytes:
        raise CorruptBlobError(f"payload is {payload.nbytes} bytes, codec expects {sum(sizes)}")
    out, off = [], 0
    for s in sizes:
        out.append(payload[off:off + s])
        off += s
    return out


def round_half_up_(x: torch.Tensor) -> torch.Tensor:
    return x.add_(0.5).floor_()


def int_opt(opts: dict[str, str], name: str, default: int, allowed: Any = None) -> int:
    from kvmw.errors import ConfigError

    raw = opts.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"codec option {name}{raw!r} is not a number") from None
    if allowed is not None and value not in allowed:
        raise ConfigError(f"codec option {name}={value} not in {sorted(allowed)}")
    return value
