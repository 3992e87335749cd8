"""vLLM's own model as a `kvmw.blending.blend.LayerRunner`: blending beneath vLLM, no patch.

The worker-side connector runs the blend on vLLM's model object: its embedding,
and each decoder layer's own ``forward(positions, hidden_states, residual)`` (so
norms, projections, biases, q/k norms, rotary embedding and MLP are vLLM's,
whatever the architecture). Only the attention call inside a layer is redirected
while the blend runs: each layer's `Attention` module gets an instance-level
``forward`` that writes the running tokens' fresh K/V into the prompt's dense KV
(`ScatterKV`) and attends over it with torch's SDPA, causal by position.
vLLM's paged kernel cannot serve here: it attends over a request's pages in
token order from its own metadata, not over a chosen subset of positions.

The layers are called directly, never through the model's compiled forward, so
this works whether vLLM compiled the model or runs it eagerly.

Finding the model: vLLM hands connectors no model. When vLLM offers a hook
(`register_model`, proposed upstream) the connector takes it; otherwise
`find_model_runner` finds the model runner that is calling
``register_kv_caches`` (every vLLM worker process does, once, after loading the
model) and the model is asked of it when first needed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from kvmw.blending.blend import ScatterKV
from kvmw.blending.rope import UnsupportedRotaryError
from kvmw.errors import KVMWError
from kvmw.eviction.attention import window_attention


class UnsupportedVLLMModelError(KVMWError, ValueError):
    """vLLM's model is not one kvmw can drive layer by layer."""


def find_model_runner(max_depth: int = 12) -> Any:
    """The object up the call stack that has ``get_model()`` (vLLM's model runner calling
    ``register_kv_caches``), or None."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if owner is not None and callable(getattr(owner, "get_model", None)) and hasattr(owner, "vllm_config"):
            return owner
    return None


def rotary_inv_freq(rotary: Any) -> torch.Tensor:
    """The frequencies [D/2] of a vLLM rotary module, checked against its own cos/sin table
    (a type whose table is not a plain rotation by position, times one constant, is refused)."""
    compute = getattr(rotary, "_compute_inv_freq", None)
    cache = getattr(rotary, "cos_sin_cache", None)
    if compute is None or cache is None or not getattr(rotary, "is_neox_style", True):
        raise UnsupportedRotaryError(f"{type(rotary).__name__}: kvmw re-positions neox-style rotary tables only")
    if getattr(rotary, "rotary_dim", None) != getattr(rotary, "head_size", rotary.rotary_dim):
        raise UnsupportedRotaryError("partial rotary embeddings are not supported")
    inv_freq = compute(rotary.base).float().cpu()
    table = cache[:64].float().cpu()
    half = inv_freq.numel()
    angles = torch.arange(table.shape[0], dtype=torch.float64)[:, None] * inv_freq.double()
    scale = table[0, 0]  # cos(0) times the table's constant factor (YaRN's attention factor)
    want = torch.cat([angles.cos(), angles.sin()], dim=1) * float(scale)
    tol = max(1e-4, 4 * torch.finfo(cache.dtype).eps)  # the table may be kept in bf16
    if table.shape[1] != 2 * half or not torch.allclose(table.double(), want, atol=tol, rtol=tol):
        raise UnsupportedRotaryError(f"{type(rotary).__name__}: its cos/sin table is not a rotation by position")
    return inv_freq


class VLLMLayerRunner:
    """Runs vLLM's decoder layers for a subset of a prompt's tokens over a dense KV.

    State between layers is vLLM's ``(hidden_states, residual)`` pair, [S, E] each."""

    def __init__(self, model: Any) -> None:
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        if layers is None or not hasattr(body, "embed_input_ids"):
            raise UnsupportedVLLMModelError(f"{type(model).__name__}: no decoder body with layers and embeddings")
        self.model = model
        self.body = body
        self.layers = list(layers)
        self.num_layers = len(self.layers)
        try:
            self.attns = [layer.self_attn.attn for layer in self.layers]
            rotary = self.layers[0].self_attn.rotary_emb
        except AttributeError as e:
            raise UnsupportedVLLMModelError(f"{type(model).__name__}: a layer without self_attn.attn ({e})") from None
        for attn in self.attns:
            if getattr(attn, "has_sink", False) or getattr(attn.impl, "logits_soft_cap", None) or getattr(
                    attn.impl, "alibi_slopes", None) is not None:
                raise UnsupportedVLLMModelError("attention with sinks, soft-capped logits or ALiBi is not supported")
        self.inv_freq = rotary_inv_freq(rotary)
        self._kv: ScatterKV | None = None
        self._layer = 0
        self._positions: torch.Tensor | None = None
        self._mass: torch.Tensor | None = None

    # ---- LayerRunner -------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.body.embed_input_ids(ids.to(self._device())), None

    def run_layer(self, i: int, state: tuple[torch.Tensor, torch.Tensor | None], positions: torch.Tensor,
                  kv: ScatterKV) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = state
        self._kv, self._layer, self._positions = kv, i, positions
        try:
            return self.layers[i](positions.to(hidden.device), hidden, residual)
        finally:
            self._kv = None

    def keep(self, state: tuple[torch.Tensor, torch.Tensor | None], mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, residual = state
        return hidden[mask], None if residual is None else residual[mask]

    @contextmanager
    def probe(self, num_positions: int) -> Iterator[torch.Tensor]:
        self._mass = torch.zeros(num_positions, dtype=torch.float32, device=self._device())
        try:
            yield self._mass
        finally:
            self._mass = None

    # ---- the redirected attention ------------------------------------------------------------
    @contextmanager
    def attached(self) -> Iterator["VLLMLayerRunner"]:
        """Within the block each layer's attention attends over the blend's dense KV."""
        for i, attn in enumerate(self.attns):
            attn.forward = self._attention_for(i)
        try:
            yield self
        finally:
            for attn in self.attns:
                attn.__dict__.pop("forward", None)

    def _attention_for(self, i: int):
        attn = self.attns[i]
        hq, hk, d = attn.num_heads, attn.num_kv_heads, attn.head_size
        scale = float(attn.impl.scale)
        window = getattr(attn, "sliding_window", None)

        def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
                    ) -> torch.Tensor:
            kv, positions = self._kv, self._positions
            if kv is None or i != self._layer:
                raise RuntimeError("kvmw's blend attention ran outside the blend")
            t = query.shape[0]
            heads = lambda x: x.view(t, hk, d).transpose(0, 1)[None]  # noqa: E731  [T, hk*D] -> [1, hk, T, D]
            keys, values = kv.update(heads(key), heads(value), i)
            q = query.view(t, hq, d).transpose(0, 1)  # [hq, T, D]
            key_pos = torch.arange(keys.shape[2], device=q.device)
            q_pos = positions.to(q.device)
            allowed = key_pos[None, :] <= q_pos[:, None]  # [T, N]
            if window:
                allowed &= key_pos[None, :] > q_pos[:, None] - window
            out = F.scaled_dot_product_attention(q[None], keys.to(q.dtype), values.to(q.dtype), attn_mask=allowed,
                                                 scale=scale, enable_gqa=hq != hk)  # [1, hq, T, D]
            if self._mass is not None:
                rows = window_attention(q, keys[0], q_pos, key_pos[None].expand(hk, -1), scale)
                self._mass.add_(rows.sum(dim=(0, 1)))
            return out[0].transpose(0, 1).reshape(t, hq * d)

        return forward

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device
