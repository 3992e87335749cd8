"""Runs kvpress's presses on prompts kvmw wrote, in kvpress's own venv (it pins
transformers < 5.3, kvmw needs 5.x newer): imports only torch, transformers, kvpress.

    python kvpress_runner.py IN.json OUT.json

IN: {"model": path, "presses": [...], "budgets": [ratios], "max_new_tokens": n,
"tasks": [{"context": [ids], "question": [ids]}]}. OUT: {"answers": {press: {budget:
[[ids]...]}}, "versions": {...}, "errors": {...}}. Each press compresses the context
prefill (compression_ratio = 1 - budget); the question follows at its true positions
(explicit position_ids), then greedy decoding.
"""

from __future__ import annotations

import json
import sys
import time


def main(src: str, dst: str) -> int:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    import kvpress

    job = json.load(open(src))
    presses = {"streaming_llm": lambda r: kvpress.StreamingLLMPress(compression_ratio=r, n_sink=4),
               "snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5),
               "tova": lambda r: kvpress.TOVAPress(compression_ratio=r),
               "knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
               "h2o": lambda r: kvpress.ObservedAttentionPress(compression_ratio=r),
               # its own reconstruction pass after the prefill; budgets non-uniform over layers and heads
               "kvzip": lambda r: kvpress.KVzipPress(compression_ratio=r),
               # the same ratio in every layer (the heads of a layer share its count)
               "kvzip_layer": lambda r: kvpress.KVzipPress(compression_ratio=r, layerwise=True)}
    models = {}

    def model_for(name: str):
        impl = "eager" if name == "h2o" else "sdpa"  # ObservedAttentionPress reads attention weights
        if impl not in models:
            models[impl] = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32,
                                                                attn_implementation=impl).eval()
        return models[impl]

    out = {"answers": {}, "errors": {}, "seconds": {},
           "versions": {"kvpress": getattr(kvpress, "__version__", "?"), "transformers": transformers.__version__,
                        "torch": torch.__version__}}
    for name in job["presses"]:
        out["answers"][name] = {}
        t0 = time.perf_counter()
        try:
            model = model_for(name)
            for budget in job["budgets"]:
                press = presses[name](1.0 - budget)
                answers = []
                for task in job["tasks"]:
                    ctx = torch.tensor([task["context"]])
                    q = torch.tensor([task["question"]])
                    cache = DynamicCache()
                    with torch.inference_mode():
                        with press(model):
                            model(ctx, past_key_values=cache, use_cache=True)
                        n = ctx.shape[1]
                        pos = torch.arange(n, n + q.shape[1])[None]
                        logits = model(q, past_key_values=cache, position_ids=pos).logits[0, -1]
                        ids, nxt, p = [], logits.argmax(), n + q.shape[1]
                        for _ in range(job["max_new_tokens"]):
                            ids.append(int(nxt))
                            logits = model(nxt.view(1, 1), past_key_values=cache,
                                           position_ids=torch.tensor([[p]])).logits[0, -1]
                            nxt, p = logits.argmax(), p + 1
                    answers.append(ids)
                out["answers"][name][str(budget)] = answers
        except Exception as e:  # recorded with the error text: the bench reports why
            out["errors"][name] = f"{type(e).__name__}: {e}"
        out["seconds"][name] = time.perf_counter() - t0
        json.dump(out, open(dst, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
