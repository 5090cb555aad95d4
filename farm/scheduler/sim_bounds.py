"""Lower bounds no schedule can beat, for a workload on a ``FarmModel`` (``sim.py``).

The scheduler benchmark reports every policy's makespan and recompositions against
``lower_bounds``; ``recompositions_needed`` tells whether the makespan and recomposition
targets can be met together at all.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from .sim import FarmModel
from .types import QueuedJob


def lower_bounds(jobs: Sequence[QueuedJob], farm: FarmModel) -> dict[str, float]:
    """Bounds no schedule can beat, for compositions that each hold at least one adapter.

    Recompositions: every distinct composition is composed at least once (D). Not a bound
    but reported beside it: ``lp_compositions``, the sum of y_c the LP below needs to reach
    its makespan bound (what a schedule that fast pays in compositions, fractionally).

    Makespan, the largest of (a job of ``work`` w renders in R w; n_c below is composition
    c's summed work, N the total):

    * fetch floor + LP relaxation. Nothing is cached at t=0, so no compose starts before
      one remote fetch (F). Say composition c (n_c jobs) is rendered by y_c workers and
      the schedule ends at T. One of them renders >= n_c / y_c of its jobs after one
      compose, so T >= F + C + R n_c / y_c, i.e. y_c >= R n_c / (T - F - C); and all
      work fits in K workers' [F, T]: sum_c (R n_c + C y_c) <= K (T - F). The smallest
      T for which real y_c >= max(1, R n_c / (T - F - C)) satisfy it (bisection) is a
      bound. This is what charges a hot composition for the replicas it needs.
    * integrality (all jobs of work 1): some worker renders ceil(N / K) jobs after a
      compose: F + C + R ceil(N/K);
    * arrivals: jobs arriving at or after a cannot start before a, and at a the K
      workers hold (or are composing) at most K compositions, so of the D(>=a)
      compositions those jobs need, D(>=a) - K are composed after a:
      a + (R N(>=a) + C max(0, D(>=a) - K)) / K for every arrival time a; and every
      job's arrival + R w.
    """
    if not jobs:
        return {"makespan": 0.0, "recompositions": 0, "lp_compositions": 0.0}
    K, R, C, F = farm.workers, farm.render_s, farm.compose_s, farm.fetch
    sizes = np.array(list(_work_per_composition(jobs).values()), dtype=float)
    n = float(sizes.sum())
    unit = all(j.work == 1.0 for j in jobs)

    def fits(T: float) -> bool:
        replicas = np.maximum(1.0, R * sizes / (T - F - C))
        return float(np.sum(R * sizes + C * replicas)) <= K * (T - F)

    lo, hi = F + C, F + C + R * n + C * len(sizes)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    lp_compositions = float(np.sum(np.maximum(1.0, R * sizes / (hi - F - C))))
    bound = max(hi, F + C + R * math.ceil(len(jobs) / K)) if unit else hi
    ordered = sorted(jobs, key=lambda j: j.enqueued_at)
    later: set[str] = set()  # compositions of the jobs arriving at or after a
    work_after = 0.0  # their summed work
    for i in range(len(ordered) - 1, -1, -1):
        later.add(ordered[i].routing_key)
        work_after += ordered[i].work
        a = ordered[i].enqueued_at
        if i == 0 or ordered[i - 1].enqueued_at != a:
            bound = max(bound, a + (R * work_after + C * max(0, len(later) - K)) / K)
    bound = max(bound, max(j.enqueued_at + R * j.work for j in jobs))
    return {"makespan": bound, "recompositions": len(sizes), "lp_compositions": lp_compositions}


def recompositions_needed(jobs: Sequence[QueuedJob], farm: FarmModel, makespan: float) -> float:
    """A lower bound on the compositions of any schedule that ends by ``makespan``.

    The same argument as the LP in :func:`lower_bounds`: composition c (n_c jobs) spread
    over y_c workers leaves one of them n_c / y_c jobs after its compose, so finishing by T
    needs y_c >= R n_c / (T - F - C), and each of those workers composes c at least once:
    sum_c max(1, ceil(R n_c / (T - F - C))). Where jobs arrive over time, also D plus the
    compositions it must compose both before and after an arrival (``_composed_twice``).
    With T = the makespan target this tells whether the makespan and recomposition
    targets can be met together at all.
    """
    R, C, F = farm.render_s, farm.compose_s, farm.fetch
    room = makespan - F - C
    if room <= 0:
        return math.inf
    sizes = _work_per_composition(jobs).values()
    split = float(sum(max(1, math.ceil(R * n / room - 1e-9)) for n in sizes))
    return max(split, len(sizes) + _composed_twice(jobs, farm, makespan))


def _composed_twice(jobs: Sequence[QueuedJob], farm: FarmModel, makespan: float) -> float:
    """Arrivals: compositions any schedule ending by T composes on both sides of some arrival
    time a (so at least twice), the largest count over the arrival times.

    At a, the K workers hold (or are composing) at most K compositions. A composition c
    with jobs arriving at or after a that nobody holds at a is composed after a; if any of
    its jobs also started before a, it was composed before a too. The others' earlier
    work p_c waits until after a, and after a the farm must fit
    R (work arriving >= a) + R (waiting p_c) + C (D(>=a) - K) <= K (T - a).
    Holding the K largest p_c across a, and composing the next largest twice, is the
    fewest compositions composed twice that lets it fit (inf when nothing does)."""
    K, R, C = farm.workers, farm.render_s, farm.compose_s
    times = sorted({j.enqueued_at for j in jobs})
    most = 0.0
    for a in times[1:]:
        later = {j.routing_key for j in jobs if j.enqueued_at >= a}
        room = K * (makespan - a) - R * sum(j.work for j in jobs if j.enqueued_at >= a) - C * max(0, len(later) - K)
        if room < 0:
            return math.inf
        early: Counter[str] = Counter()
        for j in jobs:
            if j.enqueued_at < a and j.routing_key in later:
                early[j.routing_key] += j.work
        waiting = sorted(early.values(), reverse=True)[K:]  # the K largest are held across a
        left, twice = R * sum(waiting), 0
        while left > room + 1e-9:
            left -= R * waiting[twice]
            twice += 1
        most = max(most, float(twice))
    return most


def _work_per_composition(jobs: Sequence[QueuedJob]) -> dict[str, float]:
    out: Counter[str] = Counter()
    for j in jobs:
        out[j.routing_key] += j.work
    return dict(out)
