"""The KIVI generation cache: G-aligned key blocks, append-only, real memory, real-model fidelity."""

import pytest
import torch

from kvmw.integrations.hf.kivi_cache import KIVICache, KIVILayer


def feed(layer, k, v, first):
    """Prefill `first` tokens, then decode one token at a time; returns the last (K, V)."""
    out = layer.update(k[:, :, :first], v[:, :, :first])
    for t in range(first, k.shape[2]):
        out = layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
    return out


def test_keys_are_quantized_in_whole_blocks_even_when_decoding_one_token_at_a_time():
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 400, 64), torch.randn(1, 2, 400, 64)
    layer = KIVILayer(bits=2, group=32, residual=64, sinks=4)
    feed(layer, k, v, first=1)  # the pitfall: tokens arrive one by one
    assert layer.quantized_tokens % 32 == 0 and layer.quantized_tokens > 250
    assert 64 <= layer.keys.shape[2] < 64 + 32  # fp residual: R..R+G-1 newest tokens
    assert layer.k_min.shape[1] * 32 == layer.quantized_tokens  # one min/step per channel per block
    fp_bytes = 2 * k.numel() * 4
    assert layer.nbytes() < 0.35 * fp_bytes  # really quantized, not silently kept in fp


def test_keys_can_have_more_bits_than_values():
    torch.manual_seed(3)
    k, v = torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)
    errs, sizes = {}, {}
    for key_bits in (2, 4):
        # plain codes on both sides (2-bit keys' default clipping and 8-bit outlier channels off)
        layer = KIVILayer(bits=2, group=32, residual=32, sinks=0, key_bits=key_bits, clip=False, outlier_channels=0)
        out_k, out_v = feed(layer, k, v, first=300)
        out_k, out_v = layer.update(torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64))
        q = layer.quantized_tokens
        errs[key_bits] = ((out_k[:, :, :q] - k[:, :, :q]).norm() / k[:, :, :q].norm()).item(), \
            ((out_v[:, :, :q] - v[:, :, :q]).norm() / v[:, :, :q].norm()).item()
        sizes[key_bits] = layer.nbytes()
    assert errs[4][0] < errs[2][0] / 3 and errs[4][1] == pytest.approx(errs[2][1])  # values untouched
    assert sizes[2] < sizes[4] < 1.5 * sizes[2]


def test_history_is_append_only_and_never_requantized():
    torch.manual_seed(1)
    k, v = torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)
    layer = KIVILayer(bits=4, group=32, residual=64, sinks=0)
    k1, _ = feed(layer, k[:, :, :200], v[:, :, :200], first=150)
    codes = layer.k_codes.clone()
    k2, _ = feed(layer, k, v, first=200)
    assert torch.equal(layer.k_codes[:, : codes.shape[1]], codes)
    # tokens quantized at the first checkpoint read back identically later (no drift)
    n = codes.shape[1] * 32
    assert torch.equal(k1[:, :, :n], k2[:, :, :n])


def test_block_error_is_within_half_a_step_and_sinks_are_exact():
    torch.manual_seed(2)
    k, v = torch.randn(1, 2, 260, 64) * 3, torch.randn(1, 2, 260, 64)
    k[:, :, :, 5] += 50  # an outlier channel: per-channel blocks keep it from hurting others
    # an fp32 residual: the bound is on quantizing the exact inputs (an fp16 residual rounds the
    # ~50-valued channel by up to 0.016 before it is quantized)
    layer = KIVILayer(bits=4, group=32, residual=32, sinks=4, residual_dtype=torch.float32)
    out_k, out_v = feed(layer, k, v, first=260)
    out_k, out_v = layer.update(torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64))  # see the flush
    assert torch.equal(out_k[:, :, :4], k[:, :, :4]) and torch.equal(out_v[:, :, :4], v[:, :, :4])
    q = slice(4, 4 + layer.quantized_tokens)
    blocks = k[0, :, q].reshape(2, -1, 32, 64)
    step = (blocks.amax(2) - blocks.amin(2)) / 15
    err = (out_k[0, :, q] - k[0, :, q]).abs().reshape(2, -1, 32, 64)
    assert (err <= step[:, :, None] * 0.5 + 1e-2).all()
    # a normal channel beside the outlier keeps its own small step (per-token groups would
    # share the outlier's range: a step of ~3.5 here, half of it ~1.8)
    assert (out_k[0, :, q, 6] - k[0, :, q, 6]).abs().max() < 0.8


@pytest.mark.parametrize("bits,group,min_agree,max_bytes", [(4, 64, 0.95, 0.35), (2, 32, 0.7, 0.3)])
def test_smollm2_continues_faithfully_with_less_memory(smollm2, bits, group, min_agree, max_bytes):
    from transformers import DynamicCache

    from kvmw.text_data import essay_text

    model, tok = smollm2
    ids = tok(essay_text(8000), return_tensors="pt").input_ids[:, :768]  # the fp residual (128-159
    # tokens) is ~1/5 of the cache at this length; at 2k tokens KIVI-2 falls to ~0.17x
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1]:]

    def teacher_forced(cache):
        with torch.inference_mode():
            preds = [model(ids, past_key_values=cache).logits[0, -1].argmax()]
            for t in ref[:-1]:
                preds.append(model(t.view(1, 1), past_key_values=cache).logits[0, -1].argmax())
        return torch.stack(preds)

    dyn = DynamicCache(config=model.config)
    assert torch.equal(teacher_forced(dyn), ref)
    dyn_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dyn.layers)
    kivi = KIVICache(model.config, bits=bits, group=group)
    agree = (teacher_forced(kivi) == ref).float().mean().item()
    assert agree >= min_agree
    assert kivi.nbytes() <= max_bytes * dyn_bytes
    assert kivi.get_seq_length() == dyn.get_seq_length()


def test_clipped_ranges_never_do_worse_than_min_max():
    from kvmw.integrations.hf.kivi_cache import quantize_clipped
    from kvmw.quantizers.int4 import quantize_groups

    torch.manual_seed(4)
    x = torch.randn(2, 40, 32, 64) * torch.rand(1, 1, 1, 64) * 4  # [H, blocks, G tokens, D]

    def sq_err(codes, mn, step):
        return (codes.float() * step.float() + mn.float() - x).square().sum(2)

    clipped = sq_err(*quantize_clipped(x, 2, 2))
    plain = sq_err(*quantize_groups(x.clone(), 2, dim=2))
    assert (clipped <= plain + 1e-4).all()  # per group: min-max is one of the candidates
    assert clipped.sum() < 0.85 * plain.sum()  # and on Gaussian data clipping pays


def test_outlier_key_channels_are_the_widest_and_kept_at_8_bits():
    torch.manual_seed(5)
    k, v = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
    wide = [3, 17, 40, 41]
    k[:, :, :, wide] *= 20  # channels a 2-bit grid would ruin
    layer = KIVILayer(bits=2, group=32, residual=32, sinks=0, outlier_channels=4, residual_dtype=torch.float32)
    layer.update(k, v)
    out_k, _ = layer.update(torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64))
    q = layer.quantized_tokens
    assert q == 224 and layer.o_idx.shape == (2, 7, 4)
    assert (layer.o_idx.long() == torch.tensor(wide)).all()  # chosen per head and block from range
    blocks = k[0, :, :q, wide].reshape(2, 7, 32, 4)
    step8 = (blocks.amax(2) - blocks.amin(2)) / 255
    err = (out_k[0, :, :q, wide] - k[0, :, :q, wide]).abs().reshape(2, 7, 32, 4)
    assert (err <= step8[:, :, None] * 0.5 + 1e-3).all()  # 8-bit exact, not the 2-bit codes
    plain = KIVILayer(bits=2, group=32, residual=32, sinks=0, outlier_channels=0, residual_dtype=torch.float32)
    plain.update(k, v)
    plain_k, _ = plain.update(torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64))
    assert (plain_k[0, :, :q, wide] - k[0, :, :q, wide]).abs().max() > 20 * err.max()
    # real bytes: per head and block, 4 channel indices + 32x4 8-bit codes + 4 mins + 4 steps (fp16)
    assert layer.nbytes() - plain.nbytes() == 2 * 7 * (4 + 32 * 4 + 4 * 2 + 4 * 2)


def test_fp16_residual_for_fp32_models_and_exact_sinks():
    torch.manual_seed(6)
    k, v = torch.randn(1, 2, 200, 64), torch.randn(1, 2, 200, 64)
    layer = KIVILayer(bits=2, group=32, residual=64, sinks=4)
    out_k, out_v = feed(layer, k, v, first=100)
    assert layer.keys.dtype == torch.float16 and out_k.dtype == torch.float32
    assert torch.equal(out_k[:, :, :4], k[:, :, :4])  # sinks: the inputs, not rounded
    r = layer.keys.shape[2]
    assert torch.equal(out_v[:, :, -r:], v[:, :, -r:].half().float())
    wide = KIVILayer(bits=2, group=32, residual=64, sinks=4, residual_dtype=torch.float32)
    feed(wide, k, v, first=100)
    assert wide.nbytes() - layer.nbytes() == 2 * r * 2 * 64 * 2  # keys + values, 2 bytes saved each


def test_smollm2_keys_reconstruct_better_than_plain_2_bit(smollm2):
    from kvmw.integrations.hf.capture import capture_kv
    from kvmw.layout import to_hf_layers
    from kvmw.text_data import essay_text

    model, tok = smollm2
    ids = tok(essay_text(4000), return_tensors="pt").input_ids[0, :512]
    with torch.inference_mode():
        kv = capture_kv(model, ids)
    errs = {}
    for name, opts in {"plain": dict(clip=False, outlier_channels=0), "default": {}}.items():
        num = den = 0.0
        for k, _ in to_hf_layers(kv)[::3]:
            layer = KIVILayer(bits=2, group=32, residual=32, sinks=4, **opts)
            layer.update(k.contiguous().clone(), k.contiguous().clone())
            out_k, _ = layer.update(k[:, :, -1:].clone(), k[:, :, -1:].clone())
            q = slice(4, 4 + layer.quantized_tokens)
            num += (out_k[:, :, q] - k[:, :, q]).square().sum().item()
            den += k[:, :, q].square().sum().item()
        errs[name] = (num / den) ** 0.5
    assert errs["default"] < 0.8 * errs["plain"], errs
