"""One configuration object for every integration.

Precedence, lowest first: the defaults below, a YAML file (``KVMW_CONFIG`` or an
explicit path), then ``KVMW_<FIELD>`` environment variables (``KVMW_CHUNK_SIZE=128``,
``KVMW_TIERS=cpu,redis``, ``KVMW_CPU_CAPACITY=2GiB``). The same names are used by
the HF hook, the vLLM connector and the server, so one file configures all three.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kvmw.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}


def kvmw_home() -> Path:
    """kvmw's own cache folder (models, default disk tier): ``KVMW_HOME`` or ~/.cache/kvmw."""
    return Path(os.environ.get("KVMW_HOME") or Path.home() / ".cache" / "kvmw")


def parse_size(value: int | str) -> int:
    """``"4GiB"`` -> 4294967296; ints pass through."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"not a size: {value!r} (use e.g. 512MiB, 4GiB, 1000000)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


@dataclass
class KVMWConfig:
    """Every setting kvmw reads. Field docs are the reference for YAML and env names."""

    #: Tokens per chunk, the unit of storage and reuse. For vLLM, a multiple of its block size.
    chunk_size: int = 256
    #: Codec spec for stored chunks, e.g. "none", "int8", "kivi4:g32+zstd".
    codec: str = "none"
    #: Tenant salt mixed into every key: tenants with different salts never share entries.
    cache_salt: str = ""
    #: Tiers top to bottom. Known: gpu, cpu, disk, redis, server.
    tiers: list[str] = field(default_factory=lambda: ["cpu", "disk", "redis"])
    #: Replacement policy of bounded tiers: lru, lfu, pgdsf.
    policy: str = "lru"
    gpu_capacity: int = 1 << 30
    cpu_capacity: int = 4 << 30
    #: Disk tier folder; empty means <KVMW_HOME>/store.
    disk_path: str = ""
    disk_capacity: int = 64 << 30
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Prefix of every Redis key kvmw writes.
    redis_prefix: str = "kvmw:"
    #: Seconds a Redis entry lives; 0 keeps it until Redis evicts it.
    redis_ttl: int = 0
    #: Blobs larger than this go to Redis as several parts in one transaction.
    redis_part_size: int = 1 << 20
    server_url: str = "kvmw://127.0.0.1:6380"
    #: Socket timeout (s) for remote tiers; a slower answer counts as a failure.
    remote_timeout: float = 2.0
    #: Write-through queue length (blobs); a full queue drops the write and counts it.
    write_queue: int = 64
    #: Write-through queue bound in bytes (the queued blobs stay in memory until written).
    write_queue_bytes: int = 256 << 20
    #: Seconds an unhealthy tier is skipped before the first retry; doubles up to 60 s.
    retry_backoff: float = 1.0
    #: vLLM: bytes of gathered KV the worker's background saver may hold queued; a step
    #: whose chunks would pass it drops them (counted) rather than wait.
    save_queue_bytes: int = 1 << 30
    #: vLLM: seconds the scheduler gives remote tiers (redis, server) to answer a lookup,
    #: over later steps; past it the request goes on with what the local tiers hold.
    lookup_timeout: float = 0.1
    #: vLLM: seconds an asynchronous load (chunks on a remote tier) may spend reading
    #: them; past it the request is recomputed instead of waiting on the tier.
    load_timeout: float = 1.0

    _SIZE_FIELDS = ("gpu_capacity", "cpu_capacity", "disk_capacity", "redis_part_size", "save_queue_bytes",
                   "write_queue_bytes")

    def __post_init__(self) -> None:
        for name in self._SIZE_FIELDS:
            setattr(self, name, parse_size(getattr(self, name)))
        if isinstance(self.tiers, str):
            self.tiers = [t.strip() for t in self.tiers.split(",") if t.strip()]
        if self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be positive, got {self.chunk_size}")

    @property
    def disk_dir(self) -> Path:
        return Path(self.disk_path) if self.disk_path else kvmw_home() / "store"

    def replace(self, **changes: Any) -> "KVMWConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: dict[str, str] | None = None,
             **overrides: Any) -> "KVMWConfig":
        """Defaults < YAML (`path` or ``KVMW_CONFIG``) < ``KVMW_*`` env < `overrides`."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = path or env.get("KVMW_CONFIG")
        if path:
            values.update(_read_yaml(Path(path)))
        known = {f.name: f for f in fields(cls) if not f.name.startswith("_")}
        for name, f in known.items():
            raw = env.get(f"KVMW_{name.upper()}")
            if raw is not None:
                values[name] = _coerce(name, f.type, raw)
        values.update(overrides)
        unknown = set(values) - set(known)
        if unknown:
            raise ConfigError(f"unknown kvmw setting(s): {sorted(unknown)}")
        return cls(**values)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping, got {type(data).__name__}")
    return data


def _coerce(name: str, annotation: Any, raw: str) -> Any:
    kind = str(annotation)
    try:
        if name in KVMWConfig._SIZE_FIELDS:
            return parse_size(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("list"):
            return [t.strip() for t in raw.split(",") if t.strip()]
        return raw
    except ValueError as e:
        raise ConfigError(f"KVMW_{name.upper()}={raw!r}: {e}") from e
