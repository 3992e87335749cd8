"""HuggingFace transformers integration: the `KVMW` generate hook, the KIVI generation
cache, model install, KV capture and RAG blending on the model (`KVMW.generate_rag`)."""

from kvmw.integrations.hf.adapter import UnsupportedModelError
from kvmw.integrations.hf.hook import KVMW, HookStats, UnsupportedInputError
from kvmw.integrations.hf.kivi_cache import KIVICache, KIVILayer

__all__ = ["KVMW", "HookStats", "UnsupportedInputError", "UnsupportedModelError", "KIVICache", "KIVILayer"]
