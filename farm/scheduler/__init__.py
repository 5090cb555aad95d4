"""Pure scheduling policy: which queued job runs on which render worker.

No Ray, no I/O, no clock. The dispatcher (``farm/dispatcher.py``) owns time, actors and
retries, and drives a policy through the incremental protocol below. The baselines
(``baselines.py``) follow it too, and the simulator (``sim.py``) drives these very objects.

One concern per module:

* ``types``: the wire types, ``QueuedJob`` and ``WorkerView``;
* ``costs``: the whole cost model: ``switch_cost``, ``job_work``, ``CostEstimate``,
  ``costs_from_rows``;
* ``queue``: ``JobQueue``, queued jobs indexed by composition;
* ``policy``: ``Policy``, the protocol's bookkeeping, and ``Slot``, a worker in one decision;
* ``affinity``: ``AffinityScheduler``, the policy the farm runs;
* ``fair``: fair share between submitters (weights) and runs, used by it: ``FairShare``
  (the ledger) and the rules; ``flows``: ``FlowQueue``, the queue indexed by run and
  submitter too;
* ``batch_plan``: the plan it follows for a batch (pure packing, and ``Following``);
* ``baselines``: fifo, least_loaded and Ray Serve multiplexing, to measure it against;
* ``sim`` and ``sim_bounds``: a discrete-event farm that drives any policy, and the lower
  bounds no schedule beats (the scheduler benchmark and the tests use both; numpy, no Ray);
  ``sim_fair``: workloads with several submitters and run arrivals, and their measures
  (shares of rendering while all have queued work, per-run latency).

Protocol. The policy owns the queue, indexed by composition, so a decision costs
O(workers^2 + log queue), never a scan of the queue::

    policy = AffinityScheduler()            # or baselines.make("fifo"), ...
    policy.submit(jobs)                     # QueuedJob objects, at any time
    loop:
        views = [WorkerView(...), ...]      # a fresh snapshot of every known worker
        for job_id, worker_id in policy.assign(views, now):
            send the job to that worker; count it in that worker's ``inflight``
        for worker_id, uris in policy.prefetch(views).items():
            make uris local to that worker (node disk, then its adapter cache), best effort
        wait for a finished job or new jobs, or until ``policy.wake_at()`` when not None
        finished (ok, or failed for good): policy.done(job_id)
        retryable failure, dead actor:     policy.done(job_id, requeue=True)
        cancel queued jobs:                policy.cancel(job_ids) -> the ids it removed

Snapshot rules. ``inflight`` counts jobs sent and not yet finished. ``routing_key`` is
the composition the worker has loaded (None before its first; "" is the base model); while
``inflight > 0`` the policy uses the composition of the last job it sent there instead,
since that is what the worker holds once its local queue drains. Dead workers
(``alive=False``) get nothing; their jobs come back through ``done(requeue=True)`` and
keep their ``enqueued_at``, so they keep their age.

Guarantees: ``assign`` gives a worker at most ``capacity - inflight`` jobs and never
returns a job twice (an assigned job leaves the queue until ``done(requeue=True)``);
``submit`` of an id that is queued or assigned raises ``ValueError``.

Costs: a switch costs ``compose_cost_s`` plus, per adapter not in the worker's memory,
``load_cost_s`` (on its node's disk) or ``fetch_cost_s`` (remote); to a composition the
worker keeps prepared (``prepared``: its branch cache), ``swap_cost_s`` instead of the compose
(its adapters are still read into memory first): ``switch_cost``.
``AffinityScheduler`` documents its decisions; ``JobQueue`` is the shared index.

The names below are re-exported so ``from farm.scheduler import X`` keeps working; code
inside the package imports from the module that defines a name.
"""
from __future__ import annotations

from .affinity import AffinityScheduler
from .costs import CostEstimate, costs_from_rows, job_work, switch_cost
from .policy import Policy, Slot
from .queue import NO_WORK, JobQueue
from .types import QueuedJob, WorkerView

__all__ = [
    "AffinityScheduler", "CostEstimate", "JobQueue", "NO_WORK", "Policy", "QueuedJob", "Slot", "WorkerView",
    "costs_from_rows", "job_work", "switch_cost",
]
