"""The farm that stays up, for real: `farm up` starts a `ray start --head` on loopback (its own
process group, its own LORA_FARM_HOME), the controller and two tiny-model workers; the
tests submit, cancel, kill the controller's and a worker's processes, and read the workers'
own counters and each run's results table.

One farm for the module (bringing one up costs ~20 s here); tests leave it idle.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import yaml

from farm.cli import main as farm_main
from jobs.results import read_results

from .cli import out_json, run_id_line

SECRET = "s3cr3t-farm-service-4b1e"


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    base = tmp_path_factory.mktemp("farm")
    old = os.environ.get("LORA_FARM_HOME")
    os.environ["LORA_FARM_HOME"] = str(base / "home")
    from farm.demo import copy_demo_loras

    loras = copy_demo_loras(str(base / "loras"))
    config = base / "farm.yaml"
    config.write_text(yaml.safe_dump({"pools": [{"name": "tiny", "model": {"backend": "tiny"}, "workers": 2}],
                                      "state": str(base / "state"), "lora_roots": [str(base / "loras")]}))
    roots = os.environ.pop("LORA_FARM_LORA_ROOTS", None)  # the farm's roots are its config's, not the test session's
    try:
        assert farm_main(["up", "--config", str(config)]) == 0
    finally:
        if roots is not None:
            os.environ["LORA_FARM_LORA_ROOTS"] = roots
    try:
        yield {"base": base, "loras": loras, "config": str(config)}
    finally:
        farm_main(["down", "--now"])
        if old is None:
            os.environ.pop("LORA_FARM_HOME", None)
        else:
            os.environ["LORA_FARM_HOME"] = old


def manifest(path, loras, comps, per_comp, out, *, size=64, steps=2, seed0=0, extra=None):
    jobs = [{"id": f"{'-'.join(c) or 'base'}-{i}", "prompt": f"p{i}", "seed": seed0 + i,
             "loras": [{"uri": loras[n], "strength": 0.8} for n in c]} for c in comps for i in range(per_comp)]
    data = {"model": {"backend": "tiny"}, "defaults": {"steps": steps, "width": size, "height": size},
            "output": str(out), "jobs": jobs, **(extra or {})}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def submit(capsys, path, *more):
    capsys.readouterr()
    code = farm_main(["submit", path, "--no-progress", *more])
    cap = capsys.readouterr()
    return code, run_id_line(cap.out), cap.err


def wait_for(capsys, run_id, pred, timeout=240):
    deadline = time.monotonic() + timeout
    while True:
        st = out_json(capsys, ["status", run_id, "--json"])
        if pred(st):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.3)


def started(capsys, farm, tmp_path, comps, per_comp, *, ok_at=3):
    """A 128 px manifest submitted and rendering (``ok_at`` jobs done): (run id, output dir, manifest path)."""
    out = tmp_path / "out"
    path = manifest(tmp_path / "m.yaml", farm["loras"], comps, per_comp, out, size=128, steps=4)
    code, rid, _ = submit(capsys, path)
    assert code == 0 and rid.startswith("r-")
    wait_for(capsys, rid, lambda s: s["ok"] >= ok_at)
    return rid, out, path


def workers(capsys):
    return out_json(capsys, ["workers", "--json"])


def one_row_each(out, n):
    rows = read_results(str(out))
    ids = [r.job_id for r in rows]
    assert len(ids) == len(set(ids)) == n, (len(ids), len(set(ids)), n)
    assert all(r.status == "ok" for r in rows), [r.error for r in rows if r.status != "ok"][:3]
    assert len(os.listdir(out / "images")) == n
    return rows


def test_two_manifests_share_the_warm_workers(farm, capsys, tmp_path):
    loras = farm["loras"]
    before = {w["worker_id"]: w for w in workers(capsys)}
    assert all(w["model_loads"] == 1 and w["alive"] for w in before.values()), before
    # one composition, so both workers hold it once the first manifest runs: whatever the policy's
    # cost estimates (switching is cheap on the tiny model, so with two compositions it may rightly
    # move a worker that ran dry onto the other one), the second manifest can only reuse what is held
    comps = [("palette",)]
    m1 = manifest(tmp_path / "m1.yaml", loras, comps, 12, tmp_path / "out1", size=96, steps=3)
    m2 = manifest(tmp_path / "m2.yaml", loras, comps, 6, tmp_path / "out2", seed0=100)
    code, r1, _ = submit(capsys, m1)
    assert code == 0 and r1.startswith("r-")
    # the second arrives while the first runs, once the first has composed on both workers
    wait_for(capsys, r1, lambda s: s["ok"] >= 2 and s["state"] == "running")
    deadline = time.monotonic() + 60
    while sum(w["compositions"] for w in workers(capsys)) - sum(w["compositions"] for w in before.values()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    held = {w["worker_id"]: (w["compositions"], w["composition"]) for w in workers(capsys)}
    code, r2, _ = submit(capsys, m2, "--wait")
    assert code == 0 and r2 != r1
    wait_for(capsys, r1, lambda s: s["state"] == "done")
    one_row_each(tmp_path / "out1", 12)
    one_row_each(tmp_path / "out2", 6)
    after = {w["worker_id"]: w for w in workers(capsys)}
    # the second manifest's composition was held: no worker composed again, none reloaded its model
    assert len({comp for _, comp in held.values()}) == 1, held
    assert {w: a["compositions"] for w, a in after.items()} == {w: c for w, (c, _) in held.items()}, (held, after)
    assert all(r.compose_s == 0 for r in read_results(str(tmp_path / "out2")))
    assert all(a["model_loads"] == 1 for a in after.values())
    assert sum(a["jobs_done"] for a in after.values()) - sum(b["jobs_done"] for b in before.values()) == 18
    st = out_json(capsys, ["status", r2, "--json"])
    assert (st["state"], st["total"], st["ok"], st["failed"], st["queued"], st["running"]) == ("done", 6, 6, 0, 0, 0)
    listed = {s["run_id"]: s for s in out_json(capsys, ["status", "--json"])}
    assert listed[r1]["ok"] == 12 and listed[r2]["state"] == "done"


def test_cancel_then_resubmit_renders_only_the_rest(farm, capsys, tmp_path):
    rid, out, m = started(capsys, farm, tmp_path, [("palette",), ("snowman",)], 10)
    assert out_json(capsys, ["cancel", rid])["run_id"] == rid
    st = wait_for(capsys, rid, lambda s: s["state"] == "cancelled" and s["running"] == 0)
    done = {r.job_id for r in read_results(str(out)) if r.status == "ok"}
    assert 3 <= len(done) < 20 and st["ok"] == len(done)
    stamps = {f: os.stat(out / "images" / f).st_mtime_ns for f in os.listdir(out / "images")}
    assert len(stamps) == len(done)
    code, again, _ = submit(capsys, m, "--wait")
    assert code == 0 and again == rid  # the same manifest is the same run
    one_row_each(out, 20)
    # what was done before the cancel was not rendered again
    assert {f: os.stat(out / "images" / f).st_mtime_ns for f in stamps} == stamps


def test_controller_sigkill_mid_run_loses_nothing(farm, capsys, tmp_path):
    rid, out, _ = started(capsys, farm, tmp_path, [("palette",), ("stripes",), ()], 8)
    from farm.service.actors import controller_handle

    pid = __import__("ray").get(controller_handle().ping.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    st = wait_for(capsys, rid, lambda s: s["state"] in ("done", "failed"))  # Ray restarts it; it recovers the run
    assert st["state"] == "done" and st["ok"] == 24, st
    one_row_each(out, 24)
    ping = __import__("ray").get(controller_handle().ping.remote())
    assert ping["pid"] != pid and rid in ping["recovered"]
    assert all(w["model_loads"] == 1 for w in workers(capsys))  # the workers outlived it, still warm


def test_a_cancel_survives_a_controller_restart(farm, capsys, tmp_path):
    rid, out, _ = started(capsys, farm, tmp_path, [("palette",), ("stripes",)], 12, ok_at=2)
    from farm.service.actors import controller_handle

    pid = __import__("ray").get(controller_handle().ping.remote())["pid"]
    assert out_json(capsys, ["cancel", rid])["run_id"] == rid
    os.kill(pid, signal.SIGKILL)  # before or after its in-flight jobs landed: the run stays cancelled
    st = wait_for(capsys, rid, lambda s: s["state"] in ("cancelled", "done", "failed"))
    assert st["state"] == "cancelled", st
    rendered = len(os.listdir(out / "images"))
    time.sleep(3)  # a restarted controller that took the run up again would be rendering it now
    assert len(os.listdir(out / "images")) == rendered < 24
    assert out_json(capsys, ["status", rid, "--json"])["state"] == "cancelled"


def test_worker_sigkill_mid_run_loses_nothing(farm, capsys, tmp_path):
    rid, out, _ = started(capsys, farm, tmp_path, [("palette",), ("stripes",)], 10)
    victim = next(w for w in workers(capsys) if w["inflight"] > 0)
    os.kill(victim["pid"], signal.SIGKILL)
    st = wait_for(capsys, rid, lambda s: s["state"] in ("done", "failed"))
    assert st["state"] == "done" and st["ok"] == 20, st
    one_row_each(out, 20)
    deadline = time.monotonic() + 60  # Ray restarted it; the controller probes it back in
    while True:
        back = next(w for w in workers(capsys) if w["worker_id"] == victim["worker_id"])
        if back["alive"] and back.get("pid") != victim["pid"]:
            break
        assert time.monotonic() < deadline, back
        time.sleep(0.5)


def test_refusals_name_the_problem(farm, capsys, tmp_path):
    loras = farm["loras"]
    out = tmp_path / "out"
    big = manifest(tmp_path / "big.yaml", loras, [("palette",)], 16, out, size=128, steps=4)
    code, rid, _ = submit(capsys, big)
    assert code == 0
    # the same manifest again while it runs: the same run, not queued twice
    code, again, err = submit(capsys, big)
    assert code == 0 and again == rid and "already running" in err
    # another manifest into the same output while it runs: refused, naming the run
    other = manifest(tmp_path / "other.yaml", loras, [("stripes",)], 2, out)
    code, _, err = submit(capsys, other)
    assert code == 2 and rid in err and "being written" in err
    # a model no pool serves: refused at submit, naming the pools
    path = tmp_path / "diff.yaml"
    path.write_text(yaml.safe_dump({"model": {"backend": "tiny", "dtype": "bfloat16"}, "output": str(tmp_path / "o2"),
                                    "jobs": [{"prompt": "p", "seed": 1}]}))
    code, _, err = submit(capsys, str(path))
    assert code == 2 and "no pool serves" in err and "tiny" in err
    # a LoRA outside the farm's roots: refused by the farm's policy, not the submitter's
    stray = tmp_path / "stray.safetensors"
    stray.write_bytes(open(loras["palette"], "rb").read())
    m = manifest(tmp_path / "stray.yaml", {"x": str(stray)}, [("x",)], 1, tmp_path / "o3")
    code, _, err = submit(capsys, m)
    assert code == 2 and "policy" in err
    out_json(capsys, ["cancel", rid])
    wait_for(capsys, rid, lambda s: s["state"] == "cancelled" and s["running"] == 0)


def test_secrets_stay_out_of_state_status_and_rows(farm, capsys, tmp_path):
    out = tmp_path / "out"
    m = manifest(tmp_path / "m.yaml", farm["loras"], [()], 2, out,
                 extra={"storage_options": {"s3": {"key": "AKIA-service", "secret": SECRET}}})
    code, rid, _ = submit(capsys, m, "--wait")
    assert code == 0
    shown = json.dumps(out_json(capsys, ["status", rid, "--json"])) + json.dumps(workers(capsys))
    state = b"".join(p.read_bytes() for p in (farm["base"] / "state").rglob("*") if p.is_file())
    table = (out / "results.parquet").read_bytes()
    for blob in (shown.encode(), state, table):
        assert SECRET.encode() not in blob and b"AKIA-service" not in blob


def test_up_on_a_running_farm_reconciles_the_worker_count(farm, capsys, tmp_path):
    config = yaml.safe_load(open(farm["config"]))
    one = tmp_path / "one.yaml"
    config["pools"][0]["workers"] = 1
    one.write_text(yaml.safe_dump(config))
    said = out_json(capsys, ["up", "--config", str(one)])
    assert said["farm"].startswith("running") and said["workers"] == {"tiny": [1, 1]}
    assert [w["worker_id"] for w in workers(capsys)] == ["lora-farm-tiny-0"]
    said = out_json(capsys, ["up", "--config", farm["config"]])
    assert said["workers"] == {"tiny": [2, 2]}
    ws = {w["worker_id"]: w for w in workers(capsys)}
    assert set(ws) == {"lora-farm-tiny-0", "lora-farm-tiny-1"} and all(w["alive"] for w in ws.values())
    assert ws["lora-farm-tiny-1"]["model_loads"] == 1 and ws["lora-farm-tiny-1"]["jobs_done"] == 0  # a new one


def test_down_drains_and_the_next_up_finishes_the_run(farm, capsys, tmp_path):
    rid, out, _ = started(capsys, farm, tmp_path, [("palette",), ("stripes",)], 12, ok_at=2)
    capsys.readouterr()
    assert farm_main(["down"]) == 0  # drain: in-flight jobs finish; the run stays recorded
    said = capsys.readouterr().out
    assert "1 unfinished run" in said and "stopped" in said
    before = {r.job_id for r in read_results(str(out))}
    assert 2 <= len(before) < 24
    roots = os.environ.pop("LORA_FARM_LORA_ROOTS", None)
    try:
        assert farm_main(["up", "--config", farm["config"]]) == 0  # a new cluster, the same state root
    finally:
        if roots is not None:
            os.environ["LORA_FARM_LORA_ROOTS"] = roots
    st = wait_for(capsys, rid, lambda s: s["state"] in ("done", "failed"))
    assert st["state"] == "done" and st["ok"] == 24
    one_row_each(out, 24)
