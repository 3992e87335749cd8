"""Shared fixtures: real SmolLM2, a tiny random Llama, real Redis servers, real folders."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvmw.fingerprint import ModelFingerprint  # noqa: E402
from kvmw.storage_tiers.redis_server import HOW_TO, RedisProcess, default_url, host_port, ping  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, converted by `make models`."""
    from kvmw.integrations.hf.models import is_installed, load

    if not is_installed("smollm2"):
        pytest.fail("SmolLM2 is not installed: run `make models` (the Makefile's test target does)")
    return load("smollm2")


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer random-weight Llama for millisecond tests of mechanics."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def fp() -> ModelFingerprint:
    return ModelFingerprint("TestArch", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16",
                            weights_id="test")


@pytest.fixture
def kv_small() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 2, 16, 2, 8).to(torch.float16)


@pytest.fixture
def redis_url() -> str:
    """The configured Redis (make test starts one); fails with how-to when absent."""
    url = default_url()
    if not ping(*host_port(url)):
        pytest.fail(f"no Redis answers on {url}: {HOW_TO}")
    return url


@pytest.fixture
def redis_prefix(redis_url) -> str:
    """A fresh key prefix per test; its keys are deleted afterwards."""
    import redis

    prefix = f"kvmwtest:{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_proc(tmp_path):
    """A private redis-server on a spare port, which the test may kill and restart."""
    try:
        proc = RedisProcess(workdir=str(tmp_path)).start()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield proc
    proc.kill()
