"""`kvmw demo` (`make demo`): a shared document, several questions, TTFT cold vs warm per tier.

SmolLM2 (or Qwen-0.5B) reads a long document of essay text followed by a
question, through the `KVMW` generate hook:

1. the first question is cold: the store is empty, the whole prompt is prefilled
   and the document's chunks are stored (CPU, then written through to disk and Redis);
2. the next questions are warm from the CPU tier: only the question is computed;
3. a new process (a restart) answers them with only the disk tier;
4. another new process answers them with only Redis.

It prints TTFT per question and tier, the speedup over cold, the bytes stored
and the compression ratio, and every answer next to plain `generate`'s answer
(identical for lossless codecs).

5. RAG: three documents, each holding one fact, are stored once; three
   questions ask over them in a different document order each time (so every
   document sits at a new offset), answered by full prefill, full reuse,
   CacheBlend, EPIC and query-aware selection (`hook.generate_rag`): TTFT and
   answers per strategy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a phase runs: `kvmw demo --help` starts without it
    import torch

QUESTIONS = [
    "What is the main idea of the text above?",
    "Who is the text written for?",
    "Name one thing the author believes.",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", choices=["smollm2", "qwen0.5b"], help="installed model (python -m kvmw.integrations.hf.models install NAME)")
    p.add_argument("--tokens", type=int, default=1536, help="document tokens shared by every question")
    p.add_argument("--codec", default="none", help='codec spec, e.g. "none", "int8", "kivi4+zstd"')
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per stored chunk")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer tokens per question")
    p.add_argument("--rag-doc-tokens", type=int, default=384, help="tokens per RAG document (0: no RAG part)")
    p.add_argument("--phase", default="", help=argparse.SUPPRESS)  # internal: a restarted process
    p.add_argument("--state", default="", help=argparse.SUPPRESS)


class FirstTokenTimer:
    """A `generate` streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self._calls = 0

    def put(self, value: Any) -> None:
        self._calls += 1
        if self._calls == 2 and self.first is None:  # call 1 is the prompt itself
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def _step(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _prompts(tok: Any, tokens: int) -> list[torch.Tensor]:
    import torch

    from kvmw.text_data import essay_text

    doc = tok(essay_text(tokens * 8), return_tensors="pt").input_ids[:, :tokens]
    out = []
    for q in QUESTIONS:
        suffix = tok(f"\n\nQuestion: {q}\nAnswer:", return_tensors="pt", add_special_tokens=False).input_ids
        out.append(torch.cat([doc, suffix], dim=1))  # same document tokens: a shared prefix
    return out


def _ask(hook_or_model: Any, ids: torch.Tensor, tok: Any, max_new: int) -> dict[str, Any]:
    import torch

    timer = FirstTokenTimer()
    with torch.inference_mode():
        out = hook_or_model.generate(ids, max_new_tokens=max_new, do_sample=False, streamer=timer)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return {"ttft_s": timer.first, "answer": answer}


def _run_phase(args: argparse.Namespace) -> dict[str, Any]:
    """One process's share of the demo; returns its measurements."""
    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.integrations.hf.models import load

    state = json.loads(args.state)
    model, tok = load(args.model)
    prompts = _prompts(tok, args.tokens)
    config = KVMWConfig.load(chunk_size=args.chunk_size, codec=args.codec, disk_path=state["disk"],
                             redis_prefix=state["redis_prefix"])
    rows: list[dict[str, Any]] = []
    if args.phase == "first":
        _step("plain generate (no kvmw) for the reference answers")
        baseline = [_ask(model, ids, tok, args.max_new_tokens) for ids in prompts]
        hook = KVMW(model, tok, config.replace(tiers=["cpu", "disk", "redis"]))
        for i, ids in enumerate(prompts):
            _step(f"question {i + 1} through kvmw ({'cold' if i == 0 else 'warm, CPU tier'})")
            before = hook.stats()["tokens_reused"]
            r = _ask(hook, ids, tok, args.max_new_tokens)
            rows.append({**r, "tier": "none (cold)" if i == 0 else "cpu", "question": i,
                         "reused": hook.stats()["tokens_reused"] - before,
                         "baseline": baseline[i]["answer"], "baseline_ttft_s": baseline[i]["ttft_s"]})
        hook.store.flush(120)
        stats = hook.store.stats()["tiers"]
        hook.close()
        return {"rows": rows, "stored": {t: s["bytes_written"] for t, s in stats.items()},
                "chunks": hook.stats()["chunks_stored"]}
    tier = args.phase
    hook = KVMW(model, tok, config.replace(tiers=[tier]))
    for i, ids in enumerate(prompts):
        _step(f"restarted process: question {i + 1}, {tier} tier only")
        before = hook.stats()["tokens_reused"]
        r = _ask(hook, ids, tok, args.max_new_tokens)
        rows.append({**r, "tier": tier, "question": i, "reused": hook.stats()["tokens_reused"] - before})
    hook.close()
    return {"rows": rows}


RAG_QUESTIONS = ([0], [2], [1, 2])  # which documents' facts each question asks for
RAG_STRATEGIES = (("full_prefill", 1.0), ("full_reuse", 0.0), ("cacheblend", 0.15), ("epic", 0.15),
                  ("query_aware", 0.15))


def _rag_phase(args: argparse.Namespace) -> dict[str, Any]:
    import random

    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.integrations.hf.models import load
    from kvmw.text_data import RAG_PREAMBLE, code_question, fact_documents

    model, tok = load(args.model)
    hook = KVMW(model, tok, KVMWConfig.load(codec=args.codec, tiers=["cpu"]))
    docs, places, codes = fact_documents(tok, 3, args.rag_doc_tokens, random.Random(0))
    rows = []
    for qi, asked in enumerate(RAG_QUESTIONS):
        order = [(qi + j) % len(docs) for j in range(len(docs))]
        question = code_question(tok, [places[a] for a in asked])
        for strategy, ratio in RAG_STRATEGIES:
            _step(f"RAG question {qi + 1}: {strategy}")
            res = hook.generate_rag([docs[j] for j in order], question, strategy=strategy, recompute_ratio=ratio,
                                    preamble=RAG_PREAMBLE, max_new_tokens=16, do_sample=False)
            rows.append({"question": qi, "order": order, "strategy": strategy, "ratio": ratio,
                         "prompt_tokens": res.prompt_tokens, "recomputed": res.recomputed_tokens,
                         "loaded": sum(res.documents_loaded.values()), "prefilled": res.documents_prefilled,
                         "ttft_s": res.timings["ttft"], "answer": res.text.strip(),
                         "right": all(codes[a] in res.text for a in asked)})
    hook.close()
    return {"rows": rows, "facts": dict(zip(places, codes))}


def _print_rag(rag: dict[str, Any]) -> None:
    from kvmw.bench.common import print_table

    rows, full = [], {}
    for r in rag["rows"]:
        if r["strategy"] == "full_prefill":
            full[r["question"]] = r["ttft_s"]
        base = full[r["question"]]
        docs = "-" if r["strategy"] == "full_prefill" else f"{r['loaded']} cached, {r['prefilled']} new"
        rows.append([r["question"] + 1, ",".join(str(d + 1) for d in r["order"]), r["strategy"], r["ratio"], docs,
                     f"{r['recomputed']}/{r['prompt_tokens']}", f"{r['ttft_s'] * 1e3:.0f}",
                     f"{r['ttft_s'] / base:.2f}", "yes" if r["right"] else "no", _short(r["answer"], 48)])
    print()
    print("RAG: 3 documents stored once, reused in a new order (new offsets) for every question; facts: "
          + ", ".join(f"{p} {c}" for p, c in rag["facts"].items()))
    print_table(["question", "doc order", "strategy", "ratio", "documents", "recomputed", "TTFT ms",
                 "x full prefill", "right", "answer"], rows)


def run(args: argparse.Namespace) -> int:
    from kvmw.memory import tune_allocator

    tune_allocator()
    if args.phase:
        print(json.dumps(_rag_phase(args) if args.phase == "rag" else _run_phase(args)))
        return 0
    from kvmw.bench.common import print_table

    with tempfile.TemporaryDirectory(prefix="kvmw-demo-") as tmp:
        state = json.dumps({"disk": tmp, "redis_prefix": f"kvmw-demo:{uuid.uuid4().hex[:8]}:"})
        results = {}
        phases = ("first", "disk", "redis") + (("rag",) if args.rag_doc_tokens else ())
        for phase in phases:
            cmd = [sys.executable, "-m", "kvmw", "demo", "--model", args.model, "--tokens", str(args.tokens),
                   "--codec", args.codec, "--chunk-size", str(args.chunk_size),
                   "--rag-doc-tokens", str(args.rag_doc_tokens),
                   "--max-new-tokens", str(args.max_new_tokens), "--phase", phase, "--state", state]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                print(f"[demo] the {phase} phase failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        _cleanup_redis(json.loads(state)["redis_prefix"])

    first = results["first"]
    baseline = {r["question"]: r["baseline"] for r in first["rows"]}
    cold = first["rows"][0]["ttft_s"]
    rows, same_all = [], True
    for phase in ("first", "disk", "redis"):
        for r in results[phase]["rows"]:
            same = r["answer"] == baseline[r["question"]]
            same_all &= same
            rows.append([r["tier"], r["question"] + 1, r["reused"], f"{r['ttft_s'] * 1e3:.0f}",
                         f"{cold / r['ttft_s']:.1f}x", "yes" if same else "NO", _short(r["answer"])])
    kv_bytes = _kv_bytes(args)
    stored = first["stored"]
    print()
    print(f"model {args.model}, document {args.tokens} tokens shared by {len(QUESTIONS)} questions, "
          f"chunks of {args.chunk_size}, codec {args.codec}")
    print(f"plain generate TTFT (no kvmw): {first['rows'][0]['baseline_ttft_s'] * 1e3:.0f} ms; "
          f"kvmw cold TTFT: {cold * 1e3:.0f} ms")
    print_table(["tier", "question", "tokens reused", "TTFT ms", "speedup vs cold", "same answer", "answer"],
                rows)
    per_tier = ", ".join(f"{t} {b / 2**20:.1f} MiB" for t, b in stored.items())
    print(f"stored: {first['chunks']} chunks; bytes written per tier: {per_tier}; "
          f"KV of those chunks {kv_bytes / 2**20:.1f} MiB in the model's dtype -> "
          f"compression ratio {kv_bytes / max(stored.get('cpu', 1), 1):.2f}x")
    if "rag" in results:
        _print_rag(results["rag"])
    from kvmw.quantizers import make_codec

    if make_codec(args.codec).is_lossless and not same_all:
        print("[demo] a lossless codec changed an answer: this is a bug", file=sys.stderr)
        return 1
    return 0


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _kv_bytes(args: argparse.Namespace) -> int:
    from kvmw.integrations.hf.models import model_dir

    config = json.loads((model_dir(args.model) / "config.json").read_text())
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    full_chunks = args.tokens // args.chunk_size * args.chunk_size
    return config["num_hidden_layers"] * 2 * heads * head_dim * full_chunks * 4  # fp32 models here


def _cleanup_redis(prefix: str) -> None:
    try:
        import redis

        from kvmw.testing.redis_process import default_url

        client = redis.Redis.from_url(default_url(), socket_timeout=2)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except Exception:  # cleanup is best effort; the demo's keys are namespaced anyway
        pass
