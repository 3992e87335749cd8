import json
import os
import subprocess
import sys

import torch

from kvmw.quantizers import make_codec
from kvmw.storage_tiers import DiskTier


def _kvmw(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kvmw", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_inspect_lists_keys_sizes_and_codec(tmp_path):
    kv = torch.randn(2, 2, 32, 2, 8).to(torch.float16)
    tier = DiskTier(tmp_path, 1 << 20)
    blob = make_codec("zstd").encode(kv, "f" * 32, positions=torch.arange(64, 96))
    tier.put("c0ffee" + "0" * 26, blob)
    res = _kvmw("inspect", "--tiers", "disk", env={"KVMW_DISK_PATH": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "c0ffee" in res.stdout and "none+zstd" in res.stdout and "64..95" in res.stdout
    assert str(len(blob)) in res.stdout


def test_bench_tiers_writes_the_issue_keys(tmp_path, redis_url):
    out = tmp_path / "tiers.json"
    res = _kvmw("bench", "tiers", "--repeat", "2", "--json", str(out), "--redis-url", redis_url)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    for tier in ("cpu", "disk", "redis"):
        for size in ("3MiB", "32MiB"):
            cell = data["tiers"][tier][size]
            assert cell["put_gbps"] > 0 and cell["get_gbps"] > 0 and cell["ratio_to_raw"] > 0
    assert "ratio" in res.stdout or "x" in res.stdout


def test_bench_server_writes_the_issue_keys_beside_redis(tmp_path, redis_url):
    out = tmp_path / "server.json"
    res = _kvmw("bench", "server", "--memory-only", "--clients", "1", "--ops", "3", "--rounds", "1",
                "--json", str(out), "--redis-url", redis_url)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    for size in ("3MiB", "32MiB"):
        assert data["server"][size]["1"]["gbps"] > 0 and data["redis"][size]["1"]["gbps"] > 0
        assert data["server"][size]["1"]["x_redis_paired"] > 0
    assert data["raw_tcp_gbps"] > 0 and data["reply_ceiling_3MiB_gbps"] > 0
    assert "1-client ceiling" in res.stdout


def test_demo_runs_cold_warm_and_restarted_phases_with_identical_answers():
    res = _kvmw("demo", "--tokens", "300", "--chunk-size", "64", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line.split() for line in res.stdout.splitlines()
            if line.startswith(("none (cold)", "cpu ", "disk ", "redis "))]
    tiers = [r[0] for r in rows]
    assert tiers == ["none", "cpu", "cpu", "disk", "disk", "disk", "redis", "redis", "redis"]
    warm = [r for r in rows if r[0] != "none"]
    assert all(r[2] == "256" and r[5] == "yes" for r in warm)  # 4 chunks of 64 reused, same answer


def test_bench_rag_writes_the_issue_keys_per_strategy_and_ratio(tmp_path):
    """`kvmw bench rag` on SmolLM2: the issue's keys for every strategy and ratio asked for,
    full prefill as its own baseline, and no CacheBlend run when `--ratios` names none."""
    out = tmp_path / "rag.json"
    res = _kvmw("bench", "rag", "--questions", "2", "--doc-tokens", "96", "--ratios", "0.3",
                "--query-aware-ratios", "0.15", "1.0", "--steps", "4", "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    rag = json.loads(out.read_text())["rag"]
    assert set(rag) == {"full_prefill", "full_reuse", "cacheblend", "epic", "query_aware"}
    assert set(rag["query_aware"]) == {"0.15", "1"} and set(rag["cacheblend"]) == {"0.3"}
    for ratios in rag.values():
        for cell in ratios.values():
            assert cell["ttft_ratio"] > 0 and 0 <= cell["accuracy"] <= 1 and 0 <= cell["agreement"] <= 1
    assert rag["full_prefill"]["1"]["ttft_ratio"] == 1 and rag["full_prefill"]["1"]["agreement"] == 1
    assert rag["query_aware"]["1"]["agreement"] == 1  # everything recomputed: full prefill's answer
    assert rag["full_reuse"]["0"]["work"] < rag["query_aware"]["0.15"]["work"] < rag["query_aware"]["1"]["work"]
    assert "x full prefill" in res.stdout

    none = _kvmw("bench", "rag", "--questions", "1", "--doc-tokens", "64", "--ratios", "--query-aware-ratios",
                 "--steps", "2", "--json", str(out))
    assert none.returncode == 0, none.stdout + none.stderr
    assert set(json.loads(out.read_text())["rag"]) == {"full_prefill", "full_reuse"}
