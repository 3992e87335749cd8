"""`kvmw bench rag`: RAG answers from separately cached documents, per blending strategy
(``--engine vllm``: the same tasks beneath vLLM, `kvmw.bench.rag_vllm`).

Tasks (fixed seed): `--questions` questions over sets of `--docs` essay excerpts
of `--doc-tokens` tokens, each holding one fact ("The access code for the
<place> office is <number>."), the other documents being distractors. Four
questions share a set; each gets the documents in its own order (the asked
document rotating through every position, first to last), so the cached
documents are reused at other offsets; every third question asks for the codes
of two documents. Per set the documents are stored once (CPU tier), then per
question every strategy answers: full prefill (the baseline), full reuse,
CacheBlend at each `--ratios` (none: no CacheBlend), EPIC at the ratio that
does the same prefill work as each CacheBlend ratio ((token, layer) pairs, fixed
at the first task) plus any `--epic-ratios`, and query-aware selection at `--query-aware-ratios`.
With `--document-context stand_in` documents are computed after the preamble and
a stand-in: `--stand-in-docs` other essay excerpts, formatted as the documents
are and holding no fact, as a RAG application would pick documents of its
corpus. Reported per strategy and ratio:
- `ttft_ratio`: time to first token (documents warm in the CPU tier) over full
  prefill's, summed over tasks; `ttft_ratio_median`: the median of the per-task
  ratios (robust to a process paused mid-measurement on a shared machine);
  `work`: (token, layer) pairs computed over full prefill's;
- `accuracy`: share of tasks whose greedy answer holds every asked code;
- `agreement`: greedy agreement with full prefill over `--steps` steps,
  teacher-forced on full prefill's own continuation; `kl`: KL(full || strategy)
  of the first answer token, mean over tasks;
- `recomputed`: tokens recomputed in the last layers per prompt (mean).
"""

from __future__ import annotations

import argparse
import random
import statistics
from typing import Any

import torch
import torch.nn.functional as F

from kvmw.bench import plots
from kvmw.blending import CacheBlend
from kvmw.bench.common import machine, print_table, write_json
from kvmw.text_data import RAG_PREAMBLE as PREAMBLE
from kvmw.text_data import STAND_IN_ESSAYS, code_question, fact_documents, stand_in_documents


def rag_tasks(tok: Any, n: int, docs: int, doc_tokens: int, seed: int = 0,
              per_set: int = 4) -> list[dict[str, Any]]:
    """`n` questions (fixed seed) over `ceil(n / per_set)` sets of `docs` documents, each
    document holding one fact. Every question gets its set's documents in its own order
    (the asked document at a rotating position: first, right after the preamble, to
    last), so the same cached documents are reused at other offsets; every third
    question asks for the codes of two documents."""
    rng = random.Random(seed)
    tasks: list[dict[str, Any]] = []
    for s in range((n + per_set - 1) // per_set):
        documents, places, codes = fact_documents(tok, docs, doc_tokens, rng, start=s * docs * 2)
        for _ in range(min(per_set, n - len(tasks))):
            i = len(tasks)
            asked = rng.sample(range(docs), 2 if i % 3 == 2 else 1)
            order = list(range(docs))
            rng.shuffle(order)
            if len(asked) == 1:  # the answer document at position i mod docs
                j = order.index(asked[0])
                order[j], order[i % docs] = order[i % docs], order[j]
            tasks.append({"set": s, "documents": [documents[j] for j in order],
                          "question": code_question(tok, [places[a] for a in asked]),
                          "answers": [codes[a] for a in asked],
                          "positions": sorted(order.index(a) for a in asked)})
    return tasks


@torch.inference_mode()
def _teacher_forced(model: Any, result: Any, continuation: torch.Tensor) -> torch.Tensor:
    """Log-probs at each step of `continuation` given the result's prompt cache."""
    cache, n = result.cache, result.prompt_tokens
    cache.crop(-(cache.get_seq_length() - (n - 1)))  # keep the prompt but its last token
    feed = torch.cat([result.sequences[0, n - 1:n], continuation[:-1]])
    return F.log_softmax(model(feed[None], past_key_values=cache).logits[0].float(), dim=-1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.engine == "vllm":
        from kvmw.bench.rag_vllm import run as run_vllm

        return run_vllm(args)
    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.integrations.hf.models import load
    from kvmw.memory import tune_allocator
    from kvmw.storage_tiers import CPUTier, TieredStore

    tune_allocator()
    model, tok = load(args.model)
    stand_in = stand_in_documents(tok, args.doc_tokens, args.stand_in_docs)  # of the corpus, as a RAG app would pick
    tasks = rag_tasks(tok, args.questions, args.docs, args.doc_tokens, args.seed)
    hook = KVMW(model, tok, KVMWConfig.load(env={}, codec=args.codec), store=TieredStore([CPUTier(8 << 30)]))
    layers = len(model.model.layers)
    configs: list[tuple[str, float]] = [("full_prefill", 1.0), ("full_reuse", 0.0)]
    configs += [("cacheblend", r) for r in args.ratios] + [("epic", r) for r in args.epic_ratios]
    configs += [("query_aware", r) for r in args.query_aware_ratios]
    matched: dict[float, float] = {}  # cacheblend ratio -> EPIC ratio of the same prefill work
    gen = dict(max_new_tokens=args.steps, do_sample=False)
    sums: dict[tuple[str, float], dict[str, float]] = {}
    stored_set = None
    for i, task in enumerate(tasks):
        docs = task["documents"]  # this question's order of its set's documents
        if task["set"] != stored_set:  # store the set's documents once (CPU tier)
            hook.generate_rag(docs, task["question"], strategy="full_reuse", preamble=PREAMBLE, max_new_tokens=1,
                              document_context=args.document_context, stand_in=stand_in)
            stored_set = task["set"]
        ref_cont, ref_logp = None, None
        todo = list(configs)
        while todo:
            strategy, ratio = todo.pop(0)
            how: Any = strategy
            if strategy == "cacheblend" and args.check_layer is not None:
                how = CacheBlend(ratio, check_layer=args.check_layer)
            res = hook.generate_rag(docs, task["question"], strategy=how, recompute_ratio=ratio,
                                    preamble=PREAMBLE, keep_cache=True,
                                    document_context=args.document_context, stand_in=stand_in, **gen)
            if strategy == "cacheblend" and ratio in args.ratios and not args.no_match:
                if ratio not in matched:  # EPIC's head share for the same (token, layer) work, fixed at task 1
                    cached = sum(len(d) for d in docs)
                    matched[ratio] = round((res.token_layers / layers - (res.prompt_tokens - cached)) / cached, 3)
                    if ("epic", matched[ratio]) not in configs:
                        configs.append(("epic", matched[ratio]))
                todo.insert(0, ("epic", matched[ratio]))  # EPIC right beside it
                todo = [c for j, c in enumerate(todo) if c not in todo[:j]]
            cont = res.sequences[0, res.prompt_tokens:]
            logp = _teacher_forced(model, res, cont if ref_cont is None else ref_cont)
            if ref_cont is None:
                ref_cont, ref_logp = cont, logp
            s = sums.setdefault((strategy, ratio), {"ttft": 0.0, "correct": 0, "agree": 0.0, "kl": 0.0,
                                                    "recomputed": 0.0, "work": 0.0, "n": 0, "ttfts": []})
            s["ttft"] += res.timings["ttft"]
            s["ttfts"].append(res.timings["ttft"])
            s["correct"] += all(a in res.text for a in task["answers"])
            steps = min(len(ref_cont), len(logp))
            s["agree"] += (logp[:steps].argmax(-1) == ref_cont[:steps]).float().mean().item()
            s["kl"] += F.kl_div(logp[0], ref_logp[0], log_target=True, reduction="sum").item()
            s["recomputed"] += res.recomputed_tokens
            s["work"] += res.token_layers / (res.prompt_tokens * layers)
            s["n"] += 1
        base = sums[configs[0]]
        right = ", ".join(f"{name} {ratio:g} {s['correct']}" for (name, ratio), s in sums.items())
        print(f"[bench] task {i + 1}/{len(tasks)}: {res.prompt_tokens} tokens, answers {task['answers']} "
              f"(document {task['positions']}); right so far of {i + 1}: {right}", flush=True)
    n = len(tasks)
    out: dict[str, Any] = {"rag": {}, "model": args.model, "docs": args.docs, "doc_tokens": args.doc_tokens,
                           "questions": n, "codec": args.codec, "machine": machine()}
    rows = []
    full_acc = base["correct"] / n
    twin = {e: c for c, e in matched.items()}
    for strategy, ratio in configs:
        s = sums[(strategy, ratio)]
        cell = {"ttft_ratio": s["ttft"] / base["ttft"], "ttft_s": s["ttft"] / n,
                "ttft_ratio_median": statistics.median(t / b for t, b in zip(s["ttfts"], base["ttfts"])),
                "accuracy": s["correct"] / n,
                "agreement": s["agree"] / n, "kl": s["kl"] / n, "recomputed": s["recomputed"] / n,
                "work": s["work"] / n}
        if strategy == "epic" and ratio in twin:
            cell["matches"] = f"cacheblend {twin[ratio]:g}"
        out["rag"].setdefault(strategy, {})[f"{ratio:g}"] = cell
        rows.append([strategy + (f" (= cacheblend {twin[ratio]:g})" if "matches" in cell else ""), ratio,
                     cell["ttft_s"], cell["ttft_ratio"], cell["ttft_ratio_median"], cell["work"],
                     cell["accuracy"],
                     cell["accuracy"] / full_acc if full_acc else float("nan"), cell["agreement"], cell["kl"],
                     cell["recomputed"]])
    print()
    print(f"{args.model}: {n} questions over {args.docs} documents of {args.doc_tokens} tokens "
          f"(shuffled, warm in the CPU tier, codec {args.codec})")
    print_table(["strategy", "ratio", "TTFT s", "x full prefill", "median x", "work", "accuracy", "x full acc",
                 f"agreement ({args.steps})", "KL first token", "recomputed tokens"], rows)
    write_json(args.json, out)
    if plots.plot_path(args):
        _plot(out, args, plots.plot_path(args))
    return out


def _plot(out: dict[str, Any], args: argparse.Namespace, path: str) -> None:
    """Accuracy against TTFT (median per-task ratio over full prefill), one point per
    strategy and ratio: up and to the left is better."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for strategy, per in out["rag"].items():
        xs = [c["ttft_ratio_median"] for c in per.values()]
        ys = [c["accuracy"] for c in per.values()]
        ax.plot(xs, ys, "o-" if len(xs) > 1 else "o", label=strategy)
        for ratio, x, y in zip(per, xs, ys):
            ax.annotate(ratio, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("TTFT over full prefill (median per task; documents warm in the CPU tier); labels: recompute ratio")
    ax.set_ylabel(f"accuracy ({out['questions']} questions)")
    ax.set_xlim(left=0)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plots.save(fig, path, f"RAG blending, {args.model}, {args.docs} x {args.doc_tokens}-token documents: "
               "accuracy vs TTFT", args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", choices=["smollm2", "qwen0.5b"], help="installed model (python -m kvmw.integrations.hf.models install NAME)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: KVMW.generate_rag; vllm: the same tasks beneath vLLM, beside vLLM without kvmw "
                        "and with its own prefix caching, and the HF path's answers (kvmw/bench/rag_vllm.py)")
    p.add_argument("--docs", type=int, default=4, help="documents per question")
    p.add_argument("--doc-tokens", type=int, default=512, help="tokens per document")
    p.add_argument("--questions", type=int, default=24, help="questions (each over its own document set)")
    p.add_argument("--ratios", nargs="*", type=float, default=[0.15],
                   help="CacheBlend recompute ratios (none: no CacheBlend run)")
    p.add_argument("--epic-ratios", nargs="*", type=float, default=[],
                   help="EPIC ratios besides those matching each CacheBlend ratio's prefill work")
    p.add_argument("--query-aware-ratios", nargs="*", type=float, default=[0.15],
                   help="query-aware (A^3-style) recompute ratios")
    p.add_argument("--no-match", action="store_true",
                   help="no EPIC run at CacheBlend's work (with --engine vllm: at query-aware's)")
    p.add_argument("--check-layer", type=int, default=None,
                   help="CacheBlend's check layer (the last that runs for every token; default: CacheBlend's)")
    p.add_argument("--steps", type=int, default=16, help="greedy answer tokens (agreement steps)")
    p.add_argument("--codec", default="none", help="codec of the cached documents")
    p.add_argument("--document-context", choices=("preamble", "stand_in", "none"), default="stand_in",
                   help="documents are prefilled after the preamble and a stand-in document, "
                        "after the preamble, or alone")
    p.add_argument("--stand-in-docs", type=int, default=3, choices=range(1, len(STAND_IN_ESSAYS) + 1),
                   help="documents of the stand-in (--document-context stand_in)")
    p.add_argument("--seed", type=int, default=0, help="sampling of documents and questions")
    p.add_argument("--json", default="", help="write the results here (JSON)")
    plots.add_plot_argument(p, "accuracy vs TTFT per strategy and ratio")
