"""Downloads are bounded: a size limit (announced and streamed) and a rate floor, on loopback servers.

Each test names the error class and the URL, and checks that nothing partial is left in
the cache (no blob, no temp file, no index entry) and that other files are untouched.
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from storage.errors import FetchError, LoraTooLargeError, PermanentFetchError, SlowTransferError
from storage.fetch import MIN_RATE_BYTES_S, RATE_WINDOW_S
from storage.store import MAX_LORA_BYTES, LoraStore

try:  # `python -m pytest` from the repo root
    from tests.storage.servers import FaultyHTTPServer, MotoS3
except ImportError:  # bare `pytest`: only this folder is on sys.path
    from servers import FaultyHTTPServer, MotoS3  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(store: LoraStore) -> list[str]:
    """Blobs, temp files and index entries: what a failed download must not leave."""
    root = store.disk.root
    return sorted(os.listdir(os.path.join(root, "blobs")) + os.listdir(os.path.join(root, "tmp"))
                  + os.listdir(os.path.join(root, "index")))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns that, in kB.

    ``ru_maxrss`` only ever grows, so an earlier peak of the test process would hide the
    one we probe; writing 5 to ``clear_refs`` starts the peak anew (Linux).
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


@pytest.fixture
def server():
    with FaultyHTTPServer() as srv:
        yield srv


def test_default_limits_are_sane(tmp_path):
    assert MAX_LORA_BYTES == 4096 * 2**20
    if "LORA_FARM_MIN_RATE_BYTES_S" not in os.environ and "LORA_FARM_RATE_WINDOW_S" not in os.environ:
        # a trickle is cut within about half a minute; 4 GiB at 1 MiB/s (an hour) is well above the floor
        assert (MIN_RATE_BYTES_S, RATE_WINDOW_S) == (16 * 1024, 30.0)
    store = LoraStore(tmp_path / "cache")
    assert (store.max_bytes, store.min_rate_bytes_s, store.rate_window_s) == (MAX_LORA_BYTES, MIN_RATE_BYTES_S,
                                                                              RATE_WINDOW_S)
    from jobs.options import FarmOptions

    assert FarmOptions().max_lora_mb == 4096


# ---- size ------------------------------------------------------------------------------------
def test_announced_size_over_the_limit_is_refused_before_any_download(server, tmp_path):
    store = LoraStore(tmp_path / "cache", max_bytes=5000, retries=3, backoff_s=0.01)
    url = server.add("/big.safetensors", os.urandom(10_000))
    with pytest.raises(LoraTooLargeError) as info:
        store.fetch(url)
    message = str(info.value)
    assert isinstance(info.value, PermanentFetchError) and not info.value.transient
    assert url in message and "10000" in message and "5000" in message
    assert server.gets("/big.safetensors") == 0  # refused on the announced size: no body requested
    assert leftovers(store) == []


def test_announced_size_over_the_limit_on_s3(tmp_path):
    with MotoS3() as s3:
        fs = s3.fs()
        fs.mkdir("bounds")
        fs.pipe("bounds/big.safetensors", os.urandom(10_000))
        fs.pipe("bounds/ok.safetensors", b"small" * 100)
        store = LoraStore(tmp_path / "cache", storage_options=s3.storage_options, max_bytes=5000, retries=1)
        with pytest.raises(LoraTooLargeError, match="10000") as info:
            store.fetch("s3://bounds/big.safetensors")
        assert "s3://bounds/big.safetensors" in str(info.value)
        assert leftovers(store) == []
        assert store.fetch("s3://bounds/ok.safetensors").sha256 == sha(b"small" * 100)  # the limit is per file


def test_body_longer_than_announced_is_cut_off(server, tmp_path):
    """HEAD says 1000 bytes, GET sends 200 kB: cut at the announced size, nothing cached."""
    store = LoraStore(tmp_path / "cache", retries=1, backoff_s=0.01)
    url = server.add("/liar.bin", os.urandom(200_000), head_size=1000)
    with pytest.raises(FetchError, match="more than the 1000 bytes it announced") as info:
        store.fetch(url)
    assert url in str(info.value)
    assert server.gets("/liar.bin") == 2  # transient (it may have changed mid-way): retried once
    assert leftovers(store) == []


def test_compressed_response_that_inflates_past_the_limit_is_cut_off(server, tmp_path):
    """50 MB of zeros gzip to ~50 kB; no size announced (HEAD is compressed): cut at 1 MiB."""
    store = LoraStore(tmp_path / "cache", max_bytes=2**20, retries=2, backoff_s=0.01)
    url = server.add("/bomb.bin", bytes(50 * 2**20), gzip=True)
    good = server.add("/good.bin", b"fine" * 1000)
    kept = store.fetch(good)
    rss0 = reset_peak_rss()
    t0 = time.perf_counter()
    with pytest.raises(LoraTooLargeError) as info:
        store.fetch(url)
    elapsed = time.perf_counter() - t0
    grew_mb = (_status_kb("VmHWM") - rss0) / 1024
    assert url in str(info.value) and str(2**20) in str(info.value)
    # one GET of fsspec's info (HEAD gave no usable size) and one download: permanent, not retried
    assert server.gets("/bomb.bin") == 2
    assert elapsed < 5 and grew_mb < 200, (elapsed, grew_mb)
    assert leftovers(store) == sorted([kept.sha256, *os.listdir(os.path.join(store.disk.root, "index"))])
    assert open(kept.path, "rb").read() == b"fine" * 1000  # the other file is untouched


# ---- rate ------------------------------------------------------------------------------------
def test_trickling_server_is_cut_by_the_rate_floor(server, tmp_path):
    """One byte every 0.1 s, far under a floor of 4 KiB/s over a 1 s window: cut in ~1 s, not retried."""
    store = LoraStore(tmp_path / "cache", retries=3, backoff_s=0.01, timeout_s=30,
                      min_rate_bytes_s=4096, rate_window_s=1.0)
    url = server.add("/trickle.bin", os.urandom(10_000), trickle_s=0.1)
    t0 = time.perf_counter()
    with pytest.raises(SlowTransferError) as info:
        store.fetch(url)
    elapsed = time.perf_counter() - t0
    assert info.value.transient and url in str(info.value) and "too slow" in str(info.value)
    assert 0.9 < elapsed < 4, elapsed
    assert server.gets("/trickle.bin") == 1  # not retried in place: the same trickle would follow
    assert store.stats()["retries"] == 0
    assert leftovers(store) == []  # the partial file is gone


def test_server_that_sends_nothing_is_cut_by_the_watchdog(server, tmp_path):
    """Half the body, then silence for 20 s; the read timeout is 30 s: the rate floor cuts it in ~1-2 s."""
    store = LoraStore(tmp_path / "cache", retries=0, timeout_s=30, min_rate_bytes_s=4096, rate_window_s=1.0)
    url = server.add("/silent.bin", os.urandom(4000), slow_s=20)
    t0 = time.perf_counter()
    with pytest.raises(SlowTransferError):
        store.fetch(url)
    assert time.perf_counter() - t0 < 4
    assert leftovers(store) == []


class HeaderTrickle:
    """A raw-socket loopback server that answers every request with its response *headers* one
    byte every ``pause_s`` (each read well inside any per-read timeout), never a body."""

    def __init__(self, pause_s: float = 0.2) -> None:
        self.pause_s = pause_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/x.safetensors"
        self.requests: list[bytes] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.requests.append(conn.recv(65536).split(b" ", 1)[0])
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Pad: " + b"a" * 10_000:
                    if self.stop.is_set():
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(self.pause_s)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_metadata_request_whose_headers_trickle_is_cut_after_a_window(tmp_path):
    """main before: info (the HEAD) had only the per-read timeout (2 s here, never reached by a
    byte every 0.2 s): the fetch never ended. Now it is cut after one 1 s window, not retried."""
    srv = HeaderTrickle()
    store = LoraStore(tmp_path / "cache", retries=3, backoff_s=0.01, timeout_s=2,
                      min_rate_bytes_s=4096, rate_window_s=1.0)
    outcome: list[BaseException | str] = []

    def fetch() -> None:
        try:
            store.fetch(srv.url)
            outcome.append("served")
        except BaseException as e:  # noqa: BLE001 - asserted below
            outcome.append(e)

    t0 = time.perf_counter()
    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(20)  # twenty windows
    elapsed = time.perf_counter() - t0
    srv.close()
    assert not worker.is_alive(), f"still fetching after {elapsed:.0f}s"
    (error,) = outcome
    assert isinstance(error, SlowTransferError), error
    assert srv.url in str(error) and "metadata request (info/HEAD)" in str(error) and "1.0s" in str(error)
    assert len(srv.requests) == 1 and store.stats()["retries"] == 0  # not retried in place
    assert leftovers(store) == []


def test_slow_but_honest_link_still_arrives(server, tmp_path):
    """2 KiB every 50 ms (~40 KiB/s) over 1.5 s: above a floor of 8 KiB/s in every 0.5 s window."""
    store = LoraStore(tmp_path / "cache", retries=0, min_rate_bytes_s=8192, rate_window_s=0.5)
    data = os.urandom(60_000)
    url = server.add("/slow.bin", data, trickle_s=0.05, trickle_bytes=2048)
    t0 = time.perf_counter()
    result = store.fetch(url)
    assert time.perf_counter() - t0 > 1.0  # it did span several windows
    assert result.sha256 == sha(data) and open(result.path, "rb").read() == data


def test_a_stalled_download_does_not_hold_another_url(server, tmp_path):
    """One store, two threads: a trickling URL and a good one. The good one is served at once."""
    store = LoraStore(tmp_path / "cache", retries=0, timeout_s=30, min_rate_bytes_s=4096, rate_window_s=3.0)
    stalled = server.add("/stalled.bin", os.urandom(10_000), trickle_s=0.2)
    good_data = os.urandom(50_000)
    good = server.add("/good.bin", good_data)
    started = threading.Event()
    errors: list[BaseException] = []

    def slow() -> None:
        started.set()
        try:
            store.fetch(stalled)
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    t = threading.Thread(target=slow)
    t.start()
    started.wait(5)
    deadline = time.time() + 5
    while server.gets("/stalled.bin") == 0 and time.time() < deadline:  # its GET is being served
        time.sleep(0.01)
    t0 = time.perf_counter()
    result = store.fetch(good)
    assert time.perf_counter() - t0 < 1.5 and t.is_alive()  # served while the other still trickles
    assert result.sha256 == sha(good_data)
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], SlowTransferError)
