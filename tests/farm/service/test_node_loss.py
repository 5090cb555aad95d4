"""A node that leaves the farm takes its worker's jobs with it to the others: two Ray nodes on
loopback (``ray.cluster_utils.Cluster``), one tiny-model worker on each (one logical GPU per
node), a run in flight when the second node is removed; every job lands exactly once."""
from __future__ import annotations

import time

import pytest
import yaml

from farm.cli import main as farm_main
from jobs.results import read_results

from .cli import out_json, run_id_line


@pytest.fixture
def two_node_farm(tmp_path, capsys):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    node = cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    config = tmp_path / "farm.yaml"
    config.write_text(yaml.safe_dump({"pools": [{"name": "tiny", "model": {"backend": "tiny"}, "workers": 2}],
                                      "state": str(tmp_path / "state")}))
    try:
        assert farm_main(["up", "--config", str(config), "--address", cluster.address]) == 0
        yield cluster, node
    finally:
        farm_main(["down", "--now", "--address", cluster.address])
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def status(capsys, address, run_id):
    return out_json(capsys, ["status", run_id, "--address", address, "--json"])


def test_a_node_leaving_mid_run_loses_no_job(two_node_farm, tmp_path, capsys):
    cluster, node = two_node_farm
    ws = out_json(capsys, ["workers", "--address", cluster.address, "--json"])
    assert len({w["node"] for w in ws}) == 2, "one worker on each node"
    out = tmp_path / "out"
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"model": {"backend": "tiny"}, "defaults": {"steps": 4, "width": 128, "height": 128},
                                 "output": str(out), "jobs": [{"prompt": f"p{i}", "seed": i} for i in range(16)]}))
    capsys.readouterr()
    assert farm_main(["submit", str(m), "--address", cluster.address, "--no-progress"]) == 0
    rid = run_id_line(capsys.readouterr().out)
    deadline = time.monotonic() + 120
    while status(capsys, cluster.address, rid)["ok"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    cluster.remove_node(node)  # its raylet and its worker go; nothing on it answers again
    deadline = time.monotonic() + 240
    while (st := status(capsys, cluster.address, rid))["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, st
        time.sleep(0.5)
    assert st["state"] == "done" and st["ok"] == 16, st
    rows = read_results(str(out))
    assert sorted(r.job_id for r in rows) == sorted({r.job_id for r in rows}) and len(rows) == 16
    assert all(r.status == "ok" for r in rows)
