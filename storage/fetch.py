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

import asyncio
import errno
import logging
import os
import random
import time
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem, sync
from fsspec.callbacks import Callback

from .errors import FetchError, LoraTooLargeError, PermanentFetchError, SlowTransferError, TruncatedTransferError
from .localfs import hash_file  # re-exported: the store and its tests hash through this module

__all__ = [
    "classify_fetch_error", "with_retries", "hash_file", "identity", "ProgressLog", "TransferGuard", "guarded_get",
    "guarded_info", "MIN_RATE_BYTES_S", "RATE_WINDOW_S",
]

log = logging.getLogger("storage")

T = TypeVar("T")
KiB = 2**10
MiB = 2**20
#: The rate floor of a transfer, averaged over ``RATE_WINDOW_S``: below it the transfer is cut.
#: 16 KiB/s bounds a trickling server to about a window, yet a 4 GiB LoRA on an honest link of
#: 1 MiB/s (an hour's transfer) still arrives. Per store: ``LoraStore(min_rate_bytes_s=,
#: rate_window_s=)``; per node: ``$LORA_FARM_MIN_RATE_BYTES_S`` (0 turns the floor off) and
#: ``$LORA_FARM_RATE_WINDOW_S``, read when this module is imported.
MIN_RATE_BYTES_S = float(os.environ.get("LORA_FARM_MIN_RATE_BYTES_S", 16 * KiB))
RATE_WINDOW_S = float(os.environ.get("LORA_FARM_RATE_WINDOW_S", 30.0))
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
    own = next((link for link in chain if isinstance(link, FetchError)), None)
    if own is not None:  # ours, raised inside a library and wrapped (a redirect the URI policy refused)
        return type(own), str(own)
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
            if not cls.transient or not cls.retry_in_place or attempt == retries:
                if isinstance(e, FetchError):  # ours: already names the URL
                    raise
                if cls.transient and cls.retry_in_place and retries:
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


class TransferGuard(ProgressLog):
    """Progress log that cuts a transfer off: past ``max_bytes``, or below the rate floor.

    ``check`` runs on every chunk (fsspec calls back per chunk read) and, for async
    filesystems, from a watchdog (``guarded_get``) so a server that sends nothing at all is
    cut too. The rate is judged per window: fewer than ``min_rate * window_s`` bytes since
    the last checkpoint, once a window has passed, is a ``SlowTransferError``. Bytes are
    counted after decompression (aiohttp inflates ``Content-Encoding`` before we see it), so
    a compressed response that inflates past ``max_bytes`` is cut as soon as it does.
    """

    def __init__(
        self, url: str, *, every: int, max_bytes: int | None, announced: int | None,
        min_rate: float, window_s: float,
    ) -> None:
        super().__init__(url, every)
        self.max_bytes = max_bytes
        self.announced = announced
        self.min_rate = float(min_rate)
        self.window_s = float(window_s)
        self._mark = (time.monotonic(), 0)

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.check()
        super().call(*args, **kwargs)

    def check(self) -> None:
        got = int(self.value)
        if self.max_bytes is not None and got > self.max_bytes:
            raise LoraTooLargeError(
                f"larger than the limit of {self.max_bytes} bytes (max_lora_mb): cut off after {got} bytes",
                source=self.url,
            )
        if self.announced is not None and got > self.announced:  # changed mid-way, or lying: try again
            raise FetchError(f"server sent more than the {self.announced} bytes it announced", source=self.url)
        if self.min_rate <= 0:
            return
        now = time.monotonic()
        t_mark, v_mark = self._mark
        if now - t_mark < self.window_s:
            return
        if got - v_mark < self.min_rate * (now - t_mark):
            raise SlowTransferError(
                f"transfer too slow: {got - v_mark} bytes in {now - t_mark:.1f}s, below the floor of "
                f"{self.min_rate:.0f} bytes/s ({got} bytes in all)",
                source=self.url,
            )
        self._mark = (now, got)


def _on_loop(fs: fsspec.AbstractFileSystem) -> bool:
    """True for an async filesystem driven from sync code through fsspec's loop (http, s3, gcs)."""
    return isinstance(fs, AsyncFileSystem) and not fs.asynchronous and fs.loop is not None


def guarded_info(fs: fsspec.AbstractFileSystem, path: str, url: str, *, min_rate: float, window_s: float) -> dict:
    """``fs.info(path)``, cut off (``SlowTransferError``) when it has not answered within one
    rate window: the metadata request (an HTTP HEAD, an S3 HeadObject) is bounded like the
    body (``TransferGuard``), so a server that trickles its headers a byte at a time (each
    read well inside the per-read timeout) holds a try for about a window, not forever.
    A window is far more than any honest answer of a few hundred bytes needs. Sync
    filesystems (memory, local) answer without a network, unguarded; ``min_rate <= 0`` (the
    floor turned off) leaves the per-read timeout alone to bound it, as for the body."""
    if min_rate <= 0 or not _on_loop(fs):
        return fs.info(path)

    async def bounded() -> dict:
        task = asyncio.ensure_future(fs._info(path))
        done, _ = await asyncio.wait({task}, timeout=window_s)
        if done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise SlowTransferError(f"no answer to the metadata request (info/HEAD) within {window_s:.1f}s, the rate "
                                "window: a stalled or trickling server", source=url)

    return sync(fs.loop, bounded)


def guarded_get(fs: fsspec.AbstractFileSystem, path: str, local: str, guard: TransferGuard) -> None:
    """``fs.get_file(path, local)`` that ``guard`` can cut off even while no byte arrives.

    For async filesystems (http, s3, gcs) the transfer runs as a task on fsspec's loop next
    to a watchdog that checks the guard a few times per window and cancels the task on a
    breach; a per-read timeout alone would let a server that sends a byte now and then
    hold the job forever. Sync filesystems (memory, local) only get the per-chunk check.
    """
    if not _on_loop(fs):
        fs.get_file(path, local, callback=guard)
        return
    tick = max(0.05, min(1.0, guard.window_s / 4))

    async def watched() -> None:
        task = asyncio.ensure_future(fs._get_file(path, local, callback=guard))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=tick)
                if done:
                    return task.result()
                guard.check()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)  # its file is closed before we unlink it

    sync(fs.loop, watched)
