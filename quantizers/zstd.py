"""Zstandard lossless stage, optionally after byte-plane shuffling.

Shuffling groups the i-th byte of every 16/32-bit value together (as Blosc
does): exponent/high bytes of KV values are highly repetitive while mantissa
bytes are noise, so zstd finds far more to remove in the planes than in the
interleaved stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zstandard

from kvmw.errors import CorruptBlobError
from kvmw.quantizers.base import Lossless, register_lossless


@register_lossless
class Zstd(Lossless):
    name = "zstd"
    options = frozenset({"l", "shuffle"})

    def __init__(self, level: int = 3, shuffle: bool = False) -> None:
        if not -7 <= level <= 22:
            raise ValueError(f"zstd level {level} outside -7..22")
        self.level, self.shuffle = level, bool(shuffle)

    def params(self) -> dict[str, Any]:
        return {"level": self.level, "shuffle": self.shuffle}

    @classmethod
    def from_spec(cls, opts: dict[str, str]) -> "Zstd":
        return cls(level=int(opts.get("l") or 3), shuffle="shuffle" in opts)

    def compress(self, parts: list[Any], element_size: int) -> bytes:
        shuffle = element_size if self.shuffle else 0
        data = np.concatenate([np.frombuffer(p, dtype=np.uint8) for p in parts]) if len(parts) > 1 \
            else np.frombuffer(parts[0], dtype=np.uint8)
        if shuffle > 1 and data.size % shuffle == 0:
            data = np.ascontiguousarray(data.reshape(-1, shuffle).T)
        else:
            shuffle = 0
        # One byte records the shuffle actually applied, so decoding needs no params.
        return bytes([shuffle]) + zstandard.ZstdCompressor(level=self.level).compress(data)

    def decompress(self, data: memoryview) -> memoryview:
        if data.nbytes < 1:
            raise CorruptBlobError("empty zstd payload")
        shuffle = data[0]
        try:
            raw = zstandard.ZstdDecompressor().decompress(data[1:])
        except zstandard.ZstdError as e:
            raise CorruptBlobError(f"zstd payload: {e}") from e
        if shuffle > 1:
            arr = np.frombuffer(raw, dtype=np.uint8)
            if arr.size % shuffle:
                raise CorruptBlobError("zstd payload length does not match its shuffle")
            return memoryview(np.ascontiguousarray(arr.reshape(shuffle, -1).T).reshape(-1))
        return memoryview(raw)
