"""Loopback servers for storage tests: a fault-injecting HTTP server and moto's S3.

Both listen on 127.0.0.1 with a port the OS picks, so tests never reach the network and
can run side by side. The HTTP server counts GET and HEAD requests per path separately:
the store's promises ("exactly one download", "404 fails after one request") are about
GETs of the body, while fsspec's HTTP filesystem may send HEADs for ``info``.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Entry:
    """One served path: its bytes and the faults to inject."""

    data: bytes
    fail_first: int = 0          # the first N GETs answer `fail_status`
    fail_status: int = 500
    fail_head: bool = False      # HEADs fail too while GETs are failing
    truncate: bool = False       # announce the full length, send half, close
    slow_s: float = 0.0          # pause after the first half of the body
    etag: bool = True
    trickle_s: float = 0.0       # send the body `trickle_bytes` at a time, pausing this long between
    trickle_bytes: int = 1
    head_size: int | None = None  # HEAD announces this Content-Length instead (a lie, or a change)
    gzip: bool = False           # send the body gzip-compressed (Content-Encoding), as a bomb would

    def __post_init__(self) -> None:
        self.body = gzip.compress(self.data, 6) if self.gzip else self.data  # compressed once, not per request


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _entry(self) -> Entry | None:
        return self.server.owner.entries.get(self.path.split("?")[0])

    def _headers(self, entry: Entry, status: int = 200) -> None:
        self.send_response(status)
        length = len(entry.body)
        if self.command == "HEAD" and entry.head_size is not None:
            length = entry.head_size
        self.send_header("Content-Length", str(length))
        if entry.gzip:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Type", "application/octet-stream")
        if entry.etag:
            self.send_header("ETag", '"%s"' % hashlib.md5(entry.data).hexdigest())
        self.end_headers()

    def _error(self, status: int) -> None:
        body = b"error"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        owner = self.server.owner
        entry = self._entry()
        owner.count("HEAD", self.path)
        if entry is None:
            return self._error(404)
        if entry.fail_head and owner.gets(self.path) < entry.fail_first:
            return self._error(entry.fail_status)
        self._headers(entry)

    def do_GET(self) -> None:
        owner = self.server.owner
        entry = self._entry()
        n = owner.count("GET", self.path)
        if entry is None:
            return self._error(404)
        if n <= entry.fail_first:
            return self._error(entry.fail_status)
        self._headers(entry)
        body = entry.body
        if entry.trickle_s:
            try:
                for i in range(0, len(body), entry.trickle_bytes):
                    self.wfile.write(body[i : i + entry.trickle_bytes])
                    self.wfile.flush()
                    time.sleep(entry.trickle_s)
            except (BrokenPipeError, ConnectionResetError):  # the client cut us off: what the tests want
                pass
            return
        if entry.gzip:
            self.wfile.write(body)
            return
        half = len(entry.data) // 2
        self.wfile.write(entry.data[:half])
        self.wfile.flush()
        if entry.truncate:
            self.close_connection = True
            return
        if entry.slow_s:
            time.sleep(entry.slow_s)
        self.wfile.write(entry.data[half:])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "FaultyHTTPServer"


class FaultyHTTPServer:
    """An HTTP server on 127.0.0.1 that serves registered bytes with injected faults."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FaultyHTTPServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def add(self, path: str, data: bytes, **faults: Any) -> str:
        """Serve ``data`` at ``path`` (with faults, see ``Entry``); returns its URL."""
        self.entries[path] = Entry(data=data, **faults)
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def count(self, method: str, path: str) -> int:
        with self._lock:
            key = (method, path.split("?")[0])
            self._counts[key] = self._counts.get(key, 0) + 1
            return self._counts[key]

    def gets(self, path: str) -> int:
        with self._lock:
            return self._counts.get(("GET", path), 0)

    def heads(self, path: str) -> int:
        with self._lock:
            return self._counts.get(("HEAD", path), 0)


class MotoS3:
    """moto's S3 server on 127.0.0.1 (what s3fs's own tests use), with test credentials."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""

    def __enter__(self) -> "MotoS3":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.setdefault(name, "testing")
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    @property
    def storage_options(self) -> dict[str, dict[str, Any]]:
        """Per-protocol options for ``LoraStore`` / ``write_bytes_atomic``."""
        return {"s3": {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}}

    def fs(self) -> Any:
        """A fresh s3fs filesystem on the server (no instance cache: tests see real state)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options["s3"])


def fetch_in_child(cache_dir: str, url: str, barrier: Any, results: Any) -> None:
    """Body of a spawned process: its own LoraStore on a shared cache dir, one fetch.

    Waits at ``barrier`` so that all processes ask at the same moment; reports
    ``(sha256, cached, downloads)`` on the ``results`` queue.
    """
    from storage.store import LoraStore

    store = LoraStore(cache_dir, retries=2, backoff_s=0.01, timeout_s=30)
    barrier.wait(timeout=60)
    result = store.fetch(url)
    results.put((result.sha256, result.cached, store.stats()["downloads"]))


def fetch_forever(cache_dir: str, url: str) -> None:
    """Body of a process the crash test kills with SIGKILL in the middle of a download."""
    from storage.store import LoraStore

    LoraStore(cache_dir, retries=0, timeout_s=60).fetch(url)
