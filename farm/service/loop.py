"""The controller's loop: each pool's dispatcher stepped, and the book-keeping of runs in flight.

A mixin of ``FarmController`` (``controller.py``), which owns the state it reads: ``pools``,
``runs``, ``records``, ``lock``, ``store``. One thread runs ``_loop``; every step takes the
lock briefly, so the controller's callers (status, submit, cancel) interleave with it.
A run's book-keeping failing (its output root) fails that run alone, never the loop.
"""
from __future__ import annotations

import logging
import time

from . import secrets
from .runs import ActiveRun
from .state import RunRecord

log = logging.getLogger("farm.service.loop")

FLUSH_S = 1.0  # rows reach the output root's parts at least this often
RECORD_S = 2.0  # a run's counts reach its state record at least this often
REVIVE_S = 2.0  # how often dead workers are probed
STEP_S = 0.05  # the loop's wait for a finished call, per pool, while holding the lock
MAX_RUN_ERRORS = 5  # book-keeping failures in a row before a run fails


class RunLoop:
    # ---- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad step
                log.exception("farm loop step failed")
                time.sleep(0.5)

    def tick(self) -> None:
        """One round: each pool steps, then the book-keeping that is due."""
        busy = False
        for pool in list(self.pools.values()):
            with self.lock:
                pool.poll_warm()
                d = pool.dispatcher
                if d.busy():
                    busy = True
                    if self.draining:
                        d.collect(STEP_S)  # finish what is in flight, send nothing new
                    else:
                        d.step(STEP_S)
                for run in [r for r in self.runs.values() if r.pool is pool and d.finished(r.record.run_id)]:
                    self._guarded(run, self._finish_if_done)  # done when its last row lands, not at the next flush
        now = time.monotonic()
        if now - self._last["flush"] >= FLUSH_S:
            self._last["flush"] = now
            with self.lock:
                for run in list(self.runs.values()):
                    self._guarded(run, lambda r: (r.flush(), self._finish_if_done(r)))
        if now - self._last["record"] >= RECORD_S:
            self._last["record"] = now
            with self.lock:
                for run in list(self.runs.values()):
                    self._put_record(run)
        if now - self._last["revive"] >= REVIVE_S:
            self._last["revive"] = now
            self._revive()
        if not busy:
            time.sleep(STEP_S)

    def _guarded(self, run: ActiveRun, step) -> None:
        """One run's book-keeping: its failure (its output root) stops neither the loop nor other runs;
        after ``MAX_RUN_ERRORS`` in a row the run fails, saying why (its finished images keep their stamps)."""
        try:
            step(run)
            run.errors = 0
        except Exception as e:  # noqa: BLE001
            run.errors += 1
            log.warning("run %s: book-keeping failed (%d in a row): %s", run.record.run_id, run.errors, e)
            if run.errors >= MAX_RUN_ERRORS:
                run.pool.dispatcher.cancel_run(run.record.run_id)
                self._abandon(run, f"its output could not be written: {type(e).__name__}: {e}")

    def _abandon(self, run: ActiveRun, reason: str) -> None:
        """End a run that cannot go on: failed, with ``reason``; what was written stays."""
        rid = run.record.run_id
        try:
            run.flush()
            run.writer.finalize()
        except Exception as e:  # noqa: BLE001 - the reason already says what failed
            log.warning("run %s: rows not written: %s", rid, e)
        self._count(run)
        self._end(run.record, "failed", reason)
        self.runs.pop(rid, None)

    def _finish_if_done(self, run: ActiveRun) -> None:
        rid = run.record.run_id
        d = run.pool.dispatcher
        if not d.finished(rid):
            return
        run.flush()
        run.writer.finalize()
        self._count(run)
        self._end(run.record, "cancelled" if run.cancelling else ("failed" if run.failed else "done"))
        d.drop_run(rid)
        del self.runs[rid]

    def _count(self, run: ActiveRun) -> None:
        """The run's record takes its counts (finished before this start included)."""
        r = run.record
        r.ok, r.failed = len(run.ok | run.done_before), len(run.failed - run.ok)

    def _put_record(self, run: ActiveRun) -> None:
        self._count(run)
        run.record.updated_at = time.time()
        self._save(run.record)

    def _end(self, record: RunRecord, state: str, error: str = "") -> None:
        """A run's last record (``state``, ``error``) saved, then its secrets deleted (a
        resubmission brings its own). A save that fails leaves them: the stored record may
        still say the run is active, and a restarted controller recovers it with them."""
        record.state, record.updated_at = state, time.time()
        if error:
            record.error = error[:2000]
        self._save(record)
        if record.has_secrets:
            secrets.delete(record.run_id)

    def _save(self, record: RunRecord) -> None:
        self.store.put(record)
        self.records[record.run_id] = record

    def _revive(self) -> None:
        """Probe workers the dispatcher gave up on (Ray restarts them); those that answer rejoin empty."""
        for pool in list(self.pools.values()):
            with self.lock:
                dead = pool.given_up()
            answering = pool.answering(dead)  # no lock: a probe waits up to a second
            with self.lock:
                for name in answering:
                    pool.dispatcher.revive(name)
