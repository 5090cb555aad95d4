from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Head:
    url: str       # the dashboard / Jobs API, http://127.0.0.1:PORT
    temp_dir: str  # the head's own --temp-dir: sessions, logs, unpacked job packages
    address: str = ""  # its GCS, 127.0.0.1:PORT (ray.init / `farm up --address`)


@contextlib.contextmanager
def start_ray_head(env: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                   num_gpus: int = 2) -> Iterator[Head]:
    """`ray start --head --block` on loopback in its own process group and temp dir.

    ``env`` is laid over this process's environment; ``headers`` go with the readiness
    probe (a token head answers 401 without one). Stopped by killing only the processes
    it started: `ray stop` would take down every other test's cluster on this machine.
    """
    from ray.job_submission import JobSubmissionClient

    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: unix socket paths are limited
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", f"--num-gpus={num_gpus}",
         f"--dashboard-agent-listen-port={free_port()}",  # the default (52365) is taken by any other head here
         f"--temp-dir={temp_dir}"],
        env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:  # the dashboard's job API comes up a few seconds after the head; it has no ready event
            try:
                JobSubmissionClient(url, headers=dict(headers or {})).list_jobs()
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"ray head did not come up (exit code {proc.poll()})")
                time.sleep(0.5)
        yield Head(url, temp_dir, f"127.0.0.1:{port}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # only the processes this helper started
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a --block head takes long to stop; its group goes at once
        proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
