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

#: A row rendered in one of these modes left its composition's branches prepared on the worker.
PREPARED_MODES = ("lowrank",)
#: How many prepared compositions the dispatcher credits a worker with (its cache is bounded in bytes).
PREPARED_GUESS = 8


def prepared_guess(branch_cache_mb: float) -> int:
    """The prepared compositions to credit a worker with, for its ``branch_cache_mb``."""
    return PREPARED_GUESS if branch_cache_mb > 0 else 0


#: A switch to a composition believed prepared that took at least this share of a compose was one.
SWAP_AT_MOST = 0.5


@dataclass
class WorkerBook(CostEstimate):
    """What the dispatcher knows of one worker, from what it sent and got back."""

    worker_id: str
    handle: Any
    node_id: str = ""
    routing_key: str | None = None  # the composition it holds, by routing key ("" = base)
    adapters: set[str] = field(default_factory=set)
    inflight: int = 0
    alive: bool = True
    deaths_in_a_row: int = 0
    last_key: str | None = None
    switches: int = 0
    retired: bool = False  # removed from the farm: never revived

    #: compositions it keeps prepared (its low-rank branch cache), newest last, as its rows tell;
    #: keyed like the policy's compositions (the jobs' routing keys, not the rows' content keys)
    prepared: OrderedDict = field(default_factory=OrderedDict)
    prepared_guess: int = PREPARED_GUESS  # 0: the workers keep no branch cache (branch_cache_mb 0)
    _last_routing: str | None = None

    def learn(self, row: ResultRow, work: float = 1.0, *, routing_key: str | None = None,
              first: bool = True) -> None:
        """One result row; ``work``: its job's render cost relative to the run's mean job;
        ``routing_key``: its job's composition as the policy knows it; ``first``: the first row
        of its composition in its call (the rows of one group repeat the group's compose
        seconds: learned once). A switch to a composition the worker kept prepared, rendered low
        rank and quicker than half a compose, measures a swap, not a compose."""
        key = row.composition_key
        compose_s = row.compose_s if first else 0.0
        swapped = (routing_key is not None and routing_key != self._last_routing and routing_key in self.prepared
                   and row.lora_mode in PREPARED_MODES and compose_s < SWAP_AT_MOST * self.compose_s)
        self.observe(compose_s=0.0 if swapped else compose_s, swap_s=compose_s if swapped else 0.0,
                     render_s=row.render_s / work, fetch_s=row.fetch_s)
        if key and key != self.last_key:
            self.switches += 1
            self.last_key = key
        if routing_key is not None and row.status == "ok":
            self._last_routing = routing_key
            self._keep(routing_key, row.lora_mode in PREPARED_MODES)

    def _keep(self, key: str, prepared: bool) -> None:
        """A low-rank render leaves its branches in the worker's cache (``branch_cache_mb``); a
        merged one holds no branch of it. The cache is bounded in bytes the dispatcher does not
        see: it guesses the newest ``PREPARED_GUESS`` (a stale guess costs a compose it priced
        as a swap, never a wrong image)."""
        if not prepared:
            self.prepared.pop(key, None)
            return
        self.prepared[key] = True
        self.prepared.move_to_end(key)
        while len(self.prepared) > self.prepared_guess:
            self.prepared.popitem(last=False)

    def forget(self) -> None:
        """A restarted actor comes back empty."""
        self.routing_key, self.adapters = None, set()
        self.prepared.clear()
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
