"""lora_core takes its fetcher from the caller: a store, a plain ``uri -> path`` callable, or,
with none, storage's default store. Local paths never reach a fetcher."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass

import fsspec
import pytest

import lora_core
from lora_core.adapter import local_file
from testsupport import lora as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = {"blocks.0.proj": (8, 6)}


def sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def lora_file(tmp_path) -> str:
    sd = T.peft_state_dict(T.random_layers(SHAPES, rank=2, seed=3), prefix="transformer.")
    return T.write_safetensors(tmp_path / "a.safetensors", sd)


@dataclass
class Fetched:
    path: str
    sha256: str


class FakeStore:
    """Serves every URL from one local file and reports a sha256 of its own choosing, so a
    test can tell the store's sha from one computed by hashing the file."""

    def __init__(self, path: str, sha256: str) -> None:
        self.path, self.sha256, self.asked = path, sha256, []

    def fetch(self, uri: str) -> Fetched:
        self.asked.append(uri)
        return Fetched(self.path, self.sha256)


def test_a_callable_fetcher_gets_the_url(lora_file):
    asked = []

    def fetch(uri: str) -> str:
        asked.append(uri)
        return lora_file

    url = "s3://bucket/a.safetensors"
    adapter = lora_core.load_adapter(url, fetch=fetch)
    assert set(adapter.layers) == set(SHAPES) and adapter.content_id == sha(lora_file)
    assert lora_core.content_id(url, fetch=fetch) == sha(lora_file)  # hashed: a callable knows no sha
    assert asked == [url, url]


def test_a_store_fetcher_supplies_the_content_id(lora_file):
    store = FakeStore(lora_file, "f" * 64)
    url = "https://host/a.safetensors"
    assert lora_core.content_id(url, fetch=store) == "f" * 64  # the store's, not re-hashed
    assert lora_core.composition_key([(url, 1.0)], fetch=store) == lora_core.key_of_ids([("f" * 64, 1.0)])
    assert lora_core.load_adapter(url, fetch=store).content_id == sha(lora_file)
    assert store.asked == [url] * 3


def test_local_sources_never_reach_the_fetcher(lora_file):
    def fetch(uri: str) -> str:
        raise AssertionError(f"fetched {uri}")

    assert lora_core.content_id(lora_file, fetch=fetch) == sha(lora_file)
    assert lora_core.load_adapter("file://" + lora_file, fetch=fetch).content_id == sha(lora_file)
    assert local_file("file:///x/y.safetensors", fetch) == ("/x/y.safetensors", None)


def test_without_a_fetcher_urls_use_the_default_store(lora_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_FARM_CACHE", str(tmp_path / "cache"))
    url = f"memory://fetcher-{uuid.uuid4().hex}/a.safetensors"
    with open(lora_file, "rb") as f:
        fsspec.filesystem("memory").pipe(url, f.read())
    assert lora_core.content_id(url) == sha(lora_file)
    path = lora_core.load_adapter(url).source
    assert path.startswith(str(tmp_path / "cache")) and os.path.isfile(path)


def test_an_injected_fetcher_needs_no_fsspec(lora_file, tmp_path):
    """With its own fetcher, lora_core loads a remote LoRA without importing storage or fsspec."""
    copy = str(tmp_path / "copy.safetensors")
    shutil.copy(lora_file, copy)
    code = (
        "import sys, lora_core; "
        f"a = lora_core.load_adapter('custom://x/a.safetensors', fetch=lambda uri: {copy!r}); "
        "print(len(a.layers), ','.join(m for m in ('fsspec', 'storage.store') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]
