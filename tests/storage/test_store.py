"""LoraStore against a real HTTP server on loopback, memory:// and local files.

The HTTP server injects faults (500s, 404, a body cut short, a stall) and counts GETs, so
the assertions are about requests actually made, not only about results.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import uuid

import fsspec
import pytest

from storage.errors import ChecksumMismatch, FetchError, PermanentFetchError, TruncatedTransferError
from storage.fetch import hash_file
from storage.store import LoraStore, default_store

try:  # `python -m pytest` from the repo root
    from tests.storage.servers import FaultyHTTPServer, fetch_forever, fetch_in_child
except ImportError:  # bare `pytest`: only this folder is on sys.path
    from servers import FaultyHTTPServer, fetch_forever, fetch_in_child  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_names(store: LoraStore) -> list[str]:
    return sorted(os.listdir(os.path.join(store.disk.root, "blobs")))


def leftovers(store: LoraStore) -> list[str]:
    """Everything in the cache dir except lock files and empty folders."""
    out = []
    for dirpath, _, files in os.walk(store.disk.root):
        out += [os.path.join(dirpath, f) for f in files if not f.endswith(".lock")]
    return out


@pytest.fixture
def server():
    with FaultyHTTPServer() as srv:
        yield srv


@pytest.fixture
def store(tmp_path):
    return LoraStore(tmp_path / "cache", retries=3, backoff_s=0.01, timeout_s=10)


# ---- HTTP: hits, changes, faults ----------------------------------------------------------
def test_http_fetch_then_cache_hit(server, store):
    data = os.urandom(100_000)
    url = server.add("/a.safetensors", data)
    first = store.fetch(url)
    assert (first.sha256, first.nbytes, first.cached) == (sha(data), len(data), False)
    assert open(first.path, "rb").read() == data
    assert first.path == os.path.join(store.disk.root, "blobs", sha(data))
    second = store.fetch(url)
    assert second.cached and second.path == first.path
    assert server.gets("/a.safetensors") == 1
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["downloads"], stats["bytes_fetched"]) == (1, 1, 1, len(data))
    assert stats["fetch_s"] > 0


def test_known_sha_is_served_without_any_request(server, store):
    data = b"lora" * 1000
    url = server.add("/k.bin", data)
    store.fetch(url)
    heads, gets = server.heads("/k.bin"), server.gets("/k.bin")
    assert store.fetch(url, sha256=sha(data).upper()).cached
    assert (server.heads("/k.bin"), server.gets("/k.bin")) == (heads, gets)


def test_changed_remote_is_fetched_again(server, store):
    url = server.add("/c.bin", b"version one")
    old = store.fetch(url)
    server.add("/c.bin", b"version two!")  # new bytes, new ETag
    new = store.fetch(url)
    assert not new.cached and new.sha256 == sha(b"version two!") != old.sha256
    assert server.gets("/c.bin") == 2


def test_500_twice_then_ok_is_retried(server, store):
    data = os.urandom(5000)
    url = server.add("/flaky.bin", data, fail_first=2)
    result = store.fetch(url)
    assert result.sha256 == sha(data)
    assert server.gets("/flaky.bin") == 3
    assert store.stats()["retries"] == 2


def test_500_on_head_too_is_transient_not_not_found(server, store):
    # fsspec turns a failed info() into FileNotFoundError; the 500 is only in __cause__
    url = server.add("/flaky-head.bin", b"x" * 100, fail_first=2, fail_head=True)
    assert store.fetch(url).sha256 == sha(b"x" * 100)
    assert store.stats()["retries"] == 2


def test_404_fails_fast_after_one_request(server, tmp_path):
    store = LoraStore(tmp_path / "cache", retries=4, backoff_s=5.0)  # a retry would take 5 s
    url = server.url("/missing.safetensors")
    t0 = time.perf_counter()
    with pytest.raises(PermanentFetchError) as info:
        store.fetch(url)
    assert time.perf_counter() - t0 < 2
    assert url in str(info.value) and "404" in str(info.value)
    assert server.gets("/missing.safetensors") == 1
    assert store.stats()["errors"] == 1 and store.stats()["retries"] == 0


def test_body_cut_short_is_detected_and_nothing_cached(server, tmp_path):
    store = LoraStore(tmp_path / "cache", retries=1, backoff_s=0.01)
    url = server.add("/cut.bin", os.urandom(200_000), truncate=True)
    with pytest.raises(TruncatedTransferError) as info:
        store.fetch(url)
    assert info.value.transient and url in str(info.value)
    assert server.gets("/cut.bin") == 2  # retried once, as transient errors are
    assert blob_names(store) == [] and leftovers(store) == []


def test_wrong_sha256_raises_and_caches_nothing(server, store):
    data = b"the real bytes" * 100
    url = server.add("/w.bin", data)
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as info:
        store.fetch(url, sha256=wrong)
    message = str(info.value)
    assert url in message and wrong in message and sha(data) in message
    assert server.gets("/w.bin") == 1  # integrity errors are not retried
    assert blob_names(store) == [] and leftovers(store) == []
    again = store.fetch(url)
    assert not again.cached and server.gets("/w.bin") == 2
    assert store.fetch(url, sha256=sha(data)).cached


def test_refused_connection_is_transient(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = LoraStore(tmp_path / "cache", retries=2, backoff_s=0.01)
    with pytest.raises(FetchError) as info:
        store.fetch(f"http://127.0.0.1:{port}/x.bin")
    assert info.value.transient and not isinstance(info.value, PermanentFetchError)
    assert store.stats()["retries"] == 2


def test_stalled_server_times_out(server, tmp_path):
    store = LoraStore(tmp_path / "cache", retries=1, backoff_s=0.01, timeout_s=0.5)
    url = server.add("/stall.bin", os.urandom(10_000), slow_s=3)
    t0 = time.perf_counter()
    with pytest.raises(FetchError) as info:
        store.fetch(url)
    assert info.value.transient and time.perf_counter() - t0 < 2.9
    assert blob_names(store) == []


def test_large_download_logs_progress(server, tmp_path, caplog):
    store = LoraStore(tmp_path / "cache", progress_every_bytes=64 * 1024)
    url = server.add("/big.bin", os.urandom(1_000_000))
    with caplog.at_level(logging.INFO, logger="storage"):
        store.fetch(url)
    progress = [r for r in caplog.records if r.getMessage().startswith("fetching ")]
    assert progress and all(url in r.getMessage() for r in progress)


# ---- one download per node ----------------------------------------------------------------
def test_four_threads_one_download(server, store):
    data = os.urandom(300_000)
    url = server.add("/shared.bin", data, slow_s=0.3)
    barrier = threading.Barrier(4)
    results: list = []

    def work() -> None:
        barrier.wait()
        results.append(store.fetch(url))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.gets("/shared.bin") == 1
    assert {r.sha256 for r in results} == {sha(data)} and sum(not r.cached for r in results) == 1
    assert store.stats()["downloads"] == 1


def test_two_stores_one_cache_dir_one_download(server, tmp_path):
    """Separate instances share nothing in memory: only the file lock dedupes them."""
    stores = [LoraStore(tmp_path / "cache") for _ in range(2)]
    url = server.add("/two.bin", os.urandom(100_000), slow_s=0.3)
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=lambda s=s: (barrier.wait(), s.fetch(url))) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.gets("/two.bin") == 1
    assert sum(s.stats()["downloads"] for s in stores) == 1


def test_four_processes_one_download(server, tmp_path):
    data = os.urandom(500_000)
    url = server.add("/procs.bin", data, slow_s=0.5)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=fetch_in_child, args=(str(tmp_path / "cache"), url, barrier, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=50) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    assert server.gets("/procs.bin") == 1
    assert {o[0] for o in outcomes} == {sha(data)}
    assert sum(o[2] for o in outcomes) == 1 and sum(not o[1] for o in outcomes) == 1


# ---- crash safety -------------------------------------------------------------------------
def test_killed_download_leaves_no_valid_looking_blob(server, tmp_path):
    data = os.urandom(400_000)
    url = server.add("/crash.bin", data, slow_s=20)
    cache = tmp_path / "cache"
    child = mp.get_context("spawn").Process(target=fetch_forever, args=(str(cache), url))
    child.start()
    deadline = time.time() + 30
    while time.time() < deadline and not any(p.stat().st_size for p in (cache / "tmp").glob("*.part")):
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    parts = list((cache / "tmp").glob("*.part"))
    assert parts and parts[0].stat().st_size < len(data)  # the crash left half a file
    assert os.listdir(cache / "blobs") == [] and os.listdir(cache / "index") == []

    server.entries["/crash.bin"].slow_s = 0
    store = LoraStore(cache)  # a new process's store sweeps temp files of dead pids
    assert not list((cache / "tmp").glob("*.part"))
    result = store.fetch(url)
    assert not result.cached and result.sha256 == sha(data) and hash_file(result.path)[0] == sha(data)


def test_blob_of_wrong_size_is_not_served(server, store):
    data = os.urandom(10_000)
    url = server.add("/bad.bin", data)
    path = store.fetch(url).path
    with open(path, "r+b") as f:  # e.g. a disk error or a hand-edited cache
        f.truncate(100)
    result = store.fetch(url)
    assert not result.cached and hash_file(result.path) == (sha(data), len(data))


# ---- memory:// and local files ------------------------------------------------------------
def test_memory_fetch_hit_and_change(store):
    mem = fsspec.filesystem("memory")
    path = f"/loras/{uuid.uuid4().hex}.safetensors"
    mem.pipe(path, b"first")
    url = "memory://" + path
    assert store.fetch(url).sha256 == sha(b"first")
    assert store.fetch(url).cached
    time.sleep(0.002)
    mem.pipe(path, b"second")
    changed = store.fetch(url)
    assert not changed.cached and changed.sha256 == sha(b"second")
    with pytest.raises(PermanentFetchError):
        store.fetch("memory:///loras/nope.safetensors")


@pytest.mark.parametrize("as_url", [False, True])
def test_local_file_served_in_place_with_memoized_sha(tmp_path, store, as_url):
    src = tmp_path / "style.safetensors"
    src.write_bytes(b"local bytes")
    uri = ("file://" if as_url else "") + str(src)
    first = store.fetch(uri)
    assert first.path == str(src) and first.sha256 == sha(b"local bytes") and not first.cached
    assert store.fetch(uri).cached
    assert blob_names(store) == []  # no copy
    other = LoraStore(store.disk.root)  # another process: the sha is in the on-disk index
    assert other.fetch(uri).cached
    time.sleep(0.01)
    src.write_bytes(b"edited bytes")
    assert store.fetch(uri).sha256 == sha(b"edited bytes")
    with pytest.raises(ChecksumMismatch):
        store.fetch(uri, sha256=sha(b"local bytes"))


def test_local_errors_are_permanent(tmp_path, store):
    with pytest.raises(PermanentFetchError, match="not found"):
        store.fetch(str(tmp_path / "missing.safetensors"))
    with pytest.raises(PermanentFetchError, match="regular file"):
        store.fetch(str(tmp_path))
    with pytest.raises(PermanentFetchError, match="nope"):
        store.fetch("nope://bucket/x.safetensors")
    with pytest.raises(ValueError):
        store.fetch(str(tmp_path / "x"), sha256="not-a-sha")


def test_protocol_without_its_package_is_permanent(store):
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(PermanentFetchError, match="not installed"):
            store.fetch("gs://bucket/style.safetensors")
    else:
        pytest.skip("gcsfs is installed")


def test_default_store_is_shared_per_options(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_FARM_CACHE", str(tmp_path / "shared-cache"))
    a = default_store()
    assert default_store(None) is a and default_store({}) is a
    b = default_store({"s3": {"endpoint_url": "http://127.0.0.1:1"}})
    assert b is not a and b.disk.root == a.disk.root == str(tmp_path / "shared-cache")
