"""The controller reads a submitted run's output root without holding its lock: while one
submit reads a slow root, status, other submits and cancels answer, and what happened
meanwhile (a cancel, the run's pool closed by a reconcile) wins when the run joins.

A real ``FarmController`` object in this process (its Ray calls on a local cluster on
loopback), with a pool of no workers: nothing renders, the run only queues; the output root's
read (``open_run``) is held on an event to stand for a slow store.
"""
from __future__ import annotations

import threading

import pytest

from farm.service import controller as C
from farm.service.config import FarmConfig, PoolConfig

TINY = {"backend": "tiny"}


@pytest.fixture
def farm(tmp_path, monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, _node_ip_address="127.0.0.1", namespace="lora-farm-lock-test")
    config = FarmConfig(pools=(PoolConfig(name="tiny", model=TINY, workers=0),), state=str(tmp_path / "state"))
    gate, entered = threading.Event(), threading.Event()
    real = C.open_run

    def slow_open(record, m, pool):
        entered.set()
        assert gate.wait(60), "the test never opened the gate"
        return real(record, m, pool)

    monkeypatch.setattr(C, "open_run", slow_open)
    try:
        yield C.FarmController(config, start_loop=False), gate, entered, tmp_path
    finally:
        gate.set()
        ray.shutdown()


def manifest(out, n=3, prompt="p"):
    return {"model": TINY, "output": str(out), "jobs": [{"prompt": f"{prompt}{i}", "seed": i} for i in range(n)]}


def answers(fn, *args):
    """``fn(*args)`` returns while the slow submit holds no lock (a hang guard, not a timing)."""
    out: dict = {}

    def call():
        try:
            out["value"] = fn(*args)
        except Exception as e:  # noqa: BLE001 - raised again below, in the test's thread
            out["error"] = e
    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), f"{fn.__name__} waited on the submit reading its output root"
    if "error" in out:
        raise out["error"]
    return out["value"]


def submitting(c, m):
    result: dict = {}

    def go():
        try:
            result["ok"] = c.submit(m, None, "alice")
        except Exception as e:  # noqa: BLE001 - the test reads it
            result["error"] = e
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, result


def test_status_and_other_submits_answer_while_a_root_is_read(farm):
    c, gate, entered, tmp = farm
    t, result = submitting(c, manifest(tmp / "out"))
    assert entered.wait(60)
    (listed,) = answers(c.status)
    rid = listed["run_id"]
    assert listed["state"] == "queued" and answers(c.status, rid)["run_id"] == rid
    assert answers(c.submit, manifest(tmp / "out"), None, "alice")["resubmitted"] is True  # the same run
    with pytest.raises(C.SubmitRefused, match=f"being written by run {rid}"):
        answers(c.submit, manifest(tmp / "out", prompt="other"), None, "bob")
    assert [s["run_id"] for s in answers(c.status)] == [rid]  # refused: nothing else listed
    gate.set()
    t.join(60)
    assert result["ok"]["run_id"] == rid and result["ok"]["state"] in ("queued", "running")
    assert c.pools["tiny"].dispatcher.run_counts(rid)["queued"] == 3
    assert not c.opening


def test_a_cancel_while_the_root_is_read_wins(farm):
    c, gate, entered, tmp = farm
    t, result = submitting(c, manifest(tmp / "out"))
    assert entered.wait(60)
    rid = answers(c.status)[0]["run_id"]
    assert answers(c.cancel, rid)["cancelling"] is True
    gate.set()
    t.join(60)
    assert result["ok"]["state"] == "cancelled"
    assert rid not in c.pools["tiny"].dispatcher.runs and rid not in c.runs
    assert c.status(rid)["state"] == "cancelled" and c.records[rid].cancel_requested  # a restart keeps it cancelled


def test_a_pool_closed_while_the_root_is_read_fails_the_run(farm):
    c, gate, entered, tmp = farm
    t, result = submitting(c, manifest(tmp / "out"))
    assert entered.wait(60)
    rid = answers(c.status)[0]["run_id"]
    other = FarmConfig(pools=(PoolConfig(name="other", model={"backend": "tiny", "dtype": "float32"}, workers=0),),
                       state=c.config.state)
    answers(c.apply_config, other)  # `farm up` with the pool gone
    gate.set()
    t.join(60)
    assert result["ok"]["state"] == "failed" and "removed or changed" in result["ok"].get("error", "")
    assert c.status(rid)["state"] == "failed" and rid not in c.runs


def test_a_run_cancelled_while_opened_keeps_no_secret_and_stays_cancelled(farm):
    from farm.service import secrets

    c, gate, entered, tmp = farm
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("ok", c.submit(
        manifest(tmp / "out"), {"file": {"auto_mkdir": True}}, "alice")), daemon=True)
    t.start()
    assert entered.wait(60)
    rid = answers(c.status)[0]["run_id"]
    assert secrets.get(rid) == {"file": {"auto_mkdir": True}}
    answers(c.cancel, rid)
    assert c.store.get(rid).cancel_requested  # recorded at once: a restart before it joins keeps it cancelled
    gate.set()
    t.join(60)
    assert out["ok"]["state"] == "cancelled" and secrets.get(rid) == {}


def test_a_submit_opened_across_a_shutdown_is_refused(farm):
    c, gate, entered, tmp = farm
    t, result = submitting(c, manifest(tmp / "out"))
    assert entered.wait(60)
    assert answers(c.shutdown) == {"unfinished_runs": []}
    gate.set()
    t.join(60)
    assert isinstance(result.get("error"), C.SubmitRefused) and "draining" in str(result["error"])
    (st,) = c.status()
    assert st["state"] == "failed" and not c.runs  # nothing joined a farm that is gone
