"""Cache keys: prefix chains (exact prefix reuse) and chunk keys (position-independent).

Keys are 32-hex-char xxh3-128 digests of explicit little-endian bytes, so they are
identical across processes, machines and ``PYTHONHASHSEED`` values (Python's
``hash()`` is salted per process and would lose every cross-process hit).

Every key is namespaced by the model fingerprint, the chunk size and the tenant
``cache_salt``: two tenants with different salts can neither hit nor time each
other's entries, and a key from one model can never address another model's KV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import numpy as np
import xxhash

from kvmw.fingerprint import ModelFingerprint

Tokens = Union[Sequence[int], np.ndarray, "torch.Tensor"]  # noqa: F821

_DOMAIN_PREFIX = b"kvmw/prefix/v1"
_DOMAIN_CHUNK = b"kvmw/chunk/v1"


def token_bytes(tokens: Tokens) -> bytes:
    """Canonical bytes of a token sequence: int64 little-endian."""
    if hasattr(tokens, "detach"):  # torch tensor, without importing torch here
        tokens = tokens.detach().cpu().numpy()
    return np.ascontiguousarray(tokens, dtype="<i8").reshape(-1).tobytes()


@dataclass(frozen=True)
class KeySpace:
    """The namespace all keys of one (model, chunk size, tenant) live in."""

    fingerprint: ModelFingerprint
    chunk_size: int
    cache_salt: str = ""

    @cached_property
    def namespace(self) -> bytes:
        h = xxhash.xxh3_128()
        h.update(self.fingerprint.digest.encode())
        h.update(self.chunk_size.to_bytes(8, "little"))
        h.update(self.cache_salt.encode())
        return h.digest()

    def prefix_keys(self, tokens: Tokens) -> list[str]:
        """One key per *full* chunk: ``h_i = H(h_{i-1}, tokens of chunk i)``.

        A hit on key i implies chunks 0..i were identical, so the longest run of
        leading hits is the reusable prefix. A trailing partial chunk has no key.
        """
        data = token_bytes(tokens)
        step = self.chunk_size * 8
        full = len(data) // step
        keys: list[str] = []
        prev = xxhash.xxh3_128_digest(_DOMAIN_PREFIX + self.namespace)
        for i in range(full):
            h = xxhash.xxh3_128()
            h.update(prev)
            h.update(data[i * step:(i + 1) * step])
            prev = h.digest()
            keys.append(prev.hex())
        return keys

    def chunk_key(self, tokens: Tokens, context: Tokens | None = None) -> str:
        """Position-independent key of a token span (a RAG document or chunk of one).
        `context`: the tokens the span's KV was computed after (none: alone)."""
        h = xxhash.xxh3_128()
        h.update(_DOMAIN_CHUNK)
        h.update(self.namespace)
        if context is not None and len(context):
            ctx = token_bytes(context)
            h.update(b"context:%d:" % len(ctx))
            h.update(ctx)
        h.update(token_bytes(tokens))
        return h.hexdigest()
