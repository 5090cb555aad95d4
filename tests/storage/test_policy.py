"""The LoRA URI policy on its own (pure: real paths and symlinks, no servers): what a
reference may reach is decided by the operator's roots and protocols, never by the manifest."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from storage.errors import ForbiddenUriError, PermanentFetchError
from storage.policy import (
    DENIED_ROOTS, LORA_HOSTS_ENV, LORA_PROTOCOLS_ENV, LORA_ROOTS_ENV, RedirectGuard, UriPolicy,
    operator_policy, policy_for, roots_in_env,
)


@pytest.fixture
def root(tmp_path, monkeypatch):
    for name in (LORA_ROOTS_ENV, LORA_PROTOCOLS_ENV, LORA_HOSTS_ENV):
        monkeypatch.delenv(name, raising=False)
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "sub" / "a.safetensors").write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    return r


def test_local_paths_only_under_the_roots(root, tmp_path):
    p = UriPolicy.build([str(root)])
    assert p.allows(str(root / "sub" / "a.safetensors"))
    assert p.allows(f"file://{root}/sub/a.safetensors") and p.allows(f"local://{root}/sub/a.safetensors")
    assert p.allows(str(root / "sub" / "not-yet-there.safetensors")), "a missing file is the store's error, not ours"
    outside = str(tmp_path / "outside.safetensors")
    reason = p.refusal(outside)
    assert "not under an allowed LoRA root" in reason and outside in reason and str(root) in reason
    assert not p.allows(f"file://{outside}")
    assert not p.allows(str(root) + "-sibling/x"), "a root is a directory, not a name prefix"
    # what fsspec opens as a local path, whatever the spelling
    assert "resolves to '/etc/passwd'" in p.refusal("file:/etc/passwd")
    assert "resolves to" in p.refusal(f"file:{outside}") and "not under" in p.refusal(f"local:{outside}")
    assert not p.allows("FILE:///etc/passwd")
    assert p.allows(f"file:{root}/sub/a.safetensors")


def test_dotdot_and_symlinks_are_resolved_before_the_check(root, tmp_path):
    p = UriPolicy.build([str(root)])
    escape = f"{root}/sub/../../outside.safetensors"
    assert "resolves to" in p.refusal(escape) and str(tmp_path / "outside.safetensors") in p.refusal(escape)
    os.symlink(tmp_path / "outside.safetensors", root / "link.safetensors")
    os.symlink(tmp_path, root / "dirlink")
    assert not p.allows(str(root / "link.safetensors")), "a symlink out of the root"
    assert not p.allows(str(root / "dirlink" / "outside.safetensors")), "a directory symlink out of the root"
    os.symlink(root / "sub" / "a.safetensors", root / "inside.safetensors")
    assert p.allows(str(root / "inside.safetensors")), "a symlink that stays inside is fine"
    os.symlink("/etc/passwd", root / "passwd.safetensors")
    reason = p.refusal(str(root / "passwd.safetensors"))
    assert "resolves to '/etc/passwd'" in reason and "never readable" in reason


@pytest.mark.parametrize("path", ["/etc/passwd", "/proc/self/environ", "/sys/kernel/notes", "/dev/zero",
                                  "file:///etc/shadow", "/etc"])
def test_system_dirs_are_refused_whatever_the_roots(path):
    p = UriPolicy.build(["/"])  # an operator who allowed everything still cannot reach these
    reason = p.refusal(path)
    assert reason is not None and "never readable as a LoRA" in reason
    assert any(f"under {d}" in reason for d in DENIED_ROOTS)


def test_check_raises_a_permanent_error_naming_the_uri_and_the_rule(root):
    p = UriPolicy.build([str(root)])
    with pytest.raises(ForbiddenUriError) as e:
        p.check("/etc/passwd")
    assert isinstance(e.value, PermanentFetchError) and not e.value.transient
    assert e.value.source == "/etc/passwd" and "under /etc" in str(e.value) and "URI policy" in str(e.value)
    p.check(str(root / "sub" / "a.safetensors"))  # allowed: no error


def test_remote_protocols_default_to_every_remote_one(root):
    p = UriPolicy.build([str(root)])
    for uri in ("s3://bucket/a.safetensors", "gs://b/a", "https://huggingface.co/x/a.safetensors",
                "http://127.0.0.1:9/a", "memory://a", "hf://x/a"):
        assert p.allows(uri), uri
    # these read local disk through options or indirections a root check cannot see
    for uri in ("simplecache::s3://b/a", "filecache::https://h/a", "zip://a.safetensors::s3://b/a.zip",
                "dir://a", "reference://a", "git://a", "tar://a"):
        reason = p.refusal(uri)
        assert reason and "not allowed for LoRAs" in reason and "reads local disk" in reason, uri
    assert "not-a-protocol" not in p.protocols and "file" not in p.protocols


def test_chained_urls_check_every_layer(root):
    p = UriPolicy.build([str(root)], protocols=["s3", "simplecache", "zip"])  # the operator opted in
    assert p.allows("simplecache::s3://b/a")
    assert p.allows(f"zip://a.safetensors::file://{root}/sub/a.zip")
    assert "under /etc" in p.refusal("zip://a::file:///etc/x.zip")
    assert "protocol 'http'" in p.refusal("simplecache::http://h/a")


def test_operator_restricts_protocols_and_hosts_through_the_environment(root):
    env = {LORA_PROTOCOLS_ENV: "https, s3", LORA_HOSTS_ENV: "models.example.com,127.0.0.1:8443,my-bucket"}
    p = operator_policy(str(root), environ=env)
    assert p.allows("https://models.example.com/a") and p.allows("https://models.example.com:444/a")
    assert p.allows("https://127.0.0.1:8443/a") and p.allows("s3://my-bucket/k")
    assert "protocol 'http'" in p.refusal("http://models.example.com/a")
    assert "host '127.0.0.1:8444'" in p.refusal("https://127.0.0.1:8444/a")
    assert "host 'other-bucket'" in p.refusal("s3://other-bucket/k")
    assert "protocol 'gs'" in p.refusal("gs://my-bucket/k")
    assert p.allows(str(root / "sub" / "a.safetensors")), "local roots are unaffected"


def test_roots_come_from_the_manifest_dir_the_env_and_the_caller(root, tmp_path, monkeypatch):
    extra, env_root = tmp_path / "extra", tmp_path / "env"
    p = operator_policy(str(root), [str(extra)], environ={LORA_ROOTS_ENV: f"{env_root}{os.pathsep}"})
    assert set(p.roots) == {str(root), str(extra), str(env_root)}
    assert operator_policy("s3://bucket/manifests", environ={}).roots == (), "a remote manifest's dir is no local root"
    monkeypatch.chdir(root / "sub")
    assert operator_policy(None, environ={}).roots == (str(root / "sub"),), "built in code: the working dir"
    assert policy_for(None).allows("a.safetensors") and not policy_for(None).allows(str(tmp_path / "outside.safetensors"))
    monkeypatch.setenv(LORA_ROOTS_ENV, str(tmp_path))  # the memo sees a changed environment
    assert policy_for(None).allows(str(tmp_path / "outside.safetensors"))


def test_roots_in_env_adds_for_the_block_then_restores(root, tmp_path, monkeypatch):
    monkeypatch.setenv(LORA_ROOTS_ENV, str(root))
    with roots_in_env([str(tmp_path / "more")]):
        assert os.environ[LORA_ROOTS_ENV] == f"{root}{os.pathsep}{tmp_path / 'more'}"
    assert os.environ[LORA_ROOTS_ENV] == str(root)
    monkeypatch.delenv(LORA_ROOTS_ENV)
    with roots_in_env(["x"]):
        assert os.environ[LORA_ROOTS_ENV] == os.path.abspath("x")
    assert LORA_ROOTS_ENV not in os.environ


def test_redirect_rules(root):
    p = UriPolicy.build([str(root)])
    assert p.redirect_refusal("http://a/x", "https://cdn.example.com/x") is None, "to a CDN, upgraded: fine"
    assert "never reaches local files" in p.redirect_refusal("http://a/x", f"file://{root}/sub/a.safetensors")
    assert "never reaches local files" in p.redirect_refusal("http://a/x", "/etc/passwd")
    assert "downgrade" in p.redirect_refusal("https://a/x", "http://a/x")
    assert "never reaches local files" in p.redirect_refusal("http://a/x", "dir://x")
    hosts = UriPolicy.build([], ["http"], ["127.0.0.1:1000"])
    assert "protocol 's3'" in hosts.redirect_refusal("http://127.0.0.1:1000/a", "s3://b/a")
    assert "host '127.0.0.1:1001'" in hosts.redirect_refusal("http://127.0.0.1:1000/a", "http://127.0.0.1:1001/a")


def test_policy_travels_and_keys_stably(root):
    p = UriPolicy.build([str(root)])
    assert pickle.loads(pickle.dumps(p)) == p, "it travels to Ray workers"
    user = {"http": {"headers": {"X-Token": "t"}}, "s3": {"anon": True}}
    guarded = p.guard(user)
    assert user == {"http": {"headers": {"X-Token": "t"}}, "s3": {"anon": True}}, "the caller's dict is untouched"
    assert guarded["s3"] == {"anon": True}
    for proto in ("http", "https"):  # the user's http options still apply to https URLs
        assert guarded[proto]["headers"] == {"X-Token": "t"} and isinstance(guarded[proto]["get_client"], RedirectGuard)
    # options are part of the store's index key (hashed by their str): the same in every process
    assert json.dumps(guarded, sort_keys=True, default=str) == json.dumps(p.guard(user), sort_keys=True, default=str)
    assert "0x" not in json.dumps(guarded, default=str)
    # ... and another for another policy: fsspec caches filesystem instances by that same str
    assert str(UriPolicy.build([]).guard({})["http"]) != str(guarded["http"])
