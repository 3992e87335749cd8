"""`kvmw bench eviction`: token eviction policies at 50/25/10% of a 1-2k-token context.

For each policy and budget, the context is prefilled once (the question is not
seen), compressed, then:
- needle accuracy (default on qwen0.5b): essays with one fact and distractor facts
  of the same form ("The access code for the Oslo office is 48213.") at random
  depths; the question follows the compressed context; an answer is right when
  its greedy reply contains the code. Reported beside the full cache's accuracy;
- fidelity (default on smollm2): the full cache's greedy continuation of the
  context (`--steps` tokens) is fed teacher-forced through the compressed cache;
  `agreement` is the share of steps with the same greedy token, `kl` the mean
  KL(full || compressed) of next-token distributions (the first token is left
  out: compression happens after it is computed);
- bytes_ratio: KV bytes kept / full-cache bytes (all layers: under KVzip's global
  budget layers keep different counts, the sum is the budget);
- prefill overhead of scoring: prefill + hooks + compression time over a plain
  SDPA prefill, measured on the first prompt (2 cores, shared: noisy).
One prefill per prompt serves every policy: the hooks capture the last 64
queries and H2O's attention mass once, KVzip's reconstruction pass (repeat prompt
+ the context again, its tokens dropped afterwards) runs once on it, each policy
then compresses a copy. `kvzip` shares its budget across layers (one threshold over all
layers' scores, as in the paper and kvpress); `kvzip_layer` keeps the budget in every layer
and KV head. KVzip's repeat prompt closes the user turn and opens the
assistant's on the needle prompts (chat), as kvpress does; plain on fidelity.

kvpress (NVIDIA) runs the presses of the same names (H2O: ObservedAttentionPress)
on the same token ids in a venv of its own (`--kvpress-python`; it pins
transformers < 5.3); if it cannot run, the JSON and the table say why.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvmw.bench import plots
from kvmw.bench.common import machine, print_table, write_json

POLICIES = ["streaming_llm", "h2o", "snapkv", "tova", "knorm", "kvzip", "kvzip_layer"]
#: bench rows that are a policy with other settings: KVzip with the budget per layer and
#: KV head (top-k per head) instead of one threshold over all layers (`kvzip`, its default)
VARIANTS = {"kvzip_layer": ("kvzip", {"budget_scope": "layer"})}
PLACES = ["Oslo", "Lima", "Hanoi", "Quito", "Dakar", "Perth", "Riga", "Accra", "Bogota", "Tbilisi", "Nairobi",
          "Lisbon", "Manila", "Tunis", "Zagreb", "Austin", "Cairo", "Denver", "Kyoto", "Porto"]
KVPRESS_VENV = "/tmp/kvpress-venv"


def _capture_policy():
    from kvmw.eviction.base import Policy

    class Capture(Policy):
        """Scores nothing: makes the hooks keep 64 query rows and H2O's mass in one prefill."""

        name = "capture"
        accumulates = True

        @property
        def query_rows(self) -> int:
            return 64

        def score(self, inputs):  # pragma: no cover - never asked
            raise NotImplementedError

    return Capture()


def _repeat_ids(tok: Any, policy: Any, chat: bool) -> list[int]:
    """KVzip's repeat prompt; on a chat prompt it ends the user turn and opens the assistant's."""
    text = policy.prompt
    if chat:
        text = text.rstrip("\n") + "<|im_end|>\n<|im_start|>assistant\n"
    return tok(text, add_special_tokens=False).input_ids


def _recon(tok: Any, policy: Any, chat: bool) -> tuple[Any, list[int]] | None:
    return None if policy is None else (policy, _repeat_ids(tok, policy, chat))


@torch.inference_mode()
def _prefill(model: Any, ctx: torch.Tensor, recon: tuple[Any, list[int]] | None = None) -> Any:
    """The captured cache of `ctx`; `recon` = (KVzip policy, repeat prompt ids): its
    reconstruction pass runs on the cache too (scores kept, tokens not)."""
    from kvmw.eviction.hf import EvictionCache, eviction_hooks, reconstruct

    cache = EvictionCache(model.config, _capture_policy())
    with eviction_hooks(model):
        logits = model(ctx[None], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    cache.policy = None
    if recon is not None:
        policy, prompt = recon
        reconstruct(model, cache, ctx, prompt, policy.chunk, policy.overlap, policy.block)
    return cache, logits


@torch.inference_mode()
def _greedy(model: Any, cache: Any, first: int, steps: int) -> torch.Tensor:
    """`first`, then the cache's greedy continuation: `steps` tokens to feed teacher-forced."""
    out, nxt = [first], first
    for _ in range(steps - 1):
        nxt = int(model(torch.tensor([[nxt]]), past_key_values=cache).logits[0, -1].argmax())
        out.append(nxt)
    return torch.tensor(out)


def _derive(model: Any, src: Any, policy: Any = None, budget: Any = None) -> Any:
    """A compressed copy of a captured cache (the source is left as it is); a policy that
    leaves layers of different lengths (KVzip's global budget) makes the model cut its
    mask per layer (`kvmw.eviction.hf.compress`)."""
    from kvmw.eviction.hf import EvictionCache, compress

    cache = EvictionCache(model.config)
    for dst, s in zip(cache.layers, src.layers):
        dst.load(s.keys, s.values, s.positions, s.seen)
        if policy is not None:
            w = policy.query_rows
            dst.queries = s.queries[:, -w:] if w else None
            dst.query_positions = s.query_positions[-w:] if w else None
            dst.mass = s.mass if policy.accumulates else None
            dst.reconstruction = s.reconstruction if policy.reconstructs else None
    if policy is not None:
        compress(model, cache, budget, policy)
        for layer in cache.layers:
            layer.queries = layer.query_positions = layer.mass = layer.reconstruction = None
    return cache


@torch.inference_mode()
def _answer(model: Any, cache: Any, question: torch.Tensor, max_new: int, stop: set[int]) -> list[int]:
    logits = model(question[None], past_key_values=cache).logits[0, -1]
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(logits.argmax())
        if nxt in stop:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), past_key_values=cache).logits[0, -1]
    return out


@torch.inference_mode()
def _teacher(model: Any, cache: Any, tokens: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(tokens[None], past_key_values=cache).logits[0].float(), dim=-1)


def needle_tasks(tok: Any, n: int, context_tokens: int, seed: int = 0, distractors: int = 2) -> list[dict[str, Any]]:
    """Essay contexts with a fact and distractors; the question asks for the fact."""
    from kvmw.text_data import essay_text

    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        ids = tok(essay_text(context_tokens * 6, start=3 * i), add_special_tokens=False).input_ids[:context_tokens]
        sentences = tok.decode(ids).split(". ")
        places = rng.sample(PLACES, distractors + 1)
        codes = rng.sample(range(10000, 99999), distractors + 1)
        for place, code in zip(places, codes):
            at = rng.randrange(1, len(sentences))
            sentences.insert(at, f"The access code for the {place} office is {code}")
        text = ". ".join(sentences)
        context = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                   f"Read the document, then answer the question.\n\n<document>\n{text}\n</document>")
        question = (f"\n\nQuestion: What is the access code for the {places[0]} office? "
                    "Reply with the number only.<|im_end|>\n<|im_start|>assistant\n")
        tasks.append({"context": tok(context, add_special_tokens=False).input_ids,
                      "question": tok(question, add_special_tokens=False).input_ids,
                      "answer": str(codes[0]), "distractors": [str(c) for c in codes[1:]]})
    return tasks


def _timed_prefill(model: Any, ctx: torch.Tensor, policy: Any, budget: Any, repeat: int,
                   prompt_ids: list[int] | None = None) -> tuple[float, float]:
    """(plain prefill seconds, prefill + hooks + compress seconds), best of `repeat`."""
    from transformers import DynamicCache

    from kvmw.eviction.hf import prefill_compressed

    plain, evict = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(ctx[None], past_key_values=DynamicCache(config=model.config), logits_to_keep=1)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        prefill_compressed(model, ctx, policy, budget, prompt_ids)
        evict.append(time.perf_counter() - t0)
    return min(plain), min(evict)


def _run_kvpress(args: argparse.Namespace, model_path: str, tasks: list[dict[str, Any]],
                 budgets: list[Any], max_new: int) -> dict[str, Any]:
    py = Path(args.kvpress_python)
    if not py.exists():
        return {"error": f"no kvpress venv at {py}: python -m venv {KVPRESS_VENV} && "
                         f"{KVPRESS_VENV}/bin/pip install torch==2.13.0 kvpress"}
    with tempfile.TemporaryDirectory(prefix="kvmw-kvpress-") as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps({"model": model_path, "presses": args.policies, "max_new_tokens": max_new,
                                   "budgets": [b.ratio for b in budgets],
                                   "tasks": [{"context": t["context"], "question": t["question"]}
                                             for t in tasks]}))
        runner = Path(__file__).with_name("kvpress_runner.py")
        proc = subprocess.run([str(py), str(runner), str(src), str(dst)], capture_output=True, text=True,
                              timeout=args.kvpress_timeout)
        if not dst.exists():
            return {"error": f"kvpress runner exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
        return json.loads(dst.read_text())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvmw.eviction import Budget, make_policy
    from kvmw.integrations.hf.models import load, model_dir
    from kvmw.text_data import essay_text

    model, tok = load(args.model)
    budgets = [Budget.parse(b) for b in args.budgets]
    policies = {}
    for name in args.policies:
        base, settings = VARIANTS.get(name, (name, {}))
        policies[name] = make_policy(base, **settings)
    results: dict[str, Any] = {name: {b.tag: {} for b in budgets} for name in policies}
    kvzip = next((p for p in policies.values() if p.reconstructs), None)
    out: dict[str, Any] = {"model": args.model, "budgets": [b.tag for b in budgets], "machine": machine()}
    full_bytes = None

    if args.needle:
        tasks = needle_tasks(tok, args.samples, args.context, seed=args.seed)
        stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
        right: dict[tuple[str, str], list[bool]] = {(p, b.tag): [] for p in policies for b in budgets}
        full_right = 0
        for i, task in enumerate(tasks):
            ctx, q = torch.tensor(task["context"]), torch.tensor(task["question"])
            t0 = time.perf_counter()
            src, _ = _prefill(model, ctx, _recon(tok, kvzip, chat=True))
            full_ans = tok.decode(_answer(model, _derive(model, src), q, args.max_new, stop))
            full_right += task["answer"] in full_ans
            full_bytes = src.nbytes()
            for name, policy in policies.items():
                for b in budgets:
                    cache = _derive(model, src, policy, b)
                    results[name][b.tag]["bytes_ratio"] = cache.nbytes() / full_bytes
                    ans = tok.decode(_answer(model, cache, q, args.max_new, stop))
                    right[name, b.tag].append(task["answer"] in ans)
            print(f"[bench] needle {i + 1}/{len(tasks)}: {len(ctx)} tokens, full cache "
                  f"{'right' if task['answer'] in full_ans else 'wrong'} ({full_ans.strip()!r}), "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        out["full_accuracy"] = full_right / len(tasks)
        out["context_tokens"] = sum(len(t["context"]) for t in tasks) / len(tasks)
        sub = min(len(tasks), args.kvpress_samples)
        for (name, tag), r in right.items():
            results[name][tag]["accuracy"] = sum(r) / len(r)
            results[name][tag]["accuracy_kvpress_prompts"] = sum(r[:sub]) / sub
        if args.kvpress:
            print(f"[bench] kvpress on the first {sub} prompts ({args.kvpress_python})", flush=True)
            kp = _run_kvpress(args, str(model_dir(args.model)), tasks[:sub], budgets, args.max_new)
            out["kvpress"] = _grade_kvpress(kp, tasks[:sub], budgets, tok)
            out["kvpress_prompts"] = sub

    if args.fidelity:
        agree = {(p, b.tag): [] for p in policies for b in budgets}
        kl = {(p, b.tag): [] for p in policies for b in budgets}
        for i in range(args.fidelity_samples):
            ids = tok(essay_text(args.context * 6, start=40 + 3 * i), add_special_tokens=False).input_ids
            ctx = torch.tensor(ids[: args.context])
            src, last = _prefill(model, ctx, _recon(tok, kvzip, chat=False))
            full_bytes = src.nbytes()
            fed = _greedy(model, _derive(model, src), int(last.argmax()), args.steps)
            ref = _teacher(model, _derive(model, src), fed)
            for name, policy in policies.items():
                for b in budgets:
                    cache = _derive(model, src, policy, b)
                    results[name][b.tag]["bytes_ratio"] = cache.nbytes() / full_bytes
                    lp = _teacher(model, cache, fed)
                    agree[name, b.tag].append((lp.argmax(-1) == ref.argmax(-1)).float().mean().item())
                    kl[name, b.tag].append(F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).mean().item())
            print(f"[bench] fidelity {i + 1}/{args.fidelity_samples}: {len(ctx)} tokens", flush=True)
        for (name, tag), v in agree.items():
            results[name][tag]["agreement"] = sum(v) / len(v)
            results[name][tag]["kl"] = sum(kl[name, tag]) / len(v)
        out["fidelity_context_tokens"] = args.context
        out["steps"] = args.steps

    timing_ctx = torch.tensor(needle_tasks(tok, 1, args.context, seed=args.seed)[0]["context"])
    for name, policy in policies.items():
        prompt = _repeat_ids(tok, policy, chat=True) if policy.reconstructs else None
        plain, evict = _timed_prefill(model, timing_ctx, policy, budgets[0], args.repeat, prompt)
        for b in budgets:
            results[name][b.tag]["prefill_overhead_pct"] = (evict / plain - 1) * 100
            results[name][b.tag]["prefill_seconds"] = evict
        out.setdefault("plain_prefill_seconds", plain)
    out["eviction"] = results
    _print(out, args)
    write_json(args.json, out)
    if plots.plot_path(args):
        _plot(out, args, plots.plot_path(args))
    return out


def _plot(out: dict[str, Any], args: argparse.Namespace, path: str) -> None:
    """Needle accuracy (or, without the needle run, greedy agreement) against the budget,
    one line per policy, beside the full cache."""
    plt = plots.pyplot()
    metric = "accuracy" if args.needle else "agreement"
    fig, ax = plt.subplots(figsize=(9.5, 5))
    tags = out["budgets"]
    for name, per in out["eviction"].items():
        ax.plot(range(len(tags)), [per[t][metric] for t in tags], "o-", label=name)
    if metric == "accuracy":
        ax.axhline(out["full_accuracy"], color="k", ls="--", lw=1, label="full cache")
    ax.set_xticks(range(len(tags)), [f"{t} kept" for t in tags])
    ax.set_xlabel("KV budget")
    ax.set_ylabel(f"needle accuracy ({args.samples} prompts)" if metric == "accuracy"
                  else f"greedy agreement with the full cache ({args.steps} steps)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines, not on them
    ax.grid(alpha=0.3)
    plots.save(fig, path, f"Token eviction, {args.model}, ~{args.context}-token contexts: {metric} vs budget", args)


def _grade_kvpress(kp: dict[str, Any], tasks: list[dict[str, Any]], budgets: list[Any], tok: Any) -> dict[str, Any]:
    if "error" in kp:
        return {"error": kp["error"]}
    graded: dict[str, Any] = {"versions": kp.get("versions"), "errors": kp.get("errors", {}),
                              "seconds": kp.get("seconds", {})}
    for name, per_budget in kp.get("answers", {}).items():
        graded[name] = {}
        for b in budgets:
            answers = per_budget.get(str(b.ratio))
            if answers is None:
                continue
            hits = sum(t["answer"] in tok.decode(a) for t, a in zip(tasks, answers))
            graded[name][b.tag] = {"accuracy": hits / len(tasks)}
    return graded


def _print(out: dict[str, Any], args: argparse.Namespace) -> None:
    kp = out.get("kvpress", {})
    rows = []
    for name, per in out["eviction"].items():
        for tag, r in per.items():
            kv = kp.get(name, {}).get(tag, {}).get("accuracy", "-") if isinstance(kp.get(name), dict) else "-"
            rows.append([name, tag, r.get("accuracy", "-"), r.get("accuracy_kvpress_prompts", "-"), kv, r.get("agreement", "-"), r.get("kl", "-"),
                         r["bytes_ratio"], r["prefill_overhead_pct"]])
    print()
    print(f"{args.model}: full-cache needle accuracy {out.get('full_accuracy', '-')} "
          f"({args.samples if args.needle else 0} prompts of ~{out.get('context_tokens', 0):.0f} tokens); "
          f"fidelity over {out.get('steps', '-')} steps of a {out.get('fidelity_context_tokens', '-')}-token "
          f"context; plain prefill {out['plain_prefill_seconds']:.2f} s")
    print_table(["policy", "budget", "accuracy", "acc (kvpress prompts)", "kvpress acc", "agreement", "KL", "bytes", "prefill +%"], rows)
    if "error" in kp:
        print(f"kvpress: {kp['error']}")
    elif kp.get("errors"):
        print(f"kvpress errors: {kp['errors']}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", choices=["smollm2", "qwen0.5b"], help="installed model (python -m kvmw.integrations.hf.models install NAME)")
    p.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES, help="eviction policies measured")
    p.add_argument("--budgets", nargs="+", default=["50%", "25%", "10%"], help="KV kept: a share of the context or a token count")
    p.add_argument("--context", type=int, default=1536, help="essay tokens per context (facts added)")
    p.add_argument("--samples", type=int, default=20, help="needle prompts")
    p.add_argument("--steps", type=int, default=32, help="teacher-forced steps for agreement / KL")
    p.add_argument("--fidelity-samples", type=int, default=4, help="contexts for agreement / KL")
    p.add_argument("--max-new", type=int, default=8, help="answer tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling of facts and needles")
    p.add_argument("--repeat", type=int, default=2, help="timed prefills per policy (best of)")
    p.add_argument("--needle", action=argparse.BooleanOptionalAction, default=None,
                   help="needle accuracy (default: on for qwen0.5b)")
    p.add_argument("--fidelity", action=argparse.BooleanOptionalAction, default=None,
                   help="greedy agreement / KL vs the full cache (default: on for smollm2)")
    p.add_argument("--kvpress", action=argparse.BooleanOptionalAction, default=True,
                   help="run kvpress's presses on the needle prompts")
    p.add_argument("--kvpress-samples", type=int, default=6, help="needle prompts kvpress runs (each press "
                   "and budget prefills again: 18 prefills a prompt, KVzip's twice)")
    p.add_argument("--kvpress-python", default=f"{KVPRESS_VENV}/bin/python", help="python of the kvpress venv (made on first use)")
    p.add_argument("--kvpress-timeout", type=int, default=7200, help="seconds before the kvpress run is stopped")
    p.add_argument("--json", default="", help="write the results here (JSON)")
    plots.add_plot_argument(p, "accuracy vs budget per policy")


def finalize_args(args: argparse.Namespace) -> None:
    if args.needle is None:
        args.needle = args.model != "smollm2"
    if args.fidelity is None:
        args.fidelity = args.model == "smollm2"
