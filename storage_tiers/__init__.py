"""Where blobs live: gpu, cpu, disk, redis tiers and the `TieredStore` that orders them."""

from kvmw.storage_tiers.base import Tier
from kvmw.storage_tiers.disk import DiskTier
from kvmw.storage_tiers.factory import build_store, make_tier
from kvmw.storage_tiers.memory import CPUTier, GPUTier
from kvmw.storage_tiers.policies import LFU, LRU, PGDSF, make_policy
from kvmw.storage_tiers.redis_tier import RedisTier
from kvmw.storage_tiers.tiered import TieredStore

__all__ = ["Tier", "CPUTier", "GPUTier", "DiskTier", "RedisTier", "TieredStore", "build_store",
           "make_tier", "LRU", "LFU", "PGDSF", "make_policy"]
