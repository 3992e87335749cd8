"""Token eviction: which tokens of a sequence's KV to keep within a budget.

Policies (one per module, pure torch): `StreamingLLM`, `H2O`, `SnapKV`, `TOVA`,
`KNorm`, `KVzip` (scores from a second, context-reconstruction pass). The
transformers side (a budgeted, position-aware `EvictionCache`, the scoring
hooks, the reconstruction pass, compress-after-prefill) is `kvmw.eviction.hf`,
imported on demand; chunk pruning before store is `kvmw.eviction.store`.
"""

from kvmw.eviction.base import Budget, Policy, ScoreInputs, select
from kvmw.eviction.h2o import H2O
from kvmw.eviction.knorm import KNorm
from kvmw.eviction.kvzip import KVzip
from kvmw.eviction.snapkv import SnapKV
from kvmw.eviction.streaming_llm import StreamingLLM
from kvmw.eviction.tova import TOVA

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (StreamingLLM, H2O, SnapKV, TOVA, KNorm, KVzip)}


def make_policy(name: str, **kwargs) -> Policy:
    """A policy by its name (``"snapkv"``, ``"h2o"``, ...), with dataclass overrides."""
    try:
        return POLICIES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {sorted(POLICIES)}") from None


__all__ = [
    "H2O",
    "POLICIES",
    "TOVA",
    "Budget",
    "KNorm",
    "KVzip",
    "Policy",
    "ScoreInputs",
    "SnapKV",
    "StreamingLLM",
    "make_policy",
    "select",
]
