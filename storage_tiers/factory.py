"""Build the configured tier stack."""

from __future__ import annotations

import logging

from kvmw.config import KVMWConfig
from kvmw.errors import ConfigError, TierError
from kvmw.storage_tiers.base import Tier
from kvmw.storage_tiers.tiered import TieredStore

log = logging.getLogger("kvmw.store")


def make_tier(name: str, config: KVMWConfig) -> Tier:
    if name == "cpu":
        from kvmw.storage_tiers.memory import CPUTier

        return CPUTier(config.cpu_capacity, config.policy)
    if name == "gpu":
        from kvmw.storage_tiers.memory import GPUTier

        return GPUTier(config.gpu_capacity, config.policy)
    if name == "disk":
        from kvmw.storage_tiers.disk import DiskTier

        return DiskTier(config.disk_dir, config.disk_capacity, config.policy)
    if name == "redis":
        from kvmw.storage_tiers.redis_tier import RedisTier

        return RedisTier(config.redis_url, config.redis_prefix, config.redis_ttl,
                         config.redis_part_size, config.remote_timeout)
    if name == "server":
        from kvmw.storage_tiers.server_tier import ServerTier

        return ServerTier(config.server_url, config.redis_prefix, config.redis_ttl,
                          config.redis_part_size, config.remote_timeout)
    raise ConfigError(f"unknown tier {name!r}; known: gpu, cpu, disk, redis, server")


def build_store(config: KVMWConfig | None = None) -> TieredStore:
    """The store `config.tiers` describes. A tier that cannot exist here (no CUDA,
    unwritable disk path) is left out with a warning rather than failing the engine."""
    config = config or KVMWConfig.load()
    tiers = []
    for name in config.tiers:
        try:
            tiers.append(make_tier(name, config))
        except (TierError, OSError) as e:
            log.warning("kvmw tier %s left out: %s", name, e)
    if not tiers:
        raise ConfigError(f"none of the tiers {config.tiers} could be created")
    return TieredStore(tiers, write_queue=config.write_queue, retry_backoff=config.retry_backoff,
                       write_queue_bytes=config.write_queue_bytes)
