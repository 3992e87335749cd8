"""Position-independent reuse of RAG documents: what decides and positions, engine-free.

Strategies (`QueryAware`, `CacheBlend`, `EPIC`, `FullReuse`: which tokens to recompute),
their plans, RoPE re-positioning (`Repositioner`) and the blend loop itself (`blend`:
probe, select, recompute over a dense KV, through an engine's `LayerRunner`) are
tensor code that imports no engine: `kvmw.integrations.hf` (``KVMW.generate_rag``)
runs them on a transformers model, `kvmw.integrations.vllm` on vLLM's own model.
"""

from kvmw.blending.blend import BlendWork, LayerRunner, ScatterKV, blend
from kvmw.blending.cacheblend import CacheBlend
from kvmw.blending.epic import EPIC
from kvmw.blending.query_aware import QueryAware
from kvmw.blending.rope import Repositioner, UnsupportedRotaryError
from kvmw.blending.strategy import STRATEGIES, BlendStrategy, Deviation, FullReuse, make_strategy

__all__ = ["BlendStrategy", "BlendWork", "LayerRunner", "ScatterKV", "blend",
           "CacheBlend", "Deviation", "EPIC", "FullReuse", "QueryAware", "Repositioner",
           "STRATEGIES", "UnsupportedRotaryError", "make_strategy"]
