"""The generate hook on real SmolLM2 with real tiers: exact reuse, partial hits, bad input."""

import pytest
import torch

from kvmw.config import KVMWConfig
from kvmw.integrations.hf import KVMW, UnsupportedInputError
from kvmw.quantizers import make_codec
from kvmw.storage_tiers import CPUTier, DiskTier, RedisTier, TieredStore
from kvmw.text_data import essay_text

CS = 128
GEN = dict(max_new_tokens=8, do_sample=False)


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tok = smollm2
    return tok(essay_text(4000), return_tensors="pt").input_ids[:, :4 * CS + 37]


@pytest.fixture(scope="module")
def reference(smollm2, prompt):
    model, _ = smollm2
    with torch.inference_mode():
        return model.generate(prompt, return_dict_in_generate=True, output_logits=True, **GEN)


def make_hook(model, tok, store, codec="none"):
    return KVMW(model, tok, KVMWConfig.load(env={}, chunk_size=CS, codec=codec), store=store)


def test_warm_call_is_token_identical_to_plain_generate(smollm2, prompt, reference, tmp_path):
    model, tok = smollm2
    store = TieredStore([CPUTier(1 << 30), DiskTier(tmp_path, 1 << 30)])
    hook = make_hook(model, tok, store)
    cold = hook.generate(prompt, return_dict_in_generate=True, output_logits=True, **GEN)
    assert hook.stats()["tokens_reused"] == 0 and hook.stats()["chunks_stored"] == 4
    store.flush(30)
    warm = hook.generate(prompt, return_dict_in_generate=True, output_logits=True, **GEN)
    st = hook.stats()
    assert st["tokens_reused"] == 4 * CS and st["chunk_hits"] == 4 and st["bytes_loaded"]["cpu"] > 0
    assert st["tokens_computed"] == 4 * CS + 37 + 37  # cold: all; warm: the tail only
    for out in (cold, warm):
        assert torch.equal(out.sequences, reference.sequences)
        torch.testing.assert_close(out.logits[0], reference.logits[0], rtol=1e-4, atol=1e-4)
    hook.close()


def test_a_new_process_is_warm_from_disk_and_prompt_of_exact_chunks(smollm2, prompt, reference, tmp_path):
    model, tok = smollm2
    first = make_hook(model, tok, TieredStore([CPUTier(1 << 30), DiskTier(tmp_path, 1 << 30)]))
    first.generate(prompt, **GEN)
    first.close()  # flushes the write-through to disk
    second = make_hook(model, tok, TieredStore([CPUTier(1 << 30), DiskTier(tmp_path, 1 << 30)]))
    out = second.generate(prompt, **GEN)
    assert torch.equal(out, reference.sequences)
    assert second.stats()["bytes_loaded"]["disk"] > 0 and second.stats()["tokens_reused"] == 4 * CS
    exact = prompt[:, : 2 * CS]  # every token in a stored chunk: one is still computed
    with torch.inference_mode():
        ref = model.generate(exact, **GEN)
    assert torch.equal(second.generate(exact, **GEN), ref)
    assert second.stats()["tokens_reused"] == 4 * CS + 2 * CS - 1
    second.close()


def test_partial_prefix_and_attach(smollm2, prompt):
    model, tok = smollm2
    hook = make_hook(model, tok, TieredStore([CPUTier(1 << 30)])).attach()
    try:
        model.generate(prompt, **GEN)  # plain generate now goes through kvmw
        other = torch.cat([prompt[:, : 2 * CS], prompt[:, 3 * CS:]], dim=1)  # diverges in chunk 2
        with torch.inference_mode():
            hook.detach()
            ref = model.generate(other, **GEN)
            hook.attach()
        assert torch.equal(model.generate(other, **GEN), ref)
        st = hook.stats()
        assert st["requests"] == 2 and st["tokens_reused"] == 2 * CS
    finally:
        hook.close()
    assert model.generate.__func__ is type(model).generate  # detached


def test_batches_and_padding_are_refused(smollm2, prompt):
    model, tok = smollm2
    hook = make_hook(model, tok, TieredStore([CPUTier(1 << 30)]))
    with pytest.raises(UnsupportedInputError, match="batch size 1"):
        hook.generate(prompt.repeat(2, 1), **GEN)
    mask = torch.ones_like(prompt)
    mask[0, 0] = 0
    with pytest.raises(UnsupportedInputError, match="padded"):
        hook.generate(prompt, attention_mask=mask, **GEN)
    text_out = hook.generate("The best way to start a startup is", **GEN)
    assert text_out.shape[1] > 8
    hook.close()


def test_foreign_and_corrupt_chunks_are_recomputed(smollm2, tiny_llama, prompt, reference, tmp_path):
    model, tok = smollm2
    disk = DiskTier(tmp_path, 1 << 30)
    hook = make_hook(model, tok, TieredStore([disk]))
    keys = hook.keyspace.prefix_keys(prompt[0])
    # chunk 0: a blob of another model under our key; chunk 1: valid; chunk 2: bit-flipped
    hook.generate(prompt, **GEN)
    hook.store.flush(30)
    foreign = make_codec("none").encode(torch.zeros(2, 2, CS, 2, 16), "0" * 32)
    disk.put(keys[0], foreign)
    out = hook.generate(prompt, **GEN)
    assert torch.equal(out, reference.sequences)
    assert hook.store.counts["foreign"] == 1 and hook.stats()["tokens_reused"] == 0
    hook.store.flush(30)  # chunk 0 was stored again by that call
    path = disk.path(keys[2])
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(raw)
    out = hook.generate(prompt, **GEN)
    assert torch.equal(out, reference.sequences)
    assert hook.stats()["tokens_reused"] == 2 * CS and hook.store.counts["corrupt"] == 1
    hook.close()


def test_redis_dying_mid_load_falls_back_to_recomputation(smollm2, prompt, reference, redis_proc):
    model, tok = smollm2
    store = TieredStore([RedisTier(redis_proc.url, prefix="h:", timeout=0.5)], retry_backoff=0.2)
    hook = make_hook(model, tok, store)
    hook.generate(prompt, **GEN)
    assert store.tiers[0].contains(hook.keyspace.prefix_keys(prompt[0])) == [True] * 4
    original = store.tiers[0].get_many
    calls = []

    def dies_after_two(keys):  # the hook reads one chunk per call
        calls.append(keys)
        if len(calls) == 3:
            redis_proc.kill()
        return original(keys)

    store.tiers[0].get_many = dies_after_two
    out = hook.generate(prompt, **GEN)
    assert torch.equal(out, reference.sequences)
    assert hook.stats()["tokens_reused"] == 2 * CS and hook.stats()["load_failures"] == 1
    hook.close()


@pytest.mark.parametrize("validate", [True, False])
def test_each_loaded_chunk_is_checksummed_once(smollm2, prompt, monkeypatch, validate):
    """The store validates what it returns; the decoder does not hash the same bytes again
    (hashing is a full pass over every loaded byte). A store that does not validate leaves
    it to the decoder, so the count is one either way."""
    import kvmw.blob

    model, tok = smollm2
    hook = make_hook(model, tok, TieredStore([CPUTier(1 << 30)], validate=validate))
    hook.generate(prompt, **GEN)
    hashed = []
    real = kvmw.blob._checksum
    monkeypatch.setattr(kvmw.blob, "_checksum", lambda mv: hashed.append(mv.nbytes) or real(mv))
    hook.generate(prompt, **GEN)
    assert hook.stats()["chunk_hits"] == 4
    stored = [nbytes for _, nbytes in hook.store.tiers[0].entries()]
    assert sorted(hashed) == sorted(stored)  # each loaded blob once, nothing else
    hook.close()
