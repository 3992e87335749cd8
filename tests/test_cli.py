import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvmw.quantizers import make_codec
from kvmw.storage_tiers import DiskTier


def _kvmw(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kvmw", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def _parsers(parser, path=()):
    """(command path, parser) of `parser` and every subcommand below it."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_option_of_every_command_says_what_it_does_and_its_default():
    from kvmw.cli import BENCHES, build_parser

    seen = {}
    for path, parser in _parsers(build_parser()):
        seen[path] = parser
        assert parser.description, path
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.help == "==SUPPRESS==" or action.dest == "help":
                continue
            assert action.help, (path, action.dest)
            if action.default not in (None, False, "") and not isinstance(action.default, bool):
                # the default is in the help line, as argparse wraps it
                shown = " ".join(text.split())
                assert f"(default: {action.default})" in shown or "default" in action.help.lower(), \
                    (path, action.dest)
    assert {p[1] for p in seen if len(p) == 2 and p[0] == "bench"} == set(BENCHES)
    assert {p[0] for p in seen if len(p) == 1} == {"serve", "inspect", "bench", "demo"}


def test_help_and_serve_start_without_torch_or_the_benches(tmp_path):
    """`kvmw --help`, `kvmw bench --help`, every command's --help but a bench's own,
    and a running `kvmw serve`, with python's own record of what was imported."""
    from kvmw.testing.redis_process import free_port, ping

    for argv in (["--help"], ["bench", "--help"], ["serve", "--help"], ["inspect", "--help"], ["demo", "--help"]):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "kvmw", *argv], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0 and "usage: kvmw" in res.stdout, res.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if "|" in line}
        assert "torch" not in imported and "transformers" not in imported, argv
        assert not {m for m in imported if m.startswith("kvmw.bench")}, argv
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "kvmw", "serve", "--port", str(port),
                             "--memory-only"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if ping("127.0.0.1", port, 0.2):
                break
            time.sleep(0.05)
        assert ping("127.0.0.1", port, 0.5)
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    imported = {line.split("|")[-1].strip() for line in err.splitlines() if "|" in line}
    assert "kvmw.integrations.server.connection" in imported and "torch" not in imported


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
                "--rb-requests", "2000", "--json", str(out), "--redis-url", redis_url)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    rb = data["redis_benchmark"]  # redis-benchmark's own client against both servers
    assert {"set", "get", "ping_inline", "ping_mbulk"} <= set(rb)
    for cell in rb.values():
        assert cell["x_redis"] == cell["kvmw_rps"] / cell["redis_rps"] and cell["kvmw_rps"] > 100
        assert cell["python_path_x_redis"] == cell["python_path_rps"] / cell["redis_rps"]
    for size in ("3MiB", "32MiB"):
        assert data["server"][size]["1"]["gbps"] > 0 and data["redis"][size]["1"]["gbps"] > 0
        assert data["server"][size]["1"]["x_redis_paired"] > 0
    assert data["raw_tcp_gbps"] > 0 and data["reply_ceiling_3MiB_gbps"] > 0
    assert "1-client ceiling" in res.stdout


def test_demo_runs_cold_warm_and_restarted_phases_with_identical_answers():
    res = _kvmw("demo", "--tokens", "300", "--chunk-size", "64", "--max-new-tokens", "4", "--rag-doc-tokens", "128")
    assert res.returncode == 0, res.stdout + res.stderr
    # the RAG part: documents stored at the first question are loaded (not prefilled) after it
    assert "RAG: 3 documents stored once" in res.stdout and "3 cached, 0 new" in res.stdout
    rows = [line.split() for line in res.stdout.splitlines()
            if line.startswith(("none (cold)", "cpu ", "disk ", "redis "))]
    tiers = [r[0] for r in rows]
    assert tiers == ["none", "cpu", "cpu", "disk", "disk", "disk", "redis", "redis", "redis"]
    warm = [r for r in rows if r[0] != "none"]
    assert all(r[2] == "256" and r[5] == "yes" for r in warm)  # 4 chunks of 64 reused, same answer


def _assert_figure(path: Path, command: str) -> None:
    """A PNG stamped with the command that made it and the machine it ran on."""
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 600
        text = img.text
    assert text["Description"].startswith(command), text
    assert f"{len(os.sched_getaffinity(0))} CPU cores" in text["Source"] and "torch" in text["Source"]


@pytest.mark.parametrize("argv", [
    ["prefix", "--tokens", "256", "--chunk-size", "128", "--tiers", "cpu", "disk", "--codecs", "none", "int8",
     "--repeat", "1", "--steps", "2"],
    ["eviction", "--policies", "snapkv", "streaming_llm", "--budgets", "50%", "25%", "--context", "256",
     "--fidelity-samples", "1", "--steps", "4", "--repeat", "1", "--no-kvpress"],
    ["codecs", "--codecs", "int8", "kivi2", "--context", "128", "--held-out", "64", "--repeat", "1"],
], ids=lambda a: a[0])
def test_bench_figures_state_their_command_and_machine(tmp_path, argv):
    """Each bench with a figure writes it beside --json: what docs/benchmarks.md shows."""
    out = tmp_path / f"{argv[0]}.json"
    res = _kvmw("bench", *argv, "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(out.read_text())["model"] == "smollm2"
    _assert_figure(tmp_path / f"{argv[0]}.png", "kvmw bench " + " ".join(argv[:3]))


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
    _assert_figure(tmp_path / "rag.png", "kvmw bench rag --questions 2")

    none = _kvmw("bench", "rag", "--questions", "1", "--doc-tokens", "64", "--ratios", "--query-aware-ratios",
                 "--steps", "2", "--json", str(out))
    assert none.returncode == 0, none.stdout + none.stderr
    assert set(json.loads(out.read_text())["rag"]) == {"full_prefill", "full_reuse"}


@pytest.mark.slow
@pytest.mark.vllm
def test_bench_rag_beneath_vllm_writes_the_issue_keys(tmp_path):
    """`kvmw bench rag --engine vllm` on SmolLM2: the issue's keys per strategy and ratio
    (query-aware at 1.0 recomputes every document token: full prefill's answers, the HF
    path's too), and the agreement with the HF path over every strategy."""
    pytest.importorskip("vllm")
    out = tmp_path / "rag_vllm.json"
    res = _kvmw("bench", "rag", "--engine", "vllm", "--questions", "2", "--docs", "3", "--doc-tokens", "96",
                "--query-aware-ratios", "0.15", "1.0", "--steps", "4", "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    rag = json.loads(out.read_text())["rag_vllm"]
    assert {"full_prefill", "native_prefix", "full_reuse", "query_aware", "cacheblend", "epic"} <= set(rag)
    assert set(rag["query_aware"]) == {"0.15", "1"} and 0 <= rag["hf_agreement"] <= 1
    full, everything = rag["full_prefill"]["1"], rag["query_aware"]["1"]
    assert full["ttft_ratio"] == 1 and everything["accuracy"] == full["accuracy"]
    assert everything["hf_agreement"] == 1 and full["hf_agreement"] == 1
    assert rag["full_reuse"]["0"]["recomputed"] < rag["query_aware"]["0.15"]["recomputed"] < everything["recomputed"]
