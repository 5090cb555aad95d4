"""What the dispatcher knows of its workers and runs: ``WorkerBook`` (per worker: what it
holds, as its calls and rows tell, and its learned costs), ``RunBook`` and ``RunStats`` (per
run), and ``ticket`` (a job's id inside the dispatcher)."""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from jobs.results import ResultRow

from .scheduler.costs import CostEstimate

#: A switch to a composition believed prepared that took at least this share of a compose was one.
SWAP_AT_MOST = 0.5
#: Content keys a book remembers the routing keys of (most recently seen kept), and routing keys
#: per content key: a long-lived farm sees many compositions; one not reported now may be again
#: (an auto-mode worker flips back), so the mapping is bounded, not pruned to the report.
ROUTING_MEMORY = 1024
ROUTINGS_PER_KEY = 8
#: Dead worker processes a book remembers (their late reports dropped): the newest ones.
DEAD_ORIGINS = 64


@dataclass
class WorkerBook(CostEstimate):
    """What the dispatcher knows of one worker: what it sent, what came back, and what the
    worker reports holding with each call's rows (``workers.holds.Holds``)."""

    worker_id: str
    handle: Any
    node_id: str = ""
    routing_key: str | None = None  # the composition it holds, by routing key ("" = base)
    #: adapters (URIs) in its memory, as its latest report says
    adapters: set[str] = field(default_factory=set)
    #: adapters it fetched (its rows' LoRAs): on its node's disk as far as the dispatcher knows
    fetched: set[str] = field(default_factory=set)
    inflight: int = 0
    alive: bool = True
    deaths_in_a_row: int = 0
    last_key: str | None = None
    switches: int = 0
    retired: bool = False  # removed from the farm: never revived

    #: content keys (rows' ``composition_key``) its branch cache holds, as its latest report says
    reported: tuple[str, ...] = ()
    _report_from: tuple[str, int] | None = None  # (origin, seq) of the report ``reported`` came with
    #: worker processes known dead (``forget``): a late report of theirs is not the truth
    _dead_origins: dict[str, None] = field(default_factory=dict)
    #: bumped by ``forget``: a call sent before it (``epoch`` at send) reports nothing
    epoch: int = 0
    #: content key -> the routing keys (the policy's compositions) its rows were rendered for,
    #: least recently seen first (bounded: ``ROUTING_MEMORY``, ``ROUTINGS_PER_KEY``)
    _routing_of: OrderedDict[str, dict[str, None]] = field(default_factory=OrderedDict)
    _last_routing: str | None = None

    @property
    def prepared(self) -> frozenset[str]:
        """The compositions it keeps prepared (a switch to one swaps tensors), by the policy's
        routing keys: its reported content keys, through what its rows taught."""
        return frozenset(r for c in self.reported for r in self._routing_of.get(c, ()))

    def learn(self, row: ResultRow, work: float = 1.0, *, routing_key: str | None = None,
              first: bool = True) -> None:
        """One result row; ``work``: its job's render cost relative to the run's mean job;
        ``routing_key``: its job's composition as the policy knows it; ``first``: the first row
        of its composition in its call (the rows of one group repeat the group's compose
        seconds: learned once). A switch to a composition the worker reported prepared, quicker
        than half a compose, measures a swap, not a compose."""
        key = row.composition_key
        compose_s = row.compose_s if first else 0.0
        swapped = (routing_key is not None and routing_key != self._last_routing and routing_key in self.prepared
                   and compose_s < SWAP_AT_MOST * self.compose_s)
        self.observe(compose_s=0.0 if swapped else compose_s, swap_s=compose_s if swapped else 0.0,
                     render_s=row.render_s / work, fetch_s=row.fetch_s)
        if key and key != self.last_key:
            self.switches += 1
            self.last_key = key
        if routing_key is not None and row.status == "ok":
            self._last_routing = routing_key
            if key:
                self._remember(key, routing_key)

    def _remember(self, key: str, routing_key: str) -> None:
        """``key``'s rows were rendered for ``routing_key``: the newest mapping, bounded (the
        least recently seen content key not in the latest report goes first)."""
        routes = self._routing_of.setdefault(key, {})
        routes.pop(routing_key, None)
        routes[routing_key] = None
        while len(routes) > ROUTINGS_PER_KEY:
            del routes[next(iter(routes))]
        self._routing_of.move_to_end(key)
        if len(self._routing_of) > ROUTING_MEMORY:
            held = set(self.reported)
            old = next((c for c in self._routing_of if c not in held), next(iter(self._routing_of)))
            del self._routing_of[old]

    def report(self, holds: Any, sent_at: int | None = None) -> None:
        """What the worker says it holds (``workers.holds.Holds``, or None: no report), after a
        call's rows were learned: the truth about its branch cache and adapters in memory. An
        older report of the same process (calls come back out of order) changes nothing, nor
        does one of a process known dead (``forget``), nor one of a call sent before the latest
        ``forget`` (``sent_at``: the book's ``epoch`` when it was sent; None: not known): it
        may come from the dead process before that process ever reported."""
        if holds is None or holds.origin in self._dead_origins:
            return
        if sent_at is not None and sent_at < self.epoch:
            return
        if self._report_from is not None and self._report_from[0] == holds.origin and holds.seq <= self._report_from[1]:
            return
        self._report_from = (holds.origin, holds.seq)
        self.reported = tuple(holds.prepared)
        self.adapters = set(holds.adapters)

    def forget(self) -> None:
        """A restarted actor comes back empty: the process that reported so far is dead, and so
        are the reports still on their way from it (and from any call sent before now)."""
        if self._report_from is not None:
            self._dead_origins[self._report_from[0]] = None
            while len(self._dead_origins) > DEAD_ORIGINS:
                del self._dead_origins[next(iter(self._dead_origins))]
        self.epoch += 1
        self.routing_key, self.adapters = None, set()
        self.reported, self._report_from = (), None
        self._last_routing = None


@dataclass
class RunStats:
    total: int = 0
    ok: int = 0
    failed: int = 0
    retried: int = 0
    interrupted: bool = False
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class RunBook:
    """One run as the dispatcher carries it: where its jobs write and where its rows go."""

    run_id: str
    output_root: str
    storage_options: dict
    on_rows: Callable[[list[ResultRow]], None]
    stats: RunStats = field(default_factory=RunStats)
    tickets: set[str] = field(default_factory=set)  # still queued or in flight
    cancelled: int = 0  # queued jobs dropped by ``cancel_run`` (and in-flight ones that failed after it)
    cancelling: bool = False  # ``cancel_run`` was called: nothing of it is sent or retried again


def ticket(run_id: str, job_id: str) -> str:
    """The dispatcher's and the policy's id for one job of one run."""
    return f"{run_id}/{job_id}" if run_id else job_id
