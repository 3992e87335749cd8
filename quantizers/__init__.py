"""Codecs: KV tensor <-> bytes. ``make_codec("none+zstd")``, ``decode_blob(blob)``."""

from kvmw.quantizers.base import (
    LOSSLESS,
    QUANTIZERS,
    Codec,
    Lossless,
    Quantizer,
    decode_blob,
    make_codec,
)
from kvmw.quantizers import none as _none  # noqa: F401  (registers)
from kvmw.quantizers import zstd as _zstd  # noqa: F401  (registers)

__all__ = ["Codec", "Quantizer", "Lossless", "QUANTIZERS", "LOSSLESS", "decode_blob", "make_codec"]
