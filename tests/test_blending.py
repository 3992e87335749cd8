"""Position-independent RAG reuse on real SmolLM2 (and tiny random Llamas for rotary variants)."""

import math

import pytest
import torch

from kvmw.blending import CacheBlend, Deviation, EPIC, FullReuse, QueryAware, Repositioner, UnsupportedRotaryError
from kvmw.integrations.hf.adapter import LlamaLikeAdapter, UnsupportedModelError
from kvmw.integrations.hf.rag import RAGResult
from kvmw.blending.query_aware import split_budget
from kvmw.blending.strategy import BlendPlan, make_strategy
from kvmw.config import KVMWConfig
from kvmw.integrations.hf import KVMW
from kvmw.integrations.hf import capture
from kvmw.integrations.hf.capture import capture_kv
from kvmw.layout import to_hf_layers
from kvmw.storage_tiers import CPUTier, DiskTier, TieredStore
from kvmw.text_data import essay_text

GEN = dict(max_new_tokens=6, do_sample=False)
QUESTION = "\n\nQuestion: Which document talks about money, and what does it say?\nAnswer:"


@pytest.fixture(scope="module")
def docs():
    text = essay_text(12000)
    return [text[i * 450:(i + 1) * 450] for i in range(3)]


def tiny(rope_parameters):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_parameters=rope_parameters)
    return LlamaForCausalLM(cfg).eval()


def kv_at(model, ids, offset):
    """Canonical KV of `ids` computed directly at positions offset..offset+n-1."""
    with torch.inference_mode():
        pos = torch.arange(offset, offset + len(ids))[None]
        cache = model(ids[None], position_ids=pos, use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512},
])
def test_repositioning_reproduces_directly_computed_keys(rope):
    model = tiny(rope)
    ids = torch.randint(0, 128, (50,))
    moved = Repositioner(model)
    at0, at = kv_at(model, ids, 0), kv_at(model, ids, 1234)
    for (k0, v0), (k1, v1) in zip(at0, at):
        assert not torch.allclose(k0, k1, atol=1e-2)  # the offset matters
        torch.testing.assert_close(moved.rotate(k0, 1234), k1, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(v0, v1, atol=2e-5, rtol=1e-4)


def test_repositioning_real_smollm2_keys(smollm2):
    model, tok = smollm2
    ids = tok(essay_text(600), return_tensors="pt").input_ids[0, :96]
    moved = Repositioner(model)
    for (k0, _), (k1, _) in zip(kv_at(model, ids, 0), kv_at(model, ids, 777)):
        torch.testing.assert_close(moved.rotate(k0, 777), k1, atol=1e-3, rtol=1e-3)


def test_length_dependent_rotary_and_foreign_models_are_refused():
    with pytest.raises(UnsupportedRotaryError, match="dynamic"):
        Repositioner(tiny({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LlamaLikeAdapter(gpt2)
    with pytest.raises(UnsupportedRotaryError):
        Repositioner(gpt2)


def test_cacheblend_picks_the_most_deviating_cached_tokens():
    cached = torch.tensor([False, True, True, True, True, True, True, True, True, True, True, False])
    deviation = torch.tensor([99.0, 1, 7, 3, 9, 2, 8, 0, 4, 5, 6, 99])
    plan = BlendPlan(cached=cached, spans=[(1, 6), (6, 11)])
    chosen = CacheBlend(recompute_ratio=0.3, gradual=()).select(plan, deviation)
    assert chosen.nonzero().squeeze(1).tolist() == [2, 4, 6]  # 3 of 10 cached, never the uncached ends
    epic = EPIC(recompute_ratio=0.3).select(plan, None)
    assert epic.nonzero().squeeze(1).tolist() == [1, 2, 6, 7]  # ceil(0.3 * 5) = 2 head tokens per document
    assert not FullReuse().select(plan, None).any()
    with pytest.raises(ValueError):
        CacheBlend(recompute_ratio=1.5)


def test_cacheblend_checks_layer_1_filters_gradually_and_scores_keys_plus_values():
    cached = torch.tensor([False] + [True] * 10 + [False])
    plan = BlendPlan(cached=cached, spans=[(1, 6), (6, 11)])
    deviation = torch.tensor([99.0, 1, 7, 3, 9, 2, 8, 0, 4, 5, 6, 99])
    # the budget (3 of 10) by deviation, uncached tokens never candidates
    assert CacheBlend(0.3, gradual=()).select(plan, deviation).nonzero().squeeze(1).tolist() == [2, 4, 6]
    # layer 0's K/V depend on the token and its position alone: the check is at layer 1
    assert CacheBlend().check_layer == 1 and CacheBlend().full_layers == 2
    # gradual: 2x the budget at the check layer (6 of 10), then narrowed to 3 by the next layer's deviation
    blend = CacheBlend(0.3, check_layer=1, gradual=(2.0,))
    assert blend.full_layers == 2 and blend.refine_layers == (2,)
    first = blend.select(plan, deviation) | ~cached
    assert first.nonzero().squeeze(1).tolist() == [0, 2, 4, 6, 8, 9, 10, 11]
    index = first.nonzero().squeeze(1)
    later = torch.tensor([5.0, 1, 2, 9, 0, 8, 7, 5])  # deviation of the 8 tokens that ran on
    keep = blend.refine(plan, 2, index, later)
    assert index[keep].tolist() == [0, 6, 9, 10, 11]  # uncached ends always kept
    with pytest.raises(ValueError):
        CacheBlend(0.3, gradual=(0.5,))
    # per-head [H, S] deviations of keys and values, summed
    dev = Deviation(keys=torch.tensor([[2.0, 0, 0], [2.0, 0, 0]]), values=torch.tensor([[1.0, 3, 0], [0.0, 0, 0.5]]))
    assert CacheBlend.score(dev).tolist() == [5.0, 3.0, 0.5]



def test_query_aware_recomputes_windows_around_what_the_question_read():
    cached = torch.tensor([False] + [True] * 40 + [True] * 20 + [False])
    plan = BlendPlan(cached=cached, spans=[(1, 41), (41, 61)])
    attention = torch.rand(62, generator=torch.Generator().manual_seed(0)) * 0.1
    attention[[0, 61]] = 50.0  # uncached tokens: never chosen
    attention[[20, 30]] = torch.tensor([9.0, 7.0])  # document 1's most-read tokens
    attention[[42, 55]] = torch.tensor([8.0, 1.0])  # document 2's: one token from its start, then 55
    plan.attention = attention
    chosen = QueryAware(recompute_ratio=0.25, window=2, attention_share=0.0).select(plan, None)
    # budgets by length: document 1: 10 = two windows of 5 around 20 and 30; document 2: 5,
    # the window around 42 cut at the border (41..44), the fifth token by attention (55)
    assert chosen.nonzero().squeeze(1).tolist() == [*range(18, 23), *range(28, 33), 41, 42, 43, 44, 55]
    # half the budget by attention: document 1 drew 16 + 40 * 0.05, document 2 9 + 20 * 0.05 of it
    mixed = QueryAware(recompute_ratio=0.25, window=2).select(plan, None)
    mass = torch.tensor([float(attention[1:41].sum()), float(attention[41:61].sum())])
    want = 0.5 * torch.tensor([40, 20]) / 60 + 0.5 * mass / mass.sum()
    assert int(mixed[1:41].sum()) == round(15 * float(want[0])) and int(mixed.sum()) == 15
    with pytest.raises(ValueError, match="probe"):
        QueryAware().select(BlendPlan(cached=cached, spans=plan.spans), None)
    with pytest.raises(ValueError):
        QueryAware(window=-1)
    with pytest.raises(ValueError):
        QueryAware(attention_share=1.5)


def test_split_budget_is_exact_and_caps_each_document():
    assert split_budget(10, [40, 20], torch.tensor([0.5, 0.5])) == [5, 5]
    assert split_budget(7, [40, 20, 10], torch.tensor([1.0, 1.0, 1.0])) in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    # document 2 wants 24 but holds 5: its excess goes to the others (9.5 each), where
    # document 3 fills up at 10 and document 1 takes the rest
    assert split_budget(30, [40, 5, 10], torch.tensor([0.1, 0.8, 0.1])) == [15, 5, 10]
    assert split_budget(55, [40, 5, 10], torch.tensor([0.0, 1.0, 0.0])) == [40, 5, 10]  # all: every token
    assert split_budget(3, [4, 4], torch.tensor([0.0, 0.0])) in ([2, 1], [1, 2])  # no attention: evenly


def test_the_probe_records_the_questions_attention_over_the_reused_kv():
    """On an eager-attention model: plan.attention is what eager attention gives the
    uncached tokens (preamble and question) over the documents' reused KV, summed over
    rows, heads and layers."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    hook = KVMW(model, None, KVMWConfig.load(env={}, chunk_size=16), store=TieredStore([CPUTier(1 << 24)]))
    blender = hook._blender()
    docs = [torch.randint(0, 128, (n,)).tolist() for n in (30, 25)]
    ids, spans, pre = blender.segments(docs, torch.randint(0, 128, (7,)).tolist(), preamble=[1, 2, 3])
    result = RAGResult(sequences=ids[None], prompt_tokens=len(ids), timings={"load": 0.0, "prefill": 0.0})
    kvs = [blender.document_kv(ids[s:e], result, stored=False, context=pre) for s, e in spans]
    seen = {}

    class Recording(QueryAware):
        def select(self, plan, deviation):
            seen["attention"] = plan.attention
            return super().select(plan, deviation)

    strategy = Recording(recompute_ratio=0.2)
    keys, values = blender.blend(ids, spans, kvs, FullReuse(), result, first_position=len(pre))
    blender.blend(ids, spans, kvs, strategy, result, first_position=len(pre))
    q0 = spans[-1][1]
    with torch.inference_mode():  # reference: eager attention of the preamble, then of the question over the reuse
        ref = torch.zeros(len(ids))
        for a in model(ids[None, :len(pre)], output_attentions=True).attentions:
            ref[:len(pre)] += a[0].sum(dim=(0, 1))
        cache = DynamicCache()
        for i in range(len(keys)):
            cache.update(keys[i][:, :, :q0], values[i][:, :, :q0], i)
        for a in model(ids[None, q0:], past_key_values=cache, output_attentions=True).attentions:
            ref += a[0].sum(dim=(0, 1))
    torch.testing.assert_close(seen["attention"], ref, atol=1e-4, rtol=1e-4)
    n_uncached = len(ids) - sum(e - s for s, e in spans)
    assert result.recomputed_tokens == n_uncached + round(0.2 * (len(ids) - n_uncached))
    # the work: the probe's uncached tokens in every layer, then the recomputed set in every layer
    assert result.token_layers == 3 * n_uncached + 3 * result.recomputed_tokens
    with pytest.raises(ValueError, match="stand_in"):  # the default stand-in is text; this hook has no tokenizer
        hook.generate_rag(docs, [5, 6, 7], preamble=[1, 2, 3], max_new_tokens=1)
    # eager attention adds its mask to the logits: the adapter's mask must be additive there
    keys, values = blender.blend(ids, spans, kvs, CacheBlend(1.0), result, first_position=len(pre))
    for i, (k, v) in enumerate(to_hf_layers(capture_kv(model, ids))):
        torch.testing.assert_close(keys[i], k, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(values[i], v, atol=1e-5, rtol=1e-4)

def hook_for(model, tok, store=None):
    return KVMW(model, tok, KVMWConfig.load(env={}, chunk_size=128),
                store=store or TieredStore([CPUTier(1 << 30)]))


def exact_doc_kvs(model, ids, spans):
    """The documents' KV cut from a full prefill of the whole prompt, moved back to position 0:
    what is cached is then already exact, so any recomputation must reproduce it."""
    full = capture_kv(model, ids)
    moved = Repositioner(model)
    out = []
    for s, e in spans:
        kv = full[:, :, s:e].clone()
        kv[:, 0] = moved.rotate(kv[:, 0].permute(0, 2, 1, 3), -s).permute(0, 2, 1, 3)
        out.append(kv)
    return full, out


@pytest.mark.parametrize("strategy", [CacheBlend(0.3), EPIC(0.3), FullReuse(), QueryAware(0.3),
                                      CacheBlend(0.0, check_layer=3),
                                      CacheBlend(0.3, check_layer=1, gradual=()),
                                      CacheBlend(0.3, check_layer=0, gradual=(2.0, 1.5))])
def test_selective_recompute_over_exact_kv_changes_nothing(smollm2, docs, strategy):
    """Recomputed tokens attend over cached ones with the right causal mask: with exact cached
    KV, the blended KV of every layer equals the full prefill's (a query-vs-cache mask
    misalignment would change the recomputed tokens' KV in every later layer)."""
    model, tok = smollm2
    blender = hook_for(model, tok)._blender()
    ids, spans, _ = blender.segments(docs, QUESTION, preamble="Documents:\n")
    full, kvs = exact_doc_kvs(model, ids, spans)
    result = RAGResult(sequences=ids[None], prompt_tokens=len(ids), timings={"load": 0.0})
    keys, values = blender.blend(ids, spans, kvs, strategy, result)
    for i, (k, v) in enumerate(to_hf_layers(full)):
        torch.testing.assert_close(keys[i], k, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(values[i], v, atol=2e-3, rtol=1e-3)
    uncached = len(ids) - sum(e - s for s, e in spans)
    n_cached = len(ids) - uncached
    want = {"cacheblend": round(strategy.recompute_ratio * n_cached),
            "epic": sum(math.ceil(strategy.recompute_ratio * (e - s)) for s, e in spans),
            "query_aware": round(strategy.recompute_ratio * n_cached),
            "full_reuse": 0}[strategy.name]
    assert result.recomputed_tokens == want + uncached > 0
    # the (token, layer) work: every token in the full layers, the gradual steps' larger sets, then the rest
    layers, n, full = len(keys), len(ids), strategy.full_layers
    steps = [round(m * strategy.recompute_ratio * n_cached) + uncached for m in getattr(strategy, "gradual", ())]
    probe = layers * uncached if strategy.probes else 0  # the uncached tokens once more, alone
    rest = (layers - full - len(steps)) * result.recomputed_tokens
    assert result.token_layers == probe + n * full + sum(steps) + rest


@pytest.mark.parametrize("strategy", ["cacheblend", "epic", "query_aware"])
def test_full_recompute_equals_full_prefill(smollm2, docs, strategy):
    model, tok = smollm2
    hook = hook_for(model, tok)
    ref = hook.generate_rag(docs, QUESTION, strategy="full_prefill", **GEN)
    hook.generate_rag(docs, QUESTION, strategy="full_reuse", document_context="none", **GEN)  # stores them
    blender = hook._blender()
    ids, spans, _ = blender.segments(docs, QUESTION)
    result = RAGResult(sequences=ids[None], prompt_tokens=len(ids), timings={"load": 0.0, "prefill": 0.0})
    kvs = [blender.document_kv(ids[s:e], result) for s, e in spans]
    assert result.documents_loaded == {"cpu": 3}
    keys, values = blender.blend(ids, spans, kvs, make_strategy(strategy, 1.0), result)
    for i, (k, v) in enumerate(to_hf_layers(capture_kv(model, ids))):
        torch.testing.assert_close(keys[i], k, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(values[i], v, atol=2e-3, rtol=1e-3)
    out = hook.generate_rag(docs, QUESTION, strategy=strategy, recompute_ratio=1.0, document_context="none", **GEN)
    assert out.recomputed_tokens == ref.prompt_tokens
    assert torch.equal(out.sequences, ref.sequences)


def test_documents_are_reused_in_any_order_and_offset_across_processes_tiers(smollm2, docs, tmp_path):
    model, tok = smollm2
    store = TieredStore([CPUTier(1 << 30), DiskTier(tmp_path, 1 << 30)])
    first = hook_for(model, tok, store).generate_rag(docs, QUESTION, strategy="cacheblend", document_context="none",
                                                     **GEN)
    assert first.documents_prefilled == 3 and first.documents_loaded == {}
    store.close()
    # a new store over the same folder (a restarted process): the documents come from disk,
    # reordered and behind a preamble, so at other offsets than they were computed at
    # (document_context="none": documents computed alone are shared across preambles)
    hook = hook_for(model, tok, TieredStore([CPUTier(1 << 30), DiskTier(tmp_path, 1 << 30)]))
    reordered = [docs[2], docs[0], docs[1]]
    alone = {"preamble": "Read these:\n", "document_context": "none"}
    warm = hook.generate_rag(reordered, QUESTION, strategy="cacheblend", recompute_ratio=1.0, **alone, **GEN)
    assert warm.documents_prefilled == 0 and warm.documents_loaded == {"disk": 3}
    ref = hook.generate_rag(reordered, QUESTION, strategy="full_prefill", preamble="Read these:\n", **GEN)
    assert torch.equal(warm.sequences, ref.sequences)
    reuse = hook.generate_rag(reordered, QUESTION, strategy="full_reuse", **alone, **GEN)
    assert reuse.documents_loaded == {"cpu": 3} and reuse.timings["ttft"] > 0
    assert reuse.text is not None and set(reuse.timings) >= {"lookup", "load", "recompute", "ttft"}


def test_documents_computed_after_the_preamble_are_keyed_by_it(smollm2, docs):
    """document_context="preamble": a document's KV is computed after the prompt's preamble,
    so the first document's reused KV is exactly the full prompt's; another preamble is a miss."""
    model, tok = smollm2
    hook = hook_for(model, tok)
    pre = "Read the documents, then answer.\n"
    gen = dict(GEN, document_context="preamble")
    hook.generate_rag(docs, QUESTION, strategy="full_reuse", preamble=pre, **gen)  # stores them
    blender = hook._blender()
    ids, spans, pre_ids = blender.segments(docs, QUESTION, pre)
    result = RAGResult(sequences=ids[None], prompt_tokens=len(ids), timings={"load": 0.0, "prefill": 0.0})
    kvs = [blender.document_kv(ids[s:e], result, context=pre_ids) for s, e in spans]
    assert result.documents_loaded == {"cpu": 3} and result.documents_prefilled == 0
    keys, values = blender.blend(ids, spans, kvs, CacheBlend(0.0), result, first_position=len(pre_ids))
    (s0, e0), (s1, e1) = spans[0], spans[1]
    for i, (k, v) in enumerate(to_hf_layers(capture_kv(model, ids))):
        torch.testing.assert_close(keys[i][:, :, s0:e0], k[:, :, s0:e0], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(values[i][:, :, s0:e0], v[:, :, s0:e0], atol=2e-3, rtol=1e-3)
        if i == len(keys) - 1:  # later documents did not see the first: their deep KV differs
            assert not torch.allclose(values[i][:, :, s1:e1], v[:, :, s1:e1], atol=2e-3, rtol=1e-3)
    other = hook.generate_rag(docs, QUESTION, strategy="full_reuse", preamble="Another preamble:\n", **gen)
    assert other.documents_prefilled == 3 and other.documents_loaded == {}
    again = hook.generate_rag(docs[::-1], QUESTION, strategy="full_reuse", preamble=pre, **gen)
    assert again.documents_prefilled == 0 and again.documents_loaded == {"cpu": 3}
    with pytest.raises(ValueError, match="document_context"):
        hook.generate_rag(docs, QUESTION, preamble=pre, **dict(gen, document_context="before"))


def test_documents_computed_after_a_stand_in_document(smollm2, docs, monkeypatch):
    """document_context="stand_in" (the default): a document's KV is computed after the
    preamble and a stand-in document (the KV of a document that follows another), keyed by both."""
    model, tok = smollm2
    hook = hook_for(model, tok)
    pre = "Read the documents, then answer.\n"
    stand_in = dict(preamble=pre, document_context="stand_in")
    ref = hook.generate_rag(docs, QUESTION, strategy="full_prefill", preamble=pre, **GEN)
    runs: list[bool] = []  # per capture_kv call: did it run over a given past KV?

    def counted(m, ids, past=None):
        runs.append(past is not None)
        return capture_kv(m, ids, past)

    monkeypatch.setattr(capture, "capture_kv", counted)
    first = hook.generate_rag(docs, QUESTION, strategy="full_reuse", **stand_in, **GEN)
    assert first.documents_prefilled == 3
    assert runs == [False, True, True, True]  # the context once, then each document over its KV
    monkeypatch.undo()
    blender = hook._blender()
    ids, spans, pre_ids = blender.segments(docs, QUESTION, pre)
    ctx = blender.document_context("stand_in", pre_ids)
    assert torch.equal(ctx[:len(pre_ids)], pre_ids) and len(ctx) > len(pre_ids) + 200
    result = RAGResult(sequences=ids[None], prompt_tokens=len(ids), timings={"load": 0.0, "prefill": 0.0})
    s, e = spans[1]
    kv = blender.document_kv(ids[s:e], result, context=ctx)
    assert result.documents_loaded == {"cpu": 1}
    direct = capture_kv(model, torch.cat([ctx, ids[s:e]]))[:, :, len(ctx):]
    torch.testing.assert_close(kv, direct, atol=1e-4, rtol=1e-4)
    # moved from after the stand-in to its place in the prompt: full recompute is full prefill
    whole = hook.generate_rag(docs[::-1], QUESTION, strategy="cacheblend", recompute_ratio=1.0, **stand_in, **GEN)
    assert whole.documents_loaded == {"cpu": 3}
    assert torch.equal(hook.generate_rag(docs, QUESTION, strategy="cacheblend", recompute_ratio=1.0, **stand_in,
                                         **GEN).sequences, ref.sequences)
    # the stand-in is part of the key: another stand-in, or none, is a miss
    other = hook.generate_rag(docs, QUESTION, strategy="full_reuse", stand_in="Another text.\n", **stand_in, **GEN)
    plain = hook.generate_rag(docs, QUESTION, strategy="full_reuse", preamble=pre, document_context="preamble", **GEN)
    assert other.documents_prefilled == 3 and plain.documents_prefilled == 3


def test_a_corrupt_stored_document_is_prefilled_again(smollm2, docs):
    model, tok = smollm2
    hook = hook_for(model, tok)
    ref = hook.generate_rag(docs, QUESTION, strategy="full_prefill", **GEN)
    ids = hook._blender()._ids(docs[1])
    key = hook.keyspace.chunk_key(ids)  # documents computed alone: their key has no context
    hook.generate_rag(docs, QUESTION, strategy="full_reuse", document_context="none", **GEN)
    blob = bytearray(hook.store.get(key))
    blob[len(blob) // 2] ^= 0xFF
    hook.store.tiers[0].put(key, bytes(blob))  # behind the store's back: a flipped bit in the payload
    out = hook.generate_rag(docs, QUESTION, strategy="cacheblend", recompute_ratio=1.0, document_context="none",
                            **GEN)
    assert out.documents_prefilled == 1 and out.documents_loaded == {"cpu": 2}
    assert torch.equal(out.sequences, ref.sequences)


def test_bench_stand_in_documents_come_from_essays_no_question_set_reads(smollm2):
    """The bench's stand-in (`stand_in_documents`) is `count` fact-free documents formatted as
    the questions' documents, from essays that no document of the 24-question sets reaches."""
    from kvmw.bench.rag import rag_tasks
    from kvmw.text_data import stand_in_documents

    _, tok = smollm2
    one, three = stand_in_documents(tok, 512, 1), stand_in_documents(tok, 512, 3)
    assert three[:len(one)] == one and tok.decode(three).count("<document>") == 3
    assert "access code" not in tok.decode(three)
    bodies = [part.split("</document>")[0].strip()[:300] for part in tok.decode(three).split("<document>")[1:]]
    for seed in (0, 1, 2):
        text = "".join(tok.decode(d) for t in rag_tasks(tok, 24, 4, 512, seed) for d in t["documents"])
        assert not any(body in text for body in bodies)
    with pytest.raises(ValueError, match="stand-in"):
        stand_in_documents(tok, 512, 4)
