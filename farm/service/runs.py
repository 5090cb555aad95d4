"""A run while the controller carries it, and what `farm status` shows of runs.

``ActiveRun`` collects the run's rows as they arrive (the dispatcher calls ``on_rows``)
and writes them to its output root on ``flush``; the status functions are pure reads of
it, its dispatcher's counts and its record.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from jobs.manifest import Job, Manifest
from jobs.results import ResultsWriter, completed_jobs, existing_images, read_results
from jobs.stamp import recover_rows

from .state import RunRecord


@dataclass
class ActiveRun:
    record: RunRecord
    manifest: Manifest
    pool: Any  # farm.service.pools.Pool
    writer: ResultsWriter
    done_before: set[str]  # job ids finished before this start (earlier runs, recovered stamps)
    ok: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    buffer: list = field(default_factory=list)
    cancelling: bool = False
    errors: int = 0  # book-keeping steps in a row that raised (its output root failing)

    def on_rows(self, rows: list) -> None:
        for r in rows:
            (self.ok if r.status == "ok" else self.failed).add(r.job_id)
            (self.failed if r.status == "ok" else self.ok).discard(r.job_id)
        self.buffer.extend(rows)

    def flush(self) -> None:
        """Append the buffered rows as one part; they stay buffered until the write succeeded."""
        if self.buffer:
            n = len(self.buffer)
            self.writer.append(self.buffer[:n])
            del self.buffer[:n]


def open_run(record: RunRecord, m: Manifest, pool: Any) -> tuple[ActiveRun, list[Job]]:
    """The run and its jobs not yet done in its output root: rows of images whose rows died with a
    controller are recorded from their stamps, not redrawn (a new run and a recovered one alike)."""
    opts = m.storage_options
    writer = ResultsWriter(m.output, opts)
    earlier = read_results(m.output, opts)
    images = existing_images(m.output, opts)
    recovered = recover_rows(m.output, m.jobs, m.model, opts, earlier, images)
    if recovered:
        writer.append(recovered)
    done = completed_jobs(m.output, opts, earlier + recovered, images)
    todo = [j for j in m.jobs if j.job_id not in done]
    return ActiveRun(record, m, pool, writer, done_before={j.job_id for j in m.jobs if j.job_id in done}), todo


def run_status(run: ActiveRun, detail: bool = False) -> dict:
    """The `farm status` object of a run the controller carries (``detail``: per composition too)."""
    r = run.record
    d = run.pool.dispatcher
    c = d.run_counts(r.run_id) if d.has_run(r.run_id) else {"queued": 0, "running": 0, "cancelled": 0}
    ok = len(run.ok | run.done_before)
    failed = len(run.failed - run.ok)
    state = r.state
    if state == "running" and c["running"] == 0 and ok + failed == 0:
        state = "queued"
    out = {"run_id": r.run_id, "state": state, "cancelling": run.cancelling,
           "total": r.total, "ok": ok, "failed": failed, "queued": c["queued"], "running": c["running"],
           "cancelled": c["cancelled"], "output": r.output, "pool": run.pool.name, "submitter": r.submitter,
           "priority": r.priority, "created_at": r.created_at, "eta_s": eta_s(run, c)}
    if detail:
        out["compositions"] = per_composition(run)
    return out

def eta_s(run: ActiveRun, c: dict) -> float | None:
    """Seconds to finish this run's queued and running jobs at the pool's measured rate."""
    books = [b for b in run.pool.dispatcher.worker_books().values() if b.alive]
    left = c["queued"] + c["running"]
    if not left:
        return 0.0
    if not books:
        return None
    render = sum(b.render_s for b in books) / len(books)
    return round(left * render / len(books), 3)

def per_composition(run: ActiveRun) -> list[dict]:
    total, ok, failed = Counter(), Counter(), Counter()
    for j in run.manifest.jobs:
        k = j.routing_key
        total[k] += 1
        if j.job_id in run.ok or j.job_id in run.done_before:
            ok[k] += 1
        elif j.job_id in run.failed:
            failed[k] += 1
    loras = {j.routing_key: [{"uri": r.uri, "strength": r.strength} for r in j.loras] for j in run.manifest.jobs}
    return [{"composition": k, "loras": loras[k], "total": n, "ok": ok[k], "failed": failed[k],
             "left": n - ok[k] - failed[k]} for k, n in total.items()]


def record_status(record: RunRecord) -> dict:
    """A run that is not in the controller (finished, cancelled, or from before a restart)."""
    return {"run_id": record.run_id, "state": record.state, "total": record.total, "ok": record.ok,
            "failed": record.failed, "queued": 0, "running": 0, "output": record.output,
            "submitter": record.submitter, "priority": record.priority, "created_at": record.created_at,
            "eta_s": 0.0, **({"error": record.error} if record.error else {})}
