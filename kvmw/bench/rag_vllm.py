"""`kvmw bench rag --engine vllm`: the HF bench's RAG tasks answered by vLLM, side by side.

The tasks are `kvmw bench rag`'s (`rag_tasks`: facts in essay excerpts, each
question with its set's documents in its own order). Every engine is vLLM on
this machine (float32, block size 32, eager, one process) in a child process
of its own, started before any timing:

- ``full_prefill``: vLLM without kvmw, prefix caching off: the baseline;
- ``native_prefix``: vLLM's own prefix caching, no kvmw: it can reuse the
  preamble, and a leading document only when an earlier prompt began with it;
- ``full_reuse``, ``query_aware`` (``--query-aware-ratios``), ``epic`` (at the
  ratio that does query-aware's (token, layer) work on the first task, as the HF
  path counts it; plus ``--epic-ratios``) and ``cacheblend`` (``--ratios``):
  kvmw beneath vLLM at its defaults (prefix caching on), documents warm in the
  CPU tier.

Per document set, one warm-up prompt (the set's documents in another order,
another question) runs on every engine first: kvmw computes and stores the
documents, vLLM's prefix cache holds what that prompt gives it. TTFT is the
wall time of ``generate(max_tokens=1)``; the answer is a second, greedy run of
``--steps`` tokens. The HF path (`KVMW.generate_rag`, same documents, same
strategies) answers every task too.

JSON keys (``rag_vllm.<strategy>.<ratio>``): ``ttft_ratio`` (median per task
over full prefill's), ``ttft_s``, ``accuracy`` (every asked code in the answer),
``recomputed`` (tokens the blend ran through every layer, mean), ``hf_agreement``
(share of tasks whose answer line equals the HF path's for that strategy); and
``rag_vllm.hf_agreement`` over every strategy both engines ran.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from kvmw.bench.common import machine, print_table, write_json


def _answer(tok: Any, ids: list[int]) -> str:
    """The answer line of a greedy continuation."""
    return tok.decode(ids, skip_special_tokens=True).strip().split("\n")[0].strip()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvmw.bench.rag import rag_tasks
    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.integrations.hf.models import install, load
    from kvmw.integrations.vllm import kv_transfer_config, rag_request
    from kvmw.storage_tiers import CPUTier, TieredStore
    from kvmw.testing.vllm_engine import EngineProcess
    from kvmw.text_data import RAG_PREAMBLE as PREAMBLE
    from kvmw.text_data import code_question, stand_in_documents

    path = str(install(args.model))
    model, tok = load(args.model)
    layers = len(model.model.layers)
    stand_in = stand_in_documents(tok, args.doc_tokens, args.stand_in_docs)
    tasks = rag_tasks(tok, args.questions, args.docs, args.doc_tokens, args.seed)
    hook = KVMW(model, tok, KVMWConfig.load(env={}), store=TieredStore([CPUTier(8 << 30)]))
    blends: list[tuple[str, float]] = [("full_reuse", 0.0)]
    blends += [("query_aware", r) for r in args.query_aware_ratios] + [("cacheblend", r) for r in args.ratios]
    blends += [("epic", r) for r in args.epic_ratios]
    budget = args.docs * args.doc_tokens + 1024
    common = {"max_model_len": budget, "max_num_batched_tokens": budget}
    print(f"[bench] starting 3 vLLM engines ({args.model})", flush=True)
    engines = {
        "full_prefill": EngineProcess(path, common),
        "native_prefix": EngineProcess(path, {**common, "enable_prefix_caching": True}),
        "kvmw": EngineProcess(path, {**common, "enable_prefix_caching": True, "kv_transfer_config": kv_transfer_config(
            tiers=["cpu"], codec="none", cpu_capacity=8 << 30)}),
    }
    rows: dict[tuple[str, float], dict[str, Any]] = {}
    matched: float | None = None

    def request(task: dict[str, Any], strategy: str, ratio: float) -> Any:
        return rag_request(tok, task["documents"], task["question"], preamble=PREAMBLE, strategy=strategy,
                           recompute_ratio=ratio, stand_in=stand_in)

    def timed(eng: EngineProcess, req: Any, params: bool) -> tuple[float, list[int], dict[str, Any] | None]:
        kw = {"params": [req.kv_transfer_params]} if params else {}
        t0 = time.perf_counter()
        eng.generate([req.prompt_token_ids], max_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        out = eng.generate([req.prompt_token_ids], max_tokens=args.steps, **kw)[0]
        return ttft, out["tokens"], out.get("kv_transfer_params")

    def note(name: str, ratio: float, task: dict[str, Any], ttft: float, base: float, text: str,
             hf_text: str | None, recomputed: float) -> None:
        s = rows.setdefault((name, ratio), {"ttfts": [], "ratios": [], "correct": 0, "agree": [], "recomputed": []})
        s["ttfts"].append(ttft)
        s["ratios"].append(ttft / base)
        s["correct"] += all(a in text for a in task["answers"])
        if hf_text is not None:
            s["agree"].append(text == hf_text)
        s["recomputed"].append(recomputed)

    try:
        warm_set = None
        for i, task in enumerate(tasks):
            if task["set"] != warm_set:  # warm-up: the set's documents in another order, another question
                warm = dict(task, documents=task["documents"][1:] + task["documents"][:1],
                            question=code_question(tok, ["Warm-up"]))
                warm_req = request(warm, "full_reuse", 0.0)
                for name, eng in engines.items():
                    eng.generate([warm_req.prompt_token_ids], max_tokens=1,
                                 params=[warm_req.kv_transfer_params] if name == "kvmw" else None)
                warm_set = task["set"]
            hf = {}
            for strategy, ratio in [("full_prefill", 1.0)] + blends:
                res = hook.generate_rag(task["documents"], task["question"], strategy=strategy, recompute_ratio=ratio,
                                        preamble=PREAMBLE, stand_in=stand_in, max_new_tokens=args.steps,
                                        do_sample=False)
                hf[(strategy, ratio)] = _answer(tok, res.sequences[0, res.prompt_tokens:].tolist())
                if strategy == "query_aware" and matched is None and not args.no_match:
                    cached = sum(len(d) for d in task["documents"])
                    matched = round((res.token_layers / layers - (res.prompt_tokens - cached)) / cached, 3)
                    blends.append(("epic", matched))
                    res = hook.generate_rag(task["documents"], task["question"], strategy="epic",
                                            recompute_ratio=matched, preamble=PREAMBLE, stand_in=stand_in,
                                            max_new_tokens=args.steps, do_sample=False)
                    hf[("epic", matched)] = _answer(tok, res.sequences[0, res.prompt_tokens:].tolist())
            plain = request(task, "full_reuse", 0.0)
            base, ids, _ = timed(engines["full_prefill"], plain, False)
            note("full_prefill", 1.0, task, base, base, _answer(tok, ids), hf[("full_prefill", 1.0)],
                 len(plain.prompt_token_ids))
            ttft, ids, _ = timed(engines["native_prefix"], plain, False)
            note("native_prefix", 1.0, task, ttft, base, _answer(tok, ids), None, float("nan"))
            for strategy, ratio in blends:
                ttft, ids, params = timed(engines["kvmw"], request(task, strategy, ratio), True)
                kvmw = (params or {}).get("kvmw", {})
                note(strategy, ratio, task, ttft, base, _answer(tok, ids), hf.get((strategy, ratio)),
                     kvmw.get("recomputed_tokens", float("nan")))
            right = ", ".join(f"{n} {r:g} {s['correct']}" for (n, r), s in rows.items())
            print(f"[bench] task {i + 1}/{len(tasks)}: {len(plain.prompt_token_ids)} tokens, answers "
                  f"{task['answers']}; right so far: {right}", flush=True)
    finally:
        for eng in engines.values():
            eng.close()
        hook.close()

    n = len(tasks)
    out: dict[str, Any] = {"rag_vllm": {}, "model": args.model, "docs": args.docs, "doc_tokens": args.doc_tokens,
                           "questions": n, "machine": machine()}
    table = []
    full_acc = rows[("full_prefill", 1.0)]["correct"] / n
    agree_all: list[bool] = []
    for (name, ratio), s in rows.items():
        cell = {"ttft_ratio": statistics.median(s["ratios"]), "ttft_s": statistics.mean(s["ttfts"]),
                "accuracy": s["correct"] / n, "recomputed": _mean(s["recomputed"])}
        if s["agree"]:
            cell["hf_agreement"] = sum(s["agree"]) / len(s["agree"])
            agree_all += s["agree"]
        out["rag_vllm"].setdefault(name, {})[f"{ratio:g}"] = cell
        table.append([name, ratio, cell["ttft_s"], cell["ttft_ratio"], cell["accuracy"],
                      cell["accuracy"] / full_acc if full_acc else float("nan"), cell["recomputed"],
                      cell.get("hf_agreement", float("nan"))])
    out["rag_vllm"]["hf_agreement"] = sum(agree_all) / len(agree_all) if agree_all else float("nan")
    print()
    print(f"{args.model} beneath vLLM: {n} questions over {args.docs} documents of {args.doc_tokens} tokens "
          f"(warm in kvmw's CPU tier; vLLM's prefix cache on for native_prefix and kvmw)")
    print_table(["config", "ratio", "TTFT s", "x full prefill (median)", "accuracy", "x full acc", "recomputed",
                 "= HF answer"], table)
    print(f"answers equal to the HF path's, every strategy: {out['rag_vllm']['hf_agreement']:.3f}")
    write_json(args.json, out)
    return out


def _mean(xs: list[float]) -> float:
    """The mean of the figures the engine reported (nan where none was)."""
    xs = [x for x in xs if x == x]
    return statistics.mean(xs) if xs else float("nan")
