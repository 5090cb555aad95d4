"""Fetch LoRA files from any fsspec URL into a node-local, content-addressed cache.

A render farm asks for the same few LoRA files over and over, from many processes on one
node at once, over links that fail now and then. ``LoraStore`` makes that cheap and safe:

* **Any fsspec URL** (s3://, gs://, http(s)://, memory://, file://, plain paths, chained
  URLs), with ``storage_options`` keyed by protocol: ``{"s3": {"endpoint_url": ...}}``.
* **Content-addressed cache**: blobs live at ``cache_dir/blobs/<sha256>``; an index maps a
  URL to (sha256, remote identity: ETag / size / mtime as ``fs.info`` reports them). A
  changed remote is fetched again; with a ``sha256`` given and its blob present, no
  network call is made at all. (An HTTP server that sends neither ETag nor Last-Modified
  leaves only the size to compare: give a sha256 for such sources.) Local files are
  served in place (no copy); their sha256 is memoized by (path, size, mtime_ns, inode).
* **One download per URL per node**: threads share an in-flight future; processes
  serialise on a ``filelock.FileLock`` per URL and the losers find the blob in the index.
* **Integrity**: downloads land in ``cache_dir/tmp`` and are ``os.replace``d into
  ``blobs/`` only once complete and verified (size against ``info``, sha256 against the
  caller's). A crash leaves only a temp file, never a blob that looks valid.
* **Faults**: transient errors (5xx, resets, timeouts, truncation) are retried with
  backoff; permanent ones (404, 403, bad protocol) raise ``PermanentFetchError`` at once.
* **Bounds**: a file over ``max_bytes`` is refused before its download when its size is
  announced, and cut off while streaming otherwise (``LoraTooLargeError``); a transfer below
  ``min_rate_bytes_s`` over ``rate_window_s`` is cut (``SlowTransferError``, not retried here), and
  so is a metadata request (``info``, an HTTP HEAD) not answered within ``rate_window_s``.
* **Budget**: blobs beyond ``budget_bytes`` are evicted least-recently-used first, except
  those in use. "In use" means leased: ``with store.lease(uri) as r:`` (or
  ``fetch(..., pin=True)`` then ``release(r.sha256)``). A plain ``fetch`` returns a path
  that stays valid until a later fetch pushes the cache over budget and it is the LRU
  blob; once a file is open, eviction cannot hurt the reader (POSIX unlink semantics).

``default_store(storage_options)`` is the process-wide instance for library entry points
(``lora_core.load_adapter(url)`` when no fetcher is passed); long-lived workers create
their own ``LoraStore``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import stat
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import fsspec

from .errors import ChecksumMismatch, FetchError, LoraTooLargeError, PermanentFetchError, TruncatedTransferError
from .fetch import (
    MIN_RATE_BYTES_S, RATE_WINDOW_S, TransferGuard, classify_fetch_error, guarded_get, guarded_info, hash_file,
    identity, with_retries,
)
from .localfs import unlink_if_exists
from .node_cache import DiskCache, default_cache_dir  # re-exported: where the farm's cache lives
from .urls import is_local, open_filesystem, options_for, protocol_of

__all__ = ["FetchResult", "LoraStore", "default_store", "default_cache_dir", "MAX_LORA_BYTES"]

log = logging.getLogger("storage")
T = TypeVar("T")
GiB = 2**30
MiB = 2**20
#: The default largest LoRA file a store downloads (the farm option ``max_lora_mb``).
MAX_LORA_BYTES = 4096 * MiB


@dataclass(frozen=True)
class FetchResult:
    """Where a fetched file lies on local disk, what it is, and what fetching it cost."""

    path: str        # a local file: a cache blob, or the source itself for local sources
    sha256: str
    nbytes: int
    seconds: float   # wall time of this fetch call
    cached: bool     # True when no bytes were transferred by this call


def _normalise_sha(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower().removeprefix("sha256:")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return value


class LoraStore:
    """Node-local cache of LoRA files fetched from any fsspec URL; see the module docstring.

    One instance per process is typical; any number of instances (threads or processes)
    may share ``cache_dir`` on one node. ``cache_dir`` must be on local disk.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        budget_bytes: int = 10 * GiB,
        storage_options: dict[str, dict[str, Any]] | None = None,
        retries: int = 4,
        backoff_s: float = 0.2,
        timeout_s: float | None = 60.0,
        progress_every_bytes: int = 256 * MiB,
        max_bytes: int | None = MAX_LORA_BYTES,
        min_rate_bytes_s: float = MIN_RATE_BYTES_S,
        rate_window_s: float = RATE_WINDOW_S,
    ) -> None:
        self.disk = DiskCache(os.fspath(cache_dir), budget_bytes)
        self.storage_options = copy.deepcopy(storage_options or {})
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.timeout_s = timeout_s
        self.progress_every_bytes = int(progress_every_bytes)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.min_rate_bytes_s = float(min_rate_bytes_s)
        self.rate_window_s = float(rate_window_s)
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str | None], Future[FetchResult]] = {}
        self._local_memo: dict[tuple[str, int, int, int], str] = {}
        self._stats = {"bytes_fetched": 0, "hits": 0, "misses": 0, "downloads": 0, "retries": 0, "errors": 0}
        self._fetch_s = 0.0

    def __repr__(self) -> str:
        return f"LoraStore({self.disk.root!r}, budget_bytes={self.disk.budget_bytes})"

    # ---- public API --------------------------------------------------------------------
    def fetch(self, uri: str, sha256: str | None = None, *, pin: bool = False) -> FetchResult:
        """Make ``uri`` available as a local file and return where, with its sha256.

        ``sha256`` (optional) is the content the caller expects: a mismatch raises
        ``ChecksumMismatch`` and caches nothing. ``pin=True`` leases the blob (pair it
        with ``release``); prefer ``lease``, which cannot forget to release.
        """
        uri = os.fspath(uri)
        expected = _normalise_sha(sha256)
        t0 = time.perf_counter()
        try:
            result = self._fetch(uri, expected, pin)
        except Exception:
            self._bump("errors")
            raise
        finally:
            elapsed = time.perf_counter() - t0
            with self._lock:
                self._fetch_s += elapsed
        self._bump("hits" if result.cached else "misses")
        return dataclasses.replace(result, seconds=elapsed)

    @contextmanager
    def lease(self, uri: str, sha256: str | None = None) -> Iterator[FetchResult]:
        """``fetch`` whose file cannot be evicted (by any process) until the block exits."""
        result = self.fetch(uri, sha256, pin=True)
        try:
            yield result
        finally:
            self.release(result.sha256)

    def release(self, sha256: str) -> None:
        """Give back one lease taken by ``fetch(..., pin=True)``; unknown shas are ignored."""
        self.disk.unpin(sha256)

    def trim(self) -> int:
        """Evict down to the budget now (eviction otherwise runs after each download)."""
        return self.disk.trim()

    def stats(self) -> dict[str, Any]:
        """Counters of this instance (hits, misses, downloads, bytes_fetched, fetch_s, ...)."""
        with self._lock:
            out: dict[str, Any] = dict(self._stats, fetch_s=self._fetch_s)
        out.update(
            evictions=self.disk.evictions,
            bytes_evicted=self.disk.bytes_evicted,
            cache_bytes=self.disk.usage(),
            budget_bytes=self.disk.budget_bytes,
            leased=len(self.disk.pinned()),
        )
        return out

    # ---- fetch paths -------------------------------------------------------------------
    def _fetch(self, uri: str, expected: str | None, pin: bool) -> FetchResult:
        if expected is not None:  # content-addressed: the bytes we want are already here
            size = self.disk.serve(expected, pin=pin)
            if size is not None:
                return FetchResult(self.disk.blob_path(expected), expected, size, 0.0, True)
        fs, path = open_filesystem(uri, self.storage_options, self.timeout_s)
        if is_local(fs):
            return self._fetch_local(uri, path, expected, pin)
        key = self._key(uri)
        for _ in range(3):
            result, led = self._single_flight(
                (key, expected), lambda: self._fetch_remote(uri, fs, path, key, expected, pin)
            )
            if led:
                return result
            size = self.disk.serve(result.sha256, nbytes=result.nbytes, pin=pin)
            if size is not None:  # a thread of ours just fetched it: reuse the blob
                return dataclasses.replace(result, cached=True)
        raise FetchError("blob evicted again and again right after download: cache budget too small", source=uri)

    def _single_flight(self, key: tuple[str, str | None], work: Callable[[], FetchResult]) -> tuple[FetchResult, bool]:
        """Run ``work`` once for concurrent callers with the same key; ``(result, led)``.

        Followers get the leader's result, or its exception, without touching storage:
        a 404 costs one request however many threads wanted the file.
        """
        with self._lock:
            future = self._inflight.get(key)
            led = future is None
            if future is None:
                future = self._inflight[key] = Future()
        if not led:
            return future.result(), False
        try:
            result = work()
            future.set_result(result)
            return result, True
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._inflight[key]

    def _fetch_remote(
        self, uri: str, fs: fsspec.AbstractFileSystem, path: str, key: str, expected: str | None, pin: bool
    ) -> FetchResult:
        """Index hit if the remote identity is unchanged; else download under the URL lock."""
        info = self._retry(uri, lambda: self._info(uri, fs, path))
        ident = identity(info)
        hit = self._index_hit(key, ident, expected, pin)
        if hit is not None:
            return hit
        with self.disk.url_lock(key):
            hit = self._index_hit(key, ident, expected, pin)  # another process may have won
            if hit is not None:
                return hit
            return self._download(uri, fs, path, key, info, expected, pin)

    def _info(self, uri: str, fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
        fs.invalidate_cache(path)  # s3fs/http keep listings per instance: we need the truth
        # bounded like the body: a HEAD whose headers trickle in is cut after a window
        info = guarded_info(fs, path, uri, min_rate=self.min_rate_bytes_s, window_s=self.rate_window_s)
        if info.get("type") == "directory":
            raise PermanentFetchError("is a directory, not a file", source=uri)
        return info

    def _index_hit(self, key: str, ident: dict[str, Any], expected: str | None, pin: bool) -> FetchResult | None:
        record = self.disk.read_index(key)
        if not record or record.get("identity") != ident:
            return None
        sha = record["sha256"]
        if expected is not None and sha != expected:
            return None  # download and verify: the error then names the hash really served
        size = self.disk.serve(sha, nbytes=record["nbytes"], pin=pin)
        if size is None:
            return None
        return FetchResult(self.disk.blob_path(sha), sha, size, 0.0, True)

    def _download(
        self,
        uri: str,
        fs: fsspec.AbstractFileSystem,
        path: str,
        key: str,
        info: dict[str, Any],
        expected: str | None,
        pin: bool,
    ) -> FetchResult:
        """Download with retries (re-reading ``info`` on each retry), commit, index."""
        pending = [info]

        def attempt() -> tuple[dict[str, Any], str, str, int]:
            current = pending.pop() if pending else self._info(uri, fs, path)
            self._check_size(uri, current.get("size"))
            return (current, *self._download_once(uri, fs, path, current, expected))

        t0 = time.perf_counter()
        current, tmp, sha, nbytes = self._retry(uri, attempt)
        blob = self.disk.commit(tmp, sha, pin=pin)
        self.disk.write_index(key, {"url": uri, "identity": identity(current), "sha256": sha, "nbytes": nbytes})
        seconds = time.perf_counter() - t0
        with self._lock:
            self._stats["downloads"] += 1
            self._stats["bytes_fetched"] += nbytes
        log.info("fetched %s: %d bytes in %.2fs (%.0f MiB/s)", uri, nbytes, seconds, nbytes / MiB / max(seconds, 1e-9))
        return FetchResult(blob, sha, nbytes, seconds, False)

    def _download_once(
        self, uri: str, fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any], expected: str | None
    ) -> tuple[str, str, int]:
        """One transfer into a temp file, verified; the temp file is gone on any failure."""
        tmp = self.disk.new_temp()
        announced = info.get("size")
        guard = TransferGuard(
            uri, every=self.progress_every_bytes, max_bytes=self.max_bytes, announced=announced,
            min_rate=self.min_rate_bytes_s, window_s=self.rate_window_s,
        )
        try:
            guarded_get(fs, path, tmp, guard)  # cut off past max_bytes / announced, or below the rate floor
            sha, nbytes = hash_file(tmp)
            if announced is not None and nbytes < announced:
                raise TruncatedTransferError(f"got {nbytes} of {announced} bytes", source=uri)
            if expected is not None and sha != expected:
                raise ChecksumMismatch(f"sha256 mismatch: expected {expected}, got {sha}", source=uri)
        except BaseException:
            unlink_if_exists(tmp)
            raise
        return tmp, sha, nbytes

    def _check_size(self, uri: str, announced: Any) -> None:
        """Refuse before downloading a file whose announced size is over the limit."""
        if self.max_bytes is not None and isinstance(announced, int) and announced > self.max_bytes:
            raise LoraTooLargeError(
                f"announced size {announced} bytes is over the limit of {self.max_bytes} bytes (max_lora_mb)", source=uri
            )

    def _fetch_local(self, uri: str, path: str, expected: str | None, pin: bool) -> FetchResult:
        """Serve a local file in place; its sha256 is memoized by (path, size, mtime, inode)."""
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise PermanentFetchError("not a regular file", source=uri)
            sha, cached = self._local_sha(path, st)
        except OSError as e:
            cls, reason = classify_fetch_error(e)
            raise cls(reason, source=uri) from e
        if expected is not None and sha != expected:
            raise ChecksumMismatch(f"sha256 mismatch: expected {expected}, got {sha}", source=uri)
        if pin:  # symmetric with release(): leases count the same for every source
            self.disk.pin(sha)
        return FetchResult(path, sha, st.st_size, 0.0, cached)

    def _local_sha(self, path: str, st: os.stat_result) -> tuple[str, bool]:
        memo_key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            sha = self._local_memo.get(memo_key)
        if sha is not None:
            return sha, True
        key = self._key("file://" + path)
        ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        record = self.disk.read_index(key)
        cached = bool(record and record.get("identity") == ident)
        if record and cached:
            sha = record["sha256"]
        else:
            sha, _ = hash_file(path)
            after = os.stat(path)
            if (after.st_size, after.st_mtime_ns, after.st_ino) != memo_key[1:]:
                return sha, False  # changed while we read it: do not memoize a guess
            self.disk.write_index(key, {"url": path, "identity": ident, "sha256": sha, "nbytes": st.st_size})
        with self._lock:
            self._local_memo[memo_key] = sha
        return sha, cached

    # ---- helpers -----------------------------------------------------------------------
    def _key(self, uri: str) -> str:
        """Index key of a URL: the same object behind another endpoint is another key."""
        opts = options_for(protocol_of(uri), self.storage_options)
        blob = json.dumps([uri, opts], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:40]

    def _retry(self, uri: str, fn: Callable[[], T]) -> T:
        return with_retries(
            fn, url=uri, retries=self.retries, backoff_s=self.backoff_s, on_retry=lambda _: self._bump("retries")
        )

    def _bump(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1


_DEFAULT_STORES: dict[tuple[str, str], LoraStore] = {}
_DEFAULT_LOCK = threading.Lock()


def default_store(storage_options: dict[str, dict[str, Any]] | None = None) -> LoraStore:
    """The process-wide store for these options (one per distinct ``storage_options``).

    For library entry points (``lora_core.load_adapter(url)``) that have no store passed in. The
    budget comes from ``$LORA_FARM_CACHE_BYTES`` when set.
    """
    cache_dir = default_cache_dir()
    key = (cache_dir, json.dumps(storage_options or {}, sort_keys=True, default=str))
    with _DEFAULT_LOCK:
        store = _DEFAULT_STORES.get(key)
        if store is None:
            budget = int(os.environ.get("LORA_FARM_CACHE_BYTES", 10 * GiB))
            store = _DEFAULT_STORES[key] = LoraStore(cache_dir, budget, storage_options)
        return store

