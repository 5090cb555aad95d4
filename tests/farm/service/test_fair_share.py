"""Fair share on the real farm (issue 16): two submitters, weights 1:1, submit at once to a
farm of two sleep-backend workers (the service's controller, real Ray actors, real LoRA files
bound and merged); their shares of rendering worker-seconds while both have queued work,
measured from the result rows (``benchmarks.service_fair``), are within ±15% of equal with
``fair_share`` on. With it off, on the same workload, the affinity rules give the farm to the
larger run first: the same measure is far outside, so it can tell the two apart.
"""
from __future__ import annotations

import math

import pytest

from benchmarks import service_fair as F
from jobs.rows import ResultRow


def row(job: str, end: float, render: float = 1.0, status: str = "ok") -> ResultRow:
    return ResultRow(job_id=job, status=status, composition_key="k", render_s=render, finished_at=end,
                     error="" if status == "ok" else "boom")


def test_shares_count_rendering_inside_the_window_both_have_queued_work():
    # a: renders [0,1], [1,2], [2,3], [3,4]; b: [0,1], [2,3] (idle between: composing). b's last job
    # began rendering at 2, so the window is [0, 2]: a 2 s, b 1 s
    rows = {"a": [row("j0", 1), row("j1", 2), row("j2", 3), row("j3", 4)], "b": [row("j0", 1), row("j1", 3)]}
    out = F.shares(rows, {"a": "a", "b": "b"}, 0.0)
    assert math.isclose(out["window_s"], 2.0)
    assert math.isclose(out["submitters"]["a"]["seconds"], 2.0) and math.isclose(out["submitters"]["b"]["seconds"], 1.0)
    assert math.isclose(out["submitters"]["a"]["share"], 2 / 3) and math.isclose(out["worst"], 1 / 3)
    # failed rows rendered nothing; weights set the targets
    rows["b"].append(row("j2", 2.5, status="failed"))
    weighted = F.shares(rows, {"a": "a", "b": "b"}, 0.0, {"a": 2.0, "b": 1.0})
    assert math.isclose(weighted["submitters"]["a"]["target"], 2 / 3) and math.isclose(weighted["worst"], 0.0, abs_tol=1e-9)


def test_the_window_opens_when_both_are_queued():
    # both queued from 1 s (the later submit); a begins at 1, 2, 3, b at 1.5, 2.5: b's queue is
    # empty from 2.5, so the window is [1, 2.5]: a 1 + 0.5 s, b 1 s
    rows = {"a": [row("j0", 2), row("j1", 3), row("j2", 4)], "b": [row("j0", 2.5), row("j1", 3.5)]}
    out = F.shares(rows, {"a": "a", "b": "b"}, 1.0)
    assert math.isclose(out["window_s"], 1.5)
    assert math.isclose(out["submitters"]["a"]["seconds"], 1.5) and math.isclose(out["submitters"]["b"]["seconds"], 1.0)


def test_every_composition_is_distinct_and_each_run_is_one_submitters():
    files = [f"/l/{i}.safetensors" for i in range(5)]
    ms = F.manifests(files, "/out", {"backend": "sleep"}, alice=(2, 3), bob=(1, 2))
    assert [len(m.jobs) for m in ms.values()] == [6, 2]
    keys = {who: {j.routing_key for j in m.jobs} for who, m in ms.items()}
    assert len(keys["alice"]) == 2 and len(keys["bob"]) == 1 and not keys["alice"] & keys["bob"]
    assert ms["alice"].output != ms["bob"].output


@pytest.fixture(scope="module")
def measured():
    return F.run(workers=2)


def test_two_submitters_get_equal_worker_seconds_within_15_percent(measured):
    on = next(r for r in measured["runs"] if r["fair"])
    assert on["window_s"] > 5.0, on  # a window long enough for shares to mean something
    assert on["worst"] <= F.TARGET, on["submitters"]
    assert set(on["submitters"]) == {"alice", "bob"}


def test_without_fair_share_the_same_measure_is_far_outside(measured):
    off = next(r for r in measured["runs"] if not r["fair"])
    assert off["worst"] > 2 * F.TARGET, off["submitters"]  # alice's larger compositions took the farm first
    assert off["submitters"]["bob"]["share"] < off["submitters"]["alice"]["share"]


def test_the_table_names_the_command_and_both_rows(measured):
    text = F.table(measured, "python -m benchmarks.service_fair")
    assert "python -m benchmarks.service_fair" in text
    assert "| on |" in text and "| off |" in text
