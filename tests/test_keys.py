import json
import os
import subprocess
import sys

import numpy as np
import torch

from kvmw.fingerprint import ModelFingerprint
from kvmw.keys import KeySpace

FP = ModelFingerprint("LlamaForCausalLM", 30, 3, 64, "float32", {"rope_theta": 1e5}, "w")

SCRIPT = """
import json
from kvmw.fingerprint import ModelFingerprint
from kvmw.keys import KeySpace
fp = ModelFingerprint("LlamaForCausalLM", 30, 3, 64, "float32", {"rope_theta": 1e5}, "w")
ks = KeySpace(fp, 4, "tenant")
print(json.dumps([fp.digest, ks.prefix_keys(list(range(10))), ks.chunk_key([5, 6, 7])]))
"""


def test_keys_are_identical_across_processes_with_different_hash_seeds():
    outs = []
    for seed in ("1", "987654"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                             text=True, check=True)
        outs.append(json.loads(res.stdout))
    assert outs[0] == outs[1]
    here = KeySpace(FP, 4, "tenant")
    assert outs[0] == [FP.digest, here.prefix_keys(list(range(10))), here.chunk_key([5, 6, 7])]


def test_prefix_chain_has_one_key_per_full_chunk_and_depends_on_all_earlier_tokens():
    ks = KeySpace(FP, chunk_size=4)
    a = ks.prefix_keys(list(range(12)))
    assert len(a) == 3 and len(ks.prefix_keys(list(range(11)))) == 2
    b = ks.prefix_keys([99] + list(range(1, 12)))  # first token differs
    assert all(x != y for x, y in zip(a, b))  # a change in chunk 0 changes every later key
    c = ks.prefix_keys(list(range(8)) + [0, 0, 0, 0])  # only chunk 2 differs
    assert c[:2] == a[:2] and c[2] != a[2]


def test_token_containers_hash_the_same():
    ks = KeySpace(FP, chunk_size=4)
    toks = list(range(8))
    ref = ks.prefix_keys(toks)
    assert ks.prefix_keys(np.array(toks, dtype=np.int32)) == ref
    assert ks.prefix_keys(torch.tensor([toks])) == ref
    assert ks.chunk_key(torch.tensor(toks)) == ks.chunk_key(toks)


def test_a_chunk_computed_after_a_context_has_its_own_key():
    ks = KeySpace(FP, chunk_size=4)
    doc = [5, 6, 7, 8]
    assert ks.chunk_key(doc, []) == ks.chunk_key(doc) == ks.chunk_key(doc, None)
    keys = {ks.chunk_key(doc), ks.chunk_key(doc, [1, 2]), ks.chunk_key(doc, [1, 3]), ks.chunk_key([2] + doc, [1])}
    assert len(keys) == 4  # the context, and where it ends, are part of the key
    assert ks.chunk_key(doc, torch.tensor([1, 2])) == ks.chunk_key(doc, [1, 2])


def test_namespaces_separate_tenants_models_and_chunk_sizes():
    toks = list(range(16))
    base = KeySpace(FP, 4, "a")
    others = [
        KeySpace(FP, 4, "b"),
        KeySpace(ModelFingerprint("LlamaForCausalLM", 30, 3, 64, "float32", {"rope_theta": 1e5}, "w2"), 4, "a"),
        KeySpace(ModelFingerprint("LlamaForCausalLM", 30, 3, 64, "float16", {"rope_theta": 1e5}, "w"), 4, "a"),
        KeySpace(FP, 8, "a"),
    ]
    mine = set(base.prefix_keys(toks)) | {base.chunk_key(toks)}
    for other in others:
        theirs = set(other.prefix_keys(toks)) | {other.chunk_key(toks)}
        assert not mine & theirs


def test_chunk_key_is_position_independent_and_differs_from_prefix_key():
    ks = KeySpace(FP, 4)
    doc = [7, 8, 9, 10]
    assert ks.chunk_key(doc) == ks.chunk_key(list(doc))
    assert ks.chunk_key(doc) not in ks.prefix_keys(doc)
    assert ks.chunk_key(doc) != ks.chunk_key(doc[:3])


def test_fingerprint_of_real_and_random_models_differ(smollm2, tiny_llama):
    a = ModelFingerprint.from_hf(smollm2[0])
    b = ModelFingerprint.from_hf(tiny_llama)
    assert a != b
    assert (a.num_layers, a.num_kv_heads, a.head_dim) == (30, 3, 64)
    assert a.architecture == "LlamaForCausalLM" and a.rope  # rope settings are part of identity
    assert ModelFingerprint.from_hf(smollm2[0]).digest == a.digest  # deterministic


def test_fingerprint_sees_weights(tiny_llama):
    import copy

    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert ModelFingerprint.from_hf(other) != ModelFingerprint.from_hf(tiny_llama)
