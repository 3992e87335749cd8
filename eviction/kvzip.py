"""KVzip: query-agnostic scores from a pass that makes the model repeat its context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmw.eviction.attention import window_attention
from kvmw.eviction.base import Budget, Policy, ScoreInputs, layer_counts, select

REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n"


@dataclass
class KVzip(Policy):
    """Score each context token by how much the model needs it to reconstruct the
    context: after the prefill, a second pass feeds a repeat prompt followed by the
    context itself (teacher-forced) over the cache; a token's score is the largest
    softmax attention probability any of those reconstruction queries, over the
    query heads of its KV group, pays it (causal: a query's softmax runs over the
    context and the repeat tokens before it). (Kim et al. 2025, "KVzip: Query-Agnostic
    KV Cache Compression with Context Reconstruction", arXiv:2505.23416.)

    Budget. The scores are probabilities on one scale in every layer, so, as in the
    paper and kvpress, one threshold is taken over all layers (`budget_scope="global"`,
    the default): a layer whose tokens the reconstruction needs keeps more of them, one
    that attends to few tokens keeps fewer, and the cache as a whole keeps exactly the
    budget (`layer_counts`; both KV heads of a layer keep the same count, so a layer
    stays one dense tensor and layers differ in length: see `kvmw.eviction.hf`).
    `budget_scope="layer"`: every layer and KV head keeps the budget (top-k per head).

    The question is not needed: a token the model cannot repeat the context
    without is kept, whatever is asked later. Cost: the reconstruction pass is a
    second prefill of about the context's length over a cache twice as long (its
    tokens are dropped again afterwards), plus an eager recomputation of its
    attention rows in blocks of `block` queries (~2 * q_heads * R * (T + R) * D
    flops per layer for R reconstruction and T context tokens): the prefill takes
    3-4x as long on Qwen-0.5B on CPU (`kvmw bench eviction` measures it). Contexts longer than
    `chunk` tokens are reconstructed chunk by chunk (each chunk after the first
    starts with the last `overlap` tokens of the previous one), which bounds the
    extra cache at `chunk` + prompt tokens. Run `kvmw.eviction.hf.reconstruct`
    (or `prefill_compressed` with the repeat prompt's ids) before compressing.
    """

    sinks: int = 4
    prompt: str = REPEAT_PROMPT
    chunk: int = 2048
    overlap: int = 8
    block: int = 256
    budget_scope: str = "global"
    name: ClassVar[str] = "kvzip"
    #: the scores come from the context-reconstruction pass (`kvmw.eviction.hf.reconstruct`)
    reconstructs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.budget_scope not in ("global", "layer"):
            raise ValueError(f"budget_scope must be 'global' or 'layer', got {self.budget_scope!r}")

    def prompt_ids(self, tokenizer) -> list[int]:
        """The repeat prompt's token ids (no special tokens added)."""
        return tokenizer(self.prompt, add_special_tokens=False).input_ids

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        if inputs.reconstruction is None:
            raise ValueError("KVzip needs the reconstruction scores (run kvmw.eviction.hf.reconstruct first)")
        if inputs.reconstruction.shape[1] != inputs.num_tokens:
            raise ValueError(f"KVzip scores cover {inputs.reconstruction.shape[1]} tokens, the layer holds "
                             f"{inputs.num_tokens}: it compresses a prefilled context once, it does not "
                             "bound generation")
        return inputs.reconstruction.float()

    def keep_layers(self, layers: list[ScoreInputs], budget: Budget | int) -> list[torch.Tensor]:
        """Per layer the sorted indices [kv_heads, k_l] to keep; with the global scope
        the k_l differ and sum to the budget of every layer together."""
        if self.budget_scope == "layer":
            return super().keep_layers(layers, budget)
        scores = [self.score(inputs) for inputs in layers]
        shares = [min(budget, s.shape[-1]) if isinstance(budget, int) else budget.count(s.shape[-1]) for s in scores]
        counts = layer_counts(scores, shares, self.sinks, self.window)
        return [select(s, int(k), self.sinks, self.window) for s, k in zip(scores, counts)]


def reconstruction_scores(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                          key_positions: torch.Tensor, n_context: int, scaling: float | None = None,
                          block: int = 256) -> torch.Tensor:
    """KVzip's score of the first `n_context` keys: the max over the query rows and over
    each KV head's query group of softmax(q K^T * scaling), the softmax taken over all
    keys a row sees (causal by position): [kv_heads, n_context] fp32.

    queries [q_heads, R, D], keys [kv_heads, T, D] post-RoPE; rows in blocks of `block`
    (memory q_heads x block x T floats)."""
    hk = keys.shape[0]
    out = torch.zeros(hk, n_context, dtype=torch.float32, device=keys.device)
    for start in range(0, queries.shape[1], block):
        rows = window_attention(queries[:, start:start + block], keys,
                                query_positions[start:start + block], key_positions, scaling)
        best = rows[..., :n_context].amax(1)  # [q_heads, n_context]
        out = torch.maximum(out, best.reshape(hk, -1, n_context).amax(1))
    return out
