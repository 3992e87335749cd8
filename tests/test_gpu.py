"""CUDA tensors through every GPU-facing path give what the CPU path gives.

Skipped without CUDA (CI and the 2-core machines have none); run on a GPU machine
with ``pytest -m gpu``. Each test does the same work once on CPU tensors and once
on CUDA tensors and compares: blob bytes (codecs, Triton kernels on the GPU vs
the torch path), page layouts, the KIVI generation cache, the generate hook's
prefix reuse, RAG blending and eviction on a tiny random Llama moved to the GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kvmw.quantizers import decode_blob, make_codec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; none on this machine")]
GPU = "cuda"
SPECS = ["none", "int8", "int8:ktoken", "int4:g32", "int4:g64", "kivi2:g32", "kivi4:g16", "fp8", "cachegen",
         "int8+zstd", "kivi2:g32+zstd"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_codecs_give_the_same_bytes_from_cuda_tensors(spec, dtype):
    torch.manual_seed(1)
    kv = (torch.randn(3, 2, 21, 2, 64) * torch.linspace(0.05, 6, 64)).to(dtype)
    kv[:, 0, :, :, 2] += 40  # an outlier key channel
    kv[0, 1, 3] = 0  # an all-zero token row
    cpu = bytes(make_codec(spec).encode(kv, "f" * 32))
    assert bytes(make_codec(spec).encode(kv.to(GPU), "f" * 32)) == cpu
    ref, _ = decode_blob(cpu)
    out, _ = decode_blob(cpu, device=GPU)
    assert out.is_cuda and out.dtype == ref.dtype == dtype
    assert torch.equal(out.cpu(), ref)


def test_gpu_tier_round_trip_and_the_store_reads_through_it(tmp_path):
    from kvmw.storage_tiers import CPUTier, DiskTier, GPUTier, TieredStore

    blob = make_codec("int8").encode(torch.randn(2, 2, 32, 2, 16), "f" * 32)
    gpu = GPUTier(1 << 20)
    store = TieredStore([gpu, CPUTier(1 << 20), DiskTier(tmp_path, 1 << 20)])
    key = "k" * 64
    store.put(key, blob)
    store.flush(30)
    assert all(t.get(key) is not None for t in store.tiers)
    assert gpu.get_device(key).device.type == "cuda"
    assert bytes(store.get(key)) == bytes(blob)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_standard_paged_layout_on_cuda_equals_cpu(padded, dtype):
    from kvmw.integrations.vllm.paged_layout import CPUPagedLayout, StandardPagedLayout, slots_for_tokens

    bs, h, d, nblocks = 16, 4, 64, 40
    torch.manual_seed(0)
    for cls in (StandardPagedLayout, CPUPagedLayout):
        c = 2 * d + (16 if padded and cls is StandardPagedLayout else 0)
        layer = torch.randn(nblocks, h, bs, c).to(dtype)
        for slots in (slots_for_tokens([9, 8, 7, 3], 0, 0, 4 * bs, bs),  # descending run + a jump
                      slots_for_tokens([5, 2, 30], 0, 3, 2 * bs + 7, bs),  # mid-block start, cut short
                      torch.randperm(nblocks * bs)[:37]):
            kv = torch.randn(2, len(slots), h, d).to(dtype)
            on_cpu, on_gpu = layer.clone(), layer.to(GPU)
            cls(bs, h, d).scatter(on_cpu, slots, kv)
            cls(bs, h, d).scatter(on_gpu, slots.to(GPU), kv.to(GPU))
            assert torch.equal(on_gpu.cpu(), on_cpu)
            assert torch.equal(cls(bs, h, d).gather(on_gpu, slots).cpu(), cls(bs, h, d).gather(on_cpu, slots))
            assert torch.equal(cls(bs, h, d).gather(on_cpu, slots), kv)


@pytest.mark.parametrize("clip", [False, True])
def test_kivi_generation_cache_on_cuda_equals_cpu(clip):
    """Plain min-max codes are exact across devices. Clipping picks each group's range by
    least squared error, a sum whose order differs on the GPU: a near tie may pick another
    candidate there, so that only has to be as accurate as on the CPU."""
    from kvmw.integrations.hf.kivi_cache import KIVILayer

    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)
    outs = []
    for dev in ("cpu", GPU):
        layer = KIVILayer(bits=2, group=32, residual=64, sinks=4, clip=clip)
        layer.update(k[:, :, :200].to(dev), v[:, :, :200].to(dev))
        for t in range(200, 300):
            out = layer.update(k[:, :, t:t + 1].to(dev), v[:, :, t:t + 1].to(dev))
        assert out[0].device.type == dev and layer.quantized_tokens > 200
        outs.append([o.cpu() for o in out])
    for (a, b), x in zip(zip(*outs), (k, v)):
        if not clip:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        err_cpu, err_gpu = (a - x).norm() / x.norm(), (b - x).norm() / x.norm()
        assert abs(err_gpu - err_cpu) < 0.01 * err_cpu
        assert (a != b).float().mean() < 0.01


@pytest.fixture(scope="module")
def llama():
    """A 4-layer random-weight Llama: (cpu model, cuda model), float32, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    cpu = LlamaForCausalLM(cfg).eval()
    return cpu, copy.deepcopy(cpu).to(GPU)


def _hook(model, codec="int8", chunk=32):
    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.storage_tiers import CPUTier, TieredStore

    return KVMW(model, None, KVMWConfig.load(env={}, chunk_size=chunk, codec=codec),
                store=TieredStore([CPUTier(1 << 28)]))


def test_prefix_reuse_on_cuda(llama):
    _, model = llama
    ids = torch.randint(0, 256, (1, 4 * 32 + 9))
    gen = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.inference_mode():
        ref = model.generate(ids.to(GPU), **gen)
    hook = _hook(model)
    hook.generate(ids, **gen)
    hook.store.flush(30)
    warm = hook.generate(ids, **gen)
    assert hook.stats()["tokens_reused"] == 4 * 32
    assert warm.sequences.is_cuda
    torch.testing.assert_close(warm.logits[0], ref.logits[0], atol=0.05, rtol=0.05)  # int8 KV
    hook.close()


def test_rag_blending_on_cuda_equals_cpu(llama, monkeypatch):
    from kvmw.blending import CacheBlend, QueryAware

    torch.manual_seed(2)
    docs = [torch.randint(0, 256, (n,)).tolist() for n in (70, 45, 90)]
    question = torch.randint(0, 256, (12,)).tolist()
    preamble = torch.randint(0, 256, (6,)).tolist()
    gen = dict(max_new_tokens=4, do_sample=False, preamble=preamble, keep_cache=True, document_context="preamble")
    chosen, select = {}, CacheBlend.select
    probed, query_select = {}, QueryAware.select
    runs = {}
    for dev, model in zip(("cpu", GPU), llama):
        monkeypatch.setattr(CacheBlend, "select", lambda self, plan, deviation, dev=dev: chosen.setdefault(
            dev, select(self, plan, deviation).cpu()))
        monkeypatch.setattr(QueryAware, "select", lambda self, plan, deviation, dev=dev: probed.setdefault(
            dev, (plan.attention, query_select(self, plan, deviation)))[1])
        hook = _hook(model, codec="none")
        hook.generate_rag(docs, question, strategy="full_reuse", **gen)  # stores the documents
        full = hook.generate_rag(docs[::-1], question, strategy="full_prefill", **gen)
        one = hook.generate_rag(docs[::-1], question, strategy="epic", recompute_ratio=1.0, **gen)
        epic = hook.generate_rag(docs[::-1], question, strategy="epic", recompute_ratio=0.15, **gen)
        blend = hook.generate_rag(docs[::-1], question, strategy="cacheblend", recompute_ratio=0.15, **gen)
        hook.generate_rag(docs[::-1], question, strategy="query_aware", recompute_ratio=0.15,
                          **dict(gen, document_context="stand_in", stand_in=[7, 8, 9] * 20))
        assert blend.documents_loaded.get("cpu") == 3 and 0 < blend.recomputed_tokens < blend.prompt_tokens
        assert torch.equal(one.sequences.cpu(), full.sequences.cpu())
        for a, b in zip(one.cache.layers, full.cache.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-4)
        runs[dev] = (full, one, epic)
        hook.close()
    for a, b in zip(runs["cpu"], runs[GPU]):  # the same tokens recomputed: the same KV
        assert a.recomputed_tokens == b.recomputed_tokens and torch.equal(a.sequences, b.sequences.cpu())
        assert b.cache.layers[0].keys.is_cuda
        for la, lb in zip(a.cache.layers, b.cache.layers):
            torch.testing.assert_close(lb.keys.cpu(), la.keys, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(lb.values.cpu(), la.values, atol=1e-4, rtol=1e-4)
    # CacheBlend ranks tokens by a KV difference; near ties may rank another token on the GPU
    a, b = chosen["cpu"], chosen[GPU]
    assert int(a.sum()) == int(b.sum()) > 0 and int((a & ~b).sum()) <= 2
    # query-aware: the probe's attention agrees; its windows may move with a near tie
    (att_a, a), (att_b, b) = probed["cpu"], probed[GPU]
    torch.testing.assert_close(att_b.cpu(), att_a, atol=1e-4, rtol=1e-3)
    assert int(a.sum()) == int(b.sum()) > 0 and int((a & ~b).sum()) <= 4


@pytest.mark.parametrize("policy", ["streaming_llm", "snapkv"])
def test_eviction_on_cuda_keeps_what_cpu_keeps(llama, policy):
    from kvmw.eviction import Budget, SnapKV, StreamingLLM
    from kvmw.eviction.hf import prefill_compressed

    make = {"streaming_llm": lambda: StreamingLLM(), "snapkv": lambda: SnapKV(window=16)}[policy]
    ctx, new = torch.randint(0, 256, (160,)), torch.randint(0, 256, (5,))
    logits, kept = [], []
    for model in llama:
        cache = prefill_compressed(model, ctx, make(), Budget(ratio=0.25))
        kept.append([layer.positions.cpu() for layer in cache.layers])
        with torch.inference_mode():
            logits.append(model(new[None].to(model.device), past_key_values=cache).logits[0].cpu())
    for a, b in zip(*kept):
        assert torch.equal(a, b)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
