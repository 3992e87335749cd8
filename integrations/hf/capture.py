"""KV from a transformers model in kvmw's canonical layout (and back into a Cache)."""

from __future__ import annotations

import torch

from kvmw.layout import from_hf_layers, to_hf_layers


@torch.inference_mode()
def capture_kv(model: torch.nn.Module, input_ids: torch.Tensor, past: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Prefill `input_ids` ([T] or [1, T]) and return its KV as [L, 2, T, H, D]; with `past`
    (canonical KV of P tokens before them, left untouched) they run at positions P.. over it
    and only their own KV is returned."""
    ids = input_ids.reshape(1, -1).to(model.device)
    before = None if past is None else to_dynamic_cache(past, model.config)
    cache = model(ids, past_key_values=before, use_cache=True).past_key_values
    first = 0 if past is None else past.shape[2]
    return from_hf_layers([layer.keys[:, :, first:] for layer in cache.layers],
                          [layer.values[:, :, first:] for layer in cache.layers])


def to_dynamic_cache(kv: torch.Tensor, config) -> "DynamicCache":  # noqa: F821
    """A transformers DynamicCache holding canonical `kv` (positions 0..T-1)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(to_hf_layers(kv)):
        cache.update(k.contiguous(), v.contiguous(), i)
    return cache
