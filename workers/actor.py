"""The only Ray import in workers/: RenderWorker made remote at the call site."""
from __future__ import annotations

import ray

from .worker import RenderWorker


def remote_worker(num_gpus: float = 1.0, num_cpus: float = 0.0, max_restarts: int = 2, **options):
    """RenderWorker as a Ray actor class holding ``num_gpus`` (fractions allowed).

    Actors ask for ``num_cpus=0`` by default so a small machine can host several logical-GPU
    workers; the model is built lazily on the first render, after Ray has set
    CUDA_VISIBLE_DEVICES. Restarted actors come back empty and rejoin.
    """
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0, **options)(
        RenderWorker
    )
