"""`farm run`: a manifest through cluster start-up, the dispatcher and the results writer."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from jobs.manifest import Manifest
from jobs.results import ResultsWriter, completed_jobs, existing_images, read_results
from jobs.stamp import RECOVERED, recover_rows

log = logging.getLogger("farm.runner")


@dataclass
class RunSummary:
    output: str
    total: int
    skipped: int
    ok: int
    failed: int
    switches: int
    seconds: float
    interrupted: bool = False
    recovered: int = 0  # of ``skipped``: images whose rows were lost, recorded from their stamps

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    def describe(self) -> str:
        rate = self.ok / self.seconds if self.seconds > 0 else 0.0
        head = "interrupted: " if self.interrupted else ""
        found = f", {self.recovered} recovered from their images" if self.recovered else ""
        return (f"{head}{self.ok} ok, {self.failed} failed, {self.skipped} already done{found} (of {self.total}); "
                f"{self.switches} composition switch(es); {rate:.2f} images/s\n"
                f"images: {self.output.rstrip('/')}/images/  table: {self.output.rstrip('/')}/results.parquet")


class _Progress:
    """A tqdm bar: done / failed / running, compositions switched, images per second."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, d) -> None:
        if self.bar is None:
            return
        self.bar.n = d.stats.ok + d.stats.failed
        running = sum(len(ids) for ids in d.in_flight().values())
        self.bar.set_postfix(ok=d.stats.ok, failed=d.stats.failed, running=running, switches=d.switches, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Buffered:
    """Appends rows in small parts: durable within ``every_s`` seconds without one file per job."""

    def __init__(self, writer: ResultsWriter, every_s: float = 2.0, max_rows: int = 64):
        self.writer, self.every_s, self.max_rows = writer, every_s, max_rows
        self.rows: list = []
        self.last = time.monotonic()

    def __call__(self, rows) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= self.max_rows or time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.append(self.rows)
            self.rows = []
        self.last = time.monotonic()


def run_manifest(m: Manifest, *, out: str | None = None, workers: int | None = None, address: str | None = None,
                 lora_mode: str | None = None, max_batch: int | None = None, progress: bool = True,
                 capacity: int = 2, lora_roots: tuple[str, ...] | list[str] = ()) -> RunSummary:
    from .cluster import connect, make_workers
    from .dispatcher import Dispatcher
    from .scheduler.affinity import AffinityScheduler
    from .scheduler.costs import costs_from_rows

    output = out or m.output
    opts = m.storage_options
    t0 = time.perf_counter()
    earlier = read_results(output, opts)
    writer = ResultsWriter(output, opts)
    # images a killed driver's workers wrote, whose rows died in its buffer: recorded, not redrawn
    images = existing_images(output, opts)  # one listing of the images, for both questions below
    recovered = recover_rows(output, m.jobs, m.model, opts, earlier, images)
    if recovered:
        writer.append(recovered)
        log.info("recovered %d finished image(s) in %s whose rows were lost", len(recovered), output)
    done = completed_jobs(output, opts, earlier + recovered, images)
    todo = [j for j in m.jobs if j.job_id not in done]
    skipped = len(m.jobs) - len(todo)
    if not todo:
        if recovered:
            writer.finalize()
        return RunSummary(output, len(m.jobs), skipped, 0, 0, 0, time.perf_counter() - t0, recovered=len(recovered))
    measured = [r for r in earlier if r.worker_id != RECOVERED]  # recovered rows timed nothing
    priors = costs_from_rows(measured, todo)  # the first plan from measured seconds, not 1 s guesses
    if priors is not None:
        log.info("cost priors from %d earlier result(s) in %s: compose %.3g s, render %.3g s per job, fetch %.3g s",
                 len(earlier), output, priors.compose_s, priors.render_s, priors.fetch_s)
    cluster = connect(address, workers)
    n = workers or max(1, int(cluster.gpus))
    options = m.options.override(lora_mode=lora_mode or None, max_batch=max_batch or None)  # flags win when given
    from storage.policy import operator_policy  # what LoRA URIs may reach: the operator's roots, never the manifest's

    worker_opts = dict(options=options, storage_options=opts, uri_policy=operator_policy(m.base_dir, lora_roots))
    buffered = _Buffered(writer)
    bar = _Progress(len(todo), progress)
    handles = []
    try:
        handles = make_workers(n, m.model, worker_options=worker_opts, num_gpus=min(1.0, cluster.gpus / n) if cluster.gpus else 0)
        import ray

        named = {f"w{i}": h for i, h in enumerate(handles)}
        node_of = dict(zip(named, ray.get([h.node.remote() for h in handles])))  # for node-disk affinity
        d = Dispatcher(named, AffinityScheduler(), output, storage_options=opts, node_of=node_of,
                       retries=options.retries, capacity=capacity, on_rows=buffered,
                       progress=bar, max_batch=options.max_batch, priors=priors)
        stats = d.run(todo)
    finally:
        bar.close()
        try:  # each step even if the one before failed: rows already buffered still land
            buffered.flush()
        finally:
            try:
                writer.finalize()
            finally:
                _release(handles)
                cluster.shutdown()
    return RunSummary(output, len(m.jobs), skipped, stats.ok, stats.failed, d.switches, time.perf_counter() - t0,
                      stats.interrupted, recovered=len(recovered))


def _release(handles) -> None:
    """Give the workers' GPUs back now, not when the handles are garbage-collected."""
    import ray

    for h in handles:
        try:
            ray.kill(h)
        except Exception:  # already dead
            pass
