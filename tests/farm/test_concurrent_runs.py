"""Two real `farm run` processes, each with its own Ray, into one output root: every row of
both lands, once, in `results.parquet` (issue 14: a fifth of the rows were gone in one try)."""
from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import yaml

from jobs.results import read_results

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def manifest(path, out, name: str, n: int) -> str:
    data = {"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 32, "height": 32}, "output": str(out),
            "jobs": [{"id": f"{name}-{i}", "prompt": f"{name} {i}", "seed": i} for i in range(n)]}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_two_farm_runs_into_one_output_both_land_every_row(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    runs = [subprocess.Popen([sys.executable, "-m", "farm.cli", "run", manifest(tmp_path / f"{n}.yaml", out, n, 12),
                              "--workers", "1", "--no-progress"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in ("a", "b")]
    try:
        logs = [r.communicate(timeout=300)[0] for r in runs]
    finally:
        for r in runs:
            if r.poll() is None:
                r.kill()
    assert [r.returncode for r in runs] == [0, 0], logs
    want = {f"{n}-{i}" for n in "ab" for i in range(12)}
    rows = read_results(str(out))
    assert len(rows) == len(want) and {r.job_id for r in rows} == want and all(r.status == "ok" for r in rows)
    table = pq.read_table(out / "results.parquet").column("job_id").to_pylist()
    assert sorted(table) == sorted(want), "the table alone holds both runs' rows, once each"
    assert sorted(os.listdir(out / "images")) == sorted(f"{j}.png" for j in want)
