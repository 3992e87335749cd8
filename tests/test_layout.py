import pytest
import torch

from kvmw.errors import LayoutError
from kvmw.integrations.hf.capture import capture_kv, to_dynamic_cache
from kvmw.layout import check_chunk, from_hf_layers, split_tokens, to_hf_layers


def test_hf_round_trip_matches_the_model_cache(tiny_llama):
    ids = torch.arange(1, 21)
    kv = capture_kv(tiny_llama, ids)
    assert kv.shape == (2, 2, 20, 2, 16)  # [L, 2, T, kv_heads, head_dim]
    with torch.inference_mode():
        cache = tiny_llama(ids[None], use_cache=True).past_key_values
    for i, (k, v) in enumerate(to_hf_layers(kv)):
        assert torch.equal(k, cache.layers[i].keys) and torch.equal(v, cache.layers[i].values)
    # token t of layer l, head h in canonical layout is HF's [0, h, t]
    assert torch.equal(kv[1, 0, 7, 1], cache.layers[1].keys[0, 1, 7])


def test_continuing_from_a_rebuilt_cache_matches_a_full_forward(tiny_llama):
    ids = torch.arange(1, 22)
    kv = capture_kv(tiny_llama, ids[:-1])
    with torch.inference_mode():
        full = tiny_llama(ids[None]).logits[0, -1]
        step = tiny_llama(ids[-1:][None], past_key_values=to_dynamic_cache(kv, tiny_llama.config)).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_split_and_checks():
    kv = torch.zeros(3, 2, 10, 2, 4)
    parts = split_tokens(kv, 4)
    assert [p.shape[2] for p in parts] == [4, 4, 2] and all(p.is_contiguous() for p in parts)
    with pytest.raises(LayoutError):
        check_chunk(torch.zeros(3, 3, 10, 2, 4))
    with pytest.raises(LayoutError):
        from_hf_layers([torch.zeros(2, 2, 3, 4)], [torch.zeros(2, 2, 3, 4)])
