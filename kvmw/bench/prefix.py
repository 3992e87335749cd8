"""`kvmw bench prefix`: time-to-first-token cold vs warm per tier and codec, and the
memory, speed and fidelity of quantized generation caches, in one process.

TTFT (`generate(..., max_new_tokens=1)` wall time, median of `--repeat`):
- cold: plain `model.generate` on the whole prompt (a document of `--tokens`
  tokens of essay text followed by a question);
- kvmw cold: the hook on an empty store (prefill + encoding and storing chunks);
- warm: the hook with the document's chunks in exactly one tier (cpu, disk or
  redis) and codec (none, int8, kivi4): it loads the chunks and computes only
  the question. Disk runs drop the files from the page cache first.

Generation caches at `--tokens` tokens: the document's KV is put into each
cache, then `--steps` greedy steps run teacher-forced on DynamicCache's own
greedy continuation: `agreement` is the share of steps whose greedy token
matches it, `decode_tps` the steps per second, `bytes` the cache's real size.
Peers: DynamicCache, transformers' QuantizedCache (optimum-quanto backend,
int4 and int2 - its fp8 path does not exist for caches in transformers 5.19),
kvmw's KIVICache at 4 and 2 bits, and with 4-bit keys and 2-bit values (`kivi2_k4`).
`kvmw_kivi2` is KIVICache's 2-bit default: 2-bit keys with MSE-clipped ranges and
the 16 widest key channels per head and block also kept at 8 bits, fp16 residual;
`kvmw_kivi2_plain` is plain KIVI-2 (min-max ranges, no outlier channels, fp32
residual), for comparison.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from typing import Any

import torch

from kvmw.bench import plots
from kvmw.bench.common import drop_page_cache, machine, median_seconds, print_table, write_json
from kvmw.memory import allocator_setting, tune_allocator

QUESTION = "\n\nQuestion: What is the main point of the text above? Answer in one sentence.\nAnswer:"


def _tensor_bytes(obj: Any, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of every tensor reachable from `obj` (tensor subclasses via their inner tensors)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, n), seen, depth + 1) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o, seen, depth + 1) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, seen, depth + 1) for o in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(_tensor_bytes(o, seen, depth + 1) for o in vars(obj).values())
    return 0


def _ttft_table(args: argparse.Namespace, model: Any, tok: Any, ids: torch.Tensor) -> dict[str, Any]:
    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.integrations.hf.capture import capture_kv
    from kvmw.keys import KeySpace
    from kvmw.layout import split_tokens
    from kvmw.quantizers import make_codec
    from kvmw.storage_tiers import build_store
    from kvmw.fingerprint import ModelFingerprint

    gen = dict(max_new_tokens=1, do_sample=False)
    print(f"[bench] cold TTFT: plain generate on {ids.shape[1]} tokens", flush=True)
    with torch.inference_mode():
        model.generate(ids[:, :16], **gen)  # one-time start-up costs stay out of the cold figure
        cold = median_seconds(lambda: model.generate(ids, **gen), 1, warmup=0)
    results: dict[str, Any] = {"cold_s": cold}
    with tempfile.TemporaryDirectory(prefix="kvmw-bench-prefix-") as tmp:
        base = KVMWConfig.load(chunk_size=args.chunk_size, disk_path=tmp,
                               redis_prefix=f"kvmw-bench:{uuid.uuid4().hex[:8]}:")
        print("[bench] kvmw cold: hook on an empty store (prefill + store)", flush=True)
        hook = KVMW(model, tok, base.replace(tiers=["cpu"]))
        with torch.inference_mode():
            results["kvmw_cold_s"] = median_seconds(lambda: hook.generate(ids, **gen), 1, warmup=0)
        hook.close()
        fp = ModelFingerprint.from_hf(model)
        keys = KeySpace(fp, args.chunk_size).prefix_keys(ids[0])
        doc_kv = capture_kv(model, ids[0, : len(keys) * args.chunk_size])
        chunks = split_tokens(doc_kv, args.chunk_size)
        for codec_spec in args.codecs:
            codec = make_codec(codec_spec)
            blobs = [codec.encode(c, fp.digest, positions=torch.arange(i * args.chunk_size, (i + 1) * args.chunk_size))
                     for i, c in enumerate(chunks)]
            stored = sum(len(b) for b in blobs)
            for tier in args.tiers:
                store = build_store(base.replace(tiers=[tier], codec=codec_spec))
                for k, b in zip(keys, blobs):
                    store.put(k, b)
                store.flush(120)
                hook = KVMW(model, tok, base.replace(tiers=[tier], codec=codec_spec), store=store)
                setup = (lambda: drop_page_cache(tmp)) if tier == "disk" else None
                print(f"[bench] warm TTFT: {tier} / {codec_spec}", flush=True)
                with torch.inference_mode():
                    warm = median_seconds(lambda: hook.generate(ids, **gen), args.repeat, setup, warmup=0)
                st = hook.stats()
                if st["tokens_reused"] != args.repeat * len(keys) * args.chunk_size:
                    raise RuntimeError(f"warm runs did not reuse the whole document: {st}")
                results.setdefault(tier, {})[codec_spec] = {
                    "ttft_s": warm, "ttft_ratio": warm / cold, "speedup": cold / warm,
                    "stored_bytes": stored, "load_s": st["load_seconds"] / args.repeat,
                }
                for k in keys:
                    store.delete(k)
                hook.close()
    return results


def _cache_table(args: argparse.Namespace, model: Any, ids: torch.Tensor) -> dict[str, Any]:
    from transformers import DynamicCache

    from kvmw.integrations.hf import KIVICache
    from kvmw.integrations.hf.capture import capture_kv
    from kvmw.layout import to_hf_layers

    doc = ids[0, : args.tokens]
    print(f"[bench] generation caches: prefill of {len(doc)} tokens", flush=True)
    kv = capture_kv(model, doc[:-1])

    def filled(cache: Any) -> Any:
        for i, (k, v) in enumerate(to_hf_layers(kv)):
            cache.update(k.contiguous().clone(), v.contiguous().clone(), i)
        return cache

    @torch.inference_mode()
    def run(cache: Any, feed: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        preds, nxt = [], doc[-1:]
        t0 = time.perf_counter()
        for step in range(args.steps):
            pred = model(nxt.view(1, 1), past_key_values=cache).logits[0, -1].argmax()
            preds.append(pred)
            nxt = pred.view(1) if feed is None else feed[step].view(1)
        return torch.stack(preds), args.steps / (time.perf_counter() - t0)

    factories: dict[str, Any] = {"dynamic": lambda: DynamicCache(config=model.config)}
    try:
        import optimum.quanto  # noqa: F401
        from transformers import QuantizedCache

        factories["hf_quanto_int4"] = lambda: QuantizedCache("quanto", model.config, nbits=4)
        factories["hf_quanto_int2"] = lambda: QuantizedCache("quanto", model.config, nbits=2)
    except ImportError:
        print("[bench] optimum-quanto not installed: transformers' QuantizedCache left out")
    factories["kvmw_kivi4"] = lambda: KIVICache(model.config, bits=4, group=64)
    factories["kvmw_kivi2"] = lambda: KIVICache(model.config, bits=2, group=32)
    factories["kvmw_kivi2_plain"] = lambda: KIVICache(model.config, bits=2, group=32, clip=False,
                                                      outlier_channels=0, residual_dtype=torch.float32)
    factories["kvmw_kivi2_k4"] = lambda: KIVICache(model.config, bits=2, group=32, key_bits=4)

    results: dict[str, Any] = {}
    ref = None
    for name, make in factories.items():
        print(f"[bench] cache {name}", flush=True)
        cache = filled(make())
        preds, tps = run(cache, None if ref is None else ref)
        if ref is None:
            ref = preds
        nbytes = cache.nbytes() if hasattr(cache, "nbytes") else _tensor_bytes(cache.layers)
        results[name] = {"bytes": nbytes, "decode_tps": tps,
                         "agreement": (preds == ref).float().mean().item()}
    dyn = results["dynamic"]
    for r in results.values():
        r["bytes_ratio"] = r["bytes"] / dyn["bytes"]
        r["decode_ratio"] = r["decode_tps"] / dyn["decode_tps"]
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvmw.integrations.hf.models import load
    from kvmw.text_data import essay_text

    tune_allocator()
    model, tok = load(args.model)
    doc = tok(essay_text(args.tokens * 8), return_tensors="pt").input_ids[:, : args.tokens]
    question = tok(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.cat([doc, question], dim=1)
    prefix = _ttft_table(args, model, tok, ids)
    caches = _cache_table(args, model, ids)

    print()
    print(f"{args.model}: document {args.tokens} tokens + question {question.shape[1]} tokens, chunks of "
          f"{args.chunk_size}; allocator: {allocator_setting()}")
    print(f"cold TTFT (plain generate) {prefix['cold_s']:.2f} s; kvmw cold (prefill + store) "
          f"{prefix['kvmw_cold_s']:.2f} s")
    rows = [[tier, codec, r["ttft_s"], r["ttft_ratio"], r["speedup"], r["stored_bytes"]]
            for tier in args.tiers for codec, r in prefix[tier].items()]
    print_table(["tier", "codec", "warm TTFT s", "warm/cold", "speedup", "stored bytes"], rows)
    print()
    rows = [[name, r["bytes"], r["bytes_ratio"], r["decode_tps"], r["decode_ratio"], r["agreement"]]
            for name, r in caches.items()]
    print_table(["cache", "bytes", "x dynamic", "decode tok/s", "x dynamic", f"agreement ({args.steps})"], rows)
    out = {"prefix": {t: prefix[t] for t in args.tiers}, "cold_s": prefix["cold_s"],
           "kvmw_cold_s": prefix["kvmw_cold_s"], "cache": caches, "model": args.model,
           "tokens": args.tokens, "allocator": allocator_setting(), "machine": machine()}
    write_json(args.json, out)
    if plots.plot_path(args):
        _plot(out, args, plots.plot_path(args))
    return out


def _plot(out: dict[str, Any], args: argparse.Namespace, path: str) -> None:
    """Warm TTFT per tier (groups) and codec (bars) beside the cold prefill and kvmw's cold run."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    tiers, codecs = args.tiers, args.codecs
    width = 0.8 / len(codecs)
    for j, codec in enumerate(codecs):
        xs = [i + (j - (len(codecs) - 1) / 2) * width for i in range(len(tiers))]
        ys = [out["prefix"][t][codec]["ttft_s"] for t in tiers]
        bars = ax.bar(xs, ys, width, label=f"warm, codec {codec}")
        ax.bar_label(bars, labels=[f"{out['cold_s'] / y:.0f}x" for y in ys], fontsize=7)
    ax.axhline(out["cold_s"], color="k", ls="--", lw=1, label=f"cold: plain generate ({out['cold_s']:.2f} s)")
    ax.axhline(out["kvmw_cold_s"], color="0.5", ls=":", lw=1,
               label=f"cold with kvmw: prefill + store ({out['kvmw_cold_s']:.2f} s)")
    ax.set_xticks(range(len(tiers)), [f"{t} tier" for t in tiers])
    ax.set_yscale("log")
    plots.plain_log_ticks(ax)
    ax.set_ylabel("time to first token, s (log; bar labels: speedup over cold)")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(axis="y", alpha=0.3)
    plots.save(fig, path, f"HF prefix reuse, {args.model}, {args.tokens}-token document: TTFT cold vs warm per tier",
               args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", choices=["smollm2", "qwen0.5b"], help="installed model (python -m kvmw.integrations.hf.models install NAME)")
    p.add_argument("--tokens", type=int, default=2048, help="document tokens before the question")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per stored chunk")
    p.add_argument("--tiers", nargs="+", default=["cpu", "disk", "redis"], help="tiers measured")
    p.add_argument("--codecs", nargs="+", default=["none", "int8", "kivi4"], help="codec specs measured")
    p.add_argument("--repeat", type=int, default=3, help="warm TTFT runs per cell (median)")
    p.add_argument("--steps", type=int, default=64, help="decode steps per generation cache")
    p.add_argument("--json", default="", help="write the results here (JSON)")
    plots.add_plot_argument(p, "TTFT cold vs warm per tier and codec")
