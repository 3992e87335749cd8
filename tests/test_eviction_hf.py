"""Eviction in the HF path: the hooks' recomputed attention rows equal the model's, generation
after eviction equals a from-weights reference of attention over the kept tokens at their
true positions (also when KVzip's global budget leaves layers of different lengths, each
with its own mask), bounded generation stays bounded and exact, and chunks stored pruned
(with a codec) continue correctly in a later request."""

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvmw.config import KVMWConfig
from kvmw.eviction import H2O, Budget, KVzip, SnapKV, StreamingLLM
from kvmw.eviction.attention import pool_groups
from kvmw.eviction.hf import EvictionCache, eviction_hooks, prefill_compressed, ragged_layers, reconstruct
from kvmw.eviction.store import StoreEviction
from kvmw.integrations.hf import KVMW
from kvmw.quantizers import decode_blob
from kvmw.storage_tiers import CPUTier, TieredStore
from kvmw.text_data import essay_text


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@torch.inference_mode()
def reference_logits(model, past, new_ids, start):
    """Logits of `new_ids` [n] at positions start.. when each layer attends to `past` (per layer
    (K, V) [H, S, D], post-RoPE, the kept tokens of each head) and causally to the new tokens.
    Written from the model's weights: no transformers attention code, no Cache."""
    inner = model.model
    n = new_ids.shape[0]
    h = inner.embed_tokens(new_ids[None])
    cos, sin = inner.rotary_emb(h, torch.arange(start, start + n)[None])
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    for layer, (pk, pv) in zip(inner.layers, past):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = (p(x).view(n, -1, a.head_dim).transpose(0, 1) for p in (a.q_proj, a.k_proj, a.v_proj))
        q, k = (t * cos[0] + rotate_half(t) * sin[0] for t in (q, k))
        g = q.shape[0] // k.shape[0]
        K = torch.cat([pk, k], 1).repeat_interleave(g, 0)
        V = torch.cat([pv, v], 1).repeat_interleave(g, 0)
        s = q @ K.transpose(1, 2) * a.scaling
        s[:, :, pk.shape[1]:] = s[:, :, pk.shape[1]:].masked_fill(future, float("-inf"))
        o = torch.softmax(s, -1) @ V
        h = h + a.o_proj(o.transpose(0, 1).reshape(1, n, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))[0]


def full_kv(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids[None], past_key_values=cache)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def gather(kv, positions):
    """Per layer, the (K, V) [H, k, D] of each head's kept positions [H, k]."""
    out = []
    for (k, v), pos in zip(kv, positions):
        idx = pos[..., None].expand(-1, -1, k.shape[-1])
        out.append((k.gather(1, idx), v.gather(1, idx)))
    return out


@pytest.fixture(scope="module")
def ids(smollm2):
    _, tok = smollm2
    return tok(essay_text(6000), return_tensors="pt").input_ids[0]


def test_hook_rows_and_h2o_mass_equal_the_models_eager_attention():
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 40))
    with torch.inference_mode():
        att = model(ids, output_attentions=True).attentions  # per layer [1, Hq, T, T]
        snap, h2o = EvictionCache(cfg, SnapKV(window=5)), EvictionCache(cfg, H2O())
        with eviction_hooks(model):
            model(ids[:, :39], past_key_values=snap)
            model(ids[:, :39], past_key_values=h2o)
            model(ids[:, 39:], past_key_values=h2o)  # one decode step adds one row
    for i in range(2):
        torch.testing.assert_close(snap.layers[i].inputs().attention, att[i][0, :, 34:39, :39])
        torch.testing.assert_close(h2o.layers[i].mass, pool_groups(att[i][0].sum(1), 2, reduce="sum"))


@pytest.mark.parametrize("chunk", [1000, 16], ids=["one_pass", "chunked"])
def test_kvzip_reconstruction_scores_equal_the_models_eager_attention_and_leave_no_tokens(chunk):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ctx, prompt, nxt = torch.randint(0, 128, (40,)), torch.randint(0, 128, (5,)), torch.randint(0, 128, (3,))
    T, overlap = 40, 4
    naive = torch.zeros(2, 2, T)  # [layer, kv head, token]: max over rows and query groups
    with torch.inference_mode():
        for start in range(0, T, chunk):  # each chunk: the prompt, the previous chunk's tail, the chunk
            rec = torch.cat([prompt, ctx[max(0, start - overlap):start], ctx[start:start + chunk]])
            att = model(torch.cat([ctx, rec])[None], output_attentions=True).attentions
            for i in range(2):
                rows = att[i][0, :, T:, :T].amax(1)  # [q_heads, T]
                naive[i] = torch.maximum(naive[i], rows.reshape(2, 2, T).amax(1))
        cache, plain = EvictionCache(cfg), DynamicCache(config=cfg)
        model(ctx[None], past_key_values=cache)
        model(ctx[None], past_key_values=plain)
        reconstruct(model, cache, ctx, prompt, chunk=chunk, overlap=overlap, block=7)
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(layer.reconstruction, naive[i])
        assert torch.equal(layer.keys, plain.layers[i].keys) and torch.equal(layer.values, plain.layers[i].values)
        assert layer.positions.tolist() == [list(range(T))] * 2 and layer.seen == T
    with torch.inference_mode():  # the reconstruction left nothing behind: the next tokens land at T
        out = model(nxt[None], past_key_values=cache).logits[0]
        ref = model(torch.cat([ctx, nxt])[None]).logits[0, T:]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture
def sdpa_after(smollm2):
    """Puts SmolLM2 back on plain sdpa after a test that made it take ragged layers."""
    yield
    smollm2[0].set_attn_implementation("sdpa")


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_kvzip_generation_after_compression_attends_to_kept_tokens_at_true_positions(smollm2, ids, scope,
                                                                                    sdpa_after):
    model, tok = smollm2
    ctx, new = ids[:288], ids[288:320]
    policy = KVzip(budget_scope=scope)
    with pytest.raises(ValueError):
        prefill_compressed(model, ctx, policy, Budget(ratio=0.25))  # no repeat prompt
    cache = prefill_compressed(model, ctx, policy, Budget(ratio=0.25), policy.prompt_ids(tok))
    positions = [layer.positions for layer in cache.layers]
    assert all(p[:, :4].tolist() == [[0, 1, 2, 3]] * p.shape[0] for p in positions)  # sinks
    lengths = cache.layer_lengths()
    assert sum(lengths) == len(lengths) * 72  # the budget of the whole cache, exactly
    if scope == "global":  # layers keep what the shared threshold gives them; attention cut per layer
        assert len(set(lengths)) > 4 and model.config._attn_implementation == "kvmw_ragged_sdpa"
        assert cache.nbytes() == sum(lengths) * 2 * model.config.num_key_value_heads * 64 * 4  # K, V; fp32
    else:
        assert set(lengths) == {72}
    untouched = copy.deepcopy(cache)  # for generate (one reconstruction pass per test)
    # the 32 new tokens are one prefill over layers of different lengths (the mask cut per layer)
    kept = _matches_attention_over_kept_tokens(model, cache, ctx, new)

    cache = untouched
    with torch.inference_mode():
        gen = model.generate(ids[None, :320], past_key_values=cache, max_new_tokens=8, min_new_tokens=8,
                             do_sample=False)[0, 320:]
    teacher = reference_logits(model, kept, torch.cat([new, gen[:-1]]), start=288)[31:]
    assert torch.equal(teacher.argmax(-1), gen)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_layers_of_different_lengths_get_each_its_own_mask(impl):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ctx, new = torch.randint(0, 128, (40,)), torch.randint(0, 128, (6,))
    counts = [13, 31, 4]  # layer 0 is neither the longest nor the shortest

    def compressed():
        cache = EvictionCache(cfg)
        with torch.inference_mode():
            model(ctx[None], past_key_values=cache)
        for layer, k in zip(cache.layers, counts):
            layer.keep(torch.rand(2, 40, generator=torch.Generator().manual_seed(k)).topk(k).indices.sort().values)
        return cache

    cache = compressed()
    assert cache.layer_lengths() == counts and cache.get_mask_sizes(6, 0) == (31 + 6, 40 - 31)
    kept = [(layer.keys[0].clone(), layer.values[0].clone()) for layer in cache.layers]
    ref = reference_logits(model, kept, new, start=40)
    with pytest.raises(RuntimeError), torch.inference_mode():
        model(new[None], past_key_values=compressed())  # one mask for all layers does not fit
    ragged_layers(model)
    ragged_layers(model)  # idempotent
    assert model.config._attn_implementation == "kvmw_ragged_" + impl
    with torch.inference_mode():
        out = model(new[None], past_key_values=cache).logits[0]
        step = model(new[None, :1], past_key_values=cache).logits[0]  # then one decode step
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    kept = [(torch.cat([k, layer.keys[0, :, -7:-1]], 1), torch.cat([v, layer.values[0, :, -7:-1]], 1))
            for (k, v), layer in zip(kept, cache.layers)]
    torch.testing.assert_close(step, reference_logits(model, kept, new[:1], start=46), atol=1e-4, rtol=1e-4)
    assert cache.layer_lengths() == [c + 7 for c in counts]


def _matches_attention_over_kept_tokens(model, cache, ctx, new):
    """A cache compressed to 25% of `ctx` holds exactly the full KV at its kept
    positions (different per head), and feeding `new` through it gives the logits of
    attention over those tokens at their true positions. Returns the kept KV."""
    n = len(ctx)
    assert cache.get_seq_length() == n and cache.stored_tokens() == n // 4
    positions = [layer.positions for layer in cache.layers]
    assert any(not torch.equal(positions[0][0], p[h]) for p in positions for h in range(p.shape[0]))  # per head
    kept = gather(full_kv(model, ctx), positions)
    for layer, (k, v) in zip(cache.layers, kept):
        assert torch.equal(layer.keys[0], k) and torch.equal(layer.values[0], v)
    ref = reference_logits(model, kept, new, start=n)
    with torch.inference_mode():
        out = model(new[None], past_key_values=cache).logits[0]
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-4)
    assert cache.get_seq_length() == n + len(new) and cache.stored_tokens() == n // 4 + len(new)
    return kept


def test_generation_after_eviction_equals_attention_over_kept_tokens_at_true_positions(smollm2, ids):
    model, _ = smollm2
    ctx, new = ids[:288], ids[288:320]
    cache = prefill_compressed(model, ctx, SnapKV(window=32), Budget(ratio=0.25))
    kept = _matches_attention_over_kept_tokens(model, cache, ctx, new)
    # the pitfall: a plain cache of the kept KV puts new tokens at position 72, not 288
    naive = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kept):
        naive.update(k[None], v[None], i)
    with torch.inference_mode():
        wrong = model(new[None], past_key_values=naive).logits[0]
    torch.testing.assert_close(wrong, reference_logits(model, kept, new, start=72), atol=2e-3, rtol=1e-4)
    assert (wrong - reference_logits(model, kept, new, start=288)).abs().max() > 1.0

    # greedy generation through `generate` (it slices the prompt by get_seq_length)
    cache = prefill_compressed(model, ctx, SnapKV(window=32), Budget(ratio=0.25))
    with torch.inference_mode():
        gen = model.generate(ids[None, :320], past_key_values=cache, max_new_tokens=8, min_new_tokens=8,
                             do_sample=False)[0, 320:]
    teacher = reference_logits(model, kept, torch.cat([new, gen[:-1]]), start=288)[31:]
    assert torch.equal(teacher.argmax(-1), gen)


@pytest.mark.parametrize("policy", [StreamingLLM(sinks=4), H2O(recent=0.5)], ids=["streaming_llm", "h2o"])
def test_bounded_generation_keeps_the_budget_and_stays_exact(smollm2, ids, policy):
    model, _ = smollm2
    prompt, bound = ids[:160], 96
    cache = EvictionCache(model.config, policy, max_tokens=bound)
    with torch.inference_mode(), eviction_hooks(model):
        gen = model.generate(prompt[None], past_key_values=cache, max_new_tokens=24, min_new_tokens=24,
                             do_sample=False)[0, 160:]
    seen = 160 + 24 - 1  # the last token is generated, not yet fed
    assert cache.get_seq_length() == seen and cache.stored_tokens() == bound
    positions = [layer.positions for layer in cache.layers]
    if isinstance(policy, StreamingLLM):
        assert all(p.tolist() == [[0, 1, 2, 3] + list(range(seen - bound + 4, seen))] * p.shape[0]
                   for p in positions)
    else:  # H2O: the newest half of the budget, plus heavy hitters that differ by layer
        assert all(set(range(seen - bound // 2, seen)) <= set(p[0].tolist()) for p in positions)
        assert len({tuple(p[0].tolist()) for p in positions}) > 1
    # the next step attends over exactly the kept K/V (computed under eviction) at true positions
    kept = [(layer.keys[0].clone(), layer.values[0].clone()) for layer in cache.layers]
    with torch.inference_mode(), eviction_hooks(model):
        out = model(gen[-1:][None], past_key_values=cache).logits[0]
    torch.testing.assert_close(out, reference_logits(model, kept, gen[-1:], start=seen), atol=2e-3, rtol=1e-4)
    assert cache.stored_tokens() == bound


def test_chunks_stored_pruned_continue_correctly_and_codecs_multiply(smollm2, ids):
    model, tok = smollm2
    cs, prompt = 128, ids[None, :4 * 128 + 37]
    gen_kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)

    def hook(codec, evict):
        store = TieredStore([CPUTier(1 << 30)])
        return KVMW(model, tok, KVMWConfig.load(env={}, chunk_size=cs, codec=codec), store=store,
                    evict=evict), store

    evict = StoreEviction(SnapKV(window=32), Budget(ratio=0.5))
    h, store = hook("none", evict)
    h.generate(prompt, **gen_kw)
    assert h.stats()["chunks_stored"] == 4
    blobs = [decode_blob(store.fetch(k, h.fingerprint.digest)[0]) for k in h.keyspace.prefix_keys(prompt[0])[:4]]
    for i, (kv, meta) in enumerate(blobs):
        assert kv.shape[2] == 64 and meta.extra["eviction"]["tokens"] == cs
        assert (meta.positions >= i * cs).all() and (meta.positions < (i + 1) * cs).all()
    warm = h.generate(prompt, **gen_kw)
    st = h.stats()
    assert st["chunk_hits"] == 4 and st["tokens_reused"] == 4 * cs
    # reference: full-prefill K/V at the stored positions, tail + generated tokens at true positions
    positions = torch.cat([torch.from_numpy(m.positions.astype("int64")) for _, m in blobs])
    full = full_kv(model, prompt[0, :4 * cs])
    kept = gather(full, [positions.expand(k.shape[0], -1) for k, _ in full])
    gen = warm.sequences[0, prompt.shape[1]:]
    ref = reference_logits(model, kept, torch.cat([prompt[0, 4 * cs:], gen[:-1]]), start=4 * cs)[36:]
    assert torch.equal(ref.argmax(-1), gen)
    torch.testing.assert_close(torch.cat(warm.logits), ref, atol=2e-3, rtol=1e-4)
    # pruned chunks live in their own namespace: a plain hook on the same store misses them
    plain = KVMW(model, tok, KVMWConfig.load(env={}, chunk_size=cs), store=store)
    assert store.prefix_hits(plain.keyspace.prefix_keys(prompt[0])) == 0

    sizes = {}
    for codec, ev in (("none", None), ("int8", None), ("int8", evict)):
        hh, st2 = hook(codec, ev)
        hh.generate(prompt, max_new_tokens=1)
        sizes[codec, ev is not None] = sum(memoryview(st2.fetch(k, hh.fingerprint.digest)[0]).nbytes
                                           for k in hh.keyspace.prefix_keys(prompt[0])[:4])
    full_bytes = sizes["none", False]
    assert sizes["none", False] / sizes["int8", False] > 1.9
    assert full_bytes / sizes["int8", True] > 3.8  # 2x from eviction times ~2x from int8
