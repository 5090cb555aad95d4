"""Fair share on the real farm: two submitters, weights 1:1, submit at once; their shares of
rendering worker-seconds while both have queued work, measured from the result rows.

Command: ``python -m benchmarks.service_fair [--json] [--write-results]``

The farm: the service's controller (``farm/service``) on a local Ray cluster (loopback, one
logical GPU per worker), one pool of ``workers`` sleep-backend workers (a render sleeps R
per image, a switch C; the farm's real fetch, bind and merge of PEFT files run too), with
``fair_share`` on and then off, on the same workload, one after the other in one run.

The workload: alice submits one run of 2 compositions x 40 jobs (64 px, 2 steps), bob right
after one run of 2 x 24, every composition distinct; R = 0.2 s, C = 0.4 s, 2 workers.
Alice's compositions have more work each, so the affinity rules alone (longest to clear
first) give every worker to alice and bob waits: the measure below can tell the two apart.

The measure (``farm.scheduler.sim_fair.fair_shares`` on a trace built from the rows): a
row's rendering is ``[finished_at - render_s, finished_at]`` (``render_s`` is its share of
its batch's render); a submitter's work is queued from the later of the two submits until
its last job began rendering (an upper bound on when that job left the queue: by at most
the jobs in flight on its worker). Inside that window each submitter's rendering seconds
against its weight share: ``deviation = (share - target) / target``; the issue's target is
|deviation| <= 15% with fair share on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Sequence

from benchmarks.common import machine, replace_section

TITLE = "Fair share on the farm"
TARGET = 0.15
TIMEOUT_S = 300.0
POLL_S = 0.05


# ---- the measure (pure) ----------------------------------------------------------------------
def rows_trace(rows: Sequence[Any], submitter_of: dict[str, str], queued_from: float) -> list[tuple]:
    """A ``sim_fair`` trace from result rows: per ok row (a ``QueuedJob`` of its run's submitter,
    queued at ``queued_from``; assigned and started when it began rendering; its render)."""
    from farm.scheduler.types import QueuedJob

    trace = []
    for r in rows:
        if r.status != "ok":
            continue
        run = r.job_id.split("/", 1)[0]
        begin = r.finished_at - r.render_s
        job = QueuedJob(r.job_id, r.composition_key, run=run, submitter=submitter_of[run], enqueued_at=queued_from)
        trace.append((job, begin, begin, begin, r.finished_at))
    return trace


def shares(rows_by_run: dict[str, Sequence[Any]], submitter_of: dict[str, str], queued_from: float,
           weights: dict[str, float] | None = None) -> dict:
    """``fair_shares`` of the runs' rows (job ids made unique per run)."""
    from dataclasses import replace

    from farm.scheduler.sim_fair import fair_shares

    rows = [replace(r, job_id=f"{run}/{r.job_id}") for run, rs in rows_by_run.items() for r in rs]
    return fair_shares(rows_trace(rows, submitter_of, queued_from), weights)


# ---- the workload --------------------------------------------------------------------------
def manifests(files: Sequence[str], out_root: str, model: dict, *, alice: tuple[int, int],
              bob: tuple[int, int]) -> dict[str, Any]:
    """{submitter: its Manifest}: ``(compositions, jobs each)`` per submitter, every composition distinct."""
    from benchmarks.service import compositions_of
    from jobs.manifest import Job, LoraRef, Manifest

    comps = compositions_of(files, alice[0] + bob[0])
    out, first = {}, 0
    for who, (n_comps, per) in (("alice", alice), ("bob", bob)):
        mine = comps[first:first + n_comps]
        first += n_comps
        jobs = tuple(Job(f"{who}-c{c}-{j}", f"{who} prompt {c} {j}", 100 * c + j,
                         tuple(LoraRef(u, s) for u, s in mine[c]), 2, 64, 64, 1.0)
                     for c in range(n_comps) for j in range(per))
        out[who] = Manifest(model=dict(model), output=os.path.join(out_root, who), storage_options={}, jobs=jobs)
    return out


def measure(fair: bool, *, workers: int = 2, render_s: float = 0.2, compose_s: float = 0.4,
            alice: tuple[int, int] = (2, 40), bob: tuple[int, int] = (2, 24), tmp: str | None = None) -> dict:
    """One farm (``fair_share=fair``) up on the running Ray cluster, both runs submitted back to
    back, followed to done, taken down; the shares and what each run did."""
    import ray

    from benchmarks.farm_overhead import write_loras
    from benchmarks.service import WarmFarm, sleep_pool
    from jobs.results import read_results
    from testsupport.sleep import make_sleep_backend

    own = tmp is None
    tmp = tmp or tempfile.mkdtemp(prefix="bench-fair-")
    tag = "fair" if fair else "affinity"
    files = write_loras(os.path.join(tmp, "loras"), alice[0] + bob[0] + 1, seed=11)
    model = {"backend": "sleep", "render_s": render_s, "compose_s": compose_s}
    ms = manifests(files, os.path.join(tmp, f"out-{tag}"), model, alice=alice, bob=bob)
    pool = sleep_pool(f"fair{int(fair)}", model, workers, os.path.join(tmp, f"cache-{tag}"))
    weights = {"alice": 1.0, "bob": 1.0}
    farm = WarmFarm.up(pool, os.path.join(tmp, f"state-{tag}"), [os.path.dirname(files[0])], make_sleep_backend,
                       submitters=weights, fair_share=fair)
    try:
        run_of, t_sub = {}, 0.0
        for who, m in ms.items():
            run_of[who] = ray.get(farm.handle.submit.remote(m, None, who, 0))["run_id"]
            t_sub = time.time()
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            states = {who: ray.get(farm.handle.status.remote(rid)) for who, rid in run_of.items()}
            if all(s["state"] in ("done", "failed", "cancelled") for s in states.values()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"runs not done after {TIMEOUT_S:.0f} s: {states}")
            time.sleep(POLL_S)
    finally:
        farm.down()
    rows = {who: read_results(m.output) for who, m in ms.items()}
    bad = {who: s["state"] for who, s in states.items() if s["state"] != "done" or s["ok"] != len(ms[who].jobs)}
    if bad:
        raise RuntimeError(f"fair-share benchmark: runs not all done ok: {bad}")
    out = shares(rows, {who: who for who in ms}, t_sub, weights)
    out.update(fair=fair, workers=workers, render_s=render_s, compose_s=compose_s,
               jobs={who: len(m.jobs) for who, m in ms.items()},
               last_image_s={who: max(r.finished_at for r in rs) - t_sub for who, rs in rows.items()},
               compose_events={who: len({(r.worker_id, r.composition_key, r.compose_s) for r in rs if r.compose_s > 0})
                               for who, rs in rows.items()})
    if own:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run(workers: int = 2) -> dict:
    from benchmarks.service import start_ray

    started, _ = start_ray(workers)
    try:
        return {"machine": machine(), "workers": workers,
                "runs": [measure(True, workers=workers), measure(False, workers=workers)]}
    finally:
        if started:
            import ray

            ray.shutdown()


def table(result: dict, command: str) -> str:
    lines = [f"Command: `{command}`  ", f"Machine: {result['machine']}", "",
             "Workload: " + __doc__.split("The workload: ", 1)[1].split("\n\n", 1)[0].replace("\n", " "), "",
             "Measure: " + __doc__.split("The measure ", 1)[1].split("\n\n", 1)[0].replace("\n", " "), "",
             "| fair_share | window (s) | alice share | bob share | worst deviation | within ±15% | "
             "alice last image (s) | bob last image (s) | compositions alice / bob |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        sub = r["submitters"]
        worst = r["worst"]
        lines.append(f"| {'on' if r['fair'] else 'off'} | {r['window_s']:.2f} | {sub['alice']['share']:.3f} | "
                     f"{sub['bob']['share']:.3f} | {worst:.3f} | {'yes' if worst <= TARGET else '**no**'} | "
                     f"{r['last_image_s']['alice']:.2f} | {r['last_image_s']['bob']:.2f} | "
                     f"{r['compose_events']['alice']} / {r['compose_events']['bob']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--write-results", action="store_true", help="rewrite this section of benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    result = run(a.workers)
    command = "python -m benchmarks.service_fair" + (f" --workers {a.workers}" if a.workers != 2 else "")
    text = table(result, command)
    print(json.dumps(result, indent=1, default=str) if a.json else text)
    if a.write_results:
        replace_section(TITLE, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
