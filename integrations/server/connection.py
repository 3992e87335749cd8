"""One client socket on the event loop, without asyncio's stream copies.

asyncio's streams cost a 3 MiB value two copies each way on Python 3.11: the
StreamReader appends every recv to its buffer and `readexactly` slices it out;
the transport joins `writelines` buffers and copies whatever a partial send
left into its own buffer. Here small frames are parsed out of one reusable
buffer, a large bulk value is received straight into the bytearray the store
keeps, and replies go out with `sendmsg` from the stored value itself, so the
kernel's copy is the only one.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
from typing import Any, Sequence

IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)


class ConnectionClosed(Exception):
    """The peer closed the connection (cleanly or mid-frame)."""


class FrameTooLong(Exception):
    """A line without CRLF longer than the read buffer allows."""


class Connection:
    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 buffer_size: int = 1 << 16, send_buffer: int = 0) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if send_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.sock = sock
        self.loop = loop
        self._fd = sock.fileno()
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        self.out: list[Any] = []  # replies gathered while pipelined requests remain

    @property
    def peer(self) -> Any:
        try:
            return self.sock.getpeername()
        except OSError:
            return None

    def buffered(self) -> int:
        return self._end - self._start

    # ---- reading ----------------------------------------------------------------------
    async def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            if self._start == 0:
                raise FrameTooLong(f"no CRLF within {len(self._buf)} bytes")
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        got = await self.loop.sock_recv_into(self.sock, self._view[self._end:])
        if not got:
            raise ConnectionClosed()
        self._end += got

    async def readline(self) -> bytes:
        """The next CRLF-terminated line, without the CRLF."""
        while True:
            i = self._buf.find(b"\r\n", self._start, self._end)
            if i >= 0:
                line = bytes(self._view[self._start:i])
                self._start = i + 2
                return line
            await self._fill()

    async def readexactly(self, n: int) -> bytearray:
        """n bytes as a new bytearray; large ones are received straight into it."""
        out = _new_bytearray(n)
        have = min(n, self._end - self._start)
        out[:have] = self._view[self._start:self._start + have]
        self._start += have
        if have == n:
            return out
        target = memoryview(out)
        while have < n:
            got = await self.loop.sock_recv_into(self.sock, target[have:])
            if not got:
                raise ConnectionClosed()
            have += got
        return out

    async def expect_crlf(self) -> bool:
        while self._end - self._start < 2:
            await self._fill()
        ok = self._view[self._start:self._start + 2] == b"\r\n"
        self._start += 2
        return ok

    # ---- writing ----------------------------------------------------------------------
    def queue(self, reply: Any) -> None:
        """Add a reply (bytes, or a list of buffers) to the next `flush`."""
        if isinstance(reply, list):
            self.out.extend(reply)
        else:
            self.out.append(reply)

    async def flush(self) -> None:
        parts, self.out = self.out, []
        if parts:
            await self.send(parts)

    async def send(self, parts: Sequence[Any]) -> None:
        """Gathered write of `parts` (bytes or buffers): one sendmsg when the socket has room."""
        views = [memoryview(p).cast("B") for p in parts]
        first = 0
        while first < len(views):
            try:
                sent = self.sock.sendmsg(views[first:first + IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            while sent:
                size = views[first].nbytes
                if sent >= size:
                    sent -= size
                    first += 1
                else:
                    views[first] = views[first][sent:]
                    sent = 0
            while first < len(views) and not views[first].nbytes:
                first += 1
            if first < len(views):
                await self._writable()

    async def _writable(self) -> None:
        fut = self.loop.create_future()
        self.loop.add_writer(self._fd, _resolve, fut)
        try:
            await fut
        finally:
            self.loop.remove_writer(self._fd)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


_BYTEARRAY_FROM = ctypes.pythonapi.PyByteArray_FromStringAndSize
_BYTEARRAY_FROM.restype = ctypes.py_object
_BYTEARRAY_FROM.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def _new_bytearray(n: int) -> bytearray:
    """A bytearray of n bytes, left uninitialized when large: `bytearray(n)` zero-fills,
    a memset as long as a fifth of receiving the value. Every byte is then received
    (or the value is dropped with the connection), so nothing stale is ever served."""
    return _BYTEARRAY_FROM(None, n) if n >= 1 << 16 else bytearray(n)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
