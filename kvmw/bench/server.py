"""`kvmw bench server`: `kvmw serve` beside Redis on the same machine, payloads and client.

For 3 MiB and 32 MiB values and 1, 8 and 32 concurrent clients (threads, one
connection each, the same client code for both servers): every client SETs its
own key, then after a barrier GETs it `--ops` times (default: about 1 GiB of GETs per cell); each cell
runs `--rounds` times alternating kvmw and Redis, and the median run is reported
(`x_redis_paired`: the median over rounds of kvmw's GET throughput over the Redis run
right after it). The client is a lean RESP client (sendall of
memoryviews, recv_into a preallocated buffer): redis-py caps one connection
near 1 GB/s for 3 MiB values here and would measure itself, not the servers. Reported: aggregate GET and SET
throughput (GB/s of values moved), p50/p99 GET latency, and a mixed phase (SET
and GET interleaved per client: `mixed_gbps`, both directions counted). `gbps` is the GET
throughput (what engines wait on). The raw limit is one TCP loopback stream
(sendall / recv_into a preallocated buffer) measured by the bench itself; the
1-client ceiling is the same client against a thread that answers every request
with a fixed 3 MiB reply from its own process (what a request/response chain allows, whatever the server).

Small operations, with a client no one here wrote: ``redis-benchmark -t
ping,set,get -n N -d 4096 -c 8`` against both servers, alternating, `--rounds`
times (median requests/s per test; `x_redis` = kvmw over Redis). A third server,
`kvmw serve --no-fast-path`, runs in the same rotation (`python_path_rps`,
`python_path_x_redis`): what the compiled GET/SET/PING loop gains. Where the one
client process is the bound (both servers then show its rate), requests/s says
little about the servers, so each run also reads the server's CPU time (all its
threads, from /proc) per request: `*_cpu_us` (`cpu_x_redis` = kvmw's over Redis's;
a server-bound rate is 1e6 / cpu_us). An engine's lookups and the chunk keys'
EXISTS are such small round trips.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from kvmw.bench.common import machine, print_table, write_json

SIZES = {"3MiB": 3 << 20, "32MiB": 32 << 20}
CLIENTS = (1, 8, 32)


def raw_tcp_gbps(nbytes: int = 32 << 20, rounds: int = 8) -> float:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    payload = os.urandom(nbytes)

    def sender() -> None:
        conn, _ = srv.accept()
        with conn:
            for _ in range(rounds):
                conn.sendall(payload)

    t = threading.Thread(target=sender)
    t.start()
    buf = memoryview(bytearray(nbytes))
    with socket.create_connection(("127.0.0.1", port)) as c:
        t0 = time.perf_counter()
        for _ in range(rounds):
            got = 0
            while got < nbytes:
                got += c.recv_into(buf[got:])
        elapsed = time.perf_counter() - t0
    t.join()
    srv.close()
    return nbytes * rounds / elapsed / 1e9


# the do-nothing server of `reply_ceiling_gbps`, in its own process (no GIL shared with the client)
_CEILING_SERVER = """
import os, socket, sys
size = int(sys.argv[1])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
reply = [b"$%d\\r\\n" % size, os.urandom(size), b"\\r\\n"]
while conn.recv(1 << 16):  # one small GET frame per recv: the client waits for each reply
    conn.sendmsg(reply)
"""


def reply_ceiling_gbps(size: int, ops: int) -> float:
    """GET throughput of one client against the least a server can do: a process that answers
    every request with a fixed `size`-byte bulk reply in one sendmsg (no parsing, no store).
    What one client's request/response chain allows here, whatever the server."""
    proc = subprocess.Popen([sys.executable, "-c", _CEILING_SERVER, str(size)], stdout=subprocess.PIPE)
    try:
        client = LeanRESPClient(int(proc.stdout.readline()), size)
        for _ in range(3):
            client.get(b"k")
        t0 = time.perf_counter()
        for _ in range(ops):
            client.get(b"k")
        elapsed = time.perf_counter() - t0
        client.close()
    finally:
        proc.kill()
        proc.wait()
    return size * ops / elapsed / 1e9


class LeanRESPClient:
    """Just enough RESP for SET/GET/DEL of large values without client-side copies."""

    def __init__(self, port: int, max_value: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = memoryview(bytearray(max_value + 2))
        self.pending = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.pending:
            chunk = self.sock.recv(64)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\r\n")
        return line

    def _command(self, *parts: bytes) -> None:
        self.sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))

    def set(self, key: bytes, value: memoryview) -> None:
        self.sock.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, value.nbytes))
        self.sock.sendall(value)
        self.sock.sendall(b"\r\n")
        if self._line() != b"+OK":
            raise RuntimeError("SET failed")

    def get(self, key: bytes) -> int:
        """GET into the preallocated buffer; returns the value's length (-1: missing)."""
        self._command(b"GET", key)
        n = int(self._line()[1:])
        if n < 0:
            return n
        have = min(len(self.pending), n + 2)
        self.buf[:have] = self.pending[:have]
        self.pending = self.pending[have:]
        while have < n + 2:
            got = self.sock.recv_into(self.buf[have:n + 2])
            if not got:
                raise ConnectionError("server closed the connection")
            have += got
        return n

    def delete(self, key: bytes) -> None:
        self._command(b"DEL", key)
        self._line()

    def close(self) -> None:
        self.sock.close()


def _cell(port: int, size: int, clients: int, ops: int) -> dict[str, float]:
    """All clients SET their key `ops` times, then (after a barrier) GET it `ops` times:
    each phase's aggregate throughput is its bytes over its own wall time, as
    redis-benchmark reports one command at a time."""
    value = memoryview(os.urandom(size))
    get_lat: list[float] = []
    marks: dict[str, float] = {}
    start = threading.Barrier(clients, action=lambda: marks.__setitem__("set0", time.perf_counter()))
    sets_done = threading.Barrier(clients, action=lambda: marks.__setitem__("get0", time.perf_counter()))
    gets_done = threading.Barrier(clients, action=lambda: marks.__setitem__("mix0", time.perf_counter()))
    mixed = max(1, ops // 2)
    errors: list[str] = []

    def client(i: int) -> None:
        r = LeanRESPClient(port, size)
        key = b"bench:%d" % i
        try:
            r.set(key, value)  # connect + warm
            start.wait()
            for _ in range(ops):
                r.set(key, value)
            sets_done.wait()
            for _ in range(ops):
                t0 = time.perf_counter()
                got = r.get(key)
                get_lat.append(time.perf_counter() - t0)
                if got != size or r.buf[:16] != value[:16]:
                    errors.append(f"client {i}: bad value")
            gets_done.wait()
            for _ in range(mixed):  # SET and GET interleaved, as engines storing and loading do
                r.set(key, value)
                if r.get(key) != size:
                    errors.append(f"client {i}: bad value")
            r.delete(key)
        finally:
            r.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.perf_counter()
    if errors:
        raise RuntimeError(errors[0])
    moved = size * ops * clients
    get_lat.sort()
    return {"gbps": moved / (marks["mix0"] - marks["get0"]) / 1e9,
            "set_gbps": moved / (marks["get0"] - marks["set0"]) / 1e9,
            "mixed_gbps": 2 * size * mixed * clients / (end - marks["mix0"]) / 1e9,
            "p50_ms": statistics.median(get_lat) * 1e3,
            "p99_ms": get_lat[min(len(get_lat) - 1, int(len(get_lat) * 0.99))] * 1e3}


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median GET throughput (its other figures come with it)."""
    return sorted(runs, key=lambda r: r["gbps"])[len(runs) // 2]


def start_kvmw_serve(disk: str, memory_only: bool, fast_path: bool = True) -> tuple[subprocess.Popen, int]:
    """A `kvmw serve` process on a free port, once it answers PING: (process, port)."""
    from kvmw.testing.redis_process import free_port, ping

    port = free_port()
    cmd = [sys.executable, "-m", "kvmw", "serve", "--port", str(port), "--disk-path", disk]
    cmd += ["--memory-only"] if memory_only else []
    proc = subprocess.Popen(cmd + ([] if fast_path else ["--no-fast-path"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not ping("127.0.0.1", port, 0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("kvmw serve did not start")
        time.sleep(0.05)
    return proc, port


def redis_benchmark_rps(port: int, requests: int, clients: int = 8, size: int = 4096,
                        pid: int | None = None) -> dict[str, float]:
    """requests/s per test of ``redis-benchmark -t ping,set,get`` (its CSV output), one
    invocation per command; with the server's `pid`, also ``<test>_cpu_us``: the server's
    CPU time per request during that command's run (PING's two tests share theirs)."""
    import csv
    import io
    import shutil

    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark not found (it comes with redis-server: apt install redis-tools)")
    out: dict[str, float] = {}
    for command in ("ping", "set", "get"):
        before = process_cpu_seconds(pid) if pid else 0.0
        res = subprocess.run([binary, "-h", "127.0.0.1", "-p", str(port), "-t", command, "-n", str(requests),
                              "-d", str(size), "-c", str(clients), "--csv"], capture_output=True, text=True,
                             timeout=600, check=True)
        cpu = process_cpu_seconds(pid) - before if pid else 0.0
        rows = [r for r in csv.reader(io.StringIO(res.stdout)) if len(r) >= 2 and r[0] != "test"]
        for name, rps, *_ in rows:
            out[name.lower()] = float(rps)
            if pid:
                out[name.lower() + "_cpu_us"] = cpu / (requests * len(rows)) * 1e6
    return out


def process_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid` so far (/proc schedstat: nanoseconds, not ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that just ended
            pass
    return total / 1e9


def redis_pid(port: int) -> int:
    """The process id a RESP server on `port` reports in INFO (Redis and kvmw serve both do)."""
    import redis

    client = redis.Redis(port=port)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvmw.testing.redis_process import default_url, host_port

    redis_port = host_port(args.redis_url or default_url())[1]
    raw = raw_tcp_gbps()
    ceiling = statistics.median(reply_ceiling_gbps(SIZES["3MiB"], (1 << 30) // SIZES["3MiB"]) for _ in range(3))
    out: dict[str, Any] = {"server": {}, "redis": {}, "raw_tcp_gbps": raw, "reply_ceiling_3MiB_gbps": ceiling,
                           "machine": machine()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvmw-bench-server-") as disk:
        proc, port = start_kvmw_serve(disk, args.memory_only)
        try:
            for size_name, size in SIZES.items():
                if size_name not in args.sizes:
                    continue
                for clients in args.clients:
                    # ~1 GiB of GETs per cell whatever the client count (at least 3 rounds each)
                    ops = args.ops or max(3, (1 << 30) // (size * clients))
                    print(f"[bench] {size_name} x {clients} clients, {ops} SET+GET each, "
                          f"{args.rounds} alternating rounds", flush=True)
                    runs_s, runs_r = [], []
                    for _ in range(args.rounds):  # alternate servers so drift hits both alike
                        runs_s.append(_cell(port, size, clients, ops))
                        runs_r.append(_cell(redis_port, size, clients, ops))
                    s, r = _median_run(runs_s), _median_run(runs_r)
                    # each round's kvmw run against the Redis run right after it: drift cancels
                    s["x_redis_paired"] = statistics.median(a["gbps"] / b["gbps"] for a, b in zip(runs_s, runs_r))
                    out["server"].setdefault(size_name, {})[str(clients)] = s
                    out["redis"].setdefault(size_name, {})[str(clients)] = r
                    rows.append([size_name, clients, s["gbps"], r["gbps"], s["gbps"] / r["gbps"], s["x_redis_paired"],
                                 s["set_gbps"], r["set_gbps"], s["mixed_gbps"] / r["mixed_gbps"],
                                 s["p50_ms"], r["p50_ms"], s["p99_ms"], r["p99_ms"]])
            if args.redis_benchmark:
                out["redis_benchmark"] = _redis_benchmark(port, redis_port, args, disk)
        finally:
            proc.terminate()
            proc.wait(60)
    if rows:
        print_table(["value", "clients", "kvmw GET GB/s", "redis GET", "x redis", "paired x", "kvmw SET", "redis SET",
                     "mixed x redis", "kvmw p50 ms", "redis p50", "kvmw p99", "redis p99"], rows)
    one = out["server"].get("3MiB", {}).get("1")
    if one:
        print(f"raw TCP loopback (1 stream): {raw:.2f} GB/s; kvmw 3 MiB GET with 1 client = "
              f"{one['gbps'] / raw:.2f}x of it")
        print(f"1-client ceiling (a do-nothing process replying 3 MiB per request): {ceiling:.2f} GB/s; "
              f"kvmw {one['gbps'] / ceiling:.2f}x, Redis {out['redis']['3MiB']['1']['gbps'] / ceiling:.2f}x of it")
    rb = out.get("redis_benchmark")
    if rb:
        print()
        print(f"redis-benchmark -t ping,set,get -n {args.rb_requests} -d 4096 -c 8 (median of {args.rounds}):")
        print_table(["test", "kvmw req/s", "redis req/s", "x redis", "python path req/s", "x redis",
                     "kvmw CPU us/req", "redis", "python path", "CPU x redis"],
                    [[t, c["kvmw_rps"], c["redis_rps"], c["x_redis"], c["python_path_rps"], c["python_path_x_redis"],
                      c["kvmw_cpu_us"], c["redis_cpu_us"], c["python_path_cpu_us"], c["cpu_x_redis"]]
                     for t, c in rb.items()])
        print("(CPU: the server process's own time per request; kvmw's rate where the server is the bound "
              "is about Redis's / 'CPU x redis')")
    write_json(args.json, out)
    return out


def _redis_benchmark(port: int, redis_port: int, args: argparse.Namespace, disk: str) -> dict[str, dict[str, float]]:
    """kvmw serve, Redis and kvmw serve --no-fast-path (its own process, same settings) in
    turn, `args.rounds` times: the median of each."""
    print(f"[bench] redis-benchmark -t ping,set,get -n {args.rb_requests} -d 4096 -c 8, "
          f"{args.rounds} alternating rounds (kvmw, Redis, kvmw --no-fast-path)", flush=True)
    python_proc, python_port = start_kvmw_serve(os.path.join(disk, "python-path"), args.memory_only, fast_path=False)
    runs: dict[str, list[dict[str, float]]] = {"kvmw": [], "redis": [], "python_path": []}
    servers = [(name, p, redis_pid(p)) for name, p in (("kvmw", port), ("redis", redis_port), ("python_path", python_port))]
    try:
        for _ in range(args.rounds):
            for name, p, pid in servers:
                runs[name].append(redis_benchmark_rps(p, args.rb_requests, pid=pid))
    finally:
        python_proc.terminate()
        python_proc.wait(60)
    out = {}
    for test in (t for t in runs["kvmw"][0] if not t.endswith("_cpu_us")):
        cell: dict[str, float] = {}
        for name in runs:
            cell[f"{name}_rps"] = statistics.median(run[test] for run in runs[name])
            cell[f"{name}_cpu_us"] = statistics.median(run[test + "_cpu_us"] for run in runs[name])
        cell["x_redis"] = cell["kvmw_rps"] / cell["redis_rps"]
        cell["python_path_x_redis"] = cell["python_path_rps"] / cell["redis_rps"]
        cell["cpu_x_redis"] = cell["kvmw_cpu_us"] / cell["redis_cpu_us"]
        out[test] = cell
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS), help="concurrent clients per cell")
    p.add_argument("--ops", type=int, default=0,
                   help="SET+GET rounds per client (default: about 1 GiB of GETs per cell)")
    p.add_argument("--rounds", type=int, default=5, help="alternating kvmw/Redis runs per cell (median)")
    p.add_argument("--redis-url", default="", help="Redis to compare with (default: KVMW_REDIS_URL or redis://127.0.0.1:6379/0; make redis starts one)")
    p.add_argument("--memory-only", action="store_true",
                   help="run kvmw serve without its disk spill (Redis here keeps nothing on disk either)")
    p.add_argument("--redis-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="also run redis-benchmark's small SET/GET/PING against both")
    p.add_argument("--rb-requests", type=int, default=20000, help="requests per redis-benchmark test")
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES),
                   help="value sizes of the GET/SET cells (none: only redis-benchmark)")
    p.add_argument("--json", default="", help="write the results here (JSON)")
