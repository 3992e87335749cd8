"""`kvmw bench serve`: vLLM's OpenAI server under load, with and without kvmw, side by side.

Each configuration is a real server process (`OpenAIServer`: vLLM's default
three-process layout, prefix caching on unless named off), started before its
timings. The load generator is this process: ``--users`` users, each with its
own context of ``--context-tokens`` tokens of essay text, ask ``--rounds``
questions over it; round r of every user goes before round r + 1, so a user's
repeat comes after every other user's context passed through vLLM's cache. At
most ``--concurrency`` requests are in flight. TTFT is the time to the first
streamed token, measured by the client.

vLLM's KV memory is ``--blocks`` blocks of 32 tokens (``--num-gpu-blocks-override``):
by default a third of the users' contexts together, so vLLM's own prefix cache
must evict and a repeat finds its context gone; the ``fits_*`` rows give vLLM
room for all of them (there kvmw must not slow vLLM down).

Configurations: ``no_cache`` (vLLM, prefix caching off, no kvmw), ``native``
(vLLM's prefix cache), ``kvmw_cpu`` / ``kvmw_disk`` / ``kvmw_redis`` (kvmw
beneath vLLM's cache, that tier alone; Redis is a private redis-server), and
``kvmw_int8`` (CPU tier, int8 codec); ``fits_native`` and ``fits_kvmw_cpu``;
``kvmw_shared``: two servers over one `kvmw serve` (each a CPU tier above the
``server`` tier), the first answering round 0 (every context computed once),
the second the later rounds: its figures and hit rate are the second engine's,
every one of its requests a repeat of what the other engine stored.
JSON keys ``serve.<config>.{ttft_mean_s, ttft_p50_s, ttft_p90_s, rps,
hit_rate}``, where hit_rate is the share of the repeats' prompt tokens that were
not recomputed (vLLM's own hits plus kvmw's), ``kvmw_tokens`` the share kvmw
served, and ``serve.kvmw_cpu.{ttft,rps}_ratio_vs_native`` (also for the other
kvmw rows and ``fits_kvmw_cpu`` against ``fits_native``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvmw.bench.common import machine, print_table, write_json

BLOCK = 32
CONFIGS = ["no_cache", "native", "kvmw_cpu", "kvmw_disk", "kvmw_redis", "kvmw_int8", "fits_native", "fits_kvmw_cpu",
           "kvmw_shared"]
QUESTIONS = ["What is the main point of the text above?", "Which example does the author give first?",
             "What does the author conclude?", "Who is the text written for?", "What is the tone of the text?",
             "Name one claim the author makes."]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="installed model name")
    p.add_argument("--users", type=int, default=6, help="users, each with a context of its own")
    p.add_argument("--rounds", type=int, default=3, help="questions per user")
    p.add_argument("--context-tokens", type=int, default=2048, help="tokens of each user's context")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    p.add_argument("--blocks", type=int, default=0,
                   help="vLLM's KV blocks of 32 tokens (default: a third of all contexts)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per answer")
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS, help="rows to run")
    p.add_argument("--compile", action="store_true", help="leave torch.compile on (start ~110 s instead of ~35 s)")
    p.add_argument("--json", default=None, help="write the results here")


def _contexts(path: str, users: int, tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    from transformers import AutoTokenizer

    from kvmw.text_data import essay_text

    tok = AutoTokenizer.from_pretrained(path)
    text = tok(essay_text(tokens * 6 * (users + 1)), add_special_tokens=False).input_ids
    contexts = [text[i * tokens:(i + 1) * tokens] for i in range(users)]
    questions = [tok(f"\n\nQuestion: {q}\nAnswer:", add_special_tokens=False).input_ids for q in QUESTIONS]
    return contexts, questions


def _server_args(args: argparse.Namespace, blocks: int, prefix_caching: bool) -> list[str]:
    out = ["--dtype", "float32", "--max-model-len", str(args.context_tokens + 256), "--block-size", str(BLOCK),
           "--num-gpu-blocks-override", str(blocks), "--enable-prompt-tokens-details",
           "--max-num-seqs", str(max(args.concurrency, 1))]
    if not args.compile:
        out.append("--enforce-eager")
    if not prefix_caching:
        out.append("--no-enable-prefix-caching")
    return out


def _kvmw_settings(config: str, disk: str, redis_url: str, server_url: str = "") -> dict[str, Any] | None:
    base = {"chunk_size": 256}
    return {
        "kvmw_shared": {**base, "tiers": ["cpu", "server"], "server_url": server_url},
        "kvmw_cpu": {**base, "tiers": ["cpu"]},
        "fits_kvmw_cpu": {**base, "tiers": ["cpu"]},
        "kvmw_int8": {**base, "tiers": ["cpu"], "codec": "int8"},
        "kvmw_disk": {**base, "tiers": ["disk"], "disk_path": disk},
        "kvmw_redis": {**base, "tiers": ["redis"], "redis_url": redis_url},
    }.get(config)


def _one_request(url: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, int, int]:
    """(TTFT s, prompt tokens, cached prompt tokens) of one streamed greedy completion."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    ttft = None
    usage = None
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            usage = chunk.usage
    if ttft is None:
        ttft = time.perf_counter() - t0
    details = usage.prompt_tokens_details if usage is not None else None
    return ttft, usage.prompt_tokens if usage else len(prompt), (details.cached_tokens or 0) if details else 0


def _drive(url: str, contexts: list[list[int]], questions: list[list[int]], args: argparse.Namespace,
           rounds: range | None = None) -> dict[str, Any]:
    """Rounds `rounds` (default all) of every user; the hit rate counts rounds after the first."""
    from openai import OpenAI

    model = OpenAI(base_url=url + "/v1", api_key="none").models.list().data[0].id
    order = [(r, u) for r in (rounds or range(args.rounds)) for u in range(len(contexts))]
    prompts = [contexts[u] + questions[r % len(questions)] for r, u in order]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(args.concurrency, 1)) as pool:
        results = list(pool.map(lambda p: _one_request(url, model, p, args.max_tokens), prompts))
    wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _, _ in results)
    repeats = [(n, c) for (r, _), (_, n, c) in zip(order, results) if r > 0]
    return {
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "rps": len(results) / wall,
        "hit_rate": sum(c for _, c in repeats) / max(1, sum(n for n, _ in repeats)),
        "requests": len(results),
        "wall_s": wall,
    }


def _kvmw_row(srv: Any) -> dict[str, float]:
    m = srv.metrics()
    prompt_total = m.get("vllm:prompt_tokens_total", 0.0)
    return {"kvmw_tokens": m.get("kvmw:tokens_loaded_total", 0.0) / max(prompt_total, 1.0),
            "load_failures": m.get("kvmw:load_failures_total", 0.0)}


def _shared_row(path: str, contexts: list[list[int]], questions: list[list[int]], args: argparse.Namespace,
                blocks: int, disk: str) -> dict[str, Any]:
    """Two servers on one `kvmw serve`: the first answers round 0, the second the rest."""
    from kvmw.bench.server import start_kvmw_serve
    from kvmw.testing.vllm_server import OpenAIServer

    proc, port = start_kvmw_serve(disk + "/serve", memory_only=False)
    kvmw = _kvmw_settings("kvmw_shared", disk, "", f"kvmw://127.0.0.1:{port}")
    servers = [OpenAIServer(path, kvmw, _server_args(args, blocks, prefix_caching=True), log_path=f"{disk}.{n}.log")
               for n in ("a", "b")]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: s.start(), servers))
        _drive(servers[0].url, contexts, questions, args, range(1))
        deadline = time.monotonic() + 60  # the first engine's saver writes to `kvmw serve` off its steps
        want = len(contexts) * (args.context_tokens // 256)
        while servers[0].metrics().get('kvmw:tier_puts_total{tier="server"}', 0) < want:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        row = _drive(servers[1].url, contexts, questions, args, range(1, max(args.rounds, 2)))
        row.update(_kvmw_row(servers[1]))
        return row
    finally:
        for srv in servers:
            srv.stop()
        proc.terminate()
        proc.wait(30)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvmw.integrations.hf.models import install
    from kvmw.testing.vllm_server import OpenAIServer
    from kvmw.testing.redis_process import RedisProcess

    path = str(install(args.model))
    contexts, questions = _contexts(path, args.users, args.context_tokens)
    per_context = -(-(args.context_tokens + 64) // BLOCK)
    small = args.blocks or max(per_context + 8, per_context * args.users // 3)
    roomy = per_context * args.users + 64 * max(args.concurrency, 1)
    print(f"[kvmw] {args.users} users x {args.rounds} rounds, {args.context_tokens}-token contexts, "
          f"concurrency {args.concurrency}; vLLM holds {small} blocks ({small * BLOCK} tokens) of the "
          f"{per_context * args.users} blocks the contexts take ({roomy} in the fits_* rows)", flush=True)
    out: dict[str, Any] = {"machine": machine(), "users": args.users, "rounds": args.rounds,
                           "context_tokens": args.context_tokens, "concurrency": args.concurrency,
                           "blocks": small, "fits_blocks": roomy, "compile": args.compile}
    rows: dict[str, dict[str, Any]] = {}
    redis = RedisProcess().start() if "kvmw_redis" in args.configs else None
    try:
        for config in args.configs:
            with tempfile.TemporaryDirectory(prefix="kvmw-bench-serve-") as disk:
                blocks = roomy if config.startswith("fits_") else small
                if config == "kvmw_shared":
                    print(f"[kvmw] {config}: starting kvmw serve and two vLLM servers", flush=True)
                    rows[config] = row = _shared_row(path, contexts, questions, args, blocks, disk)
                    print(f"[kvmw] {config}: second engine TTFT mean {row['ttft_mean_s']:.3f} s, "
                          f"{row['rps']:.2f} req/s, hit rate {row['hit_rate']:.2f}", flush=True)
                    continue
                kvmw = _kvmw_settings(config, disk, redis.url if redis else "")
                srv = OpenAIServer(path, kvmw, _server_args(args, blocks, prefix_caching=config != "no_cache"),
                                   log_path=f"{disk}.log")
                print(f"[kvmw] {config}: starting vLLM's server", flush=True)
                with srv:
                    rows[config] = row = _drive(srv.url, contexts, questions, args)
                    if kvmw is not None:
                        row.update(_kvmw_row(srv))
                print(f"[kvmw] {config}: TTFT mean {row['ttft_mean_s']:.3f} s, p90 {row['ttft_p90_s']:.3f} s, "
                      f"{row['rps']:.2f} req/s, hit rate {row['hit_rate']:.2f}", flush=True)
    finally:
        if redis is not None:
            redis.kill()
    for config, row in rows.items():
        base = "fits_native" if config.startswith("fits_") else "native"
        if config.startswith(("kvmw", "fits_kvmw")) and base in rows:
            row["ttft_ratio_vs_native"] = row["ttft_mean_s"] / rows[base]["ttft_mean_s"]
            row["rps_ratio_vs_native"] = row["rps"] / rows[base]["rps"]
    out["serve"] = rows
    headers = ["config", "TTFT mean s", "p50 s", "p90 s", "req/s", "hit rate", "kvmw share", "TTFT x native",
               "rps x native"]
    print_table(headers, [[c, r["ttft_mean_s"], r["ttft_p50_s"], r["ttft_p90_s"], r["rps"], r["hit_rate"],
                           r.get("kvmw_tokens", "-"), r.get("ttft_ratio_vs_native", "-"),
                           r.get("rps_ratio_vs_native", "-")] for c, r in rows.items()])
    write_json(args.json, out)
    return out
