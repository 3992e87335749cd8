"""`kvmw bench rag`: RAG answers from separately cached documents, per blending strategy.

Tasks (fixed seed): `--docs` essay excerpts of `--doc-tokens` tokens, each with
one fact ("The access code for the <place> office is <number>."); a question
asks for one document's code, every third question for the codes of two
documents. Per task the documents are stored once (CPU tier), then every
strategy answers over them, with the documents in a shuffled order and so at
other offsets than any earlier prompt: full prefill (the baseline), full reuse,
CacheBlend and EPIC at each `--ratios`. Reported per strategy and ratio:
- `ttft_ratio`: time to first token (documents warm in the CPU tier) over full
  prefill's, summed over tasks;
- `accuracy`: share of tasks whose greedy answer holds every asked code;
- `agreement`: greedy agreement with full prefill over `--steps` steps,
  teacher-forced on full prefill's own continuation; `kl`: KL(full || strategy)
  of the first answer token, mean over tasks;
- `recomputed`: tokens recomputed per prompt (mean).
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import torch
import torch.nn.functional as F

from kvmw.bench.common import machine, print_table, write_json
from kvmw.text_data import RAG_PREAMBLE as PREAMBLE
from kvmw.text_data import code_question, fact_documents


def rag_tasks(tok: Any, n: int, docs: int, doc_tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        documents, places, codes = fact_documents(tok, docs, doc_tokens, rng, start=i * docs * 2)
        asked = rng.sample(range(docs), 2 if i % 3 == 2 else 1)
        tasks.append({"documents": documents, "question": code_question(tok, [places[a] for a in asked]),
                      "answers": [codes[a] for a in asked]})
    return tasks


@torch.inference_mode()
def _teacher_forced(model: Any, result: Any, continuation: torch.Tensor) -> torch.Tensor:
    """Log-probs at each step of `continuation` given the result's prompt cache."""
    cache, n = result.cache, result.prompt_tokens
    cache.crop(-(cache.get_seq_length() - (n - 1)))  # keep the prompt but its last token
    feed = torch.cat([result.sequences[0, n - 1:n], continuation[:-1]])
    return F.log_softmax(model(feed[None], past_key_values=cache).logits[0].float(), dim=-1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.integrations.hf.models import load
    from kvmw.memory import tune_allocator
    from kvmw.storage_tiers import CPUTier, TieredStore

    tune_allocator()
    model, tok = load(args.model)
    tasks = rag_tasks(tok, args.questions, args.docs, args.doc_tokens, args.seed)
    hook = KVMW(model, tok, KVMWConfig.load(env={}, codec=args.codec), store=TieredStore([CPUTier(8 << 30)]))
    configs = [("full_prefill", 1.0), ("full_reuse", 0.0)]
    configs += [(s, r) for s in ("cacheblend", "epic") for r in args.ratios]
    gen = dict(max_new_tokens=args.steps, do_sample=False)
    rng = random.Random(args.seed + 1)
    sums: dict[tuple[str, float], dict[str, float]] = {c: {"ttft": 0.0, "correct": 0, "agree": 0.0, "kl": 0.0,
                                                          "recomputed": 0.0} for c in configs}
    for i, task in enumerate(tasks):
        hook.generate_rag(task["documents"], task["question"], strategy="full_reuse", preamble=PREAMBLE,
                          max_new_tokens=1)  # store the documents (CPU tier)
        order = list(range(args.docs))
        rng.shuffle(order)
        docs = [task["documents"][j] for j in order]
        ref_cont, ref_logp = None, None
        for strategy, ratio in configs:
            res = hook.generate_rag(docs, task["question"], strategy=strategy, recompute_ratio=ratio,
                                    preamble=PREAMBLE, keep_cache=True, **gen)
            cont = res.sequences[0, res.prompt_tokens:]
            logp = _teacher_forced(model, res, cont if ref_cont is None else ref_cont)
            if ref_cont is None:
                ref_cont, ref_logp = cont, logp
            s = sums[(strategy, ratio)]
            s["ttft"] += res.timings["ttft"]
            s["correct"] += all(a in res.text for a in task["answers"])
            steps = min(len(ref_cont), len(logp))
            s["agree"] += (logp[:steps].argmax(-1) == ref_cont[:steps]).float().mean().item()
            s["kl"] += F.kl_div(logp[0], ref_logp[0], log_target=True, reduction="sum").item()
            s["recomputed"] += res.recomputed_tokens
        base = sums[configs[0]]
        print(f"[bench] task {i + 1}/{len(tasks)}: {res.prompt_tokens} tokens, answers {task['answers']}; "
              f"full prefill right so far {base['correct']}/{i + 1}", flush=True)
    n = len(tasks)
    out: dict[str, Any] = {"rag": {}, "model": args.model, "docs": args.docs, "doc_tokens": args.doc_tokens,
                           "questions": n, "codec": args.codec, "machine": machine()}
    rows = []
    full_acc = base["correct"] / n
    for (strategy, ratio), s in sums.items():
        cell = {"ttft_ratio": s["ttft"] / base["ttft"], "ttft_s": s["ttft"] / n, "accuracy": s["correct"] / n,
                "agreement": s["agree"] / n, "kl": s["kl"] / n, "recomputed": s["recomputed"] / n}
        out["rag"].setdefault(strategy, {})[f"{ratio:g}"] = cell
        rows.append([strategy, ratio, cell["ttft_s"], cell["ttft_ratio"], cell["accuracy"],
                     cell["accuracy"] / full_acc if full_acc else float("nan"), cell["agreement"], cell["kl"],
                     cell["recomputed"]])
    print()
    print(f"{args.model}: {n} questions over {args.docs} documents of {args.doc_tokens} tokens "
          f"(shuffled, warm in the CPU tier, codec {args.codec})")
    print_table(["strategy", "ratio", "TTFT s", "x full prefill", "accuracy", "x full acc",
                 f"agreement ({args.steps})", "KL first token", "recomputed tokens"], rows)
    write_json(args.json, out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", choices=["smollm2", "qwen0.5b"])
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--doc-tokens", type=int, default=512)
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.05, 0.15, 0.3, 1.0])
    p.add_argument("--steps", type=int, default=16, help="greedy answer tokens (agreement steps)")
    p.add_argument("--codec", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
