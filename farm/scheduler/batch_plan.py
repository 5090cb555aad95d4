"""Pure batch planning: split a known backlog into per-worker runs of one composition.

``AffinityScheduler`` decides greedily, one free worker at a time, which is right for
jobs that trickle in but wasteful for a batch known at submit time: its hot compositions
get their replicas at once and the small ones are left for the end, where they meet
many idle workers and are split again (each split is one more recomposition). A plan
made once avoids that:

1. find the smallest end time ``T`` for which the backlog fits (bisection on
   :func:`pack`), then pack at a few ends up to ``T * (1 + slack)`` and keep the
   packing with the fewest recompositions: a little slack lets most compositions fit
   whole;
2. :func:`pack` at a given ``T``: every worker has ``room = T - free_at`` seconds. A
   composition a worker already holds goes to its holders first (no recomposition),
   shared evenly. Then the others, largest first, best fit (each to the worker whose
   room is the tightest that takes it whole) or worst fit (to the roomiest: LPT, which
   balances a few compositions per worker better; both are tried). One that fits
   nowhere whole fills the roomiest worker and its remainder goes back among the others
   (one recomposition per piece; splitting only where nothing fits keeps pieces few: at
   most D + K - 1).

The result is, per worker, an ordered list of ``(composition, jobs)`` pieces. It is a
hint: the scheduler follows it while it holds, skips a piece whose jobs went elsewhere,
and plans the rest again (toward the same end) when a worker's pieces run out, since
the estimates it was made with are only estimates.

:class:`Following` is the bookkeeping of a plan being followed (what each worker's
pieces still cover, retries, jobs no piece covers).

Costs: ``switch(worker, key, first)`` is the estimated seconds for ``worker`` to start
``key`` (``first``: as its first piece, from what it holds now; later pieces can be
prefetched while it renders). Everything is O(D log K) per :func:`pack`, D
compositions on K workers, and :func:`make_plan` calls it ~20-40 times (10,000 compositions
on 16 workers: ~0.5 s on one core here).
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

Piece = tuple[str, int]  # (composition key, jobs)
SwitchCost = Callable[[int, str, bool], float]


@dataclass(frozen=True)
class Lane:
    """One worker as the planner sees it."""

    free_at: float = 0.0  # seconds until the jobs it already has are done
    holds: str | None = None  # the composition it holds (or will, once those are done)
    render_s: float = 1.0  # seconds per job of weight 1


def pack(work: Sequence[Piece], lanes: Sequence[Lane], switch: SwitchCost, end: float,
         fit: str = "best", weight: Mapping[str, float] | None = None) -> list[list[Piece]] | None:
    """Pieces per lane so that every lane ends by ``end``; None when the work does not fit.
    A job of composition ``key`` costs ``lane.render_s * weight[key]`` (default weight 1).

    ``fit="best"``: each composition to the tightest room that takes it whole (keeps big
    rooms for big compositions: fewer splits); ``"worst"``: to the roomiest (LPT: balances
    few lanes better). Either way one that fits nowhere whole fills the roomiest lane.
    """
    if fit not in ("best", "worst"):
        raise ValueError(f"fit must be 'best' or 'worst', not {fit!r}")
    w = weight or {}
    room = [end - lane.free_at for lane in lanes]
    pieces: list[list[Piece]] = [[] for _ in lanes]
    holders: dict[str, list[int]] = {}
    for i, lane in enumerate(lanes):
        if lane.holds is not None:
            holders.setdefault(lane.holds, []).append(i)
    items: list[tuple[int, str]] = []  # max-heap of (-jobs, composition) still to place
    for key, n in work:
        own = sorted(holders[key], key=lambda i: -room[i]) if key in holders else ()
        for j, i in enumerate(own):  # even shares, each within its holder's room
            job_s = _job_s(lanes[i], key, w)
            k = min(math.ceil(n / (len(own) - j)), max(0, _jobs_in(room[i], 0.0, job_s)))
            if k > 0:
                pieces[i].append((key, k))
                room[i] -= k * job_s
                n -= k
        if n > 0:
            items.append((-n, key))
    heapq.heapify(items)
    fastest = min(lane.render_s for lane in lanes)
    order = sorted((r, i) for i, r in enumerate(room))  # rooms, smallest first
    while items:
        neg, key = heapq.heappop(items)
        n = -neg
        candidates = range(bisect.bisect_left(order, (n * fastest * w.get(key, 1.0), -1)), len(order))
        for at in (candidates if fit == "best" else reversed(candidates[-1:])):
            r, i = order[at]  # the tightest room that takes it whole, or the roomiest
            cost = switch(i, key, not pieces[i]) + n * _job_s(lanes[i], key, w)
            if cost <= r + 1e-9:
                break
        else:  # nowhere whole: fill the roomiest lane, the rest goes back among the items
            at = len(order) - 1
            r, i = order[at]
            s = switch(i, key, not pieces[i])
            job_s = _job_s(lanes[i], key, w)
            fits = _jobs_in(r, s, job_s)
            if fits <= 0:
                return None
            heapq.heappush(items, (fits - n, key))
            n, cost = fits, s + fits * job_s
        del order[at]
        pieces[i].append((key, n))
        bisect.insort(order, (r - cost, i))
    return pieces


def _job_s(lane: Lane, key: str, weight: Mapping[str, float]) -> float:
    """Seconds for one job of composition ``key`` on ``lane``."""
    return lane.render_s * weight.get(key, 1.0)


def _jobs_in(room: float, switch_s: float, job_s: float) -> int:
    return math.floor((room - switch_s) / job_s + 1e-9) if job_s > 0 else 2**62


def make_plan(work: Sequence[Piece], lanes: Sequence[Lane], switch: SwitchCost, *,
         weight: Mapping[str, float] | None = None, slack: float = 0.05,
         slack_s: float | None = None, at_least: float = 0.0, tries: int = 5,
         tolerance: float = 2e-3) -> tuple[list[list[Piece]], float]:
    """(pieces per lane, the end they were packed for): every job of ``work`` is in one piece.

    For best fit (and worst fit, up to 8 compositions per lane), ends from the smallest
    that fits (``T``) to ``T + slack_s`` (default ``slack * T``) are tried; the packing
    with the fewest :func:`switches` wins, then the one that ends first (:func:`span`). ``at_least`` raises every end: a replan
    made while a plan runs keeps that plan's end and its slack in seconds, so a worker
    that finishes early only takes work that would otherwise end later, and a
    recomposition that saves a few seconds at the end of a long batch is not made.
    """
    work = [(k, n) for k, n in work if n > 0]
    if not lanes:
        raise ValueError("make_plan needs at least one lane")
    if any(not lane.render_s > 0 for lane in lanes):
        raise ValueError(f"every lane needs render_s > 0, got {[lane.render_s for lane in lanes]}")
    if not work:
        return [[] for _ in lanes], 0.0
    best: tuple[tuple[int, float], list[list[Piece]], float] | None = None
    # worst fit (LPT) balances a few compositions per lane better; with many, best fit does too
    for fit in ("best", "worst") if len(work) <= 8 * len(lanes) else ("best",):
        smallest = _smallest_end(work, lanes, switch, fit, tolerance, weight)
        extra = slack * smallest if slack_s is None else slack_s
        ends = [smallest] + [max(smallest + extra * j / tries, at_least) for j in range(tries + 1)]
        for end in dict.fromkeys(ends):  # neither fit is monotone in the end time: try a few
            found = pack(work, lanes, switch, end, fit, weight)
            if found is not None:
                rank = (switches(found, lanes), span(found, lanes, switch, weight))
                if best is None or rank < best[0]:
                    best = (rank, found, end)
    assert best is not None  # the smallest end of each fit packs
    return best[1], best[2]


def _smallest_end(work: Sequence[Piece], lanes: Sequence[Lane], switch: SwitchCost, fit: str,
                  tolerance: float, weight: Mapping[str, float] | None) -> float:
    """About the smallest end ``pack`` fits at (bisection; ``pack`` fits at the one returned)."""
    w = weight or {}
    fastest = min(lane.render_s for lane in lanes)
    units = sum(n * w.get(key, 1.0) for key, n in work)
    lo = min(lane.free_at for lane in lanes) + units * fastest / len(lanes)  # nothing ends sooner
    hi = 1.25 * lo + max(switch(i, work[0][0], True) for i in range(len(lanes))) + fastest
    for _ in range(64):
        if pack(work, lanes, switch, hi, fit, weight) is not None:
            break
        lo, hi = hi, 2 * hi
    else:
        raise ValueError("no end time fits this work: are the switch costs finite?")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pack(work, lanes, switch, mid, fit, weight) is not None else (mid, hi)
    return hi


def span(pieces: list[list[Piece]], lanes: Sequence[Lane], switch: SwitchCost,
         weight: Mapping[str, float] | None = None) -> float:
    """When the last lane following ``pieces`` is done, by the same costs ``pack`` uses."""
    w, latest = weight or {}, 0.0
    for i, (mine, lane) in enumerate(zip(pieces, lanes)):
        t = lane.free_at
        for j, (key, n) in enumerate(mine):
            if not (j == 0 and key == lane.holds):
                t += switch(i, key, j == 0)
            t += n * _job_s(lane, key, w)
        latest = max(latest, t)
    return latest


def switches(pieces: list[list[Piece]], lanes: Sequence[Lane]) -> int:
    """The recompositions a packing costs: every piece but a lane's first of what it holds."""
    return sum(len(mine) - (bool(mine) and mine[0][0] == lane.holds) for mine, lane in zip(pieces, lanes))


class Following:
    """A plan being followed: each worker's pieces left, and the queued jobs they cover.

    Pure bookkeeping; the queue is seen through ``count(composition) -> queued jobs``. A
    piece is ``[composition, jobs left]``. Jobs that join the queue later (retries) grow
    their composition's last piece while it is unfinished, else they are *unplanned*;
    a composition with more queued jobs than its pieces cover is *loose*.
    """

    def __init__(self, pieces: dict[str, list[Piece]], count: Callable[[str], int]) -> None:
        self._count = count
        self.workers: dict[str, deque[list]] = {}
        self._last: dict[str, list] = {}
        self.covered: Counter[str] = Counter()  # composition -> jobs in its pieces left
        self.planned = 0  # jobs in all pieces left
        self.unplanned = 0  # jobs queued since the plan that no piece covers
        self._loose: set[str] = set()
        for wid, mine in pieces.items():
            if mine:
                self.workers[wid] = deque([key, n] for key, n in mine)
                for piece in self.workers[wid]:
                    self._last[piece[0]] = piece
                    self.covered[piece[0]] += piece[1]
                    self.planned += piece[1]

    def __bool__(self) -> bool:
        return bool(self.workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self.workers

    def joined(self, key: str) -> None:
        """A job of ``key`` joined the queue."""
        piece = self._last.get(key)
        if piece is not None and piece[1] > 0:
            piece[1] += 1
            self.covered[key] += 1
            self.planned += 1
        else:
            self.unplanned += 1
            self._recheck(key)

    def current(self, worker_id: str) -> str | None:
        """The composition of the worker's current piece with work left; None when its pieces
        ran out (it then leaves the plan). Pieces whose jobs went elsewhere are dropped."""
        mine = self.workers.get(worker_id)
        while mine:
            key, left = mine[0]
            if left > 0 and self._count(key):
                return key
            mine.popleft()  # done, or its jobs went elsewhere
            self.covered[key] -= left
            self.planned -= left
            self._recheck(key)
        self.workers.pop(worker_id, None)
        return None

    def took(self, worker_id: str) -> None:
        """The worker was given one job of its current piece."""
        piece = self.workers[worker_id][0]
        piece[1] -= 1
        self.covered[piece[0]] -= 1
        self.planned -= 1

    def left(self, worker_id: str) -> int:
        """Jobs left in the worker's current piece (0 when it has none)."""
        return self.workers[worker_id][0][1] if self.current(worker_id) is not None else 0

    def upcoming(self, worker_id: str, n: int = 2) -> list[str]:
        """The compositions of the worker's next ``n`` pieces with work left (for prefetch)."""
        live = (p[0] for p in self.workers.get(worker_id, ()) if p[1] > 0 and self._count(p[0]))
        return list(itertools.islice(live, n))

    def loose(self, prefer: str | None) -> str | None:
        """A composition with queued jobs no piece covers: ``prefer`` if it is one, else the
        one with the most such jobs; None when there is none."""
        for key in [k for k in self._loose if self._count(k) <= self.covered[k]]:
            self._loose.discard(key)  # its extra jobs went elsewhere (e.g. the age bound)
        if not self._loose:
            return None
        if prefer in self._loose:
            return prefer
        return max(self._loose, key=lambda k: (self._count(k) - self.covered[k], k))

    def took_loose(self, key: str) -> None:
        self._recheck(key)

    def _recheck(self, key: str) -> None:
        if self._count(key) > self.covered[key]:
            self._loose.add(key)
        else:
            self._loose.discard(key)
