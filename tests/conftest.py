"""Shared fixtures: real SmolLM2, a tiny random Llama, real Redis servers, real folders."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any `import triton`

from kvmw.fingerprint import ModelFingerprint  # noqa: E402
from kvmw.testing.redis_process import HOW_TO, RedisProcess, default_url, host_port, ping  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, converted by `make models`."""
    from kvmw.integrations.hf.models import is_installed, load

    if not is_installed("smollm2"):
        pytest.fail("SmolLM2 is not installed: run `make models` (the Makefile's test target does)")
    return load("smollm2")


@pytest.fixture(scope="session")
def model_path() -> str:
    """The installed SmolLM2 folder (engines load it by path)."""
    from kvmw.integrations.hf.models import is_installed, model_dir

    if not is_installed("smollm2"):
        pytest.fail("SmolLM2 is not installed: run `make models`")
    return str(model_dir("smollm2"))


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


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture
def redis_cluster(tmp_path):
    """Three redis-server processes in cluster mode (no replicas), all slots covered."""
    import shutil
    import subprocess
    import time

    import redis

    if shutil.which("redis-cli") is None:
        pytest.fail(f"redis-cli not found: {HOW_TO}")
    nodes = []
    try:
        for i in range(3):
            d = tmp_path / f"node{i}"
            d.mkdir()
            nodes.append(RedisProcess(port=_cluster_port(), workdir=str(d), extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")).start())
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        for _ in range(100):
            info = redis.Redis(port=nodes[0].port).cluster("info")
            if info.get("cluster_state") == "ok":
                break
            time.sleep(0.1)
        yield f"redis+cluster://127.0.0.1:{nodes[0].port}/0"
    finally:
        for n in nodes:
            n.kill()
