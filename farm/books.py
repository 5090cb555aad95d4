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


@dataclass
class WorkerBook(CostEstimate):
    """What the dispatcher knows of one worker, from what it sent and got back."""

    worker_id: str
    handle: Any
    node_id: str = ""
    composition: str | None = None
    adapters: set[str] = field(default_factory=set)
    inflight: int = 0
    alive: bool = True
    deaths_in_a_row: int = 0
    last_key: str | None = None
    switches: int = 0
    retired: bool = False  # removed from the farm: never revived

    #: compositions it keeps prepared (its low-rank branch cache), newest last, as its rows tell
    prepared: OrderedDict = field(default_factory=OrderedDict)

    def learn(self, row: ResultRow, work: float = 1.0) -> None:
        """One result row; ``work``: its job's render cost relative to the run's mean job. A row
        that switched to a composition the worker kept prepared measures a swap, not a compose."""
        key = row.composition_key
        swapped = bool(key) and key != self.last_key and key in self.prepared
        self.observe(compose_s=0.0 if swapped else row.compose_s, swap_s=row.compose_s if swapped else 0.0,
                     render_s=row.render_s / work, fetch_s=row.fetch_s)
        if key and key != self.last_key:
            self.switches += 1
            self.last_key = key
        if row.status == "ok" and key:
            self._keep(key, row.lora_mode in PREPARED_MODES)

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
        while len(self.prepared) > PREPARED_GUESS:
            self.prepared.popitem(last=False)

    def forget(self) -> None:
        """A restarted actor comes back empty."""
        self.composition, self.adapters = None, set()
        self.prepared.clear()


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
