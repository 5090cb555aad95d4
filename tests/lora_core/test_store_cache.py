"""The byte budget, leases and eviction of the store's disk cache, and fault classification.

Sources are memory:// files (no server needed); what is asserted is which blobs are left
on disk and the eviction counters.
"""
from __future__ import annotations

import errno
import hashlib
import multiprocessing as mp
import os
import uuid

import fsspec
import pytest

from lora_core.errors import ChecksumMismatch, FetchError, PermanentFetchError, TruncatedTransferError
from lora_core.store import LoraStore
from lora_core.store_io import classify, with_retries

pytestmark = pytest.mark.timeout(60)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def files():
    """Three 400-byte memory:// files: a, b, c."""
    mem = fsspec.filesystem("memory")
    root = f"/evict-{uuid.uuid4().hex}"
    out = {}
    for name in "abc":
        data = name.encode() * 400
        mem.pipe(f"{root}/{name}.safetensors", data)
        out[name] = (f"memory://{root}/{name}.safetensors", sha(data))
    return out


def present(store: LoraStore, files: dict, *names: str) -> dict[str, bool]:
    on_disk = set(os.listdir(os.path.join(store.disk.root, "blobs")))
    return {n: files[n][1] in on_disk for n in names}


def test_lru_blob_is_evicted_over_budget(tmp_path, files):
    store = LoraStore(tmp_path / "cache", budget_bytes=1000)  # room for two of three
    store.fetch(files["a"][0])
    store.fetch(files["b"][0])
    store.fetch(files["a"][0])  # a is now more recent than b
    store.fetch(files["c"][0])
    assert present(store, files, "a", "b", "c") == {"a": True, "b": False, "c": True}
    stats = store.stats()
    assert (stats["evictions"], stats["bytes_evicted"], stats["cache_bytes"]) == (1, 400, 800)


def test_leased_blob_is_never_evicted(tmp_path, files):
    store = LoraStore(tmp_path / "cache", budget_bytes=500)  # room for one
    with store.lease(files["a"][0]) as leased:
        store.fetch(files["b"][0])
        store.fetch(files["c"][0])
        assert os.path.exists(leased.path)
        assert present(store, files, "a", "b", "c") == {"a": True, "b": False, "c": True}
        assert store.stats()["leased"] == 1
    assert store.stats()["leased"] == 0
    store.fetch(files["b"][0])  # a is free again, and least recently used
    assert present(store, files, "a", "b", "c") == {"a": False, "b": True, "c": False}


def test_pin_and_release_count(tmp_path, files):
    store = LoraStore(tmp_path / "cache", budget_bytes=500)
    a = store.fetch(files["a"][0], pin=True)
    store.fetch(files["a"][0], pin=True)
    store.release(a.sha256)
    store.fetch(files["b"][0])
    assert present(store, files, "a")["a"]  # still one lease left
    store.release(a.sha256)
    store.release(a.sha256)  # one too many: ignored
    assert store.trim() == 400
    assert present(store, files, "a", "b") == {"a": False, "b": True}


def test_file_larger_than_budget_is_served_then_evicted(tmp_path, files):
    store = LoraStore(tmp_path / "cache", budget_bytes=100)
    a = store.fetch(files["a"][0])
    assert os.path.exists(a.path)  # the file just fetched is protected
    store.fetch(files["b"][0])
    assert present(store, files, "a", "b") == {"a": False, "b": True}


def _exit_now() -> None:
    pass


def test_leases_of_other_processes(tmp_path, files):
    """A lease file of a live process protects a blob; one of a dead process does not."""
    store = LoraStore(tmp_path / "cache", budget_bytes=1000)  # room for two of three
    a = store.fetch(files["a"][0]).sha256  # the LRU one: evicted next, unless leased
    b = store.fetch(files["b"][0]).sha256
    leases = os.path.join(store.disk.root, "leases")
    open(os.path.join(leases, f"{a}.{os.getppid()}"), "w").close()  # our parent: alive
    dead = mp.get_context("spawn").Process(target=_exit_now)
    dead.start()
    dead.join()
    open(os.path.join(leases, f"{b}.{dead.pid}"), "w").close()
    store.fetch(files["c"][0])
    assert present(store, files, "a", "b", "c") == {"a": True, "b": False, "c": True}
    assert not os.path.exists(os.path.join(leases, f"{b}.{dead.pid}"))  # stale lease swept


def test_content_addressed_dedupe_across_urls(tmp_path):
    mem = fsspec.filesystem("memory")
    root = f"/dup-{uuid.uuid4().hex}"
    mem.pipe(f"{root}/one.safetensors", b"same bytes")
    mem.pipe(f"{root}/two.safetensors", b"same bytes")
    store = LoraStore(tmp_path / "cache")
    one = store.fetch(f"memory://{root}/one.safetensors")
    two = store.fetch(f"memory://{root}/two.safetensors", sha256=one.sha256)
    assert two.cached and two.path == one.path
    assert len(os.listdir(os.path.join(store.disk.root, "blobs"))) == 1


# ---- fault classification ------------------------------------------------------------------
def _client_response_error(status: int) -> Exception:
    import aiohttp

    return aiohttp.ClientResponseError(request_info=None, history=(), status=status, message="x")  # type: ignore[arg-type]


def _not_found_caused_by(cause: Exception) -> Exception:
    try:
        raise FileNotFoundError("http://h/x") from cause
    except FileNotFoundError as e:
        return e


@pytest.mark.parametrize(
    "exc, expected",
    [
        (FileNotFoundError("x"), PermanentFetchError),
        (PermissionError("x"), PermanentFetchError),
        (ValueError("bad url"), PermanentFetchError),
        (ConnectionResetError("reset"), FetchError),
        (TimeoutError(), FetchError),
        (OSError(errno.EIO, "io"), FetchError),
        (OSError(errno.ENOSPC, "disk full"), PermanentFetchError),
        ("404", PermanentFetchError),
        ("403", PermanentFetchError),
        ("500", FetchError),
        ("503", FetchError),
        ("429", FetchError),
        ("notfound<-500", FetchError),
        ("notfound<-404", PermanentFetchError),
        ("payload", TruncatedTransferError),
        (ChecksumMismatch("m"), ChecksumMismatch),
    ],
)
def test_classify(exc, expected):
    import aiohttp

    if isinstance(exc, str):
        if exc == "payload":
            exc = aiohttp.ClientPayloadError("cut")
        elif exc.startswith("notfound<-"):
            exc = _not_found_caused_by(_client_response_error(int(exc.split("-")[1])))
        else:
            exc = _client_response_error(int(exc))
    cls, reason = classify(exc)
    assert cls is expected and reason


def test_with_retries_counts_and_chains():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    seen = []
    assert with_retries(flaky, url="s3://b/k", retries=4, backoff_s=0.001, on_retry=seen.append) == "ok"
    assert len(calls) == 3 and len(seen) == 2

    def always() -> None:
        raise ConnectionResetError("reset by peer")

    with pytest.raises(FetchError) as info:
        with_retries(always, url="s3://b/k", retries=2, backoff_s=0.001)
    assert "s3://b/k" in str(info.value) and "3 attempts" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionResetError)
