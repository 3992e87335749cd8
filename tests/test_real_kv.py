"""SmolLM2's real KV through every tier: bit-identical, and the model continues exactly."""

import pytest
import torch

from kvmw.config import KVMWConfig
from kvmw.fingerprint import ModelFingerprint
from kvmw.integrations.hf.capture import capture_kv, to_dynamic_cache
from kvmw.keys import KeySpace
from kvmw.layout import split_tokens
from kvmw.quantizers import decode_blob, make_codec
from kvmw.storage_tiers import build_store
from kvmw.text_data import essay_text


@pytest.fixture(scope="module")
def prompt_kv(smollm2):
    model, tok = smollm2
    ids = tok(essay_text(4000), return_tensors="pt").input_ids[0, :257]
    return ids, capture_kv(model, ids[:-1])


@pytest.mark.parametrize("tiers", [["cpu"], ["disk"], ["redis"], ["cpu", "disk", "redis"]])
@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_smollm2_kv_round_trips_through_tiers(smollm2, prompt_kv, tmp_path, redis_url, redis_prefix,
                                             tiers, codec):
    model, _ = smollm2
    ids, kv = prompt_kv
    fp = ModelFingerprint.from_hf(model)
    space = KeySpace(fp, chunk_size=64)
    keys = space.prefix_keys(ids[:-1])
    assert len(keys) == 4
    store = build_store(KVMWConfig.load(env={}, tiers=tiers, disk_path=str(tmp_path),
                                        redis_url=redis_url, redis_prefix=redis_prefix))
    c = make_codec(codec)
    for i, (key, chunk) in enumerate(zip(keys, split_tokens(kv, 64))):
        store.put(key, c.encode(chunk, fp.digest, positions=torch.arange(i * 64, i * 64 + 64)))
    assert store.flush(30)
    for t in store.tiers[:-1]:  # only the bottom tier keeps them: what a new process sees
        for key in keys:
            t.delete(key)
    assert store.prefix_hits(keys) == 4
    loaded = []
    for i, key in enumerate(keys):
        chunk, meta = decode_blob(store.get(key, fp.digest), fp.digest)
        assert meta.positions.tolist() == list(range(i * 64, i * 64 + 64))
        loaded.append(chunk)
    store.close()
    full = torch.cat(loaded, dim=2)
    assert torch.equal(full, kv)
    with torch.inference_mode():
        ref = model(ids[None]).logits[0, -1]
        got = model(ids[-1:][None], past_key_values=to_dynamic_cache(full, model.config)).logits[0, -1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert got.argmax() == ref.argmax()


def test_other_models_blob_is_never_returned(smollm2, tiny_llama, prompt_kv, tmp_path):
    ids, kv = prompt_kv
    fp_small = ModelFingerprint.from_hf(smollm2[0])
    fp_tiny = ModelFingerprint.from_hf(tiny_llama)
    store = build_store(KVMWConfig.load(env={}, tiers=["disk"], disk_path=str(tmp_path)))
    store.put("ab" * 16, make_codec("none").encode(kv[:, :, :8], fp_small.digest))
    assert store.get("ab" * 16, fp_tiny.digest) is None and store.counts["foreign"] == 1
    store.close()
