"""Qwen-0.5B (slow on 2 cores: `make test-slow`): its key outlier channels are why int8
uses per-channel key scales and why KIVI groups keys along tokens."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen_ctx():
    from kvmw.integrations.hf.capture import capture_kv
    from kvmw.integrations.hf.models import load
    from kvmw.text_data import essay_text

    model, tok = load("qwen0.5b")
    ids = tok(essay_text(20000), return_tensors="pt").input_ids[0, :640]
    return model, ids, capture_kv(model, ids[:512])


def _logprobs_after(model, kv, ids):
    from kvmw.integrations.hf.capture import to_dynamic_cache

    with torch.inference_mode():
        logits = model(ids[511:-1][None], past_key_values=to_dynamic_cache(kv[:, :, :511], model.config)).logits[0]
    return F.log_softmax(logits.float(), dim=-1)


def test_int8_per_channel_keys_keep_qwen_perplexity(qwen_ctx):
    from kvmw.quantizers import decode_blob, make_codec

    model, ids, kv = qwen_ctx
    assert kv[:, 0].abs().amax() > 50  # the outlier key channels this design answers
    ref = _logprobs_after(model, kv, ids)
    kl, nll_ref = {}, F.nll_loss(ref, ids[512:]).item()
    nll = {}
    for spec in ("int8", "int8:ktoken", "kivi4"):
        chunks = [decode_blob(make_codec(spec).encode(c.to(torch.float16).contiguous(), "f" * 32,
                                                      positions=np.arange(i * 256, i * 256 + c.shape[2])))[0]
                  for i, c in enumerate(kv.split(256, dim=2))]
        lp = _logprobs_after(model, torch.cat(chunks, dim=2).float(), ids)
        kl[spec] = F.kl_div(lp, ref, log_target=True, reduction="batchmean").item()
        nll[spec] = F.nll_loss(lp, ids[512:]).item()
    assert abs(np.exp(nll["int8"] - nll_ref) - 1) < 0.005  # within 0.5% perplexity
    assert kl["int8"] * 5 < kl["int8:ktoken"]  # per-token key scales lose the small channels
    assert np.exp(nll["kivi4"] - nll_ref) - 1 < 0.02 and kl["kivi4"] < 0.01
