"""Triton kernels for int8, int4 and KIVI (de)quantization of GPU tensors.

Chosen automatically for CUDA tensors when Triton is installed. Each kernel
does exactly the torch path's arithmetic (fp32, IEEE division via ``div_rn``,
round half up as ``floor(x + 0.5)``, fp16 scales rounded to nearest even) so
both paths give the same bytes; the tests check that with ``TRITON_INTERPRET=1``
on CPU tensors (``KVMW_TRITON_ON_CPU=1`` routes CPU tensors here for them).

One program handles one row (an int8 token row, or one quantization group),
so a row's reduction, scaling and bit packing stay in registers.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA-less build
        return False
    return True


def use_triton(t: torch.Tensor | torch.device | str) -> bool:
    """True for CUDA tensors/devices with Triton; CPU too under KVMW_TRITON_ON_CPU=1 (tests)."""
    device = torch.device(t) if isinstance(t, str) else (t if isinstance(t, torch.device) else t.device)
    if device.type == "cuda":
        return available()
    return device.type == "cpu" and os.environ.get("KVMW_TRITON_ON_CPU") == "1" and available()


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_quant(x_ptr, q_ptr, s_ptr, cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < cols
        x = tl.load(x_ptr + row * cols + offs, mask=m, other=0.0).to(tl.float32)
        amax = tl.abs(tl.maximum(tl.max(tl.where(m, x, -float("inf")), axis=0),
                                 -tl.min(tl.where(m, x, float("inf")), axis=0)))  # abs: -0 -> +0
        scale = tl.math.div_rn(amax, 127.0).to(tl.float16)
        s = scale.to(tl.float32)
        s = tl.where(s == 0.0, 1.0, s)
        q = tl.floor(tl.math.div_rn(x, s) + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * cols + offs, q.to(tl.int8), mask=m)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def int8_dequant(q_ptr, s_ptr, o_ptr, cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < cols
        q = tl.load(q_ptr + row * cols + offs, mask=m, other=0).to(tl.float32)
        s = tl.load(s_ptr + row).to(tl.float32)
        tl.store(o_ptr + row * cols + offs, (q * s).to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def group_quant(x_ptr, p_ptr, mn_ptr, st_ptr, G: tl.constexpr, BITS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        PER: tl.constexpr = 8 // BITS
        LEVELS: tl.constexpr = (1 << BITS) - 1
        x = tl.load(x_ptr + row * G + tl.arange(0, G)).to(tl.float32)
        mn = tl.min(x, axis=0).to(tl.float16)
        mn32 = mn.to(tl.float32)
        step = tl.math.div_rn(tl.max(x, axis=0) - mn32, LEVELS * 1.0).to(tl.float16)
        s = step.to(tl.float32)
        s = tl.where(s == 0.0, 1.0, s)
        q = tl.floor(tl.math.div_rn(x - mn32, s) + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0).to(tl.int32)
        lanes = tl.reshape(q, (G // PER, PER))
        shifts = tl.arange(0, PER) * BITS
        packed = tl.sum(lanes << shifts[None, :], axis=1)  # disjoint bits: sum == or
        tl.store(p_ptr + row * (G // PER) + tl.arange(0, G // PER), packed.to(tl.uint8))
        tl.store(mn_ptr + row, mn)
        tl.store(st_ptr + row, step)

    @triton.jit
    def group_dequant(p_ptr, mn_ptr, st_ptr, o_ptr, G: tl.constexpr, BITS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        PER: tl.constexpr = 8 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        packed = tl.load(p_ptr + row * (G // PER) + tl.arange(0, G // PER)).to(tl.int32)
        shifts = tl.arange(0, PER) * BITS
        q = tl.reshape((packed[:, None] >> shifts[None, :]) & MASK, (G,)).to(tl.float32)
        mn = tl.load(mn_ptr + row).to(tl.float32)
        s = tl.load(st_ptr + row).to(tl.float32)
        tl.store(o_ptr + row * G + tl.arange(0, G), (q * s + mn).to(o_ptr.dtype.element_ty))

    return int8_quant, int8_dequant, group_quant, group_dequant


def int8_quantize(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] -> (int8 codes [rows, cols], fp16 scales [rows])."""
    src = src.contiguous()
    rows, cols = src.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=src.device)
    scale = torch.empty(rows, dtype=torch.float16, device=src.device)
    _kernels()[0][(rows,)](src, q, scale, cols, BLOCK=_next_pow2(cols))
    return q, scale


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 is written as fp32 and cast by torch: Triton's interpreter truncates fp32->bf16
    # where GPUs and torch round to nearest even, and the two paths must agree bit for bit.
    return torch.float32 if dtype == torch.bfloat16 else dtype


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, cols = q.shape
    out = torch.empty((rows, cols), dtype=_kernel_dtype(dtype), device=q.device)
    _kernels()[1][(rows,)](q.contiguous(), scale.contiguous(), out, cols, BLOCK=_next_pow2(cols))
    return out.to(dtype)


def group_quantize(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, G] -> (codes packed low bits first [N*G*bits/8] uint8, min fp16 [N], step fp16 [N])."""
    rows = rows.contiguous()
    n, g = rows.shape
    packed = torch.empty(n * g * bits // 8, dtype=torch.uint8, device=rows.device)
    mn = torch.empty(n, dtype=torch.float16, device=rows.device)
    step = torch.empty(n, dtype=torch.float16, device=rows.device)
    _kernels()[2][(n,)](rows, packed, mn, step, G=g, BITS=bits)
    return packed, mn, step


def group_dequantize(packed: torch.Tensor, mn: torch.Tensor, step: torch.Tensor, bits: int, group: int,
                     dtype: torch.dtype) -> torch.Tensor:
    n = mn.numel()
    out = torch.empty((n, group), dtype=_kernel_dtype(dtype), device=packed.device)
    _kernels()[3][(n,)](packed.contiguous(), mn.contiguous(), step.contiguous(), out, G=group, BITS=bits)
    return out.to(dtype)
