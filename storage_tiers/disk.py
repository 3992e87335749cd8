"""Disk tier: one file per key in sharded folders, crash-safe writes.

    <root>/<k[0:2]>/<k[2:4]>/<key>.kvmw

A put writes ``.tmp-*`` in the target folder, fsyncs it, renames it over the
final name and fsyncs the folder. A reader therefore sees either no file or a
whole one; a process killed mid-write leaves only a temp file, which the next
start deletes. The index (sizes, recency from mtime) is rebuilt by scanning at
start. Blobs carry their own checksum, so a file damaged later (bit rot, a
truncation by hand) is caught by the store and deleted.

Durability promise: once `put` returns True the blob survives kill -9 and
power loss (file and folder are fsync'd).

A put reserves its bytes in the index before the file exists (so concurrent puts
cannot overshoot capacity); a `get` meeting no file for a key being written is a
miss that keeps the reservation, and a write that finishes after its key was
deleted or evicted removes its file, so no file is ever left outside the index.
A key that cannot be a file name (not alphanumeric, longer than the file system
allows) is a `KeyRejectedError`: that key is not for this tier, the tier is fine.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvmw.errors import KeyRejectedError, TierError
from kvmw.storage_tiers.base import BytesLike, CapacityIndex, Tier
from kvmw.storage_tiers.policies import make_policy

SUFFIX = ".kvmw"
TMP_PREFIX = ".tmp-"
#: longest key: the temp file's name (prefix + name + 9 characters) within NAME_MAX (255)
MAX_KEY = 255 - len(TMP_PREFIX) - len(SUFFIX) - 9


class DiskTier(Tier):
    name = "disk"

    def __init__(self, root: str | os.PathLike, capacity: int, policy: str = "lru",
                 fsync: bool = True) -> None:
        super().__init__(capacity)
        self.root = Path(root)
        self.fsync = fsync
        self._index = CapacityIndex(capacity, make_policy(policy))
        self._writing: dict[str, int] = {}  # key -> puts of it in flight (under the index lock)
        self.root.mkdir(parents=True, exist_ok=True)
        self._rebuild_index()

    def path(self, key: str) -> Path:
        if not 4 <= len(key) <= MAX_KEY or not key.isascii() or not key.isalnum():
            raise KeyRejectedError(f"disk tier keys are 4 to {MAX_KEY} ASCII letters and digits, "
                                   f"got {len(key)} characters: {key[:40]!r}")
        return self.root / key[:2] / key[2:4] / (key + SUFFIX)

    def _rebuild_index(self) -> None:
        found: list[tuple[float, str, int]] = []
        for shard in self.root.glob("??/??"):
            for entry in os.scandir(shard):
                if entry.name.startswith(TMP_PREFIX):
                    _unlink(entry.path)  # a write that never completed
                elif entry.name.endswith(SUFFIX):
                    st = entry.stat()
                    found.append((st.st_mtime, entry.name[: -len(SUFFIX)], st.st_size))
        found.sort()  # oldest first, so recency order survives the restart
        with self._index.lock:
            for _, key, size in found:
                self._index.add(key, size)
            overflow = self._index.make_room("", 0) or []
        for key in overflow:  # capacity shrank since last run
            _unlink(self.path(key))

    def put(self, key: str, blob: BytesLike, cost: float = 1.0) -> bool:
        mv = memoryview(blob).cast("B")
        final = self.path(key)
        with self._index.lock:
            victims = self._index.make_room(key, mv.nbytes)
            if victims is None:
                self.counters.rejected += 1
                return False
            # Reserve the space now so concurrent puts don't overshoot capacity.
            self._index.add(key, mv.nbytes, cost)
            self._writing[key] = self._writing.get(key, 0) + 1
        for v in victims:
            _unlink(self.path(v))
        if victims:
            self._evicted(victims)
        try:
            self._write(final, mv)
        except BaseException:
            with self._index.lock:
                self._index.remove(key)
                self._done_writing(key)
            raise
        with self._index.lock:
            self._done_writing(key)
            if key not in self._index:  # deleted or evicted while being written: not kept
                _unlink(final)
                return False
        self.counters.puts += 1
        self.counters.bytes_written += mv.nbytes
        return True

    def _done_writing(self, key: str) -> None:
        left = self._writing.pop(key) - 1
        if left:
            self._writing[key] = left

    def _write(self, final: Path, mv: memoryview) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{TMP_PREFIX}{final.name}.{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                written = 0
                while written < mv.nbytes:
                    written += os.write(fd, mv[written:])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
        except OSError as e:
            _unlink(tmp)
            kind = "disk full" if e.errno == errno.ENOSPC else "write failed"
            raise TierError(f"disk tier {kind}: {e}") from e

    def get(self, key: str) -> BytesLike | None:
        with self._index.lock:
            known = key in self._index
            if known:
                self._index.touch(key)
        if not known:
            self._miss()
            return None
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError:
            with self._index.lock:
                if key not in self._writing:  # removed behind our back (not still being written)
                    self._index.remove(key)
            self._miss()
            return None
        try:
            size = os.fstat(fd).st_size
            buf = bytearray(size)
            mv = memoryview(buf)
            got = 0
            while got < size:
                n = os.readv(fd, [mv[got:]])
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
        self._hit(got)
        return mv[:got] if got < size else buf

    def contains(self, keys: Sequence[str]) -> list[bool]:
        with self._index.lock:
            return [k in self._index for k in keys]

    def delete(self, key: str) -> None:
        with self._index.lock:
            self._index.remove(key)
        try:
            path = self.path(key)
        except KeyRejectedError:  # no such file can exist
            return
        _unlink(path)  # a write of it still in flight removes its own file when it lands

    def entries(self) -> Iterator[tuple[str, int]]:
        with self._index.lock:
            return iter(list(self._index.sizes.items()))

    def used_bytes(self) -> int:
        return self._index.used


def _unlink(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
