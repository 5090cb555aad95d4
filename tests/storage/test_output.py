"""Output helpers on local disk and memory://: the root guard and all-or-nothing writes."""
from __future__ import annotations

import os
import stat
import uuid

import fsspec
import pytest

from storage.localfs import atomic_local_file
from storage.output import ensure_under, write_bytes_atomic

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "root, path, expected",
    [
        ("s3://bucket/out", "images/a.png", "s3://bucket/out/images/a.png"),
        ("s3://bucket/out/", "./images/../b.png", "s3://bucket/out/b.png"),
        ("s3://bucket/out", "s3://bucket/out/c.png", "s3://bucket/out/c.png"),
        ("file:///tmp/out", "x/y.png", "file:///tmp/out/x/y.png"),
        ("/tmp/out", "/tmp/out/z.png", "/tmp/out/z.png"),
        ("out", "a.png", "out/a.png"),
    ],
)
def test_ensure_under_joins(root, path, expected):
    assert ensure_under(root, path) == expected


@pytest.mark.parametrize(
    "root, path",
    [
        ("s3://bucket/out", "../x.png"),
        ("s3://bucket/out", "images/../../x.png"),
        ("s3://bucket/out", "/etc/passwd"),
        ("s3://bucket/out", "s3://bucket/outside/x.png"),
        ("s3://bucket/out", "s3://bucket/out-other/x.png"),
        ("s3://bucket/out", "gs://bucket/out/x.png"),
        ("s3://bucket/out", "."),
        ("s3://bucket/out", ""),
        ("out", "../x.png"),
        ("/tmp/out", "/tmp/outer/x.png"),
    ],
)
def test_ensure_under_refuses_escapes(root, path):
    with pytest.raises(ValueError):
        ensure_under(root, path)


def test_local_write_is_atomic_and_leaves_no_temp(tmp_path):
    url = write_bytes_atomic("images/a.png", b"png", root=str(tmp_path))
    assert url == str(tmp_path / "images" / "a.png") and open(url, "rb").read() == b"png"
    write_bytes_atomic(url, b"png v2")
    assert open(url, "rb").read() == b"png v2"
    assert os.listdir(tmp_path / "images") == ["a.png"]


def test_local_write_commits_only_on_success(tmp_path, monkeypatch):
    target = tmp_path / "results.parquet"
    write_bytes_atomic(str(target), b"complete")

    def crash(fd: int) -> None:  # the bytes are written, not yet durable: the crash point
        raise RuntimeError("crash mid-write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(RuntimeError):
        write_bytes_atomic(str(target), b"partial")
    assert target.read_bytes() == b"complete"
    assert os.listdir(tmp_path) == ["results.parquet"]


def test_atomic_local_file_mode_is_exact_from_the_start(tmp_path):
    target = tmp_path / "local.json"
    old = os.umask(0)  # the open alone would give 0666
    try:
        with atomic_local_file(str(target), mode=0o600) as f:
            temps = [p for p in os.listdir(tmp_path) if p != "local.json"]
            assert len(temps) == 1 and stat.S_IMODE(os.stat(tmp_path / temps[0]).st_mode) == 0o600
            f.write(b"{}")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"{}" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["local.json"]


def test_atomic_local_file_through_a_given_temp_cleans_up(tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    target = tmp_path / "index" / "k.json"
    with atomic_local_file(str(target), tmp=str(tmp_path / "tmp" / f"{os.getpid()}-a.json")) as f:
        assert os.listdir(tmp_path / "tmp") == [f"{os.getpid()}-a.json"]
        f.write(b"one")
    assert target.read_bytes() == b"one" and os.listdir(tmp_path / "tmp") == []

    def crash(fd: int) -> None:
        raise RuntimeError("crash mid-write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(RuntimeError):
        with atomic_local_file(str(target), tmp=str(tmp_path / "tmp" / f"{os.getpid()}-b.json")) as f:
            f.write(b"two")
    assert target.read_bytes() == b"one" and os.listdir(tmp_path / "tmp") == []


def test_memory_outputs():
    mem = fsspec.filesystem("memory")
    root = f"memory://out-{uuid.uuid4().hex}"
    url = write_bytes_atomic("a/b.bin", b"abc", root=root)
    assert mem.cat(url) == b"abc"
    write_bytes_atomic("c.bin", b"xyz", root=root)
    assert mem.cat(f"{root}/c.bin") == b"xyz"
