"""LoraStore and the output helpers against moto's S3 server on loopback.

The endpoint and credentials reach s3fs only through ``storage_options``, as they would
from a manifest. Objects are changed through a separate, uncached s3fs instance so that a
stale listing in the store's own instance would make the change test fail.
"""
from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from storage.errors import ChecksumMismatch, PermanentFetchError
from storage.output import ensure_under, write_bytes_atomic
from storage.store import LoraStore
from storage.urls import open_filesystem

try:
    from tests.storage.servers import MotoS3
except ImportError:
    from servers import MotoS3  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def s3():
    with MotoS3() as server:
        server.fs().mkdir("loras")
        server.fs().mkdir("outputs")
        yield server


@pytest.fixture
def store(tmp_path, s3):
    return LoraStore(tmp_path / "cache", storage_options=s3.storage_options, retries=2, backoff_s=0.01)


def put(s3, data: bytes) -> str:
    key = f"loras/{uuid.uuid4().hex}.safetensors"
    s3.fs().pipe(key, data)
    return f"s3://{key}"


def test_fetch_then_hit(s3, store):
    data = os.urandom(200_000)
    url = put(s3, data)
    first = store.fetch(url)
    assert (first.sha256, first.nbytes, first.cached) == (sha(data), len(data), False)
    assert open(first.path, "rb").read() == data
    second = store.fetch(url)
    assert second.cached and second.path == first.path
    stats = store.stats()
    assert (stats["downloads"], stats["hits"], stats["misses"], stats["bytes_fetched"]) == (1, 1, 1, len(data))


def test_changed_object_is_fetched_again(s3, store):
    url = put(s3, b"v1" * 1000)
    old = store.fetch(url)
    s3.fs().pipe(url, b"v2" * 1000)  # same size, new ETag
    new = store.fetch(url)
    assert not new.cached and new.sha256 == sha(b"v2" * 1000) != old.sha256
    assert store.stats()["downloads"] == 2


def test_missing_key_and_bucket_are_permanent(s3, store):
    for url in ("s3://loras/nope.safetensors", "s3://no-such-bucket/x.safetensors"):
        with pytest.raises(PermanentFetchError) as info:
            store.fetch(url)
        assert url in str(info.value)
    assert store.stats()["retries"] == 0


def test_checksum_mismatch_on_s3(s3, store):
    url = put(s3, b"payload")
    with pytest.raises(ChecksumMismatch):
        store.fetch(url, sha256=sha(b"other"))
    assert os.listdir(os.path.join(store.disk.root, "blobs")) == []


def test_caller_options_are_not_mutated(s3, tmp_path):
    options = {"s3": dict(s3.storage_options["s3"])}
    before = repr(options)
    LoraStore(tmp_path / "c", storage_options=options).fetch(put(s3, b"x"))
    assert repr(options) == before


def test_fsspec_config_supplies_the_endpoint(s3, tmp_path, monkeypatch):
    """No storage_options: fsspec's own config (as FSSPEC_S3_* env vars would set) is used."""
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "s3", dict(s3.storage_options["s3"]))
    url = put(s3, b"configured elsewhere")
    assert LoraStore(tmp_path / "c").fetch(url).sha256 == sha(b"configured elsewhere")


def test_s3a_alias_uses_s3_options(s3, store):
    url = put(s3, b"alias")
    assert store.fetch(url.replace("s3://", "s3a://")).sha256 == sha(b"alias")


def test_outputs_written_to_a_bucket(s3):
    opts = s3.storage_options
    root = f"s3://outputs/run-{uuid.uuid4().hex}"
    url = write_bytes_atomic("images/job-1.png", b"\x89PNG fake", opts, root=root)
    assert url == f"{root}/images/job-1.png"
    assert s3.fs().cat(url) == b"\x89PNG fake"
    write_bytes_atomic(ensure_under(root, "results.parquet"), b"PAR1" * 1000, opts)
    assert s3.fs().cat(f"{root}/results.parquet") == b"PAR1" * 1000
    with pytest.raises(ValueError):
        write_bytes_atomic("../escape.png", b"x", opts, root=root)


def test_failed_output_upload_writes_nothing(s3, monkeypatch):
    url = f"s3://outputs/{uuid.uuid4().hex}/results.parquet"
    fs, _ = open_filesystem(url, s3.storage_options)  # the instance the writer gets: fsspec caches it

    def cut(path, data, **kwargs):  # the upload dies before the object is complete
        raise RuntimeError("render crashed mid-upload")

    monkeypatch.setattr(fs, "pipe_file", cut)
    with pytest.raises(RuntimeError):
        write_bytes_atomic(url, b"half of it", s3.storage_options)
    assert not s3.fs().exists(url)
