"""Pure batch planning: split a known backlog into per-worker runs of one composition.

``AffinityScheduler`` decides greedily, one free worker at a time, which is right for
jobs that trickle in but wasteful for a batch known at submit time: its hot compositions
get their replicas at once and the small ones are left for the end, where they meet
many idle workers and are split again (each split is one more recomposition). A plan
made once avoids that:

1. find the smallest end time ``T`` for which the backlog fits (bisection on
   :func:`pack`), then pack at ``T * (1 + slack)``; a little slack lets most
   compositions fit whole;
2. :func:`pack` at a given ``T``: every worker has ``room = T - free_at`` seconds. A
   composition a worker already holds goes to its holders first (no recomposition),
   shared evenly. Then the others, largest first, best fit: each to the worker whose
   room is the tightest that takes it whole. One that fits nowhere whole fills the
   roomiest worker and its remainder goes back among the others (one recomposition per
   piece; splitting only where nothing fits keeps pieces few: at most D + K - 1).

The result is, per worker, an ordered list of ``(composition, jobs)`` pieces. It is a
hint: the scheduler follows it while it holds, and its greedy rules take over for a
worker whose pieces ran out (work stealing) and for jobs the plan never saw.

Costs: ``switch(worker, key, first)`` is the estimated seconds for ``worker`` to start
``key`` (``first``: as its first piece, from what it holds now; later pieces can be
prefetched while it renders). Everything is O(D log K) per :func:`pack`, D
compositions on K workers, and :func:`plan` calls it ~20 times.
"""
from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass
from typing import Callable, Sequence

Piece = tuple[str, int]  # (composition key, jobs)
SwitchCost = Callable[[int, str, bool], float]


@dataclass(frozen=True)
class Lane:
    """One worker as the planner sees it."""

    free_at: float = 0.0  # seconds until the jobs it already has are done
    holds: str | None = None  # the composition it holds (or will, once those are done)
    render_s: float = 1.0  # seconds per job


def pack(work: Sequence[Piece], lanes: Sequence[Lane], switch: SwitchCost, end: float) -> list[list[Piece]] | None:
    """Pieces per lane so that every lane ends by ``end``; None when the work does not fit."""
    room = [end - lane.free_at for lane in lanes]
    pieces: list[list[Piece]] = [[] for _ in lanes]
    holders: dict[str, list[int]] = {}
    for i, lane in enumerate(lanes):
        if lane.holds is not None:
            holders.setdefault(lane.holds, []).append(i)
    items: list[tuple[int, str]] = []  # max-heap of (-jobs, composition) still to place
    for key, n in work:
        own = sorted(holders.get(key, ()), key=lambda i: -room[i])
        for j, i in enumerate(own):  # even shares, each within its holder's room
            k = min(math.ceil(n / (len(own) - j)), max(0, _jobs_in(room[i], 0.0, lanes[i])))
            if k > 0:
                pieces[i].append((key, k))
                room[i] -= k * lanes[i].render_s
                n -= k
        if n > 0:
            items.append((-n, key))
    heapq.heapify(items)
    fastest = min(lane.render_s for lane in lanes)
    order = sorted((r, i) for i, r in enumerate(room))  # rooms, smallest first
    while items:
        neg, key = heapq.heappop(items)
        n = -neg
        for at in range(bisect.bisect_left(order, (n * fastest, -1)), len(order)):
            r, i = order[at]  # best fit: the tightest room that takes it whole
            cost = switch(i, key, not pieces[i]) + n * lanes[i].render_s
            if cost <= r + 1e-9:
                break
        else:  # nowhere whole: fill the roomiest lane, the rest goes back among the items
            at = len(order) - 1
            r, i = order[at]
            s = switch(i, key, not pieces[i])
            fits = _jobs_in(r, s, lanes[i])
            if fits <= 0:
                return None
            heapq.heappush(items, (fits - n, key))
            n, cost = fits, s + fits * lanes[i].render_s
        del order[at]
        pieces[i].append((key, n))
        bisect.insort(order, (r - cost, i))
    return pieces


def _jobs_in(room: float, switch_s: float, lane: Lane) -> int:
    return math.floor((room - switch_s) / lane.render_s + 1e-9)


def plan(work: Sequence[Piece], lanes: Sequence[Lane], switch: SwitchCost, *, slack: float = 0.05,
         slack_s: float | None = None, at_least: float = 0.0, tries: int = 10,
         tolerance: float = 2e-3) -> tuple[list[list[Piece]], float]:
    """(pieces per lane, the end they were packed for): every job of ``work`` is in one piece.

    Ends from the smallest that fits (``T``) to ``T + slack_s`` (default ``slack * T``) are
    tried; the packing with the fewest :func:`switches` wins, the earliest on a tie. ``at_least``
    raises them all: a replan made while a plan runs keeps that plan's end and its slack
    in seconds, so a worker that finishes early only takes work that would otherwise end
    later, and a recomposition that saves a few seconds at the end of a long batch is not
    made.
    """
    work = [(k, n) for k, n in work if n > 0]
    if not lanes:
        raise ValueError("plan needs at least one lane")
    if not work:
        return [[] for _ in lanes], 0.0
    per_job = max(lane.render_s for lane in lanes)
    first = max(switch(i, work[0][0], True) for i in range(len(lanes)))
    lo = min(lane.free_at for lane in lanes)
    hi = max(lane.free_at for lane in lanes) + sum(n for _, n in work) * per_job + len(work) * (first + per_job)
    while pack(work, lanes, switch, hi) is None:  # later switches dearer than the first one's
        hi *= 2
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pack(work, lanes, switch, mid) is not None else (mid, hi)
    best, best_end = pack(work, lanes, switch, hi), hi
    assert best is not None
    extra = slack * hi if slack_s is None else slack_s
    for j in range(tries + 1):  # best fit is not monotone in the end time: try a few
        end = max(hi + extra * j / tries, at_least)
        found = pack(work, lanes, switch, end)
        if found is not None and switches(found, lanes) < switches(best, lanes):
            best, best_end = found, end
    return best, best_end


def switches(pieces: list[list[Piece]], lanes: Sequence[Lane]) -> int:
    """The recompositions a packing costs: every piece but a lane's first of what it holds."""
    return sum(len(mine) - (bool(mine) and mine[0][0] == lane.holds) for mine, lane in zip(pieces, lanes))
