"""`kvmw bench codecs`: size, speed and model fidelity of every codec on real KV.

For each codec, in one process:
- ratio: fp16 bytes / stored bytes (blob headers included) of the context's KV
  stored as 256-token chunks, the unit the store keeps;
- encode / decode GB/s on ONE thread (of fp16 input bytes) for a ~32 MiB and a
  ~3 MiB chunk, beside memcpy into a preallocated buffer measured in the same run;
- relative reconstruction error ||x' - x|| / ||x|| of K and of V;
- fidelity: the model continues from decode(encode(KV)) of a context of essay
  text (stored as 256-token chunks, as the store keeps them). `kl` is the mean
  KL(full || compressed) of next-token distributions over 64 steps of the full
  cache's greedy continuation (teacher-forced); `greedy_agreement` the share of
  those steps where the compressed cache picks the same greedy token;
  `ppl_increase_pct` the perplexity change on held-out essay text that follows
  the compressed context.

The context's KV is cast to fp16 before encoding (what caches hold in
production), so `none` shows the cost of fp16 itself; "full" is the model's
own fp32 cache. The 32 MiB speed chunk is the context's KV followed by the KV of
the text after it (prefilled in <= 1024-token pieces): real, never repeated KV,
so zstd cannot profit from repetition.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F

from kvmw.bench import plots
from kvmw.bench.common import gbps, machine, median_seconds, print_table, write_json
from kvmw.memory import allocator_setting, tune_allocator

DEFAULT_CODECS = ["none", "none+zstd:shuffle", "fp8", "int8", "int8:ktoken", "int8+zstd", "int4", "kivi4",
                  "kivi4:g32", "kivi2", "kivi2+zstd", "kivi2:g64+zstd", "cachegen", "cachegen:zstd",
                  "cachegen:hi4:mid4:lo4"]
CHUNK = 256
STEPS = 64


def _speed_kv(model: Any, text_ids: torch.Tensor, first: torch.Tensor, nbytes: int) -> torch.Tensor:
    """>= `nbytes` of fp16 KV of real, non-repeating text: `first` (the context's KV) then
    the KV of the following text in pieces of <= 1024 tokens (several chunks concatenated)."""
    from kvmw.integrations.hf.capture import capture_kv

    per_token = first[:, :, :1].numel() * 2
    need = -(-nbytes // per_token)
    parts, have, pos = [first.to(torch.float16)], first.shape[2], first.shape[2] + 512
    while have < need:
        n = min(1024, need - have)
        parts.append(capture_kv(model, text_ids[pos:pos + n]).to(torch.float16))
        have, pos = have + n, pos + n
    return torch.cat(parts, dim=2)[:, :, :need].contiguous()


def _speed(codec: Any, kv: torch.Tensor, repeat: int) -> tuple[float, float]:
    from kvmw.quantizers import decode_blob

    blob = codec.encode(kv, "f" * 32)
    enc = median_seconds(lambda: codec.encode(kv, "f" * 32), repeat)
    dec = median_seconds(lambda: decode_blob(blob), repeat)
    n = kv.numel() * 2
    return gbps(n, enc), gbps(n, dec)


def _round_trip(codec: Any, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """decode(encode(kv)) chunk by chunk; returns fp32 KV and the stored bytes."""
    from kvmw.quantizers import decode_blob

    out, stored = [], 0
    for i, chunk in enumerate(kv.split(CHUNK, dim=2)):
        positions = torch.arange(i * CHUNK, i * CHUNK + chunk.shape[2])
        blob = codec.encode(chunk.contiguous(), "f" * 32, positions=positions)
        stored += len(blob)
        out.append(decode_blob(blob)[0])
    return torch.cat(out, dim=2).float(), stored


@torch.inference_mode()
def _continue(model: Any, kv: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs of each next token after `kv` + tokens[:i] (one forward, teacher-forced)."""
    from kvmw.integrations.hf.capture import to_dynamic_cache

    cache = to_dynamic_cache(kv.to(next(model.parameters()).dtype), model.config)
    logits = model(tokens[None], past_key_values=cache).logits[0].float()
    return F.log_softmax(logits, dim=-1)


@torch.inference_mode()
def _greedy(model: Any, kv: torch.Tensor, last: torch.Tensor, steps: int) -> torch.Tensor:
    """The full cache's greedy continuation (reference path only; one token per step)."""
    from kvmw.integrations.hf.capture import to_dynamic_cache

    cache = to_dynamic_cache(kv, model.config)
    out, nxt = [], last
    for _ in range(steps):
        nxt = model(nxt[None], past_key_values=cache).logits[0, -1].argmax()[None]
        out.append(nxt)
    return torch.cat(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvmw.integrations.hf.capture import capture_kv
    from kvmw.integrations.hf.models import load
    from kvmw.quantizers import make_codec
    from kvmw.text_data import essay_text

    tune_allocator()
    threads = torch.get_num_threads()
    model, tok = load(args.model)
    text_ids = tok(essay_text(40_000), return_tensors="pt").input_ids[0]
    ctx = text_ids[: args.context]
    held_out = text_ids[args.context: args.context + args.held_out]
    print(f"[bench] {args.model}: prefill of {len(ctx)} context tokens", flush=True)
    full = capture_kv(model, ctx)  # fp32, the model's own cache
    prefix_kv = full[:, :, :-1]
    greedy = _greedy(model, prefix_kv, ctx[-1:], STEPS)
    cont_in = torch.cat([ctx[-1:], greedy[:-1]])  # step i sees the context + greedy[:i]
    ref_cont = _continue(model, prefix_kv, cont_in)
    ppl_in = torch.cat([ctx[-1:], held_out])
    ref_ppl_lp = _continue(model, prefix_kv, ppl_in[:-1])
    ref_ppl = torch.exp(-ref_ppl_lp.gather(1, ppl_in[1:, None]).mean()).item()

    kv16 = full.to(torch.float16)
    big = _speed_kv(model, text_ids, full, 32 << 20)
    small = big[:, :, : -(-(3 << 20) // (big[:, :, :1].numel() * 2))].contiguous()
    torch.set_num_threads(1)
    dst = memoryview(bytearray(big.numel() * 2))
    src = memoryview(big.view(-1).view(torch.uint8).numpy())
    memcpy = gbps(big.numel() * 2, median_seconds(lambda: dst.__setitem__(slice(None), src), 5))
    torch.set_num_threads(threads)

    results: dict[str, Any] = {}
    rows = []
    for spec in args.codecs:
        codec = make_codec(spec)
        print(f"[bench] {spec}", flush=True)
        torch.set_num_threads(1)
        enc32, dec32 = _speed(codec, big, args.repeat)
        enc3, dec3 = _speed(codec, small, args.repeat * 3)
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        approx, stored = _round_trip(codec, kv16[:, :, :-1])
        ratio = kv16[:, :, :-1].numel() * 2 / stored
        err_k = ((approx[:, 0] - prefix_kv[:, 0]).norm() / prefix_kv[:, 0].norm()).item()
        err_v = ((approx[:, 1] - prefix_kv[:, 1]).norm() / prefix_kv[:, 1].norm()).item()
        cont = _continue(model, approx, cont_in)
        kl = F.kl_div(cont, ref_cont, log_target=True, reduction="none").sum(-1).mean().item()
        agreement = (cont.argmax(-1) == greedy).float().mean().item()
        lp = _continue(model, approx, ppl_in[:-1])
        ppl = torch.exp(-lp.gather(1, ppl_in[1:, None]).mean()).item()
        r = {"ratio": ratio, "encode_gbps": enc32, "decode_gbps": dec32, "encode_gbps_3mib": enc3,
             "decode_gbps_3mib": dec3, "encode_memcpy_ratio": enc32 / memcpy,
             "decode_memcpy_ratio": dec32 / memcpy, "rel_err_k": err_k, "rel_err_v": err_v,
             "kl": kl, "greedy_agreement": agreement, "ppl": ppl,
             "ppl_increase_pct": (ppl / ref_ppl - 1) * 100, "fidelity_seconds": time.perf_counter() - t0}
        results[spec] = r
        rows.append([spec, ratio, enc32, dec32, enc3, dec3, err_k, err_v, kl, agreement,
                     r["ppl_increase_pct"]])
    print()
    print(f"{args.model}: context {len(ctx)} tokens, {STEPS} continuation steps, {len(held_out)} held-out "
          f"tokens (full-cache ppl {ref_ppl:.3f}); memcpy {memcpy:.2f} GB/s (1 thread, 32 MiB); "
          f"allocator: {allocator_setting()}")
    print_table(["codec", "ratio", "enc GB/s", "dec GB/s", "enc 3MiB", "dec 3MiB", "err K", "err V",
                 "KL", "agree", "ppl +%"], rows)
    out = {"codecs": results, "model": args.model, "memcpy_gbps": memcpy, "ref_ppl": ref_ppl,
           "context_tokens": len(ctx), "held_out_tokens": len(held_out), "steps": STEPS,
           "allocator": allocator_setting(), "machine": machine()}
    write_json(args.json, out)
    if plots.plot_path(args):
        _plot(results, args, plots.plot_path(args))
    return out


def _plot(results: dict[str, Any], args: argparse.Namespace, path: str) -> None:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "kl", "next-token KL vs full cache (log)"),
                           (axes[1], "ppl_increase_pct", "perplexity increase % (symlog)")):
        for i, (name, r) in enumerate(results.items()):
            y = max(r[key], 1e-6) if key == "kl" else r[key]
            ax.scatter(r["ratio"], y)
            # alternate above / below: codecs of one ratio (int8, int8+zstd) sit on top of each other
            ax.annotate(name, (r["ratio"], y), fontsize=7, xytext=(3, 3 if i % 2 else -10),
                        textcoords="offset points")
        ax.set_xlabel("compression ratio vs fp16")
        ax.set_ylabel(label)
        ax.set_yscale("log" if key == "kl" else "symlog", **({} if key == "kl" else {"linthresh": 0.1}))
        ax.grid(alpha=0.3)
    plots.save(fig, path, f"kvmw codecs on {args.model} KV: size vs quality", args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", choices=["smollm2", "qwen0.5b"], help="installed model (python -m kvmw.integrations.hf.models install NAME)")
    p.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, help="codec specs measured")
    p.add_argument("--context", type=int, default=1024, help="context tokens that get compressed")
    p.add_argument("--held-out", type=int, default=512, help="held-out tokens for perplexity")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per speed cell (x3 for 3 MiB)")
    p.add_argument("--json", default="", help="write the results here (JSON)")
    plots.add_plot_argument(p, "compression ratio vs quality per codec")

