"""A stalled download does not hold the worker's other jobs (the tiny backend, a real HTTP server).

Under Ray an actor runs one method at a time: a ``prefetch`` that waited for a trickling
server held every ``render`` queued behind it. Here the prefetch of a trickling URL must
return at once, a render of an unrelated LoRA must finish while that download still
trickles, and the stalled download must end with the rate floor, not hang.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from jobs.manifest import validate_manifest
from jobs.options import FarmOptions
from testsupport import lora as T

try:  # `python -m pytest` from the repo root
    from tests.storage.servers import FaultyHTTPServer
except ImportError:  # bare `pytest`: only this folder is on sys.path
    from servers import FaultyHTTPServer  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(120)


def test_prefetch_of_a_stalled_url_does_not_block_a_render(tmp_path, monkeypatch):
    from workers.worker import RenderWorker

    lora = T.random_layers({"transformer_blocks.0.attn.to_q": (128, 128)}, rank=2, seed=1)
    good = T.write_safetensors(tmp_path / "good.safetensors", T.peft_state_dict(lora))
    man = validate_manifest({"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64},
                             "output": str(tmp_path / "out"), "jobs": [{"prompt": "x", "loras": [{"uri": good}]}]},
                            base_dir=str(tmp_path))
    worker = RenderWorker(options=FarmOptions(lora_mode="lowrank"), cache_dir=str(tmp_path / "cache"), num_threads=1)
    worker.render(man.jobs, str(tmp_path / "warm"))  # build the model first: what is timed below is the fetch path
    # a 4 s window at the default floor: the trickle outlives the render by far, then ends
    worker.store.rate_window_s = 4.0
    worker.store.retries = 0
    with FaultyHTTPServer() as server:
        stalled = server.add("/stalled.safetensors", b"x" * 100_000, trickle_s=0.25)
        ref = SimpleNamespace(uri=stalled, sha256=None, strength=1.0)
        t0 = time.perf_counter()
        assert worker.prefetch([ref]) == 1
        assert time.perf_counter() - t0 < 0.5  # queued, not waited for
        deadline = time.time() + 5
        while server.gets("/stalled.safetensors") == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert server.gets("/stalled.safetensors") == 1  # the stalled download is under way
        t0 = time.perf_counter()
        rows = worker.render(man.jobs, str(tmp_path / "out"))
        render_s = time.perf_counter() - t0
        assert rows[0].status == "ok", rows[0].error
        assert render_s < 3, render_s
        still = worker.store.stats()
        assert still["errors"] == 0  # the stalled one has not ended yet: the render did not wait for it
        deadline = time.time() + 15
        while worker.store.stats()["errors"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert worker.store.stats()["errors"] == 1  # ended by the rate floor (16 KiB/s against 4 B/s), not hung
    assert worker.render(man.jobs, str(tmp_path / "again"))[0].status == "ok"  # the worker carries on


def test_a_render_stalled_on_its_own_download_does_not_hold_another_render(tmp_path):
    """Two calls at once, as a threaded actor runs them: the one whose LoRA trickles waits for
    it outside the model lock; the other composes and renders meanwhile."""
    import threading

    from workers.worker import RenderWorker

    lora = T.random_layers({"transformer_blocks.0.attn.to_q": (128, 128)}, rank=2, seed=1)
    good = T.write_safetensors(tmp_path / "good.safetensors", T.peft_state_dict(lora))
    worker = RenderWorker(options=FarmOptions(lora_mode="lowrank"), cache_dir=str(tmp_path / "cache"), num_threads=1)

    def jobs(uri: str, out: str):
        return validate_manifest({"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64},
                                  "output": out, "jobs": [{"prompt": "x", "loras": [{"uri": uri}]}]},
                                 base_dir=str(tmp_path)).jobs

    good_jobs = jobs(good, str(tmp_path / "out"))
    worker.render(good_jobs, str(tmp_path / "warm"))  # the model is built: what is timed is fetch vs render
    worker.store.rate_window_s = 4.0
    worker.store.retries = 0
    with FaultyHTTPServer() as server:
        stalled = server.add("/stalled.safetensors", b"x" * 100_000, trickle_s=0.25)
        stalled_rows: list = []
        slow = threading.Thread(target=lambda: stalled_rows.extend(worker.render(jobs(stalled, str(tmp_path / "s")),
                                                                                 str(tmp_path / "s"))))
        slow.start()
        deadline = time.time() + 5
        while server.gets("/stalled.safetensors") == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert server.gets("/stalled.safetensors") == 1  # the stalled call is fetching
        t0 = time.perf_counter()
        rows = worker.render(good_jobs, str(tmp_path / "out"))
        assert rows[0].status == "ok", rows[0].error
        assert time.perf_counter() - t0 < 3 and slow.is_alive()  # rendered while the other still waits
        slow.join(20)
        assert not slow.is_alive()
    assert [r.status for r in stalled_rows] == ["failed"] and "SlowTransferError" in stalled_rows[0].error
    assert worker.jobs_done == 2 and worker.jobs_failed == 1
