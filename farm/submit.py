"""`farm submit` / `farm status` through the Ray Jobs API.

The manifest is resolved here (relative paths made absolute) and shipped as JSON in the
job's working_dir, so the cluster sees the same jobs this machine validated; LoRA and
output locations must be reachable from the cluster (shared storage / fsspec URLs).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(manifest_path: str, address: str, *, out: str | None = None, workers: int | None = None, wait: bool = False) -> int:
    from jobs.manifest import load_manifest

    m = load_manifest(manifest_path)
    data = m.to_dict()
    if out:
        data["output"] = out
    work = tempfile.mkdtemp(prefix="farm-submit-")
    with open(os.path.join(work, "manifest.json"), "w") as f:
        json.dump(data, f)
    cmd = [sys.executable, "-m", "farm.cli", "run", "manifest.json", "--address", "auto", "--no-progress"]
    if workers:
        cmd += ["--workers", str(workers)]
    client = _client(address)
    job_id = client.submit_job(entrypoint=" ".join(shlex.quote(c) for c in cmd), runtime_env={"working_dir": work})
    print(job_id)
    if not wait:
        return 0
    while True:
        s = client.get_job_status(job_id)
        if s.is_terminal():
            print(client.get_job_logs(job_id)[-4000:])
            from ray.job_submission import JobStatus

            return 0 if s == JobStatus.SUCCEEDED else 1
        time.sleep(1.0)


def status(job_id: str, address: str) -> int:
    client = _client(address)
    s = client.get_job_status(job_id)
    print(f"{job_id}: {s}")
    print(client.get_job_logs(job_id)[-2000:])
    return 0
