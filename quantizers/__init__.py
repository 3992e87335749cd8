"""Codecs: KV tensor <-> bytes. ``make_codec("kivi4:g64+zstd")``, ``decode_blob(blob)``."""

from kvmw.quantizers.base import (
    LOSSLESS,
    QUANTIZERS,
    Codec,
    Lossless,
    Quantizer,
    decode_blob,
    make_codec,
)
from kvmw.quantizers import cachegen as _cachegen  # noqa: F401,E402
from kvmw.quantizers import fp8 as _fp8  # noqa: F401,E402  (each import registers its codec)
from kvmw.quantizers import int4 as _int4  # noqa: F401,E402
from kvmw.quantizers import int8 as _int8  # noqa: F401,E402
from kvmw.quantizers import kivi as _kivi  # noqa: F401,E402
from kvmw.quantizers import none as _none  # noqa: F401,E402
from kvmw.quantizers import zstd as _zstd  # noqa: F401,E402

__all__ = ["Codec", "Quantizer", "Lossless", "QUANTIZERS", "LOSSLESS", "decode_blob", "make_codec"]
