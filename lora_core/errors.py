"""The errors of reading and applying a LoRA; each names what is wrong.

They share one base, ``LoraError``, with the errors of fetching a file: both live in
``storage.errors`` (the lowest package) and are re-exported here, so ``lora_core.errors``
names the whole hierarchy. Every error carries the file (``source``) and, where one
applies, the tensor ``key``.
"""
from __future__ import annotations

from storage.errors import (  # re-exported: one hierarchy, rooted below lora_core
    ChecksumMismatch, FetchError, ForbiddenUriError, LoraError, LoraTooLargeError, PermanentFetchError,
    SlowTransferError, TruncatedTransferError, UnsafeCacheDirError, shorten,
)

__all__ = [
    "LoraError", "FetchError", "PermanentFetchError", "ChecksumMismatch", "TruncatedTransferError",
    "LoraTooLargeError", "SlowTransferError", "UnsafeCacheDirError", "ForbiddenUriError",
    "CorruptFileError", "UnsafeFormatError", "UnsupportedFormatError", "UnknownKeysError", "AmbiguousFormatError",
    "ShapeMismatchError", "NonFiniteError", "StaleBranchError", "TargetNotFoundError",
]


#: Items (keys, targets) an error lists, and the characters of each: a file's key names may be
#: megabytes long, and the message lands in a results cell and a report page.
MAX_LISTED, MAX_ITEM_CHARS = 20, 200


def shown_list(items: list[str]) -> str:
    """The first ``MAX_LISTED`` items, each cut to ``MAX_ITEM_CHARS``, and how many there are in all."""
    shown = ", ".join(shorten(item, MAX_ITEM_CHARS) for item in items[:MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > MAX_LISTED else "")


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
        shown = shown_list(self.keys)
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
