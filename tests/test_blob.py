import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmw.blob import HEADER_SIZE, MAGIC, BlobMeta, pack_blob, parse_blob
from kvmw.errors import (
    BlobError,
    CorruptBlobError,
    ForeignBlobError,
    ForeignModelError,
    TruncatedBlobError,
    UnknownCodecError,
    UnknownVersionError,
)
from kvmw.quantizers import decode_blob, make_codec


def _blob(kv, fp, codec="none", **kw):
    return bytes(make_codec(codec).encode(kv, fp.digest, **kw))


@pytest.mark.parametrize("codec", ["none", "zstd", "none+zstd:l1:shuffle"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_exact_and_self_describing(kv_small, fp, codec, dtype):
    kv = kv_small.to(dtype)
    blob = _blob(kv, fp, codec, positions=np.arange(100, 116), extra={"key": "abc"})
    out, meta = decode_blob(blob, fp.digest)
    assert out.dtype == dtype and torch.equal(out, kv)
    assert meta.shape == tuple(kv.shape) and meta.fingerprint == fp.digest
    assert meta.positions.tolist() == list(range(100, 116)) and meta.extra == {"key": "abc"}


def test_pruned_positions_survive(kv_small, fp):
    kept = np.array([0, 1, 2, 3, 9, 10, 11, 12, 13, 20, 21, 22, 30, 31, 40, 41])
    _, meta = decode_blob(_blob(kv_small, fp, positions=kept))
    assert meta.positions.tolist() == kept.tolist()


def test_typed_errors(kv_small, fp):
    blob = _blob(kv_small, fp)
    with pytest.raises(TruncatedBlobError):
        parse_blob(blob[:10])
    with pytest.raises(TruncatedBlobError):
        parse_blob(blob[:-1])
    with pytest.raises(CorruptBlobError):
        parse_blob(blob + b"x")
    flipped = bytearray(blob)
    flipped[-5] ^= 0x10
    with pytest.raises(CorruptBlobError, match="checksum"):
        parse_blob(flipped)
    with pytest.raises(ForeignBlobError):
        parse_blob(b"GIF89a" + blob[6:])
    newer = bytearray(blob)
    struct.pack_into("<H", newer, 4, 2)
    with pytest.raises(UnknownVersionError):
        parse_blob(newer)
    with pytest.raises(ForeignModelError):
        decode_blob(blob, "0" * 32)


def test_unknown_codec_is_typed(kv_small, fp):
    meta = BlobMeta(codec="int13", codec_version=1, shape=tuple(kv_small.shape), dtype="float16",
                    fingerprint=fp.digest, positions=np.arange(16))
    blob = pack_blob(meta, b"\0" * 10)
    parse_blob(blob)  # the frame itself is fine
    with pytest.raises(UnknownCodecError):
        decode_blob(blob)
    meta.codec, meta.codec_version = "none", 99
    with pytest.raises(UnknownCodecError, match="version"):
        decode_blob(pack_blob(meta, b"\0" * 10))


def test_payload_that_does_not_match_shape_is_corrupt(kv_small, fp):
    meta = BlobMeta(codec="none", codec_version=1, shape=(2, 2, 16, 2, 8), dtype="float16",
                    fingerprint=fp.digest, positions=np.arange(16))
    with pytest.raises(CorruptBlobError):
        decode_blob(pack_blob(meta, b"\0" * 100))


def test_header_layout_is_documented_size(kv_small, fp):
    blob = _blob(kv_small, fp)
    assert blob[:4] == MAGIC and HEADER_SIZE == 32
    meta_len, pos_len, payload_len = struct.unpack_from("<IIQ", blob, 8)
    assert HEADER_SIZE + meta_len + pos_len + payload_len == len(blob)
    assert pos_len == 16 * 4 and payload_len == kv_small.numel() * 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corruption_never_yields_wrong_kv(kv_small, fp, data):
    """Any flips, truncations or splices: a typed error, or (never) different KV."""
    blob = bytearray(_blob(kv_small, fp, data.draw(st.sampled_from(["none", "zstd"]))))
    action = data.draw(st.sampled_from(["flip", "truncate", "splice", "header"]))
    if action == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8)):
            blob[pos] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif action == "splice":
        at = data.draw(st.integers(0, len(blob)))
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    else:
        pos = data.draw(st.integers(0, HEADER_SIZE - 1))
        blob[pos] ^= data.draw(st.integers(1, 255))
    try:
        out, _ = decode_blob(bytes(blob), fp.digest)
    except BlobError:
        return
    assert torch.equal(out, kv_small)  # only reachable if the damage was a no-op


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_are_typed_errors(raw):
    with pytest.raises(BlobError):
        decode_blob(raw)
