"""A vLLM engine in a child process, driven by JSON commands (tests and `kvmw bench vllm`).

vLLM keeps process-global state (the distributed groups, *the* KV connector of
the process), so two engines - one with kvmw, one without - cannot share a
process. `EngineProcess` starts ``python -m kvmw.testing.vllm_engine``,
which builds one single-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
uni executor: scheduler and worker in the child) and answers one command per
line: generate (token ids in, token ids / cached-token counts / wall time out),
stats, and store manipulations the failure tests need (corrupt a stored chunk
in every tier, empty a tier, kill a Redis or stall at the next read).

Replies are lines ``@@kvmw@@ {json}`` on stdout, so vLLM's own logging can share
the stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

MARK = "@@kvmw@@ "

#: engine settings VLLM.md found right for these CPU machines
CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


class EngineError(RuntimeError):
    pass


class EngineProcess:
    """One engine in a child process. `engine`: keyword arguments of `vllm.LLM`
    (``kv_transfer_config`` as a dict), on top of the CPU defaults below."""

    def __init__(self, model: str, engine: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 start_timeout: float = 600.0) -> None:
        kwargs = {"dtype": "float32", "block_size": 32, "enforce_eager": True, "enable_prefix_caching": False,
                  "distributed_executor_backend": "uni", "max_model_len": 4096, "seed": 0,
                  "skip_tokenizer_init": True, **(engine or {})}
        child_env = {**os.environ, **CPU_ENV, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmw.testing.vllm_engine"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env, bufsize=1)
        self.log: list[str] = []
        self._send({"op": "start", "model": model, "engine": kwargs})
        self._reply(start_timeout)

    def _send(self, msg: dict[str, Any]) -> None:
        if self.proc.poll() is not None:
            raise EngineError(f"engine process exited ({self.proc.returncode}):\n" + "".join(self.log[-60:]))
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def _reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise EngineError(f"engine process ended ({self.proc.wait()}):\n" + "".join(self.log[-80:]))
            if line.startswith(MARK):
                out = json.loads(line[len(MARK):])
                if "error" in out:
                    raise EngineError(out["error"])
                return out
            self.log.append(line)
            if time.monotonic() > deadline:
                raise EngineError("engine did not answer in time:\n" + "".join(self.log[-60:]))

    def call(self, op: str, timeout: float = 600.0, **args: Any) -> dict[str, Any]:
        self._send({"op": op, **args})
        return self._reply(timeout)

    def generate(self, prompts: list[list[int]], max_tokens: int = 8, salts: list[str | None] | None = None,
                 logprobs: int | None = None, params: list[dict[str, Any] | None] | None = None
                 ) -> list[dict[str, Any]]:
        """Greedy outputs: per prompt ``{"tokens", "cached", "logprobs"?, "kv_transfer_params"}``
        (`params`: each prompt's kv_transfer_params); the batch's wall time is in the reply's
        ``seconds`` (see `timed_generate`)."""
        return self.call("generate", prompts=prompts, max_tokens=max_tokens, salts=salts,
                         logprobs=logprobs, params=params)["outputs"]

    def timed_generate(self, prompts: list[list[int]], max_tokens: int = 1) -> tuple[list[dict[str, Any]], float]:
        r = self.call("generate", prompts=prompts, max_tokens=max_tokens)
        return r["outputs"], r["seconds"]

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send({"op": "quit"})
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- the child ----------------------------------------------------------------------------------
def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


class _Child:
    def __init__(self, model: str, engine: dict[str, Any]) -> None:
        from vllm import LLM
        from vllm.config import KVTransferConfig

        ktc = engine.pop("kv_transfer_config", None)
        if ktc is not None:
            engine["kv_transfer_config"] = KVTransferConfig(**ktc)
        self.llm = LLM(model, **engine)

    def _connectors(self) -> dict[str, Any]:
        from kvmw.integrations.vllm.connector import ACTIVE

        return ACTIVE

    def _store(self):
        return self._connectors()["worker"].store

    def generate(self, prompts: list[list[int]], max_tokens: int, salts: list[str | None] | None = None,
                 logprobs: int | None = None, params: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
        from vllm import SamplingParams

        def sampling(i: int) -> SamplingParams:
            extra = {"kv_transfer_params": params[i]} if params and params[i] else None
            return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs, ignore_eos=True,
                                  extra_args=extra)

        sp = [sampling(i) for i in range(len(prompts))]
        inputs = []
        for i, ids in enumerate(prompts):
            p: dict[str, Any] = {"prompt_token_ids": ids}
            if salts and salts[i]:
                p["cache_salt"] = salts[i]
            inputs.append(p)
        t0 = time.perf_counter()
        outs = self.llm.generate(inputs, sp, use_tqdm=False)
        seconds = time.perf_counter() - t0
        worker = self._connectors().get("worker")
        if worker is not None:  # stores finish off the step: let them land before the next call
            worker.saver.flush(60)
            if worker._blender is not None:
                worker._blender.flush(60)
        result = []
        for o in outs:
            c = o.outputs[0]
            item: dict[str, Any] = {"tokens": list(c.token_ids), "cached": o.num_cached_tokens,
                                    "kv_transfer_params": o.kv_transfer_params}
            if logprobs:
                item["logprobs"] = [{str(k): v.logprob for k, v in step.items()} for step in c.logprobs]
            result.append(item)
        return {"outputs": result, "seconds": seconds}

    def stats(self) -> dict[str, Any]:
        act = self._connectors()
        out = {role: c.stats_dict() for role, c in act.items()}
        if "worker" in act:
            st = self._store().stats()
            out["store"] = {k: v for k, v in st.items() if k != "tiers"}
            out["tiers"] = {name: {"entries": t.get("entries"), "healthy": t.get("healthy")}
                            for name, t in st["tiers"].items()}
        return out

    def keys(self, prompt: list[int], salt: str | None = None) -> list[str]:
        return self._connectors()["scheduler"]._keyspace(salt).prefix_keys(prompt)

    def corrupt(self, prompt: list[int] | None = None, chunk: int = 0, key: str | None = None) -> dict[str, Any]:
        """Flip one payload byte of chunk `chunk` of `prompt` (or of the blob `key`) in every
        tier (tiers' own put, bypassing the store's checks)."""
        key = key or self.keys(prompt)[chunk]
        store = self._store()
        store.flush(30)
        done = []
        for tier in store.tiers:
            blob = tier.get(key)
            if blob is None:
                continue
            bad = bytearray(bytes(blob))
            bad[len(bad) - 17] ^= 0xFF
            tier.delete(key)
            tier.put(key, bad)
            done.append(tier.name)
        return {"tiers": done}

    def scramble(self, keys: list[str], seed: int = 0) -> dict[str, Any]:
        """Replace the KV stored under `keys` by random values of the same shape, positions
        and kind: valid blobs holding the wrong KV (what recomputation must overwrite)."""
        import torch

        from kvmw.quantizers import decode_blob

        worker = self._connectors()["worker"]
        store, digest = self._store(), worker.fingerprint.digest
        store.flush(30)
        g = torch.Generator().manual_seed(seed)
        done = 0
        for key in keys:
            blob, _ = store.fetch(key, digest)
            if blob is None:
                continue
            kv, meta = decode_blob(blob, digest)
            noise = (torch.randn(kv.shape, generator=g) * kv.float().std()).to(kv.dtype)
            store.delete(key)
            store.put(key, worker.codec.encode(noise, digest, positions=torch.as_tensor(meta.positions),
                                               extra={"kind": "document"}))
            done += 1
        store.flush(30)
        return {"scrambled": done}

    def clear(self, tier: str) -> dict[str, Any]:
        store = self._store()
        store.flush(30)
        n = 0
        for t in store.tiers:
            if t.name == tier:
                for key, _ in list(t.entries()):
                    t.delete(key)
                    n += 1
        return {"deleted": n}

    def kill_on_get(self, tier: str, pid: int) -> dict[str, Any]:
        """The next read from `tier` first SIGKILLs process `pid` (a Redis) and waits for it:
        the scheduler's lookup has already counted the chunks, the worker's load then fails."""
        import signal

        def kill() -> None:
            os.kill(pid, signal.SIGKILL)
            for _ in range(200):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.01)

        return self._before_next_read(tier, kill)

    def stall_on_get(self, tier: str, seconds: float) -> dict[str, Any]:
        """The next read from `tier` takes `seconds` longer (a tier that hangs after the lookup)."""
        return self._before_next_read(tier, lambda: time.sleep(seconds))

    def _before_next_read(self, tier: str, action: Any) -> dict[str, Any]:
        for t in self._store().tiers:
            if t.name == tier:
                original = t.get_many  # every read of the store goes through it
                armed = [True]

                def get_many(keys: list[str], _orig=original) -> Any:
                    if armed:
                        armed.clear()
                        action()
                    return _orig(keys)

                t.get_many = get_many
                return {"armed": True}
        return {"armed": False}

    def settings(self) -> dict[str, Any]:
        """The engine's prefix caching and async scheduling, as vLLM resolved them."""
        cfg = self.llm.llm_engine.vllm_config
        return {"enable_prefix_caching": bool(cfg.cache_config.enable_prefix_caching),
                "async_scheduling": bool(cfg.scheduler_config.async_scheduling)}

    def last_blend(self) -> dict[str, Any]:
        """The worker's last RAG blend: recomputed positions, held / end, block ids."""
        return {"blend": self._connectors()["worker"].last_blend}

    def pages(self, block_ids: list[int], start: int, end: int, path: str) -> dict[str, Any]:
        """Write the KV of a request's tokens [start, end) as the pages hold it now to `path`
        (.npy, [L, 2, T, H, D] float32)."""
        import numpy as np
        import torch

        from kvmw.integrations.vllm.paged_layout import slots_for_tokens

        worker = self._connectors()["worker"]
        slots = slots_for_tokens(block_ids, 0, start, end, worker.block_size)
        layers = sorted(worker._layer_index.items(), key=lambda kv: kv[1])
        kv = torch.stack([worker._layout.gather(worker._kv_caches[name], slots) for name, _ in layers])
        np.save(path, kv.float().numpy(), allow_pickle=False)
        return {"shape": list(kv.shape)}

    def reset_prefix_cache(self) -> dict[str, Any]:
        """Empty vLLM's own prefix cache (kvmw's tiers keep theirs)."""
        return {"reset": bool(self.llm.reset_prefix_cache())}

    def flush(self) -> dict[str, Any]:
        return {"flushed": self._store().flush(60)}


def _child_main() -> int:
    child: _Child | None = None
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.pop("op")
        try:
            if op == "start":
                child = _Child(msg["model"], msg["engine"])
                _reply({"ready": True})
            elif op == "quit":
                if child is not None and "worker" in child._connectors():
                    child.flush()  # lower tiers are written in the background
                _reply({"bye": True})
                break
            else:
                _reply(getattr(child, op)(**msg))
        except Exception as e:  # report, keep serving
            import traceback

            _reply({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})
    os._exit(0)  # skip vLLM's slow interpreter-exit hooks


if __name__ == "__main__":
    sys.exit(_child_main())
