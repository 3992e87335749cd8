"""Position-independent reuse of RAG documents: re-positioning and selective recomputation."""

from kvmw.blending.adapter import LlamaLikeAdapter, UnsupportedModelError
from kvmw.blending.cacheblend import CacheBlend
from kvmw.blending.epic import EPIC
from kvmw.blending.query_aware import QueryAware
from kvmw.blending.rag import RAGResult, generate_rag
from kvmw.blending.rope import Repositioner, UnsupportedRotaryError
from kvmw.blending.strategy import STRATEGIES, BlendStrategy, FullReuse, make_strategy

__all__ = ["BlendStrategy", "CacheBlend", "EPIC", "FullReuse", "LlamaLikeAdapter", "QueryAware", "RAGResult",
           "Repositioner", "STRATEGIES", "UnsupportedModelError", "UnsupportedRotaryError", "generate_rag", "make_strategy"]
