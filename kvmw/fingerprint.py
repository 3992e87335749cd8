"""Model identity: a blob made by one model is never served to another.

The fingerprint covers everything that changes the meaning of a KV tensor:
architecture, geometry, dtype, rotary settings, and the weights themselves
(name/revision when known, else a hash of a fixed sample of the weights, so two
random-initialised models of the same config still differ).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import torch
import xxhash


@dataclass(frozen=True)
class ModelFingerprint:
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    rope: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    weights_id: str = ""

    @cached_property
    def digest(self) -> str:
        """32 hex chars, stable across processes, machines and Python versions."""
        canon = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), default=str)
        return xxhash.xxh3_128_hexdigest(canon.encode())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelFingerprint) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    @classmethod
    def from_hf(cls, model: Any, weights_id: str | None = None) -> "ModelFingerprint":
        """Fingerprint a transformers causal LM (config + a sample of its weights)."""
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        rope = {
            k: v
            for k, v in text_config.to_dict().items()
            if k.startswith("rope") or k in ("max_position_embeddings", "partial_rotary_factor")
        }
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if weights_id is None:
            weights_id = weights_sample_hash(model)
        return cls(
            architecture=(config.architectures or [config.model_type])[0],
            num_layers=text_config.num_hidden_layers,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=dtype,
            rope=rope,
            weights_id=weights_id,
        )


def weights_sample_hash(model: Any, sample_bytes: int = 1 << 16) -> str:
    """Hash the first `sample_bytes` of a few fixed parameters (first, middle, last).

    Cheap (no full-weight pass) yet different for any two independently trained or
    initialised models; fine-tunes that touch only middle layers should pass an
    explicit `weights_id` (name@revision) instead.
    """
    params = list(model.named_parameters())
    picks = {0, len(params) // 2, len(params) - 1}
    h = xxhash.xxh3_128()
    for i in sorted(picks):
        name, p = params[i]
        flat = p.detach().reshape(-1)
        n = max(1, sample_bytes // flat.element_size())
        h.update(name.encode())
        h.update(flat[:n].contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
