"""`kvmw bench faults`: a fault campaign against real parts; what was tried, what was lost.

Every case runs against the real thing (blob decoders, a disk folder, a Redis
process, a `kvmw serve` process, SmolLM2 through the HF hook) and counts, in JSON
``faults.<case>.tried / .wrong / .lost / .failed_requests``:

- ``blobs``: `--blobs` damaged blobs made from real codec output of every codec:
  random bytes, truncations, bit flips, frames whose metadata or payload length was
  forged under a recomputed checksum, and another model's blobs. Each goes through
  its decoder and, stored raw, through every tier behind a `TieredStore` (cpu, disk,
  redis, server). ``wrong``: one that came back as KV (a miss or a typed
  `BlobError` is right); ``crashed``: any other exception. A self-consistent frame
  written by someone who can write to the store is a valid blob: the checksum
  guards integrity, the fingerprint and salted keys guard mixing, not authenticity.
- ``keys``: keys of 1 B to 64 KiB SET and read back through `kvmw serve`, Redis
  and the disk tier; ``wrong``: a value read back different, or a tier marked down
  by one key.
- ``server_kill``: `kvmw serve` (with its disk) SIGKILLed `--kills` times under 32
  clients writing and calling KVMW.SYNC; after each restart every value whose SYNC
  answered +OK is read back: ``lost`` = missing or different.
- ``preauth``: against a server with a token, slow-loris clients that never finish
  a frame and clients announcing huge frames before AUTH; ``rss_growth_mib`` of the
  server and ``failed_requests`` of an authenticated client meanwhile.
- ``redis_restart_hf``: SmolLM2 through the HF hook on a private Redis that is
  killed and restarted between and during requests; ``failed_requests`` (raised)
  and ``wrong`` (an answer unlike plain `generate`'s).
- ``disk_full``: a disk tier on a 1 MiB tmpfs filled to ENOSPC behind a store
  with a memory tier; ``wrong`` = a put the store lost from every tier or a read
  that failed while the memory tier held the value (needs root to mount).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import torch

from kvmw.bench.common import machine, print_table, write_json

CODECS = ["none", "zstd", "fp8", "int8", "int4", "kivi4", "kivi2", "cachegen", "int8+zstd"]
FP = "f" * 32
OTHER_FP = "0" * 32


# ---- blobs ----------------------------------------------------------------------------------
def _base_blobs(rng: random.Random) -> list[tuple[str, bytes, torch.Tensor]]:
    """(codec, blob, decoded KV) of real codec output for every codec."""
    from kvmw.quantizers import decode_blob, make_codec

    out = []
    for spec in CODECS:
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        kv = torch.randn(2, 2, 32, 2, 64, generator=g).to(torch.float16)  # kv_heads*head_dim: int4 groups of 64
        blob = bytes(make_codec(spec).encode(kv, FP, positions=torch.arange(32)))
        out.append((spec, blob, decode_blob(blob, FP)[0]))
    return out


def _mutations(blob: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """One damaged copy of each kind."""
    from kvmw.blob import parse_blob, pack_blob

    flipped = bytearray(blob)
    for _ in range(rng.randrange(1, 9)):
        i = rng.randrange(len(flipped))
        flipped[i] ^= 1 << rng.randrange(8)
    parsed = parse_blob(blob)
    meta, payload = parsed.meta, bytes(parsed.payload)
    forged_meta = _forged_meta(meta, rng)
    cut = rng.randrange(1, max(2, len(payload)))
    foreign = type(meta)(**{**meta.__dict__, "fingerprint": OTHER_FP})
    return [
        ("random", rng.randbytes(len(blob))),
        ("truncated", blob[:rng.randrange(len(blob))]),
        ("bit_flip", bytes(flipped)),
        ("forged_meta", bytes(pack_blob(forged_meta, payload))),
        ("forged_payload", bytes(pack_blob(meta, payload[:cut] if rng.random() < 0.5
                                            else payload + rng.randbytes(cut)))),
        ("other_model", bytes(pack_blob(foreign, payload))),
    ]


def _forged_meta(meta: Any, rng: random.Random) -> Any:
    """The same payload under metadata that disagrees with it (recomputed checksum)."""
    import numpy as np

    kind = rng.randrange(5)
    fields = dict(meta.__dict__)
    shape = list(meta.shape)
    if kind == 0:  # another shape of the same element count: not the chunk asked for
        shape[2], shape[4] = shape[4], shape[2]  # 32 tokens x 64 dims: 64 tokens x 32 dims
        fields["shape"] = tuple(shape)
    elif kind == 1:
        fields["dtype"] = rng.choice(["float32", "bfloat16", "int8", "complex64", "nonsense"])
    elif kind == 2:
        fields["codec"] = rng.choice([c for c in ("int8", "fp8", "kivi2", "cachegen", "none", "rot13")
                                      if c != meta.codec])
    elif kind == 3:
        fields["codec_params"] = {k: rng.choice([0, -1, 10 ** 9, "x", None, [1, 2]]) for k in
                                  (list(meta.codec_params) or ["bits"])}
    else:
        fields["positions"] = np.arange(rng.choice([0, 1, 31, 33, 4096]), dtype=np.int32)
    return type(meta)(**fields)


def _decodes_to_kv(blob: bytes, want: torch.Tensor) -> tuple[bool, bool]:
    """(came back as KV other than `want`, crashed with an untyped exception)."""
    from kvmw.errors import BlobError
    from kvmw.quantizers import decode_blob

    out = torch.empty_like(want)
    try:
        decode_blob(blob, FP, out=out)
    except BlobError:
        return False, False
    except Exception:  # noqa: BLE001 - counted: anything but a typed error is a bug
        return False, True
    return not torch.equal(out, want), False


def case_blobs(n: int, tiers: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    from kvmw.storage_tiers import TieredStore

    import logging

    logging.getLogger("kvmw.store").setLevel(logging.ERROR)  # one warning per dropped blob: thousands
    rng = random.Random(seed)
    base = _base_blobs(rng)
    stores = {name: TieredStore([tier], retry_backoff=0.0) for name, tier in tiers.items()}
    tried = wrong = crashed = 0
    per_kind: dict[str, int] = {}
    per_tier_wrong = {name: 0 for name in stores}
    i = 0
    print(f"[bench] blobs: {n} damaged blobs of {len(CODECS)} codecs through their decoders and "
          f"{', '.join(stores)}", flush=True)
    while tried < n:
        spec, blob, kv = base[i % len(base)]
        for kind, bad in _mutations(blob, rng):
            if tried >= n:
                break
            tried += 1
            per_kind[kind] = per_kind.get(kind, 0) + 1
            is_wrong, is_crash = _decodes_to_kv(bad, kv)
            wrong += is_wrong
            crashed += is_crash
            key = hashlib.sha256(f"{seed}:{tried}".encode()).hexdigest()[:32]
            for name, store in stores.items():
                store.tiers[0].put(key, bad)  # raw, as a damaged disk or a foreign writer leaves it
                got = store.get(key, FP)
                if got is not None and _decodes_to_kv(bytes(got), kv)[0]:
                    per_tier_wrong[name] += 1
                store.tiers[0].delete(key)
        i += 1
        if tried % 2000 < 6:
            print(f"[bench] blobs: {tried}/{n}", flush=True)
    healthy = all(all(s.healthy().values()) for s in stores.values())
    for s in stores.values():
        s.close()
    return {"tried": tried, "wrong": wrong + sum(per_tier_wrong.values()), "crashed": crashed,
            "decoder_wrong": wrong, "tier_wrong": per_tier_wrong, "kinds": per_kind,
            "tiers_stayed_healthy": healthy, "lost": 0, "failed_requests": 0}


# ---- keys -----------------------------------------------------------------------------------
def case_keys(server_port: int, redis_url: str, disk_dir: str) -> dict[str, Any]:
    """Keys of 1 B to 64 KiB through kvmw serve and Redis (raw RESP clients) and the disk
    tier behind a store (its names are hex digests there; here the raw key, to see the
    per-key refusal of names the file system cannot hold)."""
    import redis

    from kvmw.storage_tiers import DiskTier, TieredStore

    sizes = [1, 2, 15, 100, 110, 120, 200, 255, 256, 1000, 4096, 16384, 65536]
    tried = wrong = 0
    out: dict[str, Any] = {}
    for name, client in (("server", redis.Redis(port=server_port, socket_timeout=10)),
                         ("redis", redis.Redis.from_url(redis_url, socket_timeout=10))):
        bad = []
        for size in sizes:
            key = os.urandom(size)
            value = os.urandom(64)
            tried += 1
            try:
                client.set(key, value)
                if name == "server":  # durable, or it says why not
                    client.execute_command("KVMW.SYNC")
                ok = client.get(key) == value and client.exists(key) == 1
                client.delete(key)
            except Exception as e:  # noqa: BLE001 - a failed request is counted, not raised
                ok = False
                bad.append(f"{size}: {type(e).__name__}: {e}")
            if not ok:
                wrong += 1
                bad.append(size)
        out[name] = {"failed_sizes": bad}
        client.close()
    store = TieredStore([DiskTier(disk_dir, 1 << 30, fsync=False)], retry_backoff=60)
    rejected = 0
    for size in sizes:
        key = "k" * size
        tried += 1
        stored = store.put(key, b"KVMW-not-a-blob-but-bytes")
        got = store.tiers[0].get(key) if stored else None
        if stored and (got is None or bytes(got) != b"KVMW-not-a-blob-but-bytes"):
            wrong += 1
        rejected += not stored
    healthy = store.healthy()["disk"]
    wrong += not healthy
    out["disk"] = {"rejected_keys": rejected, "key_errors": store.counts["key_errors"], "healthy": healthy}
    store.close()
    return {"tried": tried, "wrong": wrong, "lost": 0, "failed_requests": 0, **out}


# ---- server kills ---------------------------------------------------------------------------
def case_server_kill(kills: int, clients: int, seconds: float) -> dict[str, Any]:
    import redis

    from kvmw.bench.server import start_kvmw_serve

    with tempfile.TemporaryDirectory(prefix="kvmw-faults-kill-") as disk:
        synced: dict[bytes, bytes] = {}
        lock = threading.Lock()
        tried = lost = sync_errors = 0
        for k in range(kills):
            proc, port = start_kvmw_serve(disk, memory_only=False)
            stop = threading.Event()
            counts = {"sets": 0, "syncs": 0, "sync_errors": 0}

            def writer(c: int, port: int = port, stop: threading.Event = stop, counts: dict = counts) -> None:
                r = redis.Redis(port=port, socket_timeout=10)
                mine: dict[bytes, bytes] = {}
                i = 0
                try:
                    while not stop.is_set():
                        key = b"k%d:%d:%d" % (k, c, i)
                        body = os.urandom(random.randrange(1, 64 << 10))
                        r.set(key, body)
                        mine[key] = body
                        counts["sets"] += 1
                        i += 1
                        if i % 8 == 0:
                            try:
                                r.execute_command("KVMW.SYNC")
                            except redis.exceptions.ResponseError:
                                counts["sync_errors"] += 1
                                mine.clear()  # not promised durable
                                continue
                            with lock:
                                synced.update(mine)
                            counts["syncs"] += 1
                            mine.clear()
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass  # killed under us: what was not synced is not promised

            threads = [threading.Thread(target=writer, args=(c,)) for c in range(clients)]
            for t in threads:
                t.start()
            time.sleep(seconds)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stop.set()
            for t in threads:
                t.join(30)
            sync_errors += counts["sync_errors"]
            print(f"[bench] server_kill {k + 1}/{kills}: {counts['sets']} SETs, {counts['syncs']} SYNCs "
                  f"acknowledged, then SIGKILL", flush=True)
        proc, port = start_kvmw_serve(disk, memory_only=False)
        try:
            r = redis.Redis(port=port, socket_timeout=30)
            for key, body in synced.items():
                tried += 1
                lost += r.get(key) != body
        finally:
            proc.terminate()
            proc.wait(60)
    return {"tried": tried, "lost": lost, "wrong": 0, "failed_requests": 0, "kills": kills,
            "clients": clients, "sync_errors": sync_errors}


# ---- pre-auth -------------------------------------------------------------------------------
def case_preauth(connections: int) -> dict[str, Any]:
    import socket

    import redis

    from kvmw.testing.redis_process import free_port, ping

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kvmw-faults-auth-") as tmp:
        token = os.path.join(tmp, "token")
        with open(token, "w") as f:
            f.write("faults-token")
        proc = subprocess.Popen([sys.executable, "-m", "kvmw", "serve", "--port", str(port), "--memory-only",
                                 "--host", "0.0.0.0", "--token-file", token, "--auth-timeout", "5"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not ping("127.0.0.1", port, 0.2):
                time.sleep(0.05)
            rss0 = _rss_mib(proc.pid)
            socks, refused = [], 0
            for i in range(connections):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                frame = [b"*2\r\n$3\r\nGET\r\n", b"*1\r\n$536870000\r\n" + b"x" * 4000,
                         b"*2000000\r\n", b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000000\r\n"][i % 4]
                try:
                    s.sendall(frame)
                except OSError:
                    refused += 1
                socks.append(s)
            time.sleep(0.5)
            rss1 = _rss_mib(proc.pid)
            failed = 0
            client = redis.Redis(port=port, password="faults-token", socket_timeout=10)
            for i in range(200):
                try:
                    client.set(b"ok%d" % i, b"v" * 1000)
                    failed += client.get(b"ok%d" % i) != b"v" * 1000
                except Exception:  # noqa: BLE001
                    failed += 1
            closed = 0
            for s in socks:
                try:
                    s.settimeout(6)
                    while s.recv(4096):
                        pass
                    closed += 1
                except OSError:
                    pass
                s.close()
        finally:
            proc.kill()
            proc.wait()
    return {"tried": connections, "wrong": 0, "lost": 0, "failed_requests": failed,
            "rss_growth_mib": rss1 - rss0, "closed_by_server": closed}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


# ---- Redis restarts under the HF hook -------------------------------------------------------
def case_redis_restart_hf(requests: int) -> dict[str, Any]:
    from kvmw.config import KVMWConfig
    from kvmw.integrations.hf import KVMW
    from kvmw.integrations.hf.models import load
    from kvmw.storage_tiers import RedisTier, TieredStore
    from kvmw.testing.redis_process import RedisProcess
    from kvmw.text_data import essay_text

    model, tok = load("smollm2")
    text = essay_text(6000)
    prompts = [tok(text[i * 300:i * 300 + 2400], return_tensors="pt").input_ids[:, :300 + 37 * (i % 3)]
               for i in range(4)]
    with torch.inference_mode():
        want = [model.generate(p, max_new_tokens=6, do_sample=False) for p in prompts]
    failed = wrong = 0
    rp = RedisProcess().start()
    tier = RedisTier(rp.url, prefix="faults:", timeout=0.5)
    store = TieredStore([tier], retry_backoff=0.1)
    hook = KVMW(model, tok, KVMWConfig.load(env={}, chunk_size=64), store=store)
    kill_at = {requests // 3, 2 * requests // 3}
    try:
        for r in range(requests):
            if r in kill_at:  # killed 20 ms into this request (its loads), back 0.5 s later, empty
                threading.Timer(0.02, rp.kill).start()
                threading.Timer(0.5, rp.start).start()
            i = r % len(prompts)
            try:
                with torch.inference_mode():
                    out = hook.generate(prompts[i], max_new_tokens=6, do_sample=False)
                wrong += not torch.equal(out, want[i])
            except Exception:  # noqa: BLE001 - a failed request is what this case counts
                failed += 1
        stats = hook.stats()
    finally:
        hook.close()
        time.sleep(0.5)
        rp.kill()
    return {"tried": requests, "failed_requests": failed, "wrong": wrong, "lost": 0,
            "tokens_reused": stats["tokens_reused"], "load_failures": stats["load_failures"]}


# ---- Redis restarts beneath vLLM ------------------------------------------------------------
def case_redis_restart_vllm(rounds: int) -> dict[str, Any]:
    """A vLLM engine (one process, prefix caching on) whose only kvmw tier is a private
    Redis; each round asks the same prompts again (hits from Redis), and in the middle
    rounds Redis is killed 50 ms into the batch and restarted empty 1 s later. The
    reference is the first, cold round (kvmw's tests hold it to vLLM without kvmw)."""
    from kvmw.integrations.hf.models import install
    from kvmw.integrations.vllm import kv_transfer_config
    from kvmw.testing.redis_process import RedisProcess
    from kvmw.testing.vllm_engine import EngineProcess
    from kvmw.text_data import essay_text
    from transformers import AutoTokenizer

    path = str(install("smollm2"))
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(essay_text(20000)).input_ids
    prompts = [ids[i * 700:i * 700 + 600 + 40 * i] for i in range(4)]
    rp = RedisProcess().start()
    cfg = kv_transfer_config(chunk_size=128, tiers=["redis"], redis_url=rp.url, retry_backoff=0.2,
                             lookup_timeout=0.1, load_timeout=1.0)
    failed = wrong = tried = 0
    cached = 0
    try:
        with EngineProcess(path, {"kv_transfer_config": cfg, "enable_prefix_caching": True,
                                  "max_model_len": 1536, "num_gpu_blocks_override": 96}) as eng:
            want = [o["tokens"] for o in eng.generate(prompts, max_tokens=8)]
            for r in range(rounds):
                if 0 < r < rounds - 1:
                    threading.Timer(0.05, rp.kill).start()
                    threading.Timer(1.0, rp.start).start()
                eng.call("reset_prefix_cache")  # hits come from kvmw's Redis, not vLLM's own cache
                try:
                    outs = eng.generate(prompts, max_tokens=8)
                except Exception:  # noqa: BLE001 - counted: the engine must not fail
                    failed += len(prompts)
                    continue
                tried += len(prompts)
                wrong += sum(o["tokens"] != w for o, w in zip(outs, want))
                cached += sum(o["cached"] for o in outs)
                time.sleep(1.2)  # Redis back before the next round
    finally:
        rp.kill()
    return {"tried": tried, "failed_requests": failed, "wrong": wrong, "lost": 0, "cached_tokens": cached}


# ---- disk full ------------------------------------------------------------------------------
def case_disk_full(puts: int) -> dict[str, Any]:
    from kvmw.quantizers import make_codec
    from kvmw.storage_tiers import CPUTier, DiskTier, TieredStore

    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs", "tried": 0, "wrong": 0, "lost": 0, "failed_requests": 0}
    mnt = tempfile.mkdtemp(prefix="kvmw-faults-full-")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt]).returncode:
        return {"skipped": "cannot mount a tmpfs here", "tried": 0, "wrong": 0, "lost": 0, "failed_requests": 0}
    try:
        store = TieredStore([CPUTier(1 << 30), DiskTier(mnt, 1 << 30)], retry_backoff=0.05)
        codec = make_codec("none")
        # 128 KiB each: the 1 MiB disk is full after 7
        blobs = {f"{i:032x}": bytes(codec.encode(torch.randn(2, 2, 256, 2, 32).half(), FP)) for i in range(puts)}
        wrong = failed = 0
        for key, blob in blobs.items():
            failed += not store.put(key, blob)
        store.flush(30)
        for key, blob in blobs.items():
            got = store.get(key, FP)
            wrong += got is None or bytes(got) != blob
        on_disk = sum(store.tiers[1].contains(list(blobs)))
        st = store.stats()
        store.close()
    finally:
        subprocess.run(["umount", "-l", mnt])
    return {"tried": puts, "wrong": wrong, "lost": 0, "failed_requests": failed, "on_disk": on_disk,
            "tier_errors": st["tier_errors"]}


# ---- the campaign ---------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from kvmw.bench.server import start_kvmw_serve
    from kvmw.storage_tiers import CPUTier, DiskTier, RedisTier
    from kvmw.storage_tiers.server_tier import ServerTier
    from kvmw.testing.redis_process import default_url

    redis_url = args.redis_url or default_url()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kvmw-faults-") as tmp:
        proc, port = start_kvmw_serve(os.path.join(tmp, "serve"), memory_only=False)  # with its disk spill
        try:
            prefix = f"kvmw-faults:{os.getpid()}:"
            tiers = {"cpu": CPUTier(1 << 30), "disk": DiskTier(os.path.join(tmp, "disk"), 1 << 30, fsync=False),
                     "redis": RedisTier(redis_url, prefix=prefix), "server": ServerTier(f"kvmw://127.0.0.1:{port}")}
            cases = args.cases
            if "blobs" in cases:
                results["blobs"] = case_blobs(args.blobs, tiers, args.seed)
            if "keys" in cases:
                results["keys"] = case_keys(port, redis_url, os.path.join(tmp, "keys"))
        finally:
            proc.kill()
            proc.wait()
            redis.Redis.from_url(redis_url).close()
    if "server_kill" in args.cases:
        results["server_kill"] = case_server_kill(args.kills, args.clients, args.kill_after)
    if "preauth" in args.cases:
        results["preauth"] = case_preauth(args.preauth_connections)
    if "redis_restart_hf" in args.cases:
        results["redis_restart_hf"] = case_redis_restart_hf(args.requests)
    if "redis_restart_vllm" in args.cases:
        results["redis_restart_vllm"] = case_redis_restart_vllm(args.vllm_rounds)
    if "disk_full" in args.cases:
        results["disk_full"] = case_disk_full(args.full_puts)
    rows = [[case, r.get("tried", 0), r.get("wrong", 0), r.get("lost", 0), r.get("failed_requests", 0),
             _note(case, r)] for case, r in results.items()]
    print()
    print_table(["case", "tried", "wrong", "lost", "failed requests", "notes"], rows)
    out = {"faults": results, "machine": machine()}
    write_json(args.json, out)
    return out


def _note(case: str, r: dict[str, Any]) -> str:
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    if case == "blobs":
        return f"crashed {r['crashed']}; kinds {r['kinds']}; tiers healthy {r['tiers_stayed_healthy']}"
    if case == "keys":
        return f"disk refused {r['disk']['rejected_keys']} names, stayed healthy {r['disk']['healthy']}"
    if case == "server_kill":
        return f"{r['kills']} SIGKILLs under {r['clients']} clients; SYNC errors {r['sync_errors']}"
    if case == "preauth":
        return f"server RSS +{r['rss_growth_mib']:.1f} MiB; {r['closed_by_server']} closed by the server"
    if case == "redis_restart_hf":
        return f"tokens reused {r['tokens_reused']}, load failures {r['load_failures']}"
    if case == "redis_restart_vllm":
        return f"prompt tokens from kvmw {r['cached_tokens']}"
    if case == "disk_full":
        return f"{r['on_disk']} of {r['tried']} on the full disk, the rest in memory"
    return ""


CASES = ["blobs", "keys", "server_kill", "preauth", "redis_restart_hf", "redis_restart_vllm", "disk_full"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES, help="fault cases to run")
    p.add_argument("--blobs", type=int, default=10000, help="damaged blobs through decoders and tiers")
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs of kvmw serve")
    p.add_argument("--clients", type=int, default=32, help="writing clients while kvmw serve is killed")
    p.add_argument("--kill-after", type=float, default=2.0, help="seconds of writes before each SIGKILL")
    p.add_argument("--preauth-connections", type=int, default=200, help="unauthenticated hostile connections")
    p.add_argument("--requests", type=int, default=24, help="HF requests while Redis is killed and restarted")
    p.add_argument("--vllm-rounds", type=int, default=4, help="rounds of prompts beneath vLLM (Redis killed in the middle ones)")
    p.add_argument("--full-puts", type=int, default=40, help="blobs put to a store over a 1 MiB disk")
    p.add_argument("--seed", type=int, default=0, help="seed of the damage")
    p.add_argument("--redis-url", default="", help="Redis of the blobs and keys cases "
                   "(default: KVMW_REDIS_URL or redis://127.0.0.1:6379/0)")
    p.add_argument("--json", default="", help="write the results here (JSON)")
