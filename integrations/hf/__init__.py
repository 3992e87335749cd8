"""HuggingFace transformers integration: `KVMW` generate hook, model install, KV capture."""

from kvmw.integrations.hf.hook import KVMW, HookStats, UnsupportedInputError

__all__ = ["KVMW", "HookStats", "UnsupportedInputError"]
