"""The only Ray import in workers/: RenderWorker made remote at the call site."""
from __future__ import annotations

import os

import ray

from .worker import RenderWorker


#: The concurrency group of the calls that must answer while renders run.
CONTROL = "control"


class RayRenderWorker(RenderWorker):
    """RenderWorker plus what only Ray knows: the node it runs on.

    ``cache_dir`` may contain ``{node}``, replaced by the Ray node id, so several nodes
    sharing one filesystem (a test cluster on one machine) still keep node-local caches.
    """

    def __init__(self, *args, cache_dir: str | None = None, **kwargs):
        node = ray.get_runtime_context().get_node_id()
        if cache_dir and "{node}" in cache_dir:
            cache_dir = cache_dir.format(node=node[:16])
        super().__init__(*args, cache_dir=cache_dir, **kwargs)
        self.node_id = node

    # control calls run in their own concurrency group: a worker busy with its two render
    # calls still answers who it is and what it holds (`farm workers`, the farm's liveness probe)
    @ray.method(concurrency_group=CONTROL)
    def state(self) -> dict:
        return {**super().state(), "node": self.node_id, "pid": os.getpid()}

    @ray.method(concurrency_group=CONTROL)
    def node(self) -> str:
        return self.node_id

    def warm(self) -> dict:
        """Build the model now (a farm's worker loads it once, before its first job); its state."""
        with self._model_lock:
            self.model  # noqa: B018 - the lazy build is the point
        return self.state()


#: Calls an actor runs at once: the dispatcher keeps about two in flight per worker, and
#: RenderWorker fetches outside its model lock, so a call stalled on a slow download does
#: not hold the other one's render (only one composes and renders at a time).
CONCURRENT_CALLS = 2


def remote_worker(num_gpus: float = 1.0, num_cpus: float = 0.0, max_restarts: int = 2, **options):
    """RenderWorker as a Ray actor class holding ``num_gpus`` (fractions allowed).

    Actors ask for ``num_cpus=0`` by default so a small machine can host several logical-GPU
    workers; the model is built lazily on the first render, after Ray has set
    CUDA_VISIBLE_DEVICES. Restarted actors come back empty and rejoin. A threaded actor
    (``CONCURRENT_CALLS``), so a stalled fetch holds only the jobs that need that file.
    """
    options.setdefault("max_concurrency", CONCURRENT_CALLS)
    options.setdefault("concurrency_groups", {CONTROL: 2})
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0, **options)(
        RayRenderWorker
    )
