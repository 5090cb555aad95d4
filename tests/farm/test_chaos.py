"""Kill a worker process mid-run: every job completes exactly once, no duplicate or missing image."""
from __future__ import annotations

import os

import ray

from farm.cluster import make_workers
from farm.dispatcher import Dispatcher
from farm.scheduler import AffinityScheduler
from jobs.manifest import validate_manifest
from jobs.options import FarmOptions


def test_killed_worker_jobs_complete_exactly_once(ray_cluster, tmp_path):
    out = str(tmp_path / "out")
    m = validate_manifest({"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64},
                           "output": out, "jobs": [{"prompt": f"p{i}", "seed": i} for i in range(10)]})
    handles = make_workers(2, m.model, worker_options={"options": FarmOptions(max_batch=1)})
    named = {"w0": handles[0], "w1": handles[1]}
    rows, killed = [], []

    def chaos(d):
        if d.stats.ok >= 2 and not killed:
            # kill a worker that has work in flight: its process dies mid-render
            victim = next(iter(d.in_flight()))
            ray.kill(named[victim], no_restart=False)
            killed.append(victim)

    d = Dispatcher(named, AffinityScheduler(), out, retries=3, capacity=2, on_rows=rows.extend, progress=chaos,
                   max_batch=1)
    stats = d.run(m.jobs)
    assert killed, "the chaos hook never fired"
    ids = [r.job_id for r in rows]
    assert sorted(ids) == sorted(j.job_id for j in m.jobs), "every job exactly once"
    assert all(r.status == "ok" for r in rows), [r.error for r in rows if r.status != "ok"]
    assert stats.retried >= 1, "the killed worker's jobs were retried elsewhere"
    images = sorted(os.listdir(os.path.join(out, "images")))
    assert images == sorted(f"{j.job_id}.png" for j in m.jobs)
    assert not [f for f in os.listdir(os.path.join(out, "images")) if not f.endswith(".png")], "no temp files left"
    for h in handles:
        ray.kill(h)
