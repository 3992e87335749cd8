"""kvmw: KV-cache compression and management middleware for LLM inference."""

from kvmw.config import KVMWConfig
from kvmw.errors import (
    BlobError,
    CorruptBlobError,
    ForeignBlobError,
    ForeignModelError,
    KVMWError,
    TruncatedBlobError,
    UnknownCodecError,
    UnknownVersionError,
)

__version__ = "0.1.0"

__all__ = [
    "KVMWConfig", "KVMWError", "BlobError", "CorruptBlobError", "ForeignBlobError",
    "ForeignModelError", "TruncatedBlobError", "UnknownCodecError", "UnknownVersionError",
    "__version__",
]
