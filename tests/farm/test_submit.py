"""`farm submit` through the Ray Jobs API against a real `ray start --head` on loopback."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from farm.cli import main as farm_main
from jobs.results import read_results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    port, dash = free_port(), free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--num-gpus=2",
         f"--temp-dir={tempfile.mkdtemp(prefix='rf', dir='/tmp')}"],  # short: unix socket paths are limited
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 90
    while True:  # the dashboard's job API comes up a few seconds after the head
        try:
            JobSubmissionClient(url).list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                pytest.fail(f"ray head did not come up (exit code {proc.poll()})")
            time.sleep(1)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)  # only the processes this test started
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_submit_runs_manifest_on_the_cluster(ray_head, tmp_path, capsys):
    out = tmp_path / "out"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({
        "model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64}, "output": str(out),
        "jobs": [{"prompt": f"p{i}", "seed": i} for i in range(3)]}))
    assert farm_main(["submit", str(manifest), "--address", ray_head, "--wait"]) == 0
    job_id = capsys.readouterr().out.splitlines()[0].strip()
    rows = read_results(str(out))
    assert sorted(r.status for r in rows) == ["ok"] * 3
    assert farm_main(["status", job_id, "--address", ray_head]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
