"""transformers side of eviction: a position-aware, budgeted `Cache` and the hooks that
feed policies the attention rows they read.

RoPE correctness. Keys are cached post-RoPE at their original positions, so an
evicted cache is shorter than the sequence it stands for. `EvictionLayer` keeps
both counts: `get_seq_length()` is the number of tokens *seen* (what
transformers turns into the next position_ids and `generate` uses to slice the
prompt), while `get_mask_sizes()` gives the stored length and an offset of
seen - stored, so the causal mask is built in stored coordinates (every stored
token is in the past; new tokens are causal among themselves).

Layers of different lengths. A policy that shares its budget across layers (KVzip's
global scope) leaves each layer with its own stored length, but transformers builds
one mask for all layers. `EvictionCache.get_mask_sizes` sizes it for the longest
layer, and `ragged_layers(model)` switches the model to a wrapper of its attention
(sdpa or eager) that cuts the mask to each layer's keys: its last S_l + q columns,
i.e. the layer's stored tokens (all in the past, visible) and the q new ones (causal).
A no-op where the mask already fits; `compress(model, cache, ...)` (and so
`prefill_compressed`) calls it when needed.

Scoring. `eviction_hooks(model)` puts a forward hook on each attention module. It
acts only when the call's cache is an `EvictionCache`: it recomputes the queries
of the rows the policy reads from the layer input (q_proj + the model's own
rotary embedding; the main pass keeps SDPA), stores the last W of them on the
layer, accumulates attention mass for H2O (all rows, in blocks), and, if the
cache has a token bound, evicts down to it right after the layer's attention.

Reconstruction (KVzip). `reconstruct(model, cache, context, prompt)` runs a second
pass over the cache: the repeat prompt, then the context again, teacher-forced.
While it runs the hooks recompute every row's query and keep, per layer, the
largest attention each context token gets from them (`reconstruction_scores`);
afterwards each layer is rolled back to the context alone (stored tokens, their
positions and the seen count as before), so the question still lands at T.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kvmw.eviction.attention import accumulate_attention
from kvmw.eviction.base import Budget, Policy, ScoreInputs
from kvmw.eviction.kvzip import reconstruction_scores
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: prefix of the attention implementations `ragged_layers` registers ("kvmw_ragged_sdpa", ...)
RAGGED = "kvmw_ragged_"


class EvictionLayer(DynamicLayer):
    """A DynamicLayer whose tokens can be evicted per KV head; tracks their RoPE positions."""

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0  # tokens of the sequence so far (stored or evicted)
        self.positions: torch.Tensor | None = None  # [H, S] int64
        self.mass: torch.Tensor | None = None  # [H, S] fp32, H2O's accumulated attention
        self.queries: torch.Tensor | None = None  # [q_heads, W, D], newest queries
        self.query_positions: torch.Tensor | None = None  # [W]
        self.reconstruction: torch.Tensor | None = None  # [H, S] fp32, KVzip's scores

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise ValueError("the eviction cache holds one sequence (batch size 1)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            H = key_states.shape[1]
            self.positions = torch.empty(H, 0, dtype=torch.long, device=key_states.device)
        n = key_states.shape[-2]
        new = torch.arange(self.seen, self.seen + n, device=key_states.device)
        self.positions = torch.cat([self.positions, new.expand(key_states.shape[1], n)], dim=1)
        if self.mass is not None:
            self.mass = torch.cat([self.mass, self.mass.new_zeros(self.mass.shape[0], n)], dim=1)
        self.seen += n
        return super().update(key_states, value_states)

    @property
    def stored(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def reset(self) -> None:
        super().reset()
        self.seen, self.positions, self.mass, self.queries, self.query_positions = 0, None, None, None, None
        self.reconstruction = None

    def load(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, seen: int) -> None:
        """Fill from stored KV ([1, H, S, D]) at `positions` ([S] or [H, S]) of a `seen`-token sequence."""
        self.reset()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.positions = positions.to(keys.device).long().expand(keys.shape[1], -1).contiguous()
        self.seen = seen

    def inputs(self, scaling: float | None = None) -> ScoreInputs:
        return ScoreInputs(keys=self.keys[0], values=self.values[0], positions=self.positions,
                           queries=self.queries, query_positions=self.query_positions, mass=self.mass,
                           scaling=scaling, reconstruction=self.reconstruction)

    def keep(self, indices: torch.Tensor) -> None:
        """Keep the tokens at `indices` ([H, k], sorted) of every head; drop the rest."""
        H, k = indices.shape
        idx = indices[None, :, :, None].expand(1, H, k, self.keys.shape[-1])
        self.keys = self.keys.gather(2, idx)
        self.values = self.values.gather(2, idx)
        self.positions = self.positions.gather(1, indices)
        if self.mass is not None:
            self.mass = self.mass.gather(1, indices)
        if self.reconstruction is not None:
            self.reconstruction = self.reconstruction.gather(1, indices)

    def rollback(self, stored: int, seen: int) -> None:
        """Drop every token stored after the first `stored` and set the seen count back to
        `seen` (the reconstruction pass leaves nothing behind)."""
        self.keys, self.values = self.keys[:, :, :stored], self.values[:, :, :stored]
        self.positions = self.positions[:, :stored]
        if self.mass is not None:
            self.mass = self.mass[:, :stored]
        self.seen = seen

    def nbytes(self) -> int:
        return 0 if not self.is_initialized else self.keys.nbytes + self.values.nbytes


class EvictionCache(Cache):
    """KV cache of one sequence that a `Policy` can shrink.

    - `compress(budget)` after a prefill run under `eviction_hooks(model)`: keep
      `budget` tokens per layer and KV head, or the budget of all layers together
      where the policy shares it (`Policy.keep_layers`; compress-after-prefill: the
      question that follows is not seen).
    - `max_tokens`: a bound kept during generation (StreamingLLM, H2O, ...): the
      hooks evict down to it after each forward that overflows it.
    """

    def __init__(self, config: Any, policy: Policy | None = None, max_tokens: int | None = None) -> None:
        text = config.get_text_config(decoder=True)
        super().__init__(layers=[EvictionLayer() for _ in range(text.num_hidden_layers)])
        self.policy = policy
        self.max_tokens = max_tokens
        #: set while `reconstruct` runs: the hooks score reconstruction rows in blocks of this size
        self.reconstruction_block: int | None = None
        if max_tokens is not None and policy is None:
            raise ValueError("a bounded eviction cache needs a policy")

    def compress(self, budget: Budget | int, policy: Policy | None = None) -> None:
        """Evict every layer down to `budget` tokens with `policy` (default: the cache's)."""
        policy = policy or self.policy
        if policy is None:
            raise ValueError("compress needs a policy")
        layers = [layer for layer in self.layers if layer.stored]
        for layer, indices in zip(layers, policy.keep_layers([layer.inputs() for layer in layers], budget)):
            layer.keep(indices)

    def stored_tokens(self) -> int:
        """Tokens stored per KV head, averaged over the layers (they differ when a policy
        shares its budget across layers; the sum over layers is exact)."""
        return sum(layer.stored for layer in self.layers) // len(self.layers)

    def layer_lengths(self) -> list[int]:
        """Tokens each layer stores per KV head."""
        return [layer.stored for layer in self.layers]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """The mask transformers builds once for every layer is sized for the longest
        layer (`ragged_layers` cuts it to each layer's length)."""
        return max(self.layers, key=lambda layer: layer.stored).get_mask_sizes(query_length)

    def nbytes(self) -> int:
        """Bytes of K and V held (positions and scores not counted: int64/fp32 per token per head)."""
        return sum(layer.nbytes() for layer in self.layers)

    @classmethod
    def from_kv(cls, config: Any, kv: torch.Tensor, positions: torch.Tensor, seen: int,
                **kwargs: Any) -> EvictionCache:
        """A cache holding canonical `kv` [L, 2, S, H, D] at `positions` ([S] or [L, H, S])
        of a sequence of `seen` tokens (e.g. chunks stored pruned)."""
        cache = cls(config, **kwargs)
        per = kv.transpose(2, 3)  # [L, 2, H, S, D]
        for i, layer in enumerate(cache.layers):
            pos = positions if positions.dim() == 1 else positions[i]
            layer.load(per[i, 0][None].contiguous(), per[i, 1][None].contiguous(), pos, seen)
        return cache


def _apply_rotary(module: torch.nn.Module, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's own RoPE (its module's `apply_rotary_pos_emb`, so variants stay right)."""
    apply = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        raise NotImplementedError(f"{type(module).__name__}: no apply_rotary_pos_emb in its module")
    return apply(q, q, cos, sin)[0]


def recompute_queries(module: torch.nn.Module, hidden: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Post-RoPE queries [q_heads, n, D] of the rows of `hidden` ([1, n, hidden])."""
    cos, sin = position_embeddings
    n = hidden.shape[1]
    q = module.q_proj(hidden).view(1, n, -1, module.head_dim)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q)
    q = _apply_rotary(module, q.transpose(1, 2), cos[:, -n:], sin[:, -n:])
    return q[0]


def _after_attention(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, EvictionCache):
        return
    if cache.reconstruction_block is not None:
        _score_reconstruction(module, cache, args, kwargs)
        return
    if cache.policy is None:
        return
    policy = cache.policy
    layer = cache.layers[module.layer_idx]
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    n = hidden.shape[1]
    rows = n if policy.accumulates else min(policy.query_rows, n)
    if rows:
        with torch.no_grad():
            q = recompute_queries(module, hidden[:, -rows:], kwargs["position_embeddings"])
        q_pos = torch.arange(layer.seen - rows, layer.seen, device=q.device)
        if policy.accumulates:
            if layer.mass is None:
                layer.mass = torch.zeros(layer.positions.shape, dtype=torch.float32, device=q.device)
            layer.mass += accumulate_attention(q, layer.keys[0], q_pos, layer.positions, module.scaling)
        w = policy.query_rows
        if w:
            q, q_pos = q[:, -w:], q_pos[-w:]
            if layer.queries is not None and q.shape[1] < w:
                q = torch.cat([layer.queries, q], dim=1)[:, -w:]
                q_pos = torch.cat([layer.query_positions, q_pos])[-w:]
            layer.queries, layer.query_positions = q, q_pos
    if cache.max_tokens is not None and layer.stored > cache.max_tokens:
        layer.keep(policy.keep(layer.inputs(module.scaling), cache.max_tokens))


def _score_reconstruction(module: torch.nn.Module, cache: EvictionCache, args: tuple,
                          kwargs: dict[str, Any]) -> None:
    """Every row of this reconstruction step: the max attention each context token gets."""
    layer = cache.layers[module.layer_idx]
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    n = hidden.shape[1]
    with torch.no_grad():
        q = recompute_queries(module, hidden, kwargs["position_embeddings"])
    q_pos = torch.arange(layer.seen - n, layer.seen, device=q.device)
    n_ctx = layer.reconstruction.shape[1]
    scores = reconstruction_scores(q, layer.keys[0], q_pos, layer.positions, n_ctx, module.scaling,
                                   cache.reconstruction_block)
    layer.reconstruction = torch.maximum(layer.reconstruction, scores)


def fit_mask(mask: torch.Tensor | None, kv_length: int) -> torch.Tensor | None:
    """A mask [..., q, K] built for the longest layer, cut to a layer of `kv_length` keys:
    its last `kv_length` columns (stored tokens, all visible, then the new tokens)."""
    if mask is None or mask.shape[-1] == kv_length:
        return mask
    return mask[..., -kv_length:]


def _ragged_attention(impl: str):
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any):
        if impl == "eager":  # each modeling module defines its own
            forward = sys.modules[type(module).__module__].eager_attention_forward
        else:
            forward = ALL_ATTENTION_FUNCTIONS[impl]
        return forward(module, query, key, value, fit_mask(attention_mask, key.shape[-2]), **kwargs)
    return attention


def ragged_layers(model: torch.nn.Module) -> None:
    """Let `model` attend over an `EvictionCache` whose layers store different numbers of
    tokens: its attention implementation (sdpa or eager) becomes a registered wrapper
    (`RAGGED` + name) that cuts the shared mask to each layer's keys. Idempotent; the
    same results as before for any cache whose layers agree (the mask then fits)."""
    impl = model.config._attn_implementation
    if impl.startswith(RAGGED):
        return
    if impl not in ("sdpa", "eager"):
        raise NotImplementedError(f"layers of different lengths need sdpa or eager attention, not {impl}")
    AttentionInterface.register(RAGGED + impl, _ragged_attention(impl))
    AttentionMaskInterface.register(RAGGED + impl, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    model.set_attn_implementation(RAGGED + impl)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of a Llama-like model (they own q_proj and a layer_idx)."""
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not mods:
        raise NotImplementedError(f"{type(model).__name__}: no Llama-like attention modules found")
    return mods


@contextmanager
def eviction_hooks(model: torch.nn.Module) -> Iterator[None]:
    """Scoring hooks on every attention module while the block runs (no-ops for other caches)."""
    handles = [m.register_forward_hook(_after_attention, with_kwargs=True) for m in attention_modules(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def reconstruct(model: torch.nn.Module, cache: EvictionCache, context_ids: torch.Tensor,
                prompt_ids: torch.Tensor | list[int], chunk: int = 2048, overlap: int = 8,
                block: int = 256) -> None:
    """KVzip's scoring pass: feed `prompt_ids` then `context_ids` (the tokens to repeat,
    usually those just prefilled) over `cache`, teacher-forced, `chunk` context tokens at
    a time (each later chunk preceded by the prompt and the previous chunk's last `overlap`
    tokens). Leaves each layer's `reconstruction` scores [H, stored] (max attention from any
    reconstruction row, softmax over everything the row sees) and the cache as it was."""
    ctx = torch.as_tensor(context_ids).reshape(-1).to(model.device)
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).to(model.device)
    layers = cache.layers
    stored, seen = [layer.stored for layer in layers], [layer.seen for layer in layers]
    for layer, s in zip(layers, stored):
        layer.reconstruction = torch.zeros(layer.positions.shape[0], s, dtype=torch.float32,
                                           device=layer.keys.device)
    cache.reconstruction_block = block
    try:
        with eviction_hooks(model):
            for start in range(0, ctx.shape[0], chunk):
                ids = torch.cat([prompt, ctx[max(0, start - overlap):start], ctx[start:start + chunk]])
                model(ids[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
                for layer, s, n in zip(layers, stored, seen):
                    layer.rollback(s, n)
    finally:
        cache.reconstruction_block = None
        for layer, s, n in zip(layers, stored, seen):
            if layer.stored != s:
                layer.rollback(s, n)


@torch.inference_mode()
def prefill_compressed(model: torch.nn.Module, input_ids: torch.Tensor, policy: Policy,
                       budget: Budget | int, prompt_ids: torch.Tensor | list[int] | None = None) -> EvictionCache:
    """Prefill `input_ids` ([T] or [1, T]) and compress its cache to `budget` with `policy`.

    Continue with `model.generate(torch.cat([input_ids, question]), past_key_values=cache)`:
    the cache reports T seen tokens, so only the question is computed, at positions T...
    When the policy left layers of different lengths, `ragged_layers(model)` is applied.
    A policy that `reconstructs` (KVzip) needs `prompt_ids`, its repeat prompt's ids
    (`policy.prompt_ids(tokenizer)`); the context repeated is `input_ids`.
    """
    ids = input_ids.reshape(1, -1).to(model.device)
    cache = EvictionCache(model.config, policy)
    with eviction_hooks(model):
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    if policy.reconstructs:
        if prompt_ids is None:
            raise ValueError(f"{policy.name} needs the repeat prompt's ids (prompt_ids=policy.prompt_ids(tokenizer))")
        reconstruct(model, cache, ids[0], prompt_ids, policy.chunk, policy.overlap, policy.block)
    return compress(model, cache, budget)


def compress(model: torch.nn.Module, cache: EvictionCache, budget: Budget | int,
             policy: Policy | None = None) -> EvictionCache:
    """`cache.compress(budget, policy)` for generation with `model`: when the policy left
    layers of different lengths, `ragged_layers(model)` too."""
    cache.compress(budget, policy)
    if len(set(cache.layer_lengths())) > 1:
        ragged_layers(model)
    return cache
