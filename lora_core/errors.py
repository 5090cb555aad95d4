"""The errors of reading and applying a LoRA; each names what is wrong.

They share one base, ``LoraError``, with the errors of fetching a file: both live in
``storage.errors`` (the lowest package) and are re-exported here, so ``lora_core.errors``
names the whole hierarchy. Every error carries the file (``source``) and, where one
applies, the tensor ``key``.
"""
from __future__ import annotations

from storage.errors import (  # re-exported: one hierarchy, rooted below lora_core
    ChecksumMismatch, FetchError, LoraError, PermanentFetchError, TruncatedTransferError,
)

__all__ = [
    "LoraError", "FetchError", "PermanentFetchError", "ChecksumMismatch", "TruncatedTransferError",
    "CorruptFileError", "UnsafeFormatError", "UnsupportedFormatError", "UnknownKeysError", "AmbiguousFormatError",
    "ShapeMismatchError", "NonFiniteError", "StaleBranchError", "TargetNotFoundError",
]


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
