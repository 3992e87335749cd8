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
        raw = decompress_exact(data[1:], MAX_DECOMPRESSED)
        if shuffle > 1:
            arr = np.frombuffer(raw, dtype=np.uint8)
            if arr.size % shuffle:
                raise CorruptBlobError("zstd payload length does not match its shuffle")
            return memoryview(np.ascontiguousarray(arr.reshape(shuffle, -1).T).reshape(-1))
        return memoryview(raw)


#: the most one zstd stage may inflate to (a frame's header claiming more is corrupt)
MAX_DECOMPRESSED = 1 << 30


def decompress_exact(data: memoryview, limit: int) -> bytes:
    """One whole zstd frame and nothing after it, inflating to at most `limit` bytes (its
    header's content size, checked before anything is allocated). zstd itself ignores
    bytes after a frame; here they make the payload corrupt, as a cut frame does."""
    try:
        size = zstandard.frame_content_size(data)
        if not 0 <= size <= limit:
            raise CorruptBlobError(f"zstd frame of {size} bytes (unknown or over {limit})")
        dobj = zstandard.ZstdDecompressor().decompressobj()
        raw = dobj.decompress(data)
    except zstandard.ZstdError as e:
        raise CorruptBlobError(f"zstd payload: {e}") from e
    if not dobj.eof or dobj.unused_data or len(raw) != size:
        raise CorruptBlobError("zstd payload does not end where its frame does")
    return raw
