"""kvmw beneath vLLM's OpenAI server as users run it: the default multi-process
layout (API server, engine core, worker), vLLM's prefix cache on, requests from
the `openai` client, some of them concurrent; then restarted servers that answer
from the disk tier alone and from Redis alone.

One server for the module (plus the two restarts). The server gets 96 blocks of
32 tokens, so four ~1,000-token contexts do not fit vLLM's own cache together and
their repeats come from kvmw. ``--enforce-eager`` only shortens the start (34 s
against ~110 s with torch.compile on these 2 cores); kvmw's path is the same.
"""

from __future__ import annotations

import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

CS = 128
N_CONTEXTS = 4
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--block-size", "32", "--enforce-eager",
               "--num-gpu-blocks-override", "96", "--enable-prompt-tokens-details"]


@pytest.fixture(scope="module")
def contexts(model_path):
    """Four token-id prompts of 1,000-1,060 tokens (7-8 full chunks each)."""
    from transformers import AutoTokenizer

    from kvmw.text_data import essay_text

    ids = AutoTokenizer.from_pretrained(model_path)(essay_text(60000)).input_ids
    return [ids[3000 * i: 3000 * i + 1000 + 20 * i] for i in range(N_CONTEXTS)]


@pytest.fixture(scope="module")
def served_redis(tmp_path_factory):
    from kvmw.testing.redis_process import RedisProcess

    proc = RedisProcess(workdir=str(tmp_path_factory.mktemp("served-redis"))).start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def kvmw_settings(tmp_path_factory, served_redis):
    return {"chunk_size": CS, "tiers": ["cpu", "disk", "redis"], "redis_url": served_redis.url,
            "disk_path": str(tmp_path_factory.mktemp("served-disk"))}


def _server(model_path, kvmw, tmp_path_factory, name):
    from kvmw.testing.vllm_server import OpenAIServer

    log = tmp_path_factory.mktemp("served-logs") / f"{name}.log"
    return OpenAIServer(model_path, kvmw, SERVER_ARGS, env={"VLLM_SERVER_DEV_MODE": "1"}, log_path=log)


@pytest.fixture(scope="module")
def server(model_path, kvmw_settings, tmp_path_factory):
    srv = _server(model_path, kvmw_settings, tmp_path_factory, "first").start()
    yield srv
    srv.stop()


def _ask(srv, prompt):
    """Greedy completion through the openai client: (text, cached prompt tokens)."""
    from openai import OpenAI

    client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)
    r = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=12,
                                  temperature=0)
    details = r.usage.prompt_tokens_details
    return r.choices[0].text, (details.cached_tokens or 0) if details else 0


def _settled(srv, name, at_least, timeout=10.0):
    """A /metrics counter once it reaches `at_least` (stats arrive with the engine's
    outputs, a step or two after the reply), else its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = srv.metrics().get(name, 0.0)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def _kvmw_counters(srv):
    """A failed assertion's context: kvmw's /metrics lines and its log lines, one per line
    (pytest shortens a dict in an assertion message)."""
    counters = [f"{k} {v}" for k, v in srv.metrics().items() if k.startswith("kvmw:") and "_created" not in k]
    logged = [line for line in srv.log_tail(4000).splitlines() if "kvmw" in line]
    return "\n".join(["", *counters, "-- kvmw log lines:", *logged[-40:]])


def _stored(tier, url, at_least, timeout=60.0):
    """How many records the shared store holds, once it holds `at_least` (or at the timeout)."""
    from kvmw.storage_tiers.redis_tier import RedisTier
    from kvmw.storage_tiers.server_tier import ServerTier

    client = (ServerTier if tier == "server" else RedisTier)(url)
    deadline = time.monotonic() + timeout
    while True:
        n = len(list(client.entries()))
        if n >= at_least or time.monotonic() > deadline:
            client.close()
            return n
        time.sleep(0.2)


def _full_chunks(prompt):
    return (len(prompt) // CS) * CS


@pytest.fixture(scope="module")
def cold_answers(server, contexts):
    """Each context once, one at a time: kvmw has nothing yet, so these are vLLM's own answers."""
    answers = []
    for p in contexts:
        text, cached = _ask(server, p)
        assert cached == 0
        answers.append(text)
    return answers


def test_served_repeats_come_from_kvmw_with_unchanged_answers(server, contexts, cold_answers):
    stored = _settled(server, "kvmw:chunks_stored_total", sum(len(p) // CS for p in contexts))
    assert stored == sum(len(p) // CS for p in contexts)  # every full chunk of every context, once
    assert server.reset_prefix_cache()  # vLLM forgets: every repeat is kvmw's
    before = server.metrics()
    for p, want in zip(contexts, cold_answers):
        text, cached = _ask(server, p)
        assert text == want and cached == _full_chunks(p)
    loaded = _settled(server, "kvmw:tokens_loaded_total",
                      before.get("kvmw:tokens_loaded_total", 0) + sum(map(_full_chunks, contexts)))
    assert loaded - before.get("kvmw:tokens_loaded_total", 0) == sum(map(_full_chunks, contexts))
    after = server.metrics()
    assert after['vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}'] - before[
        'vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}'] == sum(map(_full_chunks, contexts))
    assert after['kvmw:tier_hits_total{tier="cpu"}'] - before.get('kvmw:tier_hits_total{tier="cpu"}', 0) == sum(
        len(p) // CS for p in contexts)
    assert after["kvmw:load_failures_total"] == before.get("kvmw:load_failures_total", 0)


def test_served_concurrent_requests_give_the_answers_of_one_at_a_time(server, contexts, cold_answers):
    """All four at once: vLLM's 96 blocks cannot hold them together, so some prefixes come
    from vLLM's cache, some from kvmw, some split between the two."""
    with ThreadPoolExecutor(len(contexts)) as pool:
        got = list(pool.map(lambda p: _ask(server, p), contexts))
    assert [text for text, _ in got] == cold_answers
    assert all(cached >= _full_chunks(p) for p, (_, cached) in zip(contexts, got))


# ---- RAG blending through the OpenAI API ----------------------------------------------------------
@pytest.fixture(scope="module")
def rag(model_path):
    """Three ~230-token documents and the served prompt built from them."""
    from transformers import AutoTokenizer

    from kvmw.integrations.vllm import rag_request
    from kvmw.text_data import essay_text

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(essay_text(60000), add_special_tokens=False).input_ids
    docs = [tok.decode(ids[11000 + 300 * i: 11000 + 300 * i + 230]).strip() + "\n" for i in range(3)]
    return tok, docs, lambda **kw: rag_request(tok, docs, "\nQuestion: what is the second document about?\nAnswer:",
                                               preamble="Read the documents below.\n", **kw)


def _complete(srv, prompt, params=None):
    from openai import OpenAI

    client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)
    r = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=12,
                                  temperature=0, extra_body={"kv_transfer_params": params} if params else None)
    return r.choices[0].text, (r.model_extra or {}).get("kv_transfer_params")


def test_served_rag_requests_reuse_their_documents_and_answer_as_vllm(server, rag):
    """`/v1/completions` with kv_transfer_params: the first request computes and stores the
    documents, a repeat (vLLM's cache reset) reuses all three; at ratio 1.0 the answer is
    vLLM's own, and the response says what kvmw did."""
    _, _, build = rag
    req = build(recompute_ratio=1.0)
    plain, _ = _complete(server, req.prompt_token_ids)
    cold, cold_params = _complete(server, req.prompt_token_ids, req.kv_transfer_params)
    assert cold == plain
    assert cold_params["kvmw"]["documents_reused"] == 0 and cold_params["kvmw"]["documents_computed"] == 3
    assert server.reset_prefix_cache()
    warm, params = _complete(server, req.prompt_token_ids, req.kv_transfer_params)
    assert warm == plain
    assert params["kvmw"]["documents_reused"] == 3 and params["kvmw"]["reused_tokens"] == req.spans[-1][1]
    assert sum(params["kvmw"]["documents_loaded"].values()) == 3
    assert params["kvmw"]["recomputed_tokens"] == req.spans[-1][1]
    assert _settled(server, "kvmw:blend_documents_loaded_total", 3) >= 3
    # the same documents reordered under another question: reused at their new offsets
    qa = build(recompute_ratio=0.15)
    assert server.reset_prefix_cache()
    _, params = _complete(server, qa.prompt_token_ids, qa.kv_transfer_params)
    assert params["kvmw"]["documents_reused"] == 3 and params["kvmw"]["strategy"] == "query_aware"


def test_the_readmes_served_rag_script_reuses_its_documents_at_new_offsets(server, tmp_path):
    import os
    import re
    import subprocess
    import sys

    from tests.test_readme import SCRIPTS

    script = tmp_path / "served_rag.py"
    script.write_text(SCRIPTS["served_rag.py"])
    proc = subprocess.run([sys.executable, str(script)], env={**os.environ, "VLLM_URL": server.url + "/v1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [int(n) for n in re.findall(r"^documents reused: (\d+):", proc.stdout, flags=re.M)] == [0, 2]


def test_served_chat_requests_name_their_documents_as_text(server, rag):
    """`/v1/chat/completions`: the chat template wraps the documents; the request names them
    as texts and the connector finds their tokens in the templated prompt."""
    from openai import OpenAI

    _, docs, _ = rag
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    content = "Read the documents below.\n" + "".join(docs) + "\nWhat is the second document about?"
    params = {"kvmw": {"documents": docs, "recompute_ratio": 0.15}}
    answers = []
    for _ in range(2):
        assert server.reset_prefix_cache()
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                           max_tokens=12, temperature=0, extra_body={"kv_transfer_params": params})
        answers.append((r.choices[0].message.content, (r.model_extra or {}).get("kv_transfer_params")))
    (_, first), (_, second) = answers
    assert first["kvmw"]["documents"] == 3
    assert second["kvmw"]["documents_reused"] == 3


@pytest.mark.parametrize("tier", ["disk", "redis"])
def test_a_restarted_server_answers_from_one_lower_tier(server, model_path, kvmw_settings, tmp_path_factory,
                                                        contexts, cold_answers, tier, rag):
    """A new server whose only tiers are its (empty) CPU tier and `tier`: every full
    chunk of every context comes from `tier`, answers unchanged. RAG documents stored by
    the first server: reused from the disk at once; from Redis (a remote tier, never read
    on a step) read into memory in the background and reused by the next prompt."""
    server.stop()  # its worker flushes the lower-tier writes on the way out
    settings = {**kvmw_settings, "tiers": ["cpu", tier]}
    with _server(model_path, settings, tmp_path_factory, f"restart-{tier}") as again:
        for p, want in zip(contexts, cold_answers):
            text, cached = _ask(again, p)
            assert text == want and cached == _full_chunks(p)
        chunks = sum(len(p) // CS for p in contexts)
        assert _settled(again, f'kvmw:tier_hits_total{{tier="{tier}"}}', chunks) == chunks
        m = again.metrics()
        assert m["kvmw:tokens_loaded_total"] == sum(map(_full_chunks, contexts))
        assert m["kvmw:chunks_stored_total"] == 0  # nothing recomputed, nothing stored again
        req = rag[2](recompute_ratio=0.15)
        _, first = _complete(again, req.prompt_token_ids, req.kv_transfer_params)
        assert first["kvmw"].get("documents_computed", 0) == 0  # found, not computed again
        if tier == "disk":
            assert first["kvmw"]["documents_reused"] == 3
            return
        assert first["kvmw"]["documents_reused"] == 0
        deadline = time.monotonic() + 30
        while True:  # the documents arrive in memory off the step
            assert again.reset_prefix_cache()
            _, later = _complete(again, req.prompt_token_ids, req.kv_transfer_params)
            if later["kvmw"]["documents_reused"] == 3 or time.monotonic() > deadline:
                break
        assert later["kvmw"]["documents_reused"] == 3 and later["kvmw"]["documents_loaded"] == {"cpu": 3}


@pytest.mark.parametrize("shared", ["server", "redis"])
def test_two_servers_on_one_store_hit_what_the_other_stored(server, model_path, contexts, cold_answers,
                                                           tmp_path_factory, shared):
    """Two vLLM servers (three processes each) over one `kvmw serve` (the `server` tier) or
    one Redis, beneath CPU tiers that hold about two of the four contexts. What the first
    computed, the second loads, answers unchanged; those loads are asynchronous (the
    chunks are remote). The first server's CPU tier evicted its first context: its
    worker reported that, so asked again it is read from the shared store off the step."""
    from kvmw.testing.redis_process import RedisProcess
    from tests.test_server import ServerProcess

    server.stop()
    if shared == "server":
        store = ServerProcess(tmp_path_factory.mktemp("shared-kvmw-serve") / "disk").start()
        settings = {"tiers": ["cpu", "server"], "server_url": store.url}
    else:
        store = RedisProcess(workdir=str(tmp_path_factory.mktemp("shared-redis"))).start()
        settings = {"tiers": ["cpu", "redis"], "redis_url": store.url}
    per_chunk = 30 * 2 * 3 * 64 * 4 * CS  # SmolLM2 in fp32: 30 layers, 3 KV heads of 64
    # lookup_timeout 1 s, not the default 0.1 s: this test is about what is shared; with six
    # vLLM processes on 2 cores the scheduler's lookup thread can wait past 0.1 s for a core
    # (a fresh-clone run answered one request by recomputing, correctly). The budget itself
    # is held by test_vllm_connector's lookup tests.
    settings.update(chunk_size=CS, cpu_capacity=per_chunk * 17, lookup_timeout=1.0)
    first, second = (_server(model_path, settings, tmp_path_factory, f"{shared}-{n}") for n in ("a", "b"))
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: s.start(), (first, second)))
        chunks = sum(len(p) // CS for p in contexts)
        for p, want in zip(contexts, cold_answers):
            assert _ask(first, p) == (want, 0)
        # the first server's worker writes to the shared store in the background, off its
        # steps; asked of the store itself (an idle engine reports no stats: vLLM collects
        # them with a step's outputs)
        assert _stored(shared, store.url, chunks) == chunks
        for p, want in zip(contexts, cold_answers):
            assert _ask(second, p) == (want, _full_chunks(p)), _kvmw_counters(second)
        assert _settled(second, f'kvmw:tier_hits_total{{tier="{shared}"}}', chunks) == chunks
        m = second.metrics()
        assert m["kvmw:async_loads_total"] == len(contexts)
        assert m["kvmw:chunks_stored_total"] == 0 and m["kvmw:load_failures_total"] == 0
        before = first.metrics()
        assert before["kvmw:async_loads_total"] == 0  # nothing was remote-only for it yet
        assert first.reset_prefix_cache()
        assert _ask(first, contexts[0]) == (cold_answers[0], _full_chunks(contexts[0]))
        assert _settled(first, "kvmw:async_loads_total", 1) == 1
        n0 = len(contexts[0]) // CS
        assert _settled(first, f'kvmw:tier_hits_total{{tier="{shared}"}}', n0) == n0
        assert first.metrics()["kvmw:load_failures_total"] == 0
    finally:
        first.stop()
        second.stop()
        store.kill() if shared == "redis" else store.stop()

