"""Every codec: round trip on real SmolLM2 KV within its error budget, sizes, specs, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmw.errors import BlobError, ConfigError
from kvmw.quantizers import QUANTIZERS, decode_blob, make_codec
from kvmw.quantizers.common import pack_bits, unpack_bits

# (spec, min size ratio vs fp16, max relative error of K, of V) on real SmolLM2 KV
BUDGETS = [
    ("none", 0.99, 0.0, 0.0),
    ("zstd", 1.0, 0.0, 0.0),
    ("int8", 1.95, 0.02, 0.02),
    ("int8:ktoken", 1.95, 0.02, 0.02),
    ("fp8", 1.95, 0.04, 0.04),
    ("fp8:head", 1.9, 0.04, 0.04),
    ("int4", 3.5, 0.2, 0.15),
    ("kivi4", 3.5, 0.07, 0.13),
    ("kivi4:g32", 3.1, 0.06, 0.11),
    ("kivi2", 5.1, 0.25, 0.5),
    ("kivi2:g64", 6.2, 0.3, 0.6),
    ("kivi2+zstd", 6.0, 0.25, 0.5),
    ("cachegen", 3.0, 0.1, 0.2),
    ("cachegen:zstd", 2.8, 0.1, 0.2),
    ("cachegen:hi4:mid4:lo4", 3.0, 0.07, 0.13),
]


@pytest.fixture(scope="module")
def real_kv(smollm2):
    from kvmw.integrations.hf.capture import capture_kv
    from kvmw.text_data import essay_text

    model, tok = smollm2
    ids = tok(essay_text(3000), return_tensors="pt").input_ids[0, :256]
    return capture_kv(model, ids).to(torch.float16)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("spec,min_ratio,max_k,max_v", BUDGETS)
def test_codec_on_real_kv(real_kv, spec, min_ratio, max_k, max_v):
    codec = make_codec(spec)
    positions = np.arange(256, 512)  # a chunk after the first: no attention-sink tokens
    blob = codec.encode(real_kv, "f" * 32, positions=positions)
    out, meta = decode_blob(bytes(blob), "f" * 32)
    assert out.shape == real_kv.shape and out.dtype == real_kv.dtype
    assert real_kv.numel() * 2 / len(blob) >= min_ratio
    assert rel_err(out[:, 0], real_kv[:, 0]) <= max_k
    assert rel_err(out[:, 1], real_kv[:, 1]) <= max_v
    assert meta.codec == codec.quantizer.name and meta.codec_params == {
        **codec.quantizer.params(), **({"lossless": meta.codec_params["lossless"]} if codec.lossless else {})}
    # decoding is deterministic and encoding twice gives the same bytes (no stale workspace)
    assert bytes(codec.encode(real_kv, "f" * 32, positions=positions)) == bytes(blob)


@pytest.mark.parametrize("spec", ["int8", "fp8", "int4:g32", "kivi2:g32", "kivi4", "cachegen", "cachegen:zstd"])
@pytest.mark.parametrize("tokens", [1, 7, 33, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_odd_lengths_and_dtypes(spec, tokens, dtype):
    torch.manual_seed(tokens)
    kv = (torch.randn(3, 2, tokens, 2, 32) * torch.linspace(0.1, 4, 32)).to(dtype)
    out, _ = decode_blob(make_codec(spec).encode(kv, "f" * 32))
    assert out.shape == kv.shape and out.dtype == dtype
    assert rel_err(out, kv) < 0.7


@pytest.mark.parametrize("spec", ["none", "int8", "int8:ktoken", "kivi4", "cachegen:zstd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_into_a_strided_slice_equals_decode(spec, dtype):
    torch.manual_seed(1)
    kv = (torch.randn(3, 2, 40, 2, 32) * torch.linspace(0.1, 4, 32)).to(dtype)
    blob = bytes(make_codec(spec).encode(kv, "f" * 32))
    want, _ = decode_blob(blob, "f" * 32)
    buf = torch.full((3, 2, 100, 2, 32), 7.0, dtype=dtype)  # the loader's shared buffer
    got, _ = decode_blob(blob, "f" * 32, out=buf[:, :, 30:70])
    assert torch.equal(buf[:, :, 30:70], want) and got.data_ptr() == buf[:, :, 30:70].data_ptr()
    assert bool((buf[:, :, :30] == 7).all()) and bool((buf[:, :, 70:] == 7).all())  # nothing else written
    with pytest.raises(BlobError):  # a blob of another length never lands in the buffer
        decode_blob(blob, "f" * 32, out=buf[:, :, 0:39])


def test_constant_and_zero_inputs_are_exact_enough():
    for spec in ["int8", "fp8", "int4", "kivi2", "kivi4", "cachegen"]:
        zeros = torch.zeros(2, 2, 64, 2, 32, dtype=torch.float16)
        out, _ = decode_blob(make_codec(spec).encode(zeros, "f" * 32))
        assert torch.equal(out, zeros), spec
        const = torch.full((2, 2, 64, 2, 32), 0.75, dtype=torch.float16)
        out, _ = decode_blob(make_codec(spec).encode(const, "f" * 32))
        assert (out.float() - 0.75).abs().max() < 0.01, spec


def test_kivi_groups_keys_per_channel_so_an_outlier_channel_does_not_hurt_others():
    torch.manual_seed(0)
    kv = torch.randn(1, 2, 64, 1, 64)
    kv[:, 0, :, :, 3] += 100.0  # an outlier key channel, as real keys have
    k_err_kivi = rel_err(decode_blob(make_codec("kivi4").encode(kv, "f" * 32))[0][:, 0, ..., 4:], kv[:, 0, ..., 4:])
    k_err_int4 = rel_err(decode_blob(make_codec("int4").encode(kv, "f" * 32))[0][:, 0, ..., 4:], kv[:, 0, ..., 4:])
    assert k_err_kivi < k_err_int4 / 5


def test_cachegen_spends_more_bits_on_early_layers():
    from kvmw.quantizers.cachegen import CacheGen

    assert CacheGen().layer_bits(30).tolist() == [5] * 10 + [4] * 10 + [3] * 10
    torch.manual_seed(0)
    kv = torch.randn(6, 2, 64, 2, 32)
    out, _ = decode_blob(make_codec("cachegen").encode(kv, "f" * 32))
    per_layer = [rel_err(out[i], kv[i]) for i in range(6)]
    assert per_layer[0] < per_layer[2] < per_layer[5]


@pytest.mark.parametrize("spec", ["kivi2", "kivi4:g32"])
def test_kivi_keeps_attention_sinks_exact_only_at_the_sequence_start(real_kv, spec):
    first, _ = decode_blob(make_codec(spec).encode(real_kv, "f" * 32, positions=np.arange(256)))
    assert torch.equal(first[:, :, :4], real_kv[:, :, :4]) and not torch.equal(first[:, :, 4], real_kv[:, :, 4])
    later, _ = decode_blob(make_codec(spec).encode(real_kv, "f" * 32, positions=np.arange(256, 512)))
    assert not torch.equal(later[:, :, :4], real_kv[:, :, :4])
    assert rel_err(first[:, :, 4:], real_kv[:, :, 4:]) < rel_err(later[:, :, 4:], real_kv[:, :, 4:])
    tiny = real_kv[:, :, :3]  # a chunk made only of sinks
    out, _ = decode_blob(make_codec(spec).encode(tiny, "f" * 32, positions=np.arange(3)))
    assert torch.equal(out, tiny)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bit_packing_round_trips(bits):
    codes = torch.randint(0, 1 << bits, (64,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == 64 * bits // 8
    assert torch.equal(unpack_bits(packed, bits, 64), codes)


def test_spec_errors():
    for bad in ["int3", "kivi4:g48", "zstd+zstd+zstd", "int8+lz4", "fp8:tensor", "cachegen:hi9", "kivi2:gx"]:
        with pytest.raises(ConfigError):
            make_codec(bad)
    assert make_codec("kivi2:g32+zstd").spec == "kivi2+zstd"
    assert {"none", "int8", "fp8", "int4", "kivi2", "kivi4", "cachegen"} <= set(QUANTIZERS)


SPECS = ["int8", "fp8", "int4", "kivi2", "kivi4+zstd", "cachegen", "cachegen:zstd", "zstd"]


@pytest.fixture(scope="module")
def small_blobs():
    torch.manual_seed(3)
    kv = (torch.randn(2, 2, 24, 2, 32) * 3).to(torch.float16)
    return kv, {s: bytes(make_codec(s).encode(kv, "f" * 32)) for s in SPECS}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_decoder_rejects_damage_with_typed_errors(small_blobs, data):
    kv, blobs = small_blobs
    spec = data.draw(st.sampled_from(SPECS))
    blob = bytearray(blobs[spec])
    ref, _ = decode_blob(bytes(blob))
    kind = data.draw(st.sampled_from(["flip", "truncate", "random"]))
    if kind == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=6)):
            blob[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        blob = bytearray(data.draw(st.binary(min_size=0, max_size=600)))
    try:
        out, _ = decode_blob(bytes(blob))
    except BlobError:
        return
    assert torch.equal(out, ref)  # never a different tensor


def test_payload_damage_behind_a_valid_checksum_is_still_typed(small_blobs):
    """A forged blob (valid frame, garbage payload) must fail typed, not crash: decoders
    see payloads the checksum vouched for only if someone re-signed them."""
    from kvmw.blob import parse_blob, pack_blob

    kv, blobs = small_blobs
    rng = np.random.default_rng(0)
    for spec in SPECS:
        parsed = parse_blob(blobs[spec])
        for trial in range(20):
            payload = bytearray(parsed.payload)
            if trial % 2:
                payload = payload[: rng.integers(0, len(payload))]
            else:
                idx = rng.integers(0, len(payload), size=8)
                payload_arr = np.frombuffer(payload, dtype=np.uint8).copy()
                payload_arr[idx] ^= rng.integers(1, 255, size=8).astype(np.uint8)
                payload = bytearray(payload_arr.tobytes())
            forged = pack_blob(parsed.meta, bytes(payload))
            try:
                out, _ = decode_blob(forged)
            except BlobError:
                continue
            assert out.shape == kv.shape  # decoded garbage of the right shape: a forger's problem


@pytest.mark.parametrize("spec", ["cachegen", "cachegen:zstd", "int8+zstd", "none+zstd"])
@pytest.mark.parametrize("change", ["cut", "padded"])
def test_an_entropy_stream_cut_or_padded_under_a_valid_checksum_is_refused(spec, change):
    """A frame re-packed (valid checksum) around a payload one word short or long: the
    entropy stream must not decode into other KV (the fault campaign found cachegen's ANS
    stream did), and bytes after a zstd frame are corruption, not padding."""
    from kvmw.blob import pack_blob, parse_blob
    from kvmw.errors import CorruptBlobError

    kv = torch.randn(2, 2, 32, 2, 64).to(torch.float16)
    blob = make_codec(spec).encode(kv, "f" * 32, positions=torch.arange(32))
    parsed = parse_blob(blob)
    payload = bytes(parsed.payload)
    forged = pack_blob(parsed.meta, payload[:-4] if change == "cut" else payload + bytes(4))
    with pytest.raises(CorruptBlobError):
        decode_blob(forged, "f" * 32, out=torch.empty_like(kv))


def test_a_blob_of_another_dtype_is_refused_where_the_caller_says_its_dtype():
    """fp16 bytes relabelled bf16 (same size, valid checksum) would decode to other KV."""
    import dataclasses

    from kvmw.blob import pack_blob, parse_blob
    from kvmw.errors import CorruptBlobError

    kv = torch.randn(2, 2, 32, 2, 64).to(torch.float16)
    parsed = parse_blob(make_codec("none").encode(kv, "f" * 32))
    relabelled = pack_blob(dataclasses.replace(parsed.meta, dtype="bfloat16"), bytes(parsed.payload))
    with pytest.raises(CorruptBlobError, match="bfloat16"):
        decode_blob(relabelled, "f" * 32, out=torch.empty_like(kv))
    with pytest.raises(CorruptBlobError):
        decode_blob(relabelled, "f" * 32, dtype=torch.float16)
    assert decode_blob(relabelled, "f" * 32)[0].dtype == torch.bfloat16  # no expectation: as labelled
