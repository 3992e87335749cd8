"""Eviction policies as pure torch: budgets, protected tokens, GQA pooling, attention rows,
each policy's choice on constructed inputs, and chunk pruning into blobs."""

import numpy as np
import pytest
import torch

from kvmw.eviction import (
    H2O,
    TOVA,
    Budget,
    KNorm,
    KVzip,
    ScoreInputs,
    SnapKV,
    StreamingLLM,
    make_policy,
    select,
)
from kvmw.eviction.attention import accumulate_attention, pool_groups, window_attention
from kvmw.eviction.base import layer_counts
from kvmw.eviction.kvzip import reconstruction_scores
from kvmw.eviction.store import StoreEviction, chunk_span, encode_pruned, uniform_keep
from kvmw.quantizers import decode_blob, make_codec


def inputs(hk=2, hq=4, T=32, D=8, W=4, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(hk, T, D, generator=g)
    pos = torch.arange(T).expand(hk, T)
    q = torch.randn(hq, W, D, generator=g)
    return ScoreInputs(keys=keys, values=torch.randn(hk, T, D, generator=g), positions=pos, queries=q,
                       query_positions=torch.arange(T - W, T), **kw)


def test_budget_ratio_count_and_parse():
    assert Budget(ratio=0.25).count(1000) == 250 and Budget(ratio=0.1).count(15) == 2
    assert Budget(tokens=64).count(1000) == 64 and Budget(tokens=64).count(10) == 10
    assert Budget.parse("25%") == Budget(ratio=0.25) and Budget.parse("256") == Budget(tokens=256)
    assert Budget.parse(0.5) == Budget(ratio=0.5)
    with pytest.raises(ValueError):
        Budget(ratio=1.5)
    with pytest.raises(ValueError):
        Budget()


def test_select_keeps_top_scores_and_protected_tokens_sorted():
    scores = torch.tensor([[0.0, 9, 1, 8, 2, 7, 3, 0.5], [9, 0, 8, 1, 7, 2, 6, 0]])
    idx = select(scores, 4, sinks=1, recent=1)
    assert idx.tolist() == [[0, 1, 3, 7], [0, 2, 4, 7]]  # sink 0 + recent 7 + the two best of the rest
    assert select(scores, 2, sinks=2, recent=2).shape == (2, 4)  # never drops protected tokens
    assert select(scores, 100).tolist() == [list(range(8))] * 2


def test_gqa_pooling_averages_each_kv_heads_query_group():
    x = torch.arange(12.0).reshape(6, 2)  # 6 query heads, 2 kv heads: groups {0,1,2}, {3,4,5}
    assert pool_groups(x, 2).tolist() == [[2.0, 3.0], [8.0, 9.0]]
    assert pool_groups(x, 2, reduce="sum").tolist() == [[6.0, 9.0], [24.0, 27.0]]
    with pytest.raises(ValueError):
        pool_groups(x, 4)


def test_window_attention_matches_naive_causal_softmax_with_repeated_kv():
    inp = inputs(T=12, W=3)
    att = window_attention(inp.queries, inp.keys, inp.query_positions, inp.positions)
    k = inp.keys.repeat_interleave(2, dim=0)  # HF's repeat_kv: query head h reads kv head h // 2
    logits = inp.queries @ k.transpose(1, 2) / 8 ** 0.5
    for w, p in enumerate(inp.query_positions.tolist()):
        logits[:, w, p + 1:] = float("-inf")
    torch.testing.assert_close(att, torch.softmax(logits, -1))
    assert att[:, 0, 10:].abs().max() == 0  # query at position 9 sees nothing later


def test_accumulated_attention_is_blockwise_exact_and_sums_rows():
    inp = inputs(T=40, W=40)
    once = accumulate_attention(inp.queries, inp.keys, inp.query_positions, inp.positions, block=1000)
    blocks = accumulate_attention(inp.queries, inp.keys, inp.query_positions, inp.positions, block=7)
    torch.testing.assert_close(once, blocks)
    assert once.sum().item() == pytest.approx(40 * 4)  # every row of every query head sums to 1
    assert once[:, 0].min() > once[:, -1].max()  # the first key is seen by 40 rows, the last by one


def test_streaming_llm_keeps_sinks_and_newest():
    idx = StreamingLLM(sinks=4).keep(inputs(T=100), Budget(ratio=0.2))
    assert idx.tolist() == [list(range(4)) + list(range(84, 100))] * 2


def test_knorm_keeps_low_norm_keys():
    inp = inputs(T=20)
    inp.keys[:, 3] *= 10
    inp.keys[:, 7] *= 0.01
    idx = KNorm().keep(inp, 10)
    assert all(7 in row and 3 not in row for row in idx.tolist())


def test_snapkv_keeps_what_the_observation_window_reads_per_kv_head_with_pooling():
    T, W, D = 64, 8, 16
    inp = inputs(T=T, W=W, D=D, seed=1)
    inp.keys[0, 10] = inp.queries[0:2].mean((0, 1)) * 3  # kv head 0's group attends to token 10
    inp.keys[1, 30] = inp.queries[2:4].mean((0, 1)) * 3  # kv head 1's group to token 30
    idx = SnapKV(window=W, kernel=3).keep(inp, 16)
    assert 10 in idx[0] and 30 in idx[1]
    assert 11 in idx[0] or 9 in idx[0]  # the neighbours ride along (pooling)
    assert all(set(range(T - W, T)) <= set(row) for row in idx.tolist())  # window always kept
    assert SnapKV(window=W).query_rows == W


def test_tova_uses_the_last_row_averaged_over_all_heads():
    inp = inputs(T=50, W=4, seed=2)
    inp.keys[0, 5] = inp.queries[:, -1].mean(0) * 4
    idx = TOVA().keep(inp, 10)
    assert torch.equal(idx[0], idx[1]) and 5 in idx[0] and 49 in idx[0]


def test_h2o_keeps_heavy_hitters_and_a_recent_share_of_the_budget():
    mass = torch.zeros(2, 100)
    mass[:, [7, 20, 33]] = 5.0
    inp = inputs(T=100, mass=mass)
    idx = H2O(recent=0.5).keep(inp, 20)
    for row in idx.tolist():
        assert {7, 20, 33} <= set(row) and set(range(90, 100)) <= set(row) and len(row) == 20
    with pytest.raises(ValueError):
        H2O().keep(inputs(T=10), 5)


def test_kvzip_scores_are_each_keys_max_causal_attention_over_rows_and_its_query_group():
    hk, hq, T, R, D = 2, 6, 10, 7, 8
    g = torch.Generator().manual_seed(3)
    keys, q = torch.randn(hk, T + R, D, generator=g), torch.randn(hq, R, D, generator=g)
    kpos, qpos = torch.arange(T + R).expand(hk, -1), torch.arange(T, T + R)
    naive = torch.zeros(hk, T)
    for h in range(hq):  # one query head and row at a time; query head h reads kv head h // 3
        for r in range(R):
            seen = T + r + 1  # the context and the repeat tokens up to itself
            p = torch.softmax(keys[h // 3, :seen] @ q[h, r] / D ** 0.5, -1)
            naive[h // 3] = torch.maximum(naive[h // 3], p[:T])
    for block in (1000, 3):
        torch.testing.assert_close(reconstruction_scores(q, keys, qpos, kpos, T, block=block), naive)
    mean = window_attention(q, keys, qpos, kpos)[..., :T].mean(1)  # not the mean: the max
    assert not torch.allclose(pool_groups(mean, hk), naive)

    inp = inputs(T=40, reconstruction=torch.rand(2, 40, generator=g))
    inp.reconstruction[0, 17] = inp.reconstruction[1, 30] = 5.0
    idx = KVzip(sinks=2).keep(inp, 8)
    assert 17 in idx[0] and 30 in idx[1] and all({0, 1} <= set(r) for r in idx.tolist())
    torch.testing.assert_close(idx, select(inp.reconstruction, 8, sinks=2))
    with pytest.raises(ValueError):
        KVzip().keep(inputs(T=10), 5)  # no reconstruction pass was run
    with pytest.raises(ValueError):
        KVzip().keep(inputs(T=10, reconstruction=torch.rand(2, 8)), 5)  # scores of another length
    with pytest.raises(ValueError):
        StoreEviction(KVzip(), Budget(ratio=0.5))  # no reconstruction pass before store


def test_kvzip_global_budget_is_one_threshold_over_every_layers_scores():
    g = torch.Generator().manual_seed(5)
    L, H, T, k, sinks = 4, 2, 30, 9, 2
    scores = [torch.rand(H, T, generator=g) * scale for scale in (1.0, 0.2, 3.0, 0.05)]  # layers differ in scale
    layers = [inputs(T=T, reconstruction=s) for s in scores]
    counts = layer_counts(scores, [k] * L, sinks)
    assert int(counts.sum()) == L * k and (counts >= sinks).all()
    assert counts[2] > counts[0] > counts[1] >= counts[3]  # layers with high scores keep more
    # brute force: a layer keeps j tokens per head while its best head's j-th score (sinks
    # first) clears the threshold, the (L * k)-th best of all those slot values
    slots = torch.stack([s.clone().index_fill_(1, torch.arange(sinks), 10.0).sort(-1, descending=True).values.amax(0)
                         for s in scores])
    threshold = slots.flatten().sort(descending=True).values[L * k - 1]
    assert counts.tolist() == (slots >= threshold).sum(1).tolist()

    kept = KVzip(sinks=sinks).keep_layers(layers, k)
    assert [idx.shape for idx in kept] == [(H, int(c)) for c in counts]  # dense per layer, sum = budget
    for idx, s, c in zip(kept, scores, counts):  # each head: the sinks and its top scores
        torch.testing.assert_close(idx, select(s, int(c), sinks=sinks))
    assert sum(i.numel() for i in KVzip().keep_layers(layers, Budget(ratio=0.25))) == L * H * 8
    uniform = KVzip(sinks=sinks, budget_scope="layer").keep_layers(layers, k)
    assert all(torch.equal(i, select(s, k, sinks=sinks)) for i, s in zip(uniform, scores))
    with pytest.raises(ValueError):
        KVzip(budget_scope="heads")


def test_make_policy_by_name():
    assert make_policy("snapkv", window=32) == SnapKV(window=32)
    assert make_policy("kvzip", chunk=512) == KVzip(chunk=512) and KVzip.reconstructs
    with pytest.raises(ValueError):
        make_policy("nope")


def test_uniform_keep_pools_ranks_over_layers_and_heads():
    scores = torch.zeros(3, 2, 10)
    scores[:, :, 4] = 100.0  # everyone wants 4
    scores[0, 0, 6] = 1e6  # one head's huge score does not dominate the ranks
    scores[1:, :, 8] = 1.0
    keep = uniform_keep(scores, 3, sinks=1)
    assert keep.tolist() == [0, 4, 8]


def test_pruned_chunk_blob_carries_kept_positions_and_shrinks_with_codec(fp, kv_small):
    keep = torch.tensor([0, 1, 5, 9, 15])
    codec = make_codec("none")
    blob = encode_pruned(codec, kv_small, keep, first_position=256, fingerprint=fp.digest,
                         info={"policy": "snapkv"})
    kv, meta = decode_blob(blob, fp.digest)
    assert torch.equal(kv, kv_small[:, :, keep])
    assert meta.positions.tolist() == [256, 257, 261, 265, 271]
    assert chunk_span(meta) == (256, 16) and meta.extra["eviction"]["policy"] == "snapkv"
    full = codec.encode(kv_small, fp.digest, positions=np.arange(256, 272))
    assert chunk_span(decode_blob(full)[1]) == (256, 16)  # an unpruned blob reads the same way
    torch.manual_seed(0)
    big = torch.randn(2, 2, 256, 2, 64).to(torch.float16)
    keep = torch.arange(0, 256, 4)
    sizes = {spec: len(encode_pruned(make_codec(spec), big, keep, 0, fp.digest)) for spec in ("none", "int8")}
    full = len(make_codec("none").encode(big, fp.digest))
    assert sizes["none"] < full / 3.8 and sizes["int8"] < full / 7.5  # 4x from eviction, ~2x from int8
