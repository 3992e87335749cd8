"""CacheGen-style coding: anchor tokens, in-group deltas, layer-wise bits, entropy coding.

Liu et al. 2024, "CacheGen: KV Cache Compression and Streaming for Fast Large
Language Model Serving", SIGCOMM '24, arXiv:2310.07240. Nearby tokens have
similar KV, so within each group of `group` tokens the first token is an
anchor (int8, per-token scale) and the others are coded as deltas from the
*reconstructed* anchor. Deltas are quantized per (layer, K/V, channel) with
more bits in early layers than late ones (early layers' errors propagate
through every later layer), then entropy coded with a per-(layer, K/V)
symbol distribution.

Entropy stage: ``ans`` (default; rANS from the `constriction` library with the
exact per-stream histograms stored in the payload) or ``zstd`` (symbols as
bytes, zstd's Huffman literals). ANS is the default: it codes within ~0.1% of
the empirical entropy, which is what the adaptive model buys; zstd is faster.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zstandard

from kvmw.errors import ConfigError, CorruptBlobError
from kvmw.quantizers.base import Quantizer, register_quantizer, tensor_bytes, tensor_from_bytes
from kvmw.quantizers.common import Workspace, int_opt, round_half_up_, split_payload
from kvmw.quantizers.zstd import decompress_exact

BITS = range(2, 9)
QMAX = 127  # symbols are uint8 0..254; |delta| beyond 127 steps is clamped


def _ans():
    try:
        import constriction
    except ImportError as e:  # pragma: no cover - constriction is a core dependency
        raise ConfigError("cachegen's ans entropy stage needs `pip install constriction`") from e
    return constriction


@register_quantizer
class CacheGen(Quantizer):
    name = "cachegen"
    options = frozenset({"g", "hi", "mid", "lo", "ans", "zstd"})

    def __init__(self, group: int = 8, bits: tuple[int, int, int] | list[int] = (5, 4, 3),
                 entropy: str = "ans") -> None:
        bits = tuple(int(b) for b in bits)
        if not 2 <= group <= 64 or len(bits) != 3 or any(b not in BITS for b in bits):
            raise ValueError(f"cachegen group {group} / bits {bits}")
        if entropy not in ("ans", "zstd"):
            raise ValueError(f"cachegen entropy stage is ans or zstd, got {entropy!r}")
        self.group, self.bits, self.entropy = group, bits, entropy
        self._ws = Workspace()

    def params(self) -> dict[str, Any]:
        return {"group": self.group, "bits": list(self.bits), "entropy": self.entropy}

    @classmethod
    def from_spec(cls, opts: dict[str, str]) -> "CacheGen":
        bits = (int_opt(opts, "hi", 5, BITS), int_opt(opts, "mid", 4, BITS), int_opt(opts, "lo", 3, BITS))
        return cls(group=int_opt(opts, "g", 8), bits=bits, entropy="zstd" if "zstd" in opts else "ans")

    def layer_bits(self, num_layers: int) -> np.ndarray:
        band = np.minimum(np.arange(num_layers) * 3 // max(num_layers, 1), 2)
        return np.asarray(self.bits)[band]

    def _dims(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        L, two, T, H, D = shape
        ng = -(-T // self.group)
        return L * two, T, ng, H * D

    def encode(self, kv: torch.Tensor, positions: np.ndarray | None = None) -> list[Any]:
        L = kv.shape[0]
        S, T, ng, C = self._dims(tuple(kv.shape))
        g = self.group
        x = self._ws.get("x", (S, ng * g, C), torch.float32)
        x[:, :T].copy_(kv.reshape(S, T, C))
        if ng * g != T:
            x[:, T:].copy_(x[:, T - 1:T].expand(S, ng * g - T, C))
        xg = x.view(S, ng, g, C)
        # anchors: int8 with one scale per anchor token
        anchors = xg[:, :, 0]
        amax = torch.maximum(anchors.amax(dim=2), anchors.amin(dim=2).neg())
        a_scale = (amax / 127.0).to(torch.float16)
        a_s = a_scale.float().masked_fill_(a_scale == 0, 1.0)
        a_codes = round_half_up_(anchors / a_s[..., None]).clamp_(-127, 127).to(torch.int8)
        a_hat = a_codes.float() * a_scale.float()[..., None]
        # deltas from the reconstructed anchor, one uniform step per (stream, channel):
        # step = std * 2**(2.05 - bits), so the entropy-coded rate is ~`bits` per value
        deltas = xg[:, :, 1:].sub_(a_hat[:, :, None])
        rel = torch.from_numpy(np.exp2(2.05 - np.repeat(self.layer_bits(L), 2))).float()  # [S]
        std = deltas.square().mean(dim=(1, 2)).sqrt_()  # [S, C], deltas are ~zero-mean
        d_step = (std * rel[:, None]).to(torch.float16)
        ds = d_step.float().masked_fill_(d_step == 0, 1.0)
        deltas.div_(ds[:, None, None])
        round_half_up_(deltas).clamp_(-QMAX, QMAX).add_(QMAX)
        symbols = deltas.to(torch.uint8).reshape(S, -1)  # [S, ng*(g-1)*C], values 0..2*QMAX
        parts = [tensor_bytes(a_codes), tensor_bytes(a_scale), tensor_bytes(d_step)]
        return parts + self._entropy_encode(symbols.numpy())

    def _entropy_encode(self, symbols: np.ndarray) -> list[Any]:
        if self.entropy == "zstd":
            return [zstandard.ZstdCompressor(level=3).compress(symbols.tobytes())]
        constriction = _ans()
        # per stream: the symbol range [lo, hi] (u8 each) and its exact histogram (u32)
        lo, hi = symbols.min(axis=1), symbols.max(axis=1)
        tables = [np.bincount(symbols[s] - lo[s], minlength=int(hi[s] - lo[s]) + 1).astype(np.uint32)
                  for s in range(len(symbols))]
        coder = constriction.stream.stack.AnsCoder()
        for s in reversed(range(len(symbols))):  # a stack: encode backwards, decode forwards
            if lo[s] == hi[s]:
                continue  # one symbol: its range says it all
            model = constriction.stream.model.Categorical(tables[s].astype(np.float64), perfect=False)
            coder.encode_reverse((symbols[s] - lo[s]).astype(np.int32), model)
        return [np.stack([lo, hi], axis=1).astype(np.uint8), np.concatenate(tables), coder.get_compressed()]

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | None = None) -> torch.Tensor:
        S, T, ng, C = self._dims(shape)
        g = self.group
        fixed = [S * ng * C, S * ng * 2, S * C * 2]
        if payload.nbytes < sum(fixed):
            raise CorruptBlobError("cachegen payload shorter than its fixed part")
        ab, asb, dsb, rest = split_payload(payload, fixed + [payload.nbytes - sum(fixed)])
        symbols = self._entropy_decode(rest, S, ng * (g - 1) * C)
        a_hat = tensor_from_bytes(ab, torch.int8, (S, ng, C)).float() * tensor_from_bytes(asb, torch.float16, (S, ng, 1)).float()
        d_step = tensor_from_bytes(dsb, torch.float16, (S, C)).float()
        x = self._ws.get("xd", (S, ng, g, C), torch.float32)
        x[:, :, 0].copy_(a_hat)
        d = x[:, :, 1:]
        d.copy_(torch.from_numpy(np.require(symbols, requirements='W')).view(S, ng, g - 1, C))
        d.sub_(QMAX).mul_(d_step[:, None, None]).add_(a_hat[:, :, None])
        return x.view(S, ng * g, C)[:, :T].to(dtype).reshape(shape)

    def _entropy_decode(self, data: memoryview, streams: int, n_sym: int) -> np.ndarray:
        if self.entropy == "zstd":
            raw = decompress_exact(data, streams * n_sym)
            if len(raw) != streams * n_sym:
                raise CorruptBlobError("cachegen symbol count mismatch")
            sym = np.frombuffer(raw, dtype=np.uint8).reshape(streams, n_sym)
            if sym.max(initial=0) > 2 * QMAX:
                raise CorruptBlobError("cachegen symbol outside its alphabet")
            return sym
        constriction = _ans()
        if data.nbytes < 2 * streams:
            raise CorruptBlobError("cachegen ANS payload is too short")
        ranges = np.frombuffer(data[: 2 * streams], dtype=np.uint8).reshape(streams, 2).astype(np.int64)
        sizes = ranges[:, 1] - ranges[:, 0] + 1
        n_counts = int(sizes.sum()) * 4
        body = data[2 * streams:]
        if (sizes <= 0).any() or body.nbytes < n_counts or (body.nbytes - n_counts) % 4:
            raise CorruptBlobError("cachegen ANS payload has the wrong length")
        counts = np.frombuffer(body[:n_counts], dtype=np.uint32)
        words = np.frombuffer(body[n_counts:], dtype=np.uint32).copy()
        out = np.empty((streams, n_sym), dtype=np.uint8)
        try:
            coder = constriction.stream.stack.AnsCoder(words)
            off = 0
            for s, n in enumerate(sizes):
                c = counts[off:off + n].astype(np.float64)
                off += n
                if c.sum() != n_sym:
                    raise CorruptBlobError("cachegen histogram does not match the symbol count")
                if n == 1:
                    out[s] = ranges[s, 0]
                    continue
                model = constriction.stream.model.Categorical(c, perfect=False)
                out[s] = coder.decode(model, n_sym) + ranges[s, 0]
            # a whole stream, decoded, leaves the coder exactly empty: a cut or padded one
            # (even under a valid checksum) leaves it in some other state
            if not coder.is_empty():
                raise CorruptBlobError("cachegen ANS stream does not end where its symbols do")
        except CorruptBlobError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a Rust panic surfaces as a BaseException
            raise CorruptBlobError(f"cachegen ANS stream: {type(e).__name__}: {e}") from e
        return out
