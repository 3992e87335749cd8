"""Run a Llama-like HF decoder for a chosen subset of query tokens over a full KV.

Selective recomputation needs what a normal forward cannot do: queries for a
few scattered tokens attending over every position, with the cached KV of the
tokens that are not recomputed. The adapter drives the model's own modules
(embedding, decoder layers, final norm, head), so q/k norms, biases and the
attention kernel stay the model's; it passes each layer a `ScatterKV` in place
of a Cache (`kvmw.blending.blend.ScatterKV`), whose `update` writes the fresh keys and values of the selected
tokens into the full per-layer KV and hands that back to attention, and a
boolean mask that lets query position p see key positions <= p (and within a
sliding window where the layer has one).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from kvmw.blending.blend import ScatterKV
from kvmw.errors import KVMWError

LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral")


class UnsupportedModelError(KVMWError, ValueError):
    """The model is not one the blending adapter knows how to drive."""


class LlamaLikeAdapter:
    """A `kvmw.blending.blend.LayerRunner` over a Llama-like transformers model."""

    def __init__(self, model: Any) -> None:
        if getattr(model.config, "model_type", "") not in LLAMA_LIKE:
            raise UnsupportedModelError(
                f"blending drives {', '.join(LLAMA_LIKE)} decoders; got {model.config.model_type!r}")
        self.model = model
        self.body = model.model
        self.layers = list(self.body.layers)
        self.windows = [getattr(layer.self_attn, "sliding_window", None) for layer in self.layers]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body.embed_tokens(ids.reshape(1, -1).to(self.model.device))

    def keep(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden[:, mask]

    def probe(self, num_positions: int) -> AbstractContextManager[torch.Tensor]:
        from kvmw.integrations.hf.probe import attention_probe

        return attention_probe(self.model, num_positions)

    def run_layer(self, i: int, hidden: torch.Tensor, positions: torch.Tensor, kv: ScatterKV) -> torch.Tensor:
        """Layer `i` for the tokens in `hidden` ([1, S, E], at `positions` [S]) over the full KV
        (positions 0..N-1; when S == N the queries are every position in order)."""
        kv_positions = torch.arange(kv.keys[i].shape[2], device=positions.device)
        cos_sin = self.body.rotary_emb(hidden, positions.reshape(1, -1))
        mask = None  # every token at its own position: sdpa's causal path, no mask to build
        bool_masks = self._bool_masks()
        if self.windows[i] or positions.numel() != kv_positions.numel() or not bool_masks:
            q, k = positions.reshape(-1, 1), kv_positions.reshape(1, -1)
            allowed = k <= q
            if self.windows[i]:
                allowed &= k > q - self.windows[i]
            mask = allowed[None, None]
            if not bool_masks:  # eager adds the mask to the logits: 0 or the dtype's min
                mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill_(
                    ~mask, torch.finfo(hidden.dtype).min)
        return self.layers[i](hidden, attention_mask=mask, position_ids=positions.reshape(1, -1),
                              past_key_values=kv, use_cache=True, position_embeddings=cos_sin)

    def _bool_masks(self) -> bool:
        """sdpa (and kvmw's ragged wrapper of it) takes a boolean mask and is causal without
        one; eager attention adds its mask to the logits and has no causal path of its own."""
        return "sdpa" in (getattr(self.model.config, "_attn_implementation", None) or "sdpa")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.body.norm(hidden))
