"""`kvmw serve`: one process holding blobs for many engine processes.

Protocol: a subset of RESP2, the Redis protocol, so kvmw's Redis tier (and
redis-py, redis-cli, redis-benchmark) talk to it unchanged. Commands: PING,
AUTH, CLIENT (accepted), SELECT 0, GET, SET [EX s], EXISTS, DEL, STRLEN,
GETRANGE, MULTI/EXEC/DISCARD (queued and run without interleaving: the server
is one event loop), SCAN (one full pass, cursor 0), DBSIZE, INFO [section]
(server, clients, memory, persistence, stats, keyspace), QUIT, and two of
its own: ``KVMW.PREFIX k1 .. kn`` (how many leading keys are present: a prefix
chain lookup in one round trip) and ``KVMW.SYNC`` (returns once every earlier
write is on disk).

Storage: a byte-bounded memory tier with write-through to a disk tier (the
"spill"), both under the configured replacement policy; a miss in memory that
hits disk is promoted back. Durability promise: a SET is acknowledged once it
is in memory; it is durable (survives SIGKILL and power loss) once KVMW.SYNC
has answered +OK after it. SYNC answers an error instead when any acknowledged
write is not on disk (the disk tier down or refusing it, the value evicted from
memory before it was written, or no disk at all). Writes are never dropped
silently: when the write-through queue is full a SET's acknowledgement waits for
room (backpressure; other clients' reads go on), and after `ack_timeout` it is
answered ``-BUSY``, which clients count as a failed put. A restart serves what
the disk holds; a file is never half-written (temp + fsync + rename), so nothing
torn is ever served. TTLs live in memory only.

Safety: loopback by default; on any other address it refuses to start without
an auth token (``--token-file``, ``KVMW_SERVER_TOKEN`` or ``--token``, the last
visible in ``ps``). Until a client has authenticated its frames are held to
`preauth_args` arguments of at most `preauth_value` bytes, and it must
authenticate within `auth_timeout` seconds, so an unauthenticated client cannot
make the server allocate. Values over `max_value` and requests over
`max_request` bytes, or malformed frames, get an error and the connection is
closed; the server keeps serving everyone else. ``/healthz`` and ``/metrics``
listen on loopback unless ``--http-host`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import hmac
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

import xxhash

from kvmw.integrations.server.connection import DIRECT_SEND, Limits, RespConnection
from kvmw.storage_tiers.disk import DiskTier
from kvmw.storage_tiers.memory import CPUTier
from kvmw.storage_tiers.tiered import TieredStore

try:  # setup.py's optional extension; without a C compiler every command runs in Python
    from kvmw.integrations.server._fastpath import FastPath
except ImportError:  # pragma: no cover - exercised where the extension is not built
    FastPath = None

log = logging.getLogger("kvmw.server")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROTOCOL_VERSION = 1


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 6380
    http_port: int = 0  # 0: no HTTP endpoint
    token: str = ""
    memory_capacity: int = 4 << 30
    disk_path: str = ""
    disk_capacity: int = 64 << 30
    policy: str = "lru"
    max_value: int = 512 << 20
    max_request: int = 1 << 30
    max_args: int = 1 << 16
    http_host: str = "127.0.0.1"
    #: until AUTH: arguments per frame, bytes per argument, seconds to authenticate
    preauth_args: int = 8
    preauth_value: int = 4096
    auth_timeout: float = 10.0
    #: seconds a SET's acknowledgement may wait for room in the write-through queue
    ack_timeout: float = 30.0
    write_queue_bytes: int = 256 << 20
    #: run whole GET/SET/PING commands through the compiled loop (`_fastpath.c`) when built
    fast_path: bool = True


#: keys up to this long are named by their hex (reversible); longer ones by a 128-bit hash,
#: their value framed with the key (`LONG_KEY_MAGIC`, u32 length, key): a file name holds
#: at most 255 bytes, keys up to 512 MiB
LONG_KEY = 100
LONG_KEY_MAGIC = b"KVMK"


def store_key(key: bytes) -> str:
    """A disk-safe name: 16 hash hex chars (sharding) + the key in hex, or for a key over
    `LONG_KEY` bytes ``z`` + its xxh3-128 (the key then travels in the value)."""
    if len(key) <= LONG_KEY:
        return xxhash.xxh3_64_hexdigest(key) + key.hex()
    return xxhash.xxh3_64_hexdigest(key) + "z" + xxhash.xxh3_128_hexdigest(key)


def is_long(name: str) -> bool:
    return name[16:17] == "z"


def frame_long(key: bytes, value: Any) -> bytes:
    return b"".join((LONG_KEY_MAGIC, len(key).to_bytes(4, "little"), key, memoryview(value).cast("B")))


def unframe_long(value: Any) -> tuple[bytes, memoryview] | None:
    """(key, value) of a long key's stored value; None for anything else."""
    mv = memoryview(value).cast("B")
    if mv.nbytes < 8 or mv[:4] != LONG_KEY_MAGIC:
        return None
    n = int.from_bytes(mv[4:8], "little")
    if mv.nbytes < 8 + n:
        return None
    return bytes(mv[8:8 + n]), mv[8 + n:]


def original_key(name: str, value: Any = None) -> bytes | None:
    """The key a stored name stands for (a long key's is read from its `value`)."""
    if not is_long(name):
        return bytes.fromhex(name[16:])
    framed = unframe_long(value) if value is not None else None
    return framed[0] if framed else None


class KVServer:
    def __init__(self, config: ServerConfig) -> None:
        if config.host not in LOOPBACK and not config.token:
            raise SystemExit(f"kvmw serve: refusing to listen on {config.host} without --token "
                             "(loopback needs none)")
        self.config = config
        tiers: list[Any] = [CPUTier(config.memory_capacity, config.policy)]
        if config.disk_path:
            tiers.append(DiskTier(config.disk_path, config.disk_capacity, config.policy))
        self._memory = tiers[0]
        self.store = TieredStore(tiers, write_queue=1024, validate=False, track_unwritten=True,
                                 write_queue_bytes=config.write_queue_bytes)
        self.expiry: dict[str, float] = {}
        self.counts = {"connections": 0, "commands": 0, "errors": 0, "protocol_errors": 0,
                       "write_waits": 0, "busy_replies": 0, "sync_failures": 0, "auth_timeouts": 0}
        self._http_server: Any = None  # /healthz and /metrics: prometheus_client's WSGI app on a thread
        self._started = time.monotonic()
        self._resp: asyncio.AbstractServer | None = None
        self._clients: set[RespConnection] = set()
        self._stopped = asyncio.Event()
        #: b"GET" -> self._cmd_get, b"KVMW.PREFIX" -> self._cmd_kvmw_prefix, ...; the commands
        #: about the connection (AUTH, MULTI, QUIT, ...) by the same rule from `_session_*`
        self._handlers = _by_command_name(self, "_cmd_")
        self._session = _by_command_name(self, "_session_")
        self._fast_loop = self._fast_path() if config.fast_path else None
        self._fast = self._fast_loop.run if self._fast_loop is not None else None

    def _fast_path(self) -> Any:
        """The compiled GET/SET/PING loop over this server's own store methods (None where
        the extension is not built). It takes a command only where it would do what
        `_command` does; see `_fastpath.c`."""
        if FastPath is None:
            return None
        spill = bool(self.config.disk_path)
        return FastPath(memory_get=self._memory.get, store_get=self.store.get if spill else None,
                        store_put=self.store.put, has_room=self.store.has_room if spill else None,
                        expiry=self.expiry, counts=self.counts, digest=xxhash.xxh3_64_intdigest,
                        max_value=self.config.max_value, long_key=LONG_KEY, direct_send=DIRECT_SEND)

    def _update_fast(self, conn: RespConnection, st: dict[str, Any]) -> None:
        """The compiled loop serves a connection that is authenticated, speaks RESP2 (its
        null reply) and is not queueing a transaction."""
        conn.fast = self._fast if st["authed"] and st["queued"] is None and st["proto"] == 2 else None

    # ---- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        listener = socket.create_server((self.config.host, self.config.port), backlog=1024,
                                        family=_family(self.config.host))
        self._resp = await asyncio.get_running_loop().create_server(self._connection, sock=listener)
        self.config.port = listener.getsockname()[1]
        if self.config.http_port > 0:
            self._http_server = _start_http(self, self.config.http_host, self.config.http_port)
        log.info("kvmw serve: RESP on %s:%d, http on %s, %d entries on disk", self.config.host,
                 self.config.port, self.config.http_port or "off", len(list(self._disk_entries())))

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        print(f"kvmw serve ready on {self.config.host}:{self.config.port}"
              + (f" (http {self.config.http_port})" if self.config.http_port else ""), flush=True)
        await self._stopped.wait()
        log.info("kvmw serve: shutting down, flushing writes to disk")
        if self._resp is not None:
            self._resp.close()
        if self._http_server is not None:
            self._http_server.shutdown()
        self.store.close(flush_timeout=60)

    def _disk_entries(self):
        for tier in self.store.tiers[1:]:
            yield from tier.entries()

    # ---- RESP -------------------------------------------------------------------------
    def _connection(self) -> RespConnection:
        authed = not self.config.token
        conn = RespConnection(self._command, self._limits(authed), on_close=self._clients.discard)
        self.counts["connections"] += 1
        self._clients.add(conn)
        conn.state.update(authed=authed, proto=2, queued=None)
        self._update_fast(conn, conn.state)
        if not conn.state["authed"]:
            asyncio.get_running_loop().call_later(self.config.auth_timeout, self._auth_expired, conn)
        return conn

    def _limits(self, authed: bool) -> Limits:
        cfg = self.config
        if authed:
            return Limits(cfg.max_request, cfg.max_args, cfg.max_value)
        return Limits(cfg.preauth_args * cfg.preauth_value, cfg.preauth_args, cfg.preauth_value)

    def _auth_expired(self, conn: RespConnection) -> None:
        if not conn.state["authed"] and not conn.closing:
            self.counts["auth_timeouts"] += 1
            conn.queue(b"-NOAUTH authentication timed out\r\n")
            conn.close()

    def _command(self, conn: RespConnection, args: list[bytes]) -> Any:
        """One command's reply, or an awaitable of it (SYNC; a SET waiting for room).
        (The parser has held it to the connection's limits: argument count and sizes.)"""
        st = conn.state
        name = args[0].upper()
        if not st["authed"] and name not in _PREAUTH:
            return b"-NOAUTH Authentication required.\r\n"
        if st["queued"] is not None and name not in _TRANSACTION:
            st["queued"].append(args)
            return b"+QUEUED\r\n"
        session = self._session.get(name)
        if session is not None:
            return session(conn, st, args)
        reply = self._execute(name, args)
        return reply if reply is not None else _NULL[st["proto"]]

    # ---- commands about the connection, the transaction or durability ------------------------
    def _session_quit(self, conn: RespConnection, st: dict[str, Any], args: list[bytes]) -> None:
        conn.queue(b"+OK\r\n")
        conn.close()

    def _session_auth(self, conn: RespConnection, st: dict[str, Any], args: list[bytes]) -> bytes:
        ok = len(args) in (2, 3) and hmac.compare_digest(args[-1], self.config.token.encode())
        self._authed(conn, st, ok)
        return b"+OK\r\n" if ok or not self.config.token else b"-WRONGPASS invalid token\r\n"

    def _session_multi(self, conn: RespConnection, st: dict[str, Any], args: list[bytes]) -> bytes:
        st["queued"] = []
        self._update_fast(conn, st)
        return b"+OK\r\n"

    def _session_discard(self, conn: RespConnection, st: dict[str, Any], args: list[bytes]) -> bytes:
        st["queued"] = None
        self._update_fast(conn, st)
        return b"+OK\r\n"

    def _session_exec(self, conn: RespConnection, st: dict[str, Any], args: list[bytes]) -> Any:
        queued, st["queued"] = st["queued"], None
        self._update_fast(conn, st)
        if queued is None:
            return b"-ERR EXEC without MULTI\r\n"
        nbytes = sum(len(a[2]) for a in queued if _is_set(a))
        if self.store.has_room(nbytes) or not self.config.disk_path:
            return self._exec(queued, st["proto"])
        return self._when_room(nbytes, lambda: self._exec(queued, st["proto"]),
                               b"-BUSY the write-through queue stayed full; the transaction was not run\r\n")

    def _session_kvmw_sync(self, conn: RespConnection, st: dict[str, Any], args: list[bytes]) -> Any:
        return self._sync()

    def _session_set(self, conn: RespConnection, st: dict[str, Any], args: list[bytes]) -> Any:
        if len(args) >= 3 and self.config.disk_path and not self.store.has_room(len(args[2])):
            return self._when_room(len(args[2]), lambda: self._execute(b"SET", args),
                                   b"-BUSY the write-through queue stayed full; the value was not stored\r\n")
        return self._execute(b"SET", args)

    def _exec(self, queued: list[list[bytes]], proto: int) -> list[Any]:
        replies = [self._execute(a[0].upper(), a) for a in queued]  # one loop turn: nothing interleaves
        out: list[Any] = [b"*%d\r\n" % len(replies)]
        for r in replies:
            r = _NULL[proto] if r is None else r
            out.extend(r if isinstance(r, list) else [r])
        return out

    def _authed(self, conn: RespConnection, st: dict[str, Any], ok: bool) -> None:
        if ok and not st["authed"]:
            st["authed"] = True
            conn.limits = self._limits(True)
            self._update_fast(conn, st)

    def _session_hello(self, conn: RespConnection, st: dict[str, Any], args: list[bytes]) -> bytes:
        want = int(args[1]) if len(args) > 1 and args[1].isdigit() else st["proto"]
        upper = [a.upper() for a in args]
        if b"AUTH" in upper:
            i = upper.index(b"AUTH")
            ok = len(args) > i + 2 and hmac.compare_digest(args[i + 2], self.config.token.encode())
            if self.config.token and not ok:
                return b"-WRONGPASS invalid token\r\n"
            self._authed(conn, st, ok)
        if not st["authed"]:
            return b"-NOAUTH HELLO must be called with AUTH when a token is set\r\n"
        if want not in (2, 3):
            return b"-NOPROTO unsupported protocol version\r\n"
        st["proto"] = want
        self._update_fast(conn, st)
        return _hello(want)

    async def _when_room(self, nbytes: int, run: Any, busy: bytes) -> Any:
        return run() if await self._room(nbytes) else busy

    async def _room(self, nbytes: int) -> bool:
        """Wait (other clients go on) until the write-through queue can take `nbytes`;
        False after `ack_timeout`: the caller answers -BUSY rather than drop the write."""
        if self.store.has_room(nbytes):
            return True
        self.counts["write_waits"] += 1
        deadline = time.monotonic() + self.config.ack_timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.002)
            if self.store.has_room(nbytes):
                return True
        self.counts["busy_replies"] += 1
        return False

    async def _sync(self) -> bytes:
        if not self.config.disk_path:
            self.counts["sync_failures"] += 1
            return b"-ERR KVMW.SYNC: a memory-only server (--memory-only) makes nothing durable\r\n"
        failed, overflow = await asyncio.get_running_loop().run_in_executor(None, self.store.sync, 120.0)
        if not failed and not overflow:
            return b"+OK\r\n"
        self.counts["sync_failures"] += 1
        disk = self.store.tiers[-1]
        reason = self.store.last_error(disk) if not self.store.healthy()[disk.name] else "refused or evicted first"
        log.warning("KVMW.SYNC: %d acknowledged writes are not on disk (%s)", len(failed) + overflow, reason)
        return b"-ERR KVMW.SYNC: %d acknowledged writes are not on disk (%s)\r\n" % (
            len(failed) + overflow, reason.encode(errors="replace")[:200])

    # ---- commands ---------------------------------------------------------------------
    def _execute(self, name: bytes, args: list[bytes]) -> Any:
        """A data command's reply (None: the null reply); `name` is args[0] in upper case."""
        self.counts["commands"] += 1
        handler = self._handlers.get(name)
        if handler is None:
            self.counts["errors"] += 1
            return b"-ERR unknown command '" + name[:64] + b"'\r\n"
        try:
            return handler(args[1:])
        except (IndexError, ValueError) as e:
            self.counts["errors"] += 1
            return b"-ERR wrong arguments for '" + name[:64] + b"': " + str(e).encode()[:100] + b"\r\n"

    def _live(self, key: bytes) -> str | None:
        name = store_key(key)
        deadline = self.expiry.get(name) if self.expiry else None
        if deadline is not None and time.monotonic() >= deadline:
            self.store.delete(name)
            del self.expiry[name]
            return None
        return name

    def _get(self, key: bytes) -> Any:
        name = self._live(key)
        if name is None:
            return None
        # the memory tier is a dict in this process: asked directly (the store's health
        # guard and bookkeeping cost a third of a small GET's time); a miss asks the store,
        # which reads the disk spill and promotes
        value = self._memory.get(name)
        if value is None and self.config.disk_path:
            value = self.store.get(name)
        if value is None or not is_long(name):
            return value
        framed = unframe_long(value)
        return framed[1] if framed is not None and framed[0] == bytes(key) else None

    @staticmethod
    def _bulk(value: Any) -> Any:
        """A bulk reply; None: null. A large value goes out as buffers (not copied into a
        reply string: see RespConnection.flush), a small one as one string."""
        if value is None:
            return None
        if type(value) is bytes and len(value) < DIRECT_SEND:
            return b"$%d\r\n%b\r\n" % (len(value), value)
        mv = memoryview(value).cast("B")
        return [b"$%d\r\n" % mv.nbytes, mv, b"\r\n"]

    def _cmd_ping(self, args: list[bytes]) -> bytes:
        return self._bulk(args[0]) if args else b"+PONG\r\n"

    def _cmd_client(self, args: list[bytes]) -> bytes:
        return b"+OK\r\n"

    def _cmd_select(self, args: list[bytes]) -> bytes:
        return b"+OK\r\n" if args and args[0] == b"0" else b"-ERR only db 0\r\n"

    def _cmd_get(self, args: list[bytes]) -> bytes:
        return self._bulk(self._get(args[0]))

    def _cmd_set(self, args: list[bytes]) -> bytes:
        key, value = args[0], args[1]
        name = store_key(key)
        self.store.put(name, frame_long(key, value) if len(key) > LONG_KEY else value)
        if self.expiry:
            self.expiry.pop(name, None)
        if len(args) > 2:
            opts = [a.upper() for a in args[2:]]
            if b"EX" in opts:
                self.expiry[name] = time.monotonic() + int(args[2 + opts.index(b"EX") + 1])
        return b"+OK\r\n"

    def _cmd_exists(self, args: list[bytes]) -> bytes:
        names = [self._live(k) for k in args]
        present = self.store.contains([n for n in names if n is not None])
        return b":%d\r\n" % sum(present)

    def _cmd_kvmw_prefix(self, args: list[bytes]) -> bytes:
        names = [self._live(k) or "" for k in args]
        return b":%d\r\n" % self.store.prefix_hits(names)

    def _cmd_del(self, args: list[bytes]) -> bytes:
        names = [store_key(k) for k in args]
        present = self.store.contains(names)
        for n in names:
            self.store.delete(n)
            self.expiry.pop(n, None)
        return b":%d\r\n" % sum(present)

    def _cmd_strlen(self, args: list[bytes]) -> bytes:
        value = self._get(args[0])
        return b":%d\r\n" % (0 if value is None else memoryview(value).nbytes)

    def _cmd_getrange(self, args: list[bytes]) -> bytes:
        value = self._get(args[0])
        if value is None:
            return b"$0\r\n\r\n"
        mv = memoryview(value).cast("B")
        start, end = int(args[1]), int(args[2])
        n = mv.nbytes
        start = max(start + n if start < 0 else start, 0)
        end = min(end + n if end < 0 else end, n - 1)
        return self._bulk(mv[start:end + 1] if start <= end else b"")

    def _cmd_scan(self, args: list[bytes]) -> bytes:
        pattern = None
        upper = [a.upper() for a in args]
        if b"MATCH" in upper:
            pattern = args[upper.index(b"MATCH") + 1].decode(errors="replace")
        names = {n for tier in self.store.tiers for n, _ in tier.entries()}
        keys = [k for k in (original_key(n, self.store.get(n) if is_long(n) else None) for n in sorted(names))
                if k is not None]
        if pattern is not None:
            keys = [k for k in keys if fnmatch.fnmatchcase(k.decode(errors="replace"), pattern)]
        body = b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in keys)
        return b"*2\r\n$1\r\n0\r\n*%d\r\n" % len(keys) + body

    def _cmd_dbsize(self, args: list[bytes]) -> bytes:
        return b":%d\r\n" % len({n for tier in self.store.tiers for n, _ in tier.entries()})

    def _cmd_info(self, args: list[bytes]) -> bytes:
        """Redis's INFO layout (``# Section`` then ``field:value`` lines), so redis-cli,
        redis-py's ``info()`` and monitoring agents read it."""
        want = {a.decode(errors="replace").lower() for a in args} - {"all", "default", "everything"}
        body = "".join(f"# {name.capitalize()}\r\n" + "".join(f"{k}:{v}\r\n" for k, v in fields.items()) + "\r\n"
                       for name, fields in self.info().items() if not want or name in want)
        return self._bulk(body.encode())

    def info(self) -> dict[str, dict[str, Any]]:
        st = self.store.stats()
        memory = st["tiers"][self.store.tiers[0].name]
        disk = st["tiers"].get("disk", {})
        names = {n for tier in self.store.tiers for n, _ in tier.entries()}
        return {
            "server": {"kvmw_version": _version(), "redis_version": "7.0.0", "redis_mode": "standalone",
                       "process_id": os.getpid(), "tcp_port": self.config.port,
                       "kvmw_fast_path": int(self._fast is not None),
                       "kvmw_fast_path_commands": self._fast_loop.commands if self._fast_loop is not None else 0,
                       "uptime_in_seconds": int(time.monotonic() - self._started)},
            "clients": {"connected_clients": len(self._clients)},
            "memory": {"used_memory": memory.get("used", 0), "maxmemory": memory.get("capacity", 0),
                       "used_memory_rss": _rss_bytes(), "maxmemory_policy": self.config.policy},
            "persistence": {"kvmw_disk": int(bool(self.config.disk_path)), "kvmw_disk_bytes": disk.get("used", 0),
                            "kvmw_disk_healthy": int(bool(disk.get("healthy", False))),
                            "kvmw_write_queue_depth": st["write_queue_depth"],
                            "kvmw_write_queue_bytes": st["write_queue_bytes"],
                            "kvmw_unwritten": len(self.store.unwritten)},
            "stats": {"total_connections_received": self.counts["connections"],
                      "total_commands_processed": self.counts["commands"],
                      "keyspace_hits": sum(t.get("hits", 0) for t in st["tiers"].values()),
                      "keyspace_misses": memory.get("misses", 0) - disk.get("hits", 0),
                      **{f"kvmw_{k}": v for k, v in self.counts.items() if k not in ("connections", "commands")}},
            "keyspace": {"db0": f"keys={len(names)},expires={len(self.expiry)},avg_ttl=0"} if names else {},
        }


def _start_http(server: "KVServer", host: str, port: int) -> Any:
    """``/metrics`` (prometheus_client's own WSGI app: content negotiation, gzip) and
    ``/healthz`` on a thread of their own, so a scrape never waits on the RESP loop."""
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    from kvmw.metrics import StoreMetrics, counters_collector

    metrics = StoreMetrics(server.store)
    metrics.registry.register(counters_collector("kvmw_server", server.counts, "kvmw serve's own counters"))
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if environ.get("PATH_INFO") == "/metrics":
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    class _Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:  # scrapes are not news
            pass

    class _Threading(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    httpd = make_server(host, port, app, server_class=_Threading, handler_class=_Quiet)
    server.config.http_port = httpd.server_port
    threading.Thread(target=httpd.serve_forever, name="kvmw-http", daemon=True).start()
    return httpd


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvmw")
    except PackageNotFoundError:
        return "dev"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


#: commands a client may send before AUTH, and those that are not queued inside MULTI
_PREAUTH = frozenset((b"AUTH", b"HELLO", b"PING", b"QUIT"))
_TRANSACTION = frozenset((b"QUIT", b"HELLO", b"AUTH", b"MULTI", b"DISCARD", b"EXEC"))
#: the null reply, by protocol version (RESP2 and RESP3 differ)
_NULL = {2: b"$-1\r\n", 3: b"_\r\n"}


def _by_command_name(server: "KVServer", prefix: str) -> dict[bytes, Any]:
    """Methods named `prefix` + command, by command name: ``_cmd_get`` -> b"GET",
    ``_cmd_kvmw_prefix`` -> b"KVMW.PREFIX"."""
    out = {}
    for m in dir(server):
        if m.startswith(prefix):
            name = m[len(prefix):]
            out[(name.replace("_", ".", 1) if name.startswith("kvmw_") else name).upper().encode()] = getattr(server, m)
    return out


def _is_set(args: list[bytes]) -> bool:
    return len(args) >= 3 and args[0].upper() == b"SET"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _hello(proto: int) -> bytes:
    fields = [(b"server", b"kvmw"), (b"version", b"%d" % PROTOCOL_VERSION), (b"proto", proto),
              (b"id", 1), (b"mode", b"standalone"), (b"role", b"master"), (b"modules", [])]
    out = [b"%%%d\r\n" % len(fields) if proto == 3 else b"*%d\r\n" % (2 * len(fields))]
    for k, v in fields:
        out.append(b"$%d\r\n%s\r\n" % (len(k), k))
        if isinstance(v, int):
            out.append(b":%d\r\n" % v)
        elif isinstance(v, list):
            out.append(b"*0\r\n")
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(v), v))
    return b"".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs --token)")
    p.add_argument("--port", type=int, default=6380, help="RESP port")
    p.add_argument("--http-port", type=int, default=0, help="/healthz and /metrics (0: off)")
    p.add_argument("--http-host", default="127.0.0.1", help="address of /healthz and /metrics")
    p.add_argument("--token-file", default=None,
                   help="file holding the AUTH token (default: KVMW_SERVER_TOKEN, else --token)")
    p.add_argument("--token", default="",
                   help="AUTH token, required for non-loopback addresses (visible in ps: prefer --token-file)")
    p.add_argument("--auth-timeout", type=float, default=10.0,
                   help="seconds a client has to authenticate when a token is set")
    p.add_argument("--config", default=None, help="kvmw YAML: cpu_capacity, disk_path, disk_capacity, policy")
    p.add_argument("--disk-path", default=None, help="folder of the disk spill (default: <the config's disk_path>/server)")
    p.add_argument("--memory-only", action="store_true", help="no disk spill (nothing survives a restart)")
    p.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                   help="run GET/SET/PING through the Python path too (default: the compiled loop when "
                        "kvmw was built with it; INFO's kvmw_fast_path says which)")


def _token(args: argparse.Namespace) -> str:
    """--token-file, else KVMW_SERVER_TOKEN, else --token (the one `ps` shows)."""
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise SystemExit(f"kvmw serve: {args.token_file} holds no token")
        return token
    return os.environ.get("KVMW_SERVER_TOKEN", "") or args.token


def run(args: argparse.Namespace) -> int:
    from kvmw.config import KVMWConfig
    from kvmw.memory import tune_allocator

    tune_allocator()
    cfg = KVMWConfig.load(args.config)
    server = KVServer(ServerConfig(
        host=args.host, port=args.port, http_port=args.http_port, http_host=args.http_host, token=_token(args),
        auth_timeout=args.auth_timeout,
        memory_capacity=cfg.cpu_capacity,
        disk_path="" if args.memory_only else (args.disk_path or str(cfg.disk_dir / "server")),
        disk_capacity=cfg.disk_capacity, policy=cfg.policy, write_queue_bytes=cfg.write_queue_bytes,
        fast_path=args.fast_path))
    try:  # uvloop's event loop: small commands ~20% faster than asyncio's (kvmw bench server)
        import uvloop

        uvloop.run(server.serve_forever())
    except ImportError:
        asyncio.run(server.serve_forever())
    return 0
