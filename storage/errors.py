"""The root of the farm's error hierarchy, and the errors of fetching a file from storage.

``LoraError`` is defined here, in the lowest package, rather than in ``lora_core``: a LoRA
that cannot be fetched and a LoRA that cannot be read are the same kind of failure to a
render farm (that LoRA's jobs fail, the worker carries on), so both packages raise
subclasses of one base and ``except LoraError`` catches either. ``lora_core.errors``
re-exports every name below and adds the errors of reading and applying a file.

Every error carries the file (``source``) and, where one applies, the tensor ``key``, so a
user can see which LoRA in which job is at fault without reading a traceback.
"""
from __future__ import annotations

__all__ = ["LoraError", "FetchError", "PermanentFetchError", "ChecksumMismatch", "TruncatedTransferError"]


class LoraError(Exception):
    """Base class of every error raised on a bad LoRA input, fetched or read."""

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


class FetchError(LoraError):
    """Fetching a file from storage failed."""

    transient = True


class PermanentFetchError(FetchError):
    """404, access denied, a bad URL: retrying cannot help."""

    transient = False


class ChecksumMismatch(FetchError):
    """The bytes fetched do not match the sha256 the manifest gave."""

    transient = False


class TruncatedTransferError(FetchError):
    """Fewer bytes arrived than the server announced."""
