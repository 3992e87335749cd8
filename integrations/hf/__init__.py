"""HuggingFace transformers integration: the `KVMW` generate hook, the KIVI generation
cache, model install and KV capture."""

from kvmw.integrations.hf.hook import KVMW, HookStats, UnsupportedInputError
from kvmw.integrations.hf.kivi_cache import KIVICache, KIVILayer

__all__ = ["KVMW", "HookStats", "UnsupportedInputError", "KIVICache", "KIVILayer"]
