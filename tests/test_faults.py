"""The fault campaign's short form (`kvmw bench faults`, every case but the vLLM one:
tests/test_vllm_connector.py kills Redis beneath a real engine): nothing wrong, nothing
lost, no request failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.faults
def test_the_short_fault_campaign_loses_nothing_and_returns_no_wrong_kv(tmp_path, redis_url):
    out = tmp_path / "faults.json"
    cases = ["blobs", "keys", "server_kill", "preauth", "redis_restart_hf", "disk_full"]
    res = subprocess.run([sys.executable, "-m", "kvmw", "bench", "faults", "--cases", *cases, "--blobs", "1500",
                          "--kills", "2", "--kill-after", "1", "--preauth-connections", "64", "--requests", "12",
                          "--redis-url", redis_url, "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    faults = json.loads(out.read_text())["faults"]
    assert set(faults) == set(cases)
    for case, r in faults.items():
        assert (r["wrong"], r["lost"], r["failed_requests"]) == (0, 0, 0), (case, r)
    blobs = faults["blobs"]
    assert blobs["tried"] == 1500 and blobs["crashed"] == 0 and blobs["tiers_stayed_healthy"]
    assert set(blobs["kinds"]) == {"random", "truncated", "bit_flip", "forged_meta", "forged_payload", "other_model"}
    assert faults["keys"]["disk"]["healthy"] and faults["keys"]["disk"]["rejected_keys"] >= 1
    assert faults["server_kill"]["tried"] >= 50  # SYNC-acknowledged values read back after the kills
    pre = faults["preauth"]
    assert pre["closed_by_server"] == 64 and pre["rss_growth_mib"] < 16
    assert faults["redis_restart_hf"]["tokens_reused"] > 0  # hits between the kills, recomputation across
    full = faults["disk_full"]
    if "skipped" not in full:
        assert 0 < full["on_disk"] < full["tried"]  # the disk did fill; memory kept the rest
    assert "case" in res.stdout and "failed requests" in res.stdout  # the table
