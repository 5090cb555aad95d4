"""One transfer from storage and its faults: classification, retries, identity, progress.

Kept apart from the cache logic (``store.py``, ``node_cache.py``) so each half can be read
and tested on its own: nothing here touches the node-local cache, and nothing in the
cache knows about HTTP statuses or botocore.

The one subtle part is classification. fsspec does not give uniform errors: its HTTP
filesystem raises ``FileNotFoundError`` for a 404, but *also* when ``info`` fails for any
other reason (a 500, a refused connection), with the real error only in ``__cause__``;
other statuses surface as ``aiohttp.ClientResponseError``; a body cut short as
``aiohttp.ClientPayloadError``; s3fs translates botocore errors into ``OSError``
subclasses. ``classify_fetch_error`` walks the cause chain so a flaky server is retried
and a missing file fails fast.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import random
import time
from typing import Any, Callable, TypeVar

from fsspec.callbacks import Callback

from .errors import FetchError, PermanentFetchError, TruncatedTransferError

__all__ = ["classify_fetch_error", "with_retries", "hash_file", "identity", "ProgressLog"]

log = logging.getLogger("storage")

T = TypeVar("T")
MiB = 2**20
#: ``fs.info`` fields that change when a remote object changes (S3, GCS, HTTP, memory, local).
IDENTITY_FIELDS = (
    "ETag", "etag", "VersionId", "generation", "md5Hash", "Content-MD5",
    "LastModified", "Last-Modified", "last_modified", "updated", "mtime", "created",
)

#: HTTP statuses a retry can fix: timeouts, throttling and server-side faults.
RETRY_STATUSES = frozenset({408, 425, 429})
#: Local-disk conditions a retry cannot fix, even though they are plain ``OSError``s.
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG})
#: Class-name fragments of botocore / urllib3 / requests errors that mean "the wire failed".
_TRANSIENT_NAMES = ("Connect", "Timeout", "IncompleteRead", "ResponseParser", "Throttl", "SlowDown")


def hash_file(path: str, chunk: int = 8 * MiB) -> tuple[str, int]:
    """sha256 hex digest and byte count of a local file, read in fixed chunks."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    nbytes = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            nbytes += n
    return digest.hexdigest(), nbytes


def identity(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe subset of ``fs.info`` that identifies one version of a remote file."""
    ident: dict[str, Any] = {"size": info.get("size")}
    for field in IDENTITY_FIELDS:
        value = info.get(field)
        if value not in (None, ""):
            ident[field] = value if isinstance(value, (int, float)) else str(value)
    return ident


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (cycles cut)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not s for s in seen) and len(seen) < 16:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status carried by an aiohttp or botocore error, if any."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def _is_wire_error(exc: BaseException) -> bool:
    """A connection, timeout or protocol-level failure: the bytes did not make it."""
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError) and not isinstance(exc, aiohttp.ClientResponseError):
            return True
    except ImportError:  # pragma: no cover - aiohttp is a dependency
        pass
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return any(part in type(exc).__name__ for part in _TRANSIENT_NAMES)


def _from_status(status: int) -> tuple[type[FetchError], str]:
    if status in (404, 410):
        return PermanentFetchError, f"not found (HTTP {status})"
    if status in (401, 403):
        return PermanentFetchError, f"access denied (HTTP {status})"
    if status >= 500 or status in RETRY_STATUSES:
        return FetchError, f"server error (HTTP {status})"
    return PermanentFetchError, f"request refused (HTTP {status})"


def classify_fetch_error(exc: BaseException) -> tuple[type[FetchError], str]:
    """Which ``FetchError`` class ``exc`` maps to, and a short reason for the message."""
    if isinstance(exc, FetchError):
        return type(exc), str(exc)
    chain = _chain(exc)
    for link in chain:
        status = _http_status(link)
        if status is not None and status >= 400:
            return _from_status(status)
        if type(link).__name__ == "ClientPayloadError":
            return TruncatedTransferError, f"transfer cut short ({link})"
    if any(_is_wire_error(link) for link in chain):
        return FetchError, f"connection failed ({type(exc).__name__}: {exc})"
    if isinstance(exc, FileNotFoundError):
        return PermanentFetchError, "not found"
    if isinstance(exc, PermissionError):
        return PermanentFetchError, f"access denied ({exc})"
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return PermanentFetchError, f"not a file ({exc})"
    if isinstance(exc, OSError) and exc.errno not in PERMANENT_ERRNOS:
        return FetchError, f"I/O error ({type(exc).__name__}: {exc})"
    return PermanentFetchError, f"{type(exc).__name__}: {exc}"


def with_retries(
    fn: Callable[[], T],
    *,
    url: str,
    retries: int,
    backoff_s: float,
    max_backoff_s: float = 10.0,
    on_retry: Callable[[FetchError], None] | None = None,
) -> T:
    """Run ``fn``; retry transient failures with jittered exponential backoff.

    Permanent failures raise at once. Every failure leaves as a ``FetchError`` subclass
    naming ``url`` and chained (``from``) to the original exception, so the cause is
    never lost. Jitter keeps a farm of workers from hammering a recovering server in sync.
    """
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - every error is classified, none swallowed
            cls, reason = classify_fetch_error(e)
            if not cls.transient or attempt == retries:
                if isinstance(e, FetchError):  # ours: already names the URL
                    raise
                if cls.transient and retries:
                    reason = f"{reason}; gave up after {attempt + 1} attempts"
                raise cls(reason, source=url) from e
            delay = min(backoff_s * 2**attempt, max_backoff_s) * (1 + 0.25 * random.random())
            log.warning("fetch %s failed (%s); retry %d/%d in %.2fs", url, reason, attempt + 1, retries, delay)
            if on_retry is not None:
                on_retry(cls(reason, source=url))
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class ProgressLog(Callback):
    """An fsspec callback that logs a large transfer's progress every ``every`` bytes."""

    def __init__(self, url: str, every: int) -> None:
        super().__init__()
        self.url = url
        self.every = max(1, int(every))
        self._next = self.every
        self._t0 = time.perf_counter()

    def call(self, *args: Any, **kwargs: Any) -> None:
        if self.value < self._next:
            return
        self._next = (self.value // self.every + 1) * self.every
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        total = f"/{self.size / 2**20:.0f}" if self.size else ""
        log.info(
            "fetching %s: %.0f%s MiB (%.0f MiB/s)", self.url, self.value / 2**20, total, self.value / 2**20 / elapsed
        )
