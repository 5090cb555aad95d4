from __future__ import annotations

import os

import pytest

for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
    os.environ.setdefault(k, v)


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster on loopback with 3 logical GPUs on this CPU machine."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=3, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
