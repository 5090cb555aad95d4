"""The wire types between the dispatcher (or the simulator) and a policy.

A ``QueuedJob`` is what the policy queues; a ``WorkerView`` is a snapshot of one worker as
the dispatcher knows it. Both are frozen: the policy never writes back into them. The
snapshot rules that give their fields meaning are in the package docstring.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    routing_key: str  # the job's ``Job.routing_key``; "" = base model, no LoRA (not the results' content key)
    loras: tuple[str, ...] = ()  # adapter uris the composition needs
    priority: int = 0  # higher first
    enqueued_at: float = 0.0  # seconds, same clock as ``now``
    work: float = 1.0  # render cost relative to the farm's typical job; ``render_cost_s`` is per unit
    run: str = ""  # the run (manifest submission) it belongs to; "" = the one-shot run
    submitter: str = ""  # whose run: fair share is between submitters


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    node_id: str = ""
    routing_key: str | None = None  # the composition loaded now, by routing key; None = nothing yet, "" = base
    adapters: frozenset[str] = frozenset()  # uris in the worker's memory cache
    node_disk: frozenset[str] = frozenset()  # uris on its node's disk cache
    inflight: int = 0  # sent and not finished
    capacity: int = 2  # max inflight
    compose_cost_s: float = 1.0  # measured estimates
    render_cost_s: float = 1.0
    fetch_cost_s: float = 1.0  # per adapter, remote storage -> node
    load_cost_s: float = 0.1  # per adapter, node disk -> memory
    alive: bool = True
    #: compositions the worker keeps prepared (a low-rank branch cache: switching to one swaps
    #: tensors, nothing composed or fetched) and what such a swap costs
    prepared: frozenset[str] = frozenset()
    swap_cost_s: float = 0.05
