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
#: a block whose first line is ``# name.py`` is a script of its own; the others one session
SCRIPTS = {m.group(1): code for lang, code in BLOCKS if lang == "python"
           for m in [re.match(r"# (\w+\.py)\n", code)] if m}
PYTHON = [code for lang, code in BLOCKS if lang == "python" and code not in SCRIPTS.values()]
SHELL = [code for lang, code in BLOCKS if lang == "sh"]


def _run_script(script: Path, tmp_path: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KVMW_DISK_PATH": str(tmp_path / "store"),
           "KVMW_REDIS_PREFIX": f"readme-{uuid.uuid4().hex[:8]}:", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def _run_python(code: str, tmp_path: Path, timeout: float, env: dict[str, str] | None = None) -> None:
    script = tmp_path / "readme_session.py"
    script.write_text('if __name__ == "__main__":\n' + "".join(f"    {line}\n" for line in code.splitlines()))
    _run_script(script, tmp_path, timeout, env)


def _commands(block: str) -> list[str]:
    """Logical lines (backslash continuations joined), blank and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_readme_has_the_snippets_this_test_runs():
    assert len(PYTHON) >= 3
    assert any("make demo" in code and "make test" in code for code in SHELL)


def test_the_python_snippets_run_as_one_session(model_path, tmp_path, redis_prefix):
    """The default tiers include Redis: its keys go under the fixture's prefix, deleted after."""
    _run_python("\n".join(PYTHON), tmp_path, timeout=900, env={"KVMW_REDIS_PREFIX": redis_prefix})


@pytest.mark.vllm
def test_the_offline_vllm_script_run_twice_answers_the_second_time_from_the_disk_tier(model_path, tmp_path):
    """As the README says: the same answer, the prompt's full chunks read from disk by a
    fresh process (vLLM's own prefix cache died with the first). Two vLLM starts: the
    script runs at vLLM's default dtype, so an HF-made store (fp32) would not be its."""
    pytest.importorskip("vllm")
    script = tmp_path / "offline_vllm.py"
    script.write_text(SCRIPTS["offline_vllm.py"])
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    runs = [_run_script(script, tmp_path, 600, env) for _ in range(2)]
    found = [re.search(r"^(\d+) prompt tokens from cache: (.*)$", out, flags=re.M) for out in runs]
    assert all(found), runs
    (cold, cold_text), (warm, warm_text) = [(int(m.group(1)), m.group(2)) for m in found]
    assert cold == 0 and warm == 512 and warm_text == cold_text, (cold, warm)  # 606 tokens: 2 full chunks
    # its RAG request: the documents computed and stored by the first run, reused by the second
    reused = [re.search(r"^documents reused: (\d+): (.*)$", out, flags=re.M) for out in runs]
    assert all(reused), runs
    assert [int(m.group(1)) for m in reused] == [0, 2]
    assert any((tmp_path / "store").rglob("*.kvmw")), "the first run left nothing on disk"


def test_the_served_tests_start_the_readmes_server_command():
    """The served tests (test_vllm_served.py) start vLLM by `server_command`: it is the
    README's command, flag for flag (the model path and the listening address aside)."""
    from kvmw.testing.vllm_server import server_command

    line = next(c for block in SHELL for c in _commands(block) if c.startswith("python -m vllm."))
    readme = shlex.split(line)
    cmd = server_command("MODEL", 8000, {}, ())
    assert cmd[1:3] == readme[1:3]
    readme_flags = dict(zip(readme[3::2], readme[4::2]))
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert {k for k in flags if k not in ("--host", "--port")} == set(readme_flags)
    assert json.loads(flags["--kv-transfer-config"]) == json.loads(readme_flags["--kv-transfer-config"])


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


def test_the_configuration_table_lists_every_kvmwconfig_field():
    import dataclasses

    table = README[README.index("## Configuration"):].split("\n## ")[0]
    rows = re.findall(r"^\| `([a-z_]+)`(?: / `([a-z_]+)`)?(?: / `([a-z_]+)`)? \|", table, flags=re.M)
    listed = {name for row in rows for name in row if name}
    assert listed == {f.name for f in dataclasses.fields(KVMWConfig)}


def test_every_figure_in_the_docs_exists_and_names_its_command_and_machine():
    from PIL import Image

    page = (ROOT / "docs" / "benchmarks.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\((figures/[\w.-]+\.png)\)", page)
    assert len(figures) >= 4
    for fig in figures:
        with Image.open(ROOT / "docs" / fig) as img:
            text = img.text
        assert text["Description"].startswith("kvmw bench "), fig
        assert "CPU cores" in text["Source"] and "torch" in text["Source"], fig
        assert f"`{text['Description']}`" in page, f"{fig}: the page does not quote the command it came from"
