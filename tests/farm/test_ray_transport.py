"""RayTransport: Ray's errors become the transport's, on a real local cluster."""
from __future__ import annotations

import pytest
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from farm.ray_transport import RayTransport, seam_error
from farm.transport import TaskFailed, TransportError, TransportTimeout, WorkerLost
from jobs.results import ResultRow
from workers.holds import Holds, Rows


def test_ray_errors_map_onto_the_transports_keeping_rays_type_name():
    cases = [(RayActorError(), WorkerLost), (RayTaskError("render", "Traceback ...", ValueError("bad")), TaskFailed),
             (GetTimeoutError("slow"), TransportTimeout), (RayError("other"), TransportError)]
    for error, kind in cases:
        mapped = seam_error(error)
        assert type(mapped) is kind
        assert str(mapped).startswith(f"{type(error).__name__}: ")  # what a failed row's error column shows


@ray.remote(max_restarts=1, max_task_retries=0, num_cpus=0)
class Echo:
    def echo(self, x):
        return x

    def boom(self):
        raise ValueError("boom")

    def sleep(self, s):
        import time

        time.sleep(s)


def test_ray_transport_over_a_live_actor(ray_cluster):
    t = RayTransport()
    a = Echo.remote()
    ref = t.submit(a, "echo", 41)
    ready, rest = t.wait([ref], num_returns=1, timeout=30)
    assert (ready, rest) == ([ref], []) and t.get(ref) == 41
    rows = Rows([ResultRow("j", "ok", composition_key="k")], Holds("p0", 3, ("k",), ("s3://b/a.safetensors",)))
    back = t.get(t.submit(a, "echo", rows))  # a render call's rows and the worker's report, as the dispatcher reads them
    assert back == rows and back.holds == rows.holds
    with pytest.raises(TaskFailed, match="boom"):
        t.get(t.submit(a, "boom"))
    slow = t.submit(a, "sleep", 30)
    assert t.wait([slow], num_returns=1, timeout=0.1) == ([], [slow])
    t.cancel(slow)  # an actor task: best effort, the kill below ends it
    ray.kill(a, no_restart=True)
    with pytest.raises(WorkerLost):
        t.get(t.submit(a, "echo", 1))
    assert t.now() <= t.now()
