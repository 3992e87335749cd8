"""Run a Llama-like HF decoder for a chosen subset of query tokens over a full KV.

Selective recomputation needs what a normal forward cannot do: queries for a
few scattered tokens attending over every position, with the cached KV of the
tokens that are not recomputed. The adapter drives the model's own modules
(embedding, decoder layers, final norm, head), so q/k norms, biases and the
attention kernel stay the model's; it passes each layer a `ScatterKV` in place
of a Cache, whose `update` writes the fresh keys and values of the selected
tokens into the full per-layer KV and hands that back to attention, and a
boolean mask that lets query position p see key positions <= p (and within a
sliding window where the layer has one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvmw.blending.strategy import Deviation
from kvmw.errors import KVMWError

LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral")


class UnsupportedModelError(KVMWError, ValueError):
    """The model is not one the blending adapter knows how to drive."""


@dataclass
class ScatterKV:
    """Per-layer full KV [1, H, T, D]; `update` scatters the selected tokens' fresh KV in.

    `deviation`, when a list, receives the layer's `Deviation` (fresh vs previously
    held KV of the `index` tokens) before the fresh KV overwrites the held one.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    index: torch.Tensor
    deviation: list[Deviation] | None = field(default=None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.deviation is not None:
            old_k, old_v = k[:, :, self.index], v[:, :, self.index]
            self.deviation.append(Deviation((key_states - old_k).float().pow(2).sum(dim=(0, 3)),
                                            (value_states - old_v).float().pow(2).sum(dim=(0, 3))))
        k[:, :, self.index] = key_states.to(k.dtype)
        v[:, :, self.index] = value_states.to(v.dtype)
        return k, v


class LlamaLikeAdapter:
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

    def run_layer(self, i: int, hidden: torch.Tensor, positions: torch.Tensor, kv: ScatterKV,
                  kv_positions: torch.Tensor) -> torch.Tensor:
        """Layer `i` for the tokens in `hidden` ([1, S, E], at `positions` [S]) over the full KV
        (at `kv_positions`, 0..N-1; when S == N the queries are every position in order)."""
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
