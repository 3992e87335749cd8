"""RAG blending beneath vLLM: the request form, the scheduler's plan, and a real engine
(SmolLM2 fp32, vLLM's prefix cache on) checked against vLLM without kvmw and against
the HF path on the same documents."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from kvmw.integrations.vllm.blend_plan import BlendPlanner, BlendRequest, BlendRequestError, find_spans

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make vllm)")
GEN = 8
TOP = 20  # logprobs vLLM returns per step


# ---- pure logic ---------------------------------------------------------------------------------
def test_find_spans_finds_documents_in_order_after_each_other():
    prompt = [1, 2, 7, 8, 9, 3, 7, 8, 5, 6, 4]
    assert find_spans(prompt, [[7, 8], [5, 6]]) == [(2, 4), (8, 10)]
    assert find_spans(prompt, [[7, 8], [7, 8]]) == [(2, 4), (6, 8)]  # the second after the first
    with pytest.raises(BlendRequestError, match="document 1"):
        find_spans(prompt, [[5, 6], [7, 8, 9]])  # out of order
    with pytest.raises(BlendRequestError, match="document 0"):
        find_spans(prompt, [[4, 4]])


def test_blend_request_parses_texts_and_ids_and_refuses_bad_asks():
    tok = lambda text: [ord(c) for c in text]  # noqa: E731
    ask = BlendRequest.from_params({"kvmw": {"documents": ["ab", [5, 6]], "strategy": "epic",
                                             "recompute_ratio": 0.3}}, tok)
    assert ask == BlendRequest([[97, 98], [5, 6]], "epic", 0.3, "stand_in")
    ask = BlendRequest.from_params({"kvmw": {"documents": [[1]], "stand_in": "xy"}}, tok)
    assert ask.stand_in == [120, 121]
    assert BlendRequest.from_params({"other": 1}, tok) is None
    assert BlendRequest.from_params(None, tok) is None
    for bad in ({"documents": []}, {"documents": [[]]}, {"documents": [[1.5]]},
                {"documents": [[1]], "strategy": "nope"}, {"documents": [[1]], "recompute_ratio": 2},
                {"documents": [[1]], "document_context": "x"}, {"documents": [[1]], "stand_in": []}):
        with pytest.raises(BlendRequestError):
            BlendRequest.from_params({"kvmw": bad}, tok)


def test_blend_planner_reports_the_leading_stored_documents_and_their_blocks():
    stored = {"k0", "k1"}
    remote: set[str] = set()

    def lookup(rid, keys):  # (leading keys held anywhere, of which the worker's own tiers hold)
        held = [k in stored or k in remote for k in keys] + [False]
        n = held.index(False)
        return n, next((i for i, k in enumerate(keys[:n]) if k not in stored), n)

    bp = BlendPlanner(block_size=4, lookup=lookup)
    prompt = list(range(30))
    ask = BlendRequest([prompt[2:9], prompt[9:15], prompt[15:20]])
    bp.add("r", prompt, ask, ["k0", "k1", "k2"], [100, 101], [(2, 9), (9, 15), (15, 20)])
    assert bp.matched_tokens("r", num_computed=0) == 15  # up to the end of k1's document
    bp.allocated("r", list(range(10, 18)))
    spec = bp.scheduled("r", list(range(10, 18)), replace=True)
    assert (spec.loaded, spec.held, spec.end, spec.context) == (2, 0, 15, [100, 101])
    assert bp.scheduled("r", [18], replace=False) is None  # once per admission
    assert bp.blended_blocks("r") == list(range(10, 19))  # the first document starts in block 0
    bp.add("p", prompt, ask, ["k0", "k1", "k2"], [], [(9, 16), (16, 22), (22, 27)])
    assert bp.matched_tokens("p", num_computed=0) == 22
    bp.scheduled("p", list(range(40, 47)), replace=True)
    assert bp.blended_blocks("p") == list(range(42, 47))  # blocks 0-1 hold the preamble alone
    # vLLM's own cache holds the first 8 tokens: the blend starts there
    assert bp.matched_tokens("r", num_computed=8) == 7
    spec = bp.scheduled("r", list(range(20, 28)), replace=True)
    assert (spec.held, spec.end) == (8, 15) and bp.blended_blocks("r") == list(range(22, 28))
    assert spec.unfilled(8, 4) == [22, 23] and spec.unfilled(12, 4) == [23] and spec.unfilled(15, 4) == []
    # a blend that did not load what it promised: the request is not blended again
    bp.load_failed("r")
    assert bp.matched_tokens("r", num_computed=0) == 0
    bp.requests["r"].failed = False
    # the second document only on a remote tier: the first is blended, the second read for later
    stored.discard("k1")
    remote.add("k1")
    assert bp.matched_tokens("r", num_computed=0) == 9
    spec = bp.scheduled("r", list(range(8)), replace=True)
    assert (spec.loaded, spec.end, spec.prefetch) == (1, 9, [1])
    # nothing stored: nothing reported, nothing blended (documents are computed and stored)
    stored.clear()
    remote.clear()
    assert bp.matched_tokens("r", num_computed=0) == 0
    spec = bp.scheduled("r", list(range(8)), replace=True)
    assert spec.loaded == 0 and spec.end == 0 and bp.blended_blocks("r") == []
    out = bp.finished("r")
    assert out["documents"] == 3 and out["documents_reused"] == 0 and "r" not in bp.requests


def test_the_blend_core_leaves_positions_outside_its_bounds_alone(tiny_llama):
    """computed_from / computed_to: positions before hold exact KV and never run, the ones
    from computed_to on are left to the engine; inside, the KV equals an unbounded blend's."""
    from kvmw.blending import EPIC
    from kvmw.blending.blend import blend, empty_kv
    from kvmw.blending.strategy import BlendPlan
    from kvmw.integrations.hf.adapter import LlamaLikeAdapter

    model = tiny_llama
    cfg = model.config
    adapter = LlamaLikeAdapter(model)
    n = 40
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    hd = cfg.hidden_size // cfg.num_attention_heads
    cached = torch.zeros(n, dtype=torch.bool)
    cached[8:30] = True
    g = torch.Generator().manual_seed(1)
    doc_k = [torch.randn(1, cfg.num_key_value_heads, n, hd, generator=g) for _ in range(cfg.num_hidden_layers)]
    doc_v = [torch.randn_like(k) for k in doc_k]

    def run(lo, hi):
        keys, values = empty_kv(cfg.num_hidden_layers, n, cfg.num_key_value_heads, hd, torch.float32)
        for i in range(cfg.num_hidden_layers):
            keys[i].copy_(doc_k[i])
            values[i].copy_(doc_v[i])
        work = blend(adapter, ids, BlendPlan(cached.clone(), [(8, 30)]), keys, values, EPIC(0.25), lo, hi)
        return keys, work

    full, _ = run(0, n)
    part, work = run(0, 32)
    assert work.index.max() < 32 and set(range(8, 14)) <= set(work.index.tolist())
    for i, (a, b) in enumerate(zip(full, part)):
        torch.testing.assert_close(a[:, :, :32], b[:, :, :32])
        assert torch.equal(b[:, :, 32:], doc_k[i][:, :, 32:])  # left to the engine
    _, work = run(8, 32)  # the preamble is held: it does not run
    assert work.index.min() >= 8


# ---- a real engine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def texts(model_path):
    from transformers import AutoTokenizer

    from kvmw.text_data import essay_text

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(essay_text(60000), add_special_tokens=False).input_ids

    def docs(at):
        return [tok.decode(ids[at + 260 * i: at + 260 * i + 230]) + "\n" for i in range(3)]

    return {"tok": tok, "A": docs(0), "B": docs(2000), "C": docs(4000), "D": docs(6000),
            "preamble": "Read the documents below.\n",
            "q1": "\nQuestion: what is the first document about?\nAnswer:",
            "q2": "\nQuestion: which document talks about work?\nAnswer:",
            "long_preamble": "You answer questions about essays. " * 12 + "Read the documents below.\n"}


def _req(texts, docs, question, **kw):
    from kvmw.integrations.vllm import rag_request

    return rag_request(texts["tok"], docs, question, preamble=texts["preamble"], **kw)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kvmw-blend-store")


@pytest.fixture(scope="module")
def hf(smollm2, store_dir, texts):
    """The HF path over the engine's disk tier: set A stored by it before the engine starts."""
    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.storage_tiers import DiskTier, TieredStore

    model, tok = smollm2
    hook = KVMW(model, tok, KVMWConfig.load(env={}, cache_salt=""), store=TieredStore([DiskTier(store_dir, 1 << 30)]))
    first = hook.generate_rag(texts["A"], texts["q1"], preamble=texts["preamble"], strategy="full_reuse",
                              max_new_tokens=1, do_sample=False)
    assert first.documents_prefilled == 3
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def reference(model_path, texts):
    """vLLM without kvmw: greedy tokens and top logprobs of every prompt the tests blend."""
    from kvmw.testing.vllm_engine import EngineProcess

    prompts = {(name, q): _req(texts, texts[name], texts[q]).prompt_token_ids
               for name in ("A", "B", "C") for q in ("q1", "q2")}
    prompts[("A-rev", "q2")] = _req(texts, texts["A"][::-1], texts["q2"]).prompt_token_ids
    for name, docs, q in (("long", texts["A"], "q1"), ("long-rev", texts["A"][::-1], "q2")):
        prompts[(name, q)] = _long(texts, docs, q).prompt_token_ids
    with EngineProcess(model_path) as eng:
        outs = eng.generate(list(prompts.values()), max_tokens=GEN, logprobs=TOP)
    return {tuple(p): o for p, o in zip(prompts.values(), outs)}


@pytest.fixture(scope="module")
def engine(model_path, store_dir, hf):
    """kvmw on, vLLM's prefix cache on (its default): CPU then disk tier, codec none."""
    from kvmw.integrations.vllm import kv_transfer_config
    from kvmw.testing.vllm_engine import EngineProcess

    cfg = kv_transfer_config(codec="none", tiers=["cpu", "disk"], disk_path=str(store_dir), cache_salt="")
    with EngineProcess(model_path, {"kv_transfer_config": cfg, "enable_prefix_caching": True}) as eng:
        yield eng


def _long(texts, docs, question, **kw):
    from kvmw.integrations.vllm import rag_request

    return rag_request(texts["tok"], docs, texts[question], preamble=texts["long_preamble"], **kw)


def _blend(eng, reqs, fresh=True):
    if fresh:  # vLLM's own cache would otherwise hold an earlier run's exact prefix
        eng.call("reset_prefix_cache")
    outs = eng.generate([r.prompt_token_ids for r in reqs], max_tokens=GEN, logprobs=TOP,
                        params=[r.kv_transfer_params for r in reqs])
    return outs


def _first_logprobs_close(a, b, tol=1e-4):
    top_a, top_b = a["logprobs"][0], b["logprobs"][0]
    shared = set(top_a) & set(top_b)
    assert len(shared) >= TOP - 2
    return max(abs(top_a[t] - top_b[t]) for t in shared) <= tol


def _worker(eng):
    return eng.stats()["worker"]


@needs_vllm
@pytest.mark.vllm
def test_documents_the_hf_hook_stored_at_ratio_1_give_vllms_own_tokens(engine, texts, reference):
    req = _req(texts, texts["A"], texts["q1"], recompute_ratio=1.0)
    before = _worker(engine)
    out = _blend(engine, [req])[0]
    after = _worker(engine)
    ref = reference[tuple(req.prompt_token_ids)]
    blend = engine.call("last_blend")["blend"]
    params = out["kv_transfer_params"]["kvmw"]
    assert params["documents_reused"] == 3 and params["documents_loaded"] == {"disk": 3}
    assert after["blend_documents_loaded"] - before["blend_documents_loaded"] == 3
    end = req.spans[-1][1]
    assert blend["held"] == 0 and blend["end"] == end and blend["recomputed"] == list(range(end))
    assert out["cached"] == end  # vLLM counts the blended tokens as cached
    assert out["tokens"] == ref["tokens"]
    assert _first_logprobs_close(out, ref)


@needs_vllm
@pytest.mark.vllm
def test_new_documents_are_computed_and_stored_and_random_stored_kv_is_overwritten_at_ratio_1(
        engine, texts, reference, hf):
    """Set C is new: the first request computes it as vLLM always would and stores it; its
    stored KV is then replaced by random values of the right shape, and ratio 1.0 still gives
    vLLM's own tokens: every document token was recomputed in every layer."""
    req = _req(texts, texts["C"], texts["q1"], recompute_ratio=1.0)
    ref = reference[tuple(req.prompt_token_ids)]
    cold = _blend(engine, [req])[0]
    assert cold["kv_transfer_params"]["kvmw"]["documents_computed"] == 3
    assert cold["kv_transfer_params"]["kvmw"]["documents_reused"] == 0
    assert cold["tokens"] == ref["tokens"]
    keys = [hf.keyspace.chunk_key(req.prompt_token_ids[s:e], _context(hf, texts)) for s, e in req.spans]
    assert engine.call("scramble", keys=keys)["scrambled"] == 3  # the keys are the HF hook's
    out = _blend(engine, [req])[0]
    assert out["kv_transfer_params"]["kvmw"]["documents_reused"] == 3
    assert out["tokens"] == ref["tokens"]
    assert _first_logprobs_close(out, ref)
    # and at ratio 0 the random KV is used as it is: the answer changes
    noisy = _blend(engine, [_req(texts, texts["C"], texts["q1"], strategy="full_reuse")])[0]
    assert noisy["tokens"] != ref["tokens"]


def _context(hf, texts):
    blender = hf._blender()
    pre = blender._ids(texts["preamble"], special=True)
    return blender.document_context("stand_in", pre)


@needs_vllm
@pytest.mark.vllm
def test_full_reuse_writes_the_rerotated_stored_kv_and_answers_as_the_hf_path(engine, texts, hf, reference,
                                                                               tmp_path, smollm2):
    from kvmw.quantizers import decode_blob

    req = _req(texts, texts["A"], texts["q1"], strategy="full_reuse", recompute_ratio=0.0)
    out = _blend(engine, [req])[0]
    blend = engine.call("last_blend")["blend"]
    end = req.spans[-1][1]
    assert blend["end"] == end
    # the recomputed tokens are exactly the ones no document holds (the preamble)
    assert blend["recomputed"] == list(range(req.spans[0][0]))
    engine.call("pages", block_ids=blend["block_ids"], start=0, end=end, path=str(tmp_path / "kv.npy"))
    pages = torch.from_numpy(np.load(tmp_path / "kv.npy"))
    context = _context(hf, texts)
    rot = hf._blender().repositioner
    for s, e in req.spans:
        blob, _ = hf.store.fetch(hf.keyspace.chunk_key(req.prompt_token_ids[s:e], context))
        kv, _ = decode_blob(blob, hf.fingerprint.digest)
        want_k = rot.rotate(kv[:, 0].transpose(1, 2), s - len(context)).transpose(1, 2)
        torch.testing.assert_close(pages[:, 0, s:e], want_k, rtol=0, atol=1e-6)
        assert torch.equal(pages[:, 1, s:e], kv[:, 1])
    # the HF path's full reuse of the same prompt: its first-token distribution
    model, _ = smollm2
    ids = torch.tensor(req.prompt_token_ids)
    blender = hf._blender()
    kvs = [blender.document_kv(ids[s:e], _rag_result(), context=context) for s, e in req.spans]
    keys, values = blender.blend(ids, req.spans, kvs, _strategy("full_reuse", 0.0), _rag_result(), len(context))
    hf_logp = _hf_first_logprobs(model, ids, keys, values)
    v = out["logprobs"][0]
    p = torch.tensor([math.exp(x) for x in v.values()])
    kl = float((p * (torch.tensor(list(v.values())) - hf_logp[[int(t) for t in v]])).sum())
    assert abs(kl) < 1e-3, kl  # over vLLM's top-20 tokens
    # blended pages are never served as an exact prefix: a plain request gets vLLM's own tokens
    plain = engine.generate([req.prompt_token_ids], max_tokens=GEN)[0]
    assert plain["cached"] == 0 and plain["tokens"] == reference[tuple(req.prompt_token_ids)]["tokens"]


def _rag_result():
    from kvmw.integrations.hf.rag import RAGResult

    return RAGResult(sequences=torch.zeros(1, 1), prompt_tokens=0,
                     timings={"lookup": 0.0, "load": 0.0, "prefill": 0.0, "recompute": 0.0})


def _strategy(name, ratio):
    from kvmw.blending import make_strategy

    return make_strategy(name, ratio)


@torch.inference_mode()
def _hf_first_logprobs(model, ids, keys, values):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k[:, :, :-1], v[:, :, :-1], i)
    logits = model(ids[None, -1:], past_key_values=cache).logits[0, -1].float()
    return torch.log_softmax(logits, -1)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.parametrize("strategy", ["query_aware", "cacheblend"])
def test_the_tokens_vllm_recomputes_are_the_ones_the_hf_path_selects(engine, texts, hf, strategy):
    """The selection beneath vLLM (its own layers) is the HF path's: query-aware from the
    probe's attention, CacheBlend from the deviation at its check layer, then narrowed."""
    req = _req(texts, texts["A"], texts["q1"], strategy=strategy, recompute_ratio=0.15)
    _blend(engine, [req])
    blend = engine.call("last_blend")["blend"]
    end = blend["end"]
    ours = set(blend["recomputed"])
    theirs = hf.generate_rag(texts["A"], texts["q1"], preamble=texts["preamble"], strategy=strategy,
                             recompute_ratio=0.15, max_new_tokens=1, do_sample=False)
    theirs = {p for p in theirs.recomputed if p < end}
    n_doc = sum(e - s for s, e in req.spans)
    assert len(ours) == req.spans[0][0] + round(0.15 * n_doc)  # the preamble and the budget
    jaccard = len(ours & theirs) / len(ours | theirs)
    assert jaccard >= 0.9, jaccard


@needs_vllm
@pytest.mark.vllm
def test_a_blend_after_vllms_own_prefix_hit_gives_vllms_tokens(engine, texts, reference):
    """A preamble of several blocks is computed over itself alone, so its blocks stay in
    vLLM's prefix cache; the next prompt with that preamble starts its blend after them
    (the held blocks read back from the pages), at ratio 1.0 still vLLM's own tokens."""
    first = _long(texts, texts["A"], "q1", recompute_ratio=1.0)  # its documents are new here: computed
    _blend(engine, [first])
    second = _long(texts, texts["A"][::-1], "q2", recompute_ratio=1.0)
    out = _blend(engine, [second], fresh=False)[0]
    params = out["kv_transfer_params"]["kvmw"]
    assert params["vllm_cached_tokens"] == second.spans[0][0] // 32 * 32 > 0
    assert params["documents_reused"] == 3 and params["reused_tokens"] == second.spans[-1][1] - params[
        "vllm_cached_tokens"]
    ref = reference[tuple(second.prompt_token_ids)]
    assert out["tokens"] == ref["tokens"] and _first_logprobs_close(out, ref)
    blend = engine.call("last_blend")["blend"]
    assert blend["recomputed"] == list(range(params["vllm_cached_tokens"], second.spans[-1][1]))


@needs_vllm
@pytest.mark.vllm
def test_two_blends_in_one_batch_give_what_each_gives_alone(engine, texts):
    a = _req(texts, texts["A"], texts["q1"], recompute_ratio=0.15)
    b = _req(texts, texts["A"][::-1], texts["q2"], recompute_ratio=0.15)  # same documents, other order
    alone = [_blend(engine, [r])[0] for r in (a, b)]
    both = _blend(engine, [a, b])
    for one, batched in zip(alone, both):
        assert batched["tokens"] == one["tokens"]
        assert _first_logprobs_close(batched, one, tol=1e-4)
        assert batched["kv_transfer_params"]["kvmw"]["documents_reused"] == 3


@needs_vllm
@pytest.mark.vllm
def test_a_corrupt_document_is_recomputed_by_vllm_and_stored_again(engine, texts, hf, reference):
    req = _req(texts, texts["B"], texts["q2"], recompute_ratio=0.15)
    ref = reference[tuple(req.prompt_token_ids)]
    _blend(engine, [req])  # computes and stores set B
    keys = [hf.keyspace.chunk_key(req.prompt_token_ids[s:e], _context(hf, texts)) for s, e in req.spans]
    assert engine.call("corrupt", key=keys[1])["tiers"]
    before = _worker(engine)
    out = _blend(engine, [_req(texts, texts["B"], texts["q2"], recompute_ratio=1.0)])[0]
    after = _worker(engine)
    assert after["blend_failures"] - before["blend_failures"] == 1
    assert after["documents_computed"] - before["documents_computed"] == 1  # stored again
    assert out["kv_transfer_params"]["kvmw"]["documents_loaded"] == {"cpu": 1}
    assert out["tokens"] == ref["tokens"]  # vLLM recomputed from document 1's first block
    again = _blend(engine, [_req(texts, texts["B"], texts["q2"], recompute_ratio=1.0)])[0]
    assert again["kv_transfer_params"]["kvmw"]["documents_reused"] == 3 and again["tokens"] == ref["tokens"]


@needs_vllm
@pytest.mark.vllm
def test_documents_vllm_stored_are_hits_for_the_hf_hook(engine, texts, smollm2, store_dir):
    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.storage_tiers import DiskTier, TieredStore

    engine.call("flush")  # the disk tier is written behind the memory tier
    model, tok = smollm2  # a new HF process would index the folder at start: so does a new tier
    hook = KVMW(model, tok, KVMWConfig.load(env={}, cache_salt=""), store=TieredStore([DiskTier(store_dir, 1 << 30)]))
    out = hook.generate_rag(texts["B"], texts["q1"], preamble=texts["preamble"], strategy="full_reuse",
                            max_new_tokens=1, do_sample=False)
    hook.close()
    assert out.documents_prefilled == 0 and out.documents_loaded == {"disk": 3}


def _rope(params, dtype):
    """vLLM's rotary module as its models build it (a custom op: made under a vLLM config)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        return get_rope(64, 4096, rope_parameters=params, dtype=dtype)


@needs_vllm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params", [{"rope_type": "default", "rope_theta": 1e5},
                                    {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}])
def test_vllms_rotary_table_gives_the_frequencies_the_hf_model_has(params, dtype):
    """The re-positioning beneath vLLM reads vLLM's rotary module; its frequencies are the
    HF model's (so a document moves the same on both engines), in bf16 tables too."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from kvmw.integrations.vllm.blend_runner import rotary_inv_freq

    rope = _rope(dict(params), dtype)
    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64, max_position_embeddings=4096,
                      rope_parameters=dict(params))
    hf = LlamaRotaryEmbedding(cfg).inv_freq
    torch.testing.assert_close(rotary_inv_freq(rope), hf.float(), rtol=1e-6, atol=0)


@needs_vllm
def test_a_rotary_table_that_is_not_a_rotation_by_position_is_refused():
    from kvmw.blending.rope import UnsupportedRotaryError
    from kvmw.integrations.vllm.blend_runner import rotary_inv_freq

    rope = _rope({"rope_type": "default", "rope_theta": 1e4}, torch.float32)
    rope.cos_sin_cache[5:] *= 1.01  # what a length-dependent scaling looks like from here
    with pytest.raises(UnsupportedRotaryError):
        rotary_inv_freq(rope)


@pytest.fixture(scope="module")
def plain_engine(model_path, store_dir, engine):
    """kvmw over the same store with vLLM's prefix cache off and prefills split into steps of
    128 tokens. (vLLM's CPU platform turns async scheduling off whatever is asked: only a GPU
    build can run that case.)"""
    from kvmw.integrations.vllm import kv_transfer_config
    from kvmw.testing.vllm_engine import EngineProcess

    cfg = kv_transfer_config(codec="none", tiers=["cpu", "disk"], disk_path=str(store_dir), cache_salt="")
    with EngineProcess(model_path, {"kv_transfer_config": cfg, "enable_prefix_caching": False,
                                    "max_num_batched_tokens": 128}) as eng:
        yield eng


@needs_vllm
@pytest.mark.vllm
def test_prefix_caching_off_and_chunked_prefill_give_the_same_blends(engine, plain_engine, texts):
    assert engine.call("settings") == {"enable_prefix_caching": True, "async_scheduling": False}  # CPU defaults
    assert plain_engine.call("settings") == {"enable_prefix_caching": False, "async_scheduling": False}
    reqs = [_req(texts, texts["A"][::-1], texts["q1"], recompute_ratio=0.15),
            _req(texts, texts["A"], texts["q2"], strategy="cacheblend", recompute_ratio=0.15),
            _req(texts, texts["A"][1:], texts["q2"], strategy="epic", recompute_ratio=0.2),
            # a new third document: vLLM computes it and the question after the blend, in
            # steps of 128 tokens on the second engine (chunked prefill over blended pages)
            _req(texts, texts["A"][:2] + texts["D"][:1], texts["q1"], recompute_ratio=0.15)]
    for req in reqs:
        on = _blend(engine, [req])[0]
        off = plain_engine.generate([req.prompt_token_ids], max_tokens=GEN, logprobs=TOP,
                                    params=[req.kv_transfer_params])[0]
        reused = min(len(req.spans), 2 if req is reqs[-1] else 3)
        assert on["kv_transfer_params"]["kvmw"]["documents_reused"] == reused
        assert off["kv_transfer_params"]["kvmw"]["documents_reused"] == reused
        assert on["tokens"] == off["tokens"] and _first_logprobs_close(on, off)
