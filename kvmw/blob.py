"""Blob format v1: the self-describing bytes every tier stores.

    offset  size  field
    0       4     magic  b"KVMW"
    4       2     format version (1)
    6       2     flags (0; reserved)
    8       4     meta_len       UTF-8 JSON: codec id/version/params, shape, dtype,
                                 model fingerprint digest, extra
    12      4     positions_len  int32 little-endian token positions (RoPE positions
                                 of the stored tokens; not always contiguous after eviction)
    16      8     payload_len    codec output
    24      8     checksum       xxh3-64 over bytes [0, 24) and [32, end)
    32      ...   meta, positions, payload

Parsing never executes anything (JSON + raw arrays, no pickle), checks every
length against the buffer before touching it, and verifies the checksum before
the meta is trusted. Each failure is a typed `BlobError`; stores turn it into a
miss. The payload is returned as a zero-copy memoryview.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from kvmw.errors import (
    CorruptBlobError,
    ForeignBlobError,
    ForeignModelError,
    TruncatedBlobError,
    UnknownVersionError,
)

MAGIC = b"KVMW"
VERSION = 1
_FIXED = struct.Struct("<4sHHIIQQ")
HEADER_SIZE = _FIXED.size  # 32
_CHECKSUM_AT = 24
MAX_META = 1 << 20  # a header larger than this is garbage, not a bigger header


@dataclass
class BlobMeta:
    """Everything in a blob but the payload."""

    codec: str
    codec_version: int
    shape: tuple[int, ...]
    dtype: str
    fingerprint: str
    positions: np.ndarray
    codec_params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "codec": self.codec,
                "codec_version": self.codec_version,
                "codec_params": self.codec_params,
                "shape": list(self.shape),
                "dtype": self.dtype,
                "fingerprint": self.fingerprint,
                "extra": self.extra,
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()


@dataclass
class Blob:
    meta: BlobMeta
    payload: memoryview


def pack_blob(meta: BlobMeta, payload: Any) -> bytearray:
    """Frame `payload` (bytes-like, or a list of bytes-like parts) with `meta`.

    One allocation and one copy of the payload; returns a writable bytearray
    (wrap it in a memoryview to hand it to clients that insist on bytes-likes).
    """
    meta_bytes = meta.to_json()
    pos = np.ascontiguousarray(meta.positions, dtype="<i4").reshape(-1)
    parts = payload if isinstance(payload, (list, tuple)) else [payload]
    views = [memoryview(p).cast("B") for p in parts]
    payload_len = sum(v.nbytes for v in views)
    total = HEADER_SIZE + len(meta_bytes) + pos.nbytes + payload_len
    buf = bytearray(total)
    mv = memoryview(buf)
    _FIXED.pack_into(buf, 0, MAGIC, VERSION, 0, len(meta_bytes), pos.nbytes, payload_len, 0)
    off = HEADER_SIZE
    mv[off:off + len(meta_bytes)] = meta_bytes
    off += len(meta_bytes)
    mv[off:off + pos.nbytes] = pos.view(np.uint8)
    off += pos.nbytes
    for v in views:
        mv[off:off + v.nbytes] = v
        off += v.nbytes
    struct.pack_into("<Q", buf, _CHECKSUM_AT, _checksum(mv))
    return buf


def _checksum(mv: memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(mv[:_CHECKSUM_AT])
    h.update(mv[HEADER_SIZE:])
    return h.intdigest()


def blob_size(data: Any) -> int:
    """Total length a blob's header declares (needs only the first 32 bytes)."""
    mv = memoryview(data).cast("B")
    if mv.nbytes < HEADER_SIZE:
        raise TruncatedBlobError(f"blob has {mv.nbytes} bytes, header needs {HEADER_SIZE}")
    magic, version, _flags, meta_len, pos_len, payload_len, _ = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ForeignBlobError(f"not a kvmw blob (magic {bytes(magic)!r})")
    if version != VERSION:
        raise UnknownVersionError(f"blob format version {version}; this build reads {VERSION}")
    if meta_len > MAX_META or pos_len % 4:
        raise CorruptBlobError(f"implausible header lengths meta={meta_len} positions={pos_len}")
    return HEADER_SIZE + meta_len + pos_len + payload_len


def parse_blob(data: Any, expected_fingerprint: str | None = None, verify: bool = True) -> Blob:
    """Validate and split a blob. Raises a `BlobError` subclass on any problem.

    `expected_fingerprint`: digest of the model asking; a blob of another model
    raises `ForeignModelError`. `verify=False` skips the checksum (listing only).
    """
    mv = memoryview(data).cast("B")
    total = blob_size(mv)
    if mv.nbytes < total:
        raise TruncatedBlobError(f"blob has {mv.nbytes} of {total} bytes")
    if mv.nbytes > total:
        raise CorruptBlobError(f"blob has {mv.nbytes - total} trailing bytes")
    _, _, _, meta_len, pos_len, payload_len, checksum = _FIXED.unpack_from(mv, 0)
    if verify and _checksum(mv) != checksum:
        raise CorruptBlobError("blob checksum mismatch")
    off = HEADER_SIZE
    meta = _parse_meta(mv[off:off + meta_len])
    off += meta_len
    positions = np.frombuffer(mv[off:off + pos_len], dtype="<i4")
    off += pos_len
    blob_meta = BlobMeta(positions=positions, **meta)
    if expected_fingerprint is not None and blob_meta.fingerprint != expected_fingerprint:
        raise ForeignModelError(
            f"blob made by model {blob_meta.fingerprint}, asked by {expected_fingerprint}"
        )
    return Blob(blob_meta, mv[off:off + payload_len])


_META_TYPES = {
    "codec": str, "codec_version": int, "codec_params": dict, "shape": list,
    "dtype": str, "fingerprint": str, "extra": dict,
}


def _parse_meta(raw: memoryview) -> dict[str, Any]:
    try:
        meta = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptBlobError(f"blob meta is not JSON: {e}") from e
    if not isinstance(meta, dict) or set(meta) != set(_META_TYPES):
        raise CorruptBlobError("blob meta has the wrong fields")
    for name, typ in _META_TYPES.items():
        if not isinstance(meta[name], typ):
            raise CorruptBlobError(f"blob meta field {name!r} is not {typ.__name__}")
    if not all(isinstance(d, int) and d >= 0 for d in meta["shape"]):
        raise CorruptBlobError(f"blob shape {meta['shape']!r} is not a list of sizes")
    meta["shape"] = tuple(meta["shape"])
    return meta
