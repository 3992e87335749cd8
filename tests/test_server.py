"""`kvmw serve` as a real process, driven by kvmw's own tier, redis-py and raw sockets."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import redis

from kvmw.testing.redis_process import free_port, ping
from kvmw.storage_tiers.server_tier import ServerTier
from tests.test_tiers import blob_of, key_of


class ServerProcess:
    def __init__(self, disk, *extra):
        self.disk, self.extra = str(disk), extra
        self.port, self.http = free_port(), free_port()
        self.proc = None
        self.env = {}

    def start(self):
        self.log = open(self.disk + ".log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmw", "serve", "--port", str(self.port), "--http-port", str(self.http),
             "--disk-path", self.disk, *self.extra], stdout=subprocess.DEVNULL, stderr=self.log,
            env={**os.environ, **self.env})
        deadline = time.monotonic() + 30
        while not ping("127.0.0.1", self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"kvmw serve did not start; see {self.log.name}")
            time.sleep(0.05)
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        return self.proc.returncode

    @property
    def url(self):
        return f"kvmw://127.0.0.1:{self.port}"


@pytest.fixture
def server(tmp_path):
    s = ServerProcess(tmp_path / "disk").start()
    yield s
    s.stop(signal.SIGKILL)


def test_kvmw_tiers_work_against_the_server(server):
    t = ServerTier(server.url, prefix="p:", part_size=64 << 10)
    small, large = blob_of(16, 1), blob_of(4096, 2)  # large: a multi-part MULTI/EXEC record
    assert t.put(key_of(1), small) and t.put(key_of(2), large)
    assert bytes(t.get(key_of(1))) == bytes(small) and bytes(t.get(key_of(2))) == bytes(large)
    assert t.get(key_of(3)) is None
    assert t.contains([key_of(1), key_of(3), key_of(2)]) == [True, False, True]
    assert {k for k, _ in t.entries()} == {key_of(1), key_of(2)}
    t.delete(key_of(2))
    assert t.get(key_of(2)) is None

    r = redis.Redis(port=server.port)
    assert r.execute_command("KVMW.PREFIX", "p:{%s}" % key_of(1), "p:{nope}", "p:{%s}" % key_of(1)) == 1
    r.set("ttl", b"x", ex=1)
    assert r.get("ttl") == b"x"
    time.sleep(1.1)
    assert r.get("ttl") is None
    t.close()


def test_restart_serves_what_sync_made_durable_even_after_sigkill(tmp_path):
    s = ServerProcess(tmp_path / "disk").start()
    t = ServerTier(s.url, prefix="d:")
    blobs = {key_of(i): blob_of(256, i) for i in range(8)}
    for k, b in blobs.items():
        t.put(k, b)
    t.client.execute_command("KVMW.SYNC")
    s.stop(signal.SIGKILL)
    t.close()
    s2 = ServerProcess(tmp_path / "disk").start()
    t2 = ServerTier(s2.url, prefix="d:")
    assert all(bytes(t2.get(k)) == bytes(b) for k, b in blobs.items())
    t2.close()
    assert s2.stop(signal.SIGTERM) == 0  # graceful


def test_malformed_and_oversized_frames_get_an_error_and_a_closed_connection(server):
    for frame in (b"*2\r\n$3\r\nGET\r\n$x\r\n", b"*999999999\r\n", b"*1\r\n$99999999999\r\n",
                  b"*1\r\n+not-bulk\r\n", b"*2\r\n$3\r\nGET\r\n$1\r\nabc\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(frame)
            reply = sock.recv(4096)
            assert reply.startswith(b"-ERR")
            assert sock.recv(4096) == b""  # closed
    assert ping("127.0.0.1", server.port)  # still serving


def test_pipelined_commands_get_every_reply_in_order(server):
    """Replies to requests that arrive together are gathered; none is lost or reordered."""
    big = os.urandom(3 << 20)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        frames = [b"*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$%d\r\n" % len(big) + big + b"\r\n"]
        frames += [b"*3\r\n$3\r\nSET\r\n$2\r\nk%d\r\n$2\r\nv%d\r\n" % (i % 10, i % 10) for i in range(10)]
        frames += [b"*2\r\n$3\r\nGET\r\n$2\r\nk%d\r\n" % i for i in range(10)]
        frames += [b"*1\r\n$4\r\nPING\r\n", b"*2\r\n$3\r\nGET\r\n$1\r\nb\r\n"]
        sock.sendall(b"".join(frames))
        want = b"+OK\r\n" * 11 + b"".join(b"$2\r\nv%d\r\n" % i for i in range(10)) + b"+PONG\r\n"
        want += b"$%d\r\n" % len(big) + big + b"\r\n"
        got = bytearray()
        while len(got) < len(want):
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed early"
            got += chunk
        assert bytes(got) == want


def test_a_client_that_does_not_read_its_reply_blocks_no_one_else(server):
    big = os.urandom(32 << 20)
    r = redis.Redis(port=server.port, socket_timeout=10)
    r.set("big", big)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for _ in range(4):  # 128 MiB of replies that nobody reads
            slow.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n")
        time.sleep(0.3)
        t0 = time.monotonic()
        for i in range(20):
            r.set(f"k{i}", b"x" * 100)
            assert r.get(f"k{i}") == b"x" * 100
        assert time.monotonic() - t0 < 5
    assert r.get("big") == big
    r.close()


def test_health_and_metrics_endpoints(server):
    t = ServerTier(server.url, prefix="m:")
    t.put(key_of(1), blob_of(8))
    t.get(key_of(1))
    assert urllib.request.urlopen(f"http://127.0.0.1:{server.http}/healthz", timeout=5).read() == b"ok\n"
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.http}/metrics", timeout=5).read().decode()
    assert 'kvmw_tier_hits_total{tier="cpu"} 1.0' in body and "kvmw_server_commands_total" in body
    assert "# TYPE kvmw_server_write_waits_total counter" in body  # prometheus_client's exposition
    missing = urllib.request.Request(f"http://127.0.0.1:{server.http}/nope")
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(missing, timeout=5)
    t.close()


def test_info_speaks_redis_layout_for_redis_tooling(server):
    r = redis.Redis(port=server.port)
    r.set("a", b"x" * 1000)
    r.set("b", b"y", ex=100)
    r.get("a")
    r.get("nope")
    info = r.info()  # redis-py parses every section
    assert info["redis_mode"] == "standalone" and info["tcp_port"] == server.port
    assert info["used_memory"] >= 1000 and info["used_memory_rss"] > info["used_memory"]
    assert info["db0"] == {"keys": 2, "expires": 1, "avg_ttl": 0}
    assert info["keyspace_hits"] >= 1 and info["keyspace_misses"] >= 1 and info["kvmw_disk"] == 1
    assert set(r.info("memory")) >= {"used_memory", "maxmemory"} and "tcp_port" not in r.info("memory")
    cli = subprocess.run(["redis-cli", "-p", str(server.port), "info", "keyspace"], capture_output=True,
                         text=True, timeout=30)
    if cli.returncode == 0:  # redis-cli is there (it is where Redis is installed)
        assert "db0:keys=2,expires=1" in cli.stdout and "# Keyspace" in cli.stdout


def test_non_loopback_needs_a_token(tmp_path):
    res = subprocess.run([sys.executable, "-m", "kvmw", "serve", "--host", "0.0.0.0", "--port", "0",
                          "--disk-path", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "token" in (res.stderr + res.stdout)


def test_token_is_required_when_set(tmp_path):

    s = ServerProcess(tmp_path / "disk", "--token", "s3cret").start()
    try:
        with pytest.raises((redis.exceptions.ResponseError, redis.exceptions.AuthenticationError),
                           match="NOAUTH|AUTH"):
            redis.Redis(port=s.port).get("x")
        assert redis.Redis(port=s.port, password="s3cret").set("x", b"1")
        t = ServerTier(f"kvmw://:s3cret@127.0.0.1:{s.port}", prefix="a:")
        assert t.put(key_of(1), blob_of(8)) and t.get(key_of(1)) is not None
        t.close()
    finally:
        s.stop(signal.SIGKILL)


def test_fuzzed_frames_never_crash_the_server(server):
    """Random and mutated RESP frames: every connection ends cleanly and the server keeps serving."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    valid = [b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
             b"*1\r\n$5\r\nMULTI\r\n", b"*1\r\n$4\r\nEXEC\r\n", b"*3\r\n$8\r\nGETRANGE\r\n$1\r\nk\r\n$2\r\n-1\r\n"]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(
        st.binary(max_size=200),
        st.tuples(st.sampled_from(valid), st.integers(0, 60), st.binary(min_size=1, max_size=8))
          .map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1]:]),
        st.lists(st.sampled_from(valid), max_size=6).map(b"".join),
    ))
    def fuzz(frame):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(frame)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass

    fuzz()
    assert server.proc.poll() is None

    r = redis.Redis(port=server.port)
    assert r.set("after", b"fuzz") and r.get("after") == b"fuzz"


def test_32_concurrent_clients_lose_and_corrupt_nothing(server):
    import hashlib
    import random
    import threading


    errors, done = [], []

    def client(cid):
        rng = random.Random(cid)
        r = redis.Redis(port=server.port, socket_timeout=30)
        mine = {}
        try:
            for op in range(1000):
                key = f"c{cid}:{rng.randrange(50)}"
                if rng.random() < 0.5 or key not in mine:
                    body = rng.randbytes(rng.randrange(1, 4096))
                    value = hashlib.sha256(body).digest() + body
                    r.set(key, value)
                    mine[key] = value
                else:
                    got = r.get(key)
                    if got != mine[key] or hashlib.sha256(got[32:]).digest() != got[:32]:
                        errors.append((cid, op, key))
            done.append(cid)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append((cid, repr(e)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(done) == 32
    rss_kb = int(open(f"/proc/{server.proc.pid}/status").read().split("VmRSS:")[1].split()[0])
    assert rss_kb < 1_500_000  # bounded: ~1,600 live values of <4 KiB, plus the interpreter


ENGINE = r"""
import json, sys, torch
from kvmw.config import KVMWConfig
from kvmw.integrations.hf import KVMW
from kvmw.integrations.hf.models import load
from kvmw.text_data import essay_text
model, tok = load("smollm2")
ids = tok(essay_text(4000), return_tensors="pt").input_ids[:, :300]
hook = KVMW(model, tok, KVMWConfig.load(env={}, tiers=["server"], server_url=sys.argv[1], chunk_size=128))
out = hook.generate(ids, max_new_tokens=6, do_sample=False)
hook.close()
print(json.dumps({"tokens": out[0].tolist(), "reused": hook.stats()["tokens_reused"]}))
"""


def test_two_engine_processes_share_a_prefix_through_the_server(server, smollm2):
    import json

    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", ENGINE, server.url], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert runs[0]["reused"] == 0 and runs[1]["reused"] == 256  # the second engine's first request is warm
    assert runs[0]["tokens"] == runs[1]["tokens"]


def test_sigkill_during_writes_keeps_every_synced_value_and_serves_nothing_torn(tmp_path):
    import hashlib
    import threading


    s = ServerProcess(tmp_path / "disk").start()
    synced, written, stop = set(), {}, threading.Event()

    def writer():
        r = redis.Redis(port=s.port, socket_timeout=10)
        i = 0
        try:
            while not stop.is_set():
                body = os.urandom(256 << 10)
                key = f"w{i}"
                r.set(key, hashlib.sha256(body).digest() + body)
                written[key] = True
                i += 1
                if i % 5 == 0:
                    r.execute_command("KVMW.SYNC")
                    synced.update(k for k in list(written))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            pass  # the server was killed under us

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(1.5)
    s.stop(signal.SIGKILL)
    stop.set()
    t.join(30)
    assert len(synced) >= 10
    s2 = ServerProcess(tmp_path / "disk").start()
    try:
        r = redis.Redis(port=s2.port)
        for key in synced:
            value = r.get(key)
            assert value is not None, key
            assert hashlib.sha256(value[32:]).digest() == value[:32]
        for raw in r.scan_iter(match="w*"):  # whatever else survived is whole
            value = r.get(raw)
            assert hashlib.sha256(value[32:]).digest() == value[:32]
    finally:
        s2.stop(signal.SIGKILL)


def _metric(server, name):
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.http}/metrics", timeout=5).read().decode()
    return float(next(line.split()[-1] for line in body.splitlines() if line.startswith(name + " ")))


def test_sync_answers_an_error_while_acknowledged_writes_are_not_on_disk(tmp_path):
    """The disk tier fails mid-run: SETs are still acknowledged (memory holds them), but
    KVMW.SYNC must not promise they are durable; once the disk is back, SYNC writes them."""
    import shutil

    disk = tmp_path / "disk"
    s = ServerProcess(disk).start()
    try:
        r = redis.Redis(port=s.port, socket_timeout=30)
        r.set("before", b"x" * 1000)
        assert r.execute_command("KVMW.SYNC") == b"OK"
        shutil.rmtree(disk)
        disk.write_text("not a folder")  # every disk write now fails
        r.set("during", b"y" * 1000)
        with pytest.raises(redis.exceptions.ResponseError, match="1 acknowledged writes are not on disk"):
            r.execute_command("KVMW.SYNC")
        assert r.get("during") == b"y" * 1000  # acknowledged: still served from memory
        disk.unlink()
        disk.mkdir()
        time.sleep(1.2)  # past the disk tier's first backoff
        assert r.execute_command("KVMW.SYNC") == b"OK"  # written again from memory
        assert any(disk.rglob("*.kvmw"))
    finally:
        s.stop(signal.SIGKILL)


def test_sync_on_a_memory_only_server_is_an_error(tmp_path):
    s = ServerProcess(tmp_path / "disk", "--memory-only").start()
    try:
        r = redis.Redis(port=s.port)
        r.set("k", b"v")
        with pytest.raises(redis.exceptions.ResponseError, match="memory-only"):
            r.execute_command("KVMW.SYNC")
    finally:
        s.stop(signal.SIGKILL)


def test_a_full_write_queue_slows_acknowledgements_and_drops_nothing(tmp_path):
    """8 clients write faster than fsync drains a 64 KiB queue: every SET is acknowledged
    (later) or refused, none is dropped, and after SIGKILL all synced values are back."""
    import threading

    s = ServerProcess(tmp_path / "disk")
    s.env = {"KVMW_WRITE_QUEUE_BYTES": "64KiB"}
    s.start()
    acked, errors = [], []

    def client(c):
        r = redis.Redis(port=s.port, socket_timeout=60)
        for i in range(60):
            key = f"c{c}:{i}"
            try:
                r.set(key, os.urandom(4096) + key.encode())
                acked.append(key)
            except redis.exceptions.ResponseError as e:
                errors.append(str(e))

    try:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        r = redis.Redis(port=s.port, socket_timeout=60)
        assert r.execute_command("KVMW.SYNC") == b"OK"
        assert _metric(s, "kvmw_store_dropped_writes_total") == 0
        assert _metric(s, "kvmw_server_write_waits_total") > 0  # the queue did fill: acks waited
        assert len(acked) + len(errors) == 480 and all("BUSY" in e for e in errors)
    finally:
        s.stop(signal.SIGKILL)
    s2 = ServerProcess(tmp_path / "disk").start()
    try:
        r = redis.Redis(port=s2.port)
        assert all(r.get(k).endswith(k.encode()) for k in acked)
    finally:
        s2.stop(signal.SIGKILL)


def _token_server(tmp_path, *extra):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    return ServerProcess(tmp_path / "disk", "--host", "0.0.0.0", "--token-file", str(token_file), *extra).start()


def test_unauthenticated_clients_cannot_make_the_server_allocate(tmp_path):
    """Before AUTH a frame may carry a few small arguments: a 100 MB bulk header, a
    100k-argument array or a silent client get an error at once, nothing is allocated."""
    s = _token_server(tmp_path, "--auth-timeout", "1")
    try:
        for frame, why in ((b"*1\r\n$100000000\r\n", b"more than 4096"), (b"*100000\r\n", b"outside 1..8")):
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
                sock.sendall(frame)
                reply = sock.recv(4096)
                assert reply.startswith(b"-ERR") and why in reply, reply
                assert sock.recv(4096) == b""
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
            t0 = time.monotonic()
            sock.sendall(b"*2\r\n$3\r\nGET\r\n")  # a slow-loris: never finishes the frame
            assert sock.recv(4096).startswith(b"-NOAUTH") and sock.recv(4096) == b""
            assert time.monotonic() - t0 < 4
        r = redis.Redis(port=s.port, password="s3cret-token")
        r.set("big", b"z" * (1 << 20))  # authenticated: the normal limits
        assert len(r.get("big")) == 1 << 20
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=s.port, password="wrong").ping()
    finally:
        s.stop(signal.SIGKILL)


def test_the_token_comes_from_a_file_or_the_environment_not_the_command_line(tmp_path):
    s = _token_server(tmp_path)
    try:
        cmdline = open(f"/proc/{s.proc.pid}/cmdline", "rb").read()
        assert b"s3cret-token" not in cmdline
        assert redis.Redis(port=s.port, password="s3cret-token").ping()
    finally:
        s.stop(signal.SIGKILL)
    s = ServerProcess(tmp_path / "disk2", "--host", "0.0.0.0")
    s.env = {"KVMW_SERVER_TOKEN": "from-env"}
    s.start()
    try:
        assert redis.Redis(port=s.port, password="from-env").ping()
        with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError),
                           match="AUTH"):
            redis.Redis(port=s.port).get("k")
    finally:
        s.stop(signal.SIGKILL)


def _listen_address(port):
    """The local address a TCP port listens on, from /proc/net/tcp (hex, little-endian)."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if int(p, 16) == port and state == "0A":
            return socket.inet_ntoa(bytes.fromhex(addr)[::-1])
    return None


def test_metrics_listen_on_loopback_even_when_resp_does_not(tmp_path):
    s = _token_server(tmp_path)
    try:
        assert _listen_address(s.port) == "0.0.0.0"
        assert _listen_address(s.http) == "127.0.0.1"
        assert _metric(s, "kvmw_server_connections_total") >= 0
    finally:
        s.stop(signal.SIGKILL)


def test_keys_of_any_length_are_stored_synced_and_served_after_a_restart(tmp_path):
    """Keys past ~110 bytes used to make a file name too long for the disk (ENAMETOOLONG,
    the disk tier marked down for everyone); now they are named by a hash and carry
    themselves in the value."""
    s = ServerProcess(tmp_path / "disk").start()
    keys = [b"k", b"x" * 100, b"y" * 101, b"z" * 1000, os.urandom(65536)]
    try:
        r = redis.Redis(port=s.port, socket_timeout=30)
        for i, key in enumerate(keys):
            r.set(key, b"value-%d" % i)
        assert r.execute_command("KVMW.SYNC") == b"OK"
        assert _metric(s, "kvmw_tier_healthy{tier=\"disk\"}") == 1
    finally:
        s.stop(signal.SIGKILL)
    s2 = ServerProcess(tmp_path / "disk").start()
    try:
        r = redis.Redis(port=s2.port, socket_timeout=30)
        assert [r.get(k) for k in keys] == [b"value-%d" % i for i in range(len(keys))]
        assert r.strlen(keys[3]) == len(b"value-3") and r.getrange(keys[3], 0, 4) == b"value"
        assert set(r.scan_iter(match="*")) == set(keys)
        assert r.get(b"z" * 999 + b"q") is None  # another long key: not served its neighbour's value
        r.delete(keys[3])
        assert r.get(keys[3]) is None and r.dbsize() == len(keys) - 1
    finally:
        s2.stop(signal.SIGKILL)


# ---- the compiled GET/SET/PING loop (integrations/server/_fastpath.c) ---------------------------
def test_the_compiled_loop_is_built_where_a_c_compiler_is(tmp_path):
    """setup.py builds it as an optional extension: on a machine with a C compiler (ours,
    CI's) it must be there, or the speed the benchmarks report is not what users get."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: kvmw installs without the compiled loop")
    from kvmw.integrations.server import _fastpath  # noqa: F401 (ImportError fails the test)

    on, off = ServerProcess(tmp_path / "on").start(), ServerProcess(tmp_path / "off", "--no-fast-path").start()
    try:
        assert redis.Redis(port=on.port).info("server")["kvmw_fast_path"] == 1
        assert redis.Redis(port=off.port).info("server")["kvmw_fast_path"] == 0
    finally:
        on.stop(signal.SIGKILL)
        off.stop(signal.SIGKILL)


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def _session_script(seed: int, ttl: bool) -> list[bytes]:
    """A client's commands, as raw frames: mostly the loop's GET/SET/PING (any case, binary,
    empty and long keys, values up to past the direct-send size) mixed with what it must
    leave to the Python path: other commands, options, MULTI, RESP3, errors, and with
    `ttl` TTLs (while one is set every command goes the Python way)."""
    import random

    rng = random.Random(seed)
    keys = [b"k%d" % i for i in range(12)] + [b"", b"\x00\xff bin", b"L" * 100, b"M" * 101, b"N" * 3000]
    frames = []
    for i in range(400):
        key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.35:
            frames.append(_command(rng.choice([b"GET", b"get", b"Get"]), key))
        elif roll < 0.6:
            size = rng.choice([0, 1, 100, 4096, 70000, 200000])
            frames.append(_command(rng.choice([b"SET", b"set"]), key, rng.randbytes(size)))
        elif roll < 0.68:
            frames.append(_command(rng.choice([b"PING", b"ping"])))
        elif roll < 0.71:
            frames.append(_command(b"PING", b"hello"))
        elif roll < 0.74:
            frames.append(_command(b"SET", key, b"ttl", b"EX", b"100") if ttl else _command(b"GET", key))
        elif roll < 0.77:
            frames.append(_command(b"DEL", key))
        elif roll < 0.80:
            frames.append(_command(b"EXISTS", key, rng.choice(keys)))
        elif roll < 0.83:
            frames.append(_command(b"GET", key, key))  # wrong arity: the Python path's error
        elif roll < 0.86:
            frames.append(_command(b"MULTI") + _command(b"SET", key, b"in-multi") + _command(b"GET", key)
                          + _command(b"EXEC"))
        elif roll < 0.89:
            frames.append(_command(b"HELLO", b"3") + _command(b"GET", b"missing") + _command(b"HELLO", b"2"))
        elif roll < 0.92:
            frames.append(_command(b"STRLEN", key))
        else:
            frames.append(_command(b"GET", b"missing"))
    return frames


def _replies(port: int, stream: bytes, cuts: list[int]) -> bytes:
    """Sends `stream` cut at `cuts` (a pause after each piece, so reads end mid-frame) and
    reads the replies until the final PING's."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        at = 0
        for cut in cuts + [len(stream)]:
            sock.sendall(stream[at:cut])
            at = cut
            time.sleep(0.002)
        sock.sendall(_command(b"PING", b"+PONG-END-MARK"))
        got = bytearray()
        want_tail = b"$%d\r\n+PONG-END-MARK\r\n" % len(b"+PONG-END-MARK")
        while not got.endswith(want_tail):
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed early"
            got += chunk
    return bytes(got)


def test_the_compiled_loop_replies_byte_for_byte_as_the_python_path(tmp_path):
    """The same 400-command sessions, cut at random points, against a server with the loop
    and one without: the reply streams are identical, and so are what each server holds
    (the same files on disk: the loop names keys as the Python path does) and what it
    counts; the loop ran most of the commands of the sessions without TTLs."""
    import random

    on, off = ServerProcess(tmp_path / "on").start(), ServerProcess(tmp_path / "off", "--no-fast-path").start()
    try:
        for seed, ttl in ((0, False), (1, False), (2, True)):  # the last one leaves TTLs set
            frames = _session_script(seed, ttl)
            stream = b"".join(frames)
            # reads end between commands (where the loop starts) and inside them (where the
            # Python path must take over, and give the rest back once a command is whole)
            rng = random.Random(100 + seed)
            bounds = [sum(map(len, frames[:i])) for i in range(1, len(frames))]
            cuts = sorted(set(rng.sample(bounds, 100) + rng.sample(range(1, len(stream)), 30)))
            got_on, got_off = _replies(on.port, stream, cuts), _replies(off.port, stream, cuts)
            assert got_on == got_off, f"seed {seed}: first difference at byte " + str(
                next(i for i, (a, b) in enumerate(zip(got_on, got_off)) if a != b) if len(got_on) == len(got_off)
                else f"lengths {len(got_on)} vs {len(got_off)}")
        r_on, r_off = redis.Redis(port=on.port), redis.Redis(port=off.port)
        assert r_on.execute_command("KVMW.SYNC") == r_off.execute_command("KVMW.SYNC") == b"OK"
        files_on = sorted(p.name for p in (tmp_path / "on").rglob("*") if p.is_file())
        assert files_on == sorted(p.name for p in (tmp_path / "off").rglob("*") if p.is_file()) and files_on
        keys = sorted(r_on.scan_iter(match="*"))
        assert keys == sorted(r_off.scan_iter(match="*")) and len(keys) >= 10
        assert [r_on.get(k) for k in keys] == [r_off.get(k) for k in keys]
        stats_on, stats_off = r_on.info("stats"), r_off.info("stats")
        assert stats_on["total_commands_processed"] == stats_off["total_commands_processed"] > 1000
        assert stats_on["keyspace_hits"] == stats_off["keyspace_hits"]
        assert r_on.info("server")["kvmw_fast_path_commands"] > 150
    finally:
        on.stop(signal.SIGKILL)
        off.stop(signal.SIGKILL)


def test_the_compiled_loop_stops_at_the_first_command_it_does_not_take():
    """Pure logic of `FastPath.run`: whole GET/SET/PING run in order, the offset returned is
    where the Python path resumes (a command the loop leaves, or one not whole yet), keys
    are named as `store_key` names them, and `commands` counts what ran."""
    fastpath = pytest.importorskip("kvmw.integrations.server._fastpath")
    import xxhash

    from kvmw.integrations.server.server import LONG_KEY, store_key

    data: dict[str, bytes] = {}
    counts = {"commands": 0}
    loop = fastpath.FastPath(memory_get=data.get, store_get=None, store_put=data.__setitem__, has_room=None,
                             expiry={}, counts=counts, digest=xxhash.xxh3_64_intdigest, max_value=1 << 20,
                             long_key=LONG_KEY, direct_send=64 << 10)
    keys = [b"", b"a", bytes(range(256))[:LONG_KEY], b"\xff" * 7]
    head = b"".join(_command(b"set", k, b"v" + k) for k in keys) + _command(b"GET", keys[1]) + _command(b"PING")
    rest = _command(b"SET", b"k", b"v", b"EX", b"9") + _command(b"GET", b"k")
    buf = bytearray(b"junk" + head + rest + b"tail")
    stop, replies = loop.run(buf, 4, len(buf) - 4)
    assert stop == 4 + len(head) and replies == b"+OK\r\n" * 4 + b"$2\r\nva\r\n+PONG\r\n"
    assert data == {store_key(k): b"v" + k for k in keys}
    assert counts["commands"] == loop.commands == 6
    partial = _command(b"GET", b"a")
    assert loop.run(partial, 0, len(partial) - 1) == (0, None)  # not whole: left to hiredis
    big = _command(b"SET", b"x" * (LONG_KEY + 1), b"v")  # a long key: framed with its value, in Python
    assert loop.run(big, 0, len(big)) == (0, None) and counts["commands"] == 6
    data[store_key(b"large")] = large = bytes(70000)
    stop, replies = loop.run(_command(b"GET", b"large"), 0, len(_command(b"GET", b"large")))
    assert replies == [b"$70000\r\n", large, b"\r\n"]  # a large value goes out from its own buffer
