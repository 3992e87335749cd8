"""HuggingFace transformers integration: model install, KV capture (generate hook and Cache come later)."""
