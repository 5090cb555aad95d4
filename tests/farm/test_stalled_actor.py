"""On real Ray: a worker actor whose call is stalled on a trickling download still renders the
next call it is sent (a threaded actor; the model lock covers compose and render only)."""
from __future__ import annotations

import time

import pytest

from jobs.manifest import validate_manifest
from jobs.options import FarmOptions
from testsupport import lora as T

try:  # `python -m pytest` from the repo root
    from tests.storage.servers import FaultyHTTPServer
except ImportError:  # bare `pytest`
    from servers import FaultyHTTPServer  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(180)


def test_an_actor_stalled_on_one_download_renders_its_next_call(ray_cluster, tmp_path):
    import ray

    from farm.cluster import make_workers
    from storage.policy import operator_policy

    lora = T.random_layers({"transformer_blocks.0.attn.to_q": (128, 128)}, rank=2, seed=1)
    good = T.write_safetensors(tmp_path / "good.safetensors", T.peft_state_dict(lora))

    def jobs(uri: str, out: str):
        return validate_manifest({"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64},
                                  "output": out, "jobs": [{"prompt": "x", "loras": [{"uri": uri}]}]},
                                 base_dir=str(tmp_path)).jobs

    [worker] = make_workers(1, {"backend": "tiny"}, worker_options={
        "options": FarmOptions(lora_mode="lowrank"), "cache_dir": str(tmp_path / "cache"),
        "uri_policy": operator_policy(str(tmp_path))})
    try:
        good_jobs = jobs(good, str(tmp_path / "out"))
        assert ray.get(worker.render.remote(good_jobs, str(tmp_path / "warm")))[0].status == "ok"  # model built
        with FaultyHTTPServer() as server:
            stalled = server.add("/stalled.safetensors", b"x" * 100_000, trickle_s=0.5)
            slow = worker.render.remote(jobs(stalled, str(tmp_path / "s")), str(tmp_path / "s"))
            deadline = time.time() + 10
            while server.gets("/stalled.safetensors") == 0 and time.time() < deadline:
                time.sleep(0.02)
            assert server.gets("/stalled.safetensors") == 1  # the first call is fetching
            t0 = time.perf_counter()
            rows = ray.get(worker.render.remote(good_jobs, str(tmp_path / "out")), timeout=20)
            assert rows[0].status == "ok", rows[0].error
            ready, _ = ray.wait([slow], timeout=0)
            assert not ready and time.perf_counter() - t0 < 10  # rendered while the other call still trickles
    finally:
        ray.kill(worker)
