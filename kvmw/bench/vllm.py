"""`kvmw bench vllm`: vLLM time-to-first-token cold vs warm from kvmw's tiers, beside vLLM's own prefix cache.

Every engine is vLLM on this machine (CPU build, float32, block size 32,
eager, one process), in its own child process (`kvmw.testing.vllm_engine`),
started before its timings so start-up stays out of them. TTFT is the wall time
of ``generate(max_tokens=1)``; the prompt is a document of ``--tokens`` tokens of
essay text plus a question, and each repeat uses a fresh document of the same
length, so a cold figure is never answered by a cache.

- baseline: vLLM with no connector and its prefix cache off (the cold figure
  every ratio divides by: ``cold_s``);
- native_prefix: vLLM's in-memory prefix cache on, the same prompt again (the
  upper bound: its blocks are already in the paged cache);
- kvmw <tier>/<codec>: kvmw's connector with only that tier (cpu, disk or
  redis) and codec (none, int8), vLLM's prefix cache off. Cold: the first request
  (prefill + encode + store); warm: the same prompt again, its document's chunks
  loaded from the tier. Disk runs drop the store's files from the page cache
  before each warm request.

JSON keys: ``vllm.<tier>.<codec>.ttft_ratio`` (warm / baseline cold),
``vllm.native_prefix.ttft_ratio``, with the seconds, tokens reused, and whether
the warm output equals the baseline's (it must for ``none``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import uuid
from typing import Any

from kvmw.bench.common import drop_page_cache, machine, print_table, write_json

QUESTION = "\n\nQuestion: What is the main point of the text above? Answer in one sentence.\nAnswer:"


def _prompts(path: str, tokens: int, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from kvmw.text_data import essay_text

    tok = AutoTokenizer.from_pretrained(path)
    text = tok(essay_text(tokens * 6 * (n + 1)), add_special_tokens=False).input_ids
    q = tok(QUESTION, add_special_tokens=False).input_ids
    return [text[i * tokens:(i + 1) * tokens] + q for i in range(n)]


def _engine_kwargs(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    budget = args.tokens + 256
    return {"max_model_len": budget, "max_num_batched_tokens": budget, **extra}


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvmw.integrations.hf.models import install
    from kvmw.integrations.vllm import kv_transfer_config
    from kvmw.testing.vllm_engine import EngineProcess

    path = str(install(args.model))
    prompts = _prompts(path, args.tokens, args.repeat + 1)
    warmup = prompts[-1][:64]
    out: dict[str, Any] = {}

    print(f"[bench] baseline: vLLM, no connector, no prefix cache ({args.repeat} cold requests)", flush=True)
    with EngineProcess(path, _engine_kwargs(args)) as eng:
        eng.generate([warmup], max_tokens=1)
        colds = []
        for p in prompts[: args.repeat]:
            o, s = eng.timed_generate([p], max_tokens=1)
            colds.append(s)
        ref_out = eng.generate([prompts[0]], max_tokens=args.check_tokens)[0]["tokens"]
    cold = _median(colds)
    out["baseline"] = {"cold_s": cold, "cold_runs_s": colds}

    print("[bench] native prefix cache: vLLM, prefix caching on, same prompt again", flush=True)
    with EngineProcess(path, _engine_kwargs(args, enable_prefix_caching=True)) as eng:
        eng.generate([warmup], max_tokens=1)
        warms, cached = [], 0
        for p in prompts[: args.repeat]:
            eng.timed_generate([p], max_tokens=1)
            o, s = eng.timed_generate([p], max_tokens=1)
            warms.append(s)
            cached = o[0]["cached"]
    native = _median(warms)
    out["native_prefix"] = {"ttft_s": native, "ttft_ratio": native / cold, "cached_tokens": cached}

    with tempfile.TemporaryDirectory(prefix="kvmw-bench-vllm-") as tmp:
        for tier in args.tiers:
            for codec in args.codecs:
                print(f"[bench] kvmw: tier {tier}, codec {codec}", flush=True)
                cfg = kv_transfer_config(chunk_size=args.chunk_size, codec=codec, tiers=[tier],
                                       disk_path=f"{tmp}/{codec}",
                                       redis_prefix=f"kvmw-bench-vllm:{uuid.uuid4().hex[:8]}:")
                with EngineProcess(path, _engine_kwargs(args, kv_transfer_config=cfg)) as eng:
                    eng.generate([warmup], max_tokens=1)
                    colds_k, warms_k, cached = [], [], 0
                    for p in prompts[: args.repeat]:
                        _, s = eng.timed_generate([p], max_tokens=1)
                        colds_k.append(s)
                        eng.call("flush")
                        if tier == "disk":
                            drop_page_cache(f"{tmp}/{codec}")
                        o, s = eng.timed_generate([p], max_tokens=1)
                        warms_k.append(s)
                        cached = o[0]["cached"]
                    check = eng.generate([prompts[0]], max_tokens=args.check_tokens)[0]["tokens"]
                    st = eng.stats()["worker"]
                warm = _median(warms_k)
                agree = sum(a == b for a, b in zip(check, ref_out)) / len(ref_out)
                out.setdefault(tier, {})[codec] = {
                    "ttft_s": warm, "ttft_ratio": warm / cold, "kvmw_cold_s": _median(colds_k),
                    "vs_native": warm / native, "cached_tokens": cached,
                    "identical_output": check == ref_out, "agreement": agree,
                    "load_s_per_request": st["load_seconds"] / max(1, 1 + args.repeat),
                    "bytes_loaded": st["bytes_loaded"],
                }

    _drop_redis_keys("kvmw-bench-vllm:")
    print()
    print(f"vLLM {args.model}: document {args.tokens} tokens + question, chunks of {args.chunk_size}; "
          f"float32, block 32, CPU; median of {args.repeat}")
    rows = [["baseline (no cache)", "-", cold, 1.0, "-", 0, "-"],
            ["vLLM native prefix", "-", native, native / cold, 1.0, out["native_prefix"]["cached_tokens"], "-"]]
    for tier in args.tiers:
        for codec, r in out[tier].items():
            rows.append([f"kvmw {tier}", codec, r["ttft_s"], r["ttft_ratio"], r["vs_native"], r["cached_tokens"],
                         f"{r['agreement']:.2f}{' (identical)' if r['identical_output'] else ''}"])
    print_table(["engine", "codec", "TTFT s", "x cold", "x native", "cached tok",
                 f"agreement ({args.check_tokens} tok)"], rows)
    result = {"vllm": out, "model": args.model, "tokens": args.tokens, "chunk_size": args.chunk_size,
              "machine": machine()}
    write_json(args.json, result)
    return result


def _drop_redis_keys(prefix: str) -> None:
    try:
        import redis

        from kvmw.config import KVMWConfig

        client = redis.Redis.from_url(KVMWConfig.load().redis_url)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except Exception:  # cleanup is best effort
        pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", choices=["smollm2", "qwen0.5b"], help="installed model (python -m kvmw.integrations.hf.models install NAME)")
    p.add_argument("--tokens", type=int, default=2048, help="document tokens before the question")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per stored chunk")
    p.add_argument("--tiers", nargs="+", default=["cpu", "disk", "redis"], help="tiers measured")
    p.add_argument("--codecs", nargs="+", default=["none", "int8"], help="codec specs measured")
    p.add_argument("--repeat", type=int, default=3, help="cold/warm pairs per engine (median)")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared with the baseline")
    p.add_argument("--json", default="", help="write the results here (JSON)")
