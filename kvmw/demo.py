"""`kvmw demo` (`make demo`): real KV through every tier and back, checked against the model.

SmolLM2 prefills essay text; its KV is cut into chunks under prefix-chain keys,
encoded, stored in each tier (CPU, disk, Redis) and in the tiered stack (CPU
with write-through to disk and Redis), loaded back and decoded. For each it
prints the bytes stored, the time to load versus the time to recompute the
prefill, whether the KV is bit-identical, and whether the model's next-token
logits from the loaded cache match a fresh prefill.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from typing import Any

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", choices=["smollm2", "qwen0.5b"])
    p.add_argument("--tokens", type=int, default=1024, help="prompt tokens of essay text")
    p.add_argument("--codec", default="none", help='codec spec, e.g. "none", "zstd", "none+zstd:shuffle"')
    p.add_argument("--chunk-size", type=int, default=256)


def _step(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run(args: argparse.Namespace) -> int:
    from kvmw.bench.common import print_table
    from kvmw.config import KVMWConfig
    from kvmw.fingerprint import ModelFingerprint
    from kvmw.integrations.hf.capture import capture_kv, to_dynamic_cache
    from kvmw.integrations.hf.models import load
    from kvmw.keys import KeySpace
    from kvmw.layout import split_tokens
    from kvmw.memory import tune_allocator
    from kvmw.quantizers import decode_blob, make_codec
    from kvmw.storage_tiers import build_store
    from kvmw.text_data import essay_text

    tune_allocator()
    _step(f"loading {args.model}")
    model, tok = load(args.model)
    fp = ModelFingerprint.from_hf(model)
    ids = tok(essay_text(args.tokens * 8), return_tensors="pt").input_ids[0, : args.tokens + 1]
    prompt, next_id = ids[:-1], ids[-1:]

    _step(f"prefill of {len(prompt)} tokens (the cold path)")
    t0 = time.perf_counter()
    kv = capture_kv(model, prompt)
    prefill_s = time.perf_counter() - t0
    with torch.inference_mode():
        ref_logits = model(next_id[None], past_key_values=to_dynamic_cache(kv, model.config)).logits[0, -1]

    space = KeySpace(fp, args.chunk_size)
    keys = space.prefix_keys(prompt)
    chunks = split_tokens(kv, args.chunk_size)[: len(keys)]
    codec = make_codec(args.codec)
    t0 = time.perf_counter()
    blobs = [codec.encode(c, fp.digest, positions=torch.arange(i * args.chunk_size, (i + 1) * args.chunk_size))
             for i, c in enumerate(chunks)]
    encode_s = time.perf_counter() - t0
    raw_bytes = sum(c.numel() * c.element_size() for c in chunks)
    stored = sum(len(b) for b in blobs)
    covered = len(keys) * args.chunk_size

    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvmw-demo-") as tmp:
        base = KVMWConfig.load(disk_path=tmp, redis_prefix=f"kvmw-demo:{uuid.uuid4().hex[:8]}:")
        for tiers in (["cpu"], ["disk"], ["redis"], ["cpu", "disk", "redis"]):
            label = "+".join(tiers)
            _step(f"store -> load through {label}")
            store = build_store(base.replace(tiers=tiers))
            t0 = time.perf_counter()
            for k, b in zip(keys, blobs):
                store.put(k, b)
            store.flush(60)
            put_s = time.perf_counter() - t0
            if len(tiers) > 1:  # load from the bottom: a new process would find only Redis
                for t in store.tiers[:-1]:
                    for k in keys:
                        t.delete(k)
            t0 = time.perf_counter()
            hits = store.prefix_hits(keys)
            got = [store.get(k, fp.digest) for k in keys[:hits]]
            loaded = [decode_blob(b, fp.digest)[0] for b in got if b is not None]
            load_s = time.perf_counter() - t0
            healthy = all(store.healthy().values())
            if len(loaded) != len(keys):
                rows.append([label, f"{len(loaded)}/{len(keys)} chunks", "-", "-", "-", "-", "-", "-"])
                store.close()
                continue
            full = torch.cat(loaded, dim=2).to(kv.dtype)
            exact = torch.equal(full, kv[:, :, :covered])
            err = ((full - kv[:, :, :covered]).norm() / kv[:, :, :covered].norm()).item()
            # continue from the loaded prefix + the recomputed tail, as an engine would
            tail = kv[:, :, covered:]
            cache = to_dynamic_cache(torch.cat([full, tail], dim=2), model.config)
            with torch.inference_mode():
                logits = model(next_id[None], past_key_values=cache).logits[0, -1]
            diff = (logits - ref_logits).abs().max().item()
            rows.append([label, f"{hits}/{len(keys)}", stored, put_s * 1e3, load_s * 1e3,
                         prefill_s * covered / len(prompt) * 1e3,
                         (prefill_s * covered / len(prompt)) / load_s,
                         "yes" if exact else f"no (rel err {err:.1e})",
                         f"{diff:.2e}" + ("" if healthy else " (tier down)")])
            store.close()

    print()
    print(f"model {args.model} ({fp.architecture}, {fp.num_layers} layers, {fp.num_kv_heads} kv heads), "
          f"{len(prompt)} prompt tokens, {len(keys)} chunks of {args.chunk_size}, codec {codec.spec}")
    print(f"KV {raw_bytes / 2**20:.1f} MiB ({kv.dtype}) -> stored {stored / 2**20:.1f} MiB "
          f"(ratio {raw_bytes / stored:.2f}x), encode {encode_s * 1e3:.0f} ms")
    print_table(["tiers", "chunks hit", "bytes stored", "put ms", "load+decode ms", "recompute ms",
                 "speedup", "KV identical", "next-token logit diff"], rows)
    print("recompute ms = the prefill time of the covered tokens on this machine; "
          "load+decode = prefix lookup + get + checksum + decode of every chunk")
    loaded_all = all(len(r) > 7 for r in rows)
    ok = loaded_all and (not codec.is_lossless or all(r[7] == "yes" for r in rows))
    return 0 if ok else 1
