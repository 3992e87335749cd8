"""The `server` tier: a client of `kvmw serve`.

`kvmw serve` speaks RESP, so this is the Redis tier pointed at it: the same
connection pool, timeouts, one-record-per-blob layout, multi-part MULTI/EXEC
writes and checks on read; the store's health rules give it retry with backoff
and unhealthy marking. ``kvmw://host:port`` URLs map to ``redis://host:port``;
a token in the URL (``kvmw://:TOKEN@host:port``) is sent with AUTH.
"""

from __future__ import annotations

from kvmw.storage_tiers.redis_tier import RedisTier


class ServerTier(RedisTier):
    name = "server"

    def __init__(self, url: str = "kvmw://127.0.0.1:6380", prefix: str = "kvmw:", ttl: int = 0,
                 part_size: int = 1 << 20, timeout: float = 2.0) -> None:
        if url.startswith("kvmw://"):
            url = "redis://" + url[len("kvmw://"):]
        super().__init__(url, prefix, ttl, part_size, timeout)
