"""The node cache serves only verified bytes, confines index paths, and lives in a private dir.

Real files, a real HTTP server on loopback; after each fault the test checks the bytes
served, the requests made, and that the rest of the cache is intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from storage.errors import UnsafeCacheDirError
from storage.store import LoraStore, default_cache_dir

try:  # `python -m pytest` from the repo root
    from tests.storage.servers import FaultyHTTPServer
except ImportError:  # bare `pytest`: only this folder is on sys.path
    from servers import FaultyHTTPServer  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server():
    with FaultyHTTPServer() as srv:
        yield srv


def flip_byte(path: str, at: int = 10) -> None:
    """A bit-rot / hand-edit of a blob in place: same inode, same size."""
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


# ---- verification ----------------------------------------------------------------------------
def test_flipped_byte_in_a_blob_is_refetched_not_served(server, tmp_path):
    data, other = os.urandom(20_000), os.urandom(5_000)
    url, other_url = server.add("/a.bin", data), server.add("/b.bin", other)
    store = LoraStore(tmp_path / "cache", retries=0)
    first = store.fetch(url)
    kept = store.fetch(other_url)
    flip_byte(first.path)
    again = LoraStore(tmp_path / "cache", retries=0).fetch(url)  # a fresh process's view of the cache
    assert not again.cached and again.path == first.path
    assert open(again.path, "rb").read() == data and again.sha256 == sha(data)
    assert server.gets("/a.bin") == 2 and server.gets("/b.bin") == 1
    assert store.fetch(other_url).cached and open(kept.path, "rb").read() == other  # the rest untouched
    assert store.fetch(url).cached  # and the refetched blob is trusted again


def test_corrupt_blob_asked_for_by_sha_is_evicted_and_fetched_again(server, tmp_path):
    """The content-addressed path (sha256 given: no request at all on a hit) verifies too."""
    data = os.urandom(20_000)
    url = server.add("/c.bin", data)
    store = LoraStore(tmp_path / "cache", retries=0)
    path = store.fetch(url).path
    flip_byte(path)
    result = store.fetch(url, sha256=sha(data))
    assert not result.cached and open(result.path, "rb").read() == data
    assert server.gets("/c.bin") == 2
    assert store.fetch(url, sha256=sha(data)).cached and server.gets("/c.bin") == 2


def test_verified_blob_is_not_rehashed_on_every_hit(server, tmp_path, monkeypatch):
    url = server.add("/v.bin", os.urandom(10_000))
    store = LoraStore(tmp_path / "cache", retries=0)
    store.fetch(url)  # hashed once, as it was downloaded: marked verified
    import storage.node_cache as nc

    calls = []
    real = nc.hash_file
    monkeypatch.setattr(nc, "hash_file", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        assert LoraStore(tmp_path / "cache").fetch(url).cached
    assert calls == []


def test_index_entry_pointing_outside_the_cache_is_dropped(server, tmp_path):
    """An index record whose sha256 is '../../outside/secret' must not serve that file."""
    data = os.urandom(1000)
    url = server.add("/p.bin", data)
    store = LoraStore(tmp_path / "cache", retries=0)
    store.fetch(url)
    (index_file,) = (tmp_path / "cache" / "index").iterdir()
    record = json.loads(index_file.read_text())
    secret = tmp_path / "outside" / "secret"
    secret.parent.mkdir()
    secret.write_bytes(b"S" * len(data))  # the size matches, so only the path check stands in the way
    record["sha256"] = "../../outside/secret"
    index_file.write_text(json.dumps(record))
    result = LoraStore(tmp_path / "cache", retries=0).fetch(url)
    assert result.path == str(tmp_path / "cache" / "blobs" / sha(data))
    assert open(result.path, "rb").read() == data and result.sha256 == sha(data)
    assert json.loads(index_file.read_text())["sha256"] == sha(data)  # the entry was replaced
    assert secret.read_bytes() == b"S" * len(data)


@pytest.mark.parametrize("bad", [{"sha256": "ab" * 32, "nbytes": "10", "identity": {}}, [1, 2], "not json"])
def test_malformed_index_entry_is_a_miss(server, tmp_path, bad):
    data = b"payload" * 100
    url = server.add("/m.bin", data)
    store = LoraStore(tmp_path / "cache", retries=0)
    store.fetch(url)
    (index_file,) = (tmp_path / "cache" / "index").iterdir()
    index_file.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    result = store.fetch(url)
    assert result.sha256 == sha(data) and json.loads(index_file.read_text())["sha256"] == sha(data)


# ---- a private cache dir ---------------------------------------------------------------------
def test_default_cache_dir_is_per_user_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_FARM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "lora-farm")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "lora-farm")
    assert "/tmp/lora-farm-cache" != default_cache_dir()
    store = LoraStore(default_cache_dir())
    assert stat.S_IMODE(os.stat(store.disk.root).st_mode) == 0o700
    monkeypatch.setenv("LORA_FARM_CACHE", str(tmp_path / "node-cache"))  # per node, as before
    assert default_cache_dir() == str(tmp_path / "node-cache")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="planting a dir owned by another user needs os.chown, which only root may call")
def test_cache_dir_owned_by_another_user_is_refused(tmp_path):
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    os.chown(planted, 4321, 4321)  # root may give it to any other uid
    with pytest.raises(UnsafeCacheDirError, match="owned by uid 4321") as info:
        LoraStore(planted)
    assert str(planted) in str(info.value)
    assert os.listdir(planted) == []  # nothing written into it


def test_world_writable_cache_dir_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafeCacheDirError, match="writable by others") as info:
        LoraStore(shared)
    assert str(shared) in str(info.value) and os.listdir(shared) == []


def test_symlinked_cache_dir_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "cache"
    link.symlink_to(target)
    with pytest.raises(UnsafeCacheDirError, match="symlink") as info:
        LoraStore(link)
    assert str(link) in str(info.value) and os.listdir(target) == []


def test_own_cache_dir_readable_by_others_is_tightened(tmp_path):
    old = tmp_path / "old-cache"
    old.mkdir()
    os.chmod(old, 0o755)
    LoraStore(old)
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o700
