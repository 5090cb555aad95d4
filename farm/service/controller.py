"""The farm's controller: one queue for every run, the pools' workers kept warm, runs kept durable.

It runs as a named, detached, threaded Ray actor (``farm/service/actors.py`` makes it one);
this module is the logic. A loop thread steps each pool's dispatcher (one policy per pool:
a pool is one model, and a composition a worker holds for one run serves the next); the
actor's other threads answer ``submit``, ``status``, ``cancel``, ``workers``, ``reconcile``
and ``shutdown``, all under one lock with the loop (a submit reads its run's output root
without it: the run is reserved in ``opening`` meanwhile and joins in one locked step).

Durable and exactly-once, by construction:

* an accepted run is recorded in the state root (``farm/service/state.py``) *before* its id
  is returned; its secrets go to Ray's KV (``farm/service/secrets.py``), never the state root;
* rows land in the run's own output root as they finish (``jobs.results.ResultsWriter``
  parts, every ``FLUSH_S``), images carry their job's stamp (``jobs.stamp``);
* a controller Ray restarts builds itself from the state root: each unfinished run starts
  again from its results table and its stamped images (``start_run`` is the same code for a
  new run and a recovered one), so finished work is not redone and a job has one row;
* a worker that dies loses its calls to the dispatcher, which sends them elsewhere; Ray
  restarts it, and the controller probes it back into the pool (``REVIVE_S``).

Two active runs never write one output root: the second is refused, naming the first.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any

from jobs.manifest import Manifest, ManifestError, validate_manifest

from . import secrets
from .config import FarmConfig, parse_farm_config
from .pools import Pool
from .loop import RunLoop
from .runs import ActiveRun, open_run, record_status, run_status
from .state import RunRecord, StateStore, run_id_for

log = logging.getLogger("farm.service.controller")

ROOTS_ENV = "LORA_FARM_LORA_ROOTS"
#: A submitted manifest's directory is no LoRA root on a shared farm (it would allow any local
#: path a submitter names): validation and workers use the operator's roots only.
NO_MANIFEST_DIR = ""


class SubmitRefused(ValueError):
    """A manifest the farm will not take; the message says why (and is safe to print)."""


class FarmController(RunLoop):
    """Everything the farm does; the Ray actor is this class made remote (see ``actors.py``)."""

    def __init__(self, config: dict | FarmConfig, *, backend_factories: dict | None = None, start_loop: bool = True):
        # a FarmConfig object: built in code by a trusted caller (a benchmark's measurement pool);
        # after a restart, the config last applied (a reconcile's), not the first one
        if not isinstance(config, FarmConfig):
            config = secrets.load_config() or config
        self.config: FarmConfig = config if isinstance(config, FarmConfig) else parse_farm_config(config)
        roots = tuple(self.config.lora_roots)
        if roots:  # this process validates manifests: it sees the farm's roots as its workers do
            have = [r for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r]
            os.environ[ROOTS_ENV] = os.pathsep.join(dict.fromkeys([*have, *roots]))
        self.store = StateStore(self.config.state, dict(self.config.storage_options))
        self.lock = threading.RLock()
        self.pools: dict[str, Pool] = {}
        self.runs: dict[str, ActiveRun] = {}
        #: runs accepted and being opened (their output root read) outside the lock
        self.opening: dict[str, RunRecord] = {}
        #: every run's record as last written: the state root is read once, at start (``_recover``)
        self.records: dict[str, RunRecord] = {}
        self.draining = False
        self.started_at = time.time()
        self.backend_factories = dict(backend_factories or {})  # pool name -> factory (benchmarks' backends)
        self._stop = threading.Event()
        self._last = {"flush": 0.0, "record": 0.0, "revive": 0.0}
        self.apply_config(self.config)
        self.recovered = self._recover()
        self._thread = None
        if start_loop:
            self._thread = threading.Thread(target=self._loop, name="farm-loop", daemon=True)
            self._thread.start()

    # ---- configuration ---------------------------------------------------------------------
    def apply_config(self, config: FarmConfig) -> dict:
        """Start, keep or scale each pool to the config's worker count; returns the counts."""
        import ray

        gpus = float(ray.cluster_resources().get("GPU", 0))
        roots = tuple(config.lora_roots)
        with self.lock:
            for pc in config.pools:
                pool = self.pools.get(pc.name)
                if pool is None or pool.config.model != pc.model:
                    if pool is not None:
                        self._close_pool(pool)
                    pool = self.pools[pc.name] = Pool(pc, roots, self.backend_factories.get(pc.name))
                pool.config = pc
                pool.share(config.fair_share, config.submitters)
                pool.scale(pc.worker_count(gpus))
            for name in [n for n in self.pools if n not in {p.name for p in config.pools}]:
                self._close_pool(self.pools.pop(name))
            self.config = config
            try:
                secrets.save_config(config.to_dict())
            except TypeError:  # a config built in code that JSON cannot hold (a benchmark's): not kept
                pass
            return {p.name: len(p.handles) for p in self.pools.values()}

    def reconcile(self, config: dict) -> dict:
        """``farm up`` on a running farm: the new config applied (worker counts, pools)."""
        return self.apply_config(parse_farm_config(config))

    def _close_pool(self, pool: Pool) -> None:
        """A pool removed, or its model changed: its runs fail (nothing will render them), workers go."""
        pool.dispatcher.cancel_in_flight()
        for run in [r for r in self.runs.values() if r.pool is pool]:
            self._abandon(run, f"pool {pool.name!r} was removed or changed by `farm up`; resubmit to render the rest")
        for name in list(pool.handles):
            pool.retire(name)

    def ready(self) -> dict:
        """Poll once: ``{"ready": bool, "workers": {pool: [ready, wanted]}, "failed": {worker: why}}``
        (a worker that could not load its model is in ``failed`` and the farm is not ready)."""
        with self.lock:
            for p in self.pools.values():
                p.poll_warm()
            counts = {p.name: [sum(p.dispatcher.worker_book(n) is not None for n in p.handles), len(p.handles)]
                      for p in self.pools.values()}
            failed = {n: why for p in self.pools.values() for n, why in p.failed.items()}
            return {"ready": all(p.ready for p in self.pools.values()) and not failed, "workers": counts,
                    "failed": failed}

    # ---- runs ------------------------------------------------------------------------------
    def submit(self, manifest: dict | Manifest, storage_options: dict | None = None, submitter: str = "default",
               priority: int = 0) -> dict:
        """Accept a run (recorded before this returns) or raise ``SubmitRefused`` naming why.

        ``manifest``: a manifest mapping, validated here against the farm's own LoRA roots; or a
        ``Manifest`` built in code, taken as it is (only code running on the cluster can send
        one, and such code can do anything a worker can). The same manifest into the same
        output while it runs is the same run (returned as it is).
        """
        if self.draining:
            raise SubmitRefused("the farm is draining (`farm down`): it takes no new runs")
        opts = dict(storage_options or {})
        if isinstance(manifest, Manifest):
            m = dataclasses.replace(manifest, storage_options=opts) if opts else manifest
            opts = dict(m.storage_options)
        else:
            try:
                m = validate_manifest({**manifest, "storage_options": opts}, base_dir=NO_MANIFEST_DIR)
            except ManifestError as e:
                raise SubmitRefused("bad manifest:\n  " + "\n  ".join(e.problems)) from None
        stored = m.to_dict()
        stored["storage_options"] = {}
        run_id = run_id_for(stored, m.output)
        with self.lock:  # checks and the reservation under the lock; the roots' I/O after it
            pool = self._pool_for(m)  # a reconcile may be closing pools
            if run_id in self.runs:
                if self.runs[run_id].cancelling:
                    raise SubmitRefused(f"run {run_id} is being cancelled (in-flight jobs finishing); "
                                        "resubmit once `farm status` says cancelled")
                return {**run_status(self.runs[run_id]), "resubmitted": True}
            if run_id in self.opening:
                return {**record_status(self.opening[run_id]), "resubmitted": True}
            writing = [(r.record.run_id, r.record.state, r.record.output) for r in self.runs.values()]
            writing += [(r.run_id, r.state, r.output) for r in self.opening.values()]
            busy = next((w for w in writing if _same_root(w[2], m.output)), None)
            if busy is not None:
                raise SubmitRefused(f"output {m.output!r} is being written by run {busy[0]} ({busy[1]}); wait "
                                    f"for it, `farm cancel {busy[0]}`, or choose another output")
            old = self.records.get(run_id)
            now = time.time()
            record = RunRecord(run_id=run_id, manifest=stored, output=m.output, submitter=submitter or "default",
                               priority=int(priority), state="queued", total=len(m.jobs),
                               created_at=old.created_at if old else now, updated_at=now, has_secrets=bool(opts))
            self.opening[run_id] = record
        joined = False
        try:
            if opts:
                secrets.put(run_id, opts)
            self._save(record)  # durable before acknowledged
            try:
                run, todo = open_run(record, m, pool)  # reads its output root: no lock held meanwhile
            except Exception as e:  # noqa: BLE001 - its output root cannot be read: the run fails, said so
                with self.lock:
                    self.opening.pop(run_id, None)
                    self._end(record, "failed", f"output {m.output!r}: {type(e).__name__}: {e}")
                raise SubmitRefused(record.error) from None
            with self.lock:  # one step: out of ``opening`` and into the farm (a cancel sees one or the other)
                self.opening.pop(run_id, None)
                joined = True
                self._register(run, todo)
                if self.runs.get(run_id) is run:
                    return run_status(run)
                if record.state == "failed" and self.draining:
                    raise SubmitRefused(record.error)
                return record_status(record)
        finally:
            if not joined:
                with self.lock:
                    self.opening.pop(run_id, None)

    def _pool_for(self, m: Manifest) -> Pool:
        pc = self.config.pool_for(m.model)
        if pc is None or pc.name not in self.pools:
            served = "; ".join(f"{p.name}: {p.model}" for p in self.config.pools)
            raise SubmitRefused(f"no pool serves model {m.model}; the farm's pools: {served}")
        pool = self.pools[pc.name]
        clash = pool.option_clash(m.options)
        if clash:
            raise SubmitRefused(f"the manifest's options {clash} differ from pool {pool.name!r}'s "
                                f"({ {k: getattr(pool.options, k) for k in clash} }): a pool's workers render with "
                                "the pool's options; drop them from the manifest or submit to a pool that has them")
        return pool

    def start_run(self, record: RunRecord, m: Manifest, pool: Pool) -> ActiveRun:
        """Queue what of ``m`` is not done in its output root (a new run or a recovered one)."""
        run, todo = open_run(record, m, pool)
        with self.lock:
            return self._register(run, todo)

    def _register(self, run: ActiveRun, todo: list) -> ActiveRun:
        """An opened run joins the farm (under the lock): its jobs ``todo`` go to its pool's queue.
        What happened while it was opened without the lock wins: a cancel leaves it cancelled, a
        pool closed by a reconcile fails it."""
        record, m = run.record, run.manifest
        if record.cancel_requested or self.draining:
            try:
                run.writer.finalize()  # rows recovered from stamps while it was opened
            except Exception as e:  # noqa: BLE001 - the run ends either way; its images keep their stamps
                log.warning("run %s: recovered rows not written: %s", record.run_id, e)
            if record.cancel_requested:
                self._end(record, "cancelled")
            else:
                self._end(record, "failed", "the farm began draining (`farm down`) while the run was submitted; "
                                            "resubmit it once a farm is up")
            return run
        if self.pools.get(run.pool.name) is not run.pool:
            self.runs[record.run_id] = run
            self._abandon(run, f"pool {run.pool.name!r} was removed or changed by `farm up` while the run was "
                               "submitted; resubmit it")
            return run
        self.runs[record.run_id] = run
        record.state = "running" if todo else "done"
        run.pool.dispatcher.add_run(record.run_id, todo, m.output, storage_options=m.storage_options,
                                    on_rows=run.on_rows, priority=record.priority, submitter=record.submitter)
        self._put_record(run)
        return run

    def _recover(self) -> list[str]:
        """Every run the state root says is unfinished, started again; their ids."""
        back = []
        for record in self.store.list():
            self.records[record.run_id] = record
            if not record.active:
                continue
            if record.cancel_requested:  # cancelled while jobs were in flight: their rows landed or not, it stays cancelled
                record.state, record.updated_at = "cancelled", time.time()
                self._save(record)
                continue
            try:
                opts = secrets.get(record.run_id) if record.has_secrets else {}
                m = validate_manifest({**record.manifest, "storage_options": opts}, base_dir=NO_MANIFEST_DIR)
                self.start_run(record, m, self._pool_for(m))
                back.append(record.run_id)
            except Exception as e:  # noqa: BLE001 - one bad record never stops the farm
                record.state, record.error = "failed", f"could not be recovered: {type(e).__name__}: {e}"[:2000]
                record.updated_at = time.time()
                self._save(record)
                log.error("run %s: %s", record.run_id, record.error)
        return back

    def cancel(self, run_id: str) -> dict:
        with self.lock:
            if run_id in self.opening:  # being opened: it is cancelled as it joins (``_register``)
                record = self.opening[run_id]
                record.cancel_requested = True
                self._save(record)  # a controller restarted before it joins does not start it
                return {**record_status(record), "cancelling": True}
            if run_id not in self.runs:
                return record_status(self._record(run_id))
            self._cancel(run_id)
            return run_status(self.runs[run_id]) if run_id in self.runs else record_status(self._record(run_id))

    def _cancel(self, run_id: str) -> None:
        run = self.runs[run_id]
        run.cancelling = run.record.cancel_requested = True
        self._save(run.record)  # a controller restarted meanwhile does not start it again
        run.pool.dispatcher.cancel_run(run_id)
        self._finish_if_done(run)

    def _record(self, run_id: str) -> RunRecord:
        record = self.records.get(run_id)
        if record is None:
            raise SubmitRefused(f"no run {run_id!r}")
        return record

    # ---- what the farm shows -----------------------------------------------------------------
    def status(self, run_id: str | None = None) -> Any:
        with self.lock:
            if run_id is not None:
                if run_id in self.runs:
                    return run_status(self.runs[run_id], detail=True)
                if run_id in self.opening:
                    return record_status(self.opening[run_id])
                return record_status(self._record(run_id))
            active = {rid: run_status(run) for rid, run in self.runs.items()}
            records = sorted({**self.records, **self.opening}.values(), key=lambda r: r.created_at)
        return [active.get(r.run_id) or record_status(r) for r in records]

    def workers(self) -> list[dict]:
        """Each worker's own report (``RenderWorker.state``) plus its pool and what the farm knows of it."""
        with self.lock:
            snapshot = [(p, dict(p.handles), p.dispatcher.worker_books()) for p in self.pools.values()]
        return [w for pool, handles, books in snapshot for w in pool.reports(handles, books)]

    # ---- stopping ----------------------------------------------------------------------------
    def shutdown(self, now: bool = False, timeout_s: float = 600.0) -> dict:
        """Drain (in-flight jobs finish, nothing new is sent) or stop now; every row reaches its table.

        Unfinished runs stay recorded as they are: a farm brought up on the same state root
        picks them up where they stopped. Returns how many runs were left unfinished.
        """
        self.draining = True
        with self.lock:
            if now:
                for p in self.pools.values():
                    p.dispatcher.cancel_in_flight()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if not any(p.dispatcher.in_flight() for p in self.pools.values()):
                    break
            time.sleep(0.1)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self.lock:
            left = []
            for run in list(self.runs.values()):
                if run.pool.dispatcher.finished(run.record.run_id):
                    self._guarded(run, self._finish_if_done)
                    continue
                self._guarded(run, lambda r: (r.flush(), r.writer.finalize(), self._put_record(r)))
                left.append(run.record.run_id)
            secrets.drop_config()
            for pool in self.pools.values():
                for name in list(pool.handles):
                    pool.retire(name)
        return {"unfinished_runs": left}

    def ping(self) -> dict:
        return {"pid": os.getpid(), "started_at": self.started_at, "recovered": self.recovered}


def _same_root(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")
