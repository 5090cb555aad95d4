"""The worker enforces the LoRA URI policy at fetch time too: jobs built by hand (never
validated) that point at /etc/passwd, outside the roots, or through a symlink out, fail
their own jobs with ``ForbiddenUriError`` naming the file; the other jobs render; and a
non-LoRA file under an allowed root fails without any of its bytes in the error."""
from __future__ import annotations

import os

import pytest

from jobs.manifest import Job, LoraRef
from storage.policy import LORA_ROOTS_ENV, UriPolicy
from testsupport import lora as T
from workers.worker import RenderWorker

SECRET = b"DB_PASSWORD=hunter2-Zq81\nAWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG\n"


def job(job_id: str, *uris: str) -> Job:
    return Job(job_id=job_id, prompt=f"a {job_id}", seed=1, loras=tuple(LoraRef(u) for u in uris),
               steps=2, width=64, height=64, guidance=1.0)


@pytest.fixture
def files(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    layers = T.random_layers({"transformer_blocks.0.attn.to_q": (128, 128)}, rank=2, seed=1)
    good = T.write_safetensors(root / "good.safetensors", T.peft_state_dict(layers))
    away = T.write_safetensors(outside / "away.safetensors", T.peft_state_dict(layers))
    os.symlink(away, root / "link.safetensors")
    (root / "dotenv.safetensors").write_bytes(SECRET)  # not a LoRA, under an allowed root
    return root, {"good": good, "away": away, "link": str(root / "link.safetensors"),
                  "secret": str(root / "dotenv.safetensors")}


def test_hand_built_jobs_are_checked_at_fetch_time(files, tmp_path):
    root, f = files
    jobs = [job("passwd", "/etc/passwd"), job("proc", "file:///proc/self/environ"), job("away", f["away"]),
            job("link", f["link"]), job("escape", f"{root}/../outside/away.safetensors"),
            job("ok-lora", f["good"]), job("ok-base"), job("mixed", f["good"], "/etc/shadow")]
    w = RenderWorker(cache_dir=str(tmp_path / "cache"), num_threads=1, uri_policy=UriPolicy.build([str(root)]))
    rows = {r.job_id: r for r in w.render(jobs, str(tmp_path / "out"))}
    assert set(rows) == {j.job_id for j in jobs}, "one row per job"
    for jid, named in [("passwd", "/etc/passwd"), ("proc", "/proc/self/environ"), ("away", f["away"]),
                       ("link", f["link"]), ("escape", "outside/away.safetensors"), ("mixed", "/etc/shadow")]:
        r = rows[jid]
        assert r.status == "failed" and not r.transient, (jid, r.error)
        assert r.error.startswith("ForbiddenUriError") and named in r.error and "URI policy" in r.error, r.error
    assert "resolves to" in rows["link"].error and f["away"] in rows["link"].error
    for jid in ("ok-lora", "ok-base"):
        assert rows[jid].status == "ok", rows[jid].error
        assert os.path.getsize(rows[jid].output_uri) > 0
    assert not os.path.exists(tmp_path / "out" / "images" / "passwd.png")
    assert w.state()["store"]["downloads"] == 0 and w.jobs_failed == 6 and w.jobs_done == 2


def test_default_worker_policy_comes_from_the_operator_env(files, tmp_path, monkeypatch):
    root, f = files
    monkeypatch.setenv(LORA_ROOTS_ENV, str(root))
    w = RenderWorker(cache_dir=str(tmp_path / "cache"), num_threads=1)  # no policy passed: the env's
    rows = {r.job_id: r for r in w.render([job("ok", f["good"]), job("away", f["away"]), job("passwd", "/etc/passwd")],
                                          str(tmp_path / "out"))}
    assert rows["ok"].status == "ok", rows["ok"].error
    assert rows["away"].error.startswith("ForbiddenUriError") and rows["passwd"].error.startswith("ForbiddenUriError")


def test_a_non_lora_file_never_echoes_its_bytes(files, tmp_path):
    root, f = files
    w = RenderWorker(cache_dir=str(tmp_path / "cache"), num_threads=1, uri_policy=UriPolicy.build([str(root)]))
    (row,) = w.render([job("secret", f["secret"])], str(tmp_path / "out"))
    assert row.status == "failed" and row.error.startswith("CorruptFileError") and f["secret"] in row.error
    text = row.error
    assert "hunter2" not in text and "wJalr" not in text and "DB_PASS" not in text
    for i in range(len(SECRET) - 5):  # no 6-byte run of the file, in any form the message could take
        window = SECRET[i : i + 6]
        assert window.decode() not in text and window.hex() not in text
    assert str(int.from_bytes(SECRET[:8], "little")) not in text, "not even decoded as a header length"


def test_a_corrupt_remote_lora_names_its_uri_not_the_cache_blob(files, tmp_path):
    """A remote LoRA is read from its cache blob (``.../blobs/<sha256>``); main before: its error named
    that blob, which tells the user nothing. Now its URI; the other jobs render."""
    import fsspec

    root, f = files
    mem = fsspec.filesystem("memory")
    uri = "memory://fix14-worker/corrupt.safetensors"
    mem.pipe("/fix14-worker/corrupt.safetensors", SECRET)  # not a LoRA, fetched like any remote file
    try:
        w = RenderWorker({"backend": "tiny", "seed": 0}, cache_dir=str(tmp_path / "cache"), num_threads=1,
                         uri_policy=UriPolicy.build([str(root)]))  # seeded random weights: any tiny model will do
        rows = {r.job_id: r for r in w.render([job("bad", uri), job("ok", f["good"]), job("base")],
                                              str(tmp_path / "out"))}
    finally:
        mem.rm("/fix14-worker", recursive=True)
    bad = rows["bad"]
    assert bad.status == "failed" and not bad.transient, bad.error
    assert bad.error.startswith("CorruptFileError") and f"file '{uri}'" in bad.error, bad.error
    assert "blobs" not in bad.error and str(tmp_path / "cache") not in bad.error, bad.error
    assert "hunter2" not in bad.error  # and still none of its bytes
    assert rows["ok"].status == "ok" and rows["base"].status == "ok", (rows["ok"].error, rows["base"].error)
    assert w.state()["store"]["downloads"] == 1  # it was fetched: the error came from reading the blob
