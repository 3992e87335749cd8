"""The same `ModelFingerprint` for a vLLM engine as the HF hook builds for that model.

The HF hook calls `ModelFingerprint.from_hf(model)` on a loaded transformers
model: config fields plus a hash of a sample of three parameters (first,
middle, last of `named_parameters()`), in the model's dtype. vLLM's own modules
name and fuse weights differently (``qkv_proj``), so instead we rebuild what
transformers would have: the HF config from the model folder, the parameter
*names* from a weightless (meta-device) instance, and the three sampled
tensors read straight from the checkpoint's safetensors, cast to the engine's
dtype. `from_hf` then runs unchanged on that stand-in, so the digest (and every
key derived from it) is the one the HF hook computes: a prefix stored by one is
a hit for the other.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from kvmw.fingerprint import ModelFingerprint

log = logging.getLogger("kvmw.vllm")


def resolve_model_dir(model: str, revision: str | None = None) -> Path | None:
    """A local folder for `model` (a path, or a hub id already in the local HF cache)."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # not cached / no hub library: the caller falls back to a name id
        return None


class _StandIn:
    """Just enough of a transformers model for `ModelFingerprint.from_hf`."""

    def __init__(self, config: Any, params: list[tuple[str, torch.Tensor]]) -> None:
        self.config = config
        self._params = params

    def named_parameters(self):
        return iter(self._params)

    def parameters(self):
        return (p for _, p in self._params)


def _weight_files(folder: Path) -> dict[str, Path]:
    """Parameter name -> safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        return {name: folder / f for name, f in mapping.items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: f for k in st.keys()})
    return out


def _leading(file: Path, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `numel` values (row-major) of a checkpoint tensor, cast to `dtype`,
    reading only the rows needed. Returned with its full first-dim-sliced shape."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as st:
        sl = st.get_slice(name)
        shape = sl.get_shape()
        per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
        rows = min(shape[0], max(1, -(-numel // per_row))) if shape else 1
        t = sl[:rows] if shape else st.get_tensor(name)
    return t.to(dtype)


def fingerprint_for_vllm(model: str, dtype: torch.dtype, revision: str | None = None,
                         trust_remote_code: bool = False, sample_bytes: int = 1 << 16) -> ModelFingerprint:
    """The fingerprint `ModelFingerprint.from_hf` gives the HF model at `model` in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = resolve_model_dir(model, revision)
    config = AutoConfig.from_pretrained(str(folder) if folder else model, revision=revision,
                                        trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    names = [(n, p) for n, p in meta.named_parameters()]
    picks = sorted({0, len(names) // 2, len(names) - 1})
    if folder is not None:
        files = _weight_files(folder)
        params: list[tuple[str, torch.Tensor]] = list(names)
        element = torch.empty((), dtype=dtype).element_size()
        try:
            for i in picks:
                name = names[i][0]
                params[i] = (name, _leading(files[name], name, max(1, sample_bytes // element), dtype))
            return ModelFingerprint.from_hf(_StandIn(config, params))
        except (KeyError, OSError) as e:
            log.warning("kvmw: could not sample weights of %s (%s); fingerprinting by name, so HF-hook "
                        "entries of this model will not be shared", model, e)
    return ModelFingerprint.from_hf(_StandIn(config, [(n, torch.empty(0, dtype=dtype)) for n, _ in names]),
                                    weights_id=f"{model}@{revision or 'main'}")

