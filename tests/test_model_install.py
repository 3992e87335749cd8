"""`python -m kvmw.integrations.hf.models install`: a fresh KVMW_HOME gets the same model
as the shared one, and the long step says what it is doing while it runs."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

from kvmw.integrations.hf.models import model_dir


def test_install_into_a_fresh_home_reports_each_step_and_gives_the_same_model(tmp_path, model_path):
    env = {**os.environ, "KVMW_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "kvmw.integrations.hf.models", "install", "smollm2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [line for line in res.stdout.splitlines() if line.startswith("[kvmw]")]
    assert [s.split()[1] for s in steps] == ["installing", "checking", "converting", "model"], steps
    assert steps[-1].endswith(" s") and "installed in" in steps[-1]
    fresh = tmp_path / "models" / "smollm2"
    assert res.stdout.strip().splitlines()[-1] == str(fresh)
    assert json.loads((fresh / "config.json").read_text()) == json.loads((model_dir("smollm2") / "config.json").read_text())
    assert filecmp.cmp(fresh / "model.safetensors", model_dir("smollm2") / "model.safetensors", shallow=False)
    again = subprocess.run([sys.executable, "-m", "kvmw.integrations.hf.models", "install", "smollm2"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == str(fresh)  # installed: nothing to do, no steps
