"""Find or start a local redis-server: for `make`'s setup, the tests and the benches.

``python -m kvmw.testing.redis_process ensure [URL]`` makes sure a Redis
answers on URL (default ``KVMW_REDIS_URL`` or redis://127.0.0.1:6379/0): if none
does and the address is loopback, it starts ``redis-server`` (installing it
with apt when running as root and it is missing). It never fails the build:
when it cannot get a Redis it says how to start one, and the Redis tests fail
with that same message.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HOW_TO = ("install Redis (apt install redis-server) and start one: "
          "redis-server --port 6379 --save '' --daemonize yes, or set KVMW_REDIS_URL")


def default_url() -> str:
    return os.environ.get("KVMW_REDIS_URL", "redis://127.0.0.1:6379/0")


def host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 6379


def ping(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary(install: bool = False) -> str | None:
    found = shutil.which("redis-server")
    if found or not install:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("[kvmw] installing redis-server with apt", flush=True)
        for cmd in (["apt-get", "install", "-y", "-qq", "redis-server"],
                    ["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "redis-server"]):
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            if shutil.which("redis-server"):
                break
    return shutil.which("redis-server")


class RedisProcess:
    """A redis-server child on loopback (no persistence) that tests can kill and restart."""

    def __init__(self, port: int | None = None, workdir: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError(f"redis-server not found: {HOW_TO}")
        self.binary = binary
        self.port = port or free_port()
        self.workdir = workdir or tempfile.mkdtemp(prefix="kvmw-redis-")
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisProcess":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir, *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not ping("127.0.0.1", self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> "RedisProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def ensure(url: str | None = None) -> bool:
    """True when a Redis answers on `url`, starting a local one if needed."""
    url = url or default_url()
    host, port = host_port(url)
    if ping(host, port):
        print(f"[kvmw] redis answers on {host}:{port}")
        return True
    if host not in LOOPBACK:
        print(f"[kvmw] no Redis answers on {url} and it is not loopback: {HOW_TO}", file=sys.stderr)
        return False
    binary = redis_binary(install=True)
    if binary is None:
        print(f"[kvmw] no Redis on {host}:{port} and no redis-server: {HOW_TO}", file=sys.stderr)
        return False
    from kvmw.config import kvmw_home

    workdir = kvmw_home() / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[kvmw] starting redis-server on 127.0.0.1:{port}", flush=True)
    subprocess.run([binary, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
                    "--save", "", "--appendonly", "no", "--dir", str(workdir),
                    "--logfile", str(Path(workdir) / "redis.log")], check=False)
    for _ in range(100):
        if ping(host, port, 0.2):
            return True
        time.sleep(0.05)
    print(f"[kvmw] redis-server did not answer; see {workdir}/redis.log", file=sys.stderr)
    return False


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "ensure":
        print("usage: python -m kvmw.testing.redis_process ensure [URL]", file=sys.stderr)
        raise SystemExit(2)
    ensure(args[1] if len(args) > 1 else None)
