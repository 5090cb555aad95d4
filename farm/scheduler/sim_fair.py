"""Workloads with several submitters and runs arriving over time, and what to measure on them.

Workloads (``QueuedJob`` s with ``run`` and ``submitter`` set; ``enqueued_at`` is the run's
arrival, every job of a run arrives with it):

* ``make_runs_workload``: runs arriving as a Poisson process, each from a submitter
  drawn uniformly, of a mixed size (log-uniform), over a few compositions drawn from
  one Zipf(alpha) popularity shared by every run and submitter;
* ``make_behind_workload``: one large run, then a small one (``small`` jobs) submitted
  behind it, by another submitter or as another run of the same one; ``alone`` is that
  small run by itself, to time it on an idle farm.

Measures, from a ``SimResult.trace`` (per job: assigned, started, rendering began, finished):

* ``fair_shares``: while every submitter has queued work (arrived, not yet assigned to a
  worker: in the farm's queue), each
  one's share of the worker-seconds of rendering against its weight share;
* ``run_latency``: per run, from its arrival to its last job's end.
"""
from __future__ import annotations

import bisect
import math
import random
from collections import Counter
from typing import Mapping, Sequence

from .types import QueuedJob

Trace = Sequence[tuple[QueuedJob, float, float, float, float]]


def _compositions(n: int, rng: random.Random) -> list[tuple[str, tuple[str, ...]]]:
    pool = [f"s3://loras/l{i:04d}.safetensors" for i in range(max(3, n // 2))]
    return [(f"c{c:05d}", tuple(sorted(rng.sample(pool, rng.randint(1, 3))))) for c in range(n)]


def make_runs_workload(
    n_jobs: int, n_compositions: int, alpha: float, seed: int, *, submitters: Sequence[str] = ("a", "b"),
    span_s: float, run_jobs: tuple[int, int] = (5, 200), run_compositions: tuple[int, int] = (1, 6),
    mix: Sequence[float] | None = None,
) -> list[QueuedJob]:
    """About ``n_jobs`` jobs in runs arriving as a Poisson process over about ``span_s``
    seconds (the first at 0). A run has ``run_jobs`` jobs (log-uniform) over
    ``run_compositions`` compositions (uniform count), each drawn from the shared
    Zipf(alpha) popularity; its jobs pick among them uniformly. Each run's submitter is
    drawn with the odds ``mix`` (default: even)."""
    if not submitters:
        raise ValueError("make_runs_workload needs at least one submitter")
    rng = random.Random(seed)
    comps = _compositions(n_compositions, rng)
    weights = [1.0 / (rank + 1) ** alpha for rank in range(n_compositions)]
    order = list(range(n_compositions))
    rng.shuffle(order)  # popularity rank unrelated to the name
    sizes: list[int] = []
    lo, hi = math.log(run_jobs[0]), math.log(run_jobs[1])
    while sum(sizes) < n_jobs:
        sizes.append(min(n_jobs - sum(sizes), round(math.exp(rng.uniform(lo, hi)))))
    gap = span_s / max(1, len(sizes) - 1)
    jobs, t = [], 0.0
    for r, size in enumerate(sizes):
        who = rng.choices(list(submitters), weights=mix)[0] if mix else rng.choice(list(submitters))
        k = min(n_compositions, rng.randint(*run_compositions))
        mine = list(dict.fromkeys(rng.choices(order, weights=weights, k=4 * k)))[:k]
        for i in range(size):
            key, loras = comps[rng.choice(mine)]
            jobs.append(QueuedJob(f"r{r:04d}-j{i:04d}", key, loras, 0, t, 1.0, run=f"r{r:04d}", submitter=who))
        t += rng.expovariate(1.0 / gap) if gap > 0 else 0.0
    return jobs


def make_behind_workload(
    n_jobs: int, n_compositions: int, alpha: float, seed: int, *, small: int, at_s: float,
    same_submitter: bool = False, small_compositions: int = 2,
) -> tuple[list[QueuedJob], list[QueuedJob]]:
    """(the whole workload, the small run alone at t=0): a large run of ``n_jobs`` Zipf jobs
    at t=0 (submitter ``a``, run ``large``) and a small run of ``small`` jobs over
    ``small_compositions`` compositions at ``at_s`` (submitter ``a`` or ``b``, run ``small``)."""
    rng = random.Random(seed)
    comps = _compositions(n_compositions + small_compositions, rng)
    weights = [1.0 / (rank + 1) ** alpha for rank in range(n_compositions)]
    large = [QueuedJob(f"large-{i:05d}", *comps[c], 0, 0.0, 1.0, run="large", submitter="a")
             for i, c in enumerate(rng.choices(range(n_compositions), weights=weights, k=n_jobs))]
    who = "a" if same_submitter else "b"
    mine = [comps[n_compositions + i] for i in range(small_compositions)]
    late = [QueuedJob(f"small-{i:04d}", *mine[i % len(mine)], 0, at_s, 1.0, run="small", submitter=who)
            for i in range(small)]
    alone = [QueuedJob(j.job_id, j.routing_key, j.loras, 0, 0.0, 1.0, run="small", submitter=who) for j in late]
    return large + late, alone


def run_latency(trace: Trace) -> dict[str, float]:
    """Per run, seconds from its arrival (its first job's ``enqueued_at``) to its last job's end."""
    arrived: dict[str, float] = {}
    ended: dict[str, float] = {}
    for job, _, _, _, end in trace:
        arrived[job.run] = min(arrived.get(job.run, math.inf), job.enqueued_at)
        ended[job.run] = max(ended.get(job.run, -math.inf), end)
    return {run: ended[run] - arrived[run] for run in ended}


def busy_windows(trace: Trace) -> list[tuple[float, float]]:
    """The intervals during which every submitter of the trace has a job arrived and not yet assigned."""
    events: list[tuple[float, int, str]] = []
    for job, assigned, _, _, _ in trace:
        events += [(job.enqueued_at, 1, job.submitter), (assigned, -1, job.submitter)]
    everyone = {e[2] for e in events}
    events.sort(key=lambda e: e[0])
    waiting: Counter[str] = Counter()
    windows: list[tuple[float, float]] = []
    opened: float | None = None
    for i, (t, d, who) in enumerate(events):
        waiting[who] += d
        if i + 1 < len(events) and events[i + 1][0] == t:
            continue  # every event of one instant first
        full = sum(1 for s in everyone if waiting[s] > 0) == len(everyone)
        if full and opened is None:
            opened = t
        elif not full and opened is not None:
            windows.append((opened, t))
            opened = None
    return windows


def fair_shares(trace: Trace, weights: Mapping[str, float] | None = None) -> dict[str, object]:
    """Shares of rendering worker-seconds inside ``busy_windows``: per submitter ``seconds``,
    ``share``, ``target`` (its weight over the summed weights) and ``deviation``
    ((share - target) / target); ``worst`` is the largest |deviation| (None without a window)."""
    w = dict(weights or {})
    windows = busy_windows(trace)
    starts = [a for a, _ in windows]
    seconds: Counter[str] = Counter({job.submitter: 0.0 for job, *_ in trace})
    for job, _, _, begin, end in trace:
        i = max(0, bisect.bisect_right(starts, begin) - 1)
        while i < len(windows) and windows[i][0] < end:
            a, b = windows[i]
            seconds[job.submitter] += max(0.0, min(b, end) - max(a, begin))
            i += 1
    total = sum(seconds.values())
    weight_sum = sum(w.get(s, 1.0) for s in seconds)
    per: dict[str, dict[str, float]] = {}
    for s, sec in sorted(seconds.items()):
        target = w.get(s, 1.0) / weight_sum
        share = sec / total if total > 0 else math.nan
        per[s] = {"seconds": sec, "share": share, "target": target, "deviation": (share - target) / target}
    worst = max((abs(p["deviation"]) for p in per.values()), default=None) if total > 0 else None
    return {"window_s": sum(b - a for a, b in windows), "submitters": per, "worst": worst}
