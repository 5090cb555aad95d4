"""The error hierarchy of lora_core: one base class, each error names what is wrong.

Every error carries the file (``source``) and, where one applies, the tensor ``key`` so a
render-farm user can see which LoRA in which job is at fault without reading a traceback.
"""
from __future__ import annotations


class LoraError(Exception):
    """Base class of every error lora_core raises on bad input."""

    #: False for errors that a retry cannot fix (a bad file); True for transient I/O.
    transient: bool = False

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source = source
        self.key = key
        where = []
        if source:
            where.append(f"file {source!r}")
        if key:
            where.append(f"key {key!r}")
        full = f"{message} ({', '.join(where)})" if where else message
        super().__init__(full)


class CorruptFileError(LoraError):
    """The bytes are not a readable safetensors file (truncated, bad header, wrong format)."""


class UnsafeFormatError(LoraError):
    """A pickle-based file was offered without the caller opting in."""


class UnsupportedFormatError(LoraError):
    """A known but unsupported adapter type (LoKr, LoHa, IA3, ...)."""


class UnknownKeysError(LoraError):
    """Keys that map to no target: listed, never silently skipped."""

    def __init__(self, keys: list[str], *, source: str | None = None, reason: str = "match no known LoRA key scheme"):
        self.keys = sorted(keys)
        shown = ", ".join(self.keys[:20]) + (f", ... ({len(self.keys)} in all)" if len(self.keys) > 20 else "")
        super().__init__(f"{len(self.keys)} key(s) {reason}: {shown}", source=source)


class AmbiguousFormatError(LoraError):
    """Several key schemes claim the same file: we refuse to guess."""


class ShapeMismatchError(LoraError):
    """A LoRA's shapes do not fit the target module."""


class NonFiniteError(LoraError):
    """NaN or Inf in a LoRA tensor or in a merged result."""


class StaleBranchError(LoraError):
    """A prepared SVDQ branch offered to a module whose base changed since it was packed."""


class TargetNotFoundError(LoraError):
    """A LoRA names a module the model does not have."""


class FetchError(LoraError):
    """Fetching a LoRA file from storage failed."""

    transient = True


class PermanentFetchError(FetchError):
    """404, access denied, a bad URL: retrying cannot help."""

    transient = False


class ChecksumMismatch(FetchError):
    """The bytes fetched do not match the sha256 the manifest gave."""

    transient = False


class TruncatedTransferError(FetchError):
    """Fewer bytes arrived than the server announced."""
