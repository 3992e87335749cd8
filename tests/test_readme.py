"""The README's snippets run as written, so the guide cannot rot.

Python blocks continue one session, as the README says: they run in order in one
fresh interpreter.
Shell blocks: each command runs in its dry form (`make -n`, `--help`), every
``--kv-transfer-config`` JSON parses, and ``export`` lines must set real
`KVMWConfig` fields. A line marked ``# GPU build`` needs the `vllm` package (the
CPU build's `vllm` console script fails at start), so only its JSON is checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kvmw.config import KVMWConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [code for lang, code in BLOCKS if lang == "sh"]


def _run_python(code: str, tmp_path: Path, timeout: float) -> None:
    script = tmp_path / "readme_session.py"
    # as the README says for scripts: vLLM spawns its engine, which re-imports __main__
    script.write_text('if __name__ == "__main__":\n' + "".join(f"    {line}\n" for line in code.splitlines()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KVMW_DISK_PATH": str(tmp_path / "store"),
           "KVMW_REDIS_PREFIX": f"readme-{uuid.uuid4().hex[:8]}:", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _commands(block: str) -> list[str]:
    """Logical lines (backslash continuations joined), blank and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_readme_has_the_snippets_this_test_runs():
    assert len(PYTHON) >= 3
    assert any("make demo" in code and "make test" in code for code in SHELL)


def test_the_python_snippets_run_as_one_session(model_path, tmp_path):
    _run_python("\n".join(PYTHON), tmp_path, timeout=900)


def _check_json_args(words: list[str]) -> None:
    for flag, value in zip(words, words[1:]):
        if flag == "--kv-transfer-config":
            config = json.loads(value)
            assert config["kv_connector"] == "KVMWConnector", config


@pytest.mark.parametrize("line", [c for block in SHELL for c in _commands(block)])
def test_each_shell_command_works_in_its_dry_form(line):
    gpu_only = "# GPU build" in line
    line = line.split(" #")[0].rstrip(" &")
    words = shlex.split(line)
    _check_json_args(words)
    if gpu_only:
        return
    if words[0] == "export":
        env = dict(w.split("=", 1) for w in words[1:])
        config = KVMWConfig.load(env=env)
        for name, value in env.items():
            field = name.removeprefix("KVMW_").lower()
            assert hasattr(config, field), name
        return
    if words[0] == "make":
        cmd = ["make", "-n", *words[1:]]
    elif words[0] == "python":
        if "vllm" in line:
            pytest.importorskip("vllm")
        cmd = [sys.executable, *words[1:3], "--help"]
    elif words[0] == "kvmw":
        cmd = [sys.executable, "-m", "kvmw", words[1], "--help"]
    else:
        raise AssertionError(f"the README test does not know how to check {line!r}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
