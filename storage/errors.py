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

__all__ = [
    "LoraError", "FetchError", "PermanentFetchError", "ChecksumMismatch", "TruncatedTransferError",
    "LoraTooLargeError", "SlowTransferError", "UnsafeCacheDirError", "ForbiddenUriError",
]


class LoraError(Exception):
    """Base class of every error raised on a bad LoRA input, fetched or read."""

    #: False for errors that a retry cannot fix (a bad file); True for transient I/O.
    transient: bool = False
    #: Whether the store's own retry loop may try again at once (see ``SlowTransferError``).
    retry_in_place: bool = True

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source = source
        self.key = key
        where = []
        if source:
            where.append(f"file {shorten(source, 300)!r}")
        if key:  # a key name may be megabytes long: echoed cut, like the whole message
            where.append(f"key {shorten(key, 200)!r}")
        full = f"{message} ({', '.join(where)})" if where else message
        super().__init__(shorten(full, MAX_MESSAGE_CHARS))


#: Characters of one error message: a LoRA's key names, echoed in it, may be megabytes long.
MAX_MESSAGE_CHARS = 4000


def shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, keeping both ends (a path, a reason)."""
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[len(text) - (limit - 5 - keep):]}"


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


class LoraTooLargeError(PermanentFetchError):
    """The file is larger than the farm's ``max_lora_mb``: announced so, or found so while streaming."""


class SlowTransferError(FetchError):
    """The transfer stayed below the rate floor for a whole window (a trickling or stalled server).

    Transient, because the link or the server may recover and the farm may re-send the job
    (later, or to another node); but never retried in place by the store: the same server
    would most likely trickle again, and every retry would hold the job another window.
    """

    retry_in_place = False


class UnsafeCacheDirError(PermanentFetchError):
    """The node cache dir is a symlink, not ours, or writable by others: refused, never used."""


class ForbiddenUriError(PermanentFetchError):
    """The operator's URI policy (``storage.policy``) does not let a LoRA reach this URI."""
