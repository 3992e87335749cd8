"""CPU, disk and Redis tiers on real memory, real files and a real redis-server."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kvmw.blob import parse_blob
from kvmw.errors import TierError
from kvmw.quantizers import make_codec
from kvmw.storage_tiers import CPUTier, DiskTier, RedisTier
from kvmw.storage_tiers.disk import TMP_PREFIX


def blob_of(n_tokens: int, seed: int = 0) -> bytearray:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, 2, n_tokens, 2, 8, generator=g).to(torch.float16)
    return make_codec("none").encode(kv, "f" * 32)


def key_of(i: int) -> str:
    return f"{i:032x}"


@pytest.fixture(params=["cpu", "disk", "redis"])
def tier(request, tmp_path):
    if request.param == "cpu":
        yield CPUTier(1 << 30)
    elif request.param == "disk":
        yield DiskTier(tmp_path / "store", 1 << 30)
    else:
        prefix = request.getfixturevalue("redis_prefix")
        t = RedisTier(request.getfixturevalue("redis_url"), prefix=prefix, part_size=64 << 10)
        yield t
        t.close()


def test_put_get_contains_delete(tier):
    small, large = blob_of(16, 1), blob_of(4096, 2)  # large: several Redis parts
    assert tier.put(key_of(1), small) and tier.put(key_of(2), large)
    assert bytes(tier.get(key_of(1))) == bytes(small)
    assert bytes(tier.get(key_of(2))) == bytes(large)
    assert tier.get(key_of(3)) is None
    assert tier.contains([key_of(1), key_of(3), key_of(2)]) == [True, False, True]
    tier.delete(key_of(2))
    assert tier.get(key_of(2)) is None and tier.contains([key_of(2)]) == [False]
    st = tier.stats()
    assert st["hits"] == 2 and st["misses"] >= 2 and st["puts"] == 2
    assert {k for k, _ in tier.entries()} == {key_of(1)}


@pytest.mark.parametrize("make", [lambda p: CPUTier(5000), lambda p: DiskTier(p, 5000)])
def test_bounded_tiers_evict_lru(make, tmp_path):
    t = make(tmp_path / "s")
    b = blob_of(16)  # ~2.3 KB: two fit
    t.put(key_of(1), b), t.put(key_of(2), b)
    t.get(key_of(1))
    t.put(key_of(3), b)
    assert t.contains([key_of(1), key_of(2), key_of(3)]) == [True, False, True]
    assert t.used_bytes() <= 5000 and t.counters.evictions == 1
    assert not t.put(key_of(4), blob_of(4096))  # larger than the whole tier
    assert t.counters.rejected == 1


def test_disk_index_survives_restart_and_keeps_recency(tmp_path):
    t = DiskTier(tmp_path, 1 << 20)
    for i in range(3):
        t.put(key_of(i), blob_of(16, i))
        time.sleep(0.01)
    t.get(key_of(0))
    os.utime(t.path(key_of(0)))  # reads don't touch mtime; a restart sees write order
    t2 = DiskTier(tmp_path, 1 << 20)
    assert sorted(k for k, _ in t2.entries()) == [key_of(i) for i in range(3)]
    assert t2.used_bytes() == t.used_bytes()
    assert bytes(t2.get(key_of(2))) == bytes(blob_of(16, 2))
    # shrinking capacity on restart evicts the oldest
    t3 = DiskTier(tmp_path, t.used_bytes() - 1)
    assert t3.contains([key_of(1)]) == [False] and not t3.path(key_of(1)).exists()


KILL_WRITER = r"""
import sys, torch
from kvmw.quantizers import make_codec
from kvmw.storage_tiers import DiskTier
t = DiskTier(sys.argv[1], 1 << 34)
i = 0
while True:
    kv = torch.full((4, 2, 8192, 2, 16), float(i % 100), dtype=torch.float16)
    key = f"{i:032x}"
    t.put(key, make_codec("none").encode(kv, "f" * 32))
    print(key, flush=True)  # acknowledged: put returned
    i += 1
"""


def test_disk_survives_kill_9_mid_write(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    acked = []
    while len(acked) < 6:
        acked.append(proc.stdout.readline().strip())
    time.sleep(0.05)  # land inside a later write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    acked += [line.strip() for line in proc.stdout if line.strip()]
    t = DiskTier(tmp_path, 1 << 34)
    present = {k for k, _ in t.entries()}
    assert set(acked) <= present  # nothing acknowledged is lost
    assert not list(tmp_path.rglob(TMP_PREFIX + "*"))  # torn writes cleaned at start
    for key in present:
        parse_blob(t.get(key))  # nothing half-written is served (raises if so)


def test_disk_full_raises_tier_error_and_leaves_no_partial_file(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a 1 MiB tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        t = DiskTier(mnt, 1 << 30)  # capacity claims more than the device has
        assert t.put(key_of(1), blob_of(1024))
        with pytest.raises(TierError, match="disk full"):
            t.put(key_of(2), blob_of(16384))
        assert t.contains([key_of(2)]) == [False]
        assert not list(mnt.rglob(TMP_PREFIX + "*")) and not t.path(key_of(2)).exists()
        assert bytes(t.get(key_of(1))) == bytes(blob_of(1024))
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_redis_ttl_and_atomic_multipart_record(redis_url, redis_prefix):
    import redis

    t = RedisTier(redis_url, prefix=redis_prefix, ttl=100, part_size=64 << 10)
    big = blob_of(4096)
    t.put(key_of(7), big)
    client = redis.Redis.from_url(redis_url)
    names = sorted(n.decode() for n in client.scan_iter(match=redis_prefix + "*"))
    n_parts = -(-len(big) // (64 << 10))
    assert len(names) == n_parts  # one record: head + parts, no separate metadata key
    assert all(0 < client.ttl(n) <= 100 for n in names)
    client.delete(names[-1])  # a part vanished (evicted): the record is a miss, not garbage
    assert t.get(key_of(7)) is None
    t.close()


def test_redis_down_raises_and_recovers(redis_proc):
    t = RedisTier(redis_proc.url, prefix="k:", timeout=0.5)
    assert t.put(key_of(1), blob_of(16))
    redis_proc.kill()
    with pytest.raises(Exception):
        t.get(key_of(1))
    redis_proc.start()
    assert t.get(key_of(1)) is None  # fresh server, nothing persisted; but it answers again
    assert t.put(key_of(1), blob_of(16)) and t.get(key_of(1)) is not None


def test_unusable_disk_path_is_an_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OSError):
        DiskTier(f, 1 << 20)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tier needs CUDA; none on this machine")
def test_gpu_tier_round_trip():
    from kvmw.storage_tiers import GPUTier

    t = GPUTier(1 << 20)
    b = blob_of(16)
    assert t.put(key_of(1), b)
    assert t.get_device(key_of(1)).device.type == "cuda"
    assert bytes(t.get(key_of(1))) == bytes(b)


def test_gpu_tier_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from kvmw.storage_tiers import GPUTier

    with pytest.raises(TierError, match="CUDA"):
        GPUTier(1 << 20)


def test_redis_cluster_url_uses_the_cluster_client(redis_cluster):
    from redis.cluster import RedisCluster

    t = RedisTier(redis_cluster, prefix="c:", part_size=64 << 10)
    assert isinstance(t.client, RedisCluster)
    blobs = {key_of(i): blob_of(2048, i) for i in range(6)}  # multi-part records
    for k, b in blobs.items():
        assert t.put(k, b)
    assert all(bytes(t.get(k)) == bytes(b) for k, b in blobs.items())
    assert t.contains([key_of(0), key_of(99)]) == [True, False]
    t.delete(key_of(0))
    assert t.get(key_of(0)) is None
    assert {k for k, _ in t.entries()} == set(blobs) - {key_of(0)}
    t.close()


class _GatedDisk(DiskTier):
    """A disk tier whose file writes wait at a gate: a put in flight, held open."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = __import__("threading").Event()

    def _write(self, final, mv):
        self.gate.wait(10)
        super()._write(final, mv)


def _files(root):
    return sorted(p.name[:-len(".kvmw")] for p in root.rglob("*.kvmw"))


@pytest.mark.parametrize("meanwhile", ["get", "delete", "evict"])
def test_a_put_in_flight_never_leaves_a_file_outside_the_index(tmp_path, meanwhile):
    """get while the file is not there yet (used to drop the reservation and orphan the
    file), delete and eviction of the key before its write lands."""
    import threading

    size = len(blob_of(8))
    disk = _GatedDisk(tmp_path, capacity=size + size // 2)
    writer = threading.Thread(target=disk.put, args=(key_of(1), blob_of(8)))
    writer.start()
    time.sleep(0.1)
    if meanwhile == "get":
        assert disk.get(key_of(1)) is None
    elif meanwhile == "delete":
        disk.delete(key_of(1))
    else:  # a second put needs the room: key 1, reserved but not yet written, is evicted
        second = threading.Thread(target=disk.put, args=(key_of(3), blob_of(8, 3)))
        second.start()
        time.sleep(0.1)
        assert [k for k, _ in disk.entries()] == [key_of(3)]
    disk.gate.set()
    writer.join()
    if meanwhile == "evict":
        second.join()
    disk.gate.set()
    writer.join()
    indexed = sorted(k for k, _ in disk.entries())
    assert _files(tmp_path) == indexed
    if meanwhile == "get":
        assert indexed == [key_of(1)] and bytes(disk.get(key_of(1))) == bytes(blob_of(8))
    elif meanwhile == "delete":
        assert indexed == []
    else:
        assert indexed == [key_of(3)]
    assert disk.used_bytes() == sum(size for _, size in disk.entries())
