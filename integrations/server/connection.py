"""One client of `kvmw serve`: an asyncio protocol parsing RESP with hiredis.

Why a protocol and not streams: an engine's lookups are small request/reply
round trips, and a coroutine awaiting ``sock_recv_into`` registers and removes
its socket with the event loop on every request; a protocol's socket stays
registered and each readable event parses every command that arrived.

Parsing is ``hiredis.Reader``'s (RESP is the same grammar for requests and
replies). Inline commands (``PING`` from a shell tool or a health check) are
split here when they start a read and hiredis holds nothing; one inside a
pipelined read of RESP commands is a protocol error (hiredis cannot say where
the command before it ended).
hiredis allocates what it has parsed, never what a header announces, so what a
client can make the server hold is bounded by counting the bytes of the command
not yet complete (`Limits.max_request`, tiny before AUTH; reads are then 4 KiB,
so the bound holds within one read) and the arguments of each. A command that
starts a read while hiredis holds nothing has its array header and first bulk
header checked before it is fed, so an absurd frame is refused at once.

Replies go out through the transport; a large bulk reply (a stored value) goes
out with one ``writev`` straight from the stored buffer when nothing is queued
before it, so the kernel's copy is the only one (a partial send leaves the rest
to the transport).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hiredis

#: replies at least this large skip the transport's buffer when it is empty
DIRECT_SEND = 64 << 10
IOV_MAX = 512  # buffers per writev call (Linux allows 1024)
READ_BUFFER = 256 << 10
SMALL_READ_BUFFER = 4 << 10
_COMMAND_START = (ord("*"), ord("$"))


@dataclass(frozen=True)
class Limits:
    """What one command may be: bytes not yet parsed into a whole command, arguments."""

    max_request: int
    max_args: int
    max_value: int


class ProtocolError(Exception):
    """A frame the server will not parse; the connection is closed after the reply."""


def _check_header(data: memoryview, limits: Limits) -> None:
    """The array header and first bulk header at the start of `data`, if it starts one."""
    if data[:1] != b"*":
        return
    head = bytes(data[:64])
    end = head.find(b"\r\n")
    if end < 0:
        return
    try:
        n = int(head[1:end])
    except ValueError:
        raise ProtocolError("bad array length") from None
    if not 0 < n <= limits.max_args:
        raise ProtocolError(f"array length {n} outside 1..{limits.max_args}")
    kind = head[end + 2:end + 3]
    if kind and kind != b"$":
        raise ProtocolError(f"expected '$', got {kind!r}")
    bulk_end = head.find(b"\r\n", end + 2)
    if kind and bulk_end > 0:
        try:
            size = int(head[end + 3:bulk_end])
        except ValueError:
            raise ProtocolError("bad bulk length") from None
        if not 0 <= size <= limits.max_value:
            raise ProtocolError(f"a bulk of {size} bytes, more than {limits.max_value}")


class RespConnection(asyncio.BufferedProtocol):
    """Parses commands and hands them, in order, to `handle(conn, args)`, which returns
    a reply (bytes, a list of buffers, or None for nothing) or an awaitable of one: the
    commands behind an awaited one wait (reading pauses) so replies keep their order.
    `limits` holds for every parse until the server sets another (at AUTH)."""

    def __init__(self, handle: Callable[["RespConnection", list[bytes]], Any],
                 limits: Limits, send_buffer: int = 4 << 20,
                 on_close: Callable[["RespConnection"], None] | None = None) -> None:
        self._handle, self._on_close = handle, on_close
        self._send_buffer = send_buffer
        self._reader = hiredis.Reader()
        self._buf = bytearray(0)
        self._view = memoryview(self._buf)
        self.limits = limits
        self._partial = 0  # bytes fed since the last whole command
        self._idle = True  # hiredis holds no unparsed bytes
        self._pending: deque[list[bytes]] = deque()
        self._out: list[Any] = []
        self._busy = False  # an awaited command is running
        self._paused = False  # the transport's write buffer is full
        self.closing = False
        self.transport: asyncio.Transport | None = None
        self.state: dict[str, Any] = {}  # the server's per-connection state (auth, MULTI, ...)
        #: the server's compiled GET/SET/PING loop, ``run(buffer, start, end) -> (stop, replies)``,
        #: while this connection may use it (authenticated, RESP2, no MULTI); None: all in Python
        self.fast: Callable[[memoryview, int, int], tuple[int, Any]] | None = None

    # ---- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses: duck-typed
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._send_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_buffer)
        self._fd = sock.fileno() if sock is not None else -1

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    @property
    def limits(self) -> Limits:
        return self._limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        """Read buffer sized to the limits: 4 KiB while they are small (before AUTH, so a
        thousand idle strangers hold 4 MiB), 256 KiB after. Swapped only between reads:
        hiredis has copied what was read."""
        self._limits = limits
        size = READ_BUFFER if limits.max_request > READ_BUFFER else SMALL_READ_BUFFER
        if size != len(self._buf):
            self._buf = bytearray(size)
            self._view = memoryview(self._buf)

    def buffer_updated(self, nbytes: int) -> None:
        if self.closing:
            return
        start = 0
        fast = self.fast
        if fast is not None and self._idle and not self._pending and not self._busy:
            # whole GET/SET/PING commands at the start of the read run compiled; the Python
            # path parses from the first one the loop did not take
            start, replies = fast(self._view, 0, nbytes)
            if start == nbytes and type(replies) is bytes:  # nothing else to send before them
                self.transport.write(replies)  # type: ignore[union-attr]
                return
            if replies is not None:
                self.queue(replies)
            if start == nbytes:
                self.flush()
                return
        try:
            self._parse(start, nbytes)
        except (ProtocolError, hiredis.ProtocolError) as e:
            self.fail(f"protocol error: {e}")
            return
        self._run()

    def pause_writing(self) -> None:  # the client does not read its replies: stop reading it
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self.transport is not None and not self._busy and not self.closing:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._pending.clear()
        if self._on_close is not None:
            self._on_close(self)

    # ---- parsing ----------------------------------------------------------------------------
    def _parse(self, start: int, end: int) -> None:
        """Parses ``view[start:end]``, the part of this read the compiled loop did not run."""
        reader, limits, view = self._reader, self._limits, self._view
        nbytes = end - start
        started = self._idle  # this read starts a command
        if started and view[start] not in _COMMAND_START:
            data = self._inline(view[start:end])
            if not data.nbytes:
                return
            reader.feed(data)
        else:
            # "*N\r\n$": a short array of bulks, every engine's and tool's command; anything
            # else has its headers checked before hiredis sees it
            if started and (nbytes < 5 or view[start] != 42 or view[start + 2] != 13 or view[start + 4] != 36):
                _check_header(view[start:end], limits)
            reader.feed(view, start, nbytes)
        # at most the size of the command in progress as this read began; only a command
        # that may be larger than max_value has its arguments measured
        size = self._partial + nbytes
        pending = self._pending
        while True:
            cmd = reader.gets()
            if cmd is False:
                break
            if type(cmd) is not list or not cmd:
                raise ProtocolError("a command is an array of bulk strings")
            for arg in cmd:
                if type(arg) is not bytes:
                    raise ProtocolError("a command is an array of bulk strings")
            if len(cmd) > limits.max_args:
                raise ProtocolError(f"{len(cmd)} arguments, more than {limits.max_args}")
            if size > limits.max_value and max(map(len, cmd)) > limits.max_value:
                raise ProtocolError(f"a bulk of more than {limits.max_value} bytes")
            pending.append(cmd)
            size = nbytes  # the commands after the first began in this read
        # nothing held: the next read starts a command (or, inside an array hiredis has
        # partly consumed, an element: those start with "$", which the checks leave alone)
        self._idle = not reader.has_data()
        if self._idle:
            self._partial = 0
            return
        self._partial = size
        if started:  # a frame that is not whole yet: an absurd header is refused now
            _check_header(view[start:end], limits)
        if size > limits.max_request:
            raise ProtocolError(f"a command of more than {limits.max_request} bytes")

    def _inline(self, data: memoryview) -> memoryview:
        """Inline commands (``PING\\r\\n``) before the first array; the rest is RESP."""
        raw = bytes(data)
        at = 0
        while at < len(raw) and raw[at:at + 1] != b"*":
            end = raw.find(b"\r\n", at)
            if end < 0:
                if len(raw) - at > 4096:
                    raise ProtocolError("an inline command longer than 4096 bytes")
                raise ProtocolError("an inline command split across reads")
            words = raw[at:end].split()
            if words:
                self._pending.append(words)
            at = end + 2
        return data[at:]

    # ---- running commands -------------------------------------------------------------------
    def _run(self) -> None:
        pending, handle = self._pending, self._handle
        while pending and not self._busy and not self.closing:
            reply = handle(self, pending.popleft())
            if reply is None:
                continue
            if type(reply) is bytes:
                self._out.append(reply)
            elif type(reply) is list:
                self._out.extend(reply)
            else:  # an awaitable: the commands behind it wait
                self._busy = True
                if self.transport is not None:
                    self.transport.pause_reading()
                self.flush()
                asyncio.ensure_future(self._finish(reply))
                return
        self.flush()

    async def _finish(self, awaitable: Any) -> None:
        try:
            reply = await awaitable
        except Exception as e:  # a command's own failure is its reply, never the server's
            reply = b"-ERR " + str(e).encode(errors="replace")[:200] + b"\r\n"
        if self.closing:
            return
        self._busy = False
        if reply is not None:
            self.queue(reply)
        if self.transport is not None and not self._paused:
            self.transport.resume_reading()
        self._run()

    # ---- writing ----------------------------------------------------------------------------
    def queue(self, reply: Any) -> None:
        if isinstance(reply, list):
            self._out.extend(reply)
        else:
            self._out.append(reply)

    def flush(self) -> None:
        parts = self._out
        if not parts or self.transport is None or self.transport.is_closing():
            return
        self._out = []
        total = 0
        for p in parts:
            total += len(p) if type(p) is bytes else memoryview(p).nbytes
        if total < DIRECT_SEND or self._fd < 0 or self.transport.get_write_buffer_size():
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))
            return
        views = [memoryview(p).cast("B") for p in parts]
        first = 0
        while first < len(views):  # straight from the stored buffers while the socket takes them
            try:
                sent = os.writev(self._fd, views[first:first + IOV_MAX])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return  # the peer is gone: connection_lost follows
            while sent and first < len(views):
                size = views[first].nbytes
                if sent >= size:
                    sent -= size
                    first += 1
                else:
                    views[first] = views[first][sent:]
                    sent = 0
        if first < len(views):
            self.transport.write(b"".join(views[first:]))  # the rest waits in the transport

    def fail(self, message: str) -> None:
        """Reply with an error and close once it is sent."""
        self.queue(b"-ERR " + message.encode(errors="replace")[:200] + b"\r\n")
        self.close()

    def close(self) -> None:
        self.flush()
        self.closing = True
        self._pending.clear()
        if self.transport is not None:
            self.transport.close()
