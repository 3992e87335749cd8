import pytest

from kvmw.config import KVMWConfig, parse_size
from kvmw.errors import ConfigError


def test_defaults_are_documented_values():
    c = KVMWConfig.load(env={})
    assert c.chunk_size == 256 and c.codec == "none" and c.tiers == ["cpu", "disk", "redis"]
    assert c.cpu_capacity == 4 << 30 and c.policy == "lru"


def test_precedence_defaults_yaml_env_overrides(tmp_path):
    path = tmp_path / "kvmw.yaml"
    path.write_text("chunk_size: 128\ncodec: zstd\ncpu_capacity: 1GiB\ntiers: [cpu, disk]\n")
    c = KVMWConfig.load(path, env={})
    assert (c.chunk_size, c.codec, c.cpu_capacity, c.tiers) == (128, "zstd", 1 << 30, ["cpu", "disk"])
    env = {"KVMW_CONFIG": str(path), "KVMW_CHUNK_SIZE": "64", "KVMW_TIERS": "redis",
           "KVMW_CPU_CAPACITY": "512MiB", "KVMW_REMOTE_TIMEOUT": "0.5"}
    c = KVMWConfig.load(env=env)
    assert (c.chunk_size, c.tiers, c.cpu_capacity, c.remote_timeout) == (64, ["redis"], 512 << 20, 0.5)
    assert c.codec == "zstd"  # from the file
    assert KVMWConfig.load(env=env, chunk_size=32).chunk_size == 32


def test_bad_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        KVMWConfig.load(env={"KVMW_CHUNK_SIZE": "many"})
    with pytest.raises(ConfigError):
        KVMWConfig.load(env={"KVMW_CPU_CAPACITY": "lots"})
    with pytest.raises(ConfigError, match="unknown"):
        KVMWConfig.load(env={}, chunk_sise=3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError):
        KVMWConfig.load(bad, env={})
    with pytest.raises(ConfigError):
        KVMWConfig(chunk_size=0)


def test_parse_size():
    assert parse_size("3MiB") == 3 << 20 and parse_size("1.5 GB") == 1_500_000_000
    assert parse_size(17) == 17
