"""ray.init / connect and actor creation: the only place the farm starts Ray."""
from __future__ import annotations

import os
from dataclasses import dataclass

LOOPBACK_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


@dataclass
class Cluster:
    address: str | None
    started_here: bool
    gpus: float

    def shutdown(self) -> None:
        import ray

        if self.started_here and ray.is_initialized():
            ray.shutdown()


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def connect(address: str | None = None, workers: int | None = None, num_cpus: int | None = None) -> Cluster:
    """Join ``address`` or start an embedded local cluster on loopback.

    Embedded: one logical GPU per worker when the machine has none (``--workers N`` on a
    CPU box), otherwise the GPUs found.
    """
    import ray

    for k, v in LOOPBACK_ENV.items():
        if address and k == "RAY_AUTH_MODE":
            continue  # joining: the cluster's mode applies (Ray turns token auth on when a token is found)
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return Cluster(address, False, float(ray.cluster_resources().get("GPU", 0)))
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        return Cluster(address, True, float(ray.cluster_resources().get("GPU", 0)))
    gpus = gpu_count() or (workers or 1)
    ray.init(
        address="local",  # a new cluster: never join one recorded in /tmp/ray by someone else
        num_cpus=num_cpus or max(2, os.cpu_count() or 2),
        num_gpus=gpus,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    return Cluster(None, True, float(gpus))


def make_workers(n: int, model: dict, *, worker_options: dict | None = None, num_gpus: float = 1.0, name_prefix: str = "lora-farm-worker"):
    """n RenderWorker actors, each holding ``num_gpus`` of the cluster's GPUs."""
    from workers.actor import remote_worker

    cls = remote_worker(num_gpus=num_gpus)
    opts = dict(worker_options or {})
    threads = max(1, (os.cpu_count() or 2) // max(n, 1))
    opts.setdefault("num_threads", threads)
    return [cls.remote(model=model, worker_id=f"w{i}", **opts) for i in range(n)]
