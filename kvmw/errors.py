"""Typed errors. Every blob problem is a `BlobError`, which stores turn into a miss."""


class KVMWError(Exception):
    """Base of every error kvmw raises on purpose."""


class ConfigError(KVMWError, ValueError):
    """A setting has a bad value or name."""


class BlobError(KVMWError):
    """A blob cannot be trusted: the store drops it and reports a miss."""


class TruncatedBlobError(BlobError):
    """Shorter than its header says (a torn write or a cut transfer)."""


class CorruptBlobError(BlobError):
    """Checksum mismatch, bad lengths or unparsable header."""


class ForeignBlobError(CorruptBlobError):
    """Not a kvmw blob at all (wrong magic)."""


class UnknownVersionError(BlobError):
    """A blob format version this build does not read."""


class UnknownCodecError(BlobError):
    """A codec id or codec version this build does not know."""


class ForeignModelError(BlobError):
    """Made by another model (fingerprint mismatch): never return its KV."""


class LayoutError(KVMWError, ValueError):
    """A tensor is not in the canonical chunk layout."""


class TierError(KVMWError):
    """A storage tier failed (down, full, refused); the store skips it."""


class KeyRejectedError(TierError):
    """This tier cannot hold or read this one key (a name too long for the file system,
    a value over a limit, a server refusing one command): the tier itself answered and
    stays in use. The store counts it as a per-key error, never as the tier being down."""
