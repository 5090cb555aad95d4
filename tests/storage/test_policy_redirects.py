"""Redirects follow the LoRA URI policy: a loopback HTTP server that redirects to a local
file or to a port the operator did not allow is refused with the rule
named, permanently (no retries), and nothing lands in the cache; an allowed redirect
(another host, as a model hub's CDN) is still followed. (https -> http needs TLS on
loopback: its rule is checked in test_policy.py.)"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from storage.errors import ForbiddenUriError
from storage.policy import UriPolicy
from storage.store import LoraStore
from tests.storage.servers import FaultyHTTPServer

BODY = b"safetensors-ish bytes " * 64


class Redirector:
    """127.0.0.1, an OS-chosen port: each registered path answers 302 to its target."""

    def __init__(self) -> None:
        self.routes: dict[str, str] = {}
        self.hits: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                owner.hits.append(self.path)
                target = owner.routes.get(self.path)
                self.send_response(302 if target else 404)
                if target:
                    self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "Redirector":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    @property
    def netloc(self) -> str:
        return "127.0.0.1:%d" % self.httpd.server_address[1]

    def add(self, path: str, target: str) -> str:
        self.routes[path] = target
        return f"http://{self.netloc}{path}"


@pytest.fixture
def servers():
    with Redirector() as r, FaultyHTTPServer() as target:
        yield r, target


def store_for(tmp_path, policy: UriPolicy) -> LoraStore:
    # retries allowed: the test shows a refused redirect is permanent, not retried
    return LoraStore(tmp_path / "cache", storage_options=policy.guard({}), retries=3, backoff_s=0.01)


def test_redirect_to_a_local_file_is_refused_naming_the_rule(servers, tmp_path):
    r, _ = servers
    secret = tmp_path / "root" / "secret.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(b"TOP-SECRET " * 10)
    policy = UriPolicy.build([str(tmp_path / "root")])  # the file is even under an allowed root
    store = store_for(tmp_path, policy)
    for target in (f"file://{secret}", "file:///etc/passwd"):
        url = r.add(f"/to-file-{len(r.routes)}", target)
        r.hits.clear()
        with pytest.raises(ForbiddenUriError) as e:
            store.fetch(url)
        msg = str(e.value)
        assert e.value.source == url and "never reaches local files" in msg and target in msg
        assert "TOP-SECRET" not in msg
        assert len(r.hits) <= 2, f"permanent: one HEAD and one GET at most, got {r.hits}"
    assert store.stats()["retries"] == 0 and store.stats()["downloads"] == 0
    assert not list((tmp_path / "cache").rglob("blobs/*")), "nothing was cached"


def test_redirect_to_a_port_the_operator_did_not_allow_is_refused(servers, tmp_path):
    r, target = servers
    real = target.add("/l.safetensors", BODY)
    url = r.add("/elsewhere", real)
    policy = UriPolicy.build([], ["http"], [r.netloc])  # LoRAs from the redirector's host:port only
    with pytest.raises(ForbiddenUriError) as e:
        store_for(tmp_path, policy).fetch(url)
    other = real.split("/")[2]
    assert f"host '{other}' is not allowed" in str(e.value) and e.value.source == url
    assert target.gets("/l.safetensors") == 0 and target.heads("/l.safetensors") == 0, "never contacted"


def test_an_allowed_redirect_is_still_followed(servers, tmp_path):
    r, target = servers
    real = target.add("/l.safetensors", BODY)
    url = r.add("/cdn", real)
    store = store_for(tmp_path, UriPolicy.build([]))  # the default: any remote host
    res = store.fetch(url)
    assert open(res.path, "rb").read() == BODY and target.gets("/l.safetensors") == 1
    again = store_for(tmp_path, UriPolicy.build([])).fetch(url)
    assert again.cached and again.sha256 == res.sha256, "the guard keeps the index key stable across stores"
