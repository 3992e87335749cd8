"""Codec interface, the registry of codecs by spec string, and chunk <-> blob.

A codec is a quantizer stage (KV tensor <-> payload bytes) optionally followed
by a lossless stage (bytes <-> bytes). Spec strings name both:
``"none"``, ``"none+zstd"``, ``"zstd"`` (= none+zstd), ``"int8+zstd:l3"``.
The blob header records each stage's name, version and parameters, so any
process can decode any blob without sharing configuration.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from kvmw.blob import BlobMeta, pack_blob, parse_blob
from kvmw.errors import ConfigError, CorruptBlobError, UnknownCodecError
from kvmw.layout import check_chunk

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CorruptBlobError(f"unsupported KV dtype {name!r}") from None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a CPU tensor (copies to host first if on a device)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_from_bytes(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Tensor over `buf` without a copy when writable; read-only buffers are copied."""
    expected = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    if buf.nbytes != expected:
        raise CorruptBlobError(f"payload has {buf.nbytes} bytes, shape {shape} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # non-writable buffer: we clone below
        t = torch.frombuffer(buf, dtype=dtype).view(shape)
    return t.clone() if buf.readonly else t


class Stage(ABC):
    """What both stages share: a registered name, a version, recorded params."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    #: spec options this stage accepts ("g" for "kivi4:g32", "shuffle" for "zstd:shuffle")
    options: ClassVar[frozenset[str]] = frozenset()

    def params(self) -> dict[str, Any]:
        """What the decoder needs to know, recorded in every blob header."""
        return {}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "Stage":
        return cls(**params)

    @classmethod
    def parse_spec(cls, opts: dict[str, str]) -> "Stage":
        unknown = set(opts) - cls.options
        if unknown:
            raise ConfigError(f"codec {cls.name!r} options are {sorted(cls.options) or 'none'}, "
                              f"got {sorted(unknown)}")
        try:
            return cls.from_spec(opts)
        except ValueError as e:
            raise ConfigError(f"codec {cls.name!r}: {e}") from e

    @classmethod
    def from_spec(cls, opts: dict[str, str]) -> "Stage":
        """Build from validated spec options (``"zstd:l3"`` gives {"l": "3"})."""
        return cls()


class Quantizer(Stage):
    """Stage 1: canonical KV [L, 2, T, H, D] <-> payload bytes."""

    @abstractmethod
    def encode(self, kv: torch.Tensor, positions: np.ndarray | None = None) -> list[Any]:
        """Payload as a list of bytes-like parts (concatenated into the blob once).
        `positions`: RoPE positions of the tokens, for codecs that treat some specially."""

    #: decode() can produce its output directly on a GPU (compact codes cross PCIe, not fp16)
    decodes_on_device: ClassVar[bool] = False

    @abstractmethod
    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | None = None) -> torch.Tensor:
        """Inverse of `encode`; raises `CorruptBlobError` on a payload it cannot read.
        `device` is only passed to quantizers with `decodes_on_device`."""


    def decode_into(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
                    out: torch.Tensor) -> None:
        """`decode` written into `out` (a CPU tensor of `shape`, possibly a strided view,
        any float dtype): a loader fills one reused buffer instead of a fresh tensor per
        chunk. Quantizers that dequantize straight into `out` override this."""
        out.copy_(self.decode(payload, shape, dtype))


class Lossless(Stage):
    """Stage 2: payload bytes <-> smaller bytes."""

    @abstractmethod
    def compress(self, parts: list[Any], element_size: int) -> bytes: ...

    @abstractmethod
    def decompress(self, data: memoryview) -> memoryview: ...


QUANTIZERS: dict[str, type[Quantizer]] = {}
LOSSLESS: dict[str, type[Lossless]] = {}


def register_quantizer(cls: type[Quantizer]) -> type[Quantizer]:
    QUANTIZERS[cls.name] = cls
    return cls


def register_lossless(cls: type[Lossless]) -> type[Lossless]:
    LOSSLESS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Codec:
    """A quantizer and an optional lossless stage; encodes chunks into blobs."""

    quantizer: Quantizer
    lossless: Lossless | None = None

    @property
    def is_lossless(self) -> bool:
        return self.quantizer.name == "none"

    @property
    def spec(self) -> str:
        return self.quantizer.name + (f"+{self.lossless.name}" if self.lossless else "")

    def encode(self, kv: torch.Tensor, fingerprint: str, positions: Any = None,
               extra: dict[str, Any] | None = None) -> bytearray:
        """Canonical chunk -> blob. `positions` defaults to 0..T-1 (RoPE positions)."""
        check_chunk(kv)
        if positions is None:
            positions = np.arange(kv.shape[2], dtype=np.int32)
        elif hasattr(positions, "detach"):
            positions = positions.detach().cpu().numpy()
        params = self.quantizer.params()
        parts = self.quantizer.encode(kv, np.asarray(positions))
        if self.lossless is not None:
            parts = [self.lossless.compress(parts, kv.element_size())]
            params = {**params, "lossless": {"name": self.lossless.name,
                                             "version": self.lossless.version,
                                             **self.lossless.params()}}
        meta = BlobMeta(
            codec=self.quantizer.name, codec_version=self.quantizer.version,
            shape=tuple(kv.shape), dtype=dtype_name(kv.dtype), fingerprint=fingerprint,
            positions=np.asarray(positions), codec_params=params, extra=extra or {},
        )
        return pack_blob(meta, parts)


def decode_blob(data: Any, expected_fingerprint: str | None = None,
                device: torch.device | str | None = None,
                out: torch.Tensor | None = None, verify: bool = True,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, BlobMeta]:
    """Blob -> (canonical KV on `device`, default CPU; meta). Every failure is a typed `BlobError`.
    With `out` (a CPU tensor, possibly a view of a larger buffer) the KV is decoded into
    it and `out` is returned; a blob of another shape or dtype is a `CorruptBlobError`.
    `dtype`: the KV dtype the caller's model makes (`out` implies its own): a blob of
    another is refused (one model's KV has one dtype; reinterpreting it would be wrong KV).
    `verify=False` skips the checksum: only for bytes a validating `TieredStore` just
    returned (it checked them; hashing every loaded byte twice costs a whole pass)."""
    blob = parse_blob(data, expected_fingerprint, verify=verify)
    meta = blob.meta
    params = dict(meta.codec_params)
    lossless_params = params.pop("lossless", None)
    quantizer = _build(QUANTIZERS, meta.codec, meta.codec_version, params)
    payload = blob.payload
    if lossless_params is not None:
        if not isinstance(lossless_params, dict):
            raise CorruptBlobError("lossless stage params are not a mapping")
        lp = dict(lossless_params)
        stage = _build(LOSSLESS, str(lp.pop("name", "")), lp.pop("version", None), lp)
        payload = stage.decompress(payload)
    shape = meta.shape
    if len(shape) != 5 or shape[1] != 2 or meta.positions.shape[0] != shape[2]:
        raise CorruptBlobError(f"blob shape {shape} / {meta.positions.shape[0]} positions")
    want = out.dtype if out is not None else dtype
    dtype = dtype_from_name(meta.dtype)
    if want is not None and dtype != want:
        raise CorruptBlobError(f"blob holds {meta.dtype} KV, the caller's is {want}")
    if out is not None:
        if tuple(out.shape) != tuple(shape):
            raise CorruptBlobError(f"blob holds KV of shape {tuple(shape)}, expected {tuple(out.shape)}")
        quantizer.decode_into(payload, shape, dtype, out)
        return out, meta
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cpu" and quantizer.decodes_on_device:
        return quantizer.decode(payload, shape, dtype, device), meta
    kv = quantizer.decode(payload, shape, dtype)
    return (kv if device is None else kv.to(device)), meta


def _build(registry: dict[str, type], name: str, version: Any, params: dict[str, Any]) -> Any:
    cls = registry.get(name)
    if cls is None:
        raise UnknownCodecError(f"unknown codec stage {name!r}; known: {sorted(registry)}")
    if version != cls.version:
        raise UnknownCodecError(f"codec {name!r} version {version}; this build reads {cls.version}")
    try:
        return cls.from_params(params)
    except (TypeError, ValueError) as e:
        raise CorruptBlobError(f"bad params for codec {name!r}: {params!r}") from e


def _parse_stage(text: str) -> tuple[str, dict[str, Any]]:
    """``"zstd:l3:shuffle"`` -> ("zstd", {"l": "3", "shuffle": ""}) (codec parses the values)."""
    name, *opts = text.split(":")
    return name, {o.rstrip("0123456789"): o[len(o.rstrip("0123456789")):] for o in opts}


def make_codec(spec: str | Codec) -> Codec:
    """Build a codec from a spec string (``"none"``, ``"zstd"``, ``"none+zstd:l3"``)."""
    if isinstance(spec, Codec):
        return spec
    stages = spec.strip().split("+")
    if len(stages) > 2:
        raise ConfigError(f"codec spec {spec!r}: at most quantizer+lossless")
    first, opts = _parse_stage(stages[0])
    if len(stages) == 1 and first in LOSSLESS:
        stages, first, opts = ["none", stages[0]], "none", {}
    if first not in QUANTIZERS:
        raise ConfigError(f"codec spec {spec!r}: unknown quantizer {first!r}; known {sorted(QUANTIZERS)}")
    quantizer = QUANTIZERS[first].parse_spec(opts)
    lossless = None
    if len(stages) == 2:
        lname, lopts = _parse_stage(stages[1])
        if lname not in LOSSLESS:
            raise ConfigError(f"codec spec {spec!r}: unknown lossless stage {lname!r}")
        lossless = LOSSLESS[lname].parse_spec(lopts)
    return Codec(quantizer, lossless)
